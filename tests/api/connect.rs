use std::time::{Duration, Instant};

use atlas_stripe::domain::{Mode, Resource, TenantId};
use reqwest::Method;
use serde_json::json;
use wiremock::matchers::{method, path_regex};
use wiremock::Mock;

use crate::backend_tests;
use crate::helpers::{assert_error, json, spawn_app, spawn_app_with, Backend, TestApp};
use crate::stripe_mock::{
    answer_all, assert_bearer, grant_all_but, key, probe, probe_delayed, probe_path, probes,
    timestamp, Answer, StripeAnswer,
};

backend_tests!(
    a_restricted_key_with_every_permission_connects,
    a_secret_key_connects_with_a_warning,
    key_format_errors_are_specific_and_reach_no_one,
    mode_mismatch_both_ways,
    each_single_missing_resource_is_reported,
    several_missing_and_all_missing,
    invalid_and_expired_keys_are_rejected,
    rate_limited_by_stripe_then_granted,
    persistent_server_errors_are_retryable_502,
    stripe_should_retry_false_is_honoured,
    a_hang_returns_within_the_configured_bound,
    an_html_body_is_inconclusive,
    an_unrecognized_url_never_proves_a_permission,
    probes_overlap_in_time,
    replacing_keeps_the_old_key_until_the_new_one_is_verified,
    concurrent_connects_leave_one_consistent_connection,
    connect_attempts_are_rate_limited_per_tenant,
    verify_moves_status_with_what_stripe_says,
    disconnect_deletes_the_sealed_key,
    unknown_tenant_is_not_connected,
);

const ALL: [&str; 5] = [
    "customers",
    "checkout_sessions",
    "coupons",
    "invoices",
    "webhook_endpoints",
];

async fn app_with_tenant(backend: Backend, mode: Mode) -> TestApp {
    let app = spawn_app(backend).await;
    app.create_tenant("ten_1", mode).await;
    app
}

async fn stored_keys(app: &TestApp) -> i64 {
    app.db
        .scalar("SELECT COUNT(*) FROM stripe_connections")
        .await
}

/// Nothing was stored and the tenant still has no connection.
async fn assert_nothing_stored(app: &TestApp) {
    assert_eq!(stored_keys(app).await, 0);
    let get = app.tenant_request(Method::GET, "ten_1", "").await;
    assert_error(get, 404, "not_connected").await;
}

async fn a_restricted_key_with_every_permission_connects(backend: Backend) {
    let app = app_with_tenant(backend, Mode::Test).await;
    answer_all(&app.stripe, Answer::Granted).await;
    let api_key = key("rk_test_", "Kgd1");
    let response = app.connect("ten_1", &format!("  {api_key}\n")).await;
    assert_eq!(response.status(), 201);
    let body = json(response).await;
    assert_eq!(body["tenant_id"], "ten_1");
    assert_eq!(body["status"], "active");
    assert_eq!(body["mode"], "test");
    assert_eq!(body["key_type"], "restricted");
    assert_eq!(body["key_last4"], "Kgd1");
    assert_eq!(body["warnings"], json!([]));
    for resource in ALL {
        assert_eq!(body["permissions"][resource], "granted", "{resource}");
    }
    for field in ["verified_at", "connected_at"] {
        let value = body[field].as_str().unwrap();
        time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339).unwrap();
    }
    assert!(!body.to_string().contains(&api_key));

    // Exactly five probes, each an update of a random id, none a create; the Events: Read
    // probe (a read of one event); then our webhook endpoint is registered.
    let requests = app.stripe_requests().await;
    let probe_requests = probes(&requests);
    assert_eq!(probe_requests.len(), 5);
    let reads: Vec<String> = (requests.iter())
        .filter(|r| r.method.as_str() == "GET")
        .map(|r| format!("{}?{}", r.url.path(), r.url.query().unwrap_or_default()))
        .collect();
    assert_eq!(reads, ["/v1/events?limit=1"]);
    assert_eq!(requests.len(), 7);
    for request in probe_requests {
        assert_eq!(request.method.as_str(), "POST");
        assert!(request.body.is_empty(), "a probe sends no parameters");
        assert_eq!(
            request.headers["authorization"].to_str().unwrap(),
            format!("Bearer {api_key}")
        );
        let path = request.url.path();
        assert!(
            Resource::ALL
                .iter()
                .any(|r| regex_match(probe_path(*r), path)),
            "{path}"
        );
    }

    let shown = json(app.tenant_request(Method::GET, "ten_1", "").await).await;
    assert_eq!(shown, body);
    let trail = app
        .store
        .audit_trail(Some(&TenantId::parse("ten_1").unwrap()))
        .await
        .unwrap();
    let last = trail.last().unwrap();
    assert_eq!(
        (last.action.as_str(), last.actor.as_str()),
        ("connection.created", "tenant:ten_1")
    );
    assert_eq!(last.detail["key_last4"], "Kgd1");
    assert!(!format!("{trail:?}").contains(&api_key));
}

