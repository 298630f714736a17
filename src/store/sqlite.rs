use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use super::sql::{impl_store, HasDatabase};
use super::{Backend, StoreError};

static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

/// The embedded default: one file, nothing to install.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn connect(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .foreign_keys(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        if let Some(dir) = options.get_filename().parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
            }
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// One UPDATE per row inside one transaction: SQLite is in-process, so a row costs no
    /// round trip.
    async fn replace_wrapped_keys_in_batch(
        &self,
        purpose: crate::crypto::Purpose,
        rows: &[super::RewrappedRow],
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut replaced = 0;
        for row in rows {
            replaced += sqlx::query(super::sql::sealed_columns(purpose).1)
                .bind(&row.secret_id)
                .bind(&row.previous_master_key_id)
                .bind(&row.sealed.master_key_id)
                .bind(&row.sealed.wrapped_key)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(replaced)
    }

    /// The per-tenant sequence is taken in the writing transaction; with one writer at a
    /// time, sequence order is commit order.
    async fn insert_event_in_feed_order(
        &self,
        tenant: &crate::domain::TenantId,
        connection_id: &str,
        event: &super::NewEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let seq: Option<i64> = sqlx::query_scalar(
            "UPDATE tenants SET event_seq = event_seq + 1 WHERE tenant_id = $1 RETURNING event_seq",
        )
        .bind(tenant.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(seq) = seq else {
            return Err(StoreError::TenantMissing);
        };
        let inserted = sqlx::query(
            "INSERT INTO webhook_events (tenant_id, txid, seq, connection_id, event_id, event_type, \
             created, livemode, received_at, payload) VALUES ($1, 0, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (connection_id, event_id) DO NOTHING",
        )
        .bind(tenant.as_str())
        .bind(seq)
        .bind(connection_id)
        .bind(&event.event_id)
        .bind(&event.event_type)
        .bind(event.created)
        .bind(event.livemode)
        .bind(super::now())
        .bind(&event.payload)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }
}

impl HasDatabase for SqliteStore {
    type Db = sqlx::Sqlite;
}

// SQLite runs one writer at a time, so the claim needs no row locks to be exclusive.
impl_store!(SqliteStore, Backend::Sqlite, MIGRATOR, "", "");
