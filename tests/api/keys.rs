//! The charging services' key fetch, its accounting, and the ops view.

use std::time::Duration;

use atlas_stripe::auth::Scope;
use atlas_stripe::domain::{Mode, Resource, TenantId};
use reqwest::Method;
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::backend_tests;
use crate::helpers::{
    assert_error, eventually, json, postgres_admin_url, spawn_app, spawn_app_with, Backend, TestApp,
};
use crate::stripe_mock::{answer_all, grant_all_but, key, Answer};

backend_tests!(
    a_charging_service_fetches_the_key,
    fetching_needs_a_live_token_with_keys_read,
    a_revocation_reaches_a_token_the_service_vouched_for,
    not_connected_and_revoked_connections,
    every_fetch_is_tallied_per_token_and_tenant,
    a_graceful_shutdown_flushes_the_tallies,
    every_change_is_audited_without_a_secret,
    ops_list_connections_by_status,
);

fn key_path(tenant: &str) -> String {
    format!("/internal/v1/tenants/{tenant}/stripe/key")
}

async fn fetch(app: &TestApp, tenant: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = app.http.get(app.url(&key_path(tenant)));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

async fn connected_app(backend: Backend, extra: &[(&str, &str)]) -> (TestApp, String) {
    let app = spawn_app_with(backend, extra).await;
    app.create_tenant("ten_1", Mode::Live).await;
    answer_all(&app.stripe, Answer::Granted).await;
    let api_key = key("rk_live_", "Live");
    assert_eq!(app.connect("ten_1", &api_key).await.status(), 201);
    (app, api_key)
}

async fn a_charging_service_fetches_the_key(backend: Backend) {
    let (app, api_key) = connected_app(backend, &[]).await;
    let token = app.service_token(&[Scope::KeysRead]).await;
    let response = fetch(&app, "ten_1", Some(&token)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert_eq!(
        json(response).await,
        json!({"tenant_id": "ten_1", "mode": "live", "key_type": "restricted", "status": "active", "api_key": api_key})
    );
}

async fn fetching_needs_a_live_token_with_keys_read(backend: Backend) {
    let (app, _) = connected_app(backend, &[]).await;
    assert_error(fetch(&app, "ten_1", None).await, 401, "unauthenticated").await;
    assert_error(
        fetch(&app, "ten_1", Some("ast_nope")).await,
        401,
        "unauthenticated",
    )
    .await;
    let tenant_token = app.tenant_token("ten_1");
    assert_error(
        fetch(&app, "ten_1", Some(&tenant_token)).await,
        401,
        "unauthenticated",
    )
    .await;
    let ops = app
        .service_token(&[Scope::OpsRead, Scope::TenantsWrite])
        .await;
    assert_error(
        fetch(&app, "ten_1", Some(&ops)).await,
        403,
        "insufficient_scope",
    )
    .await;
    // Right id, wrong secret part.
    let real = app.service_token(&[Scope::KeysRead]).await;
    let forged = format!(
        "{}{}",
        &real[..real.len() - 4],
        if real.ends_with("AAAA") {
            "BBBB"
        } else {
            "AAAA"
        }
    );
    assert_error(
        fetch(&app, "ten_1", Some(&forged)).await,
        401,
        "unauthenticated",
    )
    .await;
    assert_eq!(fetch(&app, "ten_1", Some(&real)).await.status(), 200);
    revoke(&app, &real).await;
    refused_within(&app, &real, Duration::from_secs(1)).await;
}

async fn revoke(app: &TestApp, token: &str) {
    let id = token.split('_').nth(1).unwrap();
    assert!(app
        .store
        .revoke_service_token(id, &atlas_stripe::store::Actor::Cli)
        .await
        .unwrap());
}

/// A revocation reaches an instance that vouched for the token when the trigger's notice
/// does (milliseconds): `token` is refused within `bound`, and from then on.
async fn refused_within(app: &TestApp, token: &str, bound: Duration) {
    let revoked = std::time::Instant::now();
    eventually("the revoked token is refused", || async {
        fetch(app, "ten_1", Some(token)).await.status() == 401
    })
    .await;
    assert!(
        revoked.elapsed() < bound,
        "a revoked token was served for {:?}",
        revoked.elapsed()
    );
    for _ in 0..5 {
        assert_error(
            fetch(app, "ten_1", Some(token)).await,
            401,
            "unauthenticated",
        )
        .await;
    }
}

/// The service's token listener in this test's database, as `pg_stat_activity` rows.
const LISTENER_ROWS: &str = "FROM pg_stat_activity WHERE datname = current_database() \
    AND application_name = 'atlas-stripe-token-listener'";

/// How often this app's token cache served (its own count: `/metrics` adds up every app
/// in the test process).
fn cache_hits(app: &TestApp) -> u64 {
    app.token_cache.hits()
}

/// Waits until the app's token listener is subscribed in its database.
async fn listener_subscribed(app: &TestApp) {
    eventually("the token listener subscribes", || async {
        app.db
            .scalar(&format!("SELECT count(*) {LISTENER_ROWS}"))
            .await
            == 1
    })
    .await;
}

/// On PostgreSQL the service keeps the tokens it vouched for (one row per fetch instead
/// of a join); a revocation still reaches it at once. SQLite never keeps them.
async fn a_revocation_reaches_a_token_the_service_vouched_for(backend: Backend) {
    let (app, _) = connected_app(backend, &[]).await;
    let token = app.service_token(&[Scope::KeysRead]).await;
    match backend {
        Backend::Postgres => {
            listener_subscribed(&app).await;
            eventually("the cache serves the token", || async {
                assert_eq!(fetch(&app, "ten_1", Some(&token)).await.status(), 200);
                cache_hits(&app) >= 2
            })
            .await
        }
        Backend::Sqlite => {
            for _ in 0..3 {
                assert_eq!(fetch(&app, "ten_1", Some(&token)).await.status(), 200);
            }
            assert_eq!(cache_hits(&app), 0);
        }
    }
    revoke(&app, &token).await;
    refused_within(&app, &token, Duration::from_secs(1)).await;
}

/// Holds the app's database closed to new sessions (those open stay open) until dropped,
/// or until [`Gate::open`]: the token listener cannot subscribe again meanwhile.
struct Gate {
    admin: sqlx::PgConnection,
    database: String,
}

impl Gate {
    async fn close(app: &TestApp) -> Self {
        use sqlx::Connection;
        let database = app.db.url.rsplit('/').next().unwrap().to_owned();
        let mut admin = sqlx::PgConnection::connect(&postgres_admin_url())
            .await
            .unwrap();
        let close = format!("ALTER DATABASE {database} ALLOW_CONNECTIONS false");
        sqlx::query(&close).execute(&mut admin).await.unwrap();
        Self { admin, database }
    }

    /// Ends the token listener's session (the subscription is lost).
    async fn kill_listener(&mut self) {
        let killed: i64 = sqlx::query_scalar(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = '{}' AND application_name = 'atlas-stripe-token-listener'",
            self.database
        ))
        .fetch_one(&mut self.admin)
        .await
        .unwrap();
        assert_eq!(killed, 1);
    }

    async fn open(mut self) {
        let open = format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", self.database);
        sqlx::query(&open).execute(&mut self.admin).await.unwrap();
    }
}

/// While its subscription is down the service keeps no token: a revocation whose notice
/// nobody heard is refused at once, and tokens are kept again once subscribed. The
/// re-subscription is held back for the whole check, so that it cannot empty the cache.
#[tokio::test]
async fn no_token_is_kept_while_the_subscription_is_down() {
    // One pooled session, open before the gate closes: the app never needs another.
    let (app, _) = connected_app(Backend::Postgres, &[("database.max_connections", "1")]).await;
    let token = app.service_token(&[Scope::KeysRead]).await;
    let fresh = app.service_token(&[Scope::KeysRead]).await;
    listener_subscribed(&app).await;
    eventually("the cache serves the token", || async {
        assert_eq!(fetch(&app, "ten_1", Some(&token)).await.status(), 200);
        cache_hits(&app) >= 1
    })
    .await;
    let mut gate = Gate::close(&app).await;
    gate.kill_listener().await;
    revoke(&app, &token).await;
    // Well within MAX_AGE (5 s): the entry was dropped, not aged out.
    refused_within(&app, &token, Duration::from_secs(2)).await;
    // Longer than the listener waits between tries (1 s): no token is kept meanwhile.
    let before = cache_hits(&app);
    let until = std::time::Instant::now() + Duration::from_millis(1_500);
    while std::time::Instant::now() < until {
        assert_eq!(fetch(&app, "ten_1", Some(&fresh)).await.status(), 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        cache_hits(&app),
        before,
        "a token was kept while unsubscribed"
    );

    gate.open().await;
    eventually("the cache serves again once subscribed", || async {
        assert_eq!(fetch(&app, "ten_1", Some(&fresh)).await.status(), 200);
        cache_hits(&app) > before
    })
    .await;
}

/// The proxy judges its caller's token like every internal route, from the cache when it
/// vouches: then a proxied call reads one row (the key), not the token too.
#[tokio::test]
async fn a_proxied_call_is_authorised_from_the_token_cache() {
    let (app, _) = connected_app(Backend::Postgres, &[]).await;
    Mock::given(method("GET"))
        .and(path("/v1/customers"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(
            r#"{"object":"list","data":[],"has_more":false}"#,
            "application/json",
        ))
        .mount(&app.stripe)
        .await;
    let token = app.service_token(&[Scope::StripeCall]).await;
    let call = || async {
        let url = app.url("/internal/v1/tenants/ten_1/stripe/v1/customers");
        let response = app.http.get(url).bearer_auth(&token).send().await.unwrap();
        assert_eq!(response.status(), 200);
    };
    listener_subscribed(&app).await;
    eventually("the cache serves the proxy's caller", || async {
        call().await;
        cache_hits(&app) >= 1
    })
    .await;
    let before = cache_hits(&app);
    for _ in 0..5 {
        call().await;
    }
    assert_eq!(
        cache_hits(&app) - before,
        5,
        "a proxied call read its token"
    );
}

async fn not_connected_and_revoked_connections(backend: Backend) {
    let (app, _) = connected_app(backend, &[]).await;
    let token = app.service_token(&[Scope::KeysRead]).await;
    app.create_tenant("ten_2", Mode::Test).await;
    assert_error(
        fetch(&app, "ten_2", Some(&token)).await,
        404,
        "not_connected",
    )
    .await;
    assert_error(
        fetch(&app, "ten_none", Some(&token)).await,
        404,
        "not_connected",
    )
    .await;
    assert_error(
        fetch(&app, "bad id", Some(&token)).await,
        400,
        "invalid_request",
    )
    .await;

    // A permission removed: the key still works for the rest, so it is served.
    app.stripe.reset().await;
    grant_all_but(&app.stripe, &[Resource::Coupons]).await;
    app.tenant_request(Method::POST, "ten_1", "/verify").await;
    let body = json(fetch(&app, "ten_1", Some(&token)).await).await;
    assert_eq!(body["status"], "needs_attention");

    // Rolled on the dashboard: never served.
    app.stripe.reset().await;
    answer_all(&app.stripe, Answer::InvalidKey).await;
    app.tenant_request(Method::POST, "ten_1", "/verify").await;
    let body = assert_error(
        fetch(&app, "ten_1", Some(&token)).await,
        409,
        "connection_not_active",
    )
    .await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("revoked"));
}

async fn wait_for_tallies(
    app: &TestApp,
    tenant: &str,
    expected_total: i64,
) -> Vec<atlas_stripe::store::KeyFetchTally> {
    let tenant = TenantId::parse(tenant).unwrap();
    for _ in 0..100 {
        let tallies = app.store.key_fetches(&tenant).await.unwrap();
        if tallies.iter().map(|t| t.fetch_count).sum::<i64>() >= expected_total {
            return tallies;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("tallies never reached {expected_total}");
}

async fn every_fetch_is_tallied_per_token_and_tenant(backend: Backend) {
    let (app, _) = connected_app(backend, &[("accounting.flush_interval_ms", "50")]).await;
    app.create_tenant("ten_2", Mode::Live).await;
    assert_eq!(
        app.connect("ten_2", &key("rk_live_", "Two2"))
            .await
            .status(),
        201
    );
    let a = app.service_token(&[Scope::KeysRead]).await;
    let b = app.service_token(&[Scope::KeysRead]).await;
    // A refused fetch is not a fetch: a token without keys:read is answered 403, and is
    // tallied nowhere (sent first, so its tally would be flushed before the others').
    let ops = app.service_token(&[Scope::OpsRead]).await;
    for tenant in ["ten_1", "ten_2"] {
        assert_error(
            fetch(&app, tenant, Some(&ops)).await,
            403,
            "insufficient_scope",
        )
        .await;
    }
    for _ in 0..3 {
        assert_eq!(fetch(&app, "ten_1", Some(&a)).await.status(), 200);
    }
    for _ in 0..2 {
        assert_eq!(fetch(&app, "ten_1", Some(&b)).await.status(), 200);
    }
    assert_eq!(fetch(&app, "ten_2", Some(&a)).await.status(), 200);
    for _ in 0..4 {
        assert_eq!(fetch(&app, "ten_2", Some(&b)).await.status(), 200);
    }
    let id = |t: &str| t.split('_').nth(1).unwrap().to_owned();
    for (tenant, expected_total, expected) in [
        ("ten_1", 5, vec![(id(&a), 3), (id(&b), 2)]),
        ("ten_2", 5, vec![(id(&a), 1), (id(&b), 4)]),
    ] {
        let tallies = wait_for_tallies(&app, tenant, expected_total).await;
        // Both fit one minute unless the test straddles a minute boundary.
        let mut merged: std::collections::BTreeMap<String, i64> = Default::default();
        for tally in &tallies {
            assert_eq!(tally.tenant_id.as_str(), tenant);
            *merged.entry(tally.token_id.clone()).or_default() += tally.fetch_count;
            assert_eq!(tally.window_start.second(), 0);
            assert!(tally.last_fetched_at >= tally.window_start);
        }
        let mut expected = expected;
        expected.sort();
        assert_eq!(
            merged.into_iter().collect::<Vec<_>>(),
            expected,
            "{tenant}: the refused token ({}) must not appear",
            id(&ops)
        );
    }
}

async fn a_graceful_shutdown_flushes_the_tallies(backend: Backend) {
    // A flush interval far longer than the test: only the shutdown flush can write.
    let (app, _) = connected_app(backend, &[("accounting.flush_interval_ms", "3600000")]).await;
    let token = app.service_token(&[Scope::KeysRead]).await;
    for _ in 0..4 {
        assert_eq!(fetch(&app, "ten_1", Some(&token)).await.status(), 200);
    }
    let store = app.store.clone();
    app.shut_down().await;
    let tallies = store
        .key_fetches(&TenantId::parse("ten_1").unwrap())
        .await
        .unwrap();
    assert_eq!(tallies.iter().map(|t| t.fetch_count).sum::<i64>(), 4);
}

async fn every_change_is_audited_without_a_secret(backend: Backend) {
    let (app, first_key) = connected_app(backend, &[]).await;
    let second_key = key("rk_live_", "Scnd");
    assert_eq!(app.connect("ten_1", &second_key).await.status(), 200);
    assert_eq!(
        app.tenant_request(Method::POST, "ten_1", "/verify")
            .await
            .status(),
        200
    );
    assert_eq!(
        app.tenant_request(Method::DELETE, "ten_1", "")
            .await
            .status(),
        204
    );
    let trail = app.store.audit_trail(None).await.unwrap();
    let rows: Vec<(String, String, Option<String>)> = trail
        .iter()
        .map(|a| {
            let tenant = a.tenant_id.as_ref().map(|t| t.as_str().to_owned());
            (a.actor.clone(), a.action.clone(), tenant)
        })
        .collect();
    let tenant = Some("ten_1".to_owned());
    assert_eq!(
        rows,
        [
            ("cli".into(), "tenant.created".into(), tenant.clone()),
            (
                "tenant:ten_1".into(),
                "connection.created".into(),
                tenant.clone()
            ),
            (
                "tenant:ten_1".into(),
                "connection.replaced".into(),
                tenant.clone()
            ),
            (
                "tenant:ten_1".into(),
                "connection.verified".into(),
                tenant.clone()
            ),
            (
                "tenant:ten_1".into(),
                "connection.deleted".into(),
                tenant.clone()
            ),
        ]
    );
    assert_eq!(trail[2].detail["same_key"], false);
    let text = format!("{trail:?}");
    for secret in [&first_key, &second_key] {
        assert!(!text.contains(secret.as_str()) && !text.contains(&secret[8..]));
    }
}

async fn ops_list_connections_by_status(backend: Backend) {
    let app = spawn_app(backend).await;
    for tenant in ["ten_a", "ten_b", "ten_c"] {
        app.create_tenant(tenant, Mode::Test).await;
    }
    answer_all(&app.stripe, Answer::Granted).await;
    for tenant in ["ten_a", "ten_b", "ten_c"] {
        assert_eq!(
            app.connect(tenant, &key("rk_test_", "Aaaa")).await.status(),
            201
        );
    }
    app.stripe.reset().await;
    grant_all_but(&app.stripe, &[Resource::WebhookEndpoints]).await;
    app.tenant_request(Method::POST, "ten_b", "/verify").await;

    let ops = app.service_token(&[Scope::OpsRead]).await;
    let list = |query: &'static str, token: String| {
        let url = app.url(&format!("/internal/v1/connections{query}"));
        let http = app.http.clone();
        async move { http.get(url).bearer_auth(token).send().await.unwrap() }
    };
    let attention = json(list("?status=needs_attention", ops.clone()).await).await;
    let tenants: Vec<&str> = attention
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tenant_id"].as_str().unwrap())
        .collect();
    assert_eq!(tenants, ["ten_b"]);
    assert_eq!(attention[0]["permissions"]["webhook_endpoints"], "missing");
    assert!(attention[0].get("api_key").is_none());
    assert_eq!(
        json(list("", ops.clone()).await)
            .await
            .as_array()
            .unwrap()
            .len(),
        3
    );
    for bad in [
        "?status=broken",
        "?limit=1&limit=2",
        "?limit=abc",
        "?limit=0",
        "?limit=1001",
        "?after=ten_a",
        "?status=%ZZ",
    ] {
        let body = assert_error(list(bad, ops.clone()).await, 400, "invalid_request").await;
        assert!(!body.to_string().contains("broken"), "{body}");
    }
    // The scope is judged before any parameter: a token without it learns nothing.
    let keys_only = app.service_token(&[Scope::KeysRead]).await;
    assert_error(list("", keys_only.clone()).await, 403, "insufficient_scope").await;
    assert_error(
        list("?limit=abc", keys_only).await,
        403,
        "insufficient_scope",
    )
    .await;

    // Pages of two, in connection-id order, each naming the next in a Link header.
    let mut seen = Vec::new();
    let mut next = Some("/internal/v1/connections?limit=2".to_owned());
    while let Some(path) = next.take() {
        let response = app
            .http
            .get(app.url(&path))
            .bearer_auth(&ops)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        next = response
            .headers()
            .get("link")
            .map(|l| l.to_str().unwrap().to_owned())
            .map(|link| {
                let (target, rel) = link.split_once("; ").unwrap();
                assert_eq!(rel, r#"rel="next""#);
                target.trim_matches(['<', '>']).to_owned()
            });
        let page = json(response).await;
        let page = page.as_array().unwrap().clone();
        assert!(page.len() <= 2);
        seen.extend(
            page.iter()
                .map(|s| s["tenant_id"].as_str().unwrap().to_owned()),
        );
        assert!(seen.len() <= 4, "the pages end");
    }
    seen.sort();
    assert_eq!(
        seen,
        ["ten_a", "ten_b", "ten_c"],
        "every connection exactly once"
    );
}

/// Two servers on one PostgreSQL: a change committed through one is what the other serves
/// next, with no window of staleness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_never_serves_a_replaced_or_disconnected_key() {
    let (first, old_key) = connected_app(Backend::Postgres, &[]).await;
    let second = first.twin().await;
    let token = first.service_token(&[Scope::KeysRead]).await;
    assert_eq!(
        json(fetch(&second, "ten_1", Some(&token)).await).await["api_key"],
        old_key
    );

    let new_key = key("rk_live_", "Nnew");
    assert_eq!(first.connect("ten_1", &new_key).await.status(), 200);
    assert_eq!(
        json(fetch(&second, "ten_1", Some(&token)).await).await["api_key"],
        new_key
    );

    assert_eq!(
        first
            .tenant_request(Method::DELETE, "ten_1", "")
            .await
            .status(),
        204
    );
    assert_error(
        fetch(&second, "ten_1", Some(&token)).await,
        404,
        "not_connected",
    )
    .await;
}
