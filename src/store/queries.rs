//! Every statement both backends run, by name.
//!
//! They are written in the common subset of PostgreSQL and SQLite (`$n` placeholders,
//! `RETURNING`, `ON CONFLICT`), so one implementation serves both backends. The few places
//! the dialects differ are named once, in `Dialect` (`dialect.rs`); a statement only one
//! backend runs is in that backend's file (`postgres.rs`, `sqlite.rs`).
//!
//! Every multi-statement change starts with a write (`LOCK_TENANT`), which locks the tenant
//! row in PostgreSQL and takes SQLite's write lock up front, so concurrent changes to one
//! tenant serialise instead of deadlocking.

pub const MIGRATIONS_APPLIED: &str = "SELECT COUNT(*) FROM _sqlx_migrations WHERE success";

pub const LOCK_TENANT: &str =
    "UPDATE tenants SET updated_at = updated_at WHERE tenant_id = $1 RETURNING mode";

pub const FIND_TENANT: &str =
    "SELECT tenant_id, mode, created_at FROM tenants WHERE tenant_id = $1";

pub const INSERT_TENANT: &str = "INSERT INTO tenants (tenant_id, mode, created_at, updated_at) \
    VALUES ($1, $2, $3, $3) ON CONFLICT (tenant_id) DO NOTHING";

pub const UPDATE_TENANT_MODE: &str =
    "UPDATE tenants SET mode = $2, updated_at = $3 WHERE tenant_id = $1";

pub const COUNT_TENANT_CONNECTIONS: &str =
    "SELECT COUNT(*) FROM stripe_connections WHERE tenant_id = $1";

pub const INSERT_AUDIT: &str = "INSERT INTO audit_events \
    (occurred_at, actor, action, tenant_id, detail) VALUES ($1, $2, $3, $4, $5)";

pub const AUDIT_TRAIL: &str = "SELECT occurred_at, actor, action, tenant_id, detail \
    FROM audit_events WHERE ($1 IS NULL OR tenant_id = $1) ORDER BY id";

pub const INSERT_SERVICE_TOKEN: &str = "INSERT INTO service_tokens \
    (token_id, name, scopes, secret_hash, created_at) VALUES ($1, $2, $3, $4, $5)";

pub const FIND_SERVICE_TOKEN: &str = "SELECT token_id, name, scopes, secret_hash, created_at, \
    revoked_at FROM service_tokens WHERE token_id = $1";

pub const LIST_SERVICE_TOKENS: &str = "SELECT token_id, name, scopes, secret_hash, created_at, \
    revoked_at FROM service_tokens ORDER BY created_at, token_id";

pub const REVOKE_SERVICE_TOKEN: &str =
    "UPDATE service_tokens SET revoked_at = $2 WHERE token_id = $1 AND revoked_at IS NULL";

/// The columns of `rows::ConnectionRow`, from `stripe_connections c`.
macro_rules! connection_columns {
    () => {
        "SELECT c.tenant_id, c.connection_id, c.status, c.mode, c.key_type, c.key_last4, \
         c.key_fingerprint, c.api_key_secret_id, c.master_key_id, c.wrapped_key, c.ciphertext, \
         c.permissions, c.warnings, c.verified_at, c.connected_at, c.webhook_endpoint_id, \
         c.webhook_secret_id, c.webhook_master_key_id, c.webhook_wrapped_key, \
         c.webhook_ciphertext FROM stripe_connections c "
    };
}

pub const FIND_CONNECTION: &str = concat!(connection_columns!(), "WHERE c.tenant_id = $1");

/// A page of connections in connection-id order: after `$1`, `$2` at most. A range scan of
/// the connection-id index from `$1`, on the last page as on the first.
pub const LIST_CONNECTIONS: &str = concat!(
    connection_columns!(),
    "WHERE c.connection_id > $1 ORDER BY c.connection_id LIMIT $2"
);

/// The same of one status (`$1`): a range scan of the (status, connection_id) index. Its own
/// statement rather than `$1 IS NULL OR …`, which a prepared statement's generic plan cannot
/// turn into an index range.
pub const LIST_CONNECTIONS_OF_STATUS: &str = concat!(
    connection_columns!(),
    "WHERE c.status = $1 AND c.connection_id > $2 ORDER BY c.connection_id LIMIT $3"
);

pub const PREVIOUS_CONNECTION: &str = "SELECT connection_id, webhook_endpoint_id, \
    key_fingerprint FROM stripe_connections WHERE tenant_id = $1";

