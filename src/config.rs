//! Layered settings, each layer over the one before: the embedded `config/default.toml`,
//! then `config/$ATLAS_STRIPE_ENVIRONMENT.toml` when that variable is set, then the file
//! named by `--config`, then `ATLAS_STRIPE__SECTION__KEY` variables.
//!
//! An unknown key is an error naming it and where it was set; every number is checked
//! against a sensible range in [`Settings::validate`]; in production
//! (`ATLAS_STRIPE_ENVIRONMENT=production`) development secrets are never generated and
//! `webhooks.public_base_url` must be a public https address.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

use crate::crypto::{Keyring, MasterKeyId};

const DEFAULT_TOML: &str = include_str!("../config/default.toml");
const ENV_PREFIX: &str = "ATLAS_STRIPE";
/// Names the environment whose file (`config/$ATLAS_STRIPE_ENVIRONMENT.toml`) is layered.
pub const ENVIRONMENT_VAR: &str = "ATLAS_STRIPE_ENVIRONMENT";
/// The environment with the production rules.
pub const PRODUCTION: &str = "production";
/// Where the environments' files are looked for, relative to the working directory.
const CONFIG_DIR: &str = "config";
/// The origin `config` gives values read from variables.
const FROM_VARIABLES: &str = "the environment";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
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
    pub internal: InternalSettings,
    pub proxy: ProxySettings,
    pub notifications: crate::notifications::NotificationSettings,
    pub dev: DevSettings,
    pub log: LogSettings,
    /// `ATLAS_STRIPE_ENVIRONMENT` when set (`production` turns on the production rules).
    /// Not a setting: it chooses which file is layered.
    #[serde(skip)]
    pub environment: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub bind: String,
    pub body_limit_bytes: usize,
    pub shutdown_grace_ms: u64,
    /// How long a client may take to send a request's head.
    pub header_read_timeout_ms: u64,
    /// How long a client may take to send a request's body.
    pub body_read_timeout_ms: u64,
    /// How long a kept-alive connection may sit idle.
    pub idle_timeout_ms: u64,
    /// Connections served at once per process.
    pub max_connections: usize,
    /// How often the readiness and gauge snapshot is refreshed from the database.
    pub health_refresh_ms: u64,
    /// Origins (`scheme://host[:port]`) allowed to call the API from a browser.
    #[serde(deserialize_with = "list")]
    pub cors_allowed_origins: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
pub struct StripeSettings {
    pub api_base: String,
    pub api_version: String,
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub max_retries: u32,
    pub retry_base_delay_ms: u64,
    pub retry_max_delay_ms: u64,
    pub probe_deadline_ms: u64,
    #[serde(deserialize_with = "list")]
    pub required_resources: Vec<String>,
}

impl StripeSettings {
    pub fn probe_deadline(&self) -> Duration {
        Duration::from_millis(self.probe_deadline_ms)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CryptoSettings {
    pub master_keys: Option<SecretString>,
    pub active_key_id: Option<String>,
    pub fingerprint_key: Option<SecretString>,
    pub aws_kms: AwsKmsSettings,
}

/// Where `id:kms:…` master keys are decrypted. Empty `key_id`: KMS not configured.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsKmsSettings {
    /// Key id, key ARN, alias name (`alias/…`) or alias ARN.
    pub key_id: String,
    pub region: String,
    /// A KMS-compatible endpoint instead of AWS's regional one (empty: AWS's).
    pub endpoint_url: String,
    /// The longest wait between two start-up decrypt attempts while KMS does not answer.
    pub retry_max_ms: u64,
}

impl AwsKmsSettings {
    pub fn is_configured(&self) -> bool {
        !self.key_id.trim().is_empty()
    }

