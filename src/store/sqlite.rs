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
use super::events::{EventRef, Inserted};
use super::model::{KeyFetchTally, RewrappedPair, RewrappedRow};
use super::queries::{self, TallyStatements};
use super::recovery::EventSource;
use super::{Backend, StoreError};
use crate::crypto::Purpose;

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

/// A connection's two rewrapped keys in one row update (`$1`…`$4` the API key as in
/// `REWRAP_API_KEY`, `$5`…`$8` the webhook secret, NULL when it stays). `SET` reads the
/// row's values before the update; returns the webhook secret's master key after it.
const REWRAP_PAIR: &str = "UPDATE stripe_connections SET master_key_id = $3, \
    wrapped_key = $4, \
    webhook_master_key_id = CASE WHEN webhook_secret_id = $5 AND webhook_master_key_id = $6 \
    THEN $7 ELSE webhook_master_key_id END, \
    webhook_wrapped_key = CASE WHEN webhook_secret_id = $5 AND webhook_master_key_id = $6 \
    THEN $8 ELSE webhook_wrapped_key END \
    WHERE api_key_secret_id = $1 AND master_key_id = $2 RETURNING webhook_master_key_id";

/// A per-tenant sequence number taken in the writing transaction, only for an event not
/// stored yet (a duplicate takes none) whose connection still has the webhook secret `$4`
/// it was checked with (`$4` NULL: no such condition). As the transaction's first write it
/// takes SQLite's write lock up front.
const NEXT_EVENT_SEQ_IF_NEW: &str = "UPDATE tenants SET event_seq = event_seq + 1 \
    WHERE tenant_id = $1 AND NOT EXISTS (SELECT 1 FROM webhook_events \
    WHERE connection_id = $2 AND event_id = $3) \
    AND ($4 IS NULL OR EXISTS (SELECT 1 FROM stripe_connections \
    WHERE connection_id = $2 AND webhook_secret_id = $4)) RETURNING event_seq";

/// Whether the connection has the webhook secret.
const HAS_WEBHOOK_SECRET: &str = "SELECT COUNT(*) FROM stripe_connections \
    WHERE connection_id = $1 AND webhook_secret_id = $2";

const INSERT_EVENT_WITH_SEQ: &str = "INSERT INTO webhook_events (tenant_id, txid, seq, \
    connection_id, event_id, event_type, created, livemode, received_at, payload, source) \
    VALUES ($1, 0, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
    ON CONFLICT (connection_id, event_id) DO NOTHING";

#[async_trait]
impl Dialect for Sqlite {
    const BACKEND: Backend = Backend::Sqlite;
    const SKIP_LOCKED: &'static str = "";
    const KEYS_FROM: [&'static str; 2] = [" IN (", ")"];
    /// One writer at a time: every row visible is committed, in sequence order.
    const FEED_HORIZON: &'static str = "";

    fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    async fn outbox_written(_conn: &mut SqliteConnection) -> Result<(), StoreError> {
        super::notifications::wake_local();
        Ok(())
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

    /// A row at a time in one transaction, like `replace_wrapped_keys`.
    async fn replace_wrapped_pairs(
        pool: &SqlitePool,
        rows: &[RewrappedPair],
    ) -> Result<(u64, u64), StoreError> {
        let mut tx = pool.begin().await?;
        let (mut keys, mut webhooks) = (0, 0);
        for row in rows {
            let webhook = row.webhook.as_ref();
            let after: Option<Option<String>> = sqlx::query_scalar(REWRAP_PAIR)
                .bind(&row.api_key.secret_id)
                .bind(&row.api_key.previous_master_key_id)
                .bind(&row.api_key.sealed.master_key_id)
                .bind(&row.api_key.sealed.wrapped_key)
                .bind(webhook.map(|w| w.secret_id.as_str()))
                .bind(webhook.map(|w| w.previous_master_key_id.as_str()))
                .bind(webhook.map(|w| w.sealed.master_key_id.as_str()))
                .bind(webhook.map(|w| w.sealed.wrapped_key.as_slice()))
                .fetch_optional(&mut *tx)
                .await?;
            let Some(master) = after else { continue };
            keys += 1;
            if webhook.is_some_and(|w| master.as_deref() == Some(w.sealed.master_key_id.as_str())) {
                webhooks += 1;
            }
        }
        tx.commit().await?;
        Ok((keys, webhooks))
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
    /// time, sequence order is commit order. A row at a time: the database is in this
    /// process, so a statement costs no round trip.
    async fn insert_events(
        conn: &mut SqliteConnection,
        rows: &[EventRef<'_>],
        source: EventSource,
    ) -> Result<Vec<Inserted>, StoreError> {
        let received_at = crate::clock::now();
        let mut stored = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: Option<i64> = sqlx::query_scalar(NEXT_EVENT_SEQ_IF_NEW)
                .bind(row.tenant.as_str())
                .bind(row.connection_id)
                .bind(row.event.event_id.as_str())
                .bind(row.webhook_secret_id)
                .fetch_optional(&mut *conn)
                .await?;
            let Some(seq) = seq else {
                // Already stored (before, or earlier in this batch), the secret changed, or
                // no such tenant.
                stored.push(not_inserted(conn, row).await?);
                continue;
            };
            let inserted = sqlx::query(INSERT_EVENT_WITH_SEQ)
                .bind(row.tenant.as_str())
                .bind(seq)
                .bind(row.connection_id)
                .bind(row.event.event_id.as_str())
                .bind(row.event.event_type.as_str())
                .bind(row.event.created)
                .bind(row.event.livemode)
                .bind(received_at)
                .bind(row.event.payload.as_str())
                .bind(source.as_str())
                .execute(&mut *conn)
                .await?
                .rows_affected();
            stored.push(if inserted == 1 {
                Inserted::Stored
            } else {
                Inserted::Duplicate
            });
        }
        Ok(stored)
    }

    /// The whole batch in one transaction: one commit for all of it.
    async fn insert_events_in_feed_order(
        pool: &SqlitePool,
        rows: &[EventRef<'_>],
    ) -> Result<Vec<Inserted>, StoreError> {
        let mut tx = pool.begin().await?;
        let stored = Self::insert_events(&mut tx, rows, EventSource::Webhook).await?;
        tx.commit().await?;
        Ok(stored)
    }
}

/// Why an event took no sequence number.
async fn not_inserted(
    conn: &mut SqliteConnection,
    row: &EventRef<'_>,
) -> Result<Inserted, StoreError> {
    let seen: i64 = sqlx::query_scalar(queries::EVENT_SEEN)
        .bind(row.connection_id)
        .bind(row.event.event_id.as_str())
        .fetch_one(&mut *conn)
        .await?;
    if seen > 0 {
        return Ok(Inserted::Duplicate);
    }
    if let Some(secret_id) = row.webhook_secret_id {
        let has: i64 = sqlx::query_scalar(HAS_WEBHOOK_SECRET)
            .bind(row.connection_id)
            .bind(secret_id)
            .fetch_one(&mut *conn)
            .await?;
        if has == 0 {
            return Ok(Inserted::SecretChanged);
        }
    }
    Err(StoreError::TenantMissing)
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
