//! A million tenants (issue 26), at a small scale: the maintained counts equal a recount
//! through every change (both backends); a recovery cursor exists from the save on and
//! reading it writes nothing; start-up marks connections due only when the required set
//! grew; and, on PostgreSQL, the hot statements' plans are index scans.

use atlas_stripe::crypto::{Keyring, MasterKeyId, Purpose, SecretContext};
use atlas_stripe::domain::{
    Access, ConnectionStatus, KeyKind, Mode, PermissionReport, Resource, TenantId,
};
use atlas_stripe::store::{
    Actor, NewConnection, Store, StoredState, StoredWebhook, Verification, WebhookChange,
};
use secrecy::{ExposeSecret, SecretString};
use sqlx::{Connection, Row};

use crate::backend_tests;
use crate::helpers::{Backend, TestDatabase};

backend_tests!(
    counters_equal_a_recount,
    cursors_come_with_the_connection,
    start_up_marks_only_for_a_grown_requirement
);

async fn store(backend: Backend) -> (TestDatabase, std::sync::Arc<dyn Store>) {
    let db = TestDatabase::new(backend).await;
    let settings =
        atlas_stripe::config::Settings::load(None, &[("database.url", db.url.as_str())]).unwrap();
    let store = atlas_stripe::store::connect(&settings.database)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    (db, store)
}

fn tenant(id: &str) -> TenantId {
    TenantId::parse(id).unwrap()
}

fn granted(missing: &[Resource]) -> PermissionReport {
    (Resource::ALL.into_iter())
        .map(|r| {
            let access = if missing.contains(&r) {
                Access::Missing
            } else {
                Access::Granted
            };
            (r, access)
        })
        .collect()
}

/// Two master keys, `old` active.
fn keyrings() -> (Keyring, Keyring) {
    let old = Keyring::generate_entry(&MasterKeyId::parse("old").unwrap());
    let new = Keyring::generate_entry(&MasterKeyId::parse("new").unwrap());
    let both = SecretString::from(format!("{},{}", old.expose_secret(), new.expose_secret()));
    (
        Keyring::from_config(&both, "old").unwrap(),
        Keyring::from_config(&both, "new").unwrap(),
    )
}

/// A connection sealed for real under `keyring`'s active key, with a webhook secret when
/// `webhook`.
fn sealed_connection(
    keyring: &Keyring,
    id: &str,
    mode: Mode,
    secret_id: &str,
    webhook: bool,
) -> NewConnection {
    let t = tenant(id);
    let context = SecretContext::api_key(secret_id, &t, mode);
    let webhook = if webhook {
        let webhook_secret_id = format!("whs_{secret_id}");
        let context = SecretContext::webhook_secret(&webhook_secret_id, &t, mode);
        WebhookChange::Set(StoredWebhook {
            endpoint_id: format!("we_{id}"),
            sealed: keyring.seal(&context, b"a signing secret").unwrap(),
            secret_id: webhook_secret_id,
        })
    } else {
        WebhookChange::Keep
    };
    NewConnection {
        connection_id: format!("con_{}", id.replace('_', "")),
        expected: StoredState::Absent,
        webhook,
        tenant_id: t,
        mode,
        key_type: KeyKind::Restricted,
        key_last4: "Ab12".into(),
        key_fingerprint: vec![7; 32],
        sealed: keyring.seal(&context, b"a restricted key").unwrap(),
        secret_id: secret_id.into(),
        status: ConnectionStatus::Active,
        permissions: granted(&[]),
        warnings: Vec::new(),
        verified_at: time::OffsetDateTime::now_utc(),
        next_verify_at: time::OffsetDateTime::now_utc() + time::Duration::hours(1),
    }
}

/// (purpose, master key, status, mode, n), sorted, zero rows left out.
type Counts = Vec<(String, String, String, String, i64)>;

const COUNTERS: &str = "SELECT purpose, master_key_id, status, mode, CAST(n AS BIGINT) AS n \
    FROM connection_counts WHERE n <> 0 ORDER BY 1, 2, 3, 4";

