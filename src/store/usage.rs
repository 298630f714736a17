//! Usage tallies (key fetches and proxied Stripe calls) and the per-tenant attempt limits
//! (a GCRA kept in the database so every instance shares it).

use std::time::Duration;

use sqlx::{Encode, Executor, FromRow, IntoArguments, Type};
use time::OffsetDateTime;

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
    for<'q> OffsetDateTime: Encode<'q, DB> + Type<DB>,
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
        let period = micros(quota.period);
        let interval = period / i64::from(quota.per_period.get());
        self.take_gcra(tenant.as_str(), kind, interval, period)
            .await
    }

    /// A fleet-wide budget is a GCRA row like a tenant's attempt limit, under a key no
    /// tenant id can take. Its period is one cost: a slice is taken only once the last one's
    /// time has passed, so the budget never runs ahead of its rate.
    pub(super) async fn take_budget(
        &self,
        name: &str,
        cost: Duration,
    ) -> Result<Option<Duration>, StoreError> {
        let cost = micros(cost).max(1);
        self.take_gcra(BUDGET_KEY, name, cost, cost).await
    }

    /// Takes one emission `interval` under a limit that `period` fills (microseconds);
    /// `None` when allowed, else how long until it would be.
    async fn take_gcra(
        &self,
        key: &str,
        kind: &str,
        interval: i64,
        period: i64,
    ) -> Result<Option<Duration>, StoreError> {
        let now = crate::clock::now();
        let now = i64::try_from(now.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX);
        let allowed: Option<i64> = sqlx::query_scalar(queries::TAKE_ATTEMPT)
            .bind(key)
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
            .bind(key)
            .bind(kind)
            .fetch_optional(&self.pool)
            .await?;
        // Allowed again once the next attempt's arrival time fits in the period.
        let wait = tat.map_or(0, |tat| tat + interval - period - now).max(1);
        Ok(Some(Duration::from_micros(wait as u64)))
    }

    pub(super) async fn delete_old_tallies(
        &self,
        table: Retained,
        before: OffsetDateTime,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let [head, tail] = match table {
            Retained::StripeCalls => queries::DELETE_OLD_STRIPE_CALLS,
            _ => queries::DELETE_OLD_KEY_FETCHES,
        };
        let statement = [head, DB::SKIP_LOCKED, tail].concat();
        let deleted = sqlx::query(&statement)
            .bind(before)
            .bind(limit)
            .execute(&self.pool)
            .await?;
        Ok(DB::rows_affected(&deleted))
    }
}

/// The tenant-id column of the budget rows: `*` is in no tenant id.
const BUDGET_KEY: &str = "*";

/// What is deleted once older than its retention (`crate::retention`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retained {
    /// Delivered announcements to Atlas, by delivery time.
    Announcements,
    /// The event feed, by when each event was received.
    Events,
    /// Key-fetch tallies, by minute.
    KeyFetches,
    /// Proxied-call tallies, by minute.
    StripeCalls,
}

impl Retained {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Announcements => "announcements",
            Self::Events => "events",
            Self::KeyFetches => "key_fetches",
            Self::StripeCalls => "stripe_calls",
        }
    }
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
