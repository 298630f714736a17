//! Usage tallies (key fetches and proxied Stripe calls) and the per-tenant attempt limits
//! (a GCRA kept in the database so every instance shares it).

use std::time::Duration;

use sqlx::{Encode, Executor, FromRow, IntoArguments, Type};

use super::dialect::Dialect;
use super::model::KeyFetchTally;
use super::rows::KeyFetchTallyRow;
use super::sql_store::SqlStore;
use super::{queries, AttemptQuota, StoreError};
use crate::domain::TenantId;

impl<DB: Dialect> SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> KeyFetchTallyRow: FromRow<'r, DB::Row>,
{
    pub(super) async fn record_usage(
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

    pub(super) async fn key_fetches(
        &self,
        tenant: &TenantId,
    ) -> Result<Vec<KeyFetchTally>, StoreError> {
        let rows: Vec<KeyFetchTallyRow> = sqlx::query_as(queries::KEY_FETCHES)
            .bind(tenant.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    pub(super) async fn stripe_calls(
        &self,
        tenant: &TenantId,
    ) -> Result<Vec<KeyFetchTally>, StoreError> {
        let rows: Vec<KeyFetchTallyRow> = sqlx::query_as(queries::STRIPE_CALLS)
            .bind(tenant.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    pub(super) async fn take_attempt(
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
}
