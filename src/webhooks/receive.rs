//! One delivery: the connection found, the body read, the signature verified, the event
//! stored once.

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use serde::Deserialize;

use super::batch::{BatchSettings, GroupCommitter};
use crate::crypto::{CryptoError, Keyring};
use crate::domain::Mode;
use crate::store::{EventInsert, NewEvent, Store, StoreError};
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
            store,
            keyring,
            tolerance_secs,
        }
    }

    /// Finds the connection and parses the signature header, reads the body (only then: a
    /// made-up id, or a delivery whose signature is malformed or stale, is answered before
    /// a byte of its body is read, so stalled uploads hold no memory), verifies the
    /// signature and stores the event once, in the next batch (answered once the batch has
    /// committed). The HMAC is computed over the buffered body:
    /// the event is parsed from the same bytes, so streaming it would save no memory.
    pub async fn receive<E>(
        &self,
        connection_id: &str,
        signature: &str,
        body: impl Future<Output = Result<Bytes, E>>,
    ) -> Result<Stored, DeliveryError<E>> {
        if !plain(connection_id, 64) {
            return Err(DeliveryError::UnknownConnection);
        }
        let target = (self.store.find_webhook_target(connection_id).await?)
            .ok_or(DeliveryError::UnknownConnection)?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let header =
            SignatureHeader::parse(signature, now, self.tolerance_secs).map_err(rejected)?;
        // The raw bytes are what Stripe signed.
        let body = body.await.map_err(DeliveryError::Body)?;
        let secret = self.keyring.open(&target.context, &target.sealed)?;
        header.verify(&body, &secret).map_err(rejected)?;
        let envelope: EventEnvelope =
            serde_json::from_slice(&body).map_err(|_| DeliveryError::Rejected)?;
        if !plain(&envelope.id, 255) || !plain(&envelope.event_type, 255) {
            return Err(DeliveryError::Rejected);
        }
        if envelope.livemode != (target.mode == Mode::Live) {
            metrics::counter!("atlas_webhook_deliveries_total", "outcome" => "mode_mismatch")
                .increment(1);
            tracing::warn!(event_id = %envelope.id, "webhook livemode contradicts the tenant's mode");
            return Err(DeliveryError::Rejected);
        }
        // Without a copy when the body is ours alone.
        let payload = String::from_utf8(Vec::from(body)).map_err(|_| DeliveryError::Rejected)?;
        let event = NewEvent {
            event_id: envelope.id,
            event_type: envelope.event_type,
            created: envelope.created,
            livemode: envelope.livemode,
            payload,
        };
        let stored = (self.committer)
            .store(EventInsert {
                tenant: target.tenant_id,
                connection_id: connection_id.to_owned(),
                event,
            })
            .await?;
        let outcome = if stored { "stored" } else { "duplicate" };
        metrics::counter!("atlas_webhook_deliveries_total", "outcome" => outcome).increment(1);
        Ok(Stored { duplicate: !stored })
    }
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