fn regex_match(pattern: &str, path: &str) -> bool {
    // The patterns are anchored, simple and ours; a tiny matcher keeps regex out of the deps.
    let (prefix, rest) = pattern
        .trim_start_matches('^')
        .trim_end_matches('$')
        .split_once('[')
        .unwrap();
    let suffix = rest.split_once('+').unwrap().1;
    path.starts_with(prefix)
        && path.ends_with(suffix)
        && path[prefix.len()..path.len() - suffix.len()]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric())
        && path.len() > prefix.len() + suffix.len()
}

async fn a_secret_key_connects_with_a_warning(backend: Backend) {
    let app = app_with_tenant(backend, Mode::Live).await;
    answer_all(&app.stripe, Answer::Granted).await;
    let response = app.connect("ten_1", &key("sk_live_", "9xYz")).await;
    assert_eq!(response.status(), 201);
    let body = json(response).await;
    assert_eq!(body["key_type"], "secret");
    assert_eq!(body["mode"], "live");
    assert_eq!(body["warnings"], json!(["secret_key_full_access"]));
}

async fn key_format_errors_are_specific_and_reach_no_one(backend: Backend) {
    let app = app_with_tenant(backend, Mode::Test).await;
    answer_all(&app.stripe, Answer::Granted).await;
    let cases = [
        (key("pk_test_", "Aaaa"), "publishable_key_not_accepted"),
        (key("whsec_", "Bbbb"), "webhook_secret_not_accepted"),
        (
            key("sk_org_test_", "Cccc"),
            "organization_key_not_supported",
        ),
        (
            format!("{}-", key("rk_test_", "Dddd")),
            "invalid_api_key_format",
        ),
        ("rk_test_short".to_owned(), "invalid_api_key_format"),
        (key("ak_test_", "Eeee"), "invalid_api_key_format"),
        (String::new(), "invalid_api_key_format"),
    ];
    for (pasted, code) in cases {
        let body = assert_error(app.connect("ten_1", &pasted).await, 400, code).await;
        if !pasted.is_empty() {
            assert!(!body.to_string().contains(&pasted), "echoed: {body}");
        }
    }
    assert!(app.stripe.received_requests().await.unwrap().is_empty());
    assert_nothing_stored(&app).await;
}

async fn mode_mismatch_both_ways(backend: Backend) {
    let app = spawn_app(backend).await;
    app.create_tenant("ten_1", Mode::Test).await;
    app.create_tenant("ten_2", Mode::Live).await;
    answer_all(&app.stripe, Answer::Granted).await;
    let body = assert_error(
        app.connect("ten_1", &key("rk_live_", "Aaaa")).await,
        422,
        "mode_mismatch",
    )
    .await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("test mode") && message.contains("live key"),
        "{message}"
    );
    let body = assert_error(
        app.connect("ten_2", &key("sk_test_", "Aaaa")).await,
        422,
        "mode_mismatch",
    )
    .await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("live mode") && message.contains("test key"),
        "{message}"
    );
    assert!(
        app.stripe.received_requests().await.unwrap().is_empty(),
        "no probe for a wrong-mode key"
    );
}

