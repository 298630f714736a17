//! One delivery: the connection found, the body read, the signature verified, the event
//! stored once.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Bytes;
use serde::Deserialize;

use super::batch::{BatchSettings, GroupCommitter};
use crate::crypto::{CryptoError, Keyring};
use crate::domain::Mode;
use crate::store::{EventInsert, Inserted, NewEvent, Store, StoreError, WebhookTarget};
use crate::stripe::webhooks::SignatureHeader;

/// Why a delivery was not stored. `E` is why its body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError<E> {
    /// No connection has this webhook URL.
    #[error("unknown connection")]
    UnknownConnection,
    /// Bad signature, stale timestamp, livemode contradicting the tenant's mode, or not an
    /// event.
    #[error("rejected")]
    Rejected,
    #[error("the body could not be read")]
    Body(E),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
}

/// A stored delivery: `false` for a redelivery of an event already stored.
pub struct Stored {
    pub duplicate: bool,
}

/// The fields we index; the whole payload is stored as sent.
#[derive(Deserialize)]
struct EventEnvelope {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    created: i64,
    livemode: bool,
}

/// Receives deliveries, built once at start-up.
pub struct WebhookReceiver {
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    /// `webhooks.tolerance_secs`: how old a signature's timestamp may be.
    tolerance_secs: i64,
    /// Verified events are stored in batches shared by concurrent deliveries.
    committer: GroupCommitter,
    /// Each connection's target, by connection id (see `receive`).
    targets: Mutex<HashMap<String, Arc<WebhookTarget>>>,
}

impl WebhookReceiver {
    /// Starts the batch collector: call inside the Tokio runtime.
    pub fn new(
        store: Arc<dyn Store>,
        keyring: Arc<Keyring>,
        tolerance_secs: i64,
        batch: BatchSettings,
    ) -> Self {
        Self {
            committer: GroupCommitter::start(store.clone(), batch),
            targets: Mutex::new(HashMap::new()),
            store,
            keyring,
            tolerance_secs,
        }
    }

