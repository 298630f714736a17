//! Issue 21, under a flood: bodies in flight share a budget and past it are answered at once;
//! a declared length over a route's limit is refused before a byte is read; probes have a
//! listener of their own. Each test reproduces an attack recorded in the issue.

use std::time::{Duration, Instant};

use atlas_stripe::auth::Scope;
use atlas_stripe::domain::{Mode, TenantId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend_tests;
use crate::helpers::{spawn_app_with, Backend, TestApp};
use crate::stripe_mock::{answer_all, key, Answer};

backend_tests!(
    stalled_bodies_share_a_budget,
    a_declared_length_over_the_limit_is_413_at_once,
    a_malformed_signature_is_refused_before_the_body,
    probes_answer_beside_idle_sockets,
);

/// An app with ten_1 connected; the connection id its webhook URL names.
async fn connected(backend: Backend, extra: &[(&str, &str)]) -> (TestApp, String) {
    let app = spawn_app_with(backend, extra).await;
    app.create_tenant("ten_1", Mode::Test).await;
    answer_all(&app.stripe, Answer::Granted).await;
    assert_eq!(
        app.connect("ten_1", &key("rk_test_", "Fld")).await.status(),
        201
    );
    let connection = (app.store)
        .find_connection(&TenantId::parse("ten_1").unwrap())
        .await
        .unwrap()
        .expect("connected");
    (app, connection.connection_id)
}

async fn socket(address: &str) -> TcpStream {
    TcpStream::connect(address.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// A `Stripe-Signature` that parses and is fresh (its HMAC is wrong: it never verifies).
fn fresh_signature() -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    format!("t={now},v1={}", "ab".repeat(32))
}

/// Opens a POST to `path` declaring `length` bytes, sends `sent` of them and stalls.
async fn stalled_post(
    app: &TestApp,
    path: &str,
    headers: &str,
    length: usize,
    sent: usize,
) -> TcpStream {
    let mut socket = socket(&app.address).await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}\
         Content-Length: {length}\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&vec![b' '; sent]).await.unwrap();
    socket
}

/// What the server answers within `within`, or `None` when it waits.
async fn answer_within(socket: &mut TcpStream, within: Duration) -> Option<String> {
    let mut answer = vec![0; 4096];
    match tokio::time::timeout(within, socket.read(&mut answer)).await {
        Ok(Ok(n)) => Some(String::from_utf8_lossy(&answer[..n]).into_owned()),
        Ok(Err(e)) => Some(format!("read failed: {e}")),
        Err(_) => None,
    }
}

