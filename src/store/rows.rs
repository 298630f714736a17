//! Rows as the database returns them, and their codecs into the records of `model.rs`.
//! A stored value that does not parse back into its domain type is `StoreError::Corrupt`.
//!
//! The row types are `pub` inside this private module (so still unreachable outside
//! `store`): the aggregates' `impl SqlStore` blocks name them in their bounds, and a bound of
//! a public type's impl may not name a `pub(crate)` type (`private_bounds`).

use serde_json::Value;
use time::OffsetDateTime;

use super::model::{
    AuditRecord, ConnectionRecord, FetchedKey, KeyFetch, KeyFetchTally, SealedPair, SealedRow,
    ServiceTokenRecord, StoredWebhook, TenantRecord, WebhookTarget,
};
use super::StoreError;
use crate::auth::{Scope, ServiceTokenHash};
use crate::crypto::{Purpose, SealedSecret, SecretContext};
use crate::domain::{
    Access, ConnectionStatus, KeyKind, Mode, PermissionReport, Resource, TenantId, Warning,
};

#[derive(sqlx::FromRow)]
pub struct WebhookTargetRow {
    tenant_id: String,
    mode: String,
    webhook_secret_id: String,
    webhook_master_key_id: String,
    webhook_wrapped_key: Vec<u8>,
    webhook_ciphertext: Vec<u8>,
}

