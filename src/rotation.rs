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
//! statement per batch on PostgreSQL, both of a connection's secrets in one row update). At
//! most `IN_FLIGHT + 2` batches are held at once, so memory is flat in the number of
//! secrets.

use std::sync::Mutex;

use futures_util::stream::{self, StreamExt, TryStreamExt};

use crate::crypto::{Keyring, MasterKeyId, Purpose};
use crate::store::{RewrappedPair, RewrappedRow, SealedPair, SealedRow, Store, StoreError};

/// Batches being rewrapped and written while the next is read.
const IN_FLIGHT: usize = 3;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RewrapReport {
    pub rewrapped: u64,
    pub batches: u64,
    /// Secret ids that would not open (unknown master key, tampered row): left untouched.
    pub failed: Vec<(String, String)>,
}

/// Re-wraps up to `max_batches` batches (all when `None`) of `batch` connections or
/// secrets each. First each old master key's API keys, each together with its connection's
/// webhook signing secret (one row update for both); then any webhook secret still under an
/// old master key (its API key was under the active one already).
pub async fn rewrap_all(
    store: &dyn Store,
    keyring: &Keyring,
    batch: i64,
    max_batches: Option<u64>,
) -> Result<RewrapReport, StoreError> {
    let report = Mutex::new(RewrapReport::default());
    let job = Job {
        store,
        keyring,
        batch,
        max_batches,
        report: &report,
    };
    for purpose in [Purpose::StripeApiKey, Purpose::WebhookSigningSecret] {
        // Counted again before each pass: the first pass moves webhook secrets too.
        let counts = store.count_secrets_by_purpose().await?;
        let old = (counts.iter())
            .filter(|(p, id, _)| *p == purpose && id != keyring.active_id())
            .map(|(_, id, _)| id);
        for under in old {
            if purpose == Purpose::StripeApiKey {
                job.rewrap_under(Source::Connections, under).await?;
            }
            // API keys: those outside connections, kept for an endpoint cleanup.
            job.rewrap_under(Source::Secrets(purpose), under).await?;
        }
    }
    Ok(report.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// What a pass reads: connections (each API key with its webhook secret), or secrets of one
/// purpose alone (webhook secrets; API keys kept for an endpoint cleanup).
#[derive(Clone, Copy)]
enum Source {
    Connections,
    Secrets(Purpose),
}

/// What one batch holds.
enum Batch {
    Pairs(Vec<SealedPair>),
    Secrets(Purpose, Vec<SealedRow>),
}

struct Job<'a> {
    store: &'a dyn Store,
    keyring: &'a Keyring,
    batch: i64,
    max_batches: Option<u64>,
    report: &'a Mutex<RewrapReport>,
}

impl Job<'_> {
    fn report(&self) -> std::sync::MutexGuard<'_, RewrapReport> {
        self.report.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The old master key `under`'s range (API keys with their webhook secrets, or webhook
    /// secrets alone): one reader walking it, up to `IN_FLIGHT` batches rewrapped and
    /// written behind it.
    async fn rewrap_under(&self, source: Source, under: &MasterKeyId) -> Result<(), StoreError> {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Batch>(1);
        let read = async move {
            let mut after = String::new();
            loop {
                if (self.max_batches).is_some_and(|max| self.report().batches >= max) {
                    return Ok(());
                }
                let (batch, last) = match source {
                    Source::Connections => {
                        let pairs = (self.store)
                            .connections_to_rewrap(
                                under.as_str(),
                                self.keyring.active_id().as_str(),
                                &after,
                                self.batch,
                            )
                            .await?;
                        let last = pairs.last().map(|p| p.api_key.context.secret_id.clone());
                        (Batch::Pairs(pairs), last)
                    }
                    Source::Secrets(purpose) => {
                        let rows = (self.store)
                            .secrets_to_rewrap(purpose, under.as_str(), &after, self.batch)
                            .await?;
                        let last = rows.last().map(|r| r.context.secret_id.clone());
                        (Batch::Secrets(purpose, rows), last)
                    }
                };
                let Some(last) = last else {
                    return Ok(());
                };
                after = last;
                // Counted when read, so `max_batches` bounds what is taken, not only what
                // ends.
                self.report().batches += 1;
                if sender.send(batch).await.is_err() {
                    return Ok(());
                }
            }
        };
        let batches = stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|batch| (batch, receiver))
        });
        // The first failed write stops the writers; the reader then finds no one listening.
        let write = (batches.map(Ok)).try_for_each_concurrent(IN_FLIGHT, |batch| async move {
            match batch {
                Batch::Pairs(pairs) => self.write_pairs(pairs).await,
                Batch::Secrets(purpose, rows) => self.write_secrets(purpose, rows).await,
            }
        });
        let (read, write) = tokio::join!(read, write);
        read.and(write)
    }

    async fn write_pairs(&self, pairs: Vec<SealedPair>) -> Result<(), StoreError> {
        let mut rewrapped = Vec::with_capacity(pairs.len());
        let mut failed = Vec::new();
        for pair in pairs {
            let Some(api_key) = self.rewrap(pair.api_key, &mut failed) else {
                continue;
            };
            let webhook = pair.webhook.and_then(|w| self.rewrap(w, &mut failed));
            rewrapped.push(RewrappedPair { api_key, webhook });
        }
        let (keys, webhooks) = self.store.replace_wrapped_pairs(&rewrapped).await?;
        self.record(keys + webhooks, failed);
        Ok(())
    }

    async fn write_secrets(
        &self,
        purpose: Purpose,
        rows: Vec<SealedRow>,
    ) -> Result<(), StoreError> {
        let mut failed = Vec::new();
        let rewrapped: Vec<RewrappedRow> = (rows.into_iter())
            .filter_map(|row| self.rewrap(row, &mut failed))
            .collect();
        let written = (self.store)
            .replace_wrapped_keys(purpose, &rewrapped)
            .await?;
        self.record(written, failed);
        Ok(())
    }

    /// The row rewrapped in memory under the active master key, or its failure noted.
    fn rewrap(&self, row: SealedRow, failed: &mut Vec<(String, String)>) -> Option<RewrappedRow> {
        match self.keyring.rewrap(&row.context, &row.sealed) {
            Ok(sealed) => Some(RewrappedRow {
                secret_id: row.context.secret_id,
                previous_master_key_id: row.sealed.master_key_id,
                sealed,
            }),
            Err(e) => {
                failed.push((row.context.secret_id, e.to_string()));
                None
            }
        }
    }

    fn record(&self, written: u64, failed: Vec<(String, String)>) {
        metrics::counter!("atlas_rewrap_secrets_total", "result" => "rewrapped").increment(written);
        metrics::counter!("atlas_rewrap_secrets_total", "result" => "failed")
            .increment(failed.len() as u64);
        let mut report = self.report();
        report.rewrapped += written;
        report.failed.extend(failed);
        tracing::info!(
            rewrapped = report.rewrapped,
            failed = report.failed.len(),
            "rewrap progress"
        );
    }
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
