//! The connect flow: parse, mode check, probe, register our webhook endpoint, seal, store;
//! and disconnect.

use secrecy::{ExposeSecret, SecretString};

use super::webhook_endpoint::CLEANUP_RETRY;
use super::{Attempt, ConnectError, ConnectionService, StripeCleanup};
use crate::crypto::SecretContext;
use crate::domain::{
    random_id, ConnectionStatus, KeyKind, Mode, Resource, StripeKey, TenantId, Warning,
};
use crate::store::{Actor, NewConnection, SaveOutcome, StoreError, StoredState, WebhookChange};
use crate::stripe::probe_write_access;

/// How many times a connect or disconnect starts over after losing a race to another.
const SAVE_ROUNDS: usize = 3;

/// The Stripe dashboard link that pre-fills a restricted key with exactly `required`, and
/// Events: Read so that missed events can be recovered.
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
    url.push_str("&permissions[]=");
    url.push_str(EVENTS_READ_SCOPE);
    url
}

/// The dashboard's name for Events: Read.
pub const EVENTS_READ_SCOPE: &str = "rak_event_read";

impl ConnectionService {
    /// The modal's Activate: verify the pasted key and store it sealed, replacing any
    /// previous key atomically. Nothing is stored unless every probe concluded "granted".
    pub async fn connect(
        &self,
        tenant: &TenantId,
        pasted: &SecretString,
        actor: &Actor,
    ) -> Result<SaveOutcome, ConnectError> {
        self.take_attempt(tenant, Attempt::Connect).await?;
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
        let report =
            probe_write_access(&self.stripe, &key, &self.required, self.probe_deadline).await?;
        if !report.grants_all(&self.required) {
            let missing = report.missing();
            return Err(ConnectError::MissingPermissions {
                all_refused: self.required.iter().all(|r| missing.contains(r)),
                missing,
                fix_url: fix_url(tenant_record.mode, &self.required),
            });
        }
        let warnings = match key.kind() {
            KeyKind::Secret => vec![Warning::SecretKeyFullAccess],
            KeyKind::Restricted => Vec::new(),
        };
        // Not required: a key without Events: Read connects, with recovery off.
        let events_readable = self.probe_events_read(&key).await.unwrap_or(true);
        // The save is a compare-and-swap on the connection this round read. When another
        // connect or a disconnect commits meanwhile, this one deletes the endpoint it
        // registered and starts over from what is stored now.
        for round in 1..=SAVE_ROUNDS {
            let existing = self.store.find_connection(tenant).await?;
            let connection_id = existing
                .as_ref()
                .map(|c| c.connection_id.clone())
                .unwrap_or_else(|| random_id("con_", 20));
            let (webhook, intent) = self
                .webhook_for(&key, tenant, &connection_id, existing.as_ref())
                .await?;
            let registered = match &webhook {
                WebhookChange::Set(w) => Some(w.endpoint_id.clone()),
                WebhookChange::Keep => None,
            };
            let secret_id = random_id("sec_", 20);
            let context = SecretContext::api_key(&secret_id, tenant, key.mode());
            let sealed = match self.keyring.seal(&context, key.expose_secret().as_bytes()) {
                Ok(sealed) => sealed,
                Err(e) => {
                    if let Some(endpoint_id) = &registered {
                        self.delete_endpoint(&key, endpoint_id).await;
                    }
                    return Err(e.into());
                }
            };
            let connection = NewConnection {
                connection_id,
                expected: StoredState::of(existing.as_ref()),
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
                next_verify_at: self.schedule.first_due(),
            };
            let saved = self.store.save_connection(&connection, actor).await;
            // A refusal (a lost compare-and-swap, the tenant's mode changed) committed
            // nothing: the endpoint registered for it goes now, and when Stripe will not
            // take the deletion, the intent stays for the sweep. Any other failure may have
            // come after the commit reached the database (its answer lost with the
            // connection, as when PostgreSQL restarts): deleting then would leave the
            // stored connection naming an endpoint gone from Stripe (found by
            // scripts/chaos). Its intent stays instead, and the sweep deletes the endpoint
            // once due unless a stored connection holds it.
            let refused = matches!(
                saved,
                Err(StoreError::Conflict | StoreError::ModeChanged(_))
            );
            if refused {
                if let Some(endpoint_id) = &registered {
                    if self.delete_endpoint(&key, endpoint_id).await {
                        self.drop_intent(intent.clone()).await;
                    }
                }
            }
            match saved {
                Ok(outcome) => {
                    self.drop_intent(intent).await;
                    if let (Some(old), Some(new_id)) = (&existing, &registered) {
                        self.delete_replaced_endpoint(old, new_id).await;
                    }
                    let record = match &outcome {
                        SaveOutcome::Created(r) | SaveOutcome::Replaced(r) => r,
                    };
                    self.record_endpoint_health(record, Some(events_readable), None)
                        .await;
                    return Ok(outcome);
                }
                Err(StoreError::Conflict) if round < SAVE_ROUNDS => continue,
                Err(StoreError::Conflict) => return Err(ConnectError::ConcurrentChange),
                Err(StoreError::ModeChanged(mode)) => {
                    return Err(ConnectError::ModeMismatch {
                        tenant: mode,
                        key: key.mode(),
                    })
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ConnectError::ConcurrentChange)
    }

    /// Disconnects: the connection and its sealed secrets go first, and in the same
    /// transaction its API key is kept beside its endpoint (`endpoint_cleanups`); then our
    /// endpoint is deleted on Stripe (only when its URL is ours) and the kept key dropped. A
    /// process killed between the two, or Stripe giving no conclusive answer, leaves the row
    /// to the sweep. (Deleting on Stripe first, a kill between the two left a stored
    /// connection naming an endpoint gone from Stripe: found by scripts/chaos.)
    pub async fn disconnect(
        &self,
        tenant: &TenantId,
        actor: &Actor,
    ) -> Result<StripeCleanup, ConnectError> {
        // A compare-and-swap on the endpoint read: when a replacement moves the connection
        // to another endpoint meanwhile, the next round deletes that one.
        for _ in 0..SAVE_ROUNDS {
            let record = self
                .store
                .find_connection(tenant)
                .await?
                .ok_or(ConnectError::NotConnected)?;
            let Some(webhook) = &record.webhook else {
                if (self.store).delete_connection(tenant, None, actor).await? {
                    return Ok(StripeCleanup::NotNeeded);
                }
                continue;
            };
            let cleanup_id = random_id("epc_", 20);
            let due_at = crate::clock::now() + CLEANUP_RETRY;
            if !(self.store)
                .delete_connection_leaving_endpoint(
                    tenant,
                    &webhook.endpoint_id,
                    &cleanup_id,
                    due_at,
                    actor,
                )
                .await?
            {
                continue;
            }
            let cleanup = self.delete_endpoint_of(&record).await;
            if cleanup != StripeCleanup::Failed {
                self.drop_intent(Some(cleanup_id)).await;
            }
            return Ok(cleanup);
        }
        Err(ConnectError::ConcurrentChange)
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
             &permissions[]=rak_customer_write&permissions[]=rak_coupon_write\
             &permissions[]=rak_event_read"
        );
        assert_eq!(
            fix_url(Mode::Live, &Resource::ALL),
            "https://dashboard.stripe.com/apikeys/create?name=Atlas\
             &permissions[]=rak_customer_write&permissions[]=rak_checkout_session_write\
             &permissions[]=rak_coupon_write&permissions[]=rak_invoice_write\
             &permissions[]=rak_webhook_write&permissions[]=rak_event_read"
        );
    }
}
