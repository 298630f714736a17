//! Our webhook endpoint on the tenant's Stripe account: registered on connect, kept when a
//! replacement key sees it, deleted with the old key when it does not, and deleted on
//! disconnect. Only an endpoint whose URL is ours is ever deleted, and an endpoint
//! registered for a save that fails is deleted again, so nothing is left behind.

use secrecy::ExposeSecret;

use super::{ConnectError, ConnectionService, Inconclusive};
use crate::crypto::SecretContext;
use crate::domain::{random_id, StripeKey, TenantId};
use crate::store::{
    ConnectionRecord, EndpointCleanup, EndpointIntent, StoredWebhook, WebhookChange, WebhookStatus,
};
use crate::stripe::{events, webhooks};
use crate::webhooks::announcements::{self, Repair};

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

/// How long after recording an intent its connect has surely ended (probes done, one
/// registration, a save, a deletion on failure: each Stripe call bounded by its timeout).
const INTENT_GRACE: time::Duration = time::Duration::seconds(60);
/// How soon an endpoint left on Stripe is tried again after Stripe gave no conclusive answer.
pub(super) const CLEANUP_RETRY: time::Duration = time::Duration::seconds(60);
/// Endpoints tried per sweep.
const CLEANUP_BATCH: i64 = 50;
/// How often each process sweeps.
const CLEANUP_TICK: std::time::Duration = std::time::Duration::from_secs(10);

/// The sweep of endpoints left on Stripe, every [`CLEANUP_TICK`] (spread), until `stop`.
pub fn spawn_endpoint_cleanup(
    connections: std::sync::Arc<ConnectionService>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let pause =
                CLEANUP_TICK.mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..1.5));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
            while connections.clean_up_left_endpoints().await == CLEANUP_BATCH as usize {
                if *stop.borrow() {
                    return;
                }
            }
        }
    })
}

impl ConnectionService {
    fn our_webhook_url(&self, connection_id: &str) -> String {
        format!(
            "{}/webhooks/stripe/{connection_id}",
            self.webhooks.public_base_url.trim_end_matches('/')
        )
    }

    /// Keeps the stored endpoint when the new key sees it (same account); otherwise
    /// registers ours and seals its signing secret.
    pub(super) async fn webhook_for(
        &self,
        key: &StripeKey,
        tenant: &TenantId,
        connection_id: &str,
        existing: Option<&ConnectionRecord>,
    ) -> Result<(WebhookChange, Option<String>), ConnectError> {
        if let Some(stored) = existing.and_then(|c| c.webhook.as_ref()) {
            const STEP: &str = "webhook endpoint lookup";
            let reply = self
                .stripe
                .send(key, &webhooks::retrieve_request(&stored.endpoint_id))
                .await
                .map_err(|failure| Inconclusive::Call {
                    step: STEP,
                    failure,
                })?;
            match reply.status {
                200 if webhooks::endpoint_url(&reply)
                    == Some(self.our_webhook_url(connection_id).as_str()) =>
                {
                    return Ok((WebhookChange::Keep, None))
                }
                // Another account (or the endpoint was deleted): register ours there.
                200 | 404 => {}
                status => return Err(Inconclusive::Status { step: STEP, status }.into()),
            }
        }
        // Before the registration: should this process die, or the save fail while Stripe
        // will not take the deletion, the sweep can still delete the endpoint.
        let intent = self.record_intent(key, tenant, connection_id).await?;
        let request = webhooks::register_request(
            &self.our_webhook_url(connection_id),
            &self.webhooks.enabled_events,
            self.stripe.api_version(),
            tenant,
            connection_id,
        );
        let reply =
            (self.stripe.send(key, &request).await).map_err(|failure| Inconclusive::Call {
                step: "webhook registration",
                failure,
            })?;
        if reply.status != 200 {
            return Err(self.why_refused(key).await);
        }
        let registered = webhooks::parse_registration(&reply)
            .ok_or(Inconclusive::RegistrationIncomplete("id"))?;
        let Some(secret) = registered.secret else {
            self.delete_endpoint(key, &registered.id).await;
            return Err(Inconclusive::RegistrationIncomplete("signing secret").into());
        };
        let secret_id = random_id("whs_", 20);
        let context = SecretContext::webhook_secret(&secret_id, tenant, key.mode());
        let sealed = match (self.keyring).seal(&context, secret.expose_secret().as_bytes()) {
            Ok(sealed) => sealed,
            Err(e) => {
                self.delete_endpoint(key, &registered.id).await;
                return Err(e.into());
            }
        };
        Ok((
            WebhookChange::Set(StoredWebhook {
                endpoint_id: registered.id,
                secret_id,
                sealed,
            }),
            Some(intent),
        ))
    }