/// Issue 21, attack 1: stalled webhook bodies to a known id were all buffered (646 MB for
/// 300) and answered 408 only at 30 s. Now the bodies in flight share
/// `server.inflight_body_bytes`: past it, 503 `overloaded` at once, retryable; the budget
/// comes back when a stalled sender goes.
async fn stalled_bodies_share_a_budget(backend: Backend) {
    let (app, connection_id) = connected(
        backend,
        &[
            ("server.inflight_body_bytes", "1048576"),
            ("webhooks.body_limit_bytes", "600000"),
        ],
    )
    .await;
    let path = format!("/webhooks/stripe/{connection_id}");
    let signature = format!("Stripe-Signature: {}\r\n", fresh_signature());
    let mut first = stalled_post(&app, &path, &signature, 600_000, 1000).await;
    assert_eq!(
        answer_within(&mut first, Duration::from_millis(300)).await,
        None
    );

    let started = Instant::now();
    let mut second = stalled_post(&app, &path, &signature, 600_000, 1000).await;
    let answer = answer_within(&mut second, Duration::from_secs(5))
        .await
        .expect("answered without waiting for the body");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains(r#""code":"overloaded""#), "{answer}");
    assert!(answer.contains(r#""retryable":true"#), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(
        !answer.contains(r#""type":"#),
        "ours, not Stripe's: {answer}"
    );

    // The proxy's refusal is Stripe-shaped too: the caller's Stripe SDK reads `type` to pick
    // its exception (an APIError, which it retries).
    let service = app.service_token(&[Scope::StripeCall]).await;
    let mut proxied = stalled_post(
        &app,
        "/internal/v1/tenants/ten_1/stripe/v1/customers",
        &format!("Authorization: Bearer {service}\r\n"),
        600_000,
        10,
    )
    .await;
    let answer = answer_within(&mut proxied, Duration::from_secs(5))
        .await
        .expect("answered without waiting for the body");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains(r#""code":"overloaded""#), "{answer}");
    assert!(answer.contains(r#""type":"api_error""#), "{answer}");

    // The first sender goes: its share comes back, and the next is read, not refused.
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = stalled_post(&app, &path, &signature, 600_000, 1000).await;
    assert_eq!(
        answer_within(&mut third, Duration::from_millis(300)).await,
        None,
        "admitted once the budget came back"
    );
}

/// Issue 21, attack 3: `Content-Length: 999999999` with 2 bytes of body was a 408 after
/// 30 s on the proxy, on the JSON routes and on a known webhook id. It is a 413 at once.
async fn a_declared_length_over_the_limit_is_413_at_once(backend: Backend) {
    let (app, connection_id) = connected(backend, &[]).await;
    let service = app
        .service_token(&[Scope::TenantsWrite, Scope::StripeCall])
        .await;
    let auth = format!("Authorization: Bearer {service}\r\n");
    let signature = format!("Stripe-Signature: {}\r\n", fresh_signature());
    let tenant_auth = format!("Authorization: Bearer {}\r\n", app.tenant_token("ten_1"));
    for (path, headers) in [
        (format!("/webhooks/stripe/{connection_id}"), signature),
        (
            "/internal/v1/tenants/ten_1/stripe/v1/customers".to_owned(),
            format!("{auth}Content-Type: application/x-www-form-urlencoded\r\n"),
        ),
        (TestApp::connection_path("ten_1"), tenant_auth.clone()),
    ] {
        let started = Instant::now();
        let mut socket = stalled_post(&app, &path, &headers, 999_999_999, 2).await;
        let answer = answer_within(&mut socket, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{path}: answered without waiting for the body"));
        assert!(started.elapsed() < Duration::from_secs(2), "{path}");
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
        assert!(
            answer.contains(r#""code":"payload_too_large""#),
            "{path}: {answer}"
        );
    }
}

/// A delivery whose `Stripe-Signature` cannot verify (missing, malformed, stale) is refused
/// before its body is read: it holds neither memory nor a share of the budget.
async fn a_malformed_signature_is_refused_before_the_body(backend: Backend) {
    let (app, connection_id) = connected(backend, &[]).await;
    let path = format!("/webhooks/stripe/{connection_id}");
    for headers in [
        String::new(),
        "Stripe-Signature: t=abc,v1=zz\r\n".to_owned(),
        "Stripe-Signature: t=1,v1=00\r\n".to_owned(),
    ] {
        let mut socket = stalled_post(&app, &path, &headers, 500_000, 10).await;
        let answer = answer_within(&mut socket, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{headers:?}: answered without waiting for the body"));
        assert!(answer.starts_with("HTTP/1.1 400"), "{headers:?}: {answer}");
        assert!(answer.contains(r#""code":"webhook_rejected""#), "{answer}");
    }
}

/// Issue 21, attack 2: sockets that send nothing filled the public port's slots, and
/// `/healthz` took up to 15 s. With `server.ops_bind` the probes have their own listener
/// (and are gone from the public one); idle sockets on either port make room at its cap.
async fn probes_answer_beside_idle_sockets(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[
            ("server.ops_bind", "127.0.0.1:0"),
            ("server.max_connections", "20"),
            ("server.header_read_timeout_ms", "10000"),
        ],
    )
    .await;
    let ops = app
        .ops_address
        .clone()
        .expect("the probe listener's address");
    for probe in ["/healthz", "/readyz", "/metrics"] {
        let on_ops = app.http.get(format!("{ops}{probe}")).send().await.unwrap();
        assert_eq!(on_ops.status(), 200, "{probe} on the probe listener");
        let public = app.http.get(app.url(probe)).send().await.unwrap();
        assert_eq!(public.status(), 404, "{probe} is no longer public");
    }

    // More idle sockets than either cap (20 public, 64 probes), none sending a byte.
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(socket(&app.address).await);
    }
    for _ in 0..100 {
        idle.push(socket(&ops).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        // A new connection each time, as a kubelet's probe makes.
        let client = reqwest::Client::new();
        let started = Instant::now();
        let health = client.get(format!("{ops}/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200);
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(500),
        "slowest probe {slowest:?}"
    );
    let started = Instant::now();
    let fresh = reqwest::Client::new();
    let public = fresh.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(public.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// Issue 21: the SQLite file was created mode 0644. The file and the directory made for it
/// are the owner's alone.
#[cfg(unix)]
#[tokio::test]
async fn the_sqlite_file_and_its_directory_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let file = dir.join("atlas.db");
    let url = format!("sqlite://{}", file.display());
    let settings = atlas_stripe::config::Settings::load(None, &[("database.url", url.as_str())])
        .expect("settings");
    let store = atlas_stripe::store::connect(&settings.database)
        .await
        .expect("store");
    store.migrate().await.expect("migrations");
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "the directory");
    assert_eq!(mode(&file), 0o600, "the database file");
}
