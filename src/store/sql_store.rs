//! The one implementation of `Store`, generic over the backend. The statements are in
//! `queries.rs`; the few dialect differences are `Dialect`'s.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Pool, Type};
use time::OffsetDateTime;

use super::dialect::Dialect;
use super::model::{
    Actor, AuditRecord, ConnectionRecord, EventCursor, FetchedKey, KeyFetch, KeyFetchTally,
    NewConnection, NewEvent, NewServiceToken, RewrappedRow, SaveOutcome, SealedRow,
    ServiceTokenRecord, StoredEvent, StoredState, TenantRecord, TenantWrite, Verification,
    WebhookChange, WebhookTarget,
};
use super::rows::{
    self, permissions_to_text, warnings_to_text, ApiKeyRow, AuditRow, ConnectionRow, KeyFetchRow,
    KeyFetchTallyRow, SealedRowRaw, ServiceTokenRow, TenantRow, WebhookTargetRow,
};
use super::{notifications, queries, AttemptQuota, Backend, NotReady, Store, StoreError};
use crate::clock::now;
use crate::crypto::{MasterKeyId, Purpose};
use crate::domain::{ConnectionStatus, Mode, Resource, TenantId};

/// A store on a pool of backend `DB`: `PgStore` or `SqliteStore`.
pub struct SqlStore<DB: Database> {
    pool: Pool<DB>,
}

impl<DB: Dialect> SqlStore<DB> {
    pub async fn connect(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            pool: DB::open_pool(url, max_connections, acquire_timeout).await?,
        })
    }

    pub(super) fn pool(&self) -> &Pool<DB> {
        &self.pool
    }
}

