//! PostgreSQL, the production backend: stateless service instances share one cluster.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgQueryResult};
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::dialect::Dialect;
use super::model::{KeyFetchTally, NewEvent, RewrappedRow};
use super::queries::TallyStatements;
use super::recovery::EventSource;
use super::{Backend, StoreError};
use crate::auth::{token_cache, ServiceTokenCache};
use crate::crypto::Purpose;
use crate::domain::TenantId;

static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// Rows per usage-tally statement.
const TALLIES_PER_STATEMENT: usize = 5_000;

/// A batch of rewraps in one statement (PostgreSQL arrays unnested into rows).
const REWRAP_API_KEYS_UNNEST: &str = "UPDATE stripe_connections c \
    SET master_key_id = v.new_master, wrapped_key = v.wrapped \
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[]) \
    AS v(secret_id, old_master, new_master, wrapped) \
    WHERE c.api_key_secret_id = v.secret_id AND c.master_key_id = v.old_master";

/// The API keys kept for an endpoint cleanup, in the same batch (each row is its own
/// compare-and-swap on its old master key, so the two statements need no common transaction).
const REWRAP_KEPT_API_KEYS_UNNEST: &str = "UPDATE endpoint_cleanups k \
    SET master_key_id = v.new_master, wrapped_key = v.wrapped \
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[]) \
    AS v(secret_id, old_master, new_master, wrapped) \
    WHERE k.api_key_secret_id = v.secret_id AND k.master_key_id = v.old_master";

const REWRAP_WEBHOOK_SECRETS_UNNEST: &str = "UPDATE stripe_connections c \
    SET webhook_master_key_id = v.new_master, webhook_wrapped_key = v.wrapped \
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[]) \
    AS v(secret_id, old_master, new_master, wrapped) \
    WHERE c.webhook_secret_id = v.secret_id AND c.webhook_master_key_id = v.old_master";

/// The row carries its transaction id; the feed holds back rows of
/// transactions still running (`Dialect::FEED_HORIZON`).
const INSERT_EVENT_WITH_TXID: &str = "INSERT INTO webhook_events (tenant_id, txid, seq, \
    connection_id, event_id, event_type, created, livemode, received_at, payload, source) \
    VALUES ($1, pg_current_xact_id()::text::bigint, nextval('webhook_event_seq'), $2, $3, $4, \
    $5, $6, $7, $8, $9) \
    ON CONFLICT (connection_id, event_id) DO NOTHING";

#[async_trait]
impl Dialect for Postgres {
    const BACKEND: Backend = Backend::Postgres;
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    /// Only rows of transactions older than every running one: those can commit no more.
    const FEED_HORIZON: &'static str =
        " AND txid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint";

    fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    fn rows_affected(result: &PgQueryResult) -> u64 {
        result.rows_affected()
    }