pub const UPDATE_CONNECTION: &str = "UPDATE stripe_connections SET api_key_secret_id = $3, \
    status = $4, mode = $5, key_type = $6, key_last4 = $7, key_fingerprint = $8, \
    permissions = $9, warnings = $10, verified_at = $11, connected_at = $12, updated_at = $12, \
    master_key_id = $13, wrapped_key = $14, ciphertext = $15, next_verify_at = $16, \
    lease_owner = NULL, lease_until = NULL \
    WHERE tenant_id = $1 AND connection_id = $2";

pub const INSERT_CONNECTION: &str = "INSERT INTO stripe_connections (tenant_id, connection_id, \
    api_key_secret_id, status, mode, key_type, key_last4, key_fingerprint, permissions, \
    warnings, verified_at, connected_at, updated_at, master_key_id, wrapped_key, ciphertext, \
    next_verify_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13, $14, $15, $16)";

pub const SET_WEBHOOK: &str = "UPDATE stripe_connections SET webhook_endpoint_id = $2, \
    webhook_secret_id = $3, webhook_master_key_id = $4, webhook_wrapped_key = $5, \
    webhook_ciphertext = $6 WHERE tenant_id = $1";

pub const RECORD_VERIFICATION: &str = "UPDATE stripe_connections SET status = $3, \
    permissions = $4, verified_at = $5, updated_at = $6, next_verify_at = $7, \
    lease_owner = NULL, lease_until = NULL \
    WHERE tenant_id = $1 AND api_key_secret_id = $2 RETURNING connection_id";

/// Deletes the connection only while its webhook endpoint is still `$2` (compare-and-swap;
/// `$2` NULL: it has none).
pub const DELETE_CONNECTION: &str = "DELETE FROM stripe_connections WHERE tenant_id = $1 \
    AND (webhook_endpoint_id = $2 OR (webhook_endpoint_id IS NULL AND $2 IS NULL)) \
    RETURNING connection_id, key_last4";

/// A new connection's recovery cursor, made in the transaction that saves it (`$4` now:
/// starting at the connection, due at once); a replaced connection keeps its cursor.
pub const INSERT_RECOVERY_CURSOR: &str = "INSERT INTO recovery_cursors \
    (connection_id, tenant_id, mode, recovered_through, due_at) VALUES ($1, $2, $3, $4, $4) \
    ON CONFLICT (connection_id) DO NOTHING";

/// A disconnected connection's cursor goes with it.
pub const DELETE_RECOVERY_CURSOR: &str = "DELETE FROM recovery_cursors WHERE connection_id = $1";

/// The required resources start-up last marked connections due for (comma-separated), read
/// by a write (like `LOCK_TENANT`): instances starting together take turns, and the second
/// finds the first's set.
pub const VERIFY_REQUIREMENTS: &str = "UPDATE verify_requirements SET resources = resources \
    WHERE singleton = 1 RETURNING resources";

pub const SET_VERIFY_REQUIREMENTS: &str = "INSERT INTO verify_requirements \
    (singleton, resources) VALUES (1, $1) \
    ON CONFLICT (singleton) DO UPDATE SET resources = excluded.resources";

/// Leases due connections (`Dialect::claim` puts the parts together): the due ones are a
/// range scan of the partial index `stripe_connections_due` (migration 20261208000200;
/// revoked connections, never probed again, are not in it, so no claim walks past them),
/// then each is updated by primary key.
pub const CLAIM_DUE: [&str; 3] = [
    "UPDATE stripe_connections SET lease_owner = $1, lease_until = $2 WHERE tenant_id",
    "SELECT tenant_id FROM stripe_connections \
     WHERE status <> 'revoked' AND next_verify_at <= $3 \
     AND (lease_until IS NULL OR lease_until < $3) \
     ORDER BY next_verify_at LIMIT $4",
    " RETURNING tenant_id",
];

pub const RELEASE_CONNECTION: &str = "UPDATE stripe_connections SET lease_owner = NULL, \
    lease_until = NULL, next_verify_at = $3 WHERE tenant_id = $1 AND lease_owner = $2";

/// The report is JSON text in both dialects; a required name absent from it means that
/// resource was never probed for this key.
pub const MARK_DUE_LACKING: &str = "UPDATE stripe_connections SET next_verify_at = $1 \
    WHERE status <> 'revoked' AND next_verify_at > $1 AND permissions NOT LIKE $2";

/// Connections per status: the API-key counters (one per connection), a few rows whatever
/// the number of connections. `SUM` of a PostgreSQL `BIGINT` is `NUMERIC`, hence the cast.
pub const COUNT_CONNECTIONS_BY_STATUS: &str = "SELECT status, CAST(SUM(n) AS BIGINT) \
    FROM connection_counts WHERE purpose = 'stripe_api_key' GROUP BY status \
    HAVING SUM(n) > 0 ORDER BY status";

