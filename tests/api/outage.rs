//! The database goes away and comes back: every route that needs it answers 503
//! `service_unavailable` (retryable, with `Retry-After`) meanwhile, `/readyz` names the
//! database, and everything recovers without a restart. The test stops and starts a
//! PostgreSQL cluster of its own, so the other tests' shared cluster is never touched.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use atlas_stripe::auth::Scope;
use atlas_stripe::domain::{random_id, Mode};

use crate::helpers::{assert_error, eventually, spawn_app_with, Backend, TestApp};

/// A throwaway cluster: initdb'd in a temporary folder, as `nobody` when run as root
/// (initdb refuses root), on a free port.
struct OwnCluster {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl OwnCluster {
    fn start() -> Self {
        let bin = PathBuf::from(std::env::var("ATLAS_TEST_PGBIN").expect(
            "ATLAS_TEST_PGBIN is not set: run the suite with scripts/test, which finds \
             PostgreSQL's server binaries",
        ));
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if is_root() {
            run(Command::new("chown").arg("nobody").arg(dir.path()));
        }
        let cluster = Self {
            bin,
            data,
            port,
            _dir: dir,
        };
        run(cluster
            .command("initdb")
            .args(["-U", "postgres", "--auth=trust", "--no-sync"])
            .arg("-D")
            .arg(&cluster.data));
        cluster.pg_ctl("start");
        cluster
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if is_root() {
            let mut command = Command::new("setpriv");
            command.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]);
            command.arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    fn pg_ctl(&self, action: &str) {
        let options = format!(
            "-p {} -h 127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.data.display()
        );
        let mut command = self.command("pg_ctl");
        command
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "30", "-m", "immediate"]);
        command.arg("-l").arg(self.data.join("server.log"));
        if action == "start" {
            command.args(["-o", &options]);
        }
        run(command.arg(action));
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0\n"))
}

fn run(command: &mut Command) {
    let out = command.output().expect("run a PostgreSQL tool");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn key_fetch(app: &TestApp, token: &str) -> reqwest::Response {
    app.http
        .get(app.url("/internal/v1/tenants/ten_1/stripe/key"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_a_retryable_503_and_heals_without_a_restart() {
    let cluster = OwnCluster::start();
    let url = cluster.url();
    let app = spawn_app_with(
        Backend::Postgres,
        &[
            ("database.url", &url),
            ("database.acquire_timeout_ms", "1000"),
        ],
    )
    .await;
    app.create_tenant("ten_1", Mode::Test).await;
    let token = app
        .service_token(&[Scope::KeysRead, Scope::TenantsWrite])
        .await;
    assert_error(key_fetch(&app, &token).await, 404, "not_connected").await;

    cluster.pg_ctl("stop");
    let put = |tenant: String| {
        app.http
            .put(app.url(&format!("/internal/v1/tenants/{tenant}")))
            .bearer_auth(&token)
            .json(&serde_json::json!({"mode": "test"}))
            .send()
    };
    for response in [
        key_fetch(&app, &token).await,
        put(random_id("ten_", 8)).await.unwrap(),
        app.tenant_request(reqwest::Method::GET, "ten_1", "").await,
    ] {
        assert_eq!(response.headers()["retry-after"], "1");
        let body = assert_error(response, 503, "service_unavailable").await;
        assert_eq!(body["error"]["retryable"], true);
    }
    let ready = || async { app.http.get(app.url("/readyz")).send().await.unwrap() };
    eventually("readiness sees the database gone", || async {
        ready().await.status() == 503
    })
    .await;
    let body = assert_error(ready().await, 503, "not_ready").await;
    assert_eq!(body["error"]["checks"]["database"], "failed");

    cluster.pg_ctl("start");
    // The pool replaces its broken connections as they fail; no restart.
    let mut healed = false;
    for _ in 0..100 {
        if key_fetch(&app, &token).await.status() == 404 {
            healed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        healed,
        "the key fetch answers again once the database is back"
    );
    assert_eq!(put(random_id("ten_", 8)).await.unwrap().status(), 201);
    eventually("readiness sees the database back", || async {
        ready().await.status() == 200
    })
    .await;
}
