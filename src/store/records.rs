//! What the store reads and writes, in domain types, and the row types it maps them from.

use std::collections::BTreeSet;

use serde_json::Value;
use time::OffsetDateTime;

use super::StoreError;
use crate::auth::{Scope, ServiceTokenHash};
use crate::crypto::{Purpose, SealedSecret, SecretContext};
use crate::domain::{
    Access, ConnectionStatus, KeyKind, Mode, PermissionReport, Resource, TenantId, Warning,
};

/// Who made a change, as written to the audit trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    Tenant(TenantId),
    ServiceToken(String),
    /// Background re-verification in the process with this id.
    Reverifier(String),
    Cli,
}

impl Actor {
    pub fn label(&self) -> String {
        match self {
            Self::Tenant(id) => format!("tenant:{id}"),
            Self::ServiceToken(id) => format!("service_token:{id}"),
            Self::Reverifier(process) => format!("reverifier:{process}"),
            Self::Cli => "cli".to_owned(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantRecord {
    pub tenant_id: TenantId,
    pub mode: Mode,
    pub created_at: OffsetDateTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TenantWrite {
    Created,
    Updated,
    Unchanged,
}

pub struct NewServiceToken {
    pub id: String,
    pub name: String,
    pub scopes: BTreeSet<Scope>,
    pub hash: ServiceTokenHash,
}

#[derive(Clone, Debug)]
pub struct ServiceTokenRecord {
    pub id: String,
    pub name: String,
    pub scopes: BTreeSet<Scope>,
    pub hash: ServiceTokenHash,
    pub created_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
}

/// Our webhook endpoint on the tenant's Stripe account and its sealed signing secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredWebhook {
    pub endpoint_id: String,
    pub secret_id: String,
    pub sealed: SealedSecret,
}

/// What a save does to the stored webhook endpoint.
#[derive(Clone, Debug)]
pub enum WebhookChange {
    /// The new key sees the endpoint already stored (same account): keep it.
    Keep,
    /// A newly registered endpoint replaces whatever was stored.
    Set(StoredWebhook),
}

/// A verified key, sealed, ready to be stored as the tenant's connection.
#[derive(Clone, Debug)]
pub struct NewConnection {
    /// Stable across key replacements: our webhook URL names it. A save whose id differs
    /// from the stored connection's is a lost race and fails with `Conflict`.
    pub connection_id: String,
    pub webhook: WebhookChange,
    pub tenant_id: TenantId,
    pub mode: Mode,
    pub key_type: KeyKind,
    pub key_last4: String,
    pub key_fingerprint: Vec<u8>,
    /// Chosen before sealing: the sealed secret's associated data names it.
    pub secret_id: String,
    pub sealed: SealedSecret,
    pub status: ConnectionStatus,
    pub permissions: PermissionReport,
    pub warnings: Vec<Warning>,
    pub verified_at: OffsetDateTime,
    /// When background re-verification should next look at it.
    pub next_verify_at: OffsetDateTime,
}

#[derive(Clone, Debug)]
pub struct ConnectionRecord {
    pub tenant_id: TenantId,
    pub connection_id: String,
    pub status: ConnectionStatus,
    pub mode: Mode,
    pub key_type: KeyKind,
    pub key_last4: String,
    pub key_fingerprint: Vec<u8>,
    pub secret_id: String,
    pub sealed: SealedSecret,
    pub permissions: PermissionReport,
    pub warnings: Vec<Warning>,
    pub verified_at: OffsetDateTime,
    pub connected_at: OffsetDateTime,
    pub webhook: Option<StoredWebhook>,
}

impl ConnectionRecord {
    /// The context the API key was sealed in.
    pub fn secret_context(&self) -> SecretContext {
        SecretContext {
            secret_id: self.secret_id.clone(),
            tenant_id: self.tenant_id.clone(),
            mode: self.mode,
            purpose: Purpose::StripeApiKey,
        }
    }

    /// The context the webhook signing secret was sealed in.
    pub fn webhook_context(&self, webhook: &StoredWebhook) -> SecretContext {
        SecretContext {
            secret_id: webhook.secret_id.clone(),
            tenant_id: self.tenant_id.clone(),
            mode: self.mode,
            purpose: Purpose::WebhookSigningSecret,
        }
    }
}

/// Where a delivered event belongs, and the secret to check its signature with.
#[derive(Clone, Debug)]
pub struct WebhookTarget {
    pub tenant_id: TenantId,
    pub mode: Mode,
    pub context: SecretContext,
    pub sealed: SealedSecret,
}

/// A place in a tenant's event feed: after the event with this (txid, seq).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventCursor {
    pub txid: i64,
    pub seq: i64,
}

impl EventCursor {
    /// The opaque form callers hold: `<txid>.<seq>`.
    pub fn encode(self) -> String {
        format!("{}.{}", self.txid, self.seq)
    }

    pub fn parse(raw: &str) -> Option<Self> {
        let (txid, seq) = raw.split_once('.')?;
        let cursor = Self {
            txid: txid.parse().ok()?,
            seq: seq.parse().ok()?,
        };
        (cursor.txid >= 0 && cursor.seq >= 0).then_some(cursor)
    }
}

/// An event as stored: (`txid`, `seq`) is its place in the tenant's feed.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct StoredEvent {
    pub txid: i64,
    pub seq: i64,
    pub connection_id: String,
    pub event_id: String,
    pub event_type: String,
    pub created: i64,
    pub livemode: bool,
    pub received_at: OffsetDateTime,
    pub payload: String,
}

/// A verified delivery to store.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub event_id: String,
    pub event_type: String,
    pub created: i64,
    pub livemode: bool,
    pub payload: String,
}

#[derive(sqlx::FromRow)]
pub(super) struct WebhookTargetRow {
    tenant_id: String,
    mode: String,
    webhook_secret_id: String,
    webhook_master_key_id: String,
    webhook_wrapped_key: Vec<u8>,
    webhook_ciphertext: Vec<u8>,
}

impl StoredEvent {
    pub fn cursor(&self) -> EventCursor {
        EventCursor {
            txid: self.txid,
            seq: self.seq,
        }
    }
}

impl TryFrom<WebhookTargetRow> for WebhookTarget {
    type Error = StoreError;
    fn try_from(row: WebhookTargetRow) -> Result<Self, StoreError> {
        let tenant_id = TenantId::parse(&row.tenant_id).map_err(|_| corrupt("tenant_id"))?;
        let mode = Mode::parse(&row.mode).map_err(|_| corrupt("mode"))?;
        Ok(Self {
            context: SecretContext {
                secret_id: row.webhook_secret_id,
                tenant_id: tenant_id.clone(),
                mode,
                purpose: Purpose::WebhookSigningSecret,
            },
            tenant_id,
            mode,
            sealed: SealedSecret {
                master_key_id: row.webhook_master_key_id,
                wrapped_key: row.webhook_wrapped_key,
                ciphertext: row.webhook_ciphertext,
            },
        })
    }
}

#[derive(Clone, Debug)]
pub enum SaveOutcome {
    Created(ConnectionRecord),
    Replaced(ConnectionRecord),
}

/// The result of re-probing a stored key.
#[derive(Clone, Debug)]
pub struct Verification {
    pub status: ConnectionStatus,
    pub permissions: PermissionReport,
    pub verified_at: OffsetDateTime,
    pub next_verify_at: OffsetDateTime,
}

/// A sealed key with what its associated data names, for rewrapping.
#[derive(Clone, Debug)]
pub struct SealedRow {
    pub context: SecretContext,
    pub sealed: SealedSecret,
}

/// A rewrapped data key, replacing the one sealed under `previous_master_key_id`.
#[derive(Clone, Debug)]
pub struct RewrappedRow {
    pub secret_id: String,
    pub previous_master_key_id: String,
    pub sealed: SealedSecret,
}

/// A sealed secret's columns, aliased alike for both purposes.
#[derive(sqlx::FromRow)]
pub(super) struct SealedRowRaw {
    tenant_id: String,
    mode: String,
    secret_id: String,
    master_key_id: String,
    wrapped_key: Vec<u8>,
    ciphertext: Vec<u8>,
}

impl SealedRowRaw {
    pub(super) fn into_row(self, purpose: Purpose) -> Result<SealedRow, StoreError> {
        Ok(SealedRow {
            context: SecretContext {
                secret_id: self.secret_id,
                tenant_id: TenantId::parse(&self.tenant_id).map_err(|_| corrupt("tenant_id"))?,
                mode: Mode::parse(&self.mode).map_err(|_| corrupt("mode"))?,
                purpose,
            },
            sealed: SealedSecret {
                master_key_id: self.master_key_id,
                wrapped_key: self.wrapped_key,
                ciphertext: self.ciphertext,
            },
        })
    }
}

#[derive(Clone, Debug)]
pub struct AuditRecord {
    pub occurred_at: OffsetDateTime,
    pub actor: String,
    pub action: String,
    pub tenant_id: Option<String>,
    pub detail: Value,
}

/// Timestamps are kept at microsecond precision, PostgreSQL's, so what we return equals
/// what we read back.
pub fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
        .unwrap_or(now)
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

pub(super) fn permissions_to_text(report: &PermissionReport) -> String {
    serde_json::to_string(report).unwrap_or_else(|_| "{}".to_owned())
}

pub(super) fn warnings_to_text(warnings: &[Warning]) -> String {
    serde_json::to_string(warnings).unwrap_or_else(|_| "[]".to_owned())
}

fn permissions_from_text(text: &str) -> Result<PermissionReport, StoreError> {
    let map: std::collections::BTreeMap<String, String> =
        serde_json::from_str(text).map_err(|_| corrupt("permissions"))?;
    map.iter()
        .map(|(resource, access)| {
            let resource =
                Resource::parse(resource).map_err(|_| corrupt("permissions resource"))?;
            let access = Access::parse(access).ok_or_else(|| corrupt("permissions access"))?;
            Ok((resource, access))
        })
        .collect()
}

fn warnings_from_text(text: &str) -> Result<Vec<Warning>, StoreError> {
    let names: Vec<String> = serde_json::from_str(text).map_err(|_| corrupt("warnings"))?;
    names
        .iter()
        .map(|w| Warning::parse(w).ok_or_else(|| corrupt("warning")))
        .collect()
}

#[derive(sqlx::FromRow)]
pub(super) struct TenantRow {
    tenant_id: String,
    mode: String,
    created_at: OffsetDateTime,
}

impl TryFrom<TenantRow> for TenantRecord {
    type Error = StoreError;
    fn try_from(row: TenantRow) -> Result<Self, StoreError> {
        Ok(Self {
            tenant_id: TenantId::parse(&row.tenant_id).map_err(|_| corrupt("tenant_id"))?,
            mode: Mode::parse(&row.mode).map_err(|_| corrupt("mode"))?,
            created_at: row.created_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct ServiceTokenRow {
    token_id: String,
    name: String,
    scopes: String,
    secret_hash: Vec<u8>,
    created_at: OffsetDateTime,
    revoked_at: Option<OffsetDateTime>,
}

impl TryFrom<ServiceTokenRow> for ServiceTokenRecord {
    type Error = StoreError;
    fn try_from(row: ServiceTokenRow) -> Result<Self, StoreError> {
        Ok(Self {
            hash: ServiceTokenHash::from_slice(&row.secret_hash)
                .ok_or_else(|| corrupt("secret_hash"))?,
            scopes: Scope::split(&row.scopes),
            id: row.token_id,
            name: row.name,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct ConnectionRow {
    tenant_id: String,
    connection_id: String,
    status: String,
    mode: String,
    key_type: String,
    key_last4: String,
    key_fingerprint: Vec<u8>,
    api_key_secret_id: String,
    master_key_id: String,
    wrapped_key: Vec<u8>,
    ciphertext: Vec<u8>,
    permissions: String,
    warnings: String,
    verified_at: OffsetDateTime,
    connected_at: OffsetDateTime,
    webhook_endpoint_id: Option<String>,
    webhook_secret_id: Option<String>,
    webhook_master_key_id: Option<String>,
    webhook_wrapped_key: Option<Vec<u8>>,
    webhook_ciphertext: Option<Vec<u8>>,
}

impl TryFrom<ConnectionRow> for ConnectionRecord {
    type Error = StoreError;
    fn try_from(row: ConnectionRow) -> Result<Self, StoreError> {
        Ok(Self {
            tenant_id: TenantId::parse(&row.tenant_id).map_err(|_| corrupt("tenant_id"))?,
            status: ConnectionStatus::parse(&row.status).ok_or_else(|| corrupt("status"))?,
            mode: Mode::parse(&row.mode).map_err(|_| corrupt("mode"))?,
            key_type: KeyKind::parse(&row.key_type).ok_or_else(|| corrupt("key_type"))?,
            permissions: permissions_from_text(&row.permissions)?,
            warnings: warnings_from_text(&row.warnings)?,
            connection_id: row.connection_id,
            key_last4: row.key_last4,
            key_fingerprint: row.key_fingerprint,
            secret_id: row.api_key_secret_id,
            sealed: SealedSecret {
                master_key_id: row.master_key_id,
                wrapped_key: row.wrapped_key,
                ciphertext: row.ciphertext,
            },
            verified_at: row.verified_at,
            connected_at: row.connected_at,
            webhook: match (
                row.webhook_endpoint_id,
                row.webhook_secret_id,
                row.webhook_master_key_id,
                row.webhook_wrapped_key,
                row.webhook_ciphertext,
            ) {
                (
                    Some(endpoint_id),
                    Some(secret_id),
                    Some(master_key_id),
                    Some(wrapped_key),
                    Some(ciphertext),
                ) => Some(StoredWebhook {
                    endpoint_id,
                    secret_id,
                    sealed: SealedSecret {
                        master_key_id,
                        wrapped_key,
                        ciphertext,
                    },
                }),
                _ => None,
            },
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct AuditRow {
    occurred_at: OffsetDateTime,
    actor: String,
    action: String,
    tenant_id: Option<String>,
    detail: String,
}

impl From<AuditRow> for AuditRecord {
    fn from(row: AuditRow) -> Self {
        Self {
            occurred_at: row.occurred_at,
            actor: row.actor,
            action: row.action,
            tenant_id: row.tenant_id,
            detail: serde_json::from_str(&row.detail).unwrap_or(Value::Null),
        }
    }
}

/// What the key-fetch route needs, read in one round trip: the presented service token
/// and, when connected, the tenant's sealed key.
#[derive(Clone, Debug)]
pub struct KeyFetch {
    pub token_hash: ServiceTokenHash,
    pub token_scopes: BTreeSet<Scope>,
    pub token_revoked: bool,
    pub connection: Option<FetchedKey>,
}

#[derive(Clone, Debug)]
pub struct FetchedKey {
    pub status: ConnectionStatus,
    pub mode: Mode,
    pub key_type: KeyKind,
    pub secret_id: String,
    pub sealed: SealedSecret,
}

#[derive(sqlx::FromRow)]
pub(super) struct KeyFetchRow {
    secret_hash: Vec<u8>,
    scopes: String,
    revoked_at: Option<OffsetDateTime>,
    status: Option<String>,
    mode: Option<String>,
    key_type: Option<String>,
    api_key_secret_id: Option<String>,
    master_key_id: Option<String>,
    wrapped_key: Option<Vec<u8>>,
    ciphertext: Option<Vec<u8>>,
}

impl TryFrom<KeyFetchRow> for KeyFetch {
    type Error = StoreError;
    fn try_from(row: KeyFetchRow) -> Result<Self, StoreError> {
        let connection = match (row.status, row.mode, row.key_type, row.api_key_secret_id) {
            (Some(status), Some(mode), Some(key_type), Some(secret_id)) => Some(FetchedKey {
                status: ConnectionStatus::parse(&status).ok_or_else(|| corrupt("status"))?,
                mode: Mode::parse(&mode).map_err(|_| corrupt("mode"))?,
                key_type: KeyKind::parse(&key_type).ok_or_else(|| corrupt("key_type"))?,
                secret_id,
                sealed: SealedSecret {
                    master_key_id: row.master_key_id.ok_or_else(|| corrupt("sealed secret"))?,
                    wrapped_key: row.wrapped_key.ok_or_else(|| corrupt("sealed secret"))?,
                    ciphertext: row.ciphertext.ok_or_else(|| corrupt("sealed secret"))?,
                },
            }),
            _ => None,
        };
        Ok(Self {
            token_hash: ServiceTokenHash::from_slice(&row.secret_hash)
                .ok_or_else(|| corrupt("secret_hash"))?,
            token_scopes: Scope::split(&row.scopes),
            token_revoked: row.revoked_at.is_some(),
            connection,
        })
    }
}

/// Key fetches by one token for one tenant within one minute.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct KeyFetchTally {
    pub token_id: String,
    pub tenant_id: String,
    pub window_start: OffsetDateTime,
    pub fetch_count: i64,
    pub last_fetched_at: OffsetDateTime,
}
