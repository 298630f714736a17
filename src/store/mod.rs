//! Persistence behind one trait. One generic implementation serves PostgreSQL (production)
//! and SQLite (the embedded default): `sql_store.rs` implements the trait by handing each
//! call to its aggregate's file (`tenants.rs`, `connections.rs`, `events.rs`, `usage.rs`).
//! The shared statements are named in `queries.rs`, each dialect difference once in
//! `Dialect`, the single-dialect statements in their backend's file, and each backend has its
//! own migrations folder.

mod connections;
mod dialect;
mod endpoint_cleanups;
mod error;
mod events;
mod lane;
mod model;
pub mod notifications;
mod postgres;
mod queries;
mod recovery;
mod rows;
mod sql_store;
mod sqlite;
mod tenants;
mod token_lookup;
mod usage;

use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

pub use dialect::Dialect;
pub use endpoint_cleanups::{EndpointCleanup, EndpointIntent};
pub use error::{NotReady, StoreError};
pub use events::{EventInsert, EventRef, Inserted};
pub use model::{
    Actor, AttemptQuota, AuditRecord, ConnectionRecord, EventCursor, FetchedKey, KeyFetch,
    KeyFetchTally, NewConnection, NewEvent, NewServiceToken, RewrappedPair, RewrappedRow,
    SaveOutcome, SealedPair, SealedRow, ServiceTokenRecord, StoredEvent, StoredState,
    StoredWebhook, TenantRecord, TenantWrite, Verification, WebhookChange, WebhookTarget,
};
pub use notifications::Outbox;
pub use postgres::{explain_generic, hot_statements, seq_scans_of_growing_tables, HotStatement};
pub use recovery::{EventSource, RecoveryClaim, RecoveryCursor, RecoveryRun, WebhookStatus};
pub use sql_store::SqlStore;
pub use usage::Retained;

use crate::crypto::{MasterKeyId, Purpose};
use crate::domain::{ConnectionStatus, Mode, Resource, TenantId};

