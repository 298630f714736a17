//! A tenant's Stripe connection: the connect flow (`connect.rs`), verification on demand
//! and in the background (`verify.rs`), our webhook endpoint on the tenant's account
//! (`webhook_endpoint.rs`), and the key opened for charging services (`key.rs`).

mod connect;
mod key;
mod verify;
mod webhook_endpoint;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

pub use connect::fix_url;
pub use key::{KeyAccess, KeyError, OpenedKey};
pub use verify::{Reverifier, VerifySchedule};
pub use webhook_endpoint::{spawn_endpoint_cleanup, StripeCleanup};

use crate::config::WebhookSettings;
use crate::crypto::{CryptoError, Fingerprinter, Keyring};
use crate::domain::{KeyFormatError, Mode, Resource, StripeKey, TenantId};
use crate::proxy::AccountSmoothing;
use crate::store::{AttemptQuota, ConnectionRecord, Store, StoreError};
use crate::stripe::{ProbeError, StripeClient, StripeFailure};

/// Why a connect, verify or disconnect did not succeed. Nothing here holds a key. Clone, so
/// that verifies sharing one probe run each get its outcome.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("too many {} attempts", attempt.as_str())]
    RateLimited {
        attempt: Attempt,
        retry_after: Duration,
    },
    #[error("no such tenant or connection")]
    NotConnected,
    #[error(transparent)]
    KeyFormat(#[from] KeyFormatError),
    #[error("mode mismatch")]
    ModeMismatch { tenant: Mode, key: Mode },
    #[error("key rejected")]
    KeyRejected { expired: bool },
    #[error("missing permissions")]
    MissingPermissions {
        missing: Vec<Resource>,
        fix_url: String,
        /// Every required resource was refused: an IP allow-list on the key does that too.
        all_refused: bool,
    },
    #[error("Stripe gave no conclusive answer: {0}")]
    StripeUnavailable(#[from] Inconclusive),
    #[error("Stripe refused to register the webhook endpoint")]
    WebhookRefused,
    /// The account holds Stripe's maximum of webhook endpoints.
    #[error("the account holds Stripe's maximum of webhook endpoints")]
    WebhookEndpointLimit,
    #[error("store: {0}")]
    Store(Arc<StoreError>),
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
    /// Another connect or disconnect of this tenant kept winning the race.
    #[error("the connection kept changing under this request")]
    ConcurrentChange,
}

impl From<StoreError> for ConnectError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TenantMissing => Self::NotConnected,
            other => Self::Store(Arc::new(other)),
        }
    }
}

/// What Stripe left undecided, so that nothing was stored or changed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Inconclusive {
    #[error("probing {resource}: {reason}")]
    Probe { resource: Resource, reason: String },
    #[error("{step}: {failure}")]
    Call {
        step: &'static str,
        failure: StripeFailure,
    },
    #[error("{step} answered {status}")]
    Status { step: &'static str, status: u16 },
    #[error("the webhook registration answer lacks its {0}")]
    RegistrationIncomplete(&'static str),
}

impl From<ProbeError> for ConnectError {
    fn from(e: ProbeError) -> Self {
        match e {
            ProbeError::KeyRejected { expired } => Self::KeyRejected { expired },
            ProbeError::Inconclusive { resource, reason } => {
                Inconclusive::Probe { resource, reason }.into()
            }
        }
    }
}

/// The Stripe requests one verification makes: one probe per required resource, the
/// Events: Read probe and the lookup of our webhook endpoint (repairing the endpoint takes
/// a call or two more, rarely).
pub fn calls_per_verification(required_resources: usize) -> usize {
    required_resources.max(1) + 2
}

/// What is limited per tenant, each under its own quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    Connect,
    Verify,
}

impl Attempt {
    /// As kept in the database's attempt rows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Verify => "verify",
        }
    }
}

/// What a key must prove and how often, from configuration.
#[derive(Clone)]
pub struct ConnectPolicy {
    pub webhooks: WebhookSettings,
    pub required: Vec<Resource>,
    pub probe_deadline: Duration,
    pub schedule: VerifySchedule,
    pub connect_attempts_per_minute: NonZeroU32,
    pub verify_attempts_per_minute: NonZeroU32,
    /// Rung when a repaired endpoint makes a recovery of missed events due now (the
    /// recovery worker listens).
    pub recovery_due: Arc<tokio::sync::Notify>,
    /// Each account's rate, shared with the proxy: background verifications take turns
    /// under it.
    pub pace: Arc<AccountSmoothing>,
}

/// What the connection flows need, built once at start-up.
pub struct ConnectionService {
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    stripe: StripeClient,
    fingerprinter: Fingerprinter,
    required: Vec<Resource>,
    probe_deadline: Duration,
    schedule: VerifySchedule,
    webhooks: WebhookSettings,
    connect_quota: AttemptQuota,
    verify_quota: AttemptQuota,
    recovery_due: Arc<tokio::sync::Notify>,
    pace: Arc<AccountSmoothing>,
    /// Verifies in flight, per tenant: a verify arriving meanwhile shares the run's outcome.
    verifying: std::sync::Mutex<HashMap<TenantId, verify::Flight>>,
}

impl ConnectionService {
    pub fn new(
        store: Arc<dyn Store>,
        keyring: Arc<Keyring>,
        stripe: StripeClient,
        fingerprinter: Fingerprinter,
        policy: ConnectPolicy,
    ) -> Self {
        Self {
            store,
            keyring,
            stripe,
            fingerprinter,
            required: policy.required,
            probe_deadline: policy.probe_deadline,
            schedule: policy.schedule,
            webhooks: policy.webhooks,
            connect_quota: AttemptQuota::per_minute(policy.connect_attempts_per_minute),
            verify_quota: AttemptQuota::per_minute(policy.verify_attempts_per_minute),
            recovery_due: policy.recovery_due,
            pace: policy.pace,
            verifying: Default::default(),
        }
    }

    /// The Stripe client, shared with the proxy.
    pub fn stripe(&self) -> &StripeClient {
        &self.stripe
    }

    /// The resources a key must be able to write.
    pub fn required(&self) -> &[Resource] {
        &self.required
    }

    /// Takes one attempt for the tenant under its per-tenant limit, kept in the database so
    /// that every instance counts against the same limit.
    async fn take_attempt(&self, tenant: &TenantId, attempt: Attempt) -> Result<(), ConnectError> {
        let quota = match attempt {
            Attempt::Connect => self.connect_quota,
            Attempt::Verify => self.verify_quota,
        };
        match self
            .store
            .take_attempt(tenant, attempt.as_str(), quota)
            .await?
        {
            None => Ok(()),
            Some(retry_after) => Err(ConnectError::RateLimited {
                attempt,
                retry_after,
            }),
        }
    }

    /// Opens a stored connection's key.
    fn open_key(&self, record: &ConnectionRecord) -> Result<StripeKey, CryptoError> {
        self.keyring
            .open_stripe_key(&record.secret_context(), &record.sealed)
    }
}