async fn each_single_missing_resource_is_reported(backend: Backend) {
    let app = app_with_tenant(backend, Mode::Test).await;
    for resource in Resource::ALL {
        app.stripe.reset().await;
        grant_all_but(&app.stripe, &[resource]).await;
        let body = assert_error(
            app.connect("ten_1", &key("rk_test_", "Aaaa")).await,
            422,
            "missing_permissions",
        )
        .await;
        assert_eq!(body["error"]["missing"], json!([resource.as_str()]));
        let fix_url = body["error"]["fix_url"].as_str().unwrap();
        assert!(fix_url.starts_with("https://dashboard.stripe.com/test/apikeys/create?name=Atlas"));
        for r in Resource::ALL {
            assert!(fix_url.contains(&format!("permissions[]={}", r.dashboard_write_scope())));
        }
        assert!(!body["error"]["message"].as_str().unwrap().contains("IP"));
        app.stripe_requests().await;
    }
    assert_nothing_stored(&app).await;
}

async fn several_missing_and_all_missing(backend: Backend) {
    let app = app_with_tenant(backend, Mode::Live).await;
    grant_all_but(&app.stripe, &[Resource::Coupons, Resource::Invoices]).await;
    let body = assert_error(
        app.connect("ten_1", &key("rk_live_", "Aaaa")).await,
        422,
        "missing_permissions",
    )
    .await;
    assert_eq!(body["error"]["missing"], json!(["coupons", "invoices"]));
    let fix_url = body["error"]["fix_url"].as_str().unwrap();
    assert!(
        fix_url.starts_with("https://dashboard.stripe.com/apikeys/create?"),
        "live link: {fix_url}"
    );

    app.stripe.reset().await;
    answer_all(&app.stripe, Answer::Denied).await;
    let body = assert_error(
        app.connect("ten_1", &key("rk_live_", "Aaaa")).await,
        422,
        "missing_permissions",
    )
    .await;
    assert_eq!(body["error"]["missing"], json!(ALL));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("IP addresses"),
        "hint at IP restrictions"
    );
    assert_nothing_stored(&app).await;
}

async fn invalid_and_expired_keys_are_rejected(backend: Backend) {
    let app = app_with_tenant(backend, Mode::Test).await;
    answer_all(&app.stripe, Answer::InvalidKey).await;
    let body = assert_error(
        app.connect("ten_1", &key("rk_test_", "Aaaa")).await,
        422,
        "key_rejected",
    )
    .await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("invalid"));
    app.stripe.reset().await;
    answer_all(&app.stripe, Answer::ExpiredKey).await;
    let body = assert_error(
        app.connect("ten_1", &key("rk_test_", "Aaaa")).await,
        422,
        "key_rejected",
    )
    .await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("expired"));
    // A 401 is final: no retries.
    assert_eq!(app.stripe_requests().await.len(), 5);
    assert_nothing_stored(&app).await;
}

async fn rate_limited_by_stripe_then_granted(backend: Backend) {
    let app = app_with_tenant(backend, Mode::Test).await;
    probe(Resource::Coupons, Answer::RateLimited)
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&app.stripe)
        .await;
    answer_all(&app.stripe, Answer::Granted).await;
    assert_eq!(
        app.connect("ten_1", &key("rk_test_", "Aaaa"))
            .await
            .status(),
        201
    );
    let requests = app.stripe_requests().await;
    let coupon_calls = requests
        .iter()
        .filter(|r| r.url.path().starts_with("/v1/coupons/"))
        .count();
    assert_eq!(
        (probes(&requests).len(), coupon_calls),
        (6, 2),
        "one retry of the 429"
    );
}

async fn persistent_server_errors_are_retryable_502(backend: Backend) {
    let app = app_with_tenant(backend, Mode::Test).await;
    probe(
        Resource::Invoices,
        Answer::ServerError { should_retry: None },
    )
    .with_priority(1)
    .mount(&app.stripe)
    .await;
    answer_all(&app.stripe, Answer::Granted).await;
    let body = assert_error(
        app.connect("ten_1", &key("rk_test_", "Aaaa")).await,
        502,
        "stripe_unavailable",
    )
    .await;
    assert_eq!(body["error"]["retryable"], true);
    let invoice_calls = app
        .stripe_requests()
        .await
        .iter()
        .filter(|r| r.url.path().starts_with("/v1/invoices/"))
        .count();
    assert_eq!(invoice_calls, 3, "the first try and max_retries = 2");
    assert_nothing_stored(&app).await;
}

