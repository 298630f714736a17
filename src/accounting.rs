//! Accounting of key fetches and proxied Stripe calls: each is attributed to its service
//! token and tenant, tallied per minute in memory and written in batches, so the hot path
//! never waits on a write.
//!
//! Loss window: tallies not yet flushed (at most `flush_interval`, plus the time a failing
//! database takes to come back) are lost if the process is killed; a graceful shutdown
//! flushes them. A request adds to an in-memory tally under a short lock and wakes nobody;
//! the writer takes the whole tally at every flush.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::domain::TenantId;
use crate::store::{KeyFetchTally, Store};

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

type TallyKey = (Usage, String, TenantId, OffsetDateTime);
type Tallies = HashMap<TallyKey, (i64, OffsetDateTime)>;

#[derive(Clone)]
pub struct KeyFetchRecorder {
    /// This minute's tallies, taken whole by the writer at every flush. A request adds to
    /// them under a short lock and wakes nobody.
    tallies: Arc<Mutex<Tallies>>,
    /// Never sent on: the writer learns that every recorder is gone (shutdown) when the
    /// channel closes, and flushes a last time.
    _alive: mpsc::Sender<()>,
}

impl KeyFetchRecorder {
    /// Starts the writer. It flushes every `flush_interval`, and a last time when every
    /// recorder clone is dropped; await the handle to be sure that happened.
    pub fn spawn(store: Arc<dyn Store>, flush_interval: Duration) -> (Self, JoinHandle<()>) {
        let (alive, closed) = mpsc::channel(1);
        let tallies = Arc::new(Mutex::new(Tallies::new()));
        let handle = tokio::spawn(write_tallies(
            store,
            tallies.clone(),
            closed,
            flush_interval,
        ));
        let recorder = Self {
            tallies,
            _alive: alive,
        };
        (recorder, handle)
    }

    pub async fn record(&self, token_id: &str, tenant_id: &TenantId) {
        self.record_usage(Usage::KeyFetch, token_id, tenant_id)
            .await
    }

    pub async fn record_usage(&self, usage: Usage, token_id: &str, tenant_id: &TenantId) {
        let at = crate::clock::now();
        let key = (usage, token_id.to_owned(), tenant_id.clone(), minute_of(at));
        let mut tallies = self.tallies.lock().unwrap_or_else(|e| e.into_inner());
        let entry = tallies.entry(key).or_insert((0, at));
        entry.0 += 1;
        entry.1 = entry.1.max(at);
    }
}

fn minute_of(at: OffsetDateTime) -> OffsetDateTime {
    at.replace_second(0)
        .and_then(|t| t.replace_nanosecond(0))
        .unwrap_or(at)
}

async fn write_tallies(
    store: Arc<dyn Store>,
    tallies: Arc<Mutex<Tallies>>,
    mut closed: mpsc::Receiver<()>,
    flush_interval: Duration,
) {
    // What could not be written yet (the database was unreachable), merged with what comes.
    let mut pending = Tallies::new();
    let mut ticker = tokio::time::interval(flush_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = closed.recv() => true,
            _ = ticker.tick() => false,
        };
        let taken = std::mem::take(&mut *tallies.lock().unwrap_or_else(|e| e.into_inner()));
        for (key, (count, at)) in taken {
            let entry = pending.entry(key).or_insert((0, at));
            entry.0 += count;
            entry.1 = entry.1.max(at);
        }
        flush(&*store, &mut pending).await;
        if last {
            return;
        }
    }
}

async fn flush(store: &dyn Store, pending: &mut Tallies) {
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