/// The production store: stateless service instances share one PostgreSQL.
pub type PgStore = SqlStore<sqlx::Postgres>;
/// The embedded default: one SQLite file, nothing to install.
pub type SqliteStore = SqlStore<sqlx::Sqlite>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// Everything the service persists. One implementation per backend; the same story test
/// suite runs against both.
#[async_trait]
pub trait Store: Outbox + Send + Sync + 'static {
    fn backend(&self) -> Backend;

    /// Applies pending migrations.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// The database answers and every migration this binary knows is applied.
    async fn check_ready(&self) -> Result<(), NotReady>;

    async fn upsert_tenant(
        &self,
        tenant: &TenantId,
        mode: Mode,
        actor: &Actor,
    ) -> Result<TenantWrite, StoreError>;

    async fn find_tenant(&self, tenant: &TenantId) -> Result<Option<TenantRecord>, StoreError>;

    async fn insert_service_token(
        &self,
        token: &NewServiceToken,
        actor: &Actor,
    ) -> Result<(), StoreError>;

    async fn find_service_token(&self, id: &str) -> Result<Option<ServiceTokenRecord>, StoreError>;

    async fn list_service_tokens(&self) -> Result<Vec<ServiceTokenRecord>, StoreError>;

    /// Revokes a token; false when there is no such (unrevoked) token.
    async fn revoke_service_token(&self, id: &str, actor: &Actor) -> Result<bool, StoreError>;

    async fn find_connection(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<ConnectionRecord>, StoreError>;

    /// Stores a verified connection, replacing any previous one in the same transaction.
    async fn save_connection(
        &self,
        connection: &NewConnection,
        actor: &Actor,
    ) -> Result<SaveOutcome, StoreError>;

    /// Records a re-verification of the key with `secret_id`, sets when it is next due and
    /// releases any lease; `None` when that key is no longer the tenant's (replaced or
    /// disconnected meanwhile), so a stale result is dropped.
    async fn record_verification(
        &self,
        tenant: &TenantId,
        secret_id: &str,
        verification: &Verification,
        actor: &Actor,
    ) -> Result<Option<ConnectionRecord>, StoreError>;

    /// Leases up to `limit` connections due for re-verification to `owner` until
    /// `lease_until`; a connection leased by another live process is skipped.
    async fn claim_due_connections(
        &self,
        owner: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<TenantId>, StoreError>;

    /// Gives a lease back, with the connection next due at `next_verify_at`.
    async fn release_connection(
        &self,
        tenant: &TenantId,
        owner: &str,
        next_verify_at: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Makes every connection whose report lacks one of `required` due now, for the
    /// resources added to `required` since the last call (all of them on the first): a
    /// start-up with an unchanged required set reads no connection. Returns how many.
    async fn mark_due_lacking(
        &self,
        required: &[Resource],
        now: OffsetDateTime,
    ) -> Result<u64, StoreError>;

    /// Connections per status, for metrics: read from counters kept in the transaction of
    /// every change, a few rows however many connections there are.
    async fn count_connections_by_status(&self)
        -> Result<Vec<(ConnectionStatus, u64)>, StoreError>;

    /// Sealed secrets per master-key id (`keys status`, readiness, rewrap progress), from
    /// the same counters.
    async fn count_secrets_by_master_key(&self) -> Result<Vec<(MasterKeyId, u64)>, StoreError>;

    /// Sealed secrets per purpose and master-key id, from the same counters (what the
    /// rewrap has left, per master key).
    async fn count_secrets_by_purpose(
        &self,
    ) -> Result<Vec<(Purpose, MasterKeyId, u64)>, StoreError>;

    /// Up to `limit` sealed secrets of `purpose` under master key `under`, after `after` in
    /// secret-id order.
    async fn secrets_to_rewrap(
        &self,
        purpose: Purpose,
        under: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<SealedRow>, StoreError>;

    /// Up to `limit` connections whose API key is under master key `under`, after `after` in
    /// API-key secret-id order, each with its webhook signing secret when that is not under
    /// `active`: the rewrap's main pass, one row update for both secrets.
    async fn connections_to_rewrap(
        &self,
        under: &str,
        active: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<SealedPair>, StoreError>;

    /// Replaces both wrapped data keys of each connection in one statement per batch; a row
    /// whose API key's master key changed meanwhile is left alone, and so is a webhook
    /// secret whose master key changed. Returns (API keys, webhook secrets) rewritten.
    async fn replace_wrapped_pairs(&self, rows: &[RewrappedPair])
        -> Result<(u64, u64), StoreError>;

    /// Replaces wrapped data keys in one transaction; a row whose master key changed
    /// meanwhile is left alone. Returns how many rows were rewritten.
    async fn replace_wrapped_keys(
        &self,
        purpose: Purpose,
        rows: &[RewrappedRow],
    ) -> Result<u64, StoreError>;

    /// The connection a webhook URL names, with its sealed signing secret.
    async fn find_webhook_target(
        &self,
        connection_id: &str,
    ) -> Result<Option<WebhookTarget>, StoreError>;

    /// Stores a batch of verified events, each once per (connection, Stripe event id) and
    /// only while its connection still has the webhook secret it was checked with, in one
    /// transaction: all of it is committed or none. For each, what became of it.
    async fn insert_webhook_events(
        &self,
        batch: &[EventInsert],
    ) -> Result<Vec<Inserted>, StoreError>;

    /// The tenant's events after `after` in feed order.
    async fn list_events(
        &self,
        tenant: &TenantId,
        after: EventCursor,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Deletes the connection and its sealed secrets while its webhook endpoint is still
    /// `endpoint_id`; false when there is no such connection (gone, or moved to another
    /// endpoint meanwhile).
    async fn delete_connection(
        &self,
        tenant: &TenantId,
        endpoint_id: Option<&str>,
        actor: &Actor,
    ) -> Result<bool, StoreError>;

    /// As `delete_connection`, for a connection with an endpoint on Stripe: in the same
    /// transaction its sealed API key is kept beside `endpoint_id` (row `cleanup_id` of
    /// `endpoint_cleanups`, due at `due_at`), so that the endpoint can be deleted after the
    /// commit, by the disconnect or, should it die or Stripe not answer, by the sweep.
    async fn delete_connection_leaving_endpoint(
        &self,
        tenant: &TenantId,
        endpoint_id: &str,
        cleanup_id: &str,
        due_at: OffsetDateTime,
        actor: &Actor,
    ) -> Result<bool, StoreError>;

    /// Before a connect registers an endpoint: the key that can delete it again, in case the
    /// connection holding it never commits.
    async fn record_endpoint_intent(&self, intent: &EndpointIntent) -> Result<(), StoreError>;

    /// Up to `limit` rows of `endpoint_cleanups` due at `now`; each is next due at
    /// `next_try` unless `finish_endpoint_cleanup` drops it first.
    async fn claim_endpoint_cleanups(
        &self,
        now: OffsetDateTime,
        next_try: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<EndpointCleanup>, StoreError>;

    /// Whether a row of `connection_id` other than `except_cleanup_id` is a connect that may
    /// still be under way at `now` (its endpoint registered and not stored yet).
    async fn endpoint_connect_in_flight(
        &self,
        connection_id: &str,
        except_cleanup_id: &str,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// Every endpoint the row stands for is settled (gone, or held by its connection):
    /// forgets it and its sealed key.
    async fn finish_endpoint_cleanup(&self, cleanup_id: &str) -> Result<(), StoreError>;

    /// Up to `limit` connections (of `status`, or all) whose connection id sorts after
    /// `after` (`""` for the first page), in connection-id order.
    async fn list_connections(
        &self,
        status: Option<ConnectionStatus>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<ConnectionRecord>, StoreError>;

    /// The key-fetch hot path: the token and the tenant's sealed key in one round trip.
    /// `None` when no token has that id.
    async fn fetch_key(
        &self,
        token_id: &str,
        tenant: &TenantId,
    ) -> Result<Option<KeyFetch>, StoreError>;

    /// The tenant's sealed key with its status and mode, by primary key (the proxy's read).
    async fn find_api_key(&self, tenant: &TenantId) -> Result<Option<FetchedKey>, StoreError>;

    /// Adds tallies of key fetches and of proxied Stripe calls (accumulated off the request
    /// path) in one transaction.
    async fn record_usage(
        &self,
        key_fetches: &[KeyFetchTally],
        stripe_calls: &[KeyFetchTally],
    ) -> Result<(), StoreError>;

    /// Key-fetch tallies for one tenant, oldest window first.
    async fn key_fetches(&self, tenant: &TenantId) -> Result<Vec<KeyFetchTally>, StoreError>;

    /// Proxied-call tallies for one tenant, oldest window first.
    async fn stripe_calls(&self, tenant: &TenantId) -> Result<Vec<KeyFetchTally>, StoreError>;

    /// Makes the tenant's connection due for re-verification now (Stripe refused its key).
    async fn mark_due_now(&self, tenant: &TenantId) -> Result<(), StoreError>;

    /// Takes one attempt of `kind` for `tenant` under a limit of `quota.per_period` attempts
    /// per `quota.period` (GCRA, kept in the database so every instance shares it). `Ok(None)`:
    /// allowed; `Ok(Some(wait))`: refused, allowed again after `wait`.
    async fn take_attempt(
        &self,
        tenant: &TenantId,
        kind: &str,
        quota: AttemptQuota,
    ) -> Result<Option<std::time::Duration>, StoreError>;

    /// Takes `cost` (a rate's worth of time: calls / calls per second) from the fleet-wide
    /// budget `name`, a GCRA row every instance shares. `Ok(None)`: taken; `Ok(Some(wait))`:
    /// the budget is spent, try again after `wait`.
    async fn take_budget(
        &self,
        name: &str,
        cost: std::time::Duration,
    ) -> Result<Option<std::time::Duration>, StoreError>;

    /// Deletes up to `limit` rows of `what` older than `before`, oldest first; returns how
    /// many. Safe on several instances at once (each takes rows the others do not hold).
    async fn delete_expired(
        &self,
        what: Retained,
        before: OffsetDateTime,
        limit: i64,
    ) -> Result<u64, StoreError>;

    /// The audit trail, oldest first; all tenants when `tenant` is `None`.
    async fn audit_trail(&self, tenant: Option<&TenantId>) -> Result<Vec<AuditRecord>, StoreError>;

    /// Moves the fleet's event-recovery heartbeat to `now`. `Some(last beat)` when it was
    /// older than `gap` and this call is the one (of any instance) that saw it.
    async fn beat_recovery(
        &self,
        now: OffsetDateTime,
        gap: std::time::Duration,
    ) -> Result<Option<OffsetDateTime>, StoreError>;

    /// Makes a page of up to `limit` recovery cursors after connection id `after` due at
    /// `now`; the page's last id and how many it changed, `None` past the last cursor.
    async fn mark_recoveries_due(
        &self,
        after: &str,
        now: OffsetDateTime,
        limit: i64,
    ) -> Result<Option<(String, u64)>, StoreError>;

    /// Leases up to `limit` connections due for event recovery to `owner` until
    /// `lease_until`; one leased by another live process is skipped. An index range of the
    /// due cursors: every connection has one from its save on.
    async fn claim_due_recoveries(
        &self,
        owner: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<RecoveryClaim>, StoreError>;

    /// The connection's recovery cursor (made with the connection, in the transaction that
    /// saved it: reading it writes nothing); `None` when there is no such connection.
    async fn find_recovery_cursor(
        &self,
        connection_id: &str,
    ) -> Result<Option<RecoveryCursor>, StoreError>;

    /// Records the start of a run under `owner`'s lease, taking any requested start; false
    /// when the lease is no longer `owner`'s.
    async fn begin_recovery_run(
        &self,
        connection_id: &str,
        owner: &str,
        since: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// Stores a page of recovered events (each once per connection) and the run's progress
    /// (`after`: the page's oldest event) in one transaction, extending the lease. Returns
    /// how many were new; `None` (nothing stored) when the lease is no longer `owner`'s.
    async fn store_recovered_page(
        &self,
        tenant: &TenantId,
        connection_id: &str,
        owner: &str,
        events: &[NewEvent],
        after: &str,
        lease_until: OffsetDateTime,
    ) -> Result<Option<u64>, StoreError>;

    /// Ends a run: the cursor moves forward to `through`, the connection is next due at
    /// `next_due` (now when a recovery was requested meanwhile) and the lease is released.
    /// False when the lease is no longer `owner`'s.
    async fn finish_recovery_run(
        &self,
        connection_id: &str,
        owner: &str,
        through: OffsetDateTime,
        next_due: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// Extends the recovery leases `owner` still holds among `connection_ids` to
    /// `lease_until` (a lease another process took since is left alone).
    async fn extend_recovery_leases(
        &self,
        owner: &str,
        connection_ids: &[String],
        lease_until: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Gives a recovery lease back, with the connection due again at `due_at`; the run's
    /// progress stays for the next holder to resume.
    async fn release_recovery(
        &self,
        connection_id: &str,
        owner: &str,
        due_at: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Makes a recovery due now, from `since` (never later than the cursor). The cursor as
    /// requested; `None` when there is no such connection.
    async fn request_recovery(
        &self,
        connection_id: &str,
        since: Option<OffsetDateTime>,
    ) -> Result<Option<RecoveryCursor>, StoreError>;

    /// What a verification found: whether the key may read Events and the state of our
    /// endpoint; `recover_now` makes a recovery due at once (the endpoint was repaired).
    async fn record_webhook_health(
        &self,
        connection_id: &str,
        event_recovery: bool,
        status: WebhookStatus,
        recover_now: bool,
    ) -> Result<(), StoreError>;

    /// Replaces our webhook endpoint (registered again after it was deleted on Stripe) while
    /// the connection still has the key `secret_id` and the endpoint `old_endpoint_id`;
    /// false when either changed meanwhile.
    async fn replace_webhook(
        &self,
        tenant: &TenantId,
        secret_id: &str,
        old_endpoint_id: &str,
        new: &StoredWebhook,
    ) -> Result<bool, StoreError>;

    /// The oldest recovery cursor per mode (connections whose events are recovered), by an
    /// index range per mode.
    async fn oldest_recovery_cursors(&self) -> Result<Vec<(Mode, OffsetDateTime)>, StoreError>;
}

/// On PostgreSQL, starts the task that keeps `cache` live while subscribed to changes of
/// `service_tokens` (see `auth::token_cache`); on SQLite there is none and the cache stays
/// off.
pub fn spawn_token_listener(
    settings: &crate::config::DatabaseSettings,
    cache: Arc<crate::auth::ServiceTokenCache>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<()>>, StoreError> {
    use secrecy::ExposeSecret;
    let url = settings.url.expose_secret();
    if is_postgres(url) {
        Ok(Some(postgres::spawn_token_listener(url, cache, stop)?))
    } else {
        Ok(None)
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Opens the store the URL names (`postgres://…` or `sqlite://…`).
pub async fn connect(
    settings: &crate::config::DatabaseSettings,
) -> Result<Arc<dyn Store>, StoreError> {
    use secrecy::ExposeSecret;
    let url = settings.url.expose_secret();
    let timeout = settings.acquire_timeout;
    if is_postgres(url) {
        Ok(Arc::new(
            PgStore::connect(url, settings.max_connections, timeout).await?,
        ))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(
            SqliteStore::connect(url, settings.max_connections, timeout).await?,
        ))
    } else {
        Err(StoreError::UnsupportedUrl)
    }
}