/// Sealed secrets per purpose and master key: the connections' from the counters, and the
/// API keys kept for an endpoint cleanup (`endpoint_cleanups`: rows of disconnects Stripe
/// would not take and of connects in flight, a handful whatever the number of tenants).
pub const COUNT_SECRETS_BY_PURPOSE: &str = "SELECT purpose, master_key_id, \
    CAST(SUM(n) AS BIGINT) FROM (SELECT purpose, master_key_id, n FROM connection_counts \
    UNION ALL SELECT 'stripe_api_key', master_key_id, 1 FROM endpoint_cleanups) counted \
    GROUP BY purpose, master_key_id HAVING SUM(n) > 0 ORDER BY purpose, master_key_id";

/// The API keys outside connections, kept for an endpoint cleanup, under master key `$1`,
/// after secret id `$2`, `$3` at most (a connection's API key moves with its webhook secret:
/// `CONNECTIONS_TO_REWRAP`).
pub const API_KEYS_TO_REWRAP: &str = "SELECT tenant_id, mode, api_key_secret_id AS secret_id, \
    master_key_id, wrapped_key, ciphertext FROM endpoint_cleanups \
    WHERE master_key_id = $1 AND api_key_secret_id > $2 \
    ORDER BY api_key_secret_id LIMIT $3";

/// The same range with each connection's webhook secret: the rewrap's main pass.
pub const CONNECTIONS_TO_REWRAP: &str = "SELECT tenant_id, mode, api_key_secret_id, \
    master_key_id, wrapped_key, ciphertext, webhook_secret_id, webhook_master_key_id, \
    webhook_wrapped_key, webhook_ciphertext FROM stripe_connections \
    WHERE master_key_id = $1 AND api_key_secret_id > $2 \
    ORDER BY api_key_secret_id LIMIT $3";

/// Sealed webhook secrets, aliased like `API_KEYS_TO_REWRAP`.
pub const WEBHOOK_SECRETS_TO_REWRAP: &str = "SELECT tenant_id, mode, \
    webhook_secret_id AS secret_id, webhook_master_key_id AS master_key_id, \
    webhook_wrapped_key AS wrapped_key, webhook_ciphertext AS ciphertext \
    FROM stripe_connections WHERE webhook_master_key_id = $1 AND webhook_secret_id > $2 \
    ORDER BY webhook_secret_id LIMIT $3";

pub const FIND_WEBHOOK_TARGET: &str = "SELECT tenant_id, mode, webhook_secret_id, \
    webhook_master_key_id, webhook_wrapped_key, webhook_ciphertext FROM stripe_connections \
    WHERE connection_id = $1 AND webhook_secret_id IS NOT NULL";

pub const EVENT_SEEN: &str =
    "SELECT COUNT(*) FROM webhook_events WHERE connection_id = $1 AND event_id = $2";

/// The feed; `Dialect::FEED_HORIZON` goes between the two halves.
pub const LIST_EVENTS: [&str; 2] = [
    "SELECT txid, seq, connection_id, event_id, event_type, created, livemode, received_at, \
     payload, source FROM webhook_events WHERE tenant_id = $1 AND (txid, seq) > ($2, $3)",
    " ORDER BY txid, seq LIMIT $4",
];

/// The token and, when connected, the tenant's sealed key: the whole key fetch in one
/// round trip of two primary-key lookups.
pub const FETCH_KEY: &str = "SELECT t.secret_hash, t.scopes, t.revoked_at, \
    c.status, c.mode, c.key_type, c.api_key_secret_id, c.master_key_id, c.wrapped_key, \
    c.ciphertext \
    FROM service_tokens t \
    LEFT JOIN stripe_connections c ON c.tenant_id = $2 \
    WHERE t.token_id = $1";

/// The tenant's sealed key and what decides whether it may be used: the proxy's one read.
pub const FIND_API_KEY: &str = "SELECT status, mode, key_type, api_key_secret_id, \
    master_key_id, wrapped_key, ciphertext FROM stripe_connections WHERE tenant_id = $1";

/// The upsert that adds tallies to a usage table, from `$source`: `CASE` rather than
/// `GREATEST`/`MAX` keeps it in both dialects.
macro_rules! add_tallies {
    ($table:literal, $count:literal, $last:literal, $($source:tt)+) => {
        concat!(
            "INSERT INTO ", $table, " (token_id, tenant_id, window_start, ", $count, ", ",
            $last, ") ", $($source)+,
            " ON CONFLICT (tenant_id, window_start, token_id) DO UPDATE SET ",
            $count, " = ", $table, ".", $count, " + excluded.", $count, ", ",
            $last, " = CASE WHEN excluded.", $last, " > ", $table, ".", $last,
            " THEN excluded.", $last, " ELSE ", $table, ".", $last, " END"
        )
    };
}