const RECOUNT: &str = "SELECT purpose, master_key_id, status, mode, CAST(COUNT(*) AS BIGINT) AS n \
    FROM (SELECT 'stripe_api_key' AS purpose, master_key_id, status, mode \
    FROM stripe_connections UNION ALL SELECT 'webhook_signing_secret', webhook_master_key_id, \
    status, mode FROM stripe_connections WHERE webhook_master_key_id IS NOT NULL) s \
    GROUP BY purpose, master_key_id, status, mode ORDER BY 1, 2, 3, 4";

async fn rows(db: &TestDatabase, statement: &str) -> Counts {
    fn read<R: Row>(row: &R) -> (String, String, String, String, i64)
    where
        usize: sqlx::ColumnIndex<R>,
        String: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        i64: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    {
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4))
    }
    match db.backend {
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
            let rows = sqlx::query(statement).fetch_all(&mut conn).await.unwrap();
            rows.iter().map(read).collect()
        }
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            let rows = sqlx::query(statement).fetch_all(&mut conn).await.unwrap();
            rows.iter().map(read).collect()
        }
    }
}

/// The counters equal a recount, and what the store reports from them agrees.
async fn assert_counted(db: &TestDatabase, store: &dyn Store, step: &str) {
    let recount = rows(db, RECOUNT).await;
    assert_eq!(rows(db, COUNTERS).await, recount, "after {step}");
    let mut by_status: Vec<(String, u64)> = Vec::new();
    for (purpose, _, status, _, n) in &recount {
        if purpose != "stripe_api_key" {
            continue;
        }
        match by_status.iter_mut().find(|(s, _)| s == status) {
            Some((_, total)) => *total += *n as u64,
            None => by_status.push((status.clone(), *n as u64)),
        }
    }
    by_status.sort();
    let mut reported: Vec<(String, u64)> = (store.count_connections_by_status().await.unwrap())
        .into_iter()
        .map(|(s, n)| (s.as_str().to_owned(), n))
        .collect();
    reported.sort();
    assert_eq!(reported, by_status, "status counts after {step}");
    let total: i64 = recount.iter().map(|row| row.4).sum();
    let sealed: u64 = (store.count_secrets_by_master_key().await.unwrap())
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert_eq!(sealed, total as u64, "sealed secrets after {step}");
}

async fn counters_equal_a_recount(backend: Backend) {
    let (db, store) = store(backend).await;
    let (old, new) = keyrings();
    assert_counted(&db, &*store, "nothing").await;
    for (i, mode) in [
        (1, Mode::Test),
        (2, Mode::Test),
        (3, Mode::Live),
        (4, Mode::Test),
    ] {
        let id = format!("ten_{i}");
        store
            .upsert_tenant(&tenant(&id), mode, &Actor::Cli)
            .await
            .unwrap();
        let connection = sealed_connection(&old, &id, mode, &format!("sec_{i}"), i != 4);
        store
            .save_connection(&connection, &Actor::Cli)
            .await
            .unwrap();
    }
    assert_counted(&db, &*store, "four connects").await;

    // Replace ten_1's key (sealed under the other master key) and its webhook secret.
    let mut replacement = sealed_connection(&new, "ten_1", Mode::Test, "sec_1b", true);
    replacement.expected = StoredState::Present {
        endpoint_id: Some("we_ten_1".into()),
    };
    store
        .save_connection(&replacement, &Actor::Cli)
        .await
        .unwrap();
    assert_counted(&db, &*store, "a replace").await;

    // A revoked key, a key that needs attention, then one verification that changes nothing.
    for (id, secret, status) in [
        ("ten_2", "sec_2", ConnectionStatus::Revoked),
        ("ten_3", "sec_3", ConnectionStatus::NeedsAttention),
        ("ten_3", "sec_3", ConnectionStatus::NeedsAttention),
    ] {
        let verification = Verification {
            status,
            permissions: granted(&[Resource::Coupons]),
            verified_at: time::OffsetDateTime::now_utc(),
            next_verify_at: time::OffsetDateTime::now_utc() + time::Duration::hours(1),
        };
        store
            .record_verification(&tenant(id), secret, &verification, &Actor::Cli)
            .await
            .unwrap()
            .unwrap();
    }
    assert_counted(&db, &*store, "a revoke").await;
    // Leases move no counter.
    let now = time::OffsetDateTime::now_utc() + time::Duration::hours(2);
    let claimed = store
        .claim_due_connections("me", now, now + time::Duration::minutes(1), 10)
        .await
        .unwrap();
    assert!(!claimed.is_empty());
    assert_counted(&db, &*store, "a claim").await;

    // Disconnect ten_4 (no webhook endpoint).
    assert!(store
        .delete_connection(&tenant("ten_4"), None, &Actor::Cli)
        .await
        .unwrap());
    assert_counted(&db, &*store, "a disconnect").await;

    // Rewrap everything under `new`: in two steps (a resumed job), each checked.
    let partial = atlas_stripe::rotation::rewrap_all(&*store, &new, 1, Some(1))
        .await
        .unwrap();
    assert_eq!(
        partial.rewrapped, 2,
        "an API key and its webhook secret, in one row"
    );
    assert_counted(&db, &*store, "a partial rewrap").await;
    let rest = atlas_stripe::rotation::rewrap_all(&*store, &new, 2, None)
        .await
        .unwrap();
    assert!(rest.failed.is_empty(), "{:?}", rest.failed);
    assert_counted(&db, &*store, "the rewrap").await;
    let by_key = store.count_secrets_by_master_key().await.unwrap();
    assert_eq!(
        by_key,
        [(MasterKeyId::parse("new").unwrap(), 6)],
        "three keys and three webhook secrets, all under the new master key"
    );
    assert_eq!(
        atlas_stripe::rotation::remaining(&by_key, new.active_id()),
        0
    );
    let by_purpose = store.count_secrets_by_purpose().await.unwrap();
    assert!(by_purpose
        .iter()
        .any(|(p, _, n)| *p == Purpose::WebhookSigningSecret && *n == 3));
}

