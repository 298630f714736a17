//! Where PostgreSQL and SQLite differ, each difference named once. Everything else is the
//! one generic implementation: `sql_store.rs` and the aggregates' files it hands calls to.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::{Database, Pool};

use super::events::{EventRef, Inserted};
use super::model::{KeyFetchTally, RewrappedPair, RewrappedRow};
use super::queries::TallyStatements;
use super::recovery::EventSource;
use super::{Backend, StoreError};
use crate::crypto::Purpose;

#[async_trait]
pub trait Dialect: Database {
    const BACKEND: Backend;

    /// Appended to the claim of due connections: with several processes on PostgreSQL, a
    /// claimer skips rows another has locked instead of waiting for them. SQLite runs one
    /// writer at a time, so its claim is exclusive without it.
    const SKIP_LOCKED: &'static str;

    /// Appended to the feed query: only rows that can no longer be passed by an event
    /// committing late (see `insert_events_in_feed_order`).
    const FEED_HORIZON: &'static str;

    /// Around the subquery of a claim (the keys it leases, then updated by primary key).
    /// PostgreSQL takes the keys as an array, `= ANY(ARRAY(…))`, which it looks up in the
    /// primary key whatever it estimates; as `IN (…)`, a generic plan may hash-join them
    /// against a sequential scan of the whole table. SQLite: `IN (…)`.
    const KEYS_FROM: [&'static str; 2];

    /// A claim: `parts[0]` (the UPDATE up to the key column), the subquery `parts[1]` with
    /// `SKIP_LOCKED`, inside `KEYS_FROM`, then `parts[2]`.
    fn claim(parts: [&str; 3]) -> String {
        let [open, close] = Self::KEYS_FROM;
        [parts[0], open, parts[1], Self::SKIP_LOCKED, close, parts[2]].concat()
    }

    fn migrator() -> &'static Migrator;

    /// How many rows a statement changed (sqlx has no common trait for it).
    fn rows_affected(result: &Self::QueryResult) -> u64;

    /// Opens the pool with the backend's connection settings.
    async fn open_pool(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Pool<Self>, StoreError>;

    /// Replaces a batch of wrapped data keys; a row whose master key changed meanwhile is
    /// left alone. Returns how many rows were rewritten.
    async fn replace_wrapped_keys(
        pool: &Pool<Self>,
        purpose: Purpose,
        rows: &[RewrappedRow],
    ) -> Result<u64, StoreError>;

    /// Replaces both wrapped keys of each connection of a batch (`Store::replace_wrapped_pairs`).
    async fn replace_wrapped_pairs(
        pool: &Pool<Self>,
        rows: &[RewrappedPair],
    ) -> Result<(u64, u64), StoreError>;

    /// Adds usage tallies, inside the caller's transaction. The writer flushes thousands of
    /// (token, tenant, minute) tallies a second under load, so PostgreSQL takes them as
    /// arrays in one statement per batch rather than one round trip per tally.
    async fn add_tallies(
        conn: &mut Self::Connection,
        statements: &TallyStatements,
        tallies: &[KeyFetchTally],
    ) -> Result<(), StoreError>;

    /// Inserts events inside the caller's transaction so that feed order follows commit
    /// order; for each row, what became of it.
    async fn insert_events(
        conn: &mut Self::Connection,
        rows: &[EventRef<'_>],
        source: EventSource,
    ) -> Result<Vec<Inserted>, StoreError>;

    /// Inside the caller's transaction that wrote the outbox: wakes the deliverers. On
    /// PostgreSQL a notice every instance hears at commit; on SQLite this process's own
    /// (there is no other), at once: a deliverer's claim waits for the writer's lock, so it
    /// sees the row once the transaction commits.
    async fn outbox_written(conn: &mut Self::Connection) -> Result<(), StoreError>;

    /// Inserts a batch of verified deliveries in one transaction, so that feed order
    /// follows commit order; for each, what became of it. Either all of the batch is
    /// committed or none of it.
    async fn insert_events_in_feed_order(
        pool: &Pool<Self>,
        rows: &[EventRef<'_>],
    ) -> Result<Vec<Inserted>, StoreError>;
}
