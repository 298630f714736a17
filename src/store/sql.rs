//! The store's SQL, shared by both backends.
//!
//! The statements are written in the common subset of PostgreSQL and SQLite (`$n`
//! placeholders, `RETURNING`, `ON CONFLICT`), so one implementation serves both; only the
//! migrations differ. sqlx's runtime queries are typed by backend, hence a macro that
//! stamps the same `impl Store` onto each backend's pool type.
//!
//! Every multi-statement change starts with a write (`UPDATE tenants … RETURNING`), which
//! locks the tenant row in PostgreSQL and takes SQLite's write lock up front, so concurrent
//! changes to one tenant serialise instead of deadlocking.

pub(super) const CONNECTION_COLUMNS: &str = "c.tenant_id, c.connection_id, c.status, c.mode, \
    c.key_type, c.key_last4, c.key_fingerprint, c.api_key_secret_id, c.master_key_id, \
    c.wrapped_key, c.ciphertext, c.permissions, c.warnings, c.verified_at, c.connected_at, \
    c.webhook_endpoint_id, c.webhook_secret_id, c.webhook_master_key_id, c.webhook_wrapped_key, \
    c.webhook_ciphertext";

/// Sealed-secret columns per purpose, aliased alike for `SealedRowRaw`.
pub(super) fn sealed_columns(purpose: crate::crypto::Purpose) -> (&'static str, &'static str) {
    match purpose {
        crate::crypto::Purpose::StripeApiKey => (
            "SELECT tenant_id, mode, api_key_secret_id AS secret_id, master_key_id, wrapped_key, \
             ciphertext FROM stripe_connections WHERE master_key_id <> $1 AND api_key_secret_id > $2 \
             ORDER BY api_key_secret_id LIMIT $3",
            "UPDATE stripe_connections SET master_key_id = $3, wrapped_key = $4 \
             WHERE api_key_secret_id = $1 AND master_key_id = $2",
        ),
        crate::crypto::Purpose::WebhookSigningSecret => (
            "SELECT tenant_id, mode, webhook_secret_id AS secret_id, \
             webhook_master_key_id AS master_key_id, webhook_wrapped_key AS wrapped_key, \
             webhook_ciphertext AS ciphertext FROM stripe_connections \
             WHERE webhook_master_key_id <> $1 AND webhook_secret_id > $2 \
             ORDER BY webhook_secret_id LIMIT $3",
            "UPDATE stripe_connections SET webhook_master_key_id = $3, webhook_wrapped_key = $4 \
             WHERE webhook_secret_id = $1 AND webhook_master_key_id = $2",
        ),
    }
}

pub(super) const LOCK_TENANT: &str =
    "UPDATE tenants SET updated_at = updated_at WHERE tenant_id = $1 RETURNING mode";

pub(super) const INSERT_AUDIT: &str = "INSERT INTO audit_events \
    (occurred_at, actor, action, tenant_id, detail) VALUES ($1, $2, $3, $4, $5)";

/// The token and, when connected, the tenant's sealed key: the whole key fetch in one
/// round trip of two primary-key lookups.
pub(super) const FETCH_KEY: &str = "SELECT t.secret_hash, t.scopes, t.revoked_at, \
    c.status, c.mode, c.key_type, c.api_key_secret_id, c.master_key_id, c.wrapped_key, \
    c.ciphertext \
    FROM service_tokens t \
    LEFT JOIN stripe_connections c ON c.tenant_id = $2 \
    WHERE t.token_id = $1";

/// Adds a tally; `CASE` rather than `GREATEST`/`MAX` keeps it in both dialects.
pub(super) const ADD_KEY_FETCHES: &str = "INSERT INTO key_fetches \
    (token_id, tenant_id, window_start, fetch_count, last_fetched_at) VALUES ($1, $2, $3, $4, $5) \
    ON CONFLICT (tenant_id, window_start, token_id) DO UPDATE SET \
    fetch_count = key_fetches.fetch_count + excluded.fetch_count, \
    last_fetched_at = CASE WHEN excluded.last_fetched_at > key_fetches.last_fetched_at \
    THEN excluded.last_fetched_at ELSE key_fetches.last_fetched_at END";

