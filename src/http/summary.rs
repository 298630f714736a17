use serde::Serialize;
use time::OffsetDateTime;

use crate::domain::{ConnectionStatus, Mode, PermissionReport, TenantId, Warning};
use crate::store::ConnectionRecord;

/// The masked view of a connection: everything but the key.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConnectionSummary {
    #[schema(value_type = String, example = "ten_123")]
    pub tenant_id: TenantId,
    pub status: ConnectionStatus,
    pub mode: Mode,
    /// `restricted` or `secret`.
    #[schema(value_type = String, example = "restricted")]
    pub key_type: &'static str,
    #[schema(example = "Kgd1")]
    pub key_last4: String,
    /// Per resource: `granted` or `missing`.
    #[schema(value_type = std::collections::BTreeMap<String, String>, example = json!({"customers": "granted", "coupons": "missing"}))]
    pub permissions: PermissionReport,
    pub warnings: Vec<Warning>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub verified_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
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
