//! Announcement lag: 100 state changes a second for 30 s, each announced to a healthy
//! receiver. Lag is from the announcement's `timestamp` (taken in the committing
//! transaction, just before its commit) to its receipt. Floors: p50 < 50 ms, p99 < 500 ms,
//! no duplicates.
//!
//! `scripts/bench-notifications` runs it on SQLite and on a throwaway PostgreSQL
//! (`ATLAS_TEST_POSTGRES_URL`: a database of its own there). Each change is a real
//! re-verification result that flips a connection between `active` and `needs_attention`
//! through the store, so the outbox hook, the wake-up and the deliverer are the product's.
//! `ATLAS_BENCH_QUICK=1` runs 3 s, for the test command.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atlas_stripe::config::Settings;
use atlas_stripe::crypto::{Keyring, MasterKeyId, SecretContext};
use atlas_stripe::domain::{
    random_id, Access, ConnectionStatus, KeyKind, Mode, PermissionReport, Resource, TenantId,
};
use atlas_stripe::startup::Application;
use atlas_stripe::store::{
    Actor, NewConnection, SaveOutcome, StoredState, Verification, WebhookChange,
};
use secrecy::ExposeSecret;
use time::OffsetDateTime;

const TENANTS: usize = 100;
const PER_SECOND: u64 = 100;

type Receipts = Arc<Mutex<Vec<(String, Duration)>>>;

async fn receive(
    axum::extract::State(receipts): axum::extract::State<Receipts>,
    headers: axum::http::HeaderMap,
    body: String,
) -> axum::http::StatusCode {
    let received_at = OffsetDateTime::now_utc();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let recorded = body["timestamp"].as_str().and_then(|t| {
        OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
    });
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if let Some(recorded) = recorded {
        let lag = (received_at - recorded)
            .try_into()
            .unwrap_or(Duration::ZERO);
        receipts.lock().unwrap().push((id, lag));
    }
    axum::http::StatusCode::OK
}

async fn database_url() -> (String, Option<tempfile::TempDir>) {
    let Ok(admin) = std::env::var("ATLAS_TEST_POSTGRES_URL") else {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        return (url, Some(dir));
    };
    let name = random_id("bench_", 16).to_lowercase();
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connect to the cluster");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create the bench database");
    let base = admin.rsplit_once('/').expect("a URL with a database").0;
    (format!("{base}/{name}"), None)
}

