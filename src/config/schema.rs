//! The settings as typed values. Each field is deserialised into the type its user needs
//! (a `Duration`, a `NonZeroU32`, the resource list, the proxy's allowlist), so a value that
//! cannot be one is refused at load, naming the key and its layer, and start-up only wires.
//!
//! The setting names keep their units (`shutdown_grace_ms`, `interval_secs`): deployers'
//! files and the README name them. The fields drop the unit, which their type now carries.

use std::fmt;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use axum::http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::de;
use crate::domain::Resource;
use crate::proxy::Allowlist;

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
    #[serde(rename = "shutdown_grace_ms", deserialize_with = "de::millis")]
    pub shutdown_grace: Duration,
    /// How long a client may take to send a request's head.
    #[serde(rename = "header_read_timeout_ms", deserialize_with = "de::millis")]
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request's body.
    #[serde(rename = "body_read_timeout_ms", deserialize_with = "de::millis")]
    pub body_read_timeout: Duration,
    /// How long a kept-alive connection may sit idle.
    #[serde(rename = "idle_timeout_ms", deserialize_with = "de::millis")]
    pub idle_timeout: Duration,
    /// Connections served at once per process.
    pub max_connections: usize,
    /// Connections served at once to one peer address; 0: no per-peer cap (a load balancer
    /// in front is one peer).
    pub max_connections_per_peer: usize,
    /// Request bodies being read at once share this many bytes; a request that would take
    /// more is answered 503 `overloaded` at once.
    pub inflight_body_bytes: usize,
    /// Where `/healthz`, `/readyz` and `/metrics` are served instead of `bind`; empty: on
    /// `bind`, with the API.
    pub ops_bind: String,
    /// How often the readiness and gauge snapshot is refreshed from the database.
    #[serde(rename = "health_refresh_ms", deserialize_with = "de::millis")]
    pub health_refresh: Duration,
    /// Origins (`scheme://host[:port]`) allowed to call the API from a browser, as the
    /// `Origin` header a browser sends.
    #[serde(deserialize_with = "de::origins")]
    pub cors_allowed_origins: Vec<HeaderValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// May carry a password, hence secret.
    pub url: SecretString,
    pub max_connections: u32,
    #[serde(rename = "acquire_timeout_ms", deserialize_with = "de::millis")]
    pub acquire_timeout: Duration,
}

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_url(self.url.expose_secret()))
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
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
    #[serde(rename = "connect_timeout_ms", deserialize_with = "de::millis")]
    pub connect_timeout: Duration,
    #[serde(rename = "request_timeout_ms", deserialize_with = "de::millis")]
    pub request_timeout: Duration,
    pub max_retries: u32,
    #[serde(rename = "retry_base_delay_ms", deserialize_with = "de::millis")]
    pub retry_base_delay: Duration,
    #[serde(rename = "retry_max_delay_ms", deserialize_with = "de::millis")]
    pub retry_max_delay: Duration,
    #[serde(rename = "probe_deadline_ms", deserialize_with = "de::millis")]
    pub probe_deadline: Duration,
    #[serde(deserialize_with = "de::resources")]
    pub required_resources: Vec<Resource>,
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
    #[serde(rename = "retry_max_ms", deserialize_with = "de::millis")]
    pub retry_max: Duration,
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
    #[serde(rename = "tenant_token_leeway_secs", deserialize_with = "de::secs")]
    pub tenant_token_leeway: Duration,
    /// A tenant token whose `exp` is further away than this (plus the leeway) is refused.
    #[serde(rename = "tenant_token_max_ttl_secs", deserialize_with = "de::secs")]
    pub tenant_token_max_ttl: Duration,
    /// When set, a tenant token's `iss` must equal it.
    pub tenant_token_issuer: Option<String>,
    /// When set, a tenant token's `aud` must name it.
    pub tenant_token_audience: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    #[serde(deserialize_with = "de::positive::<_, 1_000_000>")]
    pub connect_attempts_per_minute: NonZeroU32,
    /// Verify requests per tenant per minute.
    #[serde(deserialize_with = "de::positive::<_, 1_000_000>")]
    pub verify_attempts_per_minute: NonZeroU32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReverifySettings {
    pub enabled: bool,
    /// Every connection is re-verified within this period (the first time a new connection
    /// is looked at falls anywhere in it, so a bulk import is not due all at once).
    #[serde(rename = "period_secs", deserialize_with = "de::secs")]
    pub period: Duration,
    #[serde(rename = "jitter_secs", deserialize_with = "de::secs")]
    pub jitter: Duration,
    #[serde(rename = "retry_secs", deserialize_with = "de::secs")]
    pub retry: Duration,
    #[serde(rename = "tick_ms", deserialize_with = "de::millis")]
    pub tick: Duration,
    pub batch: u32,
    pub concurrency: u32,
    #[serde(rename = "lease_secs", deserialize_with = "de::secs")]
    pub lease: Duration,
    /// Stripe requests per second for re-verification across every instance (a budget kept
    /// in the database); at least one verification's worth (checked against the resource
    /// list).
    #[serde(deserialize_with = "de::positive::<_, 10_000>")]
    pub max_stripe_calls_per_second: NonZeroU32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    pub public_base_url: String,
    #[serde(deserialize_with = "de::list")]
    pub enabled_events: Vec<String>,
    #[serde(rename = "tolerance_secs", deserialize_with = "de::secs")]
    pub tolerance: Duration,
    pub body_limit_bytes: usize,
    /// Whether this process recovers missed events from Stripe's event log.
    pub recovery_enabled: bool,
    /// While our endpoint on an account is disabled or missing (deliveries cannot arrive),
    /// that account's events are recovered about this often.
    #[serde(rename = "recovery_interval_secs", deserialize_with = "de::secs")]
    pub recovery_interval: Duration,
    /// Most deliveries stored in one transaction (group commit).
    #[serde(deserialize_with = "de::positive::<_, 10_000>")]
    pub batch_max_events: NonZeroU32,
    /// How long a batch waits for more deliveries after its first, in microseconds.
    pub batch_wait_us: u64,
    /// The safety sweep: every other connection's events are listed once in this period
    /// (gaps found otherwise trigger a recovery at once).
    #[serde(rename = "recovery_sweep_secs", deserialize_with = "de::secs")]
    pub recovery_sweep: Duration,
    /// Stripe event-list calls per second across every instance (a budget kept in the
    /// database).
    #[serde(deserialize_with = "de::positive::<_, 10_000>")]
    pub recovery_max_stripe_calls_per_second: NonZeroU32,
    /// Stored events are deleted this many days after they were received.
    pub retention_days: u32,
}

