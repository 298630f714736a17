//! The connect flow (parse, mode check, probe, seal, store) and re-verification.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use time::OffsetDateTime;

use crate::config::WebhookSettings;
use crate::crypto::{Fingerprinter, Keyring, Purpose, SecretContext};
use crate::domain::{
    random_id, ConnectionStatus, KeyFormatError, KeyKind, Mode, Resource, StripeKey, TenantId,
    Warning,
};
use crate::store::{
    Actor, ConnectionRecord, NewConnection, SaveOutcome, Store, StoreError, StoredWebhook,
    Verification, WebhookChange,
};
use crate::stripe::{probe_write_access, webhooks, ProbeError, StripeClient};

/// Why a connect or verify did not succeed. Nothing here holds a key.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("rate limited")]
    RateLimited { retry_after: Duration },
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
    },
    #[error("Stripe inconclusive: {0}")]
    StripeUnavailable(String),
    #[error("Stripe refused to register the webhook endpoint")]
    WebhookRefused,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<StoreError> for ConnectError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TenantMissing => Self::NotConnected,
            other => Self::Internal(other.into()),
        }
    }
}

/// What the connect flow needs, built once at start-up.
pub struct ConnectionService {
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    stripe: StripeClient,
    fingerprinter: Fingerprinter,
    required: Vec<Resource>,
    probe_deadline: Duration,
    schedule: VerifySchedule,
    webhooks: WebhookSettings,
    limiter: DefaultKeyedRateLimiter<TenantId>,
}

/// What happened to our webhook endpoint on Stripe when a connection was deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StripeCleanup {
    Deleted,
    AlreadyGone,
    /// The stored id now names an endpoint whose URL is not ours: left alone.
    NotOurs,
    NotNeeded,
    Failed,
}

impl StripeCleanup {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deleted => "deleted",
            Self::AlreadyGone => "already_gone",
            Self::NotOurs => "not_ours",
            Self::NotNeeded => "not_needed",
            Self::Failed => "failed",
        }
    }
}

/// What a key must prove and how often, from configuration.
#[derive(Clone, Debug)]
pub struct ConnectPolicy {
    pub webhooks: WebhookSettings,
    pub required: Vec<Resource>,
    pub probe_deadline: Duration,
    pub schedule: VerifySchedule,
    pub connect_attempts_per_minute: NonZeroU32,
}

/// When a verified connection is next looked at again.
#[derive(Clone, Copy, Debug)]
pub struct VerifySchedule {
    pub interval: Duration,
    pub jitter: Duration,
    pub retry: Duration,
}

impl VerifySchedule {
    /// `interval` plus up to `jitter` either way, so connections verified together drift
    /// apart instead of hitting Stripe in waves.
    pub fn next_due(&self) -> OffsetDateTime {
        let jitter = self.jitter.as_secs() as i64;
        let spread = if jitter > 0 {
            rand::thread_rng().gen_range(-jitter..=jitter)
        } else {
            0
        };
        crate::clock::now() + self.interval + time::Duration::seconds(spread)
    }

    pub fn retry_due(&self) -> OffsetDateTime {
        crate::clock::now() + self.retry
    }
}