async fn cursors_come_with_the_connection(backend: Backend) {
    let (db, store) = store(backend).await;
    let (old, _) = keyrings();
    store
        .upsert_tenant(&tenant("ten_1"), Mode::Test, &Actor::Cli)
        .await
        .unwrap();
    let connection = sealed_connection(&old, "ten_1", Mode::Test, "sec_1", true);
    store
        .save_connection(&connection, &Actor::Cli)
        .await
        .unwrap();
    let cursors = |db: &TestDatabase| {
        let url = db.url.clone();
        let backend = db.backend;
        async move {
            let statement = "SELECT COUNT(*) FROM recovery_cursors";
            match backend {
                Backend::Postgres => {
                    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
                    sqlx::query_scalar::<_, i64>(statement)
                        .fetch_one(&mut conn)
                        .await
                        .unwrap()
                }
                Backend::Sqlite => {
                    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
                    sqlx::query_scalar::<_, i64>(statement)
                        .fetch_one(&mut conn)
                        .await
                        .unwrap()
                }
            }
        }
    };
    assert_eq!(cursors(&db).await, 1, "made in the save's transaction");
    let cursor = store
        .find_recovery_cursor(&connection.connection_id)
        .await
        .unwrap()
        .expect("the connection's cursor");
    assert_eq!(cursor.tenant_id, tenant("ten_1"));
    assert!(store
        .find_recovery_cursor("con_nosuch")
        .await
        .unwrap()
        .is_none());
    assert_eq!(cursors(&db).await, 1, "a read makes none");
    let oldest = store.oldest_recovery_cursors().await.unwrap();
    assert_eq!(oldest.len(), 1);
    assert_eq!(oldest[0], (Mode::Test, cursor.recovered_through));
    assert!(store
        .delete_connection(&tenant("ten_1"), Some("we_ten_1"), &Actor::Cli)
        .await
        .unwrap());
    assert_eq!(cursors(&db).await, 0, "gone with its connection");
    assert!(store.oldest_recovery_cursors().await.unwrap().is_empty());
}

