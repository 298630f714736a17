//! Keeping connections healthy: background re-verification, growth of the required set,
//! master-key rotation, readiness and metrics.

use std::time::Duration;

use atlas_stripe::auth::Scope;
use atlas_stripe::crypto::{Keyring, MasterKeyId};
use atlas_stripe::domain::{Mode, Resource, TenantId};
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};

use crate::backend_tests;
use crate::helpers::{assert_error, eventually, json, spawn_app_with, Backend, TestApp};
use crate::stripe_mock::{answer_all, assert_bearer, grant_all_but, key, timestamp, Answer};

backend_tests!(
    background_reverification_moves_every_status,
    a_grown_required_set_flags_connections_at_their_next_verification,
    rewrap_survives_a_crash_and_loses_nothing,
    readiness_names_a_missing_master_key,
    metrics_expose_the_named_series,
);

/// Re-verification that considers everything due all the time.
const EAGER: [(&str, &str); 5] = [
    ("reverify.enabled", "true"),
    ("reverify.period_secs", "0"),
    ("reverify.jitter_secs", "0"),
    ("reverify.retry_secs", "0"),
    ("reverify.tick_ms", "30"),
];

async fn status(app: &TestApp) -> serde_json::Value {
    json(app.tenant_request(Method::GET, "ten_1", "").await).await
}

async fn wait_for_status(app: &TestApp, wanted: &str) -> serde_json::Value {
    for _ in 0..200 {
        let summary = status(app).await;
        if summary["status"] == wanted {
            return summary;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("status never became {wanted}: {}", status(app).await);
}

async fn background_reverification_moves_every_status(backend: Backend) {
    let app = spawn_app_with(backend, &EAGER).await;
    app.create_tenant("ten_1", Mode::Test).await;
    answer_all(&app.stripe, Answer::Granted).await;
    let api_key = key("rk_test_", "Bgv1");
    let connected = app.connect("ten_1", &api_key).await;
    assert_eq!(connected.status(), 201);
    let connected = json(connected).await;
    // The mocks answer any key: every re-verification must have sent the stored one.
    let (app_ref, key_ref) = (&app, api_key.as_str());
    let sent_with_the_key = || async move {
        assert_bearer(&app_ref.stripe_requests().await, key_ref);
    };

    app.stripe.reset().await;
    grant_all_but(&app.stripe, &[Resource::Coupons]).await;
    let summary = wait_for_status(&app, "needs_attention").await;
    assert_eq!(summary["permissions"]["coupons"], "missing");
    assert!(timestamp(&summary["verified_at"]) > timestamp(&connected["verified_at"]));
    sent_with_the_key().await;

    // Stripe down: nothing changes, however often it is tried.
    app.stripe.reset().await;
    answer_all(&app.stripe, Answer::ServerError { should_retry: None }).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        app.stripe.received_requests().await.unwrap().len() >= 5,
        "it did try"
    );
    sent_with_the_key().await;
    assert_eq!(status(&app).await["status"], "needs_attention");

    app.stripe.reset().await;
    answer_all(&app.stripe, Answer::Granted).await;
    let summary = wait_for_status(&app, "active").await;
    assert!(timestamp(&summary["verified_at"]) > timestamp(&connected["verified_at"]));
    sent_with_the_key().await;

    app.stripe.reset().await;
    answer_all(&app.stripe, Answer::ExpiredKey).await;
    wait_for_status(&app, "revoked").await;
    // A revoked key is not probed again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    sent_with_the_key().await;
    app.stripe.reset().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(app.stripe.received_requests().await.unwrap().is_empty());

    let trail = app
        .store
        .audit_trail(Some(&TenantId::parse("ten_1").unwrap()))
        .await
        .unwrap();
    let reverifications: Vec<&str> = trail
        .iter()
        .filter(|a| a.action == "connection.verified" && a.actor.starts_with("reverifier:proc_"))
        .map(|a| a.detail["status"].as_str().unwrap())
        .collect();
    assert!(
        reverifications.contains(&"needs_attention") && reverifications.contains(&"revoked"),
        "{reverifications:?}"
    );
}

async fn a_grown_required_set_flags_connections_at_their_next_verification(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[("stripe.required_resources", "customers,coupons")],
    )
    .await;
    app.create_tenant("ten_1", Mode::Test).await;
    grant_all_but(&app.stripe, &[Resource::Invoices]).await;
    let api_key = key("rk_test_", "Grow");
    assert_eq!(app.connect("ten_1", &api_key).await.status(), 201);
    assert_eq!(status(&app).await["status"], "active");

    // A restart that requires every resource, with the usual six-hour interval: the
    // connection is due at once because its report lacks the new resources.
    let restarted = app
        .twin_with(&[
            (
                "stripe.required_resources",
                "customers,checkout_sessions,coupons,invoices,webhook_endpoints",
            ),
            ("reverify.enabled", "true"),
            ("reverify.tick_ms", "30"),
        ])
        .await;
    grant_all_but(&restarted.stripe, &[Resource::Invoices]).await;
    let summary = wait_for_status(&restarted, "needs_attention").await;
    assert_eq!(summary["permissions"]["invoices"], "missing");
    assert_eq!(summary["permissions"]["webhook_endpoints"], "granted");
    assert_bearer(&restarted.stripe_requests().await, &api_key);
}

