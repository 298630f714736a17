use serde::Serialize;
use time::OffsetDateTime;

use crate::domain::{ConnectionStatus, Mode, PermissionReport, TenantId, Warning};
use crate::store::{ConnectionRecord, RecoveryCursor, WebhookStatus};

/// The masked view of a connection: everything but the key.
// `deny_unknown_fields` only closes the schema (`additionalProperties: false`): this type
// is serialized, never deserialized.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectionSummary {
    #[schema(value_type = TenantIdSchema)]
    pub tenant_id: TenantId,
    pub status: ConnectionStatus,
    pub mode: Mode,
    #[schema(value_type = KeyType)]
    pub key_type: &'static str,
    #[schema(example = "Kgd1", min_length = 4, max_length = 4)]
    pub key_last4: String,
    /// One entry per required resource: `granted` or `missing`.
    #[schema(value_type = std::collections::BTreeMap<ResourceName, Access>, example = json!({"customers": "granted", "coupons": "missing"}))]
    pub permissions: PermissionReport,
    pub warnings: Vec<Warning>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub verified_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub connected_at: OffsetDateTime,
    /// Whether Stripe's events reach us and can be recovered (absent from the connections
    /// list).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub webhook: Option<WebhookView>,
}

/// Our webhook endpoint on the tenant's account, and the recovery of missed events.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookView {
    /// `enabled`; `disabled` (Stripe turned it off; re-enabled at the next verification);
    /// `missing` (deleted on Stripe's side; registered again at the next verification).
    pub status: WebhookEndpointStatus,
    /// `on` when the key may read Events, else `off` (with the warning `event_recovery_off`).
    pub event_recovery: EventRecovery,
    /// When the newest stored event was created on Stripe.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_event_at: Option<OffsetDateTime>,
    /// Every event created before this is stored.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub recovered_through: Option<OffsetDateTime>,
    /// With `event_recovery: off`: a Stripe dashboard link pre-filling a key that adds
    /// Events: Read.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub fix_url: Option<String>,
}

/// What the last verification found of our webhook endpoint.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebhookEndpointStatus {
    Enabled,
    Disabled,
    Missing,
}

/// Whether missed events can be recovered for the key.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventRecovery {
    On,
    Off,
}

impl ConnectionSummary {
    /// The summary with what the recovery cursor says of events (`fix_url`: the link that
    /// adds Events: Read).
    pub fn with_recovery(mut self, cursor: &RecoveryCursor, fix_url: String) -> Self {
        if !cursor.event_recovery {
            self.warnings.push(Warning::EventRecoveryOff);
        }
        self.webhook = Some(WebhookView {
            status: match cursor.webhook_status {
                WebhookStatus::Enabled => WebhookEndpointStatus::Enabled,
                WebhookStatus::Disabled => WebhookEndpointStatus::Disabled,
                WebhookStatus::Missing => WebhookEndpointStatus::Missing,
            },
            event_recovery: if cursor.event_recovery {
                EventRecovery::On
            } else {
                EventRecovery::Off
            },
            last_event_at: (cursor.last_event_created)
                .and_then(|created| OffsetDateTime::from_unix_timestamp(created).ok()),
            recovered_through: Some(cursor.recovered_through),
            fix_url: (!cursor.event_recovery).then_some(fix_url),
        });
        self
    }
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
            webhook: None,
        }
    }
}

// Schema-only types: the served description names the closed sets the domain types
// serialize to, where those types are plain strings to utoipa. The tests below hold each to
// its domain type.

/// A tenant id: 1 to 64 letters, digits, `_`, `-` and `.`, starting with a letter or digit.
#[derive(utoipa::ToSchema)]
#[schema(as = TenantId, pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", example = "ten_123")]
#[allow(dead_code)]
pub struct TenantIdSchema(String);

/// `restricted` (`rk_…`) or `secret` (`sk_…`).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum KeyType {
    Restricted,
    Secret,
}

/// A Stripe resource Atlas needs write access to.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum ResourceName {
    Customers,
    CheckoutSessions,
    Coupons,
    Invoices,
    WebhookEndpoints,
}

/// Whether the key may write a resource.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum Access {
    Granted,
    Missing,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{KeyKind, Resource, TenantId};
    use utoipa::openapi::schema::Schema;
    use utoipa::openapi::RefOr;
    use utoipa::PartialSchema;

    fn enum_values(schema: RefOr<Schema>) -> Vec<String> {
        let RefOr::T(Schema::Object(object)) = schema else {
            panic!("not an inline object schema");
        };
        let values = object.enum_values.expect("an enum");
        values
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn schema_enums_name_what_the_domain_serializes() {
        let resources: Vec<&str> = Resource::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(enum_values(ResourceName::schema()), resources);
        let kinds = [KeyKind::Restricted.as_str(), KeyKind::Secret.as_str()];
        assert_eq!(enum_values(KeyType::schema()), kinds);
        let access: Vec<String> = [
            crate::domain::Access::Granted,
            crate::domain::Access::Missing,
        ]
        .iter()
        .map(|a| {
            serde_json::to_value(a)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
        assert_eq!(enum_values(Access::schema()), access);
    }

    /// The pattern the description gives and the parser's rule, at the rule's edges.
    #[test]
    fn the_tenant_id_pattern_is_the_parsers_rule() {
        let RefOr::T(Schema::Object(object)) = TenantIdSchema::schema() else {
            panic!("not an inline object schema");
        };
        assert_eq!(
            object.pattern.as_deref(),
            Some("^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
        );
        // The pattern, spelled out: first character, the others, length.
        for ok in ["t", "ten_0", "A.b-c_d", &"x".repeat(64)] {
            assert!(TenantId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "_t", ".t", "-t", "t/x", "t x", "té", &"x".repeat(65)] {
            assert!(TenantId::parse(bad).is_err(), "{bad}");
        }
    }
}