    /// The client configuration, when KMS is configured.
    pub fn kms_config(&self) -> Option<crate::crypto::KmsConfig> {
        self.is_configured().then(|| crate::crypto::KmsConfig {
            key_id: self.key_id.trim().to_owned(),
            region: self.region.trim().to_owned(),
            endpoint_url: Some(self.endpoint_url.trim().to_owned()).filter(|u| !u.is_empty()),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub tenant_token_secret: Option<SecretString>,
    pub tenant_token_leeway_secs: u64,
    /// A tenant token whose `exp` is further away than this (plus the leeway) is refused.
    pub tenant_token_max_ttl_secs: u64,
    /// When set, a tenant token's `iss` must equal it.
    pub tenant_token_issuer: Option<String>,
    /// When set, a tenant token's `aud` must name it.
    pub tenant_token_audience: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    pub connect_attempts_per_minute: u32,
    /// Verify requests per tenant per minute.
    pub verify_attempts_per_minute: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    pub public_base_url: String,
    #[serde(deserialize_with = "list")]
    pub enabled_events: Vec<String>,
    pub tolerance_secs: i64,
    pub body_limit_bytes: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountingSettings {
    pub flush_interval_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternalSettings {
    /// `GET …/stripe/key`; off once every charging service calls Stripe through the proxy.
    pub key_fetch_enabled: bool,
}

/// The Stripe proxy for charging services (`…/stripe/v1/{path}`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// `METHOD /v1/path/{template}` pairs that are forwarded; anything else is refused.
    #[serde(deserialize_with = "list")]
    pub allowed: Vec<String>,
    pub body_limit_bytes: usize,
    /// Calls per second smoothed per connected account, by the account's mode.
    pub live_requests_per_second: u32,
    pub test_requests_per_second: u32,
    /// How long a call over the rate may wait for its turn before it is refused (429).
    pub max_wait_ms: u64,
    /// The longest a call may take, retries included (a caller may ask for less).
    pub deadline_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevSettings {
    pub generate_secrets: bool,
    pub secrets_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
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

/// A list setting: an array in a file, or one string split on ',' (a variable). Entries are
/// trimmed and empty ones dropped, so an empty variable is an empty list.
fn list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct ListVisitor;
    impl<'de> serde::de::Visitor<'de> for ListVisitor {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of strings, or one comma-separated string")
        }
        fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Self::Value, E> {
            Ok(value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                let item = item.trim();
                if !item.is_empty() {
                    items.push(item.to_owned());
                }
            }
            Ok(items)
        }
    }
    deserializer.deserialize_any(ListVisitor)
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

/// Where the layers come from. [`Settings::load`] reads the process; tests name them.
struct Layers {
    /// `ATLAS_STRIPE_ENVIRONMENT`.
    environment: Option<String>,
    /// Where `$environment.toml` is.
    config_dir: PathBuf,
    /// `--config`.
    file: Option<PathBuf>,
    /// The variables; `None` reads the process environment.
    vars: Option<HashMap<String, String>>,
}

impl Settings {
    /// Loads the layers: `config/default.toml` (embedded), `config/$ATLAS_STRIPE_ENVIRONMENT.toml`
    /// when that variable is set, `file` (`--config`), `ATLAS_STRIPE__…` variables, then the
    /// `overrides` (key, value) pairs, which tests use. Validates the result.
    pub fn load(file: Option<&Path>, overrides: &[(&str, &str)]) -> Result<Self, SettingsError> {
        let environment = match std::env::var(ENVIRONMENT_VAR) {
            Ok(name) => Some(name),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(SettingsError::Invalid(format!(
                    "{ENVIRONMENT_VAR} is not valid UTF-8"
                )))
            }
        };
        let layers = Layers {
            environment,
            config_dir: PathBuf::from(CONFIG_DIR),
            file: file.map(Path::to_owned),
            vars: None,
        };
        Self::load_layers(&layers, overrides)
    }

    fn load_layers(layers: &Layers, overrides: &[(&str, &str)]) -> Result<Self, SettingsError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(name) = &layers.environment {
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid {
                return Err(SettingsError::Invalid(format!(
                    "{ENVIRONMENT_VAR} must name an environment (letters, digits, '-' and '_'), \
                     e.g. {PRODUCTION}; unset it for development"
                )));
            }
            let path = layers.config_dir.join(format!("{name}.toml"));
            builder = builder.add_source(config::File::from(path).required(true));
        }
        if let Some(path) = &layers.file {
            builder = builder.add_source(config::File::from(path.as_path()).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .source(layers.vars.clone()),
        );
        for (key, value) in overrides {
            builder = builder.set_override(*key, *value)?;
        }
        let merged = builder.build()?;
        let origin = |key: &str| describe_origin(&merged, key, overrides);
        let mut settings: Settings = match merged.clone().try_deserialize() {
            Ok(settings) => settings,
            Err(err) => return Err(explain_load_error(err, &merged, overrides)),
        };
        settings.environment = layers.environment.clone();
        settings.check(&origin)?;
        Ok(settings)
    }

    /// Whether the production rules apply (`ATLAS_STRIPE_ENVIRONMENT=production`).
    pub fn is_production(&self) -> bool {
        self.environment.as_deref() == Some(PRODUCTION)
    }

    /// Checks every value against a sensible range, and the production rules. `load` calls
    /// it (and then also says which layer set a refused value).
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.check(&|_| None)
    }

    fn check(&self, origin: &dyn Fn(&str) -> Option<String>) -> Result<(), SettingsError> {
        let problems = self.problems();
        if problems.0.is_empty() {
            return Ok(());
        }
        let lines: Vec<String> = problems
            .0
            .into_iter()
            .map(|(key, message)| match origin(&key) {
                Some(layer) => format!("{key} {message} (set in {layer})"),
                None => format!("{key} {message}"),
            })
            .collect();
        Err(SettingsError::Invalid(lines.join("; ")))
    }

    fn problems(&self) -> Problems {
        let mut p = Problems::default();
        let production = self.is_production();

        let s = &self.server;
        p.range(
            "server.body_limit_bytes",
            s.body_limit_bytes,
            1024..=1 << 20,
        );
        p.range("server.shutdown_grace_ms", s.shutdown_grace_ms, 0..=300_000);
        p.range(
            "server.header_read_timeout_ms",
            s.header_read_timeout_ms,
            1..=300_000,
        );
        p.range(
            "server.body_read_timeout_ms",
            s.body_read_timeout_ms,
            1..=300_000,
        );
        p.range("server.idle_timeout_ms", s.idle_timeout_ms, 1..=3_600_000);
        p.range("server.max_connections", s.max_connections, 1..=100_000);
        p.range(
            "server.health_refresh_ms",
            s.health_refresh_ms,
            50..=3_600_000,
        );
        if s.bind.trim().is_empty() {
            p.push("server.bind", "is empty; give host:port, e.g. 0.0.0.0:8080");
        }
        for origin in &s.cors_allowed_origins {
            if let Some(problem) = origin_problem(origin) {
                p.push("server.cors_allowed_origins", problem);
            }
        }

        let d = &self.database;
        p.range("database.max_connections", d.max_connections, 1..=1000);
        p.range(
            "database.acquire_timeout_ms",
            d.acquire_timeout_ms,
            1..=300_000,
        );
        let url = d.url.expose_secret();
        if !(url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.starts_with("sqlite:"))
        {
            p.push(
                "database.url",
                "must be a postgres:// (or postgresql://) or sqlite: URL",
            );
        }

        let st = &self.stripe;
        if http_url_problem(&st.api_base).is_some() {
            p.push(
                "stripe.api_base",
                "must be an http(s) URL with a host and without query or fragment",
            );
        }
        if st.api_version.trim().is_empty() || st.api_version.contains(char::is_whitespace) {
            p.push(
                "stripe.api_version",
                "must be a Stripe API version, e.g. 2023-08-16",
            );
        }
        p.range(
            "stripe.connect_timeout_ms",
            st.connect_timeout_ms,
            1..=60_000,
        );
        p.range(
            "stripe.request_timeout_ms",
            st.request_timeout_ms,
            1..=300_000,
        );
        p.range("stripe.max_retries", st.max_retries, 0..=10);
        p.range(
            "stripe.retry_base_delay_ms",
            st.retry_base_delay_ms,
            1..=60_000,
        );
        p.range(
            "stripe.retry_max_delay_ms",
            st.retry_max_delay_ms,
            st.retry_base_delay_ms.max(1)..=300_000,
        );
        p.range(
            "stripe.probe_deadline_ms",
            st.probe_deadline_ms,
            1..=600_000,
        );
        if st.required_resources.is_empty() {
            p.push("stripe.required_resources", "lists no resource");
        }
        for name in &st.required_resources {
            if let Err(e) = crate::domain::Resource::parse(name) {
                p.push(
                    "stripe.required_resources",
                    format!("lists a resource Atlas does not know: {e}"),
                );
            }
        }

        let a = &self.auth;
        p.range(
            "auth.tenant_token_leeway_secs",
            a.tenant_token_leeway_secs,
            0..=300,
        );
        p.range(
            "auth.tenant_token_max_ttl_secs",
            a.tenant_token_max_ttl_secs,
            1..=86_400,
        );
        for (key, value) in [
            ("auth.tenant_token_issuer", &a.tenant_token_issuer),
            ("auth.tenant_token_audience", &a.tenant_token_audience),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                p.push(key, "is empty; leave it unset to not check the claim");
            }
        }

        let l = &self.limits;
        p.range(
            "limits.connect_attempts_per_minute",
            l.connect_attempts_per_minute,
            1..=1_000_000,
        );
        p.range(
            "limits.verify_attempts_per_minute",
            l.verify_attempts_per_minute,
            1..=1_000_000,
        );

        let r = &self.reverify;
        // Zero interval and retry: due at every tick (tests use it).
        p.range("reverify.interval_secs", r.interval_secs, 0..=30 * 86_400);
        p.range("reverify.jitter_secs", r.jitter_secs, 0..=r.interval_secs);
        p.range("reverify.retry_secs", r.retry_secs, 0..=86_400);
        p.range("reverify.tick_ms", r.tick_ms, 1..=3_600_000);
        p.range("reverify.batch", r.batch, 1..=10_000);
        p.range("reverify.concurrency", r.concurrency, 1..=256);
        // A lease must outlast the probe it covers, or a second process probes again.
        let min_lease = st.probe_deadline_ms.div_ceil(1000).max(1);
        p.range("reverify.lease_secs", r.lease_secs, min_lease..=86_400);
        let one_verification = st.required_resources.len().max(1) as u32;
        p.range(
            "reverify.stripe_requests_per_second",
            r.stripe_requests_per_second,
            one_verification..=10_000,
        );

        let w = &self.webhooks;
        if let Some(problem) = public_base_url_problem(&w.public_base_url, production) {
            p.push("webhooks.public_base_url", problem);
        }
        if w.enabled_events.is_empty() {
            p.push("webhooks.enabled_events", "lists no event");
        }
        if w.enabled_events
            .iter()
            .any(|e| e.contains(|c: char| !(c.is_ascii_alphanumeric() || "._*".contains(c))))
        {
            p.push(
                "webhooks.enabled_events",
                "must list Stripe event types, e.g. invoice.paid",
            );
        }
        p.range("webhooks.tolerance_secs", w.tolerance_secs, 1..=3600);
        p.range(
            "webhooks.body_limit_bytes",
            w.body_limit_bytes,
            1024..=16 << 20,
        );

        p.range(
            "accounting.flush_interval_ms",
            self.accounting.flush_interval_ms,
            1..=3_600_000,
        );

        let x = &self.proxy;
        for entry in &x.allowed {
            if let Err(problem) = crate::proxy::Endpoint::parse(entry) {
                p.push("proxy.allowed", problem);
            }
        }
        p.range("proxy.body_limit_bytes", x.body_limit_bytes, 1024..=1 << 20);
        p.range(
            "proxy.live_requests_per_second",
            x.live_requests_per_second,
            1..=10_000,
        );
        p.range(
            "proxy.test_requests_per_second",
            x.test_requests_per_second,
            1..=10_000,
        );
        p.range("proxy.max_wait_ms", x.max_wait_ms, 0..=60_000);
        p.range("proxy.deadline_ms", x.deadline_ms, 100..=120_000);

        let k = &self.crypto.aws_kms;
        if k.is_configured() {
            if k.region.trim().is_empty() {
                p.push(
                    "crypto.aws_kms.region",
                    "is empty while crypto.aws_kms.key_id is set: name the key's region",
                );
            }
            if k.key_id.trim().len() > 2048 || k.key_id.trim().contains(char::is_whitespace) {
                p.push(
                    "crypto.aws_kms.key_id",
                    "is not a KMS key id, key ARN, alias name or alias ARN",
                );
            }
        }
        if !k.region.is_empty()
            && !k
                .region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            p.push(
                "crypto.aws_kms.region",
                "is not an AWS region name (e.g. eu-west-1)",
            );
        }
        if !k.endpoint_url.trim().is_empty() {
            match url::Url::parse(k.endpoint_url.trim()) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => p.push(
                    "crypto.aws_kms.endpoint_url",
                    "is not an http(s) URL (leave it empty for AWS's own endpoint)",
                ),
            }
        }
        p.range("crypto.aws_kms.retry_max_ms", k.retry_max_ms, 100..=600_000);

        if self.dev.generate_secrets {
            if production {
                p.push(
                    "dev.generate_secrets",
                    "= true is refused in production: production never generates development \
                     secrets; remove it and give every secret (crypto.master_keys, \
                     crypto.active_key_id, crypto.fingerprint_key, auth.tenant_token_secret)",
                );
            } else if self.dev.secrets_file.as_os_str().is_empty() {
                p.push("dev.secrets_file", "is empty");
            }
        }

        for (key, problem) in self.notifications.problems(production) {
            p.push(key, problem);
        }

        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            p.push("log.filter", format!("is not a log filter ({e})"));
        }
        p
    }

