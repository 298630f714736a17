//! What the store reads and writes, in domain types. The row types they are decoded from
//! live in `rows.rs`.

use std::collections::BTreeSet;

use serde_json::Value;
use time::OffsetDateTime;

use crate::auth::{Scope, ServiceTokenHash};
use crate::crypto::{SealedSecret, SecretContext};
use crate::domain::{ConnectionStatus, KeyKind, Mode, PermissionReport, TenantId, Warning};

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

/// A tenant's connection as a connect or disconnect read it, to compare-and-swap against.
///
/// The endpoint, not the key, is what must not change underneath: a save that keeps or
/// replaces the endpoint it read leaves exactly one of ours on Stripe, whichever key won.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredState {
    /// No connection was stored.
    Absent,
    /// A connection was stored, with this webhook endpoint (`None`: it had none).
    Present { endpoint_id: Option<String> },
}

impl StoredState {
    pub fn of(connection: Option<&ConnectionRecord>) -> Self {
        match connection {
            None => Self::Absent,
            Some(c) => Self::Present {
                endpoint_id: c.webhook.as_ref().map(|w| w.endpoint_id.clone()),
            },
        }
    }
}

/// A verified key, sealed, ready to be stored as the tenant's connection.
#[derive(Clone, Debug)]
pub struct NewConnection {
    /// Stable across key replacements: our webhook URL names it.
    pub connection_id: String,
    /// What the flow read before deciding about the webhook endpoint. A compare-and-swap:
    /// when the stored connection is no longer in that state (another connect or a
    /// disconnect committed meanwhile), the save fails with `Conflict`.
    pub expected: StoredState,
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
        SecretContext::api_key(&self.secret_id, &self.tenant_id, self.mode)
    }

    /// The context the webhook signing secret was sealed in.
    pub fn webhook_context(&self, webhook: &StoredWebhook) -> SecretContext {
        SecretContext::webhook_secret(&webhook.secret_id, &self.tenant_id, self.mode)
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
    /// `webhook` (delivered) or `recovered` (listed from Stripe's event log).
    pub source: String,
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

impl StoredEvent {
    pub fn cursor(&self) -> EventCursor {
        EventCursor {
            txid: self.txid,
            seq: self.seq,
        }
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

/// A connection's API key under an old master key, with its webhook signing secret when
/// that is under an old one too: the rewrap rewrites both in one row update.
#[derive(Clone, Debug)]
pub struct SealedPair {
    pub api_key: SealedRow,
    pub webhook: Option<SealedRow>,
}

/// Both rewrapped, as `SealedPair`.
#[derive(Clone, Debug)]
pub struct RewrappedPair {
    pub api_key: RewrappedRow,
    pub webhook: Option<RewrappedRow>,
}

/// A rewrapped data key, replacing the one sealed under `previous_master_key_id`.
#[derive(Clone, Debug)]
pub struct RewrappedRow {
    pub secret_id: String,
    pub previous_master_key_id: String,
    pub sealed: SealedSecret,
}

#[derive(Clone, Debug)]
pub struct AuditRecord {
    pub occurred_at: OffsetDateTime,
    /// `Actor::label()` of who made the change.
    pub actor: String,
    pub action: String,
    pub tenant_id: Option<TenantId>,
    pub detail: Value,
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

/// Key fetches by one token for one tenant within one minute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFetchTally {
    pub token_id: String,
    pub tenant_id: TenantId,
    pub window_start: OffsetDateTime,
    pub fetch_count: i64,
    pub last_fetched_at: OffsetDateTime,
}

/// A per-tenant limit: `per_period` attempts per `period`, as a burst or spread out.
#[derive(Clone, Copy, Debug)]
pub struct AttemptQuota {
    pub per_period: std::num::NonZeroU32,
    pub period: std::time::Duration,
}

impl AttemptQuota {
    pub fn per_minute(per_minute: std::num::NonZeroU32) -> Self {
        Self {
            per_period: per_minute,
            period: std::time::Duration::from_secs(60),
        }
    }
}