    /// Records that an endpoint for `connection_id` is about to be registered, with the key
    /// sealed anew for it; returns the row's id.
    async fn record_intent(
        &self,
        key: &StripeKey,
        tenant: &TenantId,
        connection_id: &str,
    ) -> Result<String, ConnectError> {
        let secret_id = random_id("sec_", 20);
        let context = SecretContext::api_key(&secret_id, tenant, key.mode());
        let sealed = (self.keyring).seal(&context, key.expose_secret().as_bytes())?;
        let intent = EndpointIntent {
            cleanup_id: random_id("epc_", 20),
            tenant_id: tenant.clone(),
            connection_id: connection_id.to_owned(),
            mode: key.mode(),
            secret_id,
            sealed,
            due_at: crate::clock::now() + INTENT_GRACE,
        };
        self.store.record_endpoint_intent(&intent).await?;
        Ok(intent.cleanup_id)
    }

    /// The connect that recorded `intent` ended with its endpoint held or deleted: the row
    /// is not needed (if this fails, the sweep finds the same and drops it).
    pub(super) async fn drop_intent(&self, intent: Option<String>) {
        let Some(cleanup_id) = intent else {
            return;
        };
        if let Err(e) = self.store.finish_endpoint_cleanup(&cleanup_id).await {
            tracing::warn!(error = %e, "could not drop a settled endpoint intent; the sweep will");
        }
    }

    /// Stripe refuses a registration at its cap of endpoints with a 400 that has no `code`:
    /// counting the account's endpoints tells that apart without reading the message.
    async fn why_refused(&self, key: &StripeKey) -> ConnectError {
        match self.stripe.send(key, &webhooks::list_request()).await {
            Ok(reply)
                if reply.status == 200
                    && webhooks::endpoint_count(&reply)
                        .is_some_and(|count| count >= webhooks::ENDPOINT_CAP) =>
            {
                ConnectError::WebhookEndpointLimit
            }
            _ => ConnectError::WebhookRefused,
        }
    }

    /// Events: Read, probed without side effects (`GET /v1/events?limit=1`): `None` when
    /// Stripe gave no conclusive answer.
    pub(super) async fn probe_events_read(&self, key: &StripeKey) -> Option<bool> {
        match self.stripe.send(key, &events::probe_request()).await {
            Ok(reply) if reply.status == 200 => Some(true),
            Ok(reply) if reply.status == 403 => Some(false),
            Ok(reply) => {
                tracing::info!(status = reply.status, "Events: Read probe inconclusive");
                None
            }
            Err(failure) => {
                tracing::info!(%failure, "Events: Read probe inconclusive");
                None
            }
        }
    }

    /// On every verification: whether the key may read Events, and whether Stripe still has
    /// our endpoint enabled. A disabled endpoint is enabled again, a deleted one registered
    /// again; either way a recovery is due at once for what it missed meanwhile.
    pub(super) async fn keep_endpoint_alive(&self, record: &ConnectionRecord, key: &StripeKey) {
        let events_readable = self.probe_events_read(key).await;
        let Some(webhook) = &record.webhook else {
            self.record_endpoint_health(record, events_readable, None)
                .await;
            return;
        };
        let retrieved = (self.stripe)
            .send(key, &webhooks::retrieve_request(&webhook.endpoint_id))
            .await;
        let found = match retrieved {
            Ok(reply)
                if reply.status == 200 && webhooks::endpoint_status(&reply) == Some("disabled") =>
            {
                let enabled = (self.stripe)
                    .send(key, &webhooks::enable_request(&webhook.endpoint_id))
                    .await;
                match enabled {
                    Ok(reply)
                        if reply.status == 200
                            && webhooks::endpoint_status(&reply) == Some("enabled") =>
                    {
                        announcements::webhook_endpoint_repaired(
                            self.store.as_ref(),
                            record,
                            Repair::Reenabled,
                        )
                        .await;
                        Some((WebhookStatus::Enabled, true))
                    }
                    _ => {
                        tracing::warn!(tenant_id = %record.tenant_id, "could not enable the disabled webhook endpoint");
                        Some((WebhookStatus::Disabled, false))
                    }
                }
            }
            Ok(reply) if reply.status == 200 => Some((WebhookStatus::Enabled, false)),
            Ok(reply) if reply.status == 404 => {
                if self.register_again(record, key).await {
                    announcements::webhook_endpoint_repaired(
                        self.store.as_ref(),
                        record,
                        Repair::Registered,
                    )
                    .await;
                    Some((WebhookStatus::Enabled, true))
                } else {
                    Some((WebhookStatus::Missing, false))
                }
            }
            // Inconclusive: what was last found stands.
            _ => None,
        };
        self.record_endpoint_health(record, events_readable, found)
            .await;
    }