/// One row's values.
macro_rules! one_tally {
    () => {
        "VALUES ($1, $2, $3, $4, $5)"
    };
}

/// A batch in one statement: PostgreSQL arrays unnested into rows. A batch never holds one
/// (token, tenant, minute) twice (the writer tallies by that key), which `ON CONFLICT`
/// requires.
macro_rules! tally_batch {
    () => {
        "SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::int8[], \
         $5::timestamptz[])"
    };
}

/// The two ways of writing one usage table: a row at a time (SQLite, in one local
/// transaction) or a whole batch in one statement (PostgreSQL, one round trip).
pub struct TallyStatements {
    pub one: &'static str,
    pub batch: &'static str,
}

/// Key fetches per token, tenant and minute.
pub const ADD_KEY_FETCHES: TallyStatements = TallyStatements {
    one: add_tallies!(
        "key_fetches",
        "fetch_count",
        "last_fetched_at",
        one_tally!()
    ),
    batch: add_tallies!(
        "key_fetches",
        "fetch_count",
        "last_fetched_at",
        tally_batch!()
    ),
};

/// Calls through the Stripe proxy, the same way.
pub const ADD_STRIPE_CALLS: TallyStatements = TallyStatements {
    one: add_tallies!("stripe_calls", "call_count", "last_called_at", one_tally!()),
    batch: add_tallies!(
        "stripe_calls",
        "call_count",
        "last_called_at",
        tally_batch!()
    ),
};

/// Takes one attempt under a per-tenant GCRA limit (`$3` now, `$4` the emission interval,
/// `$5` the period that `limit` attempts may fill, all in microseconds). Returns a row only
/// when the attempt is allowed; a refused attempt changes nothing. `CASE` rather than
/// `GREATEST`/`MAX` keeps it in both dialects.
pub const TAKE_ATTEMPT: &str = "INSERT INTO attempt_limits (tenant_id, kind, tat_micros) \
    VALUES ($1, $2, $3 + $4) ON CONFLICT (tenant_id, kind) DO UPDATE SET tat_micros = \
    (CASE WHEN attempt_limits.tat_micros > $3 THEN attempt_limits.tat_micros ELSE $3 END) + $4 \
    WHERE (CASE WHEN attempt_limits.tat_micros > $3 THEN attempt_limits.tat_micros ELSE $3 END) \
    + $4 - $3 <= $5 RETURNING tat_micros";

pub const ATTEMPT_TAT: &str =
    "SELECT tat_micros FROM attempt_limits WHERE tenant_id = $1 AND kind = $2";

pub const STRIPE_CALLS: &str = "SELECT token_id, tenant_id, window_start, \
    call_count AS fetch_count, last_called_at AS last_fetched_at FROM stripe_calls \
    WHERE tenant_id = $1 ORDER BY window_start, token_id";

pub const MARK_DUE_NOW: &str = "UPDATE stripe_connections SET next_verify_at = $2 \
    WHERE tenant_id = $1 AND status <> 'revoked' AND next_verify_at > $2";

pub const KEY_FETCHES: &str = "SELECT token_id, tenant_id, window_start, fetch_count, \
    last_fetched_at FROM key_fetches WHERE tenant_id = $1 ORDER BY window_start, token_id";

/// Deletes up to `$2` rows of a usage table whose minute began before `$1`, oldest first (an
/// index range scan on `window_start`); `Dialect::SKIP_LOCKED` goes between the two halves,
/// so instances deleting at once take different rows.
macro_rules! delete_old_tallies {
    ($table:literal) => {
        [
            concat!(
                "DELETE FROM ",
                $table,
                " WHERE (tenant_id, window_start, token_id) IN \
                 (SELECT tenant_id, window_start, token_id FROM ",
                $table,
                " WHERE window_start < $1 ORDER BY window_start LIMIT $2"
            ),
            ")",
        ]
    };
}

pub const DELETE_OLD_KEY_FETCHES: [&str; 2] = delete_old_tallies!("key_fetches");

pub const DELETE_OLD_STRIPE_CALLS: [&str; 2] = delete_old_tallies!("stripe_calls");

/// Deletes up to `$2` feed rows received before `$1`, oldest first, split like
/// `DELETE_OLD_KEY_FETCHES`. Only `received_at` decides: a row newer than the horizon is
/// never taken, whatever its place in the feed.
pub const DELETE_OLD_EVENTS: [&str; 2] = [
    "DELETE FROM webhook_events WHERE (tenant_id, txid, seq) IN \
     (SELECT tenant_id, txid, seq FROM webhook_events WHERE received_at < $1 \
     ORDER BY received_at LIMIT $2",
    ")",
];