async fn start_up_marks_only_for_a_grown_requirement(backend: Backend) {
    let (_db, store) = store(backend).await;
    let (old, _) = keyrings();
    store
        .upsert_tenant(&tenant("ten_1"), Mode::Test, &Actor::Cli)
        .await
        .unwrap();
    let mut connection = sealed_connection(&old, "ten_1", Mode::Test, "sec_1", false);
    // Never probed for coupons: its report lacks the name altogether.
    connection.permissions = (Resource::ALL.into_iter())
        .filter(|r| *r != Resource::Coupons)
        .map(|r| (r, Access::Granted))
        .collect();
    store
        .save_connection(&connection, &Actor::Cli)
        .await
        .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let first = store
        .mark_due_lacking(&[Resource::Customers], now)
        .await
        .unwrap();
    assert_eq!(first, 0, "the report has customers");
    let grown = store
        .mark_due_lacking(&[Resource::Customers, Resource::Coupons], now)
        .await
        .unwrap();
    assert_eq!(grown, 1, "coupons were added: the connection lacks it");
    // Due again later, then a start-up with the same set marks nothing.
    let later = now + time::Duration::hours(1);
    store
        .claim_due_connections("me", later, later, 10)
        .await
        .unwrap();
    store
        .release_connection(&tenant("ten_1"), "me", later + time::Duration::hours(1))
        .await
        .unwrap();
    let same = store
        .mark_due_lacking(&[Resource::Customers, Resource::Coupons], later)
        .await
        .unwrap();
    assert_eq!(same, 0, "an unchanged set reads no connection");
}

/// 5,000 connected tenants written by SQL (plans, not behaviour, are under test here), with
/// cursors and events, then ANALYZE: enough rows that a sequential scan is the planner's
/// choice only when no index serves the statement.
const FILL: &str = r"
INSERT INTO tenants (tenant_id, mode, created_at, updated_at)
    SELECT 'ten_' || i, 'test', now(), now() FROM generate_series(1, 5000) i;
INSERT INTO stripe_connections (tenant_id, connection_id, api_key_secret_id, master_key_id,
    wrapped_key, ciphertext, status, mode, key_type, key_last4, key_fingerprint, permissions,
    warnings, verified_at, connected_at, updated_at, next_verify_at, webhook_endpoint_id,
    webhook_secret_id, webhook_master_key_id, webhook_wrapped_key, webhook_ciphertext)
    SELECT 'ten_' || i, 'con_' || md5(i::text), 'sec_' || md5(i::text), 'k' || (i % 2),
        '\x00'::bytea, '\x00'::bytea,
        CASE WHEN i % 50 = 0 THEN 'needs_attention' ELSE 'active' END, 'test', 'restricted',
        'Ab12', '\x00'::bytea, '{}', '[]', now(), now(), now(),
        now() + i * interval '1 minute', 'we_' || i, 'whs_' || md5(i::text), 'k' || (i % 2),
        '\x00'::bytea, '\x00'::bytea
    FROM generate_series(1, 5000) i;
INSERT INTO recovery_cursors (connection_id, tenant_id, mode, recovered_through, due_at)
    SELECT connection_id, tenant_id, mode, now() - random() * interval '1 day',
        next_verify_at FROM stripe_connections;
INSERT INTO webhook_events (tenant_id, txid, seq, connection_id, event_id, event_type,
    created, livemode, received_at, payload)
    SELECT tenant_id, 1, j, connection_id, 'evt_' || j || md5(connection_id), 'x', 0, false,
        now(), '{}' FROM stripe_connections, generate_series(1, 3) j;
ANALYZE;
";

/// Every hot statement's generic plan at 5,000 tenants reads no growing table sequentially.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_statements_are_index_scans_postgres() {
    let (db, _store) = store(Backend::Postgres).await;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(FILL).execute(&mut conn).await.unwrap();
    let mut scanning = Vec::new();
    for statement in atlas_stripe::store::hot_statements() {
        let plan = atlas_stripe::store::explain_generic(&mut conn, &statement)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", statement.name));
        let scans = atlas_stripe::store::seq_scans_of_growing_tables(&plan);
        if !scans.is_empty() {
            scanning.push(format!(
                "{}: {scans:?}\n{}",
                statement.name,
                plan.join("\n")
            ));
        }
    }
    assert!(scanning.is_empty(), "{}", scanning.join("\n\n"));
}