fn report(permissions_missing: bool) -> PermissionReport {
    (Resource::ALL.iter())
        .map(|r| {
            let missing = permissions_missing && *r == Resource::Coupons;
            (
                *r,
                if missing {
                    Access::Missing
                } else {
                    Access::Granted
                },
            )
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let quick = std::env::var_os("ATLAS_BENCH_QUICK").is_some_and(|v| v != "0");
    let seconds: u64 = if quick { 3 } else { 30 };
    let receipts: Receipts = Arc::default();
    let receiver = axum::Router::new()
        .route("/atlas", axum::routing::post(receive))
        .with_state(receipts.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver_url = format!("http://{}/atlas", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await });

    let (db_url, _dir) = database_url().await;
    let backend = if db_url.starts_with("sqlite") {
        "sqlite"
    } else {
        "postgres"
    };
    let master = Keyring::generate_entry(&MasterKeyId::parse("bench").unwrap());
    let signing = format!("whsec_{}", random_id("", 32));
    let settings = Settings::load(
        None,
        &[
            ("server.bind", "127.0.0.1:0"),
            ("database.url", &db_url),
            ("database.max_connections", "16"),
            ("crypto.master_keys", master.expose_secret()),
            ("crypto.active_key_id", "bench"),
            ("crypto.fingerprint_key", &random_id("", 48)),
            ("auth.tenant_token_secret", &random_id("", 48)),
            ("dev.generate_secrets", "false"),
            ("reverify.enabled", "false"),
            ("notifications.url", &receiver_url),
            ("notifications.secret", &signing),
            ("log.filter", "warn"),
        ],
    )
    .expect("settings");
    let app = Application::build(&settings).await.expect("app");
    tokio::spawn(app.run_until(std::future::pending()));
    let store = atlas_stripe::store::connect(&settings.database)
        .await
        .expect("store");
    let secrets = settings.secrets().expect("secrets");
    let keyring = atlas_stripe::startup::keyring(&settings, &secrets).expect("keyring");

    // Connected tenants to change; their `connection.connected` announcements are the
    // warm-up and are not counted.
    let mut connections = Vec::with_capacity(TENANTS);
    for i in 0..TENANTS {
        let tenant = TenantId::parse(&format!("ten_{i}")).unwrap();
        store
            .upsert_tenant(&tenant, Mode::Test, &Actor::Cli)
            .await
            .expect("tenant");
        let secret_id = random_id("sec_", 20);
        let context = SecretContext::api_key(&secret_id, &tenant, Mode::Test);
        let connection = NewConnection {
            connection_id: random_id("con_", 20),
            expected: StoredState::Absent,
            webhook: WebhookChange::Keep,
            tenant_id: tenant.clone(),
            mode: Mode::Test,
            key_type: KeyKind::Restricted,
            key_last4: "Bnch".into(),
            key_fingerprint: random_id("", 32).into_bytes(),
            sealed: keyring.seal(&context, b"rk_test_bench").expect("seal"),
            secret_id,
            status: ConnectionStatus::Active,
            permissions: report(false),
            warnings: Vec::new(),
            verified_at: atlas_stripe::clock::now(),
            next_verify_at: atlas_stripe::clock::now() + time::Duration::hours(6),
        };
        let SaveOutcome::Created(record) = store
            .save_connection(&connection, &Actor::Cli)
            .await
            .expect("save")
        else {
            panic!("a first connect");
        };
        connections.push((tenant, record.secret_id));
    }
    for _ in 0..500 {
        if receipts.lock().unwrap().len() >= TENANTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    receipts.lock().unwrap().clear();

    let changes = (seconds * PER_SECOND) as usize;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / PER_SECOND));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut writes = tokio::task::JoinSet::new();
    for n in 0..changes {
        tick.tick().await;
        let (tenant, secret_id) = connections[n % TENANTS].clone();
        // Each round over the tenants flips every one: always a change of status.
        let missing = (n / TENANTS) % 2 == 0;
        let store = store.clone();
        writes.spawn(async move {
            let verification = Verification {
                status: if missing {
                    ConnectionStatus::NeedsAttention
                } else {
                    ConnectionStatus::Active
                },
                permissions: report(missing),
                verified_at: atlas_stripe::clock::now(),
                next_verify_at: atlas_stripe::clock::now() + time::Duration::hours(6),
            };
            store
                .record_verification(&tenant, &secret_id, &verification, &Actor::Cli)
                .await
                .expect("record")
                .expect("still connected");
        });
    }
    while writes.join_next().await.is_some() {}
    for _ in 0..1500 {
        if receipts.lock().unwrap().len() >= changes {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let receipts = receipts.lock().unwrap().clone();
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for (id, _) in &receipts {
        *per_id.entry(id.as_str()).or_default() += 1;
    }
    let duplicates = per_id.values().filter(|n| **n > 1).count();
    let mut lags: Vec<Duration> = receipts.iter().map(|(_, lag)| *lag).collect();
    lags.sort();
    let at = |q: f64| lags[((lags.len() as f64 * q) as usize).min(lags.len() - 1)];
    let (p50, p99, max) = (at(0.50), at(0.99), at(1.0));
    println!(
        "announcements {backend}: {changes} changes at {PER_SECOND}/s, {} received ({} unique), \
         {duplicates} duplicated; lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        receipts.len(),
        per_id.len(),
        p50.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0,
    );
    assert_eq!(per_id.len(), changes, "every change announced");
    assert_eq!(duplicates, 0, "no duplicates without a fault");
    assert!(p50 < Duration::from_millis(50), "p50 floor");
    assert!(p99 < Duration::from_millis(500), "p99 floor");
}