impl TryFrom<WebhookTargetRow> for WebhookTarget {
    type Error = StoreError;
    fn try_from(row: WebhookTargetRow) -> Result<Self, StoreError> {
        let tenant_id = parse_tenant_id(&row.tenant_id)?;
        let mode = parse_mode(&row.mode)?;
        Ok(Self {
            context: SecretContext::webhook_secret(&row.webhook_secret_id, &tenant_id, mode),
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

/// A sealed secret's columns, aliased alike for both purposes.
#[derive(sqlx::FromRow)]
pub struct SealedRowRaw {
    tenant_id: String,
    mode: String,
    secret_id: String,
    master_key_id: String,
    wrapped_key: Vec<u8>,
    ciphertext: Vec<u8>,
}

impl SealedRowRaw {
    pub(crate) fn into_row(self, purpose: Purpose) -> Result<SealedRow, StoreError> {
        Ok(SealedRow {
            context: SecretContext::new(
                purpose,
                &self.secret_id,
                &parse_tenant_id(&self.tenant_id)?,
                parse_mode(&self.mode)?,
            ),
            sealed: SealedSecret {
                master_key_id: self.master_key_id,
                wrapped_key: self.wrapped_key,
                ciphertext: self.ciphertext,
            },
        })
    }
}

/// A connection's two sealed secrets (`CONNECTIONS_TO_REWRAP`).
#[derive(sqlx::FromRow)]
pub struct SealedPairRaw {
    tenant_id: String,
    mode: String,
    api_key_secret_id: String,
    master_key_id: String,
    wrapped_key: Vec<u8>,
    ciphertext: Vec<u8>,
    webhook_secret_id: Option<String>,
    webhook_master_key_id: Option<String>,
    webhook_wrapped_key: Option<Vec<u8>>,
    webhook_ciphertext: Option<Vec<u8>>,
}

impl SealedPairRaw {
    /// The pair, its webhook secret left out when it is under `active` already.
    pub(crate) fn into_pair(self, active: &str) -> Result<SealedPair, StoreError> {
        let tenant = parse_tenant_id(&self.tenant_id)?;
        let mode = parse_mode(&self.mode)?;
        let webhook = match (
            self.webhook_secret_id,
            self.webhook_master_key_id,
            self.webhook_wrapped_key,
            self.webhook_ciphertext,
        ) {
            (Some(secret_id), Some(master_key_id), Some(wrapped_key), Some(ciphertext))
                if master_key_id != active =>
            {
                Some(SealedRow {
                    context: SecretContext::webhook_secret(&secret_id, &tenant, mode),
                    sealed: SealedSecret {
                        master_key_id,
                        wrapped_key,
                        ciphertext,
                    },
                })
            }
            _ => None,
        };
        Ok(SealedPair {
            api_key: SealedRow {
                context: SecretContext::api_key(&self.api_key_secret_id, &tenant, mode),
                sealed: SealedSecret {
                    master_key_id: self.master_key_id,
                    wrapped_key: self.wrapped_key,
                    ciphertext: self.ciphertext,
                },
            },
            webhook,
        })
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

pub(crate) fn parse_tenant_id(raw: &str) -> Result<TenantId, StoreError> {
    TenantId::parse(raw).map_err(|_| corrupt("tenant_id"))
}

pub(crate) fn parse_mode(raw: &str) -> Result<Mode, StoreError> {
    Mode::parse(raw).map_err(|_| corrupt("mode"))
}

pub(crate) fn permissions_to_text(report: &PermissionReport) -> String {
    serde_json::to_string(report).unwrap_or_else(|_| "{}".to_owned())
}

pub(crate) fn warnings_to_text(warnings: &[Warning]) -> String {
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
pub struct TenantRow {
    tenant_id: String,
    mode: String,
    created_at: OffsetDateTime,
}

impl TryFrom<TenantRow> for TenantRecord {
    type Error = StoreError;
    fn try_from(row: TenantRow) -> Result<Self, StoreError> {
        Ok(Self {
            tenant_id: parse_tenant_id(&row.tenant_id)?,
            mode: parse_mode(&row.mode)?,
            created_at: row.created_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub struct ServiceTokenRow {
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
pub struct ConnectionRow {
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
            tenant_id: parse_tenant_id(&row.tenant_id)?,
            status: ConnectionStatus::parse(&row.status).ok_or_else(|| corrupt("status"))?,
            mode: parse_mode(&row.mode)?,
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
pub struct AuditRow {
    occurred_at: OffsetDateTime,
    actor: String,
    action: String,
    tenant_id: Option<String>,
    detail: String,
}

impl TryFrom<AuditRow> for AuditRecord {
    type Error = StoreError;
    fn try_from(row: AuditRow) -> Result<Self, StoreError> {
        Ok(Self {
            occurred_at: row.occurred_at,
            actor: row.actor,
            action: row.action,
            tenant_id: row.tenant_id.as_deref().map(parse_tenant_id).transpose()?,
            detail: serde_json::from_str(&row.detail).unwrap_or(Value::Null),
        })
    }
}

#[derive(sqlx::FromRow)]
pub struct KeyFetchRow {
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
        // The LEFT JOIN's half: all columns or none (no connection).
        let connection = match (row.status, row.mode, row.key_type, row.api_key_secret_id) {
            (Some(status), Some(mode), Some(key_type), Some(api_key_secret_id)) => {
                let sealed = || corrupt("sealed secret");
                let key = ApiKeyRow {
                    status,
                    mode,
                    key_type,
                    api_key_secret_id,
                    master_key_id: row.master_key_id.ok_or_else(sealed)?,
                    wrapped_key: row.wrapped_key.ok_or_else(sealed)?,
                    ciphertext: row.ciphertext.ok_or_else(sealed)?,
                };
                Some(FetchedKey::try_from(key)?)
            }
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

#[derive(sqlx::FromRow)]
pub struct ApiKeyRow {
    status: String,
    mode: String,
    key_type: String,
    api_key_secret_id: String,
    master_key_id: String,
    wrapped_key: Vec<u8>,
    ciphertext: Vec<u8>,
}

impl TryFrom<ApiKeyRow> for FetchedKey {
    type Error = StoreError;
    fn try_from(row: ApiKeyRow) -> Result<Self, StoreError> {
        Ok(Self {
            status: ConnectionStatus::parse(&row.status).ok_or_else(|| corrupt("status"))?,
            mode: parse_mode(&row.mode)?,
            key_type: KeyKind::parse(&row.key_type).ok_or_else(|| corrupt("key_type"))?,
            secret_id: row.api_key_secret_id,
            sealed: SealedSecret {
                master_key_id: row.master_key_id,
                wrapped_key: row.wrapped_key,
                ciphertext: row.ciphertext,
            },
        })
    }
}

#[derive(sqlx::FromRow)]
pub struct KeyFetchTallyRow {
    token_id: String,
    tenant_id: String,
    window_start: OffsetDateTime,
    fetch_count: i64,
    last_fetched_at: OffsetDateTime,
}

impl TryFrom<KeyFetchTallyRow> for KeyFetchTally {
    type Error = StoreError;
    fn try_from(row: KeyFetchTallyRow) -> Result<Self, StoreError> {
        Ok(Self {
            token_id: row.token_id,
            tenant_id: parse_tenant_id(&row.tenant_id)?,
            window_start: row.window_start,
            fetch_count: row.fetch_count,
            last_fetched_at: row.last_fetched_at,
        })
    }
}