    async fn open_pool(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<PgPool, StoreError> {
        let options = PgConnectOptions::from_str(url)?.application_name("atlas-stripe");
        Ok(PgPoolOptions::new()
            // A ping before every checkout doubles the key fetch's round trips; a broken
            // connection fails its query instead and the pool replaces it.
            .test_before_acquire(false)
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .connect_with(options)
            .await?)
    }

    async fn add_tallies(
        conn: &mut PgConnection,
        statements: &TallyStatements,
        tallies: &[KeyFetchTally],
    ) -> Result<(), StoreError> {
        // Bounded statements: a backlog kept through an outage goes in several.
        for chunk in tallies.chunks(TALLIES_PER_STATEMENT) {
            let tokens: Vec<&str> = chunk.iter().map(|t| t.token_id.as_str()).collect();
            let tenants: Vec<&str> = chunk.iter().map(|t| t.tenant_id.as_str()).collect();
            let windows: Vec<_> = chunk.iter().map(|t| t.window_start).collect();
            let counts: Vec<i64> = chunk.iter().map(|t| t.fetch_count).collect();
            let lasts: Vec<_> = chunk.iter().map(|t| t.last_fetched_at).collect();
            sqlx::query(statements.batch)
                .bind(tokens)
                .bind(tenants)
                .bind(windows)
                .bind(counts)
                .bind(lasts)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// The whole batch in one statement (arrays unnested into rows): one round trip per
    /// batch instead of one per secret.
    async fn replace_wrapped_keys(
        pool: &PgPool,
        purpose: Purpose,
        rows: &[RewrappedRow],
    ) -> Result<u64, StoreError> {
        let statements: &[&str] = match purpose {
            Purpose::StripeApiKey => &[REWRAP_API_KEYS_UNNEST, REWRAP_KEPT_API_KEYS_UNNEST],
            Purpose::WebhookSigningSecret => &[REWRAP_WEBHOOK_SECRETS_UNNEST],
        };
        let ids: Vec<&str> = rows.iter().map(|r| r.secret_id.as_str()).collect();
        let old: Vec<&str> = (rows.iter())
            .map(|r| r.previous_master_key_id.as_str())
            .collect();
        let new: Vec<&str> = (rows.iter())
            .map(|r| r.sealed.master_key_id.as_str())
            .collect();
        let wrapped: Vec<&[u8]> = (rows.iter())
            .map(|r| r.sealed.wrapped_key.as_slice())
            .collect();
        let mut replaced = 0;
        for statement in statements {
            replaced += sqlx::query(statement)
                .bind(&ids)
                .bind(&old)
                .bind(&new)
                .bind(&wrapped)
                .execute(pool)
                .await?
                .rows_affected();
        }
        Ok(replaced)
    }

    /// No lock: the row carries its transaction id, and the feed orders by it and holds
    /// back rows of transactions still running (`FEED_HORIZON`).
    async fn insert_event(
        conn: &mut PgConnection,
        tenant: &TenantId,
        connection_id: &str,
        event: &NewEvent,
        source: EventSource,
    ) -> Result<bool, StoreError> {
        let inserted = sqlx::query(INSERT_EVENT_WITH_TXID)
            .bind(tenant.as_str())
            .bind(connection_id)
            .bind(&event.event_id)
            .bind(&event.event_type)
            .bind(event.created)
            .bind(event.livemode)
            .bind(crate::clock::now())
            .bind(&event.payload)
            .bind(source.as_str())
            .execute(conn)
            .await?
            .rows_affected();
        Ok(inserted == 1)
    }

    /// One statement, in a transaction of its own.
    async fn insert_event_in_feed_order(
        pool: &PgPool,
        tenant: &TenantId,
        connection_id: &str,
        event: &NewEvent,
    ) -> Result<bool, StoreError> {
        let mut conn = pool.acquire().await?;
        Self::insert_event(
            &mut conn,
            tenant,
            connection_id,
            event,
            EventSource::Webhook,
        )
        .await
    }
}

/// The listener connection's `application_name`, to tell it apart in `pg_stat_activity`.
pub const TOKEN_LISTENER_NAME: &str = "atlas-stripe-token-listener";

/// Keeps `cache` live while subscribed to the trigger's notices on `service_tokens`: each
/// notice empties it; a lost subscription turns it off until a new one is in place (tried
/// again every second). Stops when `stop` turns true.
pub(super) fn spawn_token_listener(
    url: &str,
    cache: Arc<ServiceTokenCache>,
    mut stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, StoreError> {
    let options = PgConnectOptions::from_str(url)?.application_name(TOKEN_LISTENER_NAME);
    // Its own connection: a subscription never holds one of the pool's.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options);
    Ok(tokio::spawn(async move {
        loop {
            let session = async {
                let mut listener = PgListener::connect_with(&pool).await?;
                listener.listen(token_cache::CHANNEL).await?;
                cache.set_live(true);
                tracing::info!("service-token cache on: subscribed to token changes");
                // `None`: the connection was lost (and notices with it).
                while listener.try_recv().await?.is_some() {
                    cache.invalidate();
                }
                Ok::<(), sqlx::Error>(())
            };
            let stopped = tokio::select! {
                ended = session => {
                    if let Err(e) = ended {
                        tracing::warn!(error = %e, "service-token change subscription failed");
                    }
                    false
                }
                _ = stop.wait_for(|stopped| *stopped) => true,
            };
            if cache.is_live() && !stopped {
                tracing::warn!("service-token cache off: the change subscription was lost");
            }
            cache.set_live(false);
            if stopped {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
        }
    }))
}
