//! Recovery of missed events on PostgreSQL: 100 test-mode connections, each with 100 events
//! Stripe could not deliver (10,000), listed from an in-process stand-in of Stripe's event
//! log that answers each page 50 ms late (newest first, `created[gte]`, `types[]`,
//! `starting_after`, `limit`, `has_more`, as Stripe does). Every event must be stored exactly
//! once, and no account's listings may exceed its smoothed rate in any one-second window.
//!
//! Run through `scripts/bench-recovery`, which starts a throwaway PostgreSQL and sets
//! `ATLAS_TEST_POSTGRES_URL`. `ATLAS_BENCH_QUICK=1`: 4 connections × 20 events, same checks.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atlas_stripe::crypto::{Keyring, MasterKeyId, Purpose, SecretContext};
use atlas_stripe::domain::{
    random_id, Access, ConnectionStatus, KeyKind, Mode, PermissionReport, Resource, TenantId,
};
use atlas_stripe::proxy::AccountSmoothing;
use atlas_stripe::store::{Actor, NewConnection, StoredState, StoredWebhook, WebhookChange};
use atlas_stripe::stripe::{StripeClient, StripeClientConfig};
use atlas_stripe::webhooks::recovery::{EventRecovery, RecoverySettings};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};

const PAGE_DELAY: Duration = Duration::from_millis(50);
/// `proxy.test_requests_per_second`'s default: the rate the recovery shares with the proxy.
const TEST_RATE: u32 = 20;

/// The stand-in's state: each account's events (oldest first) by API key, and when each
/// account was listed.
#[derive(Default)]
struct EventLog {
    events: HashMap<String, Vec<Value>>,
    listed_at: HashMap<String, Vec<Instant>>,
}

type Shared = Arc<Mutex<EventLog>>;

