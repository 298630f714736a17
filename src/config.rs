//! Layered settings: the embedded `config/default.toml`, then the file named by `--config`
//! (or `config/$ATLAS_STRIPE_ENVIRONMENT.toml`), then `ATLAS_STRIPE__SECTION__KEY` variables.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::crypto::{Keyring, MasterKeyId};

const DEFAULT_TOML: &str = include_str!("../config/default.toml");
const ENV_PREFIX: &str = "ATLAS_STRIPE";
/// Settings that are lists; given as one string (variable or override) they split on ','.
const LIST_KEYS: [&str; 2] = ["stripe.required_resources", "webhooks.enabled_events"];

#[derive(Debug, Deserialize)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub stripe: StripeSettings,
    pub crypto: CryptoSettings,
    pub auth: AuthSettings,
    pub limits: LimitSettings,
    pub reverify: ReverifySettings,
    pub webhooks: WebhookSettings,
    pub accounting: AccountingSettings,
    pub dev: DevSettings,
    pub log: LogSettings,
}

#[derive(Debug, Deserialize)]
pub struct ServerSettings {
    pub bind: String,
    pub body_limit_bytes: usize,
    pub shutdown_grace_ms: u64,
}

#[derive(Deserialize)]
pub struct DatabaseSettings {
    /// May carry a password, hence secret.
    pub url: SecretString,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
}

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_url(self.url.expose_secret()))
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout_ms", &self.acquire_timeout_ms)
            .finish()
    }
}

/// `postgres://user:pw@host/db?sslmode=…` → `postgres://…@host/db`: enough to tell where.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "[unparsable database url]".to_owned();
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    match rest.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://…@{host}"),
        None => format!("{scheme}://{rest}"),
    }
}

#[derive(Debug, Deserialize)]
pub struct StripeSettings {
    pub api_base: String,
    pub api_version: String,
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub max_retries: u32,
    pub retry_base_delay_ms: u64,
    pub retry_max_delay_ms: u64,
    pub probe_deadline_ms: u64,
    pub required_resources: Vec<String>,
}

