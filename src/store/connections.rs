//! Stripe connections: connect, replace, re-verify and disconnect; the leases of the
//! re-verification loop; the key reads of the key fetch and the proxy; and rewrapping the
//! sealed secrets under a new master key.

use serde_json::json;
use sqlx::{Encode, Executor, FromRow, IntoArguments, Type};
use time::OffsetDateTime;

use super::dialect::Dialect;
use super::model::{
    Actor, ConnectionRecord, FetchedKey, KeyFetch, NewConnection, RewrappedRow, SaveOutcome,
    SealedPair, SealedRow, StoredState, Verification, WebhookChange,
};
use super::rows::{
    self, permissions_to_text, warnings_to_text, ApiKeyRow, ConnectionRow, KeyFetchRow,
    SealedPairRaw, SealedRowRaw,
};
use super::sql_store::{audit, SqlStore};
use super::{endpoint_cleanups, notifications, queries, StoreError};
use crate::clock::now;
use crate::crypto::{MasterKeyId, Purpose};
use crate::domain::{ConnectionStatus, Resource, TenantId};

impl<DB: Dialect> SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> OffsetDateTime: Encode<'q, DB> + Type<DB>,
    for<'r> (String,): FromRow<'r, DB::Row>,
    for<'r> (String, i64): FromRow<'r, DB::Row>,
    for<'r> (String, String, i64): FromRow<'r, DB::Row>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> (String, String): FromRow<'r, DB::Row>,
    for<'r> (String, Option<String>, Vec<u8>): FromRow<'r, DB::Row>,
    for<'r> ConnectionRow: FromRow<'r, DB::Row>,
    for<'r> SealedRowRaw: FromRow<'r, DB::Row>,
    for<'r> SealedPairRaw: FromRow<'r, DB::Row>,
    for<'r> KeyFetchRow: FromRow<'r, DB::Row>,
    for<'r> ApiKeyRow: FromRow<'r, DB::Row>,
{
    pub(super) async fn find_connection(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<ConnectionRecord>, StoreError> {
        Self::read_connection(&self.pool, tenant).await
    }

    pub(super) async fn save_connection(
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
        let written = sqlx::query(statement)
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
        // A disconnect takes no tenant lock: one that committed since the read above leaves
        // the update nothing to update, and this save is the loser (it was a 500 "vanished
        // in its own transaction"; found by scripts/chaos).
        if DB::rows_affected(&written) != 1 {
            return Err(StoreError::Conflict);
        }
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
        // The cursor exists from the connection's first commit on: reads never write it, and
        // the recovery worker never looks for connections without one.
        sqlx::query(queries::INSERT_RECOVERY_CURSOR)
            .bind(new.connection_id.as_str())
            .bind(tenant)
            .bind(new.mode.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let action = match previous {
            Some(_) => "connection.replaced",
            None => "connection.created",
        };
        audit(&mut *tx, now, actor, action, Some(&new.tenant_id), detail).await?;
        let record = Self::read_connection(&mut *tx, &new.tenant_id)
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

    pub(super) async fn record_verification(
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
        let record = Self::read_connection(&mut *tx, tenant).await?;
        notifications::announce_verified::<DB>(&mut tx, record.as_ref()).await?;
        tx.commit().await?;
        Ok(record)
    }

    pub(super) async fn delete_connection(
        &self,
        tenant: &TenantId,
        endpoint_id: Option<&str>,
        actor: &Actor,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !(self.delete_connection_in(&mut tx, tenant, endpoint_id, actor)).await? {
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Deletes the connection like `delete_connection`, keeping its sealed key for a later
    /// deletion of `endpoint_id` in the same transaction (row `cleanup_id`, due at `due_at`).
    pub(super) async fn delete_connection_leaving_endpoint(
        &self,
        tenant: &TenantId,
        endpoint_id: &str,
        cleanup_id: &str,
        due_at: OffsetDateTime,
        actor: &Actor,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(endpoint_cleanups::KEEP)
            .bind(tenant.as_str())
            .bind(endpoint_id)
            .bind(cleanup_id)
            .bind(due_at)
            .execute(&mut *tx)
            .await?;
        // Rolled back with the copy when the connection moved on meanwhile.
        if !(self.delete_connection_in(&mut tx, tenant, Some(endpoint_id), actor)).await? {
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    /// The deletion, its audit line and its announcement, in the caller's transaction.
    async fn delete_connection_in(
        &self,
        tx: &mut sqlx::Transaction<'_, DB>,
        tenant: &TenantId,
        endpoint_id: Option<&str>,
        actor: &Actor,
    ) -> Result<bool, StoreError> {
        let deleted: Option<(String, String)> = sqlx::query_as(queries::DELETE_CONNECTION)
            .bind(tenant.as_str())
            .bind(endpoint_id)
            .fetch_optional(&mut **tx)
            .await?;
        let Some((connection_id, key_last4)) = deleted else {
            return Ok(false);
        };
        sqlx::query(queries::DELETE_RECOVERY_CURSOR)
            .bind(connection_id.as_str())
            .execute(&mut **tx)
            .await?;
        let detail = json!({"connection_id": connection_id, "key_last4": key_last4});
        audit(
            &mut **tx,
            now(),
            actor,
            "connection.deleted",
            Some(tenant),
            detail,
        )
        .await?;
        notifications::announce_disconnected::<DB>(&mut **tx, tenant, &connection_id, &key_last4)
            .await?;
        Ok(true)
    }

    pub(super) async fn list_connections(
        &self,
        status: Option<ConnectionStatus>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<ConnectionRecord>, StoreError> {
        let rows: Vec<ConnectionRow> = match status {
            None => sqlx::query_as(queries::LIST_CONNECTIONS)
                .bind(after)
                .bind(limit),
            Some(status) => sqlx::query_as(queries::LIST_CONNECTIONS_OF_STATUS)
                .bind(status.as_str())
                .bind(after)
                .bind(limit),
        }
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    pub(super) async fn fetch_key(
        &self,
        token_id: &str,
        tenant: &TenantId,
    ) -> Result<Option<KeyFetch>, StoreError> {
        let query = sqlx::query_as(queries::FETCH_KEY)
            .bind(token_id)
            .bind(tenant.as_str());
        let row: Option<KeyFetchRow> = self.lane.fetch_optional(&self.pool, query).await?;
        row.map(TryInto::try_into).transpose()
    }

    pub(super) async fn find_api_key(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<FetchedKey>, StoreError> {
        let query = sqlx::query_as(queries::FIND_API_KEY).bind(tenant.as_str());
        let row: Option<ApiKeyRow> = self.lane.fetch_optional(&self.pool, query).await?;
        row.map(TryInto::try_into).transpose()
    }

    pub(super) async fn claim_due_connections(
        &self,
        owner: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<TenantId>, StoreError> {
        let statement = DB::claim(queries::CLAIM_DUE);
        let claimed: Vec<String> = sqlx::query_scalar(&statement)
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        claimed.iter().map(|t| rows::parse_tenant_id(t)).collect()
    }

    pub(super) async fn release_connection(
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

    /// Marks due only for the resources added to `required` since the last call (every one
    /// on the first): a start-up with the same required set reads no connection.
    pub(super) async fn mark_due_lacking(
        &self,
        required: &[Resource],
        now: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let applied: Option<String> = sqlx::query_scalar(queries::VERIFY_REQUIREMENTS)
            .fetch_optional(&mut *tx)
            .await?;
        let applied: Option<Vec<&str>> = applied.as_deref().map(|a| a.split(',').collect());
        let mut marked = 0;
        for resource in required {
            if applied
                .as_ref()
                .is_some_and(|applied| applied.contains(&resource.as_str()))
            {
                continue;
            }
            let result = sqlx::query(queries::MARK_DUE_LACKING)
                .bind(now)
                .bind(format!("%\"{}\"%", resource.as_str()))
                .execute(&mut *tx)
                .await?;
            marked += DB::rows_affected(&result);
        }
        let names: Vec<&str> = required.iter().map(|r| r.as_str()).collect();
        sqlx::query(queries::SET_VERIFY_REQUIREMENTS)
            .bind(names.join(","))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(marked)
    }

    pub(super) async fn mark_due_now(&self, tenant: &TenantId) -> Result<(), StoreError> {
        sqlx::query(queries::MARK_DUE_NOW)
            .bind(tenant.as_str())
            .bind(now())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) async fn count_connections_by_status(
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

    pub(super) async fn count_secrets_by_purpose(
        &self,
    ) -> Result<Vec<(Purpose, MasterKeyId, u64)>, StoreError> {
        let counts: Vec<(String, String, i64)> = sqlx::query_as(queries::COUNT_SECRETS_BY_PURPOSE)
            .fetch_all(&self.pool)
            .await?;
        (counts.into_iter())
            .map(|(purpose, id, n)| {
                let purpose = match purpose.as_str() {
                    "stripe_api_key" => Purpose::StripeApiKey,
                    "webhook_signing_secret" => Purpose::WebhookSigningSecret,
                    _ => return Err(StoreError::Corrupt("purpose".into())),
                };
                let id = MasterKeyId::parse(&id)
                    .map_err(|_| StoreError::Corrupt("master_key_id".into()))?;
                Ok((purpose, id, n.max(0) as u64))
            })
            .collect()
    }

    pub(super) async fn count_secrets_by_master_key(
        &self,
    ) -> Result<Vec<(MasterKeyId, u64)>, StoreError> {
        let mut totals: Vec<(MasterKeyId, u64)> = Vec::new();
        for (_, id, n) in self.count_secrets_by_purpose().await? {
            match totals.iter_mut().find(|(counted, _)| *counted == id) {
                Some((_, total)) => *total += n,
                None => totals.push((id, n)),
            }
        }
        totals.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        Ok(totals)
    }

    pub(super) async fn secrets_to_rewrap(
        &self,
        purpose: Purpose,
        under: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<SealedRow>, StoreError> {
        let statement = match purpose {
            Purpose::StripeApiKey => queries::API_KEYS_TO_REWRAP,
            Purpose::WebhookSigningSecret => queries::WEBHOOK_SECRETS_TO_REWRAP,
        };
        let rows: Vec<SealedRowRaw> = sqlx::query_as(statement)
            .bind(under)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(|row| row.into_row(purpose)).collect()
    }

    pub(super) async fn connections_to_rewrap(
        &self,
        under: &str,
        active: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<SealedPair>, StoreError> {
        let rows: Vec<SealedPairRaw> = sqlx::query_as(queries::CONNECTIONS_TO_REWRAP)
            .bind(under)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(|row| row.into_pair(active)).collect()
    }

    pub(super) async fn replace_wrapped_keys(
        &self,
        purpose: Purpose,
        rows: &[RewrappedRow],
    ) -> Result<u64, StoreError> {
        DB::replace_wrapped_keys(&self.pool, purpose, rows).await
    }

    /// The tenant's connection, read through the pool or inside a transaction.
    async fn read_connection<'e, E>(
        executor: E,
        tenant: &TenantId,
    ) -> Result<Option<ConnectionRecord>, StoreError>
    where
        E: Executor<'e, Database = DB>,
    {
        let row: Option<ConnectionRow> = sqlx::query_as(queries::FIND_CONNECTION)
            .bind(tenant.as_str())
            .fetch_optional(executor)
            .await?;
        row.map(TryInto::try_into).transpose()
    }
}
