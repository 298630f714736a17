//! Accounting of key fetches and proxied Stripe calls: each is attributed to its service
//! token and tenant, tallied per minute in memory and written in batches, so the hot path
//! never waits on a write.
//!
//! Loss window: tallies not yet flushed (at most `flush_interval`, plus the time a failing
//! database takes to come back) are lost if the process is killed; a graceful shutdown
//! flushes them. A full queue slows fetches down rather than dropping a record.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::domain::TenantId;
use crate::store::{KeyFetchTally, Store};

const QUEUE: usize = 65_536;
/// Distinct (token, tenant, minute) tallies kept while the database is unreachable.
const MAX_PENDING: usize = 200_000;

/// What is tallied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Usage {
    /// `GET …/stripe/key`.
    KeyFetch,
    /// A call through the Stripe proxy.
    StripeCall,
}

struct Fetch {
    usage: Usage,
    token_id: String,
    tenant_id: TenantId,
    at: OffsetDateTime,
}

#[derive(Clone)]
pub struct KeyFetchRecorder {
    tx: mpsc::Sender<Fetch>,
}

impl KeyFetchRecorder {
    /// Starts the writer. It flushes every `flush_interval`, and a last time when every
    /// recorder clone is dropped; await the handle to be sure that happened.
    pub fn spawn(store: Arc<dyn Store>, flush_interval: Duration) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let handle = tokio::spawn(write_tallies(store, rx, flush_interval));
        (Self { tx }, handle)
    }

    pub async fn record(&self, token_id: &str, tenant_id: &TenantId) {
        self.record_usage(Usage::KeyFetch, token_id, tenant_id)
            .await
    }

    pub async fn record_usage(&self, usage: Usage, token_id: &str, tenant_id: &TenantId) {
        let fetch = Fetch {
            usage,
            token_id: token_id.to_owned(),
            tenant_id: tenant_id.clone(),
            at: crate::clock::now(),
        };
        match self.tx.try_send(fetch) {
            Ok(()) => {}
            // Back-pressure rather than loss when the writer falls behind.
            Err(mpsc::error::TrySendError::Full(fetch)) => {
                let _ = self.tx.send(fetch).await;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("key-fetch accounting has stopped; a fetch went unrecorded");
            }
        }
    }
}

type TallyKey = (Usage, String, TenantId, OffsetDateTime);

fn minute_of(at: OffsetDateTime) -> OffsetDateTime {
    at.replace_second(0)
        .and_then(|t| t.replace_nanosecond(0))
        .unwrap_or(at)
}

async fn write_tallies(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Fetch>,
    flush_interval: Duration,
) {
    let mut pending: HashMap<TallyKey, (i64, OffsetDateTime)> = HashMap::new();
    let mut ticker = tokio::time::interval(flush_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            fetch = rx.recv() => match fetch {
                Some(fetch) => {
                    let key = (fetch.usage, fetch.token_id, fetch.tenant_id, minute_of(fetch.at));
                    let entry = pending.entry(key).or_insert((0, fetch.at));
                    entry.0 += 1;
                    entry.1 = entry.1.max(fetch.at);
                }
                None => {
                    flush(&*store, &mut pending).await;
                    return;
                }
            },
            _ = ticker.tick() => flush(&*store, &mut pending).await,
        }
    }
}

async fn flush(store: &dyn Store, pending: &mut HashMap<TallyKey, (i64, OffsetDateTime)>) {
    if pending.is_empty() {
        return;
    }
    let tallies = |usage: Usage| -> Vec<KeyFetchTally> {
        (pending.iter())
            .filter(|((kind, ..), _)| *kind == usage)
            .map(
                |((_, token_id, tenant_id, window_start), (count, last))| KeyFetchTally {
                    token_id: token_id.clone(),
                    tenant_id: tenant_id.clone(),
                    window_start: *window_start,
                    fetch_count: *count,
                    last_fetched_at: *last,
                },
            )
            .collect()
    };
    let (fetches, calls) = (tallies(Usage::KeyFetch), tallies(Usage::StripeCall));
    let written = store.record_usage(&fetches, &calls).await;
    match written {
        Ok(()) => pending.clear(),
        Err(e) => {
            tracing::warn!(error = %e, tallies = pending.len(), "could not write usage tallies; will retry");
            if pending.len() > MAX_PENDING {
                tracing::error!(
                    lost = pending.len(),
                    "usage tallies dropped: the database has been unreachable too long"
                );
                pending.clear();
            }
        }
    }
}