impl StripeSettings {
    pub fn probe_deadline(&self) -> Duration {
        Duration::from_millis(self.probe_deadline_ms)
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct CryptoSettings {
    pub master_keys: Option<SecretString>,
    pub active_key_id: Option<String>,
    pub fingerprint_key: Option<SecretString>,
}

#[derive(Debug, Deserialize)]
pub struct AuthSettings {
    pub tenant_token_secret: Option<SecretString>,
    pub tenant_token_leeway_secs: u64,
}

#[derive(Debug, Deserialize)]
pub struct LimitSettings {
    pub connect_attempts_per_minute: u32,
    pub verify_attempts_per_minute: u32,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ReverifySettings {
    pub enabled: bool,
    pub interval_secs: u64,
    pub jitter_secs: u64,
    pub retry_secs: u64,
    pub tick_ms: u64,
    pub batch: u32,
    pub concurrency: u32,
    pub lease_secs: u64,
    pub stripe_requests_per_second: u32,
}

#[derive(Clone, Debug, Deserialize)]
pub struct WebhookSettings {
    pub public_base_url: String,
    pub enabled_events: Vec<String>,
    pub tolerance_secs: i64,
    pub body_limit_bytes: usize,
}

#[derive(Debug, Deserialize)]
pub struct AccountingSettings {
    pub flush_interval_ms: u64,
}

#[derive(Debug, Deserialize)]
pub struct DevSettings {
    pub generate_secrets: bool,
    pub secrets_file: PathBuf,
}

#[derive(Debug, Deserialize)]
pub struct LogSettings {
    pub format: LogFormat,
    pub filter: String,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// The secrets a running service needs, resolved and validated.
pub struct Secrets {
    pub keyring: Keyring,
    pub fingerprint_key: SecretString,
    pub tenant_token_secret: SecretString,
    /// Set when development secrets were generated or loaded from the secrets file.
    pub generated_into: Option<PathBuf>,
}

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

impl Settings {
    /// Loads the layers. `overrides` (key, value) pairs come last; tests use them.
    pub fn load(file: Option<&Path>, overrides: &[(&str, &str)]) -> Result<Self, SettingsError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        match file {
            Some(path) => builder = builder.add_source(config::File::from(path).required(true)),
            None => {
                if let Ok(env) = std::env::var("ATLAS_STRIPE_ENVIRONMENT") {
                    let path = PathBuf::from("config").join(format!("{env}.toml"));
                    builder = builder.add_source(config::File::from(path).required(true));
                }
            }
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key(LIST_KEYS[0])
                .with_list_parse_key(LIST_KEYS[1]),
        );
        for (key, value) in overrides {
            builder = if LIST_KEYS.contains(key) {
                builder.set_override(*key, value.split(',').map(str::trim).collect::<Vec<_>>())?
            } else {
                builder.set_override(*key, *value)?
            };
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |m: &str| Err(SettingsError::Invalid(m.to_owned()));
        if self.stripe.required_resources.is_empty() {
            return invalid("stripe.required_resources lists no resource");
        }
        for name in &self.stripe.required_resources {
            crate::domain::Resource::parse(name)
                .map_err(|e| SettingsError::Invalid(format!("stripe.required_resources: {e}")))?;
        }
        if !(self.stripe.api_base.starts_with("https://")
            || self.stripe.api_base.starts_with("http://"))
        {
            return invalid("stripe.api_base must be an http(s) URL");
        }
        if self.limits.connect_attempts_per_minute == 0 {
            return invalid("limits.connect_attempts_per_minute must be at least 1");
        }
        let base = self.webhooks.public_base_url.trim_end_matches('/');
        if !(base.starts_with("https://") || base.starts_with("http://"))
            || base.contains(['?', '#'])
        {
            return invalid(
                "webhooks.public_base_url must be an http(s) URL without query or fragment",
            );
        }
        if self.webhooks.enabled_events.is_empty() {
            return invalid("webhooks.enabled_events lists no event");
        }
        let r = &self.reverify;
        if r.batch == 0 || r.concurrency == 0 || r.stripe_requests_per_second == 0 || r.tick_ms == 0
        {
            return invalid("reverify.batch, concurrency, tick_ms and stripe_requests_per_second must be at least 1");
        }
        if r.stripe_requests_per_second < self.stripe.required_resources.len() as u32 {
            return invalid("reverify.stripe_requests_per_second must allow one verification (one request per required resource)");
        }
        Ok(())
    }

    /// Resolves the keyring and token secrets; generates development ones when allowed.
    pub fn secrets(&self) -> Result<Secrets, SettingsError> {
        let mut generated_into = None;
        let dev = if self.dev.generate_secrets && self.missing_any_secret() {
            generated_into = Some(self.dev.secrets_file.clone());
            Some(DevSecrets::load_or_create(&self.dev.secrets_file)?)
        } else {
            None
        };
        let pick = |configured: &Option<SecretString>, dev: Option<&SecretString>, name: &str| {
            configured.clone().or_else(|| dev.cloned()).ok_or_else(|| {
                SettingsError::Invalid(format!(
                    "{name} is not set (set ATLAS_STRIPE__{}); refusing to start without it",
                    name.to_uppercase().replace('.', "__")
                ))
            })
        };
        let master_keys = pick(
            &self.crypto.master_keys,
            dev.as_ref().map(|d| &d.master_keys),
            "crypto.master_keys",
        )?;
        let active_key_id = match (&self.crypto.active_key_id, &dev) {
            (Some(id), _) => id.clone(),
            (None, Some(dev)) if self.crypto.master_keys.is_none() => dev.active_key_id.clone(),
            _ => {
                return Err(SettingsError::Invalid(
                    "crypto.active_key_id is not set (set ATLAS_STRIPE__CRYPTO__ACTIVE_KEY_ID)"
                        .into(),
                ))
            }
        };
        let keyring = Keyring::from_config(&master_keys, &active_key_id)
            .map_err(|e| SettingsError::Invalid(e.to_string()))?;
        let fingerprint_key = pick(
            &self.crypto.fingerprint_key,
            dev.as_ref().map(|d| &d.fingerprint_key),
            "crypto.fingerprint_key",
        )?;
        let tenant_token_secret = pick(
            &self.auth.tenant_token_secret,
            dev.as_ref().map(|d| &d.tenant_token_secret),
            "auth.tenant_token_secret",
        )?;
        if tenant_token_secret.expose_secret().len() < 32 {
            return Err(SettingsError::Invalid(
                "auth.tenant_token_secret must be at least 32 bytes".into(),
            ));
        }
        if fingerprint_key.expose_secret().len() < 32 {
            return Err(SettingsError::Invalid(
                "crypto.fingerprint_key must be at least 32 bytes".into(),
            ));
        }
        Ok(Secrets {
            keyring,
            fingerprint_key,
            tenant_token_secret,
            generated_into,
        })
    }

    fn missing_any_secret(&self) -> bool {
        self.crypto.master_keys.is_none()
            || self.crypto.fingerprint_key.is_none()
            || self.auth.tenant_token_secret.is_none()
    }
}

/// Development secrets, kept in a 0600 file so sealed keys still open after a restart.
#[derive(Deserialize)]
struct DevSecrets {
    master_keys: SecretString,
    active_key_id: String,
    fingerprint_key: SecretString,
    tenant_token_secret: SecretString,
}

impl DevSecrets {
    fn load_or_create(path: &Path) -> Result<Self, SettingsError> {
        let io_err = |source| SettingsError::DevSecrets {
            path: path.to_owned(),
            source,
        };
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(io_err)?;
            return toml::from_str(&text).map_err(|e| {
                SettingsError::Invalid(format!("{} is unreadable: {}", path.display(), e.message()))
            });
        }
        let random = || {
            let mut bytes = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            BASE64.encode(bytes)
        };
        let id = MasterKeyId::parse("dev1").expect("valid id");
        let text = format!(
            "# Development secrets generated by atlas-stripe. Never use them in production.\n\
             master_keys = \"{}\"\nactive_key_id = \"dev1\"\nfingerprint_key = \"{}\"\ntenant_token_secret = \"{}\"\n",
            Keyring::generate_entry(&id).expose_secret(),
            random(),
            random(),
        );
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        write_private(path, &text).map_err(io_err)?;
        toml::from_str(&text).map_err(|e| SettingsError::Invalid(e.message().to_owned()))
    }
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_database_passwords() {
        assert_eq!(
            redact_url("postgres://app:hunter2@db:5432/atlas?sslmode=require"),
            "postgres://…@db:5432/atlas"
        );
        assert_eq!(redact_url("sqlite://data/a.db"), "sqlite://data/a.db");
        let settings =
            Settings::load(None, &[("database.url", "postgres://u:hunter2@h/d")]).unwrap();
        assert!(!format!("{settings:?}").contains("hunter2"));
    }

    #[test]
    fn production_without_secrets_refuses_to_start() {
        let settings = Settings::load(None, &[("dev.generate_secrets", "false")]).unwrap();
        let err = settings.secrets().err().expect("must refuse").to_string();
        assert!(err.contains("crypto.master_keys is not set"), "{err}");
    }

    #[test]
    fn development_secrets_are_generated_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dev-secrets.toml");
        let file_str = file.to_str().unwrap();
        let settings = Settings::load(None, &[("dev.secrets_file", file_str)]).unwrap();
        let first = settings.secrets().unwrap();
        assert_eq!(first.generated_into.as_deref(), Some(file.as_path()));
        let second = settings.secrets().unwrap();
        assert_eq!(
            first.tenant_token_secret.expose_secret(),
            second.tenant_token_secret.expose_secret()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "secrets file readable by others");
        }
    }

    #[test]
    fn unknown_required_resource_is_refused() {
        let mut settings = Settings::load(None, &[]).unwrap();
        assert_eq!(settings.stripe.required_resources.len(), 5);
        settings.stripe.required_resources.push("charges".into());
        let err = settings.validate().unwrap_err().to_string();
        assert!(err.contains("unknown Stripe resource \"charges\""), "{err}");
    }
}
