//! Per-tenant limits on connect and verify, shared by every instance on one database, and
//! verifies of one tenant sharing one probe run.

use std::sync::Arc;
use std::time::Duration;

use atlas_stripe::domain::{Mode, Resource};
use reqwest::Method;

use crate::backend_tests;
use crate::helpers::{assert_error, spawn_app_with, Backend, TestApp};
use crate::stripe_mock::{answer_all, key, probe_delayed, probes, Answer};

backend_tests!(
    concurrent_verifies_share_one_probe_run,
    verify_runs_are_limited_per_tenant,
    connect_limits_hold_across_instances,
);

async fn connected(backend: Backend, extra: &[(&str, &str)]) -> TestApp {
    let app = spawn_app_with(backend, extra).await;
    for tenant in ["ten_1", "ten_2"] {
        app.create_tenant(tenant, Mode::Test).await;
    }
    answer_all(&app.stripe, Answer::Granted).await;
    for tenant in ["ten_1", "ten_2"] {
        assert_eq!(
            app.connect(tenant, &key("rk_test_", "Main")).await.status(),
            201
        );
    }
    app
}

async fn concurrent_verifies_share_one_probe_run(backend: Backend) {
    let app = Arc::new(connected(backend, &[]).await);
    // Slow probes, so that all thirty arrive while the first run is under way.
    app.stripe.reset().await;
    let endpoints = answer_all(&app.stripe, Answer::Granted).await;
    app.stripe.reset().await;
    for resource in Resource::ALL {
        probe_delayed(resource, Answer::Granted, Duration::from_millis(400))
            .mount(&app.stripe)
            .await;
    }
    endpoints.mount(&app.stripe).await;
    let verifies: Vec<_> = (0..30)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { app.tenant_request(Method::POST, "ten_1", "/verify").await })
        })
        .collect();
    for verify in verifies {
        assert_eq!(verify.await.unwrap().status(), 200);
    }
    let requests = app.stripe_requests().await;
    assert_eq!(
        probes(&requests).len(),
        Resource::ALL.len(),
        "thirty verifies, one probe run"
    );
}

async fn verify_runs_are_limited_per_tenant(backend: Backend) {
    let app = connected(backend, &[("limits.verify_attempts_per_minute", "2")]).await;
    for _ in 0..2 {
        let verified = app.tenant_request(Method::POST, "ten_1", "/verify").await;
        assert_eq!(verified.status(), 200);
    }
    let before = probes(&app.stripe_requests().await).len();
    let limited = app.tenant_request(Method::POST, "ten_1", "/verify").await;
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body = assert_error(limited, 429, "rate_limited").await;
    assert_eq!(body["error"]["retryable"], true);
    assert_eq!(
        probes(&app.stripe_requests().await).len(),
        before,
        "a refused verify sends nothing to Stripe"
    );
    // Another tenant has a budget of its own.
    let other = app.tenant_request(Method::POST, "ten_2", "/verify").await;
    assert_eq!(other.status(), 200);
}

/// Two servers on one database, as two instances would be (nothing shared in memory):
/// together they allow the limit, not twice it.
async fn connect_limits_hold_across_instances(backend: Backend) {
    let app = spawn_app_with(backend, &[("limits.connect_attempts_per_minute", "4")]).await;
    let twin = app.twin().await;
    app.create_tenant("ten_1", Mode::Test).await;
    let mut statuses = Vec::new();
    for attempt in 0..8 {
        // Malformed pastes count against the limit too, and cost Stripe nothing.
        let server = if attempt % 2 == 0 { &app } else { &twin };
        statuses.push(server.connect("ten_1", "garbage").await.status().as_u16());
    }
    assert_eq!(statuses, [400, 400, 400, 400, 429, 429, 429, 429]);
}