async fn stripe_should_retry_false_is_honoured(backend: Backend) {
    let app = app_with_tenant(backend, Mode::Test).await;
    probe(
        Resource::Customers,
        Answer::ServerError {
            should_retry: Some(false),
        },
    )
    .with_priority(1)
    .mount(&app.stripe)
    .await;
    answer_all(&app.stripe, Answer::Granted).await;
    assert_error(
        app.connect("ten_1", &key("rk_test_", "Aaaa")).await,
        502,
        "stripe_unavailable",
    )
    .await;
    let customer_calls = app
        .stripe_requests()
        .await
        .iter()
        .filter(|r| r.url.path().starts_with("/v1/customers/"))
        .count();
    assert_eq!(customer_calls, 1);
}

/// A probe that hangs (Stripe accepts the connection and never answers) ends in a retryable
/// 502 within bounds: the per-attempt timeout when it is the shorter, the probe deadline
/// when that is.
async fn a_hang_returns_within_the_configured_bound(backend: Backend) {
    // (request timeout, retries, probe deadline, at least, under)
    let cases = [
        // Two attempts of 300 ms and a short backoff end it before the 1.5 s deadline.
        ("300", "1", "1500", 600, 1500),
        // One attempt alone (5 s) outlasts the deadline: the deadline (800 ms) ends it.
        ("5000", "2", "800", 800, 2000),
    ];
    for (request_timeout, retries, deadline, at_least_ms, under_ms) in cases {
        let app = spawn_app_with(
            backend,
            &[
                ("stripe.request_timeout_ms", request_timeout),
                ("stripe.max_retries", retries),
                ("stripe.probe_deadline_ms", deadline),
            ],
        )
        .await;
        app.create_tenant("ten_1", Mode::Test).await;
        probe_delayed(
            Resource::WebhookEndpoints,
            Answer::Granted,
            Duration::from_secs(30),
        )
        .with_priority(1)
        .mount(&app.stripe)
        .await;
        answer_all(&app.stripe, Answer::Granted).await;
        let started = Instant::now();
        let response = app.connect("ten_1", &key("rk_test_", "Aaaa")).await;
        let elapsed = started.elapsed();
        assert_error(response, 502, "stripe_unavailable").await;
        let case =
            format!("timeout {request_timeout} ms, deadline {deadline} ms: took {elapsed:?}");
        assert!(elapsed < Duration::from_millis(under_ms), "{case}");
        assert!(elapsed >= Duration::from_millis(at_least_ms), "{case}");
        assert_nothing_stored(&app).await;
    }
}

async fn an_html_body_is_inconclusive(backend: Backend) {
    let app = app_with_tenant(backend, Mode::Test).await;
    probe(Resource::CheckoutSessions, Answer::Html)
        .with_priority(1)
        .mount(&app.stripe)
        .await;
    answer_all(&app.stripe, Answer::Granted).await;
    assert_error(
        app.connect("ten_1", &key("rk_test_", "Aaaa")).await,
        502,
        "stripe_unavailable",
    )
    .await;
    // Even a 404 status is not "granted" without Stripe's JSON error body.
    app.stripe.reset().await;
    Mock::given(method("POST"))
        .and(path_regex(probe_path(Resource::Coupons)))
        .respond_with(wiremock::ResponseTemplate::new(404).set_body_string("Not Found"))
        .with_priority(1)
        .mount(&app.stripe)
        .await;
    answer_all(&app.stripe, Answer::Granted).await;
    assert_error(
        app.connect("ten_1", &key("rk_test_", "Aaaa")).await,
        502,
        "stripe_unavailable",
    )
    .await;
    assert_nothing_stored(&app).await;
}

