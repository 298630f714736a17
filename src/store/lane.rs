//! The key reads' own connections (the key fetch and the proxy's key read: one row by
//! primary key, the hottest statement we run).
//!
//! sqlx checks every connection it takes back into the pool with a ping, a round trip of
//! its own (`Sync`, then waiting for `ReadyForQuery`), so a one-statement read through the
//! pool costs two round trips; a profile of the key fetch put a fifth of the service's time
//! there. The lane takes up to half the pool's connections and keeps each one after a read
//! that ran to its end, so the next read uses it at once. A read that fails, or whose
//! request is dropped half-way (the client went away), gives its connection back to the
//! pool instead, whose release check drains or closes it: a connection is only kept when
//! nothing of its last statement is outstanding. The other half of the pool is never taken,
//! so connects, workers and migrations are not starved by a flood of fetches.

use std::sync::Mutex;

use sqlx::pool::PoolConnection;
use sqlx::query::QueryAs;
use sqlx::{Database, Executor, FromRow, IntoArguments, Pool};
use tokio::sync::{Semaphore, SemaphorePermit};

pub(super) struct Lane<DB: Database> {
    idle: Mutex<Vec<PoolConnection<DB>>>,
    /// At most this many connections held by the lane (in use or idle); none when the pool
    /// is too small to share.
    permits: Semaphore,
    size: usize,
    /// How long a read waits for a lane connection, as for the pool's.
    acquire_timeout: std::time::Duration,
}

/// A lane connection in use: back to the lane with [`LaneConnection::keep`], to the pool
/// when dropped.
pub(super) struct LaneConnection<'a, DB: Database> {
    lane: &'a Lane<DB>,
    connection: Option<PoolConnection<DB>>,
    _permit: SemaphorePermit<'a>,
}

impl<DB: Database> Lane<DB> {
    /// Half of a pool of `pool_size`; none for a pool of one. A read waits at most
    /// `acquire_timeout` for a connection, then fails as the pool's would (503).
    pub(super) fn for_pool(pool_size: u32, acquire_timeout: std::time::Duration) -> Self {
        let size = usize::try_from(pool_size / 2).unwrap_or(0);
        Self {
            idle: Mutex::new(Vec::with_capacity(size)),
            permits: Semaphore::new(size),
            size,
            acquire_timeout,
        }
    }

    /// A kept connection, else one taken from `pool`; `None` when the lane has none to
    /// give (a pool too small to share): the caller reads through the pool.
    pub(super) async fn acquire<'a>(
        &'a self,
        pool: &Pool<DB>,
    ) -> Result<Option<LaneConnection<'a, DB>>, sqlx::Error> {
        if self.size == 0 {
            return Ok(None);
        }
        let permit = tokio::time::timeout(self.acquire_timeout, self.permits.acquire()).await;
        let Ok(Ok(permit)) = permit else {
            return Err(sqlx::Error::PoolTimedOut);
        };
        let kept = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let connection = match kept {
            Some(connection) => connection,
            None => pool.acquire().await?,
        };
        Ok(Some(LaneConnection {
            lane: self,
            connection: Some(connection),
            _permit: permit,
        }))
    }

    /// Runs a one-row read on a lane connection (through the pool when the lane has none).
    pub(super) async fn fetch_optional<'q, O>(
        &self,
        pool: &Pool<DB>,
        query: QueryAs<'q, DB, O, DB::Arguments<'q>>,
    ) -> Result<Option<O>, sqlx::Error>
    where
        O: Send + Unpin + for<'r> FromRow<'r, DB::Row>,
        for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
        DB::Arguments<'q>: IntoArguments<'q, DB>,
    {
        match self.acquire(pool).await? {
            Some(mut held) => {
                let row = query.fetch_optional(held.connection()).await?;
                held.keep();
                Ok(row)
            }
            None => query.fetch_optional(pool).await,
        }
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        self.idle.lock().unwrap().len()
    }
}

impl<DB: Database> LaneConnection<'_, DB> {
    pub(super) fn connection(&mut self) -> &mut DB::Connection {
        self.connection
            .as_mut()
            .expect("held until kept or dropped")
    }

    /// The read ran to its end: the connection stays in the lane for the next one.
    pub(super) fn keep(mut self) {
        if let Some(connection) = self.connection.take() {
            (self.lane.idle.lock().unwrap_or_else(|e| e.into_inner())).push(connection);
        }
    }
}

#[cfg(test)]
mod tests {
    use sqlx::sqlite::SqlitePoolOptions;
    use sqlx::Sqlite;

    use super::*;

    const WAIT: std::time::Duration = std::time::Duration::from_millis(200);

    async fn pool(size: u32) -> Pool<Sqlite> {
        SqlitePoolOptions::new()
            .max_connections(size)
            .connect("sqlite::memory:")
            .await
            .unwrap()
    }

    async fn one(lane: &Lane<Sqlite>, pool: &Pool<Sqlite>) -> i64 {
        let mut held = lane.acquire(pool).await.unwrap().expect("a lane");
        let value: i64 = sqlx::query_scalar("SELECT 7")
            .fetch_one(held.connection())
            .await
            .unwrap();
        held.keep();
        value
    }

    /// A kept connection is reused and stays out of the pool; a dropped one goes back.
    #[tokio::test]
    async fn kept_connections_stay_and_dropped_ones_go_back() {
        let pool = pool(4).await;
        let lane = Lane::for_pool(4, WAIT);
        assert_eq!(one(&lane, &pool).await, 7);
        assert_eq!(one(&lane, &pool).await, 7);
        assert_eq!(
            lane.kept(),
            1,
            "the second read reused the first's connection"
        );
        assert_eq!(pool.size() - u32::try_from(pool.num_idle()).unwrap(), 1);

        let held = lane.acquire(&pool).await.unwrap().unwrap();
        drop(held);
        assert_eq!(lane.kept(), 0, "dropped, not kept");
        tokio::task::yield_now().await;
        until(|| pool.num_idle() == usize::try_from(pool.size()).unwrap()).await;
    }

    /// Never more than half the pool: the other half stays free for everything else.
    #[tokio::test]
    async fn the_lane_takes_at_most_half_the_pool() {
        let pool = pool(4).await;
        let lane = Lane::for_pool(4, WAIT);
        let a = lane.acquire(&pool).await.unwrap().unwrap();
        let b = lane.acquire(&pool).await.unwrap().unwrap();
        let third =
            tokio::time::timeout(std::time::Duration::from_millis(100), lane.acquire(&pool));
        assert!(third.await.is_err(), "a third waits for one of the two");
        let free = pool.acquire().await.unwrap();
        drop((a, b, free));
        assert!(Lane::<Sqlite>::for_pool(1, WAIT)
            .acquire(&pool)
            .await
            .unwrap()
            .is_none());
    }

    async fn until(check: impl Fn() -> bool) {
        for _ in 0..200 {
            if check() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("the connection did not go back to the pool");
    }
}
