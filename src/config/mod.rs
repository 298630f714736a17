//! Layered settings, each layer over the one before: the embedded `config/default.toml`,
//! then `config/$ATLAS_STRIPE_ENVIRONMENT.toml` when that variable is set, then the file
//! named by `--config`, then `ATLAS_STRIPE__SECTION__KEY` variables.
//!
//! Every value is deserialised into its type at load (`schema`, `de`): durations, positive
//! rates, the required resources, the proxy's allowlist, the CORS origins. An unknown key
//! or a value its type refuses is an error naming the key and where it was set (`load`);
//! every number is then checked against a sensible range (`validate`). In production
//! (`ATLAS_STRIPE_ENVIRONMENT=production`) development secrets are never generated
//! (`secrets`) and `webhooks.public_base_url` must be a public https address (`public_url`).

mod de;
mod load;
mod public_url;
mod schema;
mod secrets;
mod validate;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use schema::{
    redact_url, AccountingSettings, AuthSettings, AwsKmsSettings, CryptoSettings, DatabaseSettings,
    DevSettings, InternalSettings, LimitSettings, LogFormat, LogSettings, ProxySettings,
    ReverifySettings, ServerSettings, Settings, StripeSettings, WebhookSettings,
};
pub use secrets::Secrets;

/// Names the environment whose file (`config/$ATLAS_STRIPE_ENVIRONMENT.toml`) is layered.
pub const ENVIRONMENT_VAR: &str = "ATLAS_STRIPE_ENVIRONMENT";
/// The environment with the production rules.
pub const PRODUCTION: &str = "production";

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: {0}")]
    Invalid(String),
    #[error("configuration: could not write development secrets to {path}: {source}")]
    DevSecrets {
        path: PathBuf,
        source: std::io::Error,
    },
}