/// Stripe answers a URL it does not know with 404 `invalid_request_error` and no `code`. A
/// probe path that drifted gets exactly that, for every key: it must not prove anything.
async fn an_unrecognized_url_never_proves_a_permission(backend: Backend) {
    let app = app_with_tenant(backend, Mode::Test).await;
    // Stripe knows four of the probe paths; the Customers probe lands on an unknown URL.
    for resource in Resource::ALL {
        if resource != Resource::Customers {
            probe(resource, Answer::Granted).mount(&app.stripe).await;
        }
    }
    crate::stripe_mock::FakeEndpoints::default()
        .mount(&app.stripe)
        .await;
    let body = assert_error(
        app.connect("ten_1", &key("rk_test_", "Unrl")).await,
        502,
        "stripe_unavailable",
    )
    .await;
    assert_eq!(body["error"]["retryable"], true);
    let requests = app.stripe_requests().await;
    let customer_probe = requests
        .iter()
        .find(|r| r.url.path().starts_with("/v1/customers/"))
        .expect("the customers probe was sent");
    assert!(
        customer_probe.url.path().starts_with("/v1/customers/cus_"),
        "{}",
        customer_probe.url
    );
    // Nothing registered on Stripe, nothing stored here.
    assert!(
        !requests
            .iter()
            .any(|r| r.url.path() == "/v1/webhook_endpoints"),
        "an endpoint was registered for an unproven key"
    );
    assert_nothing_stored(&app).await;
}

async fn probes_overlap_in_time(backend: Backend) {
    let app = app_with_tenant(backend, Mode::Test).await;
    let round_trip = Duration::from_millis(400);
    for resource in Resource::ALL {
        Mock::given(method("POST"))
            .and(path_regex(probe_path(resource)))
            .respond_with(StripeAnswer {
                answer: Answer::Granted,
                delay: Some(round_trip),
            })
            .mount(&app.stripe)
            .await;
    }
    crate::stripe_mock::FakeEndpoints::default()
        .mount(&app.stripe)
        .await;
    let started = Instant::now();
    assert_eq!(
        app.connect("ten_1", &key("rk_test_", "Aaaa"))
            .await
            .status(),
        201
    );
    let elapsed = started.elapsed();
    // Sequential probes would take five round trips (2 s).
    assert!(elapsed >= round_trip, "{elapsed:?}");
    assert!(
        elapsed < round_trip * 2,
        "probes did not overlap: {elapsed:?}"
    );
}

async fn replacing_keeps_the_old_key_until_the_new_one_is_verified(backend: Backend) {
    let app = app_with_tenant(backend, Mode::Test).await;
    answer_all(&app.stripe, Answer::Granted).await;
    let first = json(app.connect("ten_1", &key("rk_test_", "Old1")).await).await;

    // A replacement missing a permission changes nothing.
    app.stripe.reset().await;
    grant_all_but(&app.stripe, &[Resource::Coupons]).await;
    assert_error(
        app.connect("ten_1", &key("rk_test_", "New1")).await,
        422,
        "missing_permissions",
    )
    .await;
    let shown = json(app.tenant_request(Method::GET, "ten_1", "").await).await;
    assert_eq!(shown, first);

    // So does one Stripe cannot answer for.
    app.stripe.reset().await;
    answer_all(&app.stripe, Answer::ServerError { should_retry: None }).await;
    assert_error(
        app.connect("ten_1", &key("rk_test_", "New2")).await,
        502,
        "stripe_unavailable",
    )
    .await;
    assert_eq!(
        json(app.tenant_request(Method::GET, "ten_1", "").await).await,
        first
    );

    // A verified replacement takes over in one step: 200, one sealed row.
    app.stripe.reset().await;
    answer_all(&app.stripe, Answer::Granted).await;
    let replaced = app.connect("ten_1", &key("sk_test_", "New3")).await;
    assert_eq!(replaced.status(), 200);
    let replaced = json(replaced).await;
    assert_eq!(replaced["key_last4"], "New3");
    assert_eq!(replaced["warnings"], json!(["secret_key_full_access"]));
    assert_eq!(stored_keys(&app).await, 1);
    let actions: Vec<String> = app
        .store
        .audit_trail(Some(&TenantId::parse("ten_1").unwrap()))
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.action)
        .collect();
    assert_eq!(
        actions,
        [
            "tenant.created",
            "connection.created",
            "connection.replaced"
        ]
    );
}

