//! Clients that stall or trickle: each bound is tested with a raw socket.

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

async fn a_trickled_body_is_a_408_in_our_error_shape(backend: Backend) {
    let app = spawn_app_with(backend, &[("server.body_read_timeout_ms", "600")]).await;
    let token = app.service_token(&[Scope::TenantsWrite]).await;
    let mut socket = socket(&app).await;
    let head = format!(
        "PUT /internal/v1/tenants/ten_1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 16\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    // One byte every 200 ms: each arrives in time, the whole body never does.
    let started = Instant::now();
    for byte in br#"{"mode":"te"#.iter() {
        if socket.write_all(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if started.elapsed() > Duration::from_millis(1500) {
            break;
        }
    }
    let answer = read_to_close(&mut socket, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
    assert!(answer.contains(r#""request_id""#), "{answer}");
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
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut holder = socket(&app).await;
        holder
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        holders.push(holder);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = socket(&app).await;
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0; 64];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buffer)).await;
    assert!(early.is_err(), "served past the cap");
    drop(holders.pop());
    let answer = read_to_close(&mut third, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