/// The Stripe dashboard link that pre-fills a restricted key with exactly `required`.
pub fn fix_url(mode: Mode, required: &[Resource]) -> String {
    let mode_segment = match mode {
        Mode::Test => "test/",
        Mode::Live => "",
    };
    let mut url = format!("https://dashboard.stripe.com/{mode_segment}apikeys/create?name=Atlas");
    for resource in required {
        url.push_str("&permissions[]=");
        url.push_str(resource.dashboard_write_scope());
    }
    url
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
            limiter: RateLimiter::keyed(Quota::per_minute(policy.connect_attempts_per_minute)),
        }
    }

    pub fn required(&self) -> &[Resource] {
        &self.required
    }

    fn check_rate(&self, tenant: &TenantId) -> Result<(), ConnectError> {
        // Forget tenants whose buckets are full again, so memory stays bounded.
        if self.limiter.len() > 10_000 {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(tenant)
            .map_err(|not_until| ConnectError::RateLimited {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            })
    }

    /// The modal's Activate: verify the pasted key and store it sealed, replacing any
    /// previous key atomically. Nothing is stored unless every probe concluded "granted".
    pub async fn connect(
        &self,
        tenant: &TenantId,
        pasted: &SecretString,
        actor: &Actor,
    ) -> Result<SaveOutcome, ConnectError> {
        self.check_rate(tenant)?;
        let key = StripeKey::parse(pasted.expose_secret())?;
        let tenant_record = self
            .store
            .find_tenant(tenant)
            .await?
            .ok_or(ConnectError::NotConnected)?;
        if key.mode() != tenant_record.mode {
            return Err(ConnectError::ModeMismatch {
                tenant: tenant_record.mode,
                key: key.mode(),
            });
        }
        let report = probe_write_access(&self.stripe, &key, &self.required, self.probe_deadline)
            .await
            .map_err(probe_error)?;
        if !report.grants_all(&self.required) {
            return Err(ConnectError::MissingPermissions {
                missing: report.missing(),
                fix_url: fix_url(tenant_record.mode, &self.required),
            });
        }
        let warnings = match key.kind() {
            KeyKind::Secret => vec![Warning::SecretKeyFullAccess],
            KeyKind::Restricted => Vec::new(),
        };
        // Two rounds at most: a concurrent first connect may commit while this one registers
        // its endpoint; the second round sees it and proceeds as a replacement.
        for round in 0..2 {
            let existing = self.store.find_connection(tenant).await?;
            let connection_id = existing
                .as_ref()
                .map(|c| c.connection_id.clone())
                .unwrap_or_else(|| random_id("con_", 20));
            let webhook = self
                .webhook_for(&key, tenant, &connection_id, existing.as_ref())
                .await?;
            let registered = match &webhook {
                WebhookChange::Set(w) => Some(w.endpoint_id.clone()),
                WebhookChange::Keep => None,
            };
            let secret_id = random_id("sec_", 20);
            let context = SecretContext {
                secret_id: secret_id.clone(),
                tenant_id: tenant.clone(),
                mode: key.mode(),
                purpose: Purpose::StripeApiKey,
            };
            let sealed = self
                .keyring
                .seal(&context, key.expose_secret().as_bytes())
                .map_err(anyhow::Error::from)?;
            let connection = NewConnection {
                connection_id,
                webhook,
                tenant_id: tenant.clone(),
                mode: key.mode(),
                key_type: key.kind(),
                key_last4: key.last4(),
                key_fingerprint: self.fingerprinter.fingerprint(key.expose_secret()),
                secret_id,
                sealed,
                status: ConnectionStatus::Active,
                permissions: report.clone(),
                warnings: warnings.clone(),
                verified_at: crate::clock::now(),
                next_verify_at: self.schedule.next_due(),
            };
            let saved = self.store.save_connection(&connection, actor).await;
            if saved.is_err() {
                // Nothing half-stored here means no orphan there.
                if let Some(endpoint_id) = &registered {
                    self.delete_endpoint(&key, endpoint_id).await;
                }
            }
            match saved {
                Ok(outcome) => {
                    // The old account's endpoint goes, with the old key, once the new one is in.
                    if let (Some(old), Some(new_id)) = (&existing, &registered) {
                        if let Some(old_webhook) =
                            old.webhook.as_ref().filter(|w| &w.endpoint_id != new_id)
                        {
                            match self.open_key(old) {
                                Ok(old_key) => {
                                    self.delete_endpoint(&old_key, &old_webhook.endpoint_id)
                                        .await;
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "could not open the replaced key to delete its endpoint")
                                }
                            };
                        }
                    }
                    return Ok(outcome);
                }
                Err(StoreError::Conflict) if round == 0 => continue,
                Err(StoreError::ModeChanged(mode)) => {
                    return Err(ConnectError::ModeMismatch {
                        tenant: mode,
                        key: key.mode(),
                    })
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ConnectError::Internal(anyhow::anyhow!(
            "connect lost two races in a row"
        )))
    }

    fn our_webhook_url(&self, connection_id: &str) -> String {
        format!(
            "{}/webhooks/stripe/{connection_id}",
            self.webhooks.public_base_url.trim_end_matches('/')
        )
    }

    /// Keeps the stored endpoint when the new key sees it (same account); otherwise
    /// registers ours and seals its signing secret.
    async fn webhook_for(
        &self,
        key: &StripeKey,
        tenant: &TenantId,
        connection_id: &str,
        existing: Option<&ConnectionRecord>,
    ) -> Result<WebhookChange, ConnectError> {
        if let Some(stored) = existing.and_then(|c| c.webhook.as_ref()) {
            let reply = self
                .stripe
                .send(key, &webhooks::retrieve_request(&stored.endpoint_id))
                .await
                .map_err(|f| {
                    ConnectError::StripeUnavailable(format!("webhook endpoint lookup: {f}"))
                })?;
            match reply.status {
                200 if webhooks::endpoint_url(&reply)
                    == Some(self.our_webhook_url(connection_id).as_str()) =>
                {
                    return Ok(WebhookChange::Keep)
                }
                // Another account (or the endpoint was deleted): register ours there.
                200 | 404 => {}
                status => {
                    return Err(ConnectError::StripeUnavailable(format!(
                        "webhook endpoint lookup answered {status}"
                    )))
                }
            }
        }
        let request = webhooks::register_request(
            &self.our_webhook_url(connection_id),
            &self.webhooks.enabled_events,
            self.stripe.api_version(),
            tenant,
            connection_id,
        );
        let reply =
            self.stripe.send(key, &request).await.map_err(|f| {
                ConnectError::StripeUnavailable(format!("webhook registration: {f}"))
            })?;
        if reply.status != 200 {
            return Err(ConnectError::WebhookRefused);
        }
        let registered = webhooks::parse_registration(&reply).ok_or_else(|| {
            ConnectError::StripeUnavailable("webhook registration answer without an id".into())
        })?;
        let Some(secret) = registered.secret else {
            self.delete_endpoint(key, &registered.id).await;
            return Err(ConnectError::StripeUnavailable(
                "webhook registration answer without its secret".into(),
            ));
        };
        let secret_id = random_id("whs_", 20);
        let context = SecretContext {
            secret_id: secret_id.clone(),
            tenant_id: tenant.clone(),
            mode: key.mode(),
            purpose: Purpose::WebhookSigningSecret,
        };
        let sealed = match self
            .keyring
            .seal(&context, secret.expose_secret().as_bytes())
        {
            Ok(sealed) => sealed,
            Err(e) => {
                self.delete_endpoint(key, &registered.id).await;
                return Err(ConnectError::Internal(e.into()));
            }
        };
        Ok(WebhookChange::Set(StoredWebhook {
            endpoint_id: registered.id,
            secret_id,
            sealed,
        }))
    }

    /// Deletes one of our endpoints, best effort; true when it is gone.
    async fn delete_endpoint(&self, key: &StripeKey, endpoint_id: &str) -> bool {
        match self
            .stripe
            .send(key, &webhooks::delete_request(endpoint_id))
            .await
        {
            Ok(reply) if reply.status == 200 || reply.status == 404 => true,
            Ok(reply) => {
                tracing::warn!(
                    endpoint_id,
                    status = reply.status,
                    "could not delete a webhook endpoint"
                );
                false
            }
            Err(e) => {
                tracing::warn!(endpoint_id, error = %e, "could not delete a webhook endpoint");
                false
            }
        }
    }

    /// Disconnects: deletes our endpoint on Stripe (only when its URL is ours), then the
    /// connection and its sealed secrets.
    pub async fn disconnect(
        &self,
        tenant: &TenantId,
        actor: &Actor,
    ) -> Result<StripeCleanup, ConnectError> {
        let record = self
            .store
            .find_connection(tenant)
            .await?
            .ok_or(ConnectError::NotConnected)?;
        let cleanup = match &record.webhook {
            None => StripeCleanup::NotNeeded,
            Some(webhook) => match self.open_key(&record) {
                Err(e) => {
                    tracing::warn!(error = %e, "could not open the key to delete the webhook endpoint");
                    StripeCleanup::Failed
                }
                Ok(key) => match self
                    .stripe
                    .send(&key, &webhooks::retrieve_request(&webhook.endpoint_id))
                    .await
                {
                    Ok(reply) if reply.status == 404 => StripeCleanup::AlreadyGone,
                    Ok(reply)
                        if reply.status == 200
                            && webhooks::endpoint_url(&reply)
                                == Some(self.our_webhook_url(&record.connection_id).as_str()) =>
                    {
                        if self.delete_endpoint(&key, &webhook.endpoint_id).await {
                            StripeCleanup::Deleted
                        } else {
                            StripeCleanup::Failed
                        }
                    }
                    Ok(reply) if reply.status == 200 => StripeCleanup::NotOurs,
                    _ => StripeCleanup::Failed,
                },
            },
        };
        if !self.store.delete_connection(tenant, actor).await? {
            return Err(ConnectError::NotConnected);
        }
        Ok(cleanup)
    }

    /// Opens a stored key. Only the key-fetch route and re-verification call this.
    pub fn open_key(&self, record: &ConnectionRecord) -> Result<StripeKey, anyhow::Error> {
        let plaintext = self
            .keyring
            .open(&record.secret_context(), &record.sealed)?;
        let text = std::str::from_utf8(&plaintext)
            .map_err(|_| anyhow::anyhow!("stored key is not UTF-8"))?;
        StripeKey::parse(text).map_err(|_| anyhow::anyhow!("stored key no longer parses"))
    }

    /// Re-probes the stored key and records the outcome: every required permission →
    /// `active`, some missing → `needs_attention`, 401 → `revoked`. An inconclusive probe
    /// changes nothing.
    pub async fn verify(
        &self,
        tenant: &TenantId,
        actor: &Actor,
    ) -> Result<ConnectionRecord, ConnectError> {
        let record = self
            .store
            .find_connection(tenant)
            .await?
            .ok_or(ConnectError::NotConnected)?;
        let key = self.open_key(&record)?;
        let verification =
            match probe_write_access(&self.stripe, &key, &self.required, self.probe_deadline).await
            {
                Ok(report) => Verification {
                    status: if report.grants_all(&self.required) {
                        ConnectionStatus::Active
                    } else {
                        ConnectionStatus::NeedsAttention
                    },
                    permissions: report,
                    verified_at: crate::clock::now(),
                    next_verify_at: self.schedule.next_due(),
                },
                Err(ProbeError::KeyRejected { .. }) => Verification {
                    status: ConnectionStatus::Revoked,
                    permissions: record.permissions.clone(),
                    verified_at: crate::clock::now(),
                    next_verify_at: self.schedule.next_due(),
                },
                Err(ProbeError::Inconclusive { resource, reason }) => {
                    return Err(ConnectError::StripeUnavailable(format!(
                        "{resource}: {reason}"
                    )))
                }
            };
        match self
            .store
            .record_verification(tenant, &record.secret_id, &verification, actor)
            .await?
        {
            Some(updated) => Ok(updated),
            // Replaced or disconnected while we probed: report what is there now.
            None => self
                .store
                .find_connection(tenant)
                .await?
                .ok_or(ConnectError::NotConnected),
        }
    }
}

impl ConnectionService {
    /// Background re-verification of one leased connection. An inconclusive probe leaves
    /// the status alone and gives the lease back with a retry time.
    pub async fn reverify_leased(&self, tenant: &TenantId, owner: &str) {
        let actor = Actor::Reverifier(owner.to_owned());
        let outcome = self.verify(tenant, &actor).await;
        let label = match &outcome {
            Ok(record) => record.status.as_str(),
            Err(ConnectError::NotConnected) => "gone",
            Err(ConnectError::StripeUnavailable(_)) => "inconclusive",
            Err(_) => "error",
        };
        metrics::counter!("atlas_reverify_runs_total", "outcome" => label).increment(1);
        if let Err(e) = outcome {
            if !matches!(e, ConnectError::NotConnected) {
                tracing::warn!(tenant_id = %tenant, error = %e, "re-verification postponed");
            }
            if let Err(e) = self
                .store
                .release_connection(tenant, owner, self.schedule.retry_due())
                .await
            {
                tracing::error!(tenant_id = %tenant, error = %e, "could not release a re-verification lease");
            }
        }
    }
}

fn probe_error(e: ProbeError) -> ConnectError {
    match e {
        ProbeError::KeyRejected { expired } => ConnectError::KeyRejected { expired },
        ProbeError::Inconclusive { resource, reason } => {
            ConnectError::StripeUnavailable(format!("{resource}: {reason}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fix_url_names_exactly_the_required_scopes_per_mode() {
        assert_eq!(
            fix_url(Mode::Test, &[Resource::Customers, Resource::Coupons]),
            "https://dashboard.stripe.com/test/apikeys/create?name=Atlas\
             &permissions[]=rak_customer_write&permissions[]=rak_coupon_write"
        );
        assert_eq!(
            fix_url(Mode::Live, &Resource::ALL),
            "https://dashboard.stripe.com/apikeys/create?name=Atlas\
             &permissions[]=rak_customer_write&permissions[]=rak_checkout_session_write\
             &permissions[]=rak_coupon_write&permissions[]=rak_invoice_write\
             &permissions[]=rak_webhook_write"
        );
    }
}