/// The feed query; `$horizon` limits it to transactions that can no longer commit late.
macro_rules! concat_feed {
    ($horizon:literal) => {
        concat!(
            "SELECT txid, seq, connection_id, event_id, event_type, created, livemode, \
             received_at, payload FROM webhook_events \
             WHERE tenant_id = $1 AND (txid, seq) > ($2, $3)",
            $horizon,
            " ORDER BY txid, seq LIMIT $4"
        )
    };
}

pub(super) use concat_feed;

macro_rules! impl_store {
    ($store:ty, $backend:expr, $migrator:expr, $skip_locked:literal, $feed_horizon:literal) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            fn backend(&self) -> $crate::store::Backend {
                $backend
            }

            async fn migrate(&self) -> Result<(), $crate::store::StoreError> {
                $migrator.run(&self.pool).await?;
                Ok(())
            }

            async fn check_ready(&self) -> Result<(), String> {
                let applied: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM _sqlx_migrations WHERE success",
                )
                .fetch_one(&self.pool)
                .await
                .map_err(|e| format!("database: {e}"))?;
                let known = $migrator.iter().count() as i64;
                if applied < known {
                    return Err(format!("migrations: {applied} of {known} applied"));
                }
                Ok(())
            }

            async fn upsert_tenant(
                &self,
                tenant: &$crate::domain::TenantId,
                mode: $crate::domain::Mode,
                actor: &$crate::store::Actor,
            ) -> Result<$crate::store::TenantWrite, $crate::store::StoreError> {
                use $crate::store::{StoreError, TenantWrite};
                let now = $crate::store::records::now();
                // Two attempts: a concurrent create of the same tenant makes the first insert
                // a no-op, and the second attempt then updates the row it created.
                for _ in 0..2 {
                    let mut tx = self.pool.begin().await?;
                    let current: Option<String> = sqlx::query_scalar($crate::store::sql::LOCK_TENANT)
                        .bind(tenant.as_str())
                        .fetch_optional(&mut *tx)
                        .await?;
                    let outcome = match current {
                        Some(current) if current == mode.as_str() => return Ok(TenantWrite::Unchanged),
                        Some(_) => {
                            let connected: i64 = sqlx::query_scalar(
                                "SELECT COUNT(*) FROM stripe_connections WHERE tenant_id = $1",
                            )
                            .bind(tenant.as_str())
                            .fetch_one(&mut *tx)
                            .await?;
                            if connected > 0 {
                                return Err(StoreError::TenantHasConnection);
                            }
                            sqlx::query("UPDATE tenants SET mode = $2, updated_at = $3 WHERE tenant_id = $1")
                                .bind(tenant.as_str())
                                .bind(mode.as_str())
                                .bind(now)
                                .execute(&mut *tx)
                                .await?;
                            TenantWrite::Updated
                        }
                        None => {
                            let inserted = sqlx::query(
                                "INSERT INTO tenants (tenant_id, mode, created_at, updated_at) \
                                 VALUES ($1, $2, $3, $3) ON CONFLICT (tenant_id) DO NOTHING",
                            )
                            .bind(tenant.as_str())
                            .bind(mode.as_str())
                            .bind(now)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                            if inserted == 0 {
                                continue;
                            }
                            TenantWrite::Created
                        }
                    };
                    let action = match outcome {
                        TenantWrite::Created => "tenant.created",
                        _ => "tenant.mode_changed",
                    };
                    audit(&mut *tx, now, actor, action, Some(tenant.as_str()), serde_json::json!({"mode": mode})).await?;
                    tx.commit().await?;
                    return Ok(outcome);
                }
                Err(StoreError::Conflict)
            }

            async fn find_tenant(
                &self,
                tenant: &$crate::domain::TenantId,
            ) -> Result<Option<$crate::store::TenantRecord>, $crate::store::StoreError> {
                let row: Option<$crate::store::records::TenantRow> = sqlx::query_as(
                    "SELECT tenant_id, mode, created_at FROM tenants WHERE tenant_id = $1",
                )
                .bind(tenant.as_str())
                .fetch_optional(&self.pool)
                .await?;
                row.map(TryInto::try_into).transpose()
            }

            async fn insert_service_token(
                &self,
                token: &$crate::store::NewServiceToken,
                actor: &$crate::store::Actor,
            ) -> Result<(), $crate::store::StoreError> {
                let now = $crate::store::records::now();
                let scopes = $crate::auth::Scope::join(&token.scopes);
                let mut tx = self.pool.begin().await?;
                sqlx::query(
                    "INSERT INTO service_tokens (token_id, name, scopes, secret_hash, created_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&token.id)
                .bind(&token.name)
                .bind(&scopes)
                .bind(&token.hash.0[..])
                .bind(now)
                .execute(&mut *tx)
                .await?;
                let detail = serde_json::json!({"token_id": token.id, "name": token.name, "scopes": scopes});
                audit(&mut *tx, now, actor, "service_token.created", None, detail).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn find_service_token(
                &self,
                id: &str,
            ) -> Result<Option<$crate::store::ServiceTokenRecord>, $crate::store::StoreError> {
                let row: Option<$crate::store::records::ServiceTokenRow> = sqlx::query_as(
                    "SELECT token_id, name, scopes, secret_hash, created_at, revoked_at \
                     FROM service_tokens WHERE token_id = $1",
                )
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
                row.map(TryInto::try_into).transpose()
            }

            async fn list_service_tokens(
                &self,
            ) -> Result<Vec<$crate::store::ServiceTokenRecord>, $crate::store::StoreError> {
                let rows: Vec<$crate::store::records::ServiceTokenRow> = sqlx::query_as(
                    "SELECT token_id, name, scopes, secret_hash, created_at, revoked_at \
                     FROM service_tokens ORDER BY created_at, token_id",
                )
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            async fn revoke_service_token(
                &self,
                id: &str,
                actor: &$crate::store::Actor,
            ) -> Result<bool, $crate::store::StoreError> {
                let now = $crate::store::records::now();
                let mut tx = self.pool.begin().await?;
                let revoked = sqlx::query(
                    "UPDATE service_tokens SET revoked_at = $2 WHERE token_id = $1 AND revoked_at IS NULL",
                )
                .bind(id)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if revoked == 0 {
                    return Ok(false);
                }
                audit(&mut *tx, now, actor, "service_token.revoked", None, serde_json::json!({"token_id": id})).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn find_connection(
                &self,
                tenant: &$crate::domain::TenantId,
            ) -> Result<Option<$crate::store::ConnectionRecord>, $crate::store::StoreError> {
                find_connection(&self.pool, tenant).await
            }

            async fn save_connection(
                &self,
                new: &$crate::store::NewConnection,
                actor: &$crate::store::Actor,
            ) -> Result<$crate::store::SaveOutcome, $crate::store::StoreError> {
                use $crate::store::records::{now, permissions_to_text, warnings_to_text};
                use $crate::store::{SaveOutcome, StoreError};
                let now = now();
                let tenant = new.tenant_id.as_str();
                let mut tx = self.pool.begin().await?;
                let mode: Option<String> = sqlx::query_scalar($crate::store::sql::LOCK_TENANT)
                    .bind(tenant)
                    .fetch_optional(&mut *tx)
                    .await?;
                match mode.as_deref().map($crate::domain::Mode::parse) {
                    None => return Err(StoreError::TenantMissing),
                    Some(Ok(mode)) if mode == new.mode => {}
                    Some(Ok(mode)) => return Err(StoreError::ModeChanged(mode)),
                    Some(Err(_)) => return Err(StoreError::Corrupt("tenant mode".into())),
                }
                let previous: Option<(String, Vec<u8>)> = sqlx::query_as(
                    "SELECT connection_id, key_fingerprint FROM stripe_connections WHERE tenant_id = $1",
                )
                .bind(tenant)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some((stored_id, _)) = &previous {
                    if *stored_id != new.connection_id {
                        // Another first connect committed while this one probed.
                        return Err(StoreError::Conflict);
                    }
                }
                let connection_id = new.connection_id.clone();
                let statement = if previous.is_some() {
                    "UPDATE stripe_connections SET api_key_secret_id = $3, status = $4, mode = $5, \
                     key_type = $6, key_last4 = $7, key_fingerprint = $8, permissions = $9, \
                     warnings = $10, verified_at = $11, connected_at = $12, updated_at = $12, \
                     master_key_id = $13, wrapped_key = $14, ciphertext = $15, next_verify_at = $16, \
                     lease_owner = NULL, lease_until = NULL \
                     WHERE tenant_id = $1 AND connection_id = $2"
                } else {
                    "INSERT INTO stripe_connections (tenant_id, connection_id, api_key_secret_id, \
                     status, mode, key_type, key_last4, key_fingerprint, permissions, warnings, \
                     verified_at, connected_at, updated_at, master_key_id, wrapped_key, ciphertext, \
                     next_verify_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13, $14, $15, $16)"
                };
                sqlx::query(statement)
                    .bind(tenant)
                    .bind(&connection_id)
                    .bind(&new.secret_id)
                    .bind(new.status.as_str())
                    .bind(new.mode.as_str())
                    .bind(new.key_type.as_str())
                    .bind(&new.key_last4)
                    .bind(&new.key_fingerprint)
                    .bind(permissions_to_text(&new.permissions))
                    .bind(warnings_to_text(&new.warnings))
                    .bind(new.verified_at)
                    .bind(now)
                    .bind(&new.sealed.master_key_id)
                    .bind(&new.sealed.wrapped_key)
                    .bind(&new.sealed.ciphertext)
                    .bind(new.next_verify_at)
                    .execute(&mut *tx)
                    .await?;
                if let $crate::store::WebhookChange::Set(webhook) = &new.webhook {
                    sqlx::query(
                        "UPDATE stripe_connections SET webhook_endpoint_id = $2, webhook_secret_id = $3, \
                         webhook_master_key_id = $4, webhook_wrapped_key = $5, webhook_ciphertext = $6 \
                         WHERE tenant_id = $1",
                    )
                    .bind(tenant)
                    .bind(&webhook.endpoint_id)
                    .bind(&webhook.secret_id)
                    .bind(&webhook.sealed.master_key_id)
                    .bind(&webhook.sealed.wrapped_key)
                    .bind(&webhook.sealed.ciphertext)
                    .execute(&mut *tx)
                    .await?;
                }
                let same_key = previous.as_ref().map(|(_, fp)| *fp == new.key_fingerprint);
                let detail = serde_json::json!({
                    "connection_id": connection_id,
                    "key_type": new.key_type.as_str(),
                    "key_last4": new.key_last4,
                    "same_key": same_key,
                    "status": new.status,
                    "permissions": new.permissions,
                    "master_key_id": new.sealed.master_key_id,
                    "webhook_endpoint_id": match &new.webhook {
                        $crate::store::WebhookChange::Set(w) => Some(w.endpoint_id.as_str()),
                        $crate::store::WebhookChange::Keep => None,
                    },
                });
                let action = if previous.is_some() { "connection.replaced" } else { "connection.created" };
                audit(&mut *tx, now, actor, action, Some(tenant), detail).await?;
                let record = find_connection(&mut *tx, &new.tenant_id)
                    .await?
                    .ok_or_else(|| StoreError::Corrupt("connection vanished in its own transaction".into()))?;
                tx.commit().await?;
                Ok(if previous.is_some() { SaveOutcome::Replaced(record) } else { SaveOutcome::Created(record) })
            }

            async fn record_verification(
                &self,
                tenant: &$crate::domain::TenantId,
                secret_id: &str,
                verification: &$crate::store::Verification,
                actor: &$crate::store::Actor,
            ) -> Result<Option<$crate::store::ConnectionRecord>, $crate::store::StoreError> {
                let now = $crate::store::records::now();
                let mut tx = self.pool.begin().await?;
                let previous: Option<String> = sqlx::query_scalar(
                    "UPDATE stripe_connections SET status = $3, permissions = $4, verified_at = $5, \
                     updated_at = $6, next_verify_at = $7, lease_owner = NULL, lease_until = NULL \
                     WHERE tenant_id = $1 AND api_key_secret_id = $2 \
                     RETURNING connection_id",
                )
                .bind(tenant.as_str())
                .bind(secret_id)
                .bind(verification.status.as_str())
                .bind($crate::store::records::permissions_to_text(&verification.permissions))
                .bind(verification.verified_at)
                .bind(now)
                .bind(verification.next_verify_at)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(connection_id) = previous else {
                    return Ok(None);
                };
                let detail = serde_json::json!({
                    "connection_id": connection_id,
                    "status": verification.status,
                    "permissions": verification.permissions,
                });
                audit(&mut *tx, now, actor, "connection.verified", Some(tenant.as_str()), detail).await?;
                let record = find_connection(&mut *tx, tenant).await?;
                tx.commit().await?;
                Ok(record)
            }

            async fn delete_connection(
                &self,
                tenant: &$crate::domain::TenantId,
                actor: &$crate::store::Actor,
            ) -> Result<bool, $crate::store::StoreError> {
                let now = $crate::store::records::now();
                let mut tx = self.pool.begin().await?;
                let deleted: Option<(String, String)> = sqlx::query_as(
                    "DELETE FROM stripe_connections WHERE tenant_id = $1 \
                     RETURNING connection_id, key_last4",
                )
                .bind(tenant.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                let Some((connection_id, key_last4)) = deleted else {
                    return Ok(false);
                };
                let detail = serde_json::json!({"connection_id": connection_id, "key_last4": key_last4});
                audit(&mut *tx, now, actor, "connection.deleted", Some(tenant.as_str()), detail).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn list_connections(
                &self,
                status: Option<$crate::domain::ConnectionStatus>,
            ) -> Result<Vec<$crate::store::ConnectionRecord>, $crate::store::StoreError> {
                let sql = format!(
                    "SELECT {} FROM stripe_connections c \
                     WHERE ($1 IS NULL OR c.status = $1) ORDER BY c.tenant_id",
                    $crate::store::sql::CONNECTION_COLUMNS
                );
                let rows: Vec<$crate::store::records::ConnectionRow> = sqlx::query_as(&sql)
                    .bind(status.map(|s| s.as_str()))
                    .fetch_all(&self.pool)
                    .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            async fn claim_due_connections(
                &self,
                owner: &str,
                now: time::OffsetDateTime,
                lease_until: time::OffsetDateTime,
                limit: i64,
            ) -> Result<Vec<$crate::domain::TenantId>, $crate::store::StoreError> {
                let claimed: Vec<String> = sqlx::query_scalar(concat!(
                    "UPDATE stripe_connections SET lease_owner = $1, lease_until = $2 \
                     WHERE tenant_id IN (SELECT tenant_id FROM stripe_connections \
                     WHERE status <> 'revoked' AND next_verify_at <= $3 \
                     AND (lease_until IS NULL OR lease_until < $3) \
                     ORDER BY next_verify_at LIMIT $4",
                    $skip_locked,
                    ") RETURNING tenant_id"
                ))
                .bind(owner)
                .bind(lease_until)
                .bind(now)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                claimed
                    .iter()
                    .map(|t| $crate::domain::TenantId::parse(t).map_err(|_| $crate::store::StoreError::Corrupt("tenant_id".into())))
                    .collect()
            }

            async fn release_connection(
                &self,
                tenant: &$crate::domain::TenantId,
                owner: &str,
                next_verify_at: time::OffsetDateTime,
            ) -> Result<(), $crate::store::StoreError> {
                sqlx::query(
                    "UPDATE stripe_connections SET lease_owner = NULL, lease_until = NULL, \
                     next_verify_at = $3 WHERE tenant_id = $1 AND lease_owner = $2",
                )
                .bind(tenant.as_str())
                .bind(owner)
                .bind(next_verify_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn mark_due_lacking(
                &self,
                required: &[$crate::domain::Resource],
                now: time::OffsetDateTime,
            ) -> Result<u64, $crate::store::StoreError> {
                // The report is JSON text in both dialects; a required name absent from it
                // means that resource was never probed for this key.
                let mut marked = 0;
                for resource in required {
                    marked += sqlx::query(
                        "UPDATE stripe_connections SET next_verify_at = $1 \
                         WHERE status <> 'revoked' AND next_verify_at > $1 AND permissions NOT LIKE $2",
                    )
                    .bind(now)
                    .bind(format!("%\"{}\"%", resource.as_str()))
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                }
                Ok(marked)
            }

            async fn count_connections_by_status(&self) -> Result<Vec<(String, i64)>, $crate::store::StoreError> {
                Ok(sqlx::query_as("SELECT status, COUNT(*) FROM stripe_connections GROUP BY status ORDER BY status")
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn count_secrets_by_master_key(&self) -> Result<Vec<(String, i64)>, $crate::store::StoreError> {
                Ok(sqlx::query_as(
                    "SELECT id, COUNT(*) FROM (SELECT master_key_id AS id FROM stripe_connections \
                     UNION ALL SELECT webhook_master_key_id FROM stripe_connections \
                     WHERE webhook_master_key_id IS NOT NULL) sealed GROUP BY id ORDER BY id",
                )
                .fetch_all(&self.pool)
                .await?)
            }

            async fn secrets_to_rewrap(
                &self,
                purpose: $crate::crypto::Purpose,
                active: &str,
                after: &str,
                limit: i64,
            ) -> Result<Vec<$crate::store::SealedRow>, $crate::store::StoreError> {
                let rows: Vec<$crate::store::records::SealedRowRaw> =
                    sqlx::query_as($crate::store::sql::sealed_columns(purpose).0)
                        .bind(active)
                        .bind(after)
                        .bind(limit)
                        .fetch_all(&self.pool)
                        .await?;
                rows.into_iter().map(|row| row.into_row(purpose)).collect()
            }

            async fn replace_wrapped_keys(
                &self,
                purpose: $crate::crypto::Purpose,
                rows: &[$crate::store::RewrappedRow],
            ) -> Result<u64, $crate::store::StoreError> {
                // Dialect-specific: one statement per batch on PostgreSQL.
                self.replace_wrapped_keys_in_batch(purpose, rows).await
            }

            async fn find_webhook_target(
                &self,
                connection_id: &str,
            ) -> Result<Option<$crate::store::WebhookTarget>, $crate::store::StoreError> {
                let row: Option<$crate::store::records::WebhookTargetRow> = sqlx::query_as(
                    "SELECT tenant_id, mode, webhook_secret_id, webhook_master_key_id, \
                     webhook_wrapped_key, webhook_ciphertext FROM stripe_connections \
                     WHERE connection_id = $1 AND webhook_secret_id IS NOT NULL",
                )
                .bind(connection_id)
                .fetch_optional(&self.pool)
                .await?;
                row.map(TryInto::try_into).transpose()
            }

            async fn insert_webhook_event(
                &self,
                tenant: &$crate::domain::TenantId,
                connection_id: &str,
                event: &$crate::store::NewEvent,
            ) -> Result<bool, $crate::store::StoreError> {
                // Redeliveries are the common duplicate: answer them with one read.
                let seen: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM webhook_events WHERE connection_id = $1 AND event_id = $2",
                )
                .bind(connection_id)
                .bind(&event.event_id)
                .fetch_one(&self.pool)
                .await?;
                if seen > 0 {
                    return Ok(false);
                }
                // Dialect-specific: how feed order is made to follow commit order.
                self.insert_event_in_feed_order(tenant, connection_id, event).await
            }

            async fn list_events(
                &self,
                tenant: &$crate::domain::TenantId,
                after: $crate::store::EventCursor,
                limit: i64,
            ) -> Result<Vec<$crate::store::StoredEvent>, $crate::store::StoreError> {
                Ok(sqlx::query_as($crate::store::sql::concat_feed!($feed_horizon))
                    .bind(tenant.as_str())
                    .bind(after.txid)
                    .bind(after.seq)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn fetch_key(
                &self,
                token_id: &str,
                tenant: &$crate::domain::TenantId,
            ) -> Result<Option<$crate::store::KeyFetch>, $crate::store::StoreError> {
                let row: Option<$crate::store::records::KeyFetchRow> =
                    sqlx::query_as($crate::store::sql::FETCH_KEY)
                        .bind(token_id)
                        .bind(tenant.as_str())
                        .fetch_optional(&self.pool)
                        .await?;
                row.map(TryInto::try_into).transpose()
            }

            async fn record_key_fetches(
                &self,
                tallies: &[$crate::store::KeyFetchTally],
            ) -> Result<(), $crate::store::StoreError> {
                let mut tx = self.pool.begin().await?;
                for tally in tallies {
                    sqlx::query($crate::store::sql::ADD_KEY_FETCHES)
                        .bind(&tally.token_id)
                        .bind(&tally.tenant_id)
                        .bind(tally.window_start)
                        .bind(tally.fetch_count)
                        .bind(tally.last_fetched_at)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn key_fetches(
                &self,
                tenant: &$crate::domain::TenantId,
            ) -> Result<Vec<$crate::store::KeyFetchTally>, $crate::store::StoreError> {
                Ok(sqlx::query_as(
                    "SELECT token_id, tenant_id, window_start, fetch_count, last_fetched_at \
                     FROM key_fetches WHERE tenant_id = $1 ORDER BY window_start, token_id",
                )
                .bind(tenant.as_str())
                .fetch_all(&self.pool)
                .await?)
            }

            async fn audit_trail(
                &self,
                tenant: Option<&$crate::domain::TenantId>,
            ) -> Result<Vec<$crate::store::AuditRecord>, $crate::store::StoreError> {
                let rows: Vec<$crate::store::records::AuditRow> = sqlx::query_as(
                    "SELECT occurred_at, actor, action, tenant_id, detail FROM audit_events \
                     WHERE ($1 IS NULL OR tenant_id = $1) ORDER BY id",
                )
                .bind(tenant.map(|t| t.as_str()))
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(Into::into).collect())
            }
        }

        async fn find_connection<'e, E>(
            executor: E,
            tenant: &$crate::domain::TenantId,
        ) -> Result<Option<$crate::store::ConnectionRecord>, $crate::store::StoreError>
        where
            E: sqlx::Executor<'e, Database = <$store as $crate::store::sql::HasDatabase>::Db>,
        {
            let sql = format!(
                "SELECT {} FROM stripe_connections c WHERE c.tenant_id = $1",
                $crate::store::sql::CONNECTION_COLUMNS
            );
            let row: Option<$crate::store::records::ConnectionRow> = sqlx::query_as(&sql)
                .bind(tenant.as_str())
                .fetch_optional(executor)
                .await?;
            row.map(TryInto::try_into).transpose()
        }

        async fn audit<'e, E>(
            executor: E,
            at: time::OffsetDateTime,
            actor: &$crate::store::Actor,
            action: &str,
            tenant: Option<&str>,
            detail: serde_json::Value,
        ) -> Result<(), $crate::store::StoreError>
        where
            E: sqlx::Executor<'e, Database = <$store as $crate::store::sql::HasDatabase>::Db>,
        {
            sqlx::query($crate::store::sql::INSERT_AUDIT)
                .bind(at)
                .bind(actor.label())
                .bind(action)
                .bind(tenant)
                .bind(detail.to_string())
                .execute(executor)
                .await?;
            Ok(())
        }
    };
}

pub(super) use impl_store;

/// Names the sqlx database type of a store, for the shared helpers' executor bounds.
pub(super) trait HasDatabase {
    type Db: sqlx::Database;
}
