use serde::Serialize;
use time::OffsetDateTime;

use crate::domain::{ConnectionStatus, Mode, PermissionReport, TenantId, Warning};
use crate::store::ConnectionRecord;

/// The masked view of a connection: everything but the key.
#[derive(Debug, Serialize)]
pub struct ConnectionSummary {
    pub tenant_id: TenantId,
    pub status: ConnectionStatus,
    pub mode: Mode,
    pub key_type: &'static str,
    pub key_last4: String,
    pub permissions: PermissionReport,
    pub warnings: Vec<Warning>,
    #[serde(with = "time::serde::rfc3339")]
    pub verified_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub connected_at: OffsetDateTime,
}

impl From<&ConnectionRecord> for ConnectionSummary {
    fn from(record: &ConnectionRecord) -> Self {
        Self {
            tenant_id: record.tenant_id.clone(),
            status: record.status,
            mode: record.mode,
            key_type: record.key_type.as_str(),
            key_last4: record.key_last4.clone(),
            permissions: record.permissions.clone(),
            warnings: record.warnings.clone(),
            verified_at: record.verified_at,
            connected_at: record.connected_at,
        }
    }
}