async fn list_events(
    State(log): State<Shared>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Json<Value> {
    let key = (headers.get("authorization"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let value = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let limit: usize = value("limit").and_then(|l| l.parse().ok()).unwrap_or(10);
    let gte: i64 = value("created[gte]")
        .and_then(|c| c.parse().ok())
        .unwrap_or(i64::MIN);
    let types: Vec<&String> = (pairs.iter())
        .filter(|(k, _)| k == "types[]")
        .map(|(_, v)| v)
        .collect();
    let page = {
        let mut log = log.lock().unwrap();
        log.listed_at
            .entry(key.clone())
            .or_default()
            .push(Instant::now());
        let newest_first: Vec<&Value> = (log.events.get(&key).into_iter().flatten().rev())
            .filter(|e| e["created"].as_i64().unwrap_or(0) >= gte)
            .filter(|e| types.is_empty() || types.iter().any(|t| e["type"] == t.as_str()))
            .collect();
        let start = match value("starting_after") {
            Some(after) => newest_first
                .iter()
                .position(|e| e["id"] == after.as_str())
                .map_or(0, |i| i + 1),
            None => 0,
        };
        let data: Vec<Value> = newest_first
            .iter()
            .skip(start)
            .take(limit)
            .map(|e| (*e).clone())
            .collect();
        json!({"object": "list", "url": "/v1/events", "has_more": newest_first.len() > start + limit, "data": data})
    };
    tokio::time::sleep(PAGE_DELAY).await;
    Json(page)
}

#[tokio::main]
async fn main() {
    let quick = std::env::var_os("ATLAS_BENCH_QUICK").is_some_and(|v| v != "0");
    let (connections_n, per_connection) = if quick { (4, 20) } else { (100, 100) };
    let admin =
        std::env::var("ATLAS_TEST_POSTGRES_URL").expect("run through scripts/bench-recovery");
    let name = random_id("bench_", 16).to_lowercase();
    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("connect to the cluster");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create the bench database");
    }
    let url = format!(
        "{}/{name}",
        admin.rsplit_once('/').expect("a URL with a database").0
    );
    let settings = atlas_stripe::config::Settings::load(
        None,
        &[
            ("database.url", url.as_str()),
            ("database.max_connections", "32"),
            ("dev.generate_secrets", "false"),
        ],
    )
    .expect("settings");
    let store = atlas_stripe::store::connect(&settings.database)
        .await
        .expect("store");
    store.migrate().await.expect("migrations");

    // Stripe's event log, in this process.
    let log: Shared = Arc::default();
    let standin = axum::Router::new()
        .route("/v1/events", axum::routing::get(list_events))
        .with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stripe_base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, standin).await });

    let master = Keyring::generate_entry(&MasterKeyId::parse("bench").unwrap());
    let keyring = Arc::new(Keyring::from_config(&master, "bench").unwrap());
    let permissions: PermissionReport = Resource::ALL
        .iter()
        .map(|r| (*r, Access::Granted))
        .collect();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for c in 0..connections_n {
        let tenant = TenantId::parse(&format!("ten_rc{c}")).unwrap();
        store
            .upsert_tenant(&tenant, Mode::Test, &Actor::Cli)
            .await
            .unwrap();
        let api_key = random_id("rk_test_", 99);
        let (secret_id, webhook_secret_id) = (random_id("sec_", 20), random_id("whs_", 20));
        let context = |id: &str, purpose| SecretContext {
            secret_id: id.to_owned(),
            tenant_id: tenant.clone(),
            mode: Mode::Test,
            purpose,
        };
        store
            .save_connection(
                &NewConnection {
                    connection_id: random_id("con_", 20),
                    expected: StoredState::Absent,
                    webhook: WebhookChange::Set(StoredWebhook {
                        endpoint_id: random_id("we_", 16),
                        sealed: keyring
                            .seal(
                                &context(&webhook_secret_id, Purpose::WebhookSigningSecret),
                                b"whsec_bench",
                            )
                            .unwrap(),
                        secret_id: webhook_secret_id,
                    }),
                    tenant_id: tenant.clone(),
                    mode: Mode::Test,
                    key_type: KeyKind::Restricted,
                    key_last4: api_key[api_key.len() - 4..].to_owned(),
                    key_fingerprint: vec![0; 32],
                    sealed: keyring
                        .seal(
                            &context(&secret_id, Purpose::StripeApiKey),
                            api_key.as_bytes(),
                        )
                        .unwrap(),
                    secret_id,
                    status: ConnectionStatus::Active,
                    permissions: permissions.clone(),
                    warnings: Vec::new(),
                    verified_at: atlas_stripe::clock::now(),
                    next_verify_at: atlas_stripe::clock::now() + time::Duration::hours(6),
                },
                &Actor::Cli,
            )
            .await
            .unwrap();
        // Missed while the service was down: created in the last minute, several a second.
        let events = (0..per_connection)
            .map(|i| {
                json!({
                    "id": format!("evt_{c}x{i}"), "object": "event", "type": "invoice.paid",
                    "created": now - 60 + (i as i64 * 60 / per_connection as i64),
                    "livemode": false, "api_version": "2023-08-16",
                    "data": {"object": {"id": format!("in_{c}x{i}"), "object": "invoice"}},
                })
            })
            .collect();
        log.lock().unwrap().events.insert(api_key, events);
    }

    let mut stripe_config = StripeClientConfig::from_settings(&settings.stripe);
    stripe_config.api_base = stripe_base;
    let stripe = StripeClient::new(stripe_config).unwrap();
    let smoothing = Arc::new(AccountSmoothing::new(
        settings.proxy.live_requests_per_second,
        NonZeroU32::new(TEST_RATE).unwrap(),
        settings.proxy.max_wait,
    ));
    let mut recovery_settings = RecoverySettings::new(
        Duration::from_secs(900),
        settings.webhooks.enabled_events.clone(),
    );
    recovery_settings.batch = 100;
    let worker = EventRecovery::new(
        store.clone(),
        keyring,
        stripe,
        smoothing,
        recovery_settings,
        Arc::default(),
    );

    let started = Instant::now();
    while worker.run_once().await > 0 {}
    let elapsed = started.elapsed();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let stored = count("SELECT COUNT(*) FROM webhook_events WHERE source = 'recovered'").await;
    let distinct = count("SELECT COUNT(DISTINCT event_id) FROM webhook_events").await;
    let expected = (connections_n * per_connection) as i64;
    // The most listings of one account within any one second.
    let busiest = {
        let log = log.lock().unwrap();
        (log.listed_at.values())
            .map(|times| {
                (0..times.len())
                    .map(|i| {
                        times[i..]
                            .iter()
                            .take_while(|t| **t - times[i] < Duration::from_secs(1))
                            .count()
                    })
                    .max()
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    };
    let pages: usize = log.lock().unwrap().listed_at.values().map(Vec::len).sum();
    println!(
        "event recovery{}: {connections_n} connections × {per_connection} missed events = {expected}, \
         {pages} pages at {} ms each, recovered in {:.2} s; stored {stored} ({distinct} distinct){}; \
         busiest account {busiest} listings in one second (rate {TEST_RATE}/s)",
        if quick { " (quick mode)" } else { "" },
        PAGE_DELAY.as_millis(),
        elapsed.as_secs_f64(),
        if stored == expected && distinct == expected { ", exactly once" } else { " (MISMATCH)" },
    );
    assert_eq!(stored, expected, "every missed event stored");
    assert_eq!(distinct, expected, "each once");
    assert!(
        busiest as u32 <= TEST_RATE,
        "never above the account's smoothed rate"
    );
}