async fn concurrent_connects_leave_one_consistent_connection(backend: Backend) {
    let app = app_with_tenant(backend, Mode::Test).await;
    let endpoints = answer_all(&app.stripe, Answer::Granted).await;
    let keys: Vec<String> = (0..6)
        .map(|i| key("rk_test_", &format!("Cc{i:02}")))
        .collect();
    let responses =
        futures_util::future::join_all(keys.iter().map(|k| app.connect("ten_1", k))).await;
    let mut statuses: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 201]);

    let record = app
        .store
        .find_connection(&TenantId::parse("ten_1").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored_keys(&app).await, 1);
    assert_eq!(
        app.db
            .scalar("SELECT COUNT(*) FROM stripe_connections")
            .await,
        1
    );
    // The stored last4 and the sealed key belong to the same paste.
    let keyring = app.keyring();
    let plaintext = keyring
        .open(&record.secret_context(), &record.sealed)
        .unwrap();
    let opened = String::from_utf8(plaintext.to_vec()).unwrap();
    assert!(keys.contains(&opened));
    assert!(opened.ends_with(&record.key_last4));
    // Every connect registered or kept an endpoint on Stripe; the losers' endpoints were
    // deleted again: exactly one is left, and it is the stored one.
    let left: Vec<String> = endpoints.endpoints().into_iter().map(|e| e.id).collect();
    let stored = record.webhook.as_ref().expect("a stored endpoint");
    assert_eq!(
        left,
        std::slice::from_ref(&stored.endpoint_id),
        "endpoints left on Stripe besides the stored one"
    );
    assert!(endpoints.endpoints().iter().all(|e| e
        .url
        .ends_with(&format!("/webhooks/stripe/{}", record.connection_id))));
}

async fn connect_attempts_are_rate_limited_per_tenant(backend: Backend) {
    let app = spawn_app_with(backend, &[("limits.connect_attempts_per_minute", "3")]).await;
    app.create_tenant("ten_1", Mode::Test).await;
    app.create_tenant("ten_2", Mode::Test).await;
    answer_all(&app.stripe, Answer::InvalidKey).await;
    for _ in 0..3 {
        assert_error(
            app.connect("ten_1", &key("rk_test_", "Aaaa")).await,
            422,
            "key_rejected",
        )
        .await;
    }
    let limited = app.connect("ten_1", &key("rk_test_", "Aaaa")).await;
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body = assert_error(limited, 429, "rate_limited").await;
    assert_eq!(body["error"]["retry_after"], retry_after);
    // Malformed pastes count too, and nothing more reaches Stripe.
    assert_error(app.connect("ten_1", "garbage").await, 429, "rate_limited").await;
    assert_eq!(app.stripe_requests().await.len(), 15);
    // Another tenant has its own budget.
    assert_error(
        app.connect("ten_2", &key("rk_test_", "Aaaa")).await,
        422,
        "key_rejected",
    )
    .await;
}

