//! Hostile traffic: clients that lie about methods, stall, or upload to made-up ids.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use atlas_stripe::auth::Scope;
use atlas_stripe::crypto::{Keyring, MasterKeyId};
use reqwest::Method;
use secrecy::ExposeSecret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend_tests;
use crate::helpers::{assert_error, spawn_app, spawn_app_with, Backend, TestApp};
use crate::stripe_mock::key;

backend_tests!(
    odd_methods_and_paths_add_no_metric_series,
    webhook_uploads_to_unknown_ids_are_refused_before_the_body,
    endless_chunked_answers_from_stripe_are_cut_off,
    scope_is_judged_before_parameters,
    scrapes_and_probes_never_reach_the_database,
);

async fn scrape(app: &TestApp) -> String {
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap();
    metrics.text().await.unwrap()
}

/// The HTTP series lines in `/metrics` (one per label set).
async fn http_series(app: &TestApp) -> Vec<String> {
    let text = scrape(app).await;
    text.lines()
        .filter(|l| l.starts_with("atlas_http_requests_total{"))
        .map(|l| {
            l.rsplit_once(' ')
                .map_or(l, |(series, _)| series)
                .to_owned()
        })
        .collect()
}

async fn odd_methods_and_paths_add_no_metric_series(backend: Backend) {
    let app = spawn_app(backend).await;
    let odd = |i: usize| Method::from_bytes(format!("XQWERTY{i}").as_bytes()).unwrap();
    // One of each kind first, so the closed set's series exist.
    app.http
        .request(odd(0), app.url("/healthz"))
        .send()
        .await
        .unwrap();
    app.http
        .request(odd(0), app.url("/healthz/0"))
        .send()
        .await
        .unwrap();
    app.http
        .get(app.url("/no/such/path/0"))
        .send()
        .await
        .unwrap();
    let before = http_series(&app).await;
    for i in 1..1500 {
        let response = app
            .http
            .request(odd(i), app.url(&format!("/healthz/{i}")))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_client_error());
        app.http
            .get(app.url(&format!("/random/{i}/path")))
            .send()
            .await
            .unwrap();
    }
    let after = http_series(&app).await;
    assert!(
        after.iter().any(|s| s.contains(r#"method="other""#)),
        "odd methods count as `other`: {after:?}"
    );
    assert!(after.iter().any(|s| s.contains(r#"route="unmatched""#)));
    // Series are process-wide, and tests beside this one (under `cargo test`) add their
    // own: what is judged is what this app's traffic could have added. None names an odd
    // method or a path, and there are not thousands more of them (a label per method or
    // per path would add about 3000).
    let new: Vec<_> = after.iter().filter(|s| !before.contains(s)).collect();
    assert!(
        !new.iter()
            .any(|s| s.contains("XQWERTY") || s.contains("/random/") || s.contains("/healthz/")),
        "new series: {new:?}"
    );
    assert!(new.len() < 50, "{} new series: {new:?}", new.len());
}

/// Sends only the head of a POST that announces a 1 MiB body, and reads the answer.
async fn stalled_upload(app: &TestApp, path: &str) -> String {
    let host = app.address.trim_start_matches("http://");
    let mut socket = TcpStream::connect(host).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Stripe-Signature: t=1,v1=00\r\nContent-Length: 1048576\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut answer))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

async fn webhook_uploads_to_unknown_ids_are_refused_before_the_body(backend: Backend) {
    let app = spawn_app(backend).await;
    let answer = stalled_upload(&app, "/webhooks/stripe/con_madeup12345678901234").await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(
        answer.contains(r#""code":"unknown_connection""#),
        "{answer}"
    );
}

/// A "Stripe" that answers every request with a chunked 404 body of `offered` bytes, and
/// records the most bytes it managed to write on one connection.
async fn endless_chunked_stripe(offered: usize) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let most_written = Arc::new(AtomicUsize::new(0));
    let record = most_written.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut request = vec![0; 16 * 1024];
                let _ = socket.read(&mut request).await;
                let head = "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\
                            Transfer-Encoding: chunked\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b' '; 64 * 1024];
                let framed =
                    [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
                let mut written = 0;
                while written < offered {
                    if socket.write_all(&framed).await.is_err() {
                        break;
                    }
                    written += chunk.len();
                    record.fetch_max(written, Ordering::Relaxed);
                }
            });
        }
    });
    (address, most_written)
}