    /// Finds the connection and parses the signature header, reads the body (only then: a
    /// made-up id, or a delivery whose signature is malformed or stale, is answered before
    /// a byte of its body is read, so stalled uploads hold no memory), verifies the
    /// signature and stores the event once, in the next batch (answered once the batch has
    /// committed). The HMAC is computed over the buffered body: the event is parsed from
    /// the same bytes, so streaming it would save no memory.
    ///
    /// The connection's target (tenant, mode, sealed secret) is cached: a cached one may be
    /// stale (endpoint replaced, connection gone, secret rewrapped under a retired master
    /// key). So a check a cached target fails is tried again with the row as stored now,
    /// and the event is stored only while the connection still has the secret it was
    /// checked with (in the batch's own statement); otherwise the row is read again and
    /// the delivery checked again. Every instance is thus as current as its database.
    pub async fn receive<E>(
        &self,
        connection_id: &str,
        signature: &str,
        body: impl Future<Output = Result<Bytes, E>>,
    ) -> Result<Stored, DeliveryError<E>> {
        if !plain(connection_id, 64) {
            return Err(DeliveryError::UnknownConnection);
        }
        let (mut target, mut cached) = match self.cached(connection_id) {
            Some(target) => (target, true),
            None => (self.refresh(connection_id).await?, false),
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let header =
            SignatureHeader::parse(signature, now, self.tolerance_secs).map_err(rejected)?;
        // The raw bytes are what Stripe signed.
        let body = body.await.map_err(DeliveryError::Body)?;
        loop {
            match self.check(&header, &body, &target) {
                Ok(()) => break,
                Err(_) if cached => {
                    target = self.refresh(connection_id).await?;
                    cached = false;
                }
                Err(Failed::Signature(reason)) => return Err(rejected(reason)),
                Err(Failed::Crypto(e)) => return Err(e.into()),
            }
        }
        let envelope: EventEnvelope =
            serde_json::from_slice(&body).map_err(|_| DeliveryError::Rejected)?;
        if !plain(&envelope.id, 255) || !plain(&envelope.event_type, 255) {
            return Err(DeliveryError::Rejected);
        }
        let payload = String::from_utf8(body.to_vec()).map_err(|_| DeliveryError::Rejected)?;
        let event = NewEvent {
            event_id: envelope.id,
            event_type: envelope.event_type,
            created: envelope.created,
            livemode: envelope.livemode,
            payload,
        };
        // The secret changes at most once or twice in a row (a replacement racing this
        // delivery); a third change gives up rather than loop.
        for _ in 0..3 {
            if event.livemode != (target.mode == Mode::Live) {
                metrics::counter!("atlas_webhook_deliveries_total", "outcome" => "mode_mismatch")
                    .increment(1);
                tracing::warn!(event_id = %event.event_id, "webhook livemode contradicts the tenant's mode");
                return Err(DeliveryError::Rejected);
            }
            let inserted = (self.committer)
                .store(EventInsert {
                    tenant: target.tenant_id.clone(),
                    connection_id: connection_id.to_owned(),
                    webhook_secret_id: target.context.secret_id.clone(),
                    event: event.clone(),
                })
                .await?;
            let duplicate = match inserted {
                Inserted::Stored => false,
                Inserted::Duplicate => true,
                Inserted::SecretChanged => {
                    // Checked against a secret the connection no longer has: check again
                    // against the one it has (or answer 404 if it is gone).
                    target = self.refresh(connection_id).await?;
                    match self.check(&header, &body, &target) {
                        Ok(()) => continue,
                        Err(Failed::Signature(reason)) => return Err(rejected(reason)),
                        Err(Failed::Crypto(e)) => return Err(e.into()),
                    }
                }
            };
            let outcome = if duplicate { "duplicate" } else { "stored" };
            metrics::counter!("atlas_webhook_deliveries_total", "outcome" => outcome).increment(1);
            return Ok(Stored { duplicate });
        }
        Err(DeliveryError::Rejected)
    }

    /// Opens the target's secret and verifies the signature with it.
    fn check(
        &self,
        header: &SignatureHeader,
        body: &[u8],
        target: &WebhookTarget,
    ) -> Result<(), Failed> {
        let secret =
            (self.keyring.open(&target.context, &target.sealed)).map_err(Failed::Crypto)?;
        header.verify(body, &secret).map_err(Failed::Signature)
    }

    fn cached(&self, connection_id: &str) -> Option<Arc<WebhookTarget>> {
        let targets = self.targets.lock().unwrap_or_else(PoisonError::into_inner);
        targets.get(connection_id).cloned()
    }

    /// The connection's target as stored now, cached; `UnknownConnection` (and forgotten)
    /// when there is none.
    async fn refresh<E>(
        &self,
        connection_id: &str,
    ) -> Result<Arc<WebhookTarget>, DeliveryError<E>> {
        let found = self.store.find_webhook_target(connection_id).await?;
        let mut targets = self.targets.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(found) = found else {
            targets.remove(connection_id);
            return Err(DeliveryError::UnknownConnection);
        };
        // Only connections that exist are cached, so this bounds it by their number; past
        // the bound (far more connections than one instance sees), start again.
        if targets.len() >= MAX_CACHED_TARGETS {
            targets.clear();
        }
        let found = Arc::new(found);
        targets.insert(connection_id.to_owned(), found.clone());
        Ok(found)
    }
}

/// Connections whose targets one instance keeps (a few hundred bytes each).
const MAX_CACHED_TARGETS: usize = 100_000;

/// Why a check failed.
enum Failed {
    Signature(crate::stripe::webhooks::SignatureError),
    Crypto(CryptoError),
}

/// A delivery whose signature is malformed, stale or does not match, counted and logged.
fn rejected<E>(reason: crate::stripe::webhooks::SignatureError) -> DeliveryError<E> {
    metrics::counter!("atlas_webhook_deliveries_total", "outcome" => "bad_signature").increment(1);
    tracing::info!(%reason, "webhook delivery rejected");
    DeliveryError::Rejected
}

/// Ids we accept: short, and only letters, digits and `_.-`.
fn plain(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}