    /// Registers our endpoint again after it was deleted on Stripe, stored only while the
    /// connection still has the key and the endpoint this run read (compare-and-swap); the
    /// new endpoint is deleted again when the swap loses.
    async fn register_again(&self, record: &ConnectionRecord, key: &StripeKey) -> bool {
        let Some(old) = &record.webhook else {
            return false;
        };
        let (change, intent) = match self
            .webhook_for(key, &record.tenant_id, &record.connection_id, Some(record))
            .await
        {
            Ok((WebhookChange::Set(new), intent)) => (new, intent),
            Ok((WebhookChange::Keep, _)) => return true,
            Err(e) => {
                tracing::warn!(tenant_id = %record.tenant_id, error = %e, "could not register the webhook endpoint again");
                return false;
            }
        };
        match (self.store)
            .replace_webhook(
                &record.tenant_id,
                &record.secret_id,
                &old.endpoint_id,
                &change,
            )
            .await
        {
            Ok(true) => {
                self.drop_intent(intent).await;
                true
            }
            Ok(false) => {
                if self.delete_endpoint(key, &change.endpoint_id).await {
                    self.drop_intent(intent).await;
                }
                false
            }
            // The swap may have committed with its answer lost: the intent stays, and the
            // sweep deletes the endpoint unless the stored connection holds it.
            Err(e) => {
                tracing::warn!(tenant_id = %record.tenant_id, error = %e, "could not store the registered webhook endpoint");
                false
            }
        }
    }

