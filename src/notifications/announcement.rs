//! What is announced to Atlas: the types and their payloads. A payload is the connection
//! summary plus, per type, what changed; it never holds a key, secret or token.

use serde::Serialize;
use serde_json::{json, Map, Value};
use time::OffsetDateTime;

use crate::domain::{ConnectionStatus, Resource, TenantId};
use crate::store::ConnectionRecord;

/// The announcement types of docs/API.md ("Announcements to Atlas").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum AnnouncementType {
    #[serde(rename = "connection.connected")]
    Connected,
    #[serde(rename = "connection.replaced")]
    Replaced,
    #[serde(rename = "connection.needs_attention")]
    NeedsAttention,
    #[serde(rename = "connection.restored")]
    Restored,
    #[serde(rename = "connection.revoked")]
    Revoked,
    #[serde(rename = "connection.disconnected")]
    Disconnected,
    #[serde(rename = "webhook_endpoint.repaired")]
    WebhookEndpointRepaired,
    #[serde(rename = "events.recovered")]
    EventsRecovered,
    #[serde(rename = "events.unrecoverable")]
    EventsUnrecoverable,
}

impl AnnouncementType {
    pub const ALL: [Self; 9] = [
        Self::Connected,
        Self::Replaced,
        Self::NeedsAttention,
        Self::Restored,
        Self::Revoked,
        Self::Disconnected,
        Self::WebhookEndpointRepaired,
        Self::EventsRecovered,
        Self::EventsUnrecoverable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "connection.connected",
            Self::Replaced => "connection.replaced",
            Self::NeedsAttention => "connection.needs_attention",
            Self::Restored => "connection.restored",
            Self::Revoked => "connection.revoked",
            Self::Disconnected => "connection.disconnected",
            Self::WebhookEndpointRepaired => "webhook_endpoint.repaired",
            Self::EventsRecovered => "events.recovered",
            Self::EventsUnrecoverable => "events.unrecoverable",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == raw)
    }
}

/// How our webhook endpoint on the tenant's account was repaired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointRepair {
    /// Stripe had disabled it; we enabled it again.
    Reenabled,
    /// It was deleted on Stripe's side; we registered a new one.
    Registered,
}

/// One announcement for one tenant, ready to be written to the outbox.
#[derive(Clone, Debug, PartialEq)]
pub struct Announcement {
    pub tenant_id: TenantId,
    pub kind: AnnouncementType,
    /// A JSON object: the connection summary plus what changed.
    pub data: Value,
}

impl Announcement {
    /// `connection.connected` or `connection.replaced`, for a connection just saved.
    pub fn saved(record: &ConnectionRecord, replaced: bool) -> Self {
        let kind = match replaced {
            true => AnnouncementType::Replaced,
            false => AnnouncementType::Connected,
        };
        Self::about(record, kind, Map::new())
    }

    /// What a re-verification changed, judged against the status last announced (`None`:
    /// none was); `None` when the status did not change.
    pub fn verified(record: &ConnectionRecord, previous: Option<ConnectionStatus>) -> Option<Self> {
        let previous = previous.unwrap_or(ConnectionStatus::Active);
        if previous == record.status {
            return None;
        }
        Some(match record.status {
            ConnectionStatus::NeedsAttention => {
                let missing = record.permissions.missing();
                // The key must hold every resource it was probed for, not only the missing.
                let required: Vec<Resource> = (Resource::ALL.into_iter())
                    .filter(|r| record.permissions.get(*r).is_some())
                    .collect();
                let mut changed = Map::new();
                changed.insert("missing".into(), json!(missing));
                changed.insert(
                    "fix_url".into(),
                    json!(crate::connection::fix_url(record.mode, &required)),
                );
                Self::about(record, AnnouncementType::NeedsAttention, changed)
            }
            ConnectionStatus::Revoked => Self::about(record, AnnouncementType::Revoked, Map::new()),
            ConnectionStatus::Active => Self::about(record, AnnouncementType::Restored, Map::new()),
        })
    }

    /// `connection.disconnected`: the connection is gone, so only what named it is left.
    pub fn disconnected(tenant: &TenantId, connection_id: &str, key_last4: &str) -> Self {
        Self {
            tenant_id: tenant.clone(),
            kind: AnnouncementType::Disconnected,
            data: json!({
                "tenant_id": tenant,
                "connection_id": connection_id,
                "key_last4": key_last4,
            }),
        }
    }

    /// `webhook_endpoint.repaired`: Stripe's deliveries reach us again.
    pub fn webhook_endpoint_repaired(record: &ConnectionRecord, repair: EndpointRepair) -> Self {
        let mut changed = Map::new();
        changed.insert("repair".into(), json!(repair));
        Self::about(record, AnnouncementType::WebhookEndpointRepaired, changed)
    }

    /// `events.recovered`: `count` missed events created between `from` and `to` were
    /// found in Stripe's event log and added to the feed.
    pub fn events_recovered(
        record: &ConnectionRecord,
        count: u64,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Self {
        let mut changed = Map::new();
        changed.insert("count".into(), json!(count));
        changed.insert("from".into(), json!(rfc3339(from)));
        changed.insert("to".into(), json!(rfc3339(to)));
        Self::about(record, AnnouncementType::EventsRecovered, changed)
    }

    /// `events.unrecoverable`: events created before `before` may be missing and are past
    /// Stripe's 30-day retention.
    pub fn events_unrecoverable(record: &ConnectionRecord, before: OffsetDateTime) -> Self {
        let mut changed = Map::new();
        changed.insert("before".into(), json!(rfc3339(before)));
        Self::about(record, AnnouncementType::EventsUnrecoverable, changed)
    }

    fn about(
        record: &ConnectionRecord,
        kind: AnnouncementType,
        changed: Map<String, Value>,
    ) -> Self {
        let mut data = summary(record);
        data.extend(changed);
        Self {
            tenant_id: record.tenant_id.clone(),
            kind,
            data: Value::Object(data),
        }
    }

    /// The body posted on every attempt: `{"type", "timestamp", "data"}`.
    pub fn body(&self, at: OffsetDateTime) -> String {
        json!({"type": self.kind, "timestamp": rfc3339(at), "data": self.data}).to_string()
    }
}

/// The connection summary of `GET …/connection` (docs/API.md), never the key: the fields are
/// chosen one by one, so a new secret column cannot slip in.
fn summary(record: &ConnectionRecord) -> Map<String, Value> {
    let value = json!({
        "tenant_id": record.tenant_id,
        "connection_id": record.connection_id,
        "status": record.status,
        "mode": record.mode,
        "key_type": record.key_type.as_str(),
        "key_last4": record.key_last4,
        "permissions": record.permissions,
        "warnings": record.warnings,
        "verified_at": rfc3339(record.verified_at),
        "connected_at": rfc3339(record.connected_at),
    });
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
