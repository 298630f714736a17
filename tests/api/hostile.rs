//! Hostile traffic: clients that lie about methods, stall, or upload to made-up ids.

use std::time::Duration;

use reqwest::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend_tests;
use crate::helpers::{spawn_app, Backend, TestApp};

backend_tests!(
    odd_methods_and_paths_add_no_metric_series,
    webhook_uploads_to_unknown_ids_are_refused_before_the_body,
);

/// The HTTP series lines in `/metrics` (one per label set).
async fn http_series(app: &TestApp) -> Vec<String> {
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
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
    // The scrape itself adds its own series once; nothing else is new.
    let new: Vec<_> = after.iter().filter(|s| !before.contains(s)).collect();
    assert!(
        new.iter().all(|s| s.contains(r#"route="/metrics""#)),
        "new series: {new:?}"
    );
    assert!(
        after.len() <= before.len() + 1,
        "{} -> {}",
        before.len(),
        after.len()
    );
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
