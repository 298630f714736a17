//! SQLite, the embedded default: one file, nothing to install.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteQueryResult,
    SqliteSynchronous,
};
use sqlx::{Sqlite, SqliteConnection, SqlitePool};

use super::dialect::Dialect;
use super::model::{KeyFetchTally, NewEvent, RewrappedRow};
use super::queries::TallyStatements;
use super::recovery::EventSource;
use super::{Backend, StoreError};
use crate::crypto::Purpose;
use crate::domain::TenantId;

static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

/// One rewrapped API key: `$1` secret id, `$2` the master key it was read under, `$3`, `$4`
/// the new wrap. A row whose master key changed meanwhile is left alone.
const REWRAP_API_KEY: &str = "UPDATE stripe_connections SET master_key_id = $3, \
    wrapped_key = $4 WHERE api_key_secret_id = $1 AND master_key_id = $2";

/// The API keys kept for an endpoint cleanup (`endpoint_cleanups`).
const REWRAP_KEPT_API_KEY: &str = "UPDATE endpoint_cleanups SET master_key_id = $3, \
    wrapped_key = $4 WHERE api_key_secret_id = $1 AND master_key_id = $2";

const REWRAP_WEBHOOK_SECRET: &str = "UPDATE stripe_connections \
    SET webhook_master_key_id = $3, webhook_wrapped_key = $4 \
    WHERE webhook_secret_id = $1 AND webhook_master_key_id = $2";

/// A per-tenant sequence taken in the writing transaction.
const NEXT_EVENT_SEQ: &str =
    "UPDATE tenants SET event_seq = event_seq + 1 WHERE tenant_id = $1 RETURNING event_seq";

const INSERT_EVENT_WITH_SEQ: &str = "INSERT INTO webhook_events (tenant_id, txid, seq, \
    connection_id, event_id, event_type, created, livemode, received_at, payload, source) \
    VALUES ($1, 0, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
    ON CONFLICT (connection_id, event_id) DO NOTHING";

#[async_trait]
impl Dialect for Sqlite {
    const BACKEND: Backend = Backend::Sqlite;
    const SKIP_LOCKED: &'static str = "";
    /// One writer at a time: every row visible is committed, in sequence order.
    const FEED_HORIZON: &'static str = "";

    fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    fn rows_affected(result: &SqliteQueryResult) -> u64 {
        result.rows_affected()
    }

    async fn open_pool(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<SqlitePool, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .foreign_keys(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        if let Some(dir) = options.get_filename().parent() {
            if !dir.as_os_str().is_empty() {
                create_owner_only_dir(dir).map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
            }
        }
        // The file holds sealed keys and webhook payloads: created owner-only before SQLite
        // opens it (SQLite would create it 0644 under the usual umask). Its -wal and -shm
        // files take the main file's mode.
        create_owner_only_file(options.get_filename())
            .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        Ok(SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .connect_with(options)
            .await?)
    }

    /// One UPDATE per row inside one transaction: SQLite is in-process, so a row costs no
    /// round trip.
    async fn replace_wrapped_keys(
        pool: &SqlitePool,
        purpose: Purpose,
        rows: &[RewrappedRow],
    ) -> Result<u64, StoreError> {
        let statements: &[&str] = match purpose {
            Purpose::StripeApiKey => &[REWRAP_API_KEY, REWRAP_KEPT_API_KEY],
            Purpose::WebhookSigningSecret => &[REWRAP_WEBHOOK_SECRET],
        };
        let mut tx = pool.begin().await?;
        let mut replaced = 0;
        for row in rows {
            for statement in statements {
                replaced += sqlx::query(statement)
                    .bind(&row.secret_id)
                    .bind(&row.previous_master_key_id)
                    .bind(&row.sealed.master_key_id)
                    .bind(&row.sealed.wrapped_key)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
        }
        tx.commit().await?;
        Ok(replaced)
    }

    /// A row at a time: the database is in this process, so a statement costs no round trip.
    async fn add_tallies(
        conn: &mut SqliteConnection,
        statements: &TallyStatements,
        tallies: &[KeyFetchTally],
    ) -> Result<(), StoreError> {
        for tally in tallies {
            sqlx::query(statements.one)
                .bind(tally.token_id.as_str())
                .bind(tally.tenant_id.as_str())
                .bind(tally.window_start)
                .bind(tally.fetch_count)
                .bind(tally.last_fetched_at)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// The per-tenant sequence is taken in the writing transaction; with one writer at a
    /// time, sequence order is commit order.
    async fn insert_event(
        conn: &mut SqliteConnection,
        tenant: &TenantId,
        connection_id: &str,
        event: &NewEvent,
        source: EventSource,
    ) -> Result<bool, StoreError> {
        let seq: Option<i64> = sqlx::query_scalar(NEXT_EVENT_SEQ)
            .bind(tenant.as_str())
            .fetch_optional(&mut *conn)
            .await?;
        let Some(seq) = seq else {
            return Err(StoreError::TenantMissing);
        };
        let inserted = sqlx::query(INSERT_EVENT_WITH_SEQ)
            .bind(tenant.as_str())
            .bind(seq)
            .bind(connection_id)
            .bind(&event.event_id)
            .bind(&event.event_type)
            .bind(event.created)
            .bind(event.livemode)
            .bind(crate::clock::now())
            .bind(&event.payload)
            .bind(source.as_str())
            .execute(&mut *conn)
            .await?
            .rows_affected();
        Ok(inserted == 1)
    }

    /// A duplicate rolls back, so it takes no sequence number.
    async fn insert_event_in_feed_order(
        pool: &SqlitePool,
        tenant: &TenantId,
        connection_id: &str,
        event: &NewEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = pool.begin().await?;
        if !Self::insert_event(&mut tx, tenant, connection_id, event, EventSource::Webhook).await? {
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }
}

/// Creates `dir` (and its missing parents) mode 0700; an existing directory is left as is.
fn create_owner_only_dir(dir: &std::path::Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Creates `file` empty, mode 0600, when it does not exist (SQLite takes an empty file as
/// a new database); an existing file is left as is. `:memory:` names no file.
fn create_owner_only_file(file: &std::path::Path) -> std::io::Result<()> {
    if file.as_os_str().is_empty() || file.as_os_str() == ":memory:" {
        return Ok(());
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(file) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}