async fn endless_chunked_answers_from_stripe_are_cut_off(backend: Backend) {
    const OFFERED: usize = 64 << 20;
    let (stripe, most_written) = endless_chunked_stripe(OFFERED).await;
    let app = spawn_app_with(backend, &[("stripe.api_base", stripe.as_str())]).await;
    app.create_tenant("ten_1", atlas_stripe::domain::Mode::Test)
        .await;
    let response = app.connect("ten_1", &key("rk_test_", "Chnk")).await;
    let body = assert_error(response, 502, "stripe_unavailable").await;
    assert_eq!(body["error"]["retryable"], true);
    // Reading stopped at the 1 MiB cap; what the server could write beyond it sits in
    // socket buffers. Reading it all would have taken 64 MiB per connection.
    let written = most_written.load(Ordering::Relaxed);
    assert!(
        written < 16 << 20,
        "Stripe wrote {written} bytes on one connection"
    );
}

/// A token without the route's scope learns nothing about the parameters: 403 before 400;
/// with the scope, a parameter that does not parse is a 400 in our error shape.
async fn scope_is_judged_before_parameters(backend: Backend) {
    let app = spawn_app(backend).await;
    let none = app.service_token(&[Scope::OpsRead]).await;
    let all = app
        .service_token(&[Scope::KeysRead, Scope::TenantsWrite, Scope::EventsRead])
        .await;
    let cases = [
        (Method::GET, "/internal/v1/tenants/bad%20id/stripe/key"),
        (Method::GET, "/internal/v1/tenants/bad%20id/stripe/events"),
        (
            Method::GET,
            "/internal/v1/tenants/ten_1/stripe/events?limit=1&limit=2",
        ),
        (
            Method::GET,
            "/internal/v1/tenants/ten_1/stripe/events?limit=abc",
        ),
        (Method::PUT, "/internal/v1/tenants/bad%20id"),
    ];
    for (method, path) in cases {
        let send = |token: &str| {
            app.http
                .request(method.clone(), app.url(path))
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(r#"{"mode":"test"}"#)
                .send()
        };
        assert_error(send(&none).await.unwrap(), 403, "insufficient_scope").await;
        let body = assert_error(send(&all).await.unwrap(), 400, "invalid_request").await;
        assert!(!body.to_string().contains("bad id"), "{path}: {body}");
    }
}

/// Probes and scrapes read the health snapshot: with a refresh far away, a thousand of
/// them after a connect still report the state of the last refresh, so none of them read
/// the database. Both are made visible to this app alone: its master key has an id of its
/// own, so the sealed-keys gauge of that id is this app's (metrics are process-wide), and
/// the database is made unready (a migration no longer marked applied), so a probe that
/// asked the database would answer 503.
async fn scrapes_and_probes_never_reach_the_database(backend: Backend) {
    let key_id = format!("h{}", atlas_stripe::domain::random_id("", 12));
    let entry = Keyring::generate_entry(&MasterKeyId::parse(&key_id).unwrap());
    let app = spawn_app_with(
        backend,
        &[
            ("server.health_refresh_ms", "3600000"),
            ("crypto.master_keys", entry.expose_secret()),
            ("crypto.active_key_id", &key_id),
        ],
    )
    .await;
    app.create_tenant("ten_1", atlas_stripe::domain::Mode::Test)
        .await;
    crate::stripe_mock::answer_all(&app.stripe, crate::stripe_mock::Answer::Granted).await;
    assert_eq!(
        app.connect("ten_1", &key("rk_test_", "Scrp"))
            .await
            .status(),
        201
    );
    let sealed = format!(r#"atlas_sealed_keys{{master_key_id="{key_id}"}}"#);
    let counts = app.store.count_secrets_by_master_key().await.unwrap();
    assert!(
        counts
            .iter()
            .any(|(id, n)| id.as_str() == key_id && *n == 2),
        "the database holds the key and the webhook secret under {key_id}: {counts:?}"
    );
    app.db
        .execute("UPDATE _sqlx_migrations SET success = false")
        .await;
    assert!(
        app.store.check_ready().await.is_err(),
        "the database itself now says it is not ready"
    );
    for _ in 0..500 {
        let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 200, "/readyz asked the database");
        let text = scrape(&app).await;
        // Counted at start-up, before anything was sealed under the key: no series yet.
        assert!(
            !text.contains(&sealed),
            "a scrape counted the database: {text}"
        );
    }
}
