//! Tenants and service tokens: creating a tenant or changing its mode, and issuing,
//! reading and revoking the tokens other services present.

use serde_json::json;
use sqlx::{Encode, Executor, FromRow, IntoArguments, Type};
use time::OffsetDateTime;

use super::dialect::Dialect;
use super::model::{Actor, NewServiceToken, ServiceTokenRecord, TenantRecord, TenantWrite};
use super::rows::{ServiceTokenRow, TenantRow};
use super::sql_store::{audit, SqlStore};
use super::{queries, StoreError};
use crate::clock::now;
use crate::domain::{Mode, TenantId};

impl<DB: Dialect> SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> OffsetDateTime: Encode<'q, DB> + Type<DB>,
    for<'r> (String,): FromRow<'r, DB::Row>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> TenantRow: FromRow<'r, DB::Row>,
    for<'r> ServiceTokenRow: FromRow<'r, DB::Row>,
{
    pub(super) async fn upsert_tenant(
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

    pub(super) async fn find_tenant(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<TenantRecord>, StoreError> {
        let row: Option<TenantRow> = sqlx::query_as(queries::FIND_TENANT)
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(TryInto::try_into).transpose()
    }

    pub(super) async fn insert_service_token(
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

    pub(super) async fn find_service_token(
        &self,
        id: &str,
    ) -> Result<Option<ServiceTokenRecord>, StoreError> {
        let row: Option<ServiceTokenRow> = sqlx::query_as(queries::FIND_SERVICE_TOKEN)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(TryInto::try_into).transpose()
    }

    pub(super) async fn list_service_tokens(&self) -> Result<Vec<ServiceTokenRecord>, StoreError> {
        let rows: Vec<ServiceTokenRow> = sqlx::query_as(queries::LIST_SERVICE_TOKENS)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    pub(super) async fn revoke_service_token(
        &self,
        id: &str,
        actor: &Actor,
    ) -> Result<bool, StoreError> {
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
}
