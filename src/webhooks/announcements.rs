//! What the recovery of events and the repair of endpoints tell Atlas: one function per
//! announcement type, in one place. Each is written to the announcements outbox in a
//! transaction of its own (these workers change nothing else to commit it with), and
//! logged. A failure to write it is logged as an error and does not undo the work done.

use time::OffsetDateTime;

use crate::notifications::{Announcement, EndpointRepair};
use crate::store::{ConnectionRecord, Store};

/// How our endpoint was repaired (the announcement's `repair`).
pub type Repair = EndpointRepair;

/// `events.recovered`: `count` missed events were found in Stripe's log and stored, created
/// between `from` and `to`.
pub async fn events_recovered(
    store: &dyn Store,
    record: &ConnectionRecord,
    count: u64,
    from: OffsetDateTime,
    to: OffsetDateTime,
) {
    tracing::info!(
        announcement = "events.recovered",
        tenant_id = %record.tenant_id,
        count,
        from = %from,
        to = %to,
        "missed events recovered"
    );
    let announcement = Announcement::events_recovered(record, count, from, to);
    write_to_outbox(store, &announcement).await;
}

/// `events.unrecoverable`: events created before `before` may have been missed and are past
/// Stripe's 30-day retention.
pub async fn events_unrecoverable(
    store: &dyn Store,
    record: &ConnectionRecord,
    before: OffsetDateTime,
) {
    tracing::warn!(
        announcement = "events.unrecoverable",
        tenant_id = %record.tenant_id,
        before = %before,
        "a gap in the event feed is older than Stripe keeps events"
    );
    let announcement = Announcement::events_unrecoverable(record, before);
    write_to_outbox(store, &announcement).await;
}

/// `webhook_endpoint.repaired`: our endpoint on the tenant's account works again.
pub async fn webhook_endpoint_repaired(
    store: &dyn Store,
    record: &ConnectionRecord,
    repair: Repair,
) {
    tracing::info!(
        announcement = "webhook_endpoint.repaired",
        tenant_id = %record.tenant_id,
        repair = ?repair,
        "webhook endpoint repaired"
    );
    let announcement = Announcement::webhook_endpoint_repaired(record, repair);
    write_to_outbox(store, &announcement).await;
}

async fn write_to_outbox(store: &dyn Store, announcement: &Announcement) {
    if let Err(e) = store.record_announcement(announcement).await {
        tracing::error!(
            tenant_id = %announcement.tenant_id,
            announcement = announcement.kind.as_str(),
            error = %e,
            "could not write an announcement to the outbox"
        );
    }
}
