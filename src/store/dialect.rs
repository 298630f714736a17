//! Where PostgreSQL and SQLite differ, each difference named once. Everything else is the
//! one generic implementation: `sql_store.rs` and the aggregates' files it hands calls to.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::{Database, Pool};

use super::events::{EventRef, Inserted};
use super::model::{KeyFetchTally, RewrappedRow};
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

    /// Inserts a batch of verified deliveries in one transaction, so that feed order
    /// follows commit order; for each, what became of it. Either all of the batch is
    /// committed or none of it.
    async fn insert_events_in_feed_order(
        pool: &Pool<Self>,
        rows: &[EventRef<'_>],
    ) -> Result<Vec<Inserted>, StoreError>;
}