    /// Stores what was found; `None` leaves that part as it was.
    pub(super) async fn record_endpoint_health(
        &self,
        record: &ConnectionRecord,
        events_readable: Option<bool>,
        endpoint: Option<(WebhookStatus, bool)>,
    ) {
        let stored = match self.store.find_recovery_cursor(&record.connection_id).await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(tenant_id = %record.tenant_id, error = %e, "could not read the recovery cursor");
                return;
            }
        };
        let (was_readable, was_status) = stored.map_or((true, WebhookStatus::Enabled), |c| {
            (c.event_recovery, c.webhook_status)
        });
        let (status, repaired) = endpoint.unwrap_or((was_status, false));
        let readable = events_readable.unwrap_or(was_readable);
        // Recovery runs on gaps, not a timer (webhooks/recovery.rs): a repaired endpoint,
        // Events: Read back after it was off, or an endpoint that just turned disabled or
        // missing (deliveries stop) makes it due now rather than at the sweep.
        let recover_now = repaired
            || (readable && !was_readable)
            || (status != WebhookStatus::Enabled && was_status == WebhookStatus::Enabled);
        if let Err(e) = (self.store)
            .record_webhook_health(&record.connection_id, readable, status, recover_now)
            .await
        {
            tracing::warn!(tenant_id = %record.tenant_id, error = %e, "could not record the webhook endpoint's health");
        } else if recover_now {
            self.recovery_due.notify_one();
        }
    }

    /// After a replacement onto another account: the old account's endpoint goes, with the
    /// old key, once the new one is stored.
    pub(super) async fn delete_replaced_endpoint(&self, old: &ConnectionRecord, new_id: &str) {
        let Some(old_webhook) = old.webhook.as_ref().filter(|w| w.endpoint_id != new_id) else {
            return;
        };
        match self.open_key(old) {
            Ok(old_key) => {
                self.delete_endpoint(&old_key, &old_webhook.endpoint_id)
                    .await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not open the replaced key to delete its endpoint")
            }
        }
    }

    /// On disconnect: deletes the stored endpoint if its URL is still ours.
    pub(super) async fn delete_endpoint_of(&self, record: &ConnectionRecord) -> StripeCleanup {
        let Some(webhook) = &record.webhook else {
            return StripeCleanup::NotNeeded;
        };
        let key = match self.open_key(record) {
            Ok(key) => key,
            Err(e) => {
                tracing::warn!(error = %e, "could not open the key to delete the webhook endpoint");
                return StripeCleanup::Failed;
            }
        };
        self.delete_if_ours(&key, &webhook.endpoint_id, &record.connection_id)
            .await
    }

    /// Deletes `endpoint_id` if its URL is still ours for `connection_id`.
    async fn delete_if_ours(
        &self,
        key: &StripeKey,
        endpoint_id: &str,
        connection_id: &str,
    ) -> StripeCleanup {
        let ours = self.our_webhook_url(connection_id);
        match (self.stripe)
            .send(key, &webhooks::retrieve_request(endpoint_id))
            .await
        {
            Ok(reply) if reply.status == 404 => StripeCleanup::AlreadyGone,
            Ok(reply) if reply.status == 200 && webhooks::endpoint_url(&reply) == Some(&ours) => {
                if self.delete_endpoint(key, endpoint_id).await {
                    StripeCleanup::Deleted
                } else {
                    StripeCleanup::Failed
                }
            }
            Ok(reply) if reply.status == 200 => StripeCleanup::NotOurs,
            _ => StripeCleanup::Failed,
        }
    }

    /// Settles what `endpoint_cleanups` holds: on the account, every endpoint whose URL
    /// names the row's connection, except the one a stored connection holds, is deleted;
    /// then the row goes. Returns how many rows were settled; the others (Stripe gave no
    /// conclusive answer) are tried again after [`CLEANUP_RETRY`].
    pub async fn clean_up_left_endpoints(&self) -> usize {
        let now = crate::clock::now();
        let claimed = match (self.store)
            .claim_endpoint_cleanups(now, now + CLEANUP_RETRY, CLEANUP_BATCH)
            .await
        {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(error = %e, "could not claim endpoints left on Stripe");
                return 0;
            }
        };
        let mut settled = 0;
        for left in claimed {
            let done = match (self.keyring).open_stripe_key(&left.key.context, &left.key.sealed) {
                Ok(key) => {
                    let tenant = &left.key.context.tenant_id;
                    let outcome = self.delete_left(&key, tenant, &left).await;
                    metrics::counter!("atlas_endpoint_cleanups_total", "result" => outcome.as_str())
                        .increment(1);
                    outcome != StripeCleanup::Failed
                }
                Err(e) => {
                    // Nothing will ever open it: dropped, loudly.
                    tracing::warn!(connection_id = %left.connection_id, error = %e,
                        "could not open the key kept to delete webhook endpoints; giving up");
                    true
                }
            };
            if !done {
                continue;
            }
            match self.store.finish_endpoint_cleanup(&left.cleanup_id).await {
                Ok(()) => settled += 1,
                Err(e) => tracing::warn!(error = %e, "could not record an endpoint cleanup"),
            }
        }
        settled
    }

    /// Deletes the account's endpoints whose URL names the row's connection, but the one
    /// the tenant's stored connection holds (if it is that connection). Put off while
    /// another connect of that connection may be under way: the endpoint it registered has
    /// the same URL and is not stored yet. Both are read after the listing, so an endpoint
    /// listed is either held by then or its connect's intent is still there.
    async fn delete_left(
        &self,
        key: &StripeKey,
        tenant: &TenantId,
        left: &EndpointCleanup,
    ) -> StripeCleanup {
        let connection_id = left.connection_id.as_str();
        let listed = match self.stripe.send(key, &webhooks::list_request()).await {
            Ok(reply) if reply.status == 200 => webhooks::listed_endpoints(&reply),
            // The key was revoked or lost the permission: nothing can delete them now.
            Ok(reply) if matches!(reply.status, 401 | 403) => return StripeCleanup::NotOurs,
            _ => None,
        };
        let Some(listed) = listed else {
            return StripeCleanup::Failed;
        };
        match (self.store)
            .endpoint_connect_in_flight(connection_id, &left.cleanup_id, crate::clock::now())
            .await
        {
            Ok(false) => {}
            Ok(true) | Err(_) => return StripeCleanup::Failed,
        }
        let held = match self.store.find_connection(tenant).await {
            Ok(record) => record
                .filter(|c| c.connection_id == connection_id)
                .and_then(|c| c.webhook)
                .map(|w| w.endpoint_id),
            Err(_) => return StripeCleanup::Failed,
        };
        let ours = self.our_webhook_url(connection_id);
        let mut outcome = StripeCleanup::NotNeeded;
        for (id, url) in listed {
            if url != ours || held.as_deref() == Some(id.as_str()) {
                continue;
            }
            if !self.delete_endpoint(key, &id).await {
                return StripeCleanup::Failed;
            }
            outcome = StripeCleanup::Deleted;
        }
        outcome
    }

    /// Deletes one of our endpoints, best effort; true when it is gone.
    pub(super) async fn delete_endpoint(&self, key: &StripeKey, endpoint_id: &str) -> bool {
        match (self.stripe)
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
}
