//! The `atlas-stripe` binary as an operator uses it, on the embedded SQLite default.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary on the embedded default, with its database and development secrets in `dir`.
fn atlas_stripe(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_atlas-stripe"));
    command
        .current_dir(dir)
        .env(
            "ATLAS_STRIPE__DATABASE__URL",
            format!("sqlite://{}/atlas.db", dir.display()),
        )
        .env(
            "ATLAS_STRIPE__DEV__SECRETS_FILE",
            dir.join("dev-secrets.toml"),
        )
        .env("ATLAS_STRIPE__LOG__FILTER", "warn")
        .env_remove("RUST_LOG");
    command
}

fn cli(dir: &Path, args: &[&str]) -> Output {
    atlas_stripe(dir)
        .args(args)
        .output()
        .expect("run atlas-stripe")
}

/// Starts `serve` on a free port (with `configure` applied) and waits until it listens.
fn serve(dir: &Path, configure: impl FnOnce(&mut Command)) -> (Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = atlas_stripe(dir);
    command
        .arg("serve")
        .env("ATLAS_STRIPE__SERVER__BIND", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    configure(&mut command);
    let server = command.spawn().unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the server never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (server, port)
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn service_tokens_are_created_listed_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let token = stdout(&cli(
        dir.path(),
        &[
            "service-token",
            "create",
            "--name",
            "billing",
            "--scope",
            "keys:read",
        ],
    ));
    let token = token.trim();
    assert!(
        token.starts_with("ast_") && token.len() == 4 + 16 + 1 + 43,
        "{token}"
    );
    let id = token.split('_').nth(1).unwrap();
    let list = stdout(&cli(dir.path(), &["service-token", "list"]));
    assert!(
        list.contains(id) && list.contains("billing") && list.contains("keys:read"),
        "{list}"
    );
    assert!(
        !list.contains(&token[21..]),
        "the list never shows a token's secret"
    );
    assert!(stdout(&cli(dir.path(), &["service-token", "revoke", id])).contains("revoked"));
    assert!(
        !cli(dir.path(), &["service-token", "revoke", id])
            .status
            .success(),
        "revoking twice fails"
    );
    let unknown = cli(
        dir.path(),
        &["service-token", "create", "--name", "x", "--scope", "admin"],
    );
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("keys:read"),
        "the error lists known scopes"
    );
}

#[test]
fn keys_and_tenant_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let entry = stdout(&cli(dir.path(), &["keys", "generate", "--id", "k2027"]));
    let (id, material) = entry.trim().split_once(':').unwrap();
    assert_eq!((id, material.len()), ("k2027", 44), "32 bytes of base64");
    let token = stdout(&cli(dir.path(), &["tenant-token", "--tenant", "ten_1"]));
    assert_eq!(token.trim().split('.').count(), 3, "a JWT");
    let status = stdout(&cli(dir.path(), &["keys", "status"]));
    assert!(status.starts_with("master_key_id"), "{status}");
    assert!(
        dir.path().join("dev-secrets.toml").exists(),
        "development secrets were generated"
    );
}

#[test]
fn serve_stops_gracefully_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, _) = serve(dir.path(), |_| {});
    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(15),
            "did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
}

/// `log.format = "json"`: one JSON object per line, and every line logged while serving a
/// request carries that request's id (the caller's `x-request-id` here).
#[test]
fn json_logs_carry_the_request_id_on_every_line_of_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let (server, port) = serve(dir.path(), |command| {
        command
            .env("ATLAS_STRIPE__LOG__FORMAT", "json")
            .env("RUST_LOG", "debug")
            .stderr(Stdio::piped());
    });
    // Plain HTTP/1.1 requests by hand: an error path (no token), and a webhook delivery to
    // an unknown connection, which the handler looks up in the database.
    for (method, path) in [
        ("GET", "/internal/v1/connections"),
        ("POST", "/webhooks/stripe/con_unknown"),
    ] {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(stream, "{method} {path} HTTP/1.1\r\nHost: x\r\nx-request-id: trace-me-42\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.contains("x-request-id: trace-me-42"), "{answer}");
    }
    Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    let output = server.wait_with_output().unwrap();
    let logs = String::from_utf8(output.stderr).unwrap();
    let mut request_lines = 0;
    let mut handler_queries = 0;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        if entry["span"]["name"] == "request"
            || entry["spans"].as_array().is_some_and(|s| !s.is_empty())
        {
            request_lines += 1;
            assert_eq!(entry["span"]["request_id"], "trace-me-42", "{line}");
        }
        // A line written deep inside a handler, not by the middleware: sqlx's query log
        // while the receiver looks the connection up. It carries the request's id only
        // when the handler runs inside the request's span.
        let in_webhook_request = entry["spans"].as_array().is_some_and(|spans| {
            spans.iter().any(|s| {
                s["name"] == "request"
                    && s["request_id"] == "trace-me-42"
                    && s["route"] == "/webhooks/stripe/{connection_id}"
            })
        });
        if entry["target"] == "sqlx::query" && in_webhook_request {
            handler_queries += 1;
        }
    }
    assert!(
        request_lines >= 2,
        "both requests logged inside their span:\n{logs}"
    );
    assert!(
        handler_queries >= 1,
        "no database query of the webhook receiver carries the request id:\n{logs}"
    );
}