impl WebhookSettings {
    pub fn retention(&self) -> Duration {
        days(self.retention_days)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountingSettings {
    #[serde(rename = "flush_interval_ms", deserialize_with = "de::millis")]
    pub flush_interval: Duration,
    /// Usage tallies (key fetches, proxied calls) are deleted this many days after their
    /// minute.
    pub retention_days: u32,
}

impl AccountingSettings {
    pub fn retention(&self) -> Duration {
        days(self.retention_days)
    }
}

fn days(days: u32) -> Duration {
    Duration::from_secs(u64::from(days) * 86_400)
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
    #[serde(deserialize_with = "de::allowlist")]
    pub allowed: Allowlist,
    /// The `expand[]` values forwarded; any other is refused.
    #[serde(deserialize_with = "de::list")]
    pub expand_allowed: Vec<String>,
    pub body_limit_bytes: usize,
    /// Calls per second smoothed per connected account, by the account's mode.
    #[serde(deserialize_with = "de::positive::<_, 10_000>")]
    pub live_requests_per_second: NonZeroU32,
    #[serde(deserialize_with = "de::positive::<_, 10_000>")]
    pub test_requests_per_second: NonZeroU32,
    /// How long a call over the rate may wait for its turn before it is refused (429).
    #[serde(rename = "max_wait_ms", deserialize_with = "de::millis")]
    pub max_wait: Duration,
    /// The longest a call may take, retries included (a caller may ask for less).
    #[serde(rename = "deadline_ms", deserialize_with = "de::millis")]
    pub deadline: Duration,
    /// The `Stripe-Version`s a caller may send (`YYYY-MM-DD[.name]`); empty accepts any.
    #[serde(deserialize_with = "de::stripe_versions")]
    pub stripe_versions: Vec<String>,
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
