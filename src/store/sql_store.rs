//! The one implementation of `Store`, generic over the backend, and what its parts share:
//! the pool, the bounds the shared statements need of a backend, and the audit trail every
//! change writes. Each aggregate's statements run in its own file (`tenants.rs`,
//! `connections.rs`, `events.rs`, `usage.rs`); this impl hands each call to it. The few
//! dialect differences are `Dialect`'s.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Pool, Type};
use time::OffsetDateTime;

use super::dialect::Dialect;
use super::endpoint_cleanups::{EndpointCleanup, EndpointCleanupRow, EndpointIntent};
use super::lane::Lane;
use super::model::{
    Actor, AuditRecord, ConnectionRecord, EventCursor, FetchedKey, KeyFetch, KeyFetchTally,
    NewConnection, NewEvent, NewServiceToken, RewrappedPair, RewrappedRow, SaveOutcome, SealedPair,
    SealedRow, ServiceTokenRecord, StoredEvent, StoredWebhook, TenantRecord, TenantWrite,
    Verification, WebhookTarget,
};
use super::recovery::{RecoveryClaim, RecoveryCursor, RecoveryCursorRow, WebhookStatus};
use super::rows::{
    ApiKeyRow, AuditRow, ConnectionRow, KeyFetchRow, KeyFetchTallyRow, SealedPairRaw, SealedRowRaw,
    ServiceTokenRow, TenantRow, WebhookTargetRow,
};
use super::{
    queries, AttemptQuota, Backend, EventInsert, Inserted, NotReady, Retained, Store, StoreError,
};
use crate::crypto::{MasterKeyId, Purpose};
use crate::domain::{ConnectionStatus, Mode, Resource, TenantId};

/// A store on a pool of backend `DB`: `PgStore` or `SqliteStore`.
pub struct SqlStore<DB: Database> {
    pub(super) pool: Pool<DB>,
    /// The key reads' connections (`lane.rs`).
    pub(super) lane: Lane<DB>,
}

impl<DB: Dialect> SqlStore<DB> {
    pub async fn connect(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            pool: DB::open_pool(url, max_connections, acquire_timeout).await?,
            lane: Lane::for_pool(max_connections, acquire_timeout),
        })
    }

    pub(super) fn pool(&self) -> &Pool<DB> {
        &self.pool
    }
}

