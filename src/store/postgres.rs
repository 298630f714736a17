//! PostgreSQL, the production backend: stateless service instances share one cluster.

use std::collections::HashMap;
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
use super::events::{first_of_each, EventRef, Inserted};
use super::model::{KeyFetchTally, RewrappedRow};
use super::queries::TallyStatements;
use super::recovery::EventSource;
use super::{Backend, StoreError};
use crate::auth::{token_cache, ServiceTokenCache};
use crate::crypto::Purpose;

static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// Rows per usage-tally statement.
const TALLIES_PER_STATEMENT: usize = 5_000;

/// A batch of rewraps in one statement (PostgreSQL arrays unnested into rows).
const REWRAP_API_KEYS_UNNEST: &str = "UPDATE stripe_connections c \
    SET master_key_id = v.new_master, wrapped_key = v.wrapped \
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[]) \
    AS v(secret_id, old_master, new_master, wrapped) \
    WHERE c.api_key_secret_id = v.secret_id AND c.master_key_id = v.old_master";

const REWRAP_WEBHOOK_SECRETS_UNNEST: &str = "UPDATE stripe_connections c \
    SET webhook_master_key_id = v.new_master, webhook_wrapped_key = v.wrapped \
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[]) \
    AS v(secret_id, old_master, new_master, wrapped) \
    WHERE c.webhook_secret_id = v.secret_id AND c.webhook_master_key_id = v.old_master";

/// A batch of events in one statement (arrays unnested into rows, in the order given).
/// Each row carries its transaction id; the feed holds back rows of transactions still
/// running (`Dialect::FEED_HORIZON`). A row with a webhook secret id (`$10`) is stored only
/// while its connection still has that secret. Returns each row that may be stored, with
/// whether it was (a redelivery conflicts and is not); a row not returned was not stored
/// because its secret changed.
const INSERT_EVENTS_UNNEST: &str = "WITH v AS (SELECT * FROM UNNEST($1::text[], $2::text[], \
    $3::text[], $4::text[], $5::int8[], $6::bool[], $7::text[], $10::text[]) \
    AS v(tenant_id, connection_id, event_id, event_type, created, livemode, payload, \
    secret_id)), \
    live AS (SELECT * FROM v WHERE v.secret_id IS NULL OR EXISTS (SELECT 1 \
    FROM stripe_connections c WHERE c.connection_id = v.connection_id \
    AND c.webhook_secret_id = v.secret_id)), \
    ins AS (INSERT INTO webhook_events (tenant_id, txid, seq, connection_id, event_id, \
    event_type, created, livemode, received_at, payload, source) \
    SELECT tenant_id, pg_current_xact_id()::text::bigint, nextval('webhook_event_seq'), \
    connection_id, event_id, event_type, created, livemode, $8, payload, $9 FROM live \
    ON CONFLICT (connection_id, event_id) DO NOTHING RETURNING connection_id, event_id) \
    SELECT live.connection_id, live.event_id, EXISTS (SELECT 1 FROM ins \
    WHERE ins.connection_id = live.connection_id AND ins.event_id = live.event_id) FROM live";

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
        let statement = match purpose {
            Purpose::StripeApiKey => REWRAP_API_KEYS_UNNEST,
            Purpose::WebhookSigningSecret => REWRAP_WEBHOOK_SECRETS_UNNEST,
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
        let result = sqlx::query(statement)
            .bind(&ids)
            .bind(&old)
            .bind(&new)
            .bind(&wrapped)
            .execute(pool)
            .await?;
        Ok(result.rows_affected())
    }

    /// No lock: every row carries its transaction id, and the feed orders by it and holds
    /// back rows of transactions still running (`FEED_HORIZON`). A batch is one transaction
    /// however many tenants it spans, so it is ordered like a single event, and it takes no
    /// tenant lock that two batches could take in opposite orders.
    async fn insert_events(
        conn: &mut PgConnection,
        rows: &[EventRef<'_>],
        source: EventSource,
    ) -> Result<Vec<Inserted>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let (unique, slot) = first_of_each(rows);
        let tenants: Vec<&str> = unique.iter().map(|r| r.tenant.as_str()).collect();
        let connections: Vec<&str> = unique.iter().map(|r| r.connection_id).collect();
        let ids: Vec<&str> = unique.iter().map(|r| r.event.event_id.as_str()).collect();
        let types: Vec<&str> = unique.iter().map(|r| r.event.event_type.as_str()).collect();
        let created: Vec<i64> = unique.iter().map(|r| r.event.created).collect();
        let livemode: Vec<bool> = unique.iter().map(|r| r.event.livemode).collect();
        let payloads: Vec<&str> = unique.iter().map(|r| r.event.payload.as_str()).collect();
        let secrets: Vec<Option<&str>> = unique.iter().map(|r| r.webhook_secret_id).collect();
        let live: Vec<(String, String, bool)> = sqlx::query_as(INSERT_EVENTS_UNNEST)
            .bind(&tenants)
            .bind(&connections)
            .bind(&ids)
            .bind(&types)
            .bind(&created)
            .bind(&livemode)
            .bind(&payloads)
            .bind(crate::clock::now())
            .bind(source.as_str())
            .bind(&secrets)
            .fetch_all(conn)
            .await?;
        let live: HashMap<(&str, &str), bool> = (live.iter())
            .map(|(c, e, stored)| ((c.as_str(), e.as_str()), *stored))
            .collect();
        let outcome =
            |r: &EventRef<'_>| match live.get(&(r.connection_id, r.event.event_id.as_str())) {
                Some(true) => Inserted::Stored,
                Some(false) => Inserted::Duplicate,
                None => Inserted::SecretChanged,
            };
        // A repeat within the batch fares as its first: not stored because of a changed
        // secret, or else a duplicate.
        Ok((slot.iter().zip(rows))
            .map(|(s, r)| match (s, outcome(r)) {
                (Some(_), outcome) => outcome,
                (None, Inserted::SecretChanged) => Inserted::SecretChanged,
                (None, _) => Inserted::Duplicate,
            })
            .collect())
    }

    /// One statement, so one transaction of its own.
    async fn insert_events_in_feed_order(
        pool: &PgPool,
        rows: &[EventRef<'_>],
    ) -> Result<Vec<Inserted>, StoreError> {
        let mut conn = pool.acquire().await?;
        Self::insert_events(&mut conn, rows, EventSource::Webhook).await
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
