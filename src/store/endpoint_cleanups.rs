//! Webhook endpoints of ours that may outlive their connection on Stripe, each kept with a
//! sealed API key that can still delete it: written before a connect registers one (dropped
//! once the connection holding it commits), or with the deletion of a connection whose
//! endpoint Stripe would not delete then. A sweep settles them (`connection/webhook_endpoint.rs`).

use sqlx::{Encode, Executor, FromRow, IntoArguments, Type};
use time::OffsetDateTime;

use super::dialect::Dialect;
use super::model::SealedRow;
use super::rows::SealedRowRaw;
use super::sql_store::SqlStore;
use super::StoreError;
use crate::crypto::{Purpose, SealedSecret};
use crate::domain::{Mode, TenantId};

/// Copies a connection's sealed key for its endpoint, under the same compare-and-swap as
/// the deletion that follows in the same transaction (`$3`: the row's id, `$4`: due).
pub(super) const KEEP: &str = "INSERT INTO endpoint_cleanups (cleanup_id, tenant_id, \
    connection_id, mode, api_key_secret_id, master_key_id, wrapped_key, ciphertext, due_at) \
    SELECT $3, tenant_id, connection_id, mode, api_key_secret_id, master_key_id, \
    wrapped_key, ciphertext, $4 FROM stripe_connections \
    WHERE tenant_id = $1 AND webhook_endpoint_id = $2 ON CONFLICT DO NOTHING";

/// A connect's intent: due, and in flight, until `$9`.
const INSERT: &str = "INSERT INTO endpoint_cleanups (cleanup_id, tenant_id, connection_id, \
    mode, api_key_secret_id, master_key_id, wrapped_key, ciphertext, due_at, in_flight_until) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)";

/// Another connect of connection `$1` than row `$2` may still be under way at `$3`.
const IN_FLIGHT: &str = "SELECT COUNT(*) FROM endpoint_cleanups WHERE connection_id = $1 \
    AND cleanup_id <> $2 AND in_flight_until > $3";

/// Takes due rows by moving their next try to `$2` (the lease: a process that dies holding
/// one leaves it due again then); `Dialect::SKIP_LOCKED` goes between the two halves.
const CLAIM: [&str; 2] = [
    "UPDATE endpoint_cleanups SET due_at = $2 WHERE due_at <= $1 AND cleanup_id IN \
     (SELECT cleanup_id FROM endpoint_cleanups WHERE due_at <= $1 ORDER BY due_at LIMIT $3",
    ") RETURNING cleanup_id, connection_id, tenant_id, mode, api_key_secret_id AS secret_id, \
     master_key_id, wrapped_key, ciphertext",
];

const FINISH: &str = "DELETE FROM endpoint_cleanups WHERE cleanup_id = $1";

/// A connect about to register an endpoint for `connection_id`, with the key sealed for it.
#[derive(Debug)]
pub struct EndpointIntent {
    pub cleanup_id: String,
    pub tenant_id: TenantId,
    pub connection_id: String,
    pub mode: Mode,
    pub secret_id: String,
    pub sealed: SealedSecret,
    /// When the connect has surely ended: only then may a sweep take it.
    pub due_at: OffsetDateTime,
}

/// Endpoints for a connection that may have outlived it, with the key that can delete them.
#[derive(Debug)]
pub struct EndpointCleanup {
    pub cleanup_id: String,
    /// The endpoints' URL names it.
    pub connection_id: String,
    pub key: SealedRow,
}

#[derive(FromRow)]
pub struct EndpointCleanupRow {
    cleanup_id: String,
    connection_id: String,
    #[sqlx(flatten)]
    key: SealedRowRaw,
}

impl<DB: Dialect> SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> OffsetDateTime: Encode<'q, DB> + Type<DB>,
    for<'r> EndpointCleanupRow: FromRow<'r, DB::Row>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
{
    pub(super) async fn record_endpoint_intent(
        &self,
        intent: &EndpointIntent,
    ) -> Result<(), StoreError> {
        sqlx::query(INSERT)
            .bind(intent.cleanup_id.as_str())
            .bind(intent.tenant_id.as_str())
            .bind(intent.connection_id.as_str())
            .bind(intent.mode.as_str())
            .bind(intent.secret_id.as_str())
            .bind(intent.sealed.master_key_id.as_str())
            .bind(intent.sealed.wrapped_key.as_slice())
            .bind(intent.sealed.ciphertext.as_slice())
            .bind(intent.due_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) async fn claim_endpoint_cleanups(
        &self,
        now: OffsetDateTime,
        next_try: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<EndpointCleanup>, StoreError> {
        let [head, tail] = CLAIM;
        let statement = [head, DB::SKIP_LOCKED, tail].concat();
        let rows: Vec<EndpointCleanupRow> = sqlx::query_as(&statement)
            .bind(now)
            .bind(next_try)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| {
                Ok(EndpointCleanup {
                    cleanup_id: row.cleanup_id,
                    connection_id: row.connection_id,
                    key: row.key.into_row(Purpose::StripeApiKey)?,
                })
            })
            .collect()
    }

    pub(super) async fn endpoint_connect_in_flight(
        &self,
        connection_id: &str,
        except_cleanup_id: &str,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let (count,): (i64,) = sqlx::query_as(IN_FLIGHT)
            .bind(connection_id)
            .bind(except_cleanup_id)
            .bind(now)
            .fetch_one(&self.pool)
            .await?;
        Ok(count > 0)
    }

    pub(super) async fn finish_endpoint_cleanup(&self, cleanup_id: &str) -> Result<(), StoreError> {
        sqlx::query(FINISH)
            .bind(cleanup_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
