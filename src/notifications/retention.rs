//! Retention of the outbox: delivered announcements are kept `notifications.retention_days`,
//! then deleted in batches by the shared mechanism (`crate::retention`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::store::{Retained, Store, StoreError};

/// Deletes every announcement delivered more than `retention` ago, `batch` at a time.
/// Returns how many.
pub async fn purge(store: &dyn Store, retention: Duration, batch: i64) -> Result<u64, StoreError> {
    crate::retention::purge(store, Retained::Announcements, retention, batch).await
}

pub fn spawn(
    store: Arc<dyn Store>,
    retention: Duration,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    crate::retention::spawn(store, vec![(Retained::Announcements, retention)], stop)
}