async fn verify_moves_status_with_what_stripe_says(backend: Backend) {
    let app = app_with_tenant(backend, Mode::Test).await;
    answer_all(&app.stripe, Answer::Granted).await;
    let api_key = key("rk_test_", "Aaaa");
    let connected = json(app.connect("ten_1", &api_key).await).await;
    // Every verification below must probe with the stored key, opened: the mocks answer
    // any key, so the bearer is checked on every request.
    let (app_ref, key_ref) = (&app, api_key.as_str());
    let sent_with_the_key = || async move {
        let requests = app_ref.stripe_requests().await;
        assert_bearer(&requests, key_ref);
        probes(&requests).len()
    };
    sent_with_the_key().await;
    app.stripe.reset().await;
    answer_all(&app.stripe, Answer::Granted).await;

    let verify = || app.tenant_request(Method::POST, "ten_1", "/verify");
    // Still granted: active, verified_at moves forward.
    let body = json(verify().await).await;
    assert_eq!(body["status"], "active");
    assert!(
        timestamp(&body["verified_at"]) > timestamp(&connected["verified_at"]),
        "verified_at did not move: {} then {}",
        connected["verified_at"],
        body["verified_at"]
    );
    assert_eq!(sent_with_the_key().await, 5, "five probes, nothing else");
    let mut last_verified = timestamp(&body["verified_at"]);

    // A permission removed on the dashboard.
    app.stripe.reset().await;
    grant_all_but(&app.stripe, &[Resource::Invoices]).await;
    let body = json(verify().await).await;
    assert_eq!(body["status"], "needs_attention");
    assert_eq!(body["permissions"]["invoices"], "missing");
    assert!(timestamp(&body["verified_at"]) > last_verified);
    last_verified = timestamp(&body["verified_at"]);
    sent_with_the_key().await;

    // Stripe unavailable: 502 and nothing changes.
    app.stripe.reset().await;
    answer_all(&app.stripe, Answer::ServerError { should_retry: None }).await;
    assert_error(verify().await, 502, "stripe_unavailable").await;
    sent_with_the_key().await;
    let shown = json(app.tenant_request(Method::GET, "ten_1", "").await).await;
    assert_eq!(shown["status"], "needs_attention");
    assert_eq!(timestamp(&shown["verified_at"]), last_verified);

    // The key was rolled: revoked.
    app.stripe.reset().await;
    answer_all(&app.stripe, Answer::InvalidKey).await;
    let body = json(verify().await).await;
    assert_eq!(body["status"], "revoked");
    assert!(timestamp(&body["verified_at"]) > last_verified);
    last_verified = timestamp(&body["verified_at"]);
    sent_with_the_key().await;

    // Permission restored and key valid again: active.
    app.stripe.reset().await;
    answer_all(&app.stripe, Answer::Granted).await;
    let body = json(verify().await).await;
    assert_eq!(body["status"], "active");
    assert!(timestamp(&body["verified_at"]) > last_verified);
    sent_with_the_key().await;
}

async fn disconnect_deletes_the_sealed_key(backend: Backend) {
    let app = app_with_tenant(backend, Mode::Test).await;
    answer_all(&app.stripe, Answer::Granted).await;
    assert_eq!(
        app.connect("ten_1", &key("rk_test_", "Aaaa"))
            .await
            .status(),
        201
    );
    assert_eq!(
        app.tenant_request(Method::DELETE, "ten_1", "")
            .await
            .status(),
        204
    );
    assert_nothing_stored(&app).await;
    assert_error(
        app.tenant_request(Method::DELETE, "ten_1", "").await,
        404,
        "not_connected",
    )
    .await;
    assert_error(
        app.tenant_request(Method::POST, "ten_1", "/verify").await,
        404,
        "not_connected",
    )
    .await;
    // And the tenant can connect again.
    assert_eq!(
        app.connect("ten_1", &key("rk_test_", "Bbbb"))
            .await
            .status(),
        201
    );
}

async fn unknown_tenant_is_not_connected(backend: Backend) {
    let app = spawn_app(backend).await;
    answer_all(&app.stripe, Answer::Granted).await;
    assert_error(
        app.connect("ten_9", &key("rk_test_", "Aaaa")).await,
        404,
        "not_connected",
    )
    .await;
    assert!(app.stripe.received_requests().await.unwrap().is_empty());
}

backend_tests!(the_required_resources_are_configuration);

async fn the_required_resources_are_configuration(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[("stripe.required_resources", "customers,coupons")],
    )
    .await;
    app.create_tenant("ten_1", Mode::Test).await;
    // Invoices would be denied, but Atlas does not need it in this configuration.
    grant_all_but(&app.stripe, &[Resource::Invoices]).await;
    let body = json(app.connect("ten_1", &key("rk_test_", "Aaaa")).await).await;
    assert_eq!(body["status"], "active");
    assert_eq!(
        body["permissions"],
        json!({"customers": "granted", "coupons": "granted"})
    );
    assert_eq!(probes(&app.stripe_requests().await).len(), 2);
}
