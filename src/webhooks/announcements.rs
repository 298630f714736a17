//! What the recovery of events and the repair of endpoints tell Atlas: one function per
//! announcement type, in one place. Until the announcements outbox exists they are log
//! lines with the announcement's fields; pointing these at the outbox is the whole change.

use time::OffsetDateTime;

use crate::domain::TenantId;

/// `events.recovered`: `count` missed events were found in Stripe's log and stored, created
/// between `from` and `to`.
pub fn events_recovered(tenant: &TenantId, count: u64, from: OffsetDateTime, to: OffsetDateTime) {
    tracing::info!(
        announcement = "events.recovered",
        tenant_id = %tenant,
        count,
        from = %from,
        to = %to,
        "missed events recovered"
    );
}

/// `events.unrecoverable`: events created before `before` may have been missed and are past
/// Stripe's 30-day retention.
pub fn events_unrecoverable(tenant: &TenantId, before: OffsetDateTime) {
    tracing::warn!(
        announcement = "events.unrecoverable",
        tenant_id = %tenant,
        before = %before,
        "a gap in the event feed is older than Stripe keeps events"
    );
}

/// How our endpoint was repaired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Stripe had disabled it; it is enabled again.
    Reenabled,
    /// It was deleted on Stripe's side; it is registered again.
    Registered,
}

impl Repair {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reenabled => "reenabled",
            Self::Registered => "registered",
        }
    }
}

/// `webhook_endpoint.repaired`: our endpoint on the tenant's account works again.
pub fn webhook_endpoint_repaired(tenant: &TenantId, repair: Repair) {
    tracing::info!(
        announcement = "webhook_endpoint.repaired",
        tenant_id = %tenant,
        repair = repair.as_str(),
        "webhook endpoint repaired"
    );
}
