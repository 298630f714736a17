//! Clients that stall or trickle: each bound is tested with a raw socket.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atlas_stripe::auth::Scope;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend_tests;
use crate::helpers::{spawn_app_with, Backend, TestApp};

backend_tests!(
    a_stalled_request_head_is_cut_off,
    a_trickled_body_is_a_408_in_our_error_shape,
    an_idle_connection_is_closed,
    connections_past_the_cap_wait_for_a_free_slot,
    idle_connections_make_room_at_the_cap,
    a_peer_past_its_cap_is_refused,
);

async fn socket(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.address.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Reads until the server closes the connection; what it sent meanwhile.
async fn read_to_close(socket: &mut TcpStream, within: Duration) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(within, socket.read_to_end(&mut answer))
        .await
        .expect("the server closed the connection in time")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

async fn a_stalled_request_head_is_cut_off(backend: Backend) {
    let app = spawn_app_with(backend, &[("server.header_read_timeout_ms", "300")]).await;
    let mut socket = socket(&app).await;
    let started = Instant::now();
    socket
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    read_to_close(&mut socket, Duration::from_secs(3)).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
}

/// A whole body, trickled one byte every 100 ms over 3 s, against a 600 ms deadline for
/// the body: each byte comes in time, the body does not. The 408 comes near the deadline,
/// while the client is still sending (a deadline reset by every chunk would let the body
/// finish, and answer it).
async fn a_trickled_body_is_a_408_in_our_error_shape(backend: Backend) {
    const DEADLINE: Duration = Duration::from_millis(600);
    let app = spawn_app_with(backend, &[("server.body_read_timeout_ms", "600")]).await;
    let token = app.service_token(&[Scope::TenantsWrite]).await;
    let body = format!("{:<30}", r#"{"mode":"test"}"#);
    let head = format!(
        "PUT /internal/v1/tenants/ten_1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (mut reader, mut writer) = socket(&app).await.into_split();
    writer.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let sent = Arc::new(AtomicUsize::new(0));
    let trickle = {
        let sent = sent.clone();
        tokio::spawn(async move {
            for byte in body.bytes() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if writer.write_all(&[byte]).await.is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let mut first = [0; 1];
    tokio::time::timeout(Duration::from_secs(5), reader.read_exact(&mut first))
        .await
        .expect("answered in time")
        .expect("an answer");
    let answered_after = started.elapsed();
    let sent_by_then = sent.load(Ordering::SeqCst);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut rest)).await;
    let answer = format!("{}{}", first[0] as char, String::from_utf8_lossy(&rest));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
    assert!(answer.contains(r#""request_id""#), "{answer}");
    assert!(
        answered_after >= DEADLINE - Duration::from_millis(50)
            && answered_after < DEADLINE + Duration::from_millis(900),
        "answered {answered_after:?} after the head, against a {DEADLINE:?} deadline"
    );
    assert!(
        sent_by_then < 30,
        "answered while the body was still coming ({sent_by_then} of 30 bytes sent)"
    );
    trickle.abort();
}

async fn an_idle_connection_is_closed(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[
            ("server.idle_timeout_ms", "300"),
            ("server.header_read_timeout_ms", "10000"),
        ],
    )
    .await;
    let mut socket = socket(&app).await;
    socket
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let answer = read_to_close(&mut socket, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(250));
}

/// A connection with a request in flight: a PUT whose body stalls half way.
async fn busy_socket(app: &TestApp, token: &str) -> TcpStream {
    let mut busy = socket(app).await;
    let head = format!(
        "PUT /internal/v1/tenants/ten_1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 30\r\n\r\n{{\"mode\""
    );
    busy.write_all(head.as_bytes()).await.unwrap();
    busy
}

/// `GET /healthz` on a new connection: whether it is answered within `within`.
async fn served_within(app: &TestApp, within: Duration) -> (TcpStream, bool) {
    let mut fresh = socket(app).await;
    fresh
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0; 64];
    let early = tokio::time::timeout(within, fresh.read(&mut buffer)).await;
    let served = matches!(early, Ok(Ok(n)) if buffer[..n].starts_with(b"HTTP/1.1 200"));
    (fresh, served)
}

/// When every connection has a request in flight, a new one waits for a slot.
async fn connections_past_the_cap_wait_for_a_free_slot(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[
            ("server.max_connections", "2"),
            ("server.header_read_timeout_ms", "10000"),
            ("server.idle_timeout_ms", "10000"),
        ],
    )
    .await;
    let token = app.service_token(&[Scope::TenantsWrite]).await;
    let mut holders = vec![
        busy_socket(&app, &token).await,
        busy_socket(&app, &token).await,
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut third, served) = served_within(&app, Duration::from_millis(500)).await;
    assert!(
        !served,
        "served past the cap while both requests were in flight"
    );
    drop(holders.pop());
    let answer = read_to_close(&mut third, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Issue 21: 3,000 sockets that send nothing starved every caller. At the cap, a connection
/// that has not sent a whole head, or sits idle between requests, is closed to make room;
/// one with a request in flight is not.
async fn idle_connections_make_room_at_the_cap(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[
            ("server.max_connections", "3"),
            ("server.header_read_timeout_ms", "10000"),
            ("server.idle_timeout_ms", "10000"),
        ],
    )
    .await;
    let token = app.service_token(&[Scope::TenantsWrite]).await;
    let mut busy = busy_socket(&app, &token).await;
    let mut headless = socket(&app).await;
    headless
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut kept_alive = socket(&app).await;
    kept_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0; 1024];
    let n = kept_alive.read(&mut buffer).await.unwrap();
    assert!(buffer[..n].starts_with(b"HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(100)).await;

    let fresh_served = || async {
        let started = Instant::now();
        let (_, served) = served_within(&app, Duration::from_secs(2)).await;
        assert!(served, "a fresh caller is served at the cap");
        assert!(started.elapsed() < Duration::from_secs(1));
        // Served with `Connection: close`: its slot is free again.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // At the cap (busy, headless, kept alive): the idlest goes, the one without a head.
    fresh_served().await;
    let mut newer = socket(&app).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // At the cap again (busy, kept alive, newer): the kept-alive one is now the idlest.
    fresh_served().await;
    for (name, idle) in [("headless", &mut headless), ("kept alive", &mut kept_alive)] {
        let closed = tokio::time::timeout(Duration::from_secs(1), idle.read(&mut buffer)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "{name} was closed"
        );
    }
    let newer_open =
        tokio::time::timeout(Duration::from_millis(200), newer.read(&mut buffer)).await;
    assert!(
        newer_open.is_err(),
        "the newest idle connection was left alone"
    );
    let still_open = tokio::time::timeout(Duration::from_millis(200), busy.read(&mut buffer)).await;
    assert!(still_open.is_err(), "the request in flight was left alone");
}

/// `server.max_connections_per_peer`: past it, a peer's new connection is closed at once,
/// while its connections within the cap are served.
async fn a_peer_past_its_cap_is_refused(backend: Backend) {
    let app = spawn_app_with(backend, &[("server.max_connections_per_peer", "2")]).await;
    let _first = socket(&app).await;
    let _second = socket(&app).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = socket(&app).await;
    let mut buffer = [0; 64];
    let closed = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buffer)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the third was closed at once"
    );
    drop(_first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, served) = served_within(&app, Duration::from_secs(2)).await;
    assert!(served, "a connection within the cap again is served");
}