fn rotated(app: &TestApp) -> (String, Keyring) {
    let k2 = Keyring::generate_entry(&MasterKeyId::parse("k2").unwrap());
    let both = format!("{},{}", app.secrets.master_keys, k2.expose_secret());
    let keyring = Keyring::from_config(&SecretString::from(both.clone()), "k2").unwrap();
    (both, keyring)
}

/// Every tenant's key is served, in the clear, by `app`.
async fn assert_serves_every_key(app: &TestApp, keys: &[(String, String)]) {
    let token = app.service_token(&[Scope::KeysRead]).await;
    for (tenant, api_key) in keys {
        let response = app
            .http
            .get(app.url(&format!("/internal/v1/tenants/{tenant}/stripe/key")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(&json(response).await["api_key"], api_key.as_str());
    }
}

async fn rewrap_survives_a_crash_and_loses_nothing(backend: Backend) {
    let app = spawn_app_with(backend, &[("limits.connect_attempts_per_minute", "1000")]).await;
    answer_all(&app.stripe, Answer::Granted).await;
    let mut keys = Vec::new();
    for i in 0..10 {
        let tenant = format!("ten_{i}");
        app.create_tenant(&tenant, Mode::Test).await;
        let api_key = key("rk_test_", &format!("Rw{i:02}"));
        assert_eq!(app.connect(&tenant, &api_key).await.status(), 201);
        keys.push((tenant, api_key));
    }
    let (both, keyring) = rotated(&app);
    // "Crash" after two batches of three connections (each API key with its webhook secret):
    // committed batches stay, the rest is untouched.
    let partial = atlas_stripe::rotation::rewrap_all(&*app.store, &keyring, 3, Some(2))
        .await
        .unwrap();
    assert_eq!((partial.rewrapped, partial.batches), (12, 2));
    assert_eq!(
        secrets_by_master_key(&app).await,
        [("k2".to_owned(), 12), ("test1".to_owned(), 8)]
    );
    // The service keeps serving every key meanwhile, with both master keys configured.
    let serving = app
        .twin_with(&[
            ("crypto.master_keys", &both),
            ("crypto.active_key_id", "k2"),
        ])
        .await;
    assert_serves_every_key(&serving, &keys).await;
    // The rerun finishes the job.
    let rest = atlas_stripe::rotation::rewrap_all(&*app.store, &keyring, 3, None)
        .await
        .unwrap();
    assert_eq!(
        rest.rewrapped, 8,
        "the rest of the API keys and their webhook secrets"
    );
    assert!(rest.failed.is_empty());
    assert_eq!(secrets_by_master_key(&app).await, [("k2".to_owned(), 20)]);
    // The old master key can now be dropped: every key opens with k2 alone.
    let k2_only = both
        .split(',')
        .find(|e| e.starts_with("k2:"))
        .unwrap()
        .to_owned();
    let after = app
        .twin_with(&[
            ("crypto.master_keys", &k2_only),
            ("crypto.active_key_id", "k2"),
        ])
        .await;
    assert_eq!(
        after
            .http
            .get(after.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_serves_every_key(&after, &keys).await;
}

async fn readiness_names_a_missing_master_key(backend: Backend) {
    let app = spawn_app_with(backend, &[]).await;
    app.create_tenant("ten_1", Mode::Test).await;
    answer_all(&app.stripe, Answer::Granted).await;
    assert_eq!(
        app.connect("ten_1", &key("rk_test_", "Mkey"))
            .await
            .status(),
        201
    );
    let other = Keyring::generate_entry(&MasterKeyId::parse("k9").unwrap());
    let misconfigured = app
        .twin_with(&[
            ("crypto.master_keys", other.expose_secret()),
            ("crypto.active_key_id", "k9"),
        ])
        .await;
    let body = assert_error(
        misconfigured
            .http
            .get(misconfigured.url("/readyz"))
            .send()
            .await
            .unwrap(),
        503,
        "not_ready",
    )
    .await;
    // The first look happens before the twin serves: no wait needed.
    let keyring_check = body["error"]["checks"]["keyring"].as_str().unwrap();
    assert!(keyring_check.contains("test1"), "{keyring_check}");
    assert_eq!(body["error"]["checks"]["database"], "ok");
    // An instance that lacks the master key (one rolled out of step) cannot open the key:
    // a retryable 503 (another instance can), not a 500, and nothing of the key in it.
    let token = misconfigured.service_token(&[Scope::KeysRead]).await;
    let response = (misconfigured.http)
        .get(misconfigured.url("/internal/v1/tenants/ten_1/stripe/key"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("retry-after"));
    let body = assert_error(response, 503, "service_unavailable").await;
    assert_eq!(body["error"]["retryable"], true);
    assert!(!body.to_string().contains("Mkey"), "{body}");
}

/// The value of one series in Prometheus text (0 when absent).
fn series_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

async fn scrape(app: &TestApp) -> String {
    let response = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

async fn metrics_expose_the_named_series(backend: Backend) {
    // The sealed-keys gauge is labelled by master-key id: an id of this app's own makes
    // that gauge this app's alone.
    let key_id = format!("m{}", atlas_stripe::domain::random_id("", 12));
    let entry = Keyring::generate_entry(&MasterKeyId::parse(&key_id).unwrap());
    let app = spawn_app_with(
        backend,
        &[
            ("crypto.master_keys", entry.expose_secret()),
            ("crypto.active_key_id", &key_id),
        ],
    )
    .await;
    app.create_tenant("ten_1", Mode::Test).await;
    // Counters are process-wide: this test reads how much they moved. Under nextest each
    // test has the process to itself and the moves are exact; under `cargo test` other
    // tests run beside it and can only add. (So can the connections gauge, which every
    // app sets: run this test alone or one test at a time, as `cargo test -- --test-threads
    // 1` does.)
    let alone = std::env::var_os("NEXTEST").is_some();
    const CONNECT: &str = r#"route="/v1/tenants/{tenant_id}/stripe/connection",method="POST""#;
    let counters = [
        (
            format!("atlas_http_requests_total{{{CONNECT},status=\"422\"}}"),
            1.0,
        ),
        (
            format!("atlas_http_requests_total{{{CONNECT},status=\"201\"}}"),
            1.0,
        ),
        (
            format!("atlas_http_request_duration_seconds_count{{{CONNECT}}}"),
            2.0,
        ),
        (
            r#"atlas_stripe_requests_total{endpoint="/v1/coupons/{coupon}",outcome="403"}"#
                .to_owned(),
            1.0,
        ),
        (
            r#"atlas_stripe_requests_total{endpoint="/v1/coupons/{coupon}",outcome="404"}"#
                .to_owned(),
            1.0,
        ),
        (
            r#"atlas_stripe_requests_total{endpoint="/v1/webhook_endpoints",outcome="200"}"#
                .to_owned(),
            1.0,
        ),
        (
            r#"atlas_probe_results_total{resource="coupons",result="missing"}"#.to_owned(),
            1.0,
        ),
        (
            r#"atlas_probe_results_total{resource="coupons",result="granted"}"#.to_owned(),
            1.0,
        ),
        (
            r#"atlas_probe_results_total{resource="invoices",result="granted"}"#.to_owned(),
            2.0,
        ),
    ];
    let before = scrape(&app).await;

    grant_all_but(&app.stripe, &[Resource::Coupons]).await;
    assert_error(
        app.connect("ten_1", &key("rk_test_", "Met1")).await,
        422,
        "missing_permissions",
    )
    .await;
    app.stripe.reset().await;
    answer_all(&app.stripe, Answer::Granted).await;
    assert_eq!(
        app.connect("ten_1", &key("rk_test_", "Met2"))
            .await
            .status(),
        201
    );

    // The gauges come from the health snapshot, refreshed in the background. The
    // connections gauge may still hold what an earlier app in this process set, so the
    // wait is on this app's own series (set in the same refresh, just before).
    let sealed = format!(r#"atlas_sealed_keys{{master_key_id="{key_id}"}}"#);
    eventually("the gauges count the connection", || async {
        let text = scrape(&app).await;
        series_value(&text, &sealed) == 2.0
            && series_value(&text, r#"atlas_connections{status="active"}"#) == 1.0
    })
    .await;
    let text = scrape(&app).await;
    for (series, moved) in &counters {
        let delta = series_value(&text, series) - series_value(&before, series);
        if alone {
            assert_eq!(
                delta, *moved,
                "{series} moved by {delta}, not {moved}:\n{text}"
            );
        } else {
            assert!(
                delta >= *moved,
                "{series} moved by {delta}, not {moved}:\n{text}"
            );
        }
    }
    // A bucket of the latency histogram, and the gauges read from this app's database.
    for series in [
        format!("atlas_http_request_duration_seconds_bucket{{{CONNECT},le=\"10\"}}"),
        r#"atlas_connections{status="active"}"#.to_owned(),
        sealed.clone(),
    ] {
        assert!(
            text.contains(&format!("{series} ")),
            "missing {series} in:\n{text}"
        );
    }
    assert_eq!(
        series_value(&text, r#"atlas_connections{status="active"}"#),
        1.0
    );
    assert_eq!(
        series_value(
            &text,
            &format!(r#"atlas_sealed_keys{{master_key_id="{key_id}"}}"#)
        ),
        2.0,
        "the key and the webhook secret"
    );
    assert!(
        !text.contains("ten_1"),
        "tenant ids stay out of metric labels"
    );
}

/// Sealed secrets per master-key id, in id order.
async fn secrets_by_master_key(app: &TestApp) -> Vec<(String, u64)> {
    let counts = app.store.count_secrets_by_master_key().await.unwrap();
    let mut counts: Vec<_> = (counts.into_iter())
        .map(|(id, n)| (id.as_str().to_owned(), n))
        .collect();
    counts.sort();
    counts
}
