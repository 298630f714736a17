//! Announcements to Atlas (docs/API.md, "Announcements to Atlas"): what a tenant must act
//! on, written to an outbox in the transaction of the change (`store::notifications`),
//! delivered signed per Standard Webhooks, at least once and in order per tenant.

pub mod announcement;
mod deliverer;
pub mod retention;
pub mod settings;
pub mod signing;

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use announcement::{Announcement, AnnouncementType, EndpointRepair};
pub use deliverer::Deliverer;
pub use settings::{NotificationSettings, RetrySchedule};

use crate::config::DatabaseSettings;
use crate::store::Store;

/// Starts the deliverer, the subscription that wakes it on another instance's commit
/// (PostgreSQL) and retention. Nothing when `notifications.url` is not set: announcements
/// are still recorded, and wait for a deliverer.
pub fn spawn(
    settings: &NotificationSettings,
    database: &DatabaseSettings,
    store: Arc<dyn Store>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    if !settings.enabled() {
        return Ok(Vec::new());
    }
    let deliverer = Deliverer::new(settings, store.clone())?;
    tracing::info!(owner = deliverer.owner(), "announcements to Atlas on");
    let mut tasks = vec![retention::spawn(store, settings.retention(), stop.clone())];
    tasks.extend(crate::store::notifications::spawn_outbox_listener(
        database,
        stop.clone(),
    )?);
    tasks.push(deliverer.spawn(stop));
    Ok(tasks)
}