    /// Resolves the keyring and token secrets; generates development ones when allowed
    /// (never in production).
    pub fn secrets(&self) -> Result<Secrets, SettingsError> {
        let mut generated_into = None;
        let may_generate = self.dev.generate_secrets && !self.is_production();
        let dev = if may_generate && self.missing_any_secret() {
            generated_into = Some(self.dev.secrets_file.clone());
            Some(DevSecrets::load_or_create(&self.dev.secrets_file)?)
        } else {
            None
        };
        let pick = |configured: &Option<SecretString>, dev: Option<&SecretString>, name: &str| {
            configured.clone().or_else(|| dev.cloned()).ok_or_else(|| {
                SettingsError::Invalid(format!(
                    "{name} is not set (set {}); refusing to start without it",
                    variable_for(name)
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
        if keyring.has_kms() && !self.crypto.aws_kms.is_configured() {
            let ids: Vec<String> = (keyring.entries().into_iter())
                .filter(|(_, holder)| *holder == crate::crypto::Holder::Kms)
                .map(|(id, _)| id.as_str().to_owned())
                .collect();
            return Err(SettingsError::Invalid(format!(
                "crypto.master_keys: master key {} is held by AWS KMS (`id:kms:…`) but \
                 crypto.aws_kms.key_id is not set (set ATLAS_STRIPE__CRYPTO__AWS_KMS__KEY_ID \
                 and ATLAS_STRIPE__CRYPTO__AWS_KMS__REGION)",
                ids.join(", ")
            )));
        }
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

/// What `validate` found: (dotted key, what is wrong) pairs.
#[derive(Default)]
struct Problems(Vec<(String, String)>);

impl Problems {
    fn push(&mut self, key: &str, message: impl Into<String>) {
        self.0.push((key.to_owned(), message.into()));
    }

    fn range<T: PartialOrd + fmt::Display + Copy>(
        &mut self,
        key: &str,
        value: T,
        range: RangeInclusive<T>,
    ) {
        if !range.contains(&value) {
            self.push(
                key,
                format!("must be {} to {}, not {value}", range.start(), range.end()),
            );
        }
    }
}

/// `crypto.master_keys` → `ATLAS_STRIPE__CRYPTO__MASTER_KEYS`.
fn variable_for(key: &str) -> String {
    format!("{ENV_PREFIX}__{}", key.to_uppercase().replace('.', "__"))
}

/// Where the value of `key` came from, in words an operator can act on.
fn describe_origin(
    merged: &config::Config,
    key: &str,
    overrides: &[(&str, &str)],
) -> Option<String> {
    let value = key
        .split('.')
        .try_fold(&merged.cache, |value, part| match &value.kind {
            config::ValueKind::Table(table) => table.get(part),
            _ => None,
        })?;
    let (leaf_key, origin) = first_leaf(key, value);
    Some(match origin {
        Some(FROM_VARIABLES) => format!("variable {}", variable_for(&leaf_key)),
        Some(path) => path.to_owned(),
        None if overrides.iter().any(|(k, _)| leaf_key.starts_with(k)) => "an override".to_owned(),
        None => "the built-in config/default.toml".to_owned(),
    })
}

/// A table's origin is its first leaf's (tables made by merging have none of their own).
fn first_leaf<'a>(key: &str, value: &'a config::Value) -> (String, Option<&'a str>) {
    if let config::ValueKind::Table(table) = &value.kind {
        if let Some((child, value)) = table.iter().min_by(|a, b| a.0.cmp(b.0)) {
            return first_leaf(&format!("{key}.{child}"), value);
        }
    }
    (key.to_owned(), value.origin())
}

/// An unknown key is reported with its dotted name and where it was set; other errors as
/// `config` words them.
fn explain_load_error(
    err: config::ConfigError,
    merged: &config::Config,
    overrides: &[(&str, &str)],
) -> SettingsError {
    let (section, message) = match &err {
        config::ConfigError::At {
            error,
            key: Some(key),
            ..
        } => (Some(key.clone()), error.to_string()),
        config::ConfigError::Message(message) => (None, message.clone()),
        _ => return SettingsError::Load(err),
    };
    // serde's words: "unknown field `bnd`, expected one of `bind`, …"
    let Some((field, expected)) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
    else {
        return SettingsError::Load(err);
    };
    let key = match section {
        Some(section) => format!("{section}.{field}"),
        None => field.to_owned(),
    };
    let mut text = format!("unknown setting {key}");
    if let Some(layer) = describe_origin(merged, &key, overrides) {
        text.push_str(&format!(" (set in {layer})"));
    }
    let expected = expected.trim_start_matches(',').trim();
    if !expected.is_empty() {
        text.push_str(&format!("; {expected}"));
    }
    SettingsError::Invalid(text)
}

/// Why `raw` is not an http(s) URL with a host, and without query, fragment or credentials.
fn http_url_problem(raw: &str) -> Option<String> {
    let url = match url::Url::parse(raw.trim()) {
        Ok(url) => url,
        Err(e) => return Some(format!("is not a URL ({e})")),
    };
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Some("must be an http(s) URL with a host".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Some("must have no query or fragment".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Some("must not carry credentials".into());
    }
    None
}

/// Why Stripe could not deliver webhooks under `raw`. Outside production only the shape is
/// checked (a loopback address is fine for development and tests); in production it must
/// be https on a host that is neither loopback, private, link-local nor a local name.
/// Only literal addresses and reserved names are judged: a public name may still resolve
/// to a private address.
fn public_base_url_problem(raw: &str, production: bool) -> Option<String> {
    let hint = format!(
        "set {}=https://<the public address Stripe reaches this service at>",
        variable_for("webhooks.public_base_url")
    );
    if raw.trim().is_empty() {
        return Some(if production {
            format!("is not set: in production Stripe must be able to deliver webhooks; {hint}")
        } else {
            "is empty".into()
        });
    }
    if let Some(problem) = http_url_problem(raw) {
        return Some(problem);
    }
    if !production {
        return None;
    }
    let url = url::Url::parse(raw.trim()).ok()?;
    if url.scheme() != "https" {
        return Some(format!(
            "must be an https URL in production, not {}; {hint}",
            url.scheme()
        ));
    }
    let host = url.host()?;
    let why = match &host {
        url::Host::Domain(name) => local_name(name),
        url::Host::Ipv4(ip) => non_public_v4(*ip),
        url::Host::Ipv6(ip) => non_public_v6(*ip),
    }?;
    Some(format!(
        "points at {host}, {why}, which Stripe cannot reach; {hint}"
    ))
}

/// Names that never resolve to a public address.
fn local_name(name: &str) -> Option<&'static str> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        Some("a localhost name")
    } else if !name.contains('.') {
        Some("a single-label name (not a public DNS name)")
    } else if name.ends_with(".local")
        || name.ends_with(".internal")
        || name.ends_with(".home.arpa")
    {
        Some("a local-network name")
    } else {
        None
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    Some(if ip.is_unspecified() || a == 0 {
        "an unspecified address"
    } else if ip.is_loopback() {
        "a loopback address"
    } else if ip.is_private() {
        "a private (RFC 1918) address"
    } else if ip.is_link_local() {
        "a link-local address"
    } else if a == 100 && (b & 0xc0) == 64 {
        "a carrier-grade NAT (100.64.0.0/10) address"
    } else if ip.is_broadcast() || ip.is_multicast() || a >= 240 {
        "a broadcast, multicast or reserved address"
    } else if ip.is_documentation() {
        "a documentation address"
    } else {
        return None;
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    // IPv4-mapped (::ffff:a.b.c.d), NAT64 (64:ff9b::a.b.c.d) and the deprecated
    // IPv4-compatible (::a.b.c.d) forms carry an IPv4 address.
    let [.., hi, lo] = s;
    let embedded = Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if ip.to_ipv4_mapped().is_some()
        || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
        || (s[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified())
    {
        return non_public_v4(embedded);
    }
    Some(if ip.is_unspecified() {
        "an unspecified address"
    } else if ip.is_loopback() {
        "a loopback address"
    } else if ip.is_unique_local() {
        "a unique-local (fc00::/7) address"
    } else if ip.is_unicast_link_local() || (s[0] & 0xffc0) == 0xfec0 {
        "a link-local or site-local address"
    } else if ip.is_multicast() {
        "a multicast address"
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        "a documentation address"
    } else {
        return None;
    })
}

/// Why `raw` is not a browser origin as a browser sends it: `scheme://host[:port]`, lower
/// case, without path (not even '/'), query, fragment or the scheme's default port.
fn origin_problem(raw: &str) -> Option<String> {
    let not_origin = || {
        Some(format!(
            "lists {raw:?}, which is not an origin scheme://host[:port] (http or https, no \
             path, not even a trailing '/')"
        ))
    };
    let Ok(url) = url::Url::parse(raw) else {
        return not_origin();
    };
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return not_origin();
    }
    let origin = url.origin().ascii_serialization();
    if origin != raw {
        return Some(format!(
            "lists {raw:?}, which is not an origin scheme://host[:port]; did you mean {origin:?}?"
        ));
    }
    None
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

    /// Loads with named layers, never the process environment.
    fn load_with(
        environment: Option<&str>,
        config_dir: &Path,
        file: Option<&Path>,
        vars: &[(&str, &str)],
    ) -> Result<Settings, SettingsError> {
        let layers = Layers {
            environment: environment.map(str::to_owned),
            config_dir: config_dir.to_owned(),
            file: file.map(Path::to_owned),
            vars: Some(
                vars.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        };
        Settings::load_layers(&layers, &[])
    }

    /// A config directory holding the shipped `production.toml`.
    fn production_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("production.toml"),
            include_str!("../config/production.toml"),
        )
        .unwrap();
        dir
    }

    const PUBLIC_URL: (&str, &str) = (
        "ATLAS_STRIPE__WEBHOOKS__PUBLIC_BASE_URL",
        "https://stripe.atlas.example",
    );

    fn error(result: Result<Settings, SettingsError>) -> String {
        match result {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

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

    /// default.toml, then $ENV.toml, then --config, then variables; --config does not
    /// replace the environment's file.
    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("staging.toml"),
            "[server]\nbind = \"10.0.0.1:9000\"\n[limits]\nconnect_attempts_per_minute = 7\n\
             verify_attempts_per_minute = 7\n[log]\nfilter = \"debug\"\n",
        )
        .unwrap();
        let file = dir.path().join("mine.toml");
        std::fs::write(
            &file,
            "[limits]\nconnect_attempts_per_minute = 8\n[log]\nfilter = \"info\"\n",
        )
        .unwrap();
        let s = load_with(
            Some("staging"),
            dir.path(),
            Some(&file),
            &[("ATLAS_STRIPE__LOG__FILTER", "warn")],
        )
        .unwrap();
        assert_eq!(s.server.bind, "10.0.0.1:9000", "the environment's file");
        assert_eq!(
            s.limits.verify_attempts_per_minute, 7,
            "the environment's file"
        );
        assert_eq!(s.limits.connect_attempts_per_minute, 8, "--config over it");
        assert_eq!(s.log.filter, "warn", "variables over --config");
        assert_eq!(s.server.body_limit_bytes, 16384, "default.toml under all");

        let err = error(load_with(Some("nowhere"), dir.path(), Some(&file), &[]));
        assert!(
            err.contains("nowhere.toml"),
            "a named environment needs its file: {err}"
        );
        for bad in ["", "../production", "prod uction"] {
            let err = error(load_with(Some(bad), dir.path(), None, &[]));
            assert!(err.contains(ENVIRONMENT_VAR), "{err}");
        }
    }

    #[test]
    fn production_never_generates_development_secrets() {
        let dir = production_dir();
        let file = dir.path().join("mine.toml");
        std::fs::write(&file, "[dev]\ngenerate_secrets = true\n").unwrap();
        let err = error(load_with(
            Some(PRODUCTION),
            dir.path(),
            Some(&file),
            &[PUBLIC_URL],
        ));
        assert!(
            err.contains("dev.generate_secrets") && err.contains("mine.toml"),
            "names the setting and the file: {err}"
        );
        let err = error(load_with(
            Some(PRODUCTION),
            dir.path(),
            None,
            &[PUBLIC_URL, ("ATLAS_STRIPE__DEV__GENERATE_SECRETS", "true")],
        ));
        assert!(
            err.contains("dev.generate_secrets")
                && err.contains("ATLAS_STRIPE__DEV__GENERATE_SECRETS"),
            "names the setting and the variable: {err}"
        );

        // Even when a caller flips it afterwards, secrets() generates nothing.
        let secrets_file = dir.path().join("dev-secrets.toml");
        let mut settings = load_with(
            Some(PRODUCTION),
            dir.path(),
            None,
            &[
                PUBLIC_URL,
                (
                    "ATLAS_STRIPE__DEV__SECRETS_FILE",
                    secrets_file.to_str().unwrap(),
                ),
            ],
        )
        .unwrap();
        assert!(settings.is_production());
        settings.dev.generate_secrets = true;
        let err = settings.secrets().err().expect("refused").to_string();
        assert!(err.contains("crypto.master_keys is not set"), "{err}");
        assert!(!secrets_file.exists(), "nothing generated");
    }

    #[test]
    fn unknown_keys_are_named_with_their_layer() {
        let dir = tempfile::tempdir().unwrap();
        let err = error(load_with(
            None,
            dir.path(),
            None,
            &[("ATLAS_STRIPE__SERVER__BND", "0.0.0.0:80")],
        ));
        assert!(
            err.contains("unknown setting server.bnd")
                && err.contains("ATLAS_STRIPE__SERVER__BND")
                && err.contains("`bind`"),
            "{err}"
        );
        assert!(!err.contains("0.0.0.0:80"), "values are not echoed: {err}");

        let file = dir.path().join("typo.toml");
        std::fs::write(&file, "[auth]\ntenant_token_secrte = \"hunter2\"\n").unwrap();
        let err = error(load_with(None, dir.path(), Some(&file), &[]));
        assert!(
            err.contains("unknown setting auth.tenant_token_secrte") && err.contains("typo.toml"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "values are not echoed: {err}");

        let err = error(load_with(
            None,
            dir.path(),
            None,
            &[("ATLAS_STRIPE__SERVERR__BIND", "x")],
        ));
        assert!(
            err.contains("unknown setting serverr") && err.contains("ATLAS_STRIPE__SERVERR__BIND"),
            "{err}"
        );
        let err = Settings::load(None, &[("limits.connect_attempts", "5")])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("unknown setting limits.connect_attempts"),
            "{err}"
        );
    }

    #[test]
    fn every_number_is_checked_and_the_error_names_it() {
        let cases = [
            ("server.body_limit_bytes", "0"),
            ("server.body_limit_bytes", "1000000000"),
            ("server.shutdown_grace_ms", "86400000"),
            ("server.header_read_timeout_ms", "0"),
            ("server.body_read_timeout_ms", "0"),
            ("server.idle_timeout_ms", "0"),
            ("server.max_connections", "0"),
            ("database.max_connections", "0"),
            ("database.acquire_timeout_ms", "0"),
            ("stripe.connect_timeout_ms", "0"),
            ("stripe.request_timeout_ms", "0"),
            ("stripe.max_retries", "1000"),
            ("stripe.retry_base_delay_ms", "0"),
            ("stripe.retry_max_delay_ms", "100"),
            ("stripe.probe_deadline_ms", "0"),
            ("auth.tenant_token_leeway_secs", "86400"),
            ("auth.tenant_token_max_ttl_secs", "0"),
            ("auth.tenant_token_max_ttl_secs", "31536000"),
            ("limits.connect_attempts_per_minute", "0"),
            ("limits.verify_attempts_per_minute", "0"),
            ("reverify.jitter_secs", "999999"),
            ("reverify.tick_ms", "0"),
            ("reverify.batch", "0"),
            ("reverify.concurrency", "0"),
            ("reverify.lease_secs", "5"),
            ("reverify.stripe_requests_per_second", "2"),
            ("webhooks.tolerance_secs", "0"),
            ("webhooks.tolerance_secs", "-5"),
            ("webhooks.body_limit_bytes", "0"),
            ("accounting.flush_interval_ms", "0"),
            ("accounting.flush_interval_ms", "86400000"),
        ];
        for (key, value) in cases {
            let err = error(Settings::load(None, &[(key, value)]));
            assert!(
                err.contains(&format!("{key} must be")),
                "{key} = {value}: {err}"
            );
        }
        // Which layer set it.
        let dir = tempfile::tempdir().unwrap();
        let err = error(load_with(
            None,
            dir.path(),
            None,
            &[("ATLAS_STRIPE__ACCOUNTING__FLUSH_INTERVAL_MS", "0")],
        ));
        assert!(
            err.contains("accounting.flush_interval_ms must be 1 to 3600000, not 0")
                && err.contains("ATLAS_STRIPE__ACCOUNTING__FLUSH_INTERVAL_MS"),
            "{err}"
        );
        // A value that is not a number at all.
        let err = error(Settings::load(None, &[("server.max_connections", "many")]));
        assert!(err.contains("server.max_connections"), "{err}");
        // Everything else too.
        for (key, value) in [
            ("log.filter", "info,[[["),
            ("auth.tenant_token_issuer", " "),
            ("stripe.api_base", "ftp://api.stripe.com"),
            ("database.url", "mysql://db/atlas"),
            ("webhooks.enabled_events", ""),
            ("stripe.required_resources", "customers,charges"),
        ] {
            let err = error(Settings::load(None, &[(key, value)]));
            assert!(err.contains(key), "{key} = {value}: {err}");
        }
        // The defaults pass, and the new settings have them.
        let s = Settings::load(None, &[]).unwrap();
        assert_eq!(
            (
                s.server.header_read_timeout_ms,
                s.server.body_read_timeout_ms,
                s.server.idle_timeout_ms,
                s.server.max_connections,
                s.limits.verify_attempts_per_minute,
                s.auth.tenant_token_max_ttl_secs,
            ),
            (10_000, 30_000, 60_000, 1024, 6, 3600)
        );
        assert!(s.server.cors_allowed_origins.is_empty());
        assert_eq!(s.auth.tenant_token_issuer, None);
        assert_eq!(s.auth.tenant_token_audience, None);
    }

    #[test]
    fn list_settings_split_a_variable_on_commas() {
        let dir = tempfile::tempdir().unwrap();
        let s = load_with(
            None,
            dir.path(),
            None,
            &[
                (
                    "ATLAS_STRIPE__SERVER__CORS_ALLOWED_ORIGINS",
                    "https://app.atlas.example, http://localhost:3000",
                ),
                (
                    "ATLAS_STRIPE__WEBHOOKS__ENABLED_EVENTS",
                    "invoice.paid,invoice.payment_failed",
                ),
                ("ATLAS_STRIPE__STRIPE__REQUIRED_RESOURCES", "customers"),
            ],
        )
        .unwrap();
        assert_eq!(
            s.server.cors_allowed_origins,
            ["https://app.atlas.example", "http://localhost:3000"]
        );
        assert_eq!(
            s.webhooks.enabled_events,
            ["invoice.paid", "invoice.payment_failed"]
        );
        assert_eq!(s.stripe.required_resources, ["customers"]);
        let s = load_with(
            None,
            dir.path(),
            None,
            &[("ATLAS_STRIPE__SERVER__CORS_ALLOWED_ORIGINS", "")],
        )
        .unwrap();
        assert!(s.server.cors_allowed_origins.is_empty());
    }

    #[test]
    fn cors_origins_must_be_origins() {
        for good in [
            "https://app.atlas.example",
            "http://localhost:3000",
            "https://[::1]:8443",
        ] {
            let s = Settings::load(None, &[("server.cors_allowed_origins", good)]).unwrap();
            assert_eq!(s.server.cors_allowed_origins, [good]);
        }
        for bad in [
            "*",
            "app.atlas.example",
            "https://app.atlas.example/",
            "https://app.atlas.example/path",
            "https://app.atlas.example?x=1",
            "https://APP.atlas.example",
            "https://app.atlas.example:443",
            "ftp://app.atlas.example",
            "https://user@app.atlas.example",
            "null",
        ] {
            let err = error(Settings::load(
                None,
                &[("server.cors_allowed_origins", bad)],
            ));
            assert!(err.contains("server.cors_allowed_origins"), "{bad}: {err}");
        }
    }

    #[test]
    fn production_needs_a_public_https_webhook_url() {
        let dir = production_dir();
        let prod = |url: Option<&str>| {
            let mut vars = vec![];
            if let Some(url) = url {
                vars.push(("ATLAS_STRIPE__WEBHOOKS__PUBLIC_BASE_URL", url));
            }
            load_with(Some(PRODUCTION), dir.path(), None, &vars)
        };
        let err = error(prod(None));
        assert!(
            err.contains("webhooks.public_base_url is not set")
                && err.contains("production.toml")
                && err.contains("ATLAS_STRIPE__WEBHOOKS__PUBLIC_BASE_URL"),
            "{err}"
        );
        for bad in [
            "",
            "stripe.atlas.example",
            "http://stripe.atlas.example",
            "https://127.0.0.1",
            "https://127.1:8443",
            "https://2130706433",
            "https://localhost",
            "https://LOCALHOST.:8443",
            "https://api.localhost",
            "https://atlas-stripe:8080",
            "https://printer.local",
            "https://10.1.2.3",
            "https://172.16.0.1",
            "https://172.31.255.255",
            "https://192.168.1.10",
            "https://169.254.169.254",
            "https://100.64.0.1",
            "https://100.127.255.254",
            "https://0.0.0.0",
            "https://255.255.255.255",
            "https://[::]",
            "https://[::1]",
            "https://[fd00::1]",
            "https://[fc00::1]",
            "https://[fe80::1]",
            "https://[::ffff:10.0.0.1]",
            "https://[::ffff:127.0.0.1]",
            "https://[64:ff9b::a00:1]",
            "https://stripe.atlas.example?x=1",
            "https://user:pw@stripe.atlas.example",
        ] {
            let err = error(prod(Some(bad)));
            assert!(
                err.contains("webhooks.public_base_url")
                    && err.contains("ATLAS_STRIPE__WEBHOOKS__PUBLIC_BASE_URL"),
                "{bad:?}: {err}"
            );
            assert!(!err.contains("pw@"), "credentials are not echoed: {err}");
        }
        for good in [
            "https://stripe.atlas.example",
            "https://stripe.atlas.example:8443/atlas-stripe/",
            "https://8.8.8.8",
            "https://100.128.0.1",
            "https://172.32.0.1",
            "https://[2606:4700::1111]",
        ] {
            let s = prod(Some(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(s.webhooks.public_base_url, good);
        }
        // Outside production a loopback URL is the default, and fine.
        let s = load_with(None, dir.path(), None, &[]).unwrap();
        assert_eq!(s.webhooks.public_base_url, "http://127.0.0.1:8080");
        assert!(!s.is_production());
    }
}
