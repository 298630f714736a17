//! Webhook endpoints of ours left on Stripe by a disconnect that could not delete them
//! (Stripe gave no conclusive answer then): the connection's sealed API key is kept, in the
//! transaction that deletes the connection, until a later try deletes the endpoint.

use sqlx::{Encode, Executor, FromRow, IntoArguments, Type};
use time::OffsetDateTime;

use super::dialect::Dialect;
use super::model::SealedRow;
use super::rows::SealedRowRaw;
use super::sql_store::SqlStore;
use super::StoreError;
use crate::crypto::Purpose;

/// Copies the connection's sealed key beside its endpoint, under the same compare-and-swap
/// as the deletion that follows in the same transaction (`$3`: the first try).
pub(super) const KEEP: &str =
    "INSERT INTO endpoint_cleanups (endpoint_id, tenant_id, connection_id, \
    mode, api_key_secret_id, master_key_id, wrapped_key, ciphertext, due_at) \
    SELECT webhook_endpoint_id, tenant_id, connection_id, mode, api_key_secret_id, \
    master_key_id, wrapped_key, ciphertext, $3 FROM stripe_connections \
    WHERE tenant_id = $1 AND webhook_endpoint_id = $2 ON CONFLICT DO NOTHING";

/// Takes due rows by moving their next try to `$2` (the lease: a process that dies holding
/// one leaves it due again then); `Dialect::SKIP_LOCKED` goes between the two halves.
const CLAIM: [&str; 2] = [
    "UPDATE endpoint_cleanups SET due_at = $2 WHERE due_at <= $1 AND endpoint_id IN \
     (SELECT endpoint_id FROM endpoint_cleanups WHERE due_at <= $1 ORDER BY due_at LIMIT $3",
    ") RETURNING endpoint_id, connection_id, tenant_id, mode, api_key_secret_id AS secret_id, \
     master_key_id, wrapped_key, ciphertext",
];

const FINISH: &str = "DELETE FROM endpoint_cleanups WHERE endpoint_id = $1";

/// An endpoint to delete from Stripe, with the key that may delete it.
#[derive(Debug)]
pub struct EndpointCleanup {
    pub endpoint_id: String,
    /// The deleted connection the endpoint served (its URL names it).
    pub connection_id: String,
    pub key: SealedRow,
}

#[derive(FromRow)]
pub struct EndpointCleanupRow {
    endpoint_id: String,
    connection_id: String,
    #[sqlx(flatten)]
    key: SealedRowRaw,
}

impl<DB: Dialect> SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> OffsetDateTime: Encode<'q, DB> + Type<DB>,
    for<'r> EndpointCleanupRow: FromRow<'r, DB::Row>,
{
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
                    endpoint_id: row.endpoint_id,
                    connection_id: row.connection_id,
                    key: row.key.into_row(Purpose::StripeApiKey)?,
                })
            })
            .collect()
    }

    pub(super) async fn finish_endpoint_cleanup(
        &self,
        endpoint_id: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(FINISH)
            .bind(endpoint_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
