//! Master-key rotation: re-wraps every data key under the active master key, in batches,
//! online. Each batch commits on its own and only rows still under their old master key are
//! rewritten, so a crash loses nothing and a rerun resumes where the last commit left off.
//!
//! The job is `atlas-stripe keys rewrap`, resumable rather than run inside the service: a
//! rotation is one operator action, and the service needs no lease or schedule for it. Its
//! progress is the maintained per-master-key counts, which every instance's health refresh
//! reads into `/metrics` (`atlas_sealed_keys`, `atlas_rewrap_remaining_secrets`) and which
//! `keys status` prints: whoever runs the job, every instance shows how far it got.
//!
//! Scale: each old master key is read as one range of the (master key, secret id) index, in
//! batches, while up to `IN_FLIGHT` earlier batches are rewrapped and written (one
//! statement per batch on PostgreSQL). At most `IN_FLIGHT + 1` batches are held at once, so
//! memory is flat in the number of secrets.

use std::sync::Mutex;

use futures_util::stream::{self, StreamExt, TryStreamExt};

use crate::crypto::{Keyring, MasterKeyId, Purpose};
use crate::store::{RewrappedRow, SealedRow, Store, StoreError};

/// Batches being rewrapped and written while the next is read.
const IN_FLIGHT: usize = 3;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RewrapReport {
    pub rewrapped: u64,
    pub batches: u64,
    /// Secret ids that would not open (unknown master key, tampered row): left untouched.
    pub failed: Vec<(String, String)>,
}

/// Re-wraps up to `max_batches` batches (all when `None`) of `batch` secrets each: API
/// keys first, then webhook signing secrets, each old master key in turn.
pub async fn rewrap_all(
    store: &dyn Store,
    keyring: &Keyring,
    batch: i64,
    max_batches: Option<u64>,
) -> Result<RewrapReport, StoreError> {
    let report = Mutex::new(RewrapReport::default());
    let counts = store.count_secrets_by_purpose().await?;
    for purpose in [Purpose::StripeApiKey, Purpose::WebhookSigningSecret] {
        let old = (counts.iter())
            .filter(|(p, id, _)| *p == purpose && id != keyring.active_id())
            .map(|(_, id, _)| id);
        for under in old {
            rewrap_under(store, keyring, purpose, under, batch, max_batches, &report).await?;
        }
    }
    Ok(report.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// The secrets of `purpose` under the old master key `under`: one reader walking the index
/// range, and up to `IN_FLIGHT` batches rewrapped and written behind it.
async fn rewrap_under(
    store: &dyn Store,
    keyring: &Keyring,
    purpose: Purpose,
    under: &MasterKeyId,
    batch: i64,
    max_batches: Option<u64>,
    report: &Mutex<RewrapReport>,
) -> Result<(), StoreError> {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Vec<SealedRow>>(1);
    let read = async move {
        let mut after = String::new();
        loop {
            let taken = report.lock().unwrap_or_else(|e| e.into_inner()).batches;
            if max_batches.is_some_and(|max| taken >= max) {
                return Ok(());
            }
            let rows = store
                .secrets_to_rewrap(purpose, under.as_str(), &after, batch)
                .await?;
            let Some(last) = rows.last() else {
                return Ok(());
            };
            after = last.context.secret_id.clone();
            // Counted when read, so `max_batches` bounds what is taken, not only what ends.
            report.lock().unwrap_or_else(|e| e.into_inner()).batches += 1;
            if sender.send(rows).await.is_err() {
                return Ok(());
            }
        }
    };
    let batches = stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|rows| (rows, receiver))
    });
    // The first failed write stops the writers; the reader then finds no one listening.
    let write = batches.map(Ok).try_for_each_concurrent(IN_FLIGHT, |rows| {
        rewrap_batch(store, keyring, purpose, rows, report)
    });
    let (read, write) = tokio::join!(read, write);
    read.and(write)
}

/// Rewraps one batch in memory and writes it in one statement.
async fn rewrap_batch(
    store: &dyn Store,
    keyring: &Keyring,
    purpose: Purpose,
    rows: Vec<SealedRow>,
    report: &Mutex<RewrapReport>,
) -> Result<(), StoreError> {
    let mut rewrapped = Vec::with_capacity(rows.len());
    let mut failed = Vec::new();
    for row in rows {
        match keyring.rewrap(&row.context, &row.sealed) {
            Ok(sealed) => rewrapped.push(RewrappedRow {
                secret_id: row.context.secret_id,
                previous_master_key_id: row.sealed.master_key_id,
                sealed,
            }),
            Err(e) => failed.push((row.context.secret_id, e.to_string())),
        }
    }
    let written = store.replace_wrapped_keys(purpose, &rewrapped).await?;
    metrics::counter!("atlas_rewrap_secrets_total", "result" => "rewrapped").increment(written);
    metrics::counter!("atlas_rewrap_secrets_total", "result" => "failed")
        .increment(failed.len() as u64);
    let mut report = report.lock().unwrap_or_else(|e| e.into_inner());
    report.rewrapped += written;
    report.failed.extend(failed);
    tracing::info!(
        rewrapped = report.rewrapped,
        failed = report.failed.len(),
        "rewrap progress"
    );
    Ok(())
}

/// Sealed secrets not under the active master key: what a rewrap has left (the
/// `atlas_rewrap_remaining_secrets` gauge and `keys status`).
pub fn remaining(counts: &[(MasterKeyId, u64)], active: &MasterKeyId) -> u64 {
    (counts.iter())
        .filter(|(id, _)| id != active)
        .map(|(_, n)| n)
        .sum()
}

/// Master-key ids that stored secrets name but the keyring lacks.
pub async fn unknown_master_keys(
    store: &dyn Store,
    keyring: &Keyring,
) -> Result<Vec<MasterKeyId>, StoreError> {
    Ok(store
        .count_secrets_by_master_key()
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| !keyring.contains(id.as_str()))
        .collect())
}