// What the shared statements need of a backend: the column and parameter types they use,
// and rows that decode. Both sqlx backends have all of it; naming it here is what lets one
// implementation serve both. Rust does not carry a trait's where-clause to its users, so
// each aggregate's file names the part of it that file uses.
//
// Each method below calls the inherent method of the same name in its aggregate's file
// (an inherent method is found before a trait method of the same name).
#[async_trait]
impl<DB: Dialect> Store for SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Connection: sqlx::migrate::Migrate,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> OffsetDateTime: Encode<'q, DB> + Type<DB>,
    for<'r> (String,): FromRow<'r, DB::Row>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> (String, i64): FromRow<'r, DB::Row>,
    for<'r> (String, String, i64): FromRow<'r, DB::Row>,
    for<'r> (String, String): FromRow<'r, DB::Row>,
    for<'r> (String, Option<String>, Vec<u8>): FromRow<'r, DB::Row>,
    for<'r> TenantRow: FromRow<'r, DB::Row>,
    for<'r> ServiceTokenRow: FromRow<'r, DB::Row>,
    for<'r> ConnectionRow: FromRow<'r, DB::Row>,
    for<'r> SealedRowRaw: FromRow<'r, DB::Row>,
    for<'r> SealedPairRaw: FromRow<'r, DB::Row>,
    for<'r> EndpointCleanupRow: FromRow<'r, DB::Row>,
    for<'r> WebhookTargetRow: FromRow<'r, DB::Row>,
    for<'r> StoredEvent: FromRow<'r, DB::Row>,
    for<'r> KeyFetchRow: FromRow<'r, DB::Row>,
    for<'r> KeyFetchTallyRow: FromRow<'r, DB::Row>,
    for<'r> ApiKeyRow: FromRow<'r, DB::Row>,
    for<'r> AuditRow: FromRow<'r, DB::Row>,
    Self: super::Outbox,
    for<'r> (OffsetDateTime,): FromRow<'r, DB::Row>,
    for<'r> (String, OffsetDateTime): FromRow<'r, DB::Row>,
    for<'r> RecoveryCursorRow: FromRow<'r, DB::Row>,
{
    fn backend(&self) -> Backend {
        DB::BACKEND
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        DB::migrator().run(&self.pool).await?;
        Ok(())
    }

    async fn check_ready(&self) -> Result<(), NotReady> {
        let applied: i64 = sqlx::query_scalar(queries::MIGRATIONS_APPLIED)
            .fetch_one(&self.pool)
            .await
            .map_err(NotReady::Unreachable)?;
        let known = DB::migrator().iter().count() as i64;
        if applied < known {
            return Err(NotReady::MigrationsPending { applied, known });
        }
        Ok(())
    }

    async fn upsert_tenant(
        &self,
        tenant: &TenantId,
        mode: Mode,
        actor: &Actor,
    ) -> Result<TenantWrite, StoreError> {
        self.upsert_tenant(tenant, mode, actor).await
    }

    async fn find_tenant(&self, tenant: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        self.find_tenant(tenant).await
    }

    async fn insert_service_token(
        &self,
        token: &NewServiceToken,
        actor: &Actor,
    ) -> Result<(), StoreError> {
        self.insert_service_token(token, actor).await
    }

    async fn find_service_token(&self, id: &str) -> Result<Option<ServiceTokenRecord>, StoreError> {
        self.find_service_token(id).await
    }

    async fn list_service_tokens(&self) -> Result<Vec<ServiceTokenRecord>, StoreError> {
        self.list_service_tokens().await
    }

    async fn revoke_service_token(&self, id: &str, actor: &Actor) -> Result<bool, StoreError> {
        self.revoke_service_token(id, actor).await
    }

    async fn find_connection(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<ConnectionRecord>, StoreError> {
        self.find_connection(tenant).await
    }

    async fn save_connection(
        &self,
        new: &NewConnection,
        actor: &Actor,
    ) -> Result<SaveOutcome, StoreError> {
        self.save_connection(new, actor).await
    }

    async fn record_verification(
        &self,
        tenant: &TenantId,
        secret_id: &str,
        verification: &Verification,
        actor: &Actor,
    ) -> Result<Option<ConnectionRecord>, StoreError> {
        self.record_verification(tenant, secret_id, verification, actor)
            .await
    }

    async fn claim_due_connections(
        &self,
        owner: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<TenantId>, StoreError> {
        self.claim_due_connections(owner, now, lease_until, limit)
            .await
    }

    async fn release_connection(
        &self,
        tenant: &TenantId,
        owner: &str,
        next_verify_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.release_connection(tenant, owner, next_verify_at).await
    }

    async fn mark_due_lacking(
        &self,
        required: &[Resource],
        now: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        self.mark_due_lacking(required, now).await
    }

    async fn count_connections_by_status(
        &self,
    ) -> Result<Vec<(ConnectionStatus, u64)>, StoreError> {
        self.count_connections_by_status().await
    }

    async fn count_secrets_by_master_key(&self) -> Result<Vec<(MasterKeyId, u64)>, StoreError> {
        self.count_secrets_by_master_key().await
    }

    async fn count_secrets_by_purpose(
        &self,
    ) -> Result<Vec<(Purpose, MasterKeyId, u64)>, StoreError> {
        self.count_secrets_by_purpose().await
    }

    async fn secrets_to_rewrap(
        &self,
        purpose: Purpose,
        under: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<SealedRow>, StoreError> {
        self.secrets_to_rewrap(purpose, under, after, limit).await
    }

    async fn replace_wrapped_keys(
        &self,
        purpose: Purpose,
        rows: &[RewrappedRow],
    ) -> Result<u64, StoreError> {
        self.replace_wrapped_keys(purpose, rows).await
    }

    async fn connections_to_rewrap(
        &self,
        under: &str,
        active: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<SealedPair>, StoreError> {
        self.connections_to_rewrap(under, active, after, limit)
            .await
    }

    async fn replace_wrapped_pairs(
        &self,
        rows: &[RewrappedPair],
    ) -> Result<(u64, u64), StoreError> {
        DB::replace_wrapped_pairs(&self.pool, rows).await
    }

    async fn find_webhook_target(
        &self,
        connection_id: &str,
    ) -> Result<Option<WebhookTarget>, StoreError> {
        self.find_webhook_target(connection_id).await
    }

    async fn insert_webhook_events(
        &self,
        batch: &[EventInsert],
    ) -> Result<Vec<Inserted>, StoreError> {
        self.insert_webhook_events(batch).await
    }

    async fn list_events(
        &self,
        tenant: &TenantId,
        after: EventCursor,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.list_events(tenant, after, limit).await
    }

    async fn delete_connection(
        &self,
        tenant: &TenantId,
        endpoint_id: Option<&str>,
        actor: &Actor,
    ) -> Result<bool, StoreError> {
        self.delete_connection(tenant, endpoint_id, actor).await
    }

    async fn delete_connection_leaving_endpoint(
        &self,
        tenant: &TenantId,
        endpoint_id: &str,
        cleanup_id: &str,
        due_at: OffsetDateTime,
        actor: &Actor,
    ) -> Result<bool, StoreError> {
        self.delete_connection_leaving_endpoint(tenant, endpoint_id, cleanup_id, due_at, actor)
            .await
    }

    async fn record_endpoint_intent(&self, intent: &EndpointIntent) -> Result<(), StoreError> {
        self.record_endpoint_intent(intent).await
    }

    async fn claim_endpoint_cleanups(
        &self,
        now: OffsetDateTime,
        next_try: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<EndpointCleanup>, StoreError> {
        self.claim_endpoint_cleanups(now, next_try, limit).await
    }

    async fn endpoint_connect_in_flight(
        &self,
        connection_id: &str,
        except_cleanup_id: &str,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        self.endpoint_connect_in_flight(connection_id, except_cleanup_id, now)
            .await
    }

    async fn finish_endpoint_cleanup(&self, cleanup_id: &str) -> Result<(), StoreError> {
        self.finish_endpoint_cleanup(cleanup_id).await
    }

    async fn list_connections(
        &self,
        status: Option<ConnectionStatus>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<ConnectionRecord>, StoreError> {
        self.list_connections(status, after, limit).await
    }

    async fn fetch_key(
        &self,
        token_id: &str,
        tenant: &TenantId,
    ) -> Result<Option<KeyFetch>, StoreError> {
        self.fetch_key(token_id, tenant).await
    }

    async fn record_usage(
        &self,
        key_fetches: &[KeyFetchTally],
        stripe_calls: &[KeyFetchTally],
    ) -> Result<(), StoreError> {
        self.record_usage(key_fetches, stripe_calls).await
    }

    async fn find_api_key(&self, tenant: &TenantId) -> Result<Option<FetchedKey>, StoreError> {
        self.find_api_key(tenant).await
    }

    async fn stripe_calls(&self, tenant: &TenantId) -> Result<Vec<KeyFetchTally>, StoreError> {
        self.stripe_calls(tenant).await
    }

    async fn mark_due_now(&self, tenant: &TenantId) -> Result<(), StoreError> {
        self.mark_due_now(tenant).await
    }

    async fn key_fetches(&self, tenant: &TenantId) -> Result<Vec<KeyFetchTally>, StoreError> {
        self.key_fetches(tenant).await
    }

    async fn take_attempt(
        &self,
        tenant: &TenantId,
        kind: &str,
        quota: AttemptQuota,
    ) -> Result<Option<Duration>, StoreError> {
        self.take_attempt(tenant, kind, quota).await
    }

    async fn take_budget(
        &self,
        name: &str,
        cost: Duration,
    ) -> Result<Option<Duration>, StoreError> {
        self.take_budget(name, cost).await
    }

    async fn delete_expired(
        &self,
        what: Retained,
        before: OffsetDateTime,
        limit: i64,
    ) -> Result<u64, StoreError> {
        match what {
            Retained::Announcements => {
                super::notifications::Outbox::delete_delivered(self, before, limit).await
            }
            Retained::Events => self.delete_old_events(before, limit).await,
            Retained::KeyFetches | Retained::StripeCalls => {
                self.delete_old_tallies(what, before, limit).await
            }
        }
    }

    async fn audit_trail(&self, tenant: Option<&TenantId>) -> Result<Vec<AuditRecord>, StoreError> {
        let rows: Vec<AuditRow> = sqlx::query_as(queries::AUDIT_TRAIL)
            .bind(tenant.map(TenantId::as_str))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn beat_recovery(
        &self,
        now: OffsetDateTime,
        gap: Duration,
    ) -> Result<Option<OffsetDateTime>, StoreError> {
        self.beat_recovery(now, gap).await
    }

    async fn mark_recoveries_due(
        &self,
        after: &str,
        now: OffsetDateTime,
        limit: i64,
    ) -> Result<Option<(String, u64)>, StoreError> {
        self.mark_recoveries_due(after, now, limit).await
    }

    async fn claim_due_recoveries(
        &self,
        owner: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<RecoveryClaim>, StoreError> {
        self.claim_due_recoveries(owner, now, lease_until, limit)
            .await
    }

    async fn find_recovery_cursor(
        &self,
        connection_id: &str,
    ) -> Result<Option<RecoveryCursor>, StoreError> {
        self.find_recovery_cursor(connection_id).await
    }

    async fn begin_recovery_run(
        &self,
        connection_id: &str,
        owner: &str,
        since: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        self.begin_recovery_run(connection_id, owner, since, until)
            .await
    }

    async fn store_recovered_page(
        &self,
        tenant: &TenantId,
        connection_id: &str,
        owner: &str,
        events: &[NewEvent],
        after: &str,
        lease_until: OffsetDateTime,
    ) -> Result<Option<u64>, StoreError> {
        self.store_recovered_page(tenant, connection_id, owner, events, after, lease_until)
            .await
    }

    async fn finish_recovery_run(
        &self,
        connection_id: &str,
        owner: &str,
        through: OffsetDateTime,
        next_due: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        self.finish_recovery_run(connection_id, owner, through, next_due)
            .await
    }

    async fn extend_recovery_leases(
        &self,
        owner: &str,
        connection_ids: &[String],
        lease_until: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.extend_recovery_leases(owner, connection_ids, lease_until)
            .await
    }

    async fn release_recovery(
        &self,
        connection_id: &str,
        owner: &str,
        due_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.release_recovery(connection_id, owner, due_at).await
    }

    async fn request_recovery(
        &self,
        connection_id: &str,
        since: Option<OffsetDateTime>,
    ) -> Result<Option<RecoveryCursor>, StoreError> {
        self.request_recovery(connection_id, since).await
    }

    async fn record_webhook_health(
        &self,
        connection_id: &str,
        event_recovery: bool,
        status: WebhookStatus,
        recover_now: bool,
    ) -> Result<(), StoreError> {
        self.record_webhook_health(connection_id, event_recovery, status, recover_now)
            .await
    }

    async fn replace_webhook(
        &self,
        tenant: &TenantId,
        secret_id: &str,
        old_endpoint_id: &str,
        new: &StoredWebhook,
    ) -> Result<bool, StoreError> {
        self.replace_webhook(tenant, secret_id, old_endpoint_id, new)
            .await
    }

    async fn oldest_recovery_cursors(&self) -> Result<Vec<(Mode, OffsetDateTime)>, StoreError> {
        self.oldest_recovery_cursors().await
    }
}

/// Appends to the audit trail, in the transaction of the change it records.
pub(super) async fn audit<'e, DB, E>(
    executor: E,
    at: OffsetDateTime,
    actor: &Actor,
    action: &str,
    tenant: Option<&TenantId>,
    detail: serde_json::Value,
) -> Result<(), StoreError>
where
    DB: Database,
    E: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> OffsetDateTime: Encode<'q, DB> + Type<DB>,
{
    sqlx::query(queries::INSERT_AUDIT)
        .bind(at)
        .bind(actor.label())
        .bind(action)
        .bind(tenant.map(TenantId::as_str))
        .bind(detail.to_string())
        .execute(executor)
        .await?;
    Ok(())
}