// What the shared statements need of a backend: the column and parameter types they use,
// and rows that decode. Both sqlx backends have all of it; naming it here is what lets one
// implementation serve both.
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
    for<'r> (String, String): FromRow<'r, DB::Row>,
    for<'r> (String, Option<String>, Vec<u8>): FromRow<'r, DB::Row>,
    for<'r> TenantRow: FromRow<'r, DB::Row>,
    for<'r> ServiceTokenRow: FromRow<'r, DB::Row>,
    for<'r> ConnectionRow: FromRow<'r, DB::Row>,
    for<'r> SealedRowRaw: FromRow<'r, DB::Row>,
    for<'r> WebhookTargetRow: FromRow<'r, DB::Row>,
    for<'r> StoredEvent: FromRow<'r, DB::Row>,
    for<'r> KeyFetchRow: FromRow<'r, DB::Row>,
    for<'r> KeyFetchTallyRow: FromRow<'r, DB::Row>,
    for<'r> ApiKeyRow: FromRow<'r, DB::Row>,
    for<'r> AuditRow: FromRow<'r, DB::Row>,
    Self: super::Outbox,
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
        let now = now();
        // Two attempts: a concurrent create of the same tenant makes the first insert a
        // no-op, and the second attempt then updates the row it created.
        for _ in 0..2 {
            let mut tx = self.pool.begin().await?;
            let current: Option<String> = sqlx::query_scalar(queries::LOCK_TENANT)
                .bind(tenant.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            let outcome = match current {
                Some(current) if current == mode.as_str() => return Ok(TenantWrite::Unchanged),
                Some(_) => {
                    let connected: i64 = sqlx::query_scalar(queries::COUNT_TENANT_CONNECTIONS)
                        .bind(tenant.as_str())
                        .fetch_one(&mut *tx)
                        .await?;
                    if connected > 0 {
                        return Err(StoreError::TenantHasConnection);
                    }
                    sqlx::query(queries::UPDATE_TENANT_MODE)
                        .bind(tenant.as_str())
                        .bind(mode.as_str())
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    TenantWrite::Updated
                }
                None => {
                    let inserted = sqlx::query(queries::INSERT_TENANT)
                        .bind(tenant.as_str())
                        .bind(mode.as_str())
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    if DB::rows_affected(&inserted) == 0 {
                        continue;
                    }
                    TenantWrite::Created
                }
            };
            let action = match outcome {
                TenantWrite::Created => "tenant.created",
                _ => "tenant.mode_changed",
            };
            let detail = json!({"mode": mode});
            audit(&mut *tx, now, actor, action, Some(tenant), detail).await?;
            tx.commit().await?;
            return Ok(outcome);
        }
        Err(StoreError::Conflict)
    }

    async fn find_tenant(&self, tenant: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        let row: Option<TenantRow> = sqlx::query_as(queries::FIND_TENANT)
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn insert_service_token(
        &self,
        token: &NewServiceToken,
        actor: &Actor,
    ) -> Result<(), StoreError> {
        let now = now();
        let scopes = crate::auth::Scope::join(&token.scopes);
        let mut tx = self.pool.begin().await?;
        sqlx::query(queries::INSERT_SERVICE_TOKEN)
            .bind(token.id.as_str())
            .bind(token.name.as_str())
            .bind(scopes.as_str())
            .bind(&token.hash.0[..])
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let detail = json!({"token_id": token.id, "name": token.name, "scopes": scopes});
        audit(&mut *tx, now, actor, "service_token.created", None, detail).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn find_service_token(&self, id: &str) -> Result<Option<ServiceTokenRecord>, StoreError> {
        let row: Option<ServiceTokenRow> = sqlx::query_as(queries::FIND_SERVICE_TOKEN)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn list_service_tokens(&self) -> Result<Vec<ServiceTokenRecord>, StoreError> {
        let rows: Vec<ServiceTokenRow> = sqlx::query_as(queries::LIST_SERVICE_TOKENS)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn revoke_service_token(&self, id: &str, actor: &Actor) -> Result<bool, StoreError> {
        let now = now();
        let mut tx = self.pool.begin().await?;
        let revoked = sqlx::query(queries::REVOKE_SERVICE_TOKEN)
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if DB::rows_affected(&revoked) == 0 {
            return Ok(false);
        }
        let detail = json!({"token_id": id});
        audit(&mut *tx, now, actor, "service_token.revoked", None, detail).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn find_connection(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<ConnectionRecord>, StoreError> {
        find_connection(&self.pool, tenant).await
    }

    async fn save_connection(
        &self,
        new: &NewConnection,
        actor: &Actor,
    ) -> Result<SaveOutcome, StoreError> {
        let now = now();
        let tenant = new.tenant_id.as_str();
        let mut tx = self.pool.begin().await?;
        let mode: Option<String> = sqlx::query_scalar(queries::LOCK_TENANT)
            .bind(tenant)
            .fetch_optional(&mut *tx)
            .await?;
        match mode.as_deref().map(rows::parse_mode).transpose()? {
            None => return Err(StoreError::TenantMissing),
            Some(mode) if mode == new.mode => {}
            Some(mode) => return Err(StoreError::ModeChanged(mode)),
        }
        let previous: Option<(String, Option<String>, Vec<u8>)> =
            sqlx::query_as(queries::PREVIOUS_CONNECTION)
                .bind(tenant)
                .fetch_optional(&mut *tx)
                .await?;
        // Compare-and-swap on what the flow read: a connection created, deleted or moved to
        // another endpoint meanwhile makes this save the loser.
        let unchanged = match (&previous, &new.expected) {
            (None, StoredState::Absent) => true,
            (Some((id, stored, _)), StoredState::Present { endpoint_id }) => {
                *id == new.connection_id && stored == endpoint_id
            }
            _ => false,
        };
        if !unchanged {
            return Err(StoreError::Conflict);
        }
        let statement = match previous {
            Some(_) => queries::UPDATE_CONNECTION,
            None => queries::INSERT_CONNECTION,
        };
        sqlx::query(statement)
            .bind(tenant)
            .bind(new.connection_id.as_str())
            .bind(new.secret_id.as_str())
            .bind(new.status.as_str())
            .bind(new.mode.as_str())
            .bind(new.key_type.as_str())
            .bind(new.key_last4.as_str())
            .bind(new.key_fingerprint.as_slice())
            .bind(permissions_to_text(&new.permissions))
            .bind(warnings_to_text(&new.warnings))
            .bind(new.verified_at)
            .bind(now)
            .bind(new.sealed.master_key_id.as_str())
            .bind(new.sealed.wrapped_key.as_slice())
            .bind(new.sealed.ciphertext.as_slice())
            .bind(new.next_verify_at)
            .execute(&mut *tx)
            .await?;
        let new_endpoint = match &new.webhook {
            WebhookChange::Set(webhook) => {
                sqlx::query(queries::SET_WEBHOOK)
                    .bind(tenant)
                    .bind(webhook.endpoint_id.as_str())
                    .bind(webhook.secret_id.as_str())
                    .bind(webhook.sealed.master_key_id.as_str())
                    .bind(webhook.sealed.wrapped_key.as_slice())
                    .bind(webhook.sealed.ciphertext.as_slice())
                    .execute(&mut *tx)
                    .await?;
                Some(webhook.endpoint_id.as_str())
            }
            WebhookChange::Keep => None,
        };
        let detail = json!({
            "connection_id": new.connection_id,
            "key_type": new.key_type.as_str(),
            "key_last4": new.key_last4,
            "same_key": previous.as_ref().map(|(_, _, fp)| *fp == new.key_fingerprint),
            "status": new.status,
            "permissions": new.permissions,
            "master_key_id": new.sealed.master_key_id,
            "webhook_endpoint_id": new_endpoint,
        });
        let action = match previous {
            Some(_) => "connection.replaced",
            None => "connection.created",
        };
        audit(&mut *tx, now, actor, action, Some(&new.tenant_id), detail).await?;
        let record = find_connection(&mut *tx, &new.tenant_id)
            .await?
            .ok_or_else(|| {
                StoreError::Corrupt("connection vanished in its own transaction".into())
            })?;
        notifications::announce_saved::<DB>(&mut tx, &record, previous.is_some()).await?;
        tx.commit().await?;
        Ok(match previous {
            Some(_) => SaveOutcome::Replaced(record),
            None => SaveOutcome::Created(record),
        })
    }

    async fn record_verification(
        &self,
        tenant: &TenantId,
        secret_id: &str,
        verification: &Verification,
        actor: &Actor,
    ) -> Result<Option<ConnectionRecord>, StoreError> {
        let now = now();
        let mut tx = self.pool.begin().await?;
        let verified: Option<String> = sqlx::query_scalar(queries::RECORD_VERIFICATION)
            .bind(tenant.as_str())
            .bind(secret_id)
            .bind(verification.status.as_str())
            .bind(permissions_to_text(&verification.permissions))
            .bind(verification.verified_at)
            .bind(now)
            .bind(verification.next_verify_at)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(connection_id) = verified else {
            return Ok(None);
        };
        let detail = json!({
            "connection_id": connection_id,
            "status": verification.status,
            "permissions": verification.permissions,
        });
        audit(
            &mut *tx,
            now,
            actor,
            "connection.verified",
            Some(tenant),
            detail,
        )
        .await?;
        let record = find_connection(&mut *tx, tenant).await?;
        notifications::announce_verified::<DB>(&mut tx, record.as_ref()).await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn claim_due_connections(
        &self,
        owner: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<TenantId>, StoreError> {
        let [head, tail] = queries::CLAIM_DUE;
        let statement = [head, DB::SKIP_LOCKED, tail].concat();
        let claimed: Vec<String> = sqlx::query_scalar(&statement)
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        claimed.iter().map(|t| rows::parse_tenant_id(t)).collect()
    }

    async fn release_connection(
        &self,
        tenant: &TenantId,
        owner: &str,
        next_verify_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query(queries::RELEASE_CONNECTION)
            .bind(tenant.as_str())
            .bind(owner)
            .bind(next_verify_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn mark_due_lacking(
        &self,
        required: &[Resource],
        now: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        let mut marked = 0;
        for resource in required {
            let result = sqlx::query(queries::MARK_DUE_LACKING)
                .bind(now)
                .bind(format!("%\"{}\"%", resource.as_str()))
                .execute(&self.pool)
                .await?;
            marked += DB::rows_affected(&result);
        }
        Ok(marked)
    }

    async fn count_connections_by_status(
        &self,
    ) -> Result<Vec<(ConnectionStatus, u64)>, StoreError> {
        let counts: Vec<(String, i64)> = sqlx::query_as(queries::COUNT_CONNECTIONS_BY_STATUS)
            .fetch_all(&self.pool)
            .await?;
        (counts.into_iter())
            .map(|(status, n)| {
                let status = ConnectionStatus::parse(&status)
                    .ok_or_else(|| StoreError::Corrupt("status".into()))?;
                Ok((status, n.max(0) as u64))
            })
            .collect()
    }

    async fn count_secrets_by_master_key(&self) -> Result<Vec<(MasterKeyId, u64)>, StoreError> {
        let counts: Vec<(String, i64)> = sqlx::query_as(queries::COUNT_SECRETS_BY_MASTER_KEY)
            .fetch_all(&self.pool)
            .await?;
        (counts.into_iter())
            .map(|(id, n)| {
                let id = MasterKeyId::parse(&id)
                    .map_err(|_| StoreError::Corrupt("master_key_id".into()))?;
                Ok((id, n.max(0) as u64))
            })
            .collect()
    }

    async fn secrets_to_rewrap(
        &self,
        purpose: Purpose,
        active: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<SealedRow>, StoreError> {
        let statement = match purpose {
            Purpose::StripeApiKey => queries::API_KEYS_TO_REWRAP,
            Purpose::WebhookSigningSecret => queries::WEBHOOK_SECRETS_TO_REWRAP,
        };
        let rows: Vec<SealedRowRaw> = sqlx::query_as(statement)
            .bind(active)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(|row| row.into_row(purpose)).collect()
    }

    async fn replace_wrapped_keys(
        &self,
        purpose: Purpose,
        rows: &[RewrappedRow],
    ) -> Result<u64, StoreError> {
        DB::replace_wrapped_keys(&self.pool, purpose, rows).await
    }

    async fn find_webhook_target(
        &self,
        connection_id: &str,
    ) -> Result<Option<WebhookTarget>, StoreError> {
        let row: Option<WebhookTargetRow> = sqlx::query_as(queries::FIND_WEBHOOK_TARGET)
            .bind(connection_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn insert_webhook_event(
        &self,
        tenant: &TenantId,
        connection_id: &str,
        event: &NewEvent,
    ) -> Result<bool, StoreError> {
        // Redeliveries are the common duplicate: answer them with one read.
        let seen: i64 = sqlx::query_scalar(queries::EVENT_SEEN)
            .bind(connection_id)
            .bind(event.event_id.as_str())
            .fetch_one(&self.pool)
            .await?;
        if seen > 0 {
            return Ok(false);
        }
        DB::insert_event_in_feed_order(&self.pool, tenant, connection_id, event).await
    }

    async fn list_events(
        &self,
        tenant: &TenantId,
        after: EventCursor,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let [head, tail] = queries::LIST_EVENTS;
        let statement = [head, DB::FEED_HORIZON, tail].concat();
        Ok(sqlx::query_as(&statement)
            .bind(tenant.as_str())
            .bind(after.txid)
            .bind(after.seq)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn delete_connection(
        &self,
        tenant: &TenantId,
        endpoint_id: Option<&str>,
        actor: &Actor,
    ) -> Result<bool, StoreError> {
        let now = now();
        let mut tx = self.pool.begin().await?;
        let deleted: Option<(String, String)> = sqlx::query_as(queries::DELETE_CONNECTION)
            .bind(tenant.as_str())
            .bind(endpoint_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some((connection_id, key_last4)) = deleted else {
            return Ok(false);
        };
        let detail = json!({"connection_id": connection_id, "key_last4": key_last4});
        audit(
            &mut *tx,
            now,
            actor,
            "connection.deleted",
            Some(tenant),
            detail,
        )
        .await?;
        notifications::announce_disconnected::<DB>(&mut tx, tenant, &connection_id, &key_last4)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn list_connections(
        &self,
        status: Option<ConnectionStatus>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<ConnectionRecord>, StoreError> {
        let rows: Vec<ConnectionRow> = sqlx::query_as(queries::LIST_CONNECTIONS)
            .bind(status.map(ConnectionStatus::as_str))
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn fetch_key(
        &self,
        token_id: &str,
        tenant: &TenantId,
    ) -> Result<Option<KeyFetch>, StoreError> {
        let row: Option<KeyFetchRow> = sqlx::query_as(queries::FETCH_KEY)
            .bind(token_id)
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn record_usage(
        &self,
        key_fetches: &[KeyFetchTally],
        stripe_calls: &[KeyFetchTally],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let usage = [
            (&queries::ADD_KEY_FETCHES, key_fetches),
            (&queries::ADD_STRIPE_CALLS, stripe_calls),
        ];
        for (statements, tallies) in usage {
            if !tallies.is_empty() {
                DB::add_tallies(&mut tx, statements, tallies).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn find_api_key(&self, tenant: &TenantId) -> Result<Option<FetchedKey>, StoreError> {
        let row: Option<ApiKeyRow> = sqlx::query_as(queries::FIND_API_KEY)
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn stripe_calls(&self, tenant: &TenantId) -> Result<Vec<KeyFetchTally>, StoreError> {
        let rows: Vec<KeyFetchTallyRow> = sqlx::query_as(queries::STRIPE_CALLS)
            .bind(tenant.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn mark_due_now(&self, tenant: &TenantId) -> Result<(), StoreError> {
        sqlx::query(queries::MARK_DUE_NOW)
            .bind(tenant.as_str())
            .bind(now())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn key_fetches(&self, tenant: &TenantId) -> Result<Vec<KeyFetchTally>, StoreError> {
        let rows: Vec<KeyFetchTallyRow> = sqlx::query_as(queries::KEY_FETCHES)
            .bind(tenant.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn take_attempt(
        &self,
        tenant: &TenantId,
        kind: &str,
        quota: AttemptQuota,
    ) -> Result<Option<Duration>, StoreError> {
        let period = i64::try_from(quota.period.as_micros()).unwrap_or(i64::MAX);
        let interval = period / i64::from(quota.per_period.get());
        let now = crate::clock::now();
        let now = i64::try_from(now.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX);
        let allowed: Option<i64> = sqlx::query_scalar(queries::TAKE_ATTEMPT)
            .bind(tenant.as_str())
            .bind(kind)
            .bind(now)
            .bind(interval)
            .bind(period)
            .fetch_optional(&self.pool)
            .await?;
        if allowed.is_some() {
            return Ok(None);
        }
        let tat: Option<i64> = sqlx::query_scalar(queries::ATTEMPT_TAT)
            .bind(tenant.as_str())
            .bind(kind)
            .fetch_optional(&self.pool)
            .await?;
        // Allowed again once the next attempt's arrival time fits in the period.
        let wait = tat.map_or(0, |tat| tat + interval - period - now).max(1);
        Ok(Some(Duration::from_micros(wait as u64)))
    }

    async fn audit_trail(&self, tenant: Option<&TenantId>) -> Result<Vec<AuditRecord>, StoreError> {
        let rows: Vec<AuditRow> = sqlx::query_as(queries::AUDIT_TRAIL)
            .bind(tenant.map(TenantId::as_str))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }
}

/// The tenant's connection, read through the pool or inside a transaction.
async fn find_connection<'e, DB, E>(
    executor: E,
    tenant: &TenantId,
) -> Result<Option<ConnectionRecord>, StoreError>
where
    DB: Database,
    E: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'r> ConnectionRow: FromRow<'r, DB::Row>,
{
    let row: Option<ConnectionRow> = sqlx::query_as(queries::FIND_CONNECTION)
        .bind(tenant.as_str())
        .fetch_optional(executor)
        .await?;
    row.map(TryInto::try_into).transpose()
}

/// Appends to the audit trail, in the transaction of the change it records.
async fn audit<'e, DB, E>(
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
