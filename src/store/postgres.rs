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
use super::model::{KeyFetchTally, RewrappedPair, RewrappedRow};
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

/// A batch of connections' two rewrapped keys in one statement: the API key under the
/// compare-and-swap on its old master key, the webhook secret (`wh_*`, NULL when it stays)
/// under its own. `SET` reads the row's values before the update. Returns, per row,
/// whether the webhook secret was rewritten.
const REWRAP_PAIRS_UNNEST: &str = "UPDATE stripe_connections c \
    SET master_key_id = v.new_master, wrapped_key = v.wrapped, \
    webhook_master_key_id = CASE WHEN c.webhook_secret_id = v.wh_secret \
    AND c.webhook_master_key_id = v.wh_old THEN v.wh_new ELSE c.webhook_master_key_id END, \
    webhook_wrapped_key = CASE WHEN c.webhook_secret_id = v.wh_secret \
    AND c.webhook_master_key_id = v.wh_old THEN v.wh_wrapped ELSE c.webhook_wrapped_key END \
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::text[], \
    $7::text[], $8::bytea[]) \
    AS v(secret_id, old_master, new_master, wrapped, wh_secret, wh_old, wh_new, wh_wrapped) \
    WHERE c.api_key_secret_id = v.secret_id AND c.master_key_id = v.old_master \
    RETURNING v.wh_new IS NOT NULL AND c.webhook_master_key_id = v.wh_new";

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
    const KEYS_FROM: [&'static str; 2] = [" = ANY(ARRAY(", "))"];
    /// Only rows of transactions older than every running one: those can commit no more.
    const FEED_HORIZON: &'static str =
        " AND txid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint";

    fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    async fn outbox_written(conn: &mut PgConnection) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(super::notifications::CHANNEL)
            .execute(conn)
            .await?;
        Ok(())
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

    /// The whole batch in one statement, both keys of a row in one row update: half the row
    /// versions and index entries of rewrapping each purpose on its own.
    async fn replace_wrapped_pairs(
        pool: &PgPool,
        rows: &[RewrappedPair],
    ) -> Result<(u64, u64), StoreError> {
        let column = |f: fn(&RewrappedPair) -> Option<&str>| -> Vec<Option<&str>> {
            rows.iter().map(f).collect()
        };
        let ids = column(|r| Some(r.api_key.secret_id.as_str()));
        let old = column(|r| Some(r.api_key.previous_master_key_id.as_str()));
        let new = column(|r| Some(r.api_key.sealed.master_key_id.as_str()));
        let wrapped: Vec<&[u8]> = (rows.iter())
            .map(|r| r.api_key.sealed.wrapped_key.as_slice())
            .collect();
        let wh_ids = column(|r| r.webhook.as_ref().map(|w| w.secret_id.as_str()));
        let wh_old = column(|r| (r.webhook.as_ref()).map(|w| w.previous_master_key_id.as_str()));
        let wh_new = column(|r| (r.webhook.as_ref()).map(|w| w.sealed.master_key_id.as_str()));
        let wh_wrapped: Vec<Option<&[u8]>> = (rows.iter())
            .map(|r| r.webhook.as_ref().map(|w| w.sealed.wrapped_key.as_slice()))
            .collect();
        let webhooks: Vec<Option<bool>> = sqlx::query_scalar(REWRAP_PAIRS_UNNEST)
            .bind(&ids)
            .bind(&old)
            .bind(&new)
            .bind(&wrapped)
            .bind(&wh_ids)
            .bind(&wh_old)
            .bind(&wh_new)
            .bind(&wh_wrapped)
            .fetch_all(pool)
            .await?;
        let rewritten = webhooks.iter().filter(|w| **w == Some(true)).count();
        Ok((webhooks.len() as u64, rewritten as u64))
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

/// A statement on a hot path, with example arguments (SQL literals), for checking its plan:
/// the plan tests (tests/api/scale.rs) and `scripts/bench-scale` (through
/// benches/tools/explain_hot.rs) prepare it and explain its generic plan, the one a prepared
/// statement settles on.
pub struct HotStatement {
    pub name: &'static str,
    pub sql: String,
    pub args: &'static [&'static str],
}

/// The statements whose cost must not grow with the number of tenants: each must be an
/// index lookup or range, never a sequential scan of a table that grows with them.
pub fn hot_statements() -> Vec<HotStatement> {
    use super::{queries, recovery};
    let feed_horizon = <Postgres as Dialect>::FEED_HORIZON;
    let hot = |name, sql: &str, args| HotStatement {
        name,
        sql: sql.to_owned(),
        args,
    };
    vec![
        hot("key fetch", queries::FETCH_KEY, &["'tok_1'", "'ten_1'"]),
        hot("proxy key read", queries::FIND_API_KEY, &["'ten_1'"]),
        hot("connection read", queries::FIND_CONNECTION, &["'ten_1'"]),
        hot(
            "connections list",
            queries::LIST_CONNECTIONS,
            &["'con_x'", "100"],
        ),
        hot(
            "connections list of a status",
            queries::LIST_CONNECTIONS_OF_STATUS,
            &["'active'", "'con_x'", "100"],
        ),
        hot(
            "connections by status (health)",
            queries::COUNT_CONNECTIONS_BY_STATUS,
            &[],
        ),
        hot(
            "secrets by master key (health, rewrap)",
            queries::COUNT_SECRETS_BY_PURPOSE,
            &[],
        ),
        HotStatement {
            name: "re-verification claim",
            sql: Postgres::claim(queries::CLAIM_DUE),
            args: &["'me'", "now() + interval '1 minute'", "now()", "10"],
        },
        HotStatement {
            name: "recovery claim",
            sql: Postgres::claim(recovery::CLAIM_DUE_RECOVERIES),
            args: &["'me'", "now() + interval '1 minute'", "now()", "10"],
        },
        hot("recovery cursor read", recovery::FIND_CURSOR, &["'con_x'"]),
        hot(
            "oldest recovery cursor",
            recovery::OLDEST_CURSOR,
            &["'test'"],
        ),
        hot(
            "API keys to rewrap",
            queries::API_KEYS_TO_REWRAP,
            &["'k1'", "'sec_x'", "5000"],
        ),
        hot(
            "webhook secrets to rewrap",
            queries::WEBHOOK_SECRETS_TO_REWRAP,
            &["'k1'", "'whs_x'", "5000"],
        ),
        hot(
            "API keys rewrapped",
            REWRAP_API_KEYS_UNNEST,
            &[
                "ARRAY['sec_x', 'sec_y']",
                "ARRAY['k1', 'k1']",
                "ARRAY['k2', 'k2']",
                "ARRAY['\\x00'::bytea, '\\x00'::bytea]",
            ],
        ),
        hot(
            "webhook secrets rewrapped",
            REWRAP_WEBHOOK_SECRETS_UNNEST,
            &[
                "ARRAY['whs_x', 'whs_y']",
                "ARRAY['k1', 'k1']",
                "ARRAY['k2', 'k2']",
                "ARRAY['\\x00'::bytea, '\\x00'::bytea]",
            ],
        ),
        hot(
            "API keys and webhook secrets rewrapped",
            REWRAP_PAIRS_UNNEST,
            &[
                "ARRAY['sec_x']",
                "ARRAY['k1']",
                "ARRAY['k2']",
                "ARRAY['\\x00'::bytea]",
                "ARRAY['whs_x']",
                "ARRAY['k1']",
                "ARRAY['k2']",
                "ARRAY['\\x00'::bytea]",
            ],
        ),
        hot("webhook target", queries::FIND_WEBHOOK_TARGET, &["'con_x'"]),
        HotStatement {
            name: "event feed",
            sql: [
                queries::LIST_EVENTS[0],
                feed_horizon,
                queries::LIST_EVENTS[1],
            ]
            .concat(),
            args: &["'ten_1'", "0", "0", "100"],
        },
    ]
}

/// Tables that grow with the number of tenants: a sequential scan of one on a hot path is
/// a cost in proportion to N. (The counters, the service tokens and the migrations table
/// stay small: scanning them is the cheap plan.)
const GROWING_TABLES: [&str; 10] = [
    "tenants",
    "stripe_connections",
    "recovery_cursors",
    "webhook_events",
    "key_fetches",
    "stripe_calls",
    "audit_events",
    "notifications",
    "notification_tenants",
    "attempt_limits",
];

/// The generic plan of `statement` (the one a prepared statement settles on), one line per
/// plan line. Nothing is executed: `EXPLAIN` without `ANALYZE`.
pub async fn explain_generic(
    conn: &mut PgConnection,
    statement: &HotStatement,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::raw_sql("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await?;
    sqlx::raw_sql(&format!("PREPARE atlas_hot AS {}", statement.sql))
        .execute(&mut *conn)
        .await?;
    let explain = if statement.args.is_empty() {
        "EXPLAIN EXECUTE atlas_hot".to_owned()
    } else {
        format!("EXPLAIN EXECUTE atlas_hot({})", statement.args.join(", "))
    };
    let lines: Vec<String> = sqlx::query_scalar(&explain).fetch_all(&mut *conn).await?;
    sqlx::raw_sql("DEALLOCATE atlas_hot; RESET plan_cache_mode")
        .execute(&mut *conn)
        .await?;
    Ok(lines)
}

/// The growing tables a plan reads sequentially (none is the point).
pub fn seq_scans_of_growing_tables(plan: &[String]) -> Vec<&'static str> {
    GROWING_TABLES
        .into_iter()
        .filter(|table| {
            let needle = format!("Seq Scan on {table} ");
            let at_end = format!("Seq Scan on {table}");
            plan.iter()
                .any(|line| line.contains(&needle) || line.trim_end().ends_with(&at_end))
        })
        .collect()
}
