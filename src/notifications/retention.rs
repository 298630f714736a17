//! Retention: delivered announcements are kept `notifications.retention_days`, then deleted
//! in batches, so one pass never holds a long lock or a large transaction.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::now;
use crate::store::{Store, StoreError};

/// Rows per delete.
pub const BATCH: i64 = 1000;
/// How often a pass runs.
const EVERY: Duration = Duration::from_secs(3600);

/// Deletes every announcement delivered more than `retention` ago, `batch` at a time.
/// Returns how many.
pub async fn purge(store: &dyn Store, retention: Duration, batch: i64) -> Result<u64, StoreError> {
    let before = now() - retention;
    let mut deleted = 0;
    loop {
        let n = store.delete_delivered(before, batch).await?;
        deleted += n;
        if n < batch.max(1) as u64 {
            return Ok(deleted);
        }
        // Room for other writers between batches.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn spawn(
    store: Arc<dyn Store>,
    retention: Duration,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match purge(store.as_ref(), retention, BATCH).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "old delivered announcements deleted"),
                Err(e) => tracing::warn!(error = %e, "deleting old announcements failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(EVERY) => {}
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
        }
    })
}
