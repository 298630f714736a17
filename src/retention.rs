//! Retention: rows that have served their time are deleted in bounded batches, so one pass
//! never holds a long lock or a large transaction and the tables do not grow forever. One
//! mechanism for every retained table (delivered announcements, the event feed, the usage
//! tallies): each batch is one statement taking the oldest rows past the horizon by an
//! index range scan. Deletes are idempotent and, on PostgreSQL, skip rows another instance
//! is deleting, so every instance may run the worker; no lease is needed.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::now;
use crate::store::{Retained, Store, StoreError};

/// Rows per delete.
pub const BATCH: i64 = 1000;
/// How often a pass runs (with jitter, so instances started together drift apart).
const EVERY: Duration = Duration::from_secs(3600);
/// Room for other writers between two batches.
const BETWEEN_BATCHES: Duration = Duration::from_millis(50);

/// Deletes every row of `what` older than `keep`, `batch` at a time. Returns how many.
pub async fn purge(
    store: &dyn Store,
    what: Retained,
    keep: Duration,
    batch: i64,
) -> Result<u64, StoreError> {
    // One horizon for the whole pass: a row that turns old meanwhile waits for the next.
    let before = now() - keep;
    let batch = batch.max(1);
    let mut deleted = 0;
    loop {
        let n = store.delete_expired(what, before, batch).await?;
        deleted += n;
        if n < batch as u64 {
            return Ok(deleted);
        }
        tokio::time::sleep(BETWEEN_BATCHES).await;
    }
}

/// Runs a pass over each `(table, retention)` every hour until `stop` turns true.
pub fn spawn(
    store: Arc<dyn Store>,
    policies: Vec<(Retained, Duration)>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for &(what, keep) in &policies {
                match purge(store.as_ref(), what, keep, BATCH).await {
                    Ok(0) => {}
                    Ok(n) => {
                        metrics::counter!("atlas_retention_deleted_total", "table" => what.as_str())
                            .increment(n);
                        tracing::info!(
                            table = what.as_str(),
                            deleted = n,
                            "rows past their retention deleted"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(table = what.as_str(), error = %e, "deleting old rows failed")
                    }
                }
            }
            let pause = EVERY.mul_f64(rand::thread_rng().gen_range(0.75..1.25));
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
        }
    })
}
