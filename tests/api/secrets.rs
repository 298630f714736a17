//! Canary keys: a key that went through the whole flow, at trace level, must appear in no
//! log line, no response body, and nowhere in the database's files in plaintext.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use atlas_stripe::domain::{Mode, Resource};
use reqwest::Method;

use crate::backend_tests;
use crate::helpers::{assert_error, spawn_app_with, Backend, TestApp};
use crate::stripe_mock::{answer_all, grant_all_but, key, Answer};

backend_tests!(a_canary_key_leaks_nowhere);

#[derive(Clone, Default)]
pub(crate) struct Captured(pub(crate) Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this process at trace level, as the service prints them with
/// `RUST_LOG=trace`: installed through production's own initialisation, so lines that
/// dependencies write through the `log` crate (reqwest's among them) are captured too.
pub(crate) fn captured_logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        atlas_stripe::telemetry::init_with_writer(
            tracing_subscriber::EnvFilter::new("trace"),
            atlas_stripe::config::LogFormat::Pretty,
            move || writer.clone(),
        )
        .expect("the canary test owns the global subscriber");
        captured
    })
}

fn files_under(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, found);
        } else {
            found.push(path);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let (first, rest) = needle.split_first().unwrap();
    haystack
        .iter()
        .enumerate()
        .filter(|(_, b)| *b == first)
        .any(|(i, _)| haystack.get(i + 1..i + needle.len()) == Some(rest))
}

/// The database's own files, after a checkpoint, so nothing hides in memory.
async fn database_files(app: &TestApp) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    match app.db.backend {
        Backend::Sqlite => {
            let db = app.db.sqlite_path.as_ref().unwrap();
            files_under(db.parent().unwrap(), &mut files);
        }
        Backend::Postgres => {
            let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(
                &crate::helpers::postgres_admin_url(),
            )
            .await
            .unwrap();
            sqlx::query("CHECKPOINT").execute(&mut admin).await.unwrap();
            let name = app.db.url.rsplit('/').next().unwrap();
            let oid: sqlx::postgres::types::Oid =
                sqlx::query_scalar("SELECT oid FROM pg_database WHERE datname = $1")
                    .bind(name)
                    .fetch_one(&mut admin)
                    .await
                    .unwrap();
            let dir = std::env::var("ATLAS_TEST_POSTGRES_DATA_DIR")
                .expect("ATLAS_TEST_POSTGRES_DATA_DIR is set by scripts/test");
            // This test's database, the write-ahead log every change passes through, and the
            // shared catalogues.
            for sub in [format!("base/{}", oid.0), "pg_wal".into(), "global".into()] {
                files_under(&Path::new(&dir).join(sub), &mut files);
            }
        }
    }
    assert!(!files.is_empty());
    files
}

async fn a_canary_key_leaks_nowhere(backend: Backend) {
    let logs = captured_logs();
    // Announcements to Atlas go out too: their bodies and the signing secret are checked.
    let signing_secret = crate::notifications::secret(9);
    let atlas = crate::notifications::Receiver::start(&[&signing_secret]).await;
    let app = spawn_app_with(
        backend,
        &[
            ("notifications.url", atlas.url.as_str()),
            ("notifications.secret", signing_secret.as_str()),
        ],
    )
    .await;
    let tenant = format!(
        "ten_canary_{}",
        match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    );
    app.create_tenant(&tenant, Mode::Test).await;
    let canary = key("rk_test_", "Cnry");
    let mut bodies = Vec::new();

    // Refused paths first: missing permission, then Stripe rejecting the key.
    grant_all_but(&app.stripe, &[Resource::Coupons]).await;
    bodies.push(
        assert_error(
            app.connect(&tenant, &canary).await,
            422,
            "missing_permissions",
        )
        .await
        .to_string(),
    );
    app.stripe.reset().await;
    answer_all(&app.stripe, Answer::InvalidKey).await;
    bodies.push(
        assert_error(app.connect(&tenant, &canary).await, 422, "key_rejected")
            .await
            .to_string(),
    );

    // Then the whole happy path: connect, show, verify (the key is opened), replace.
    app.stripe.reset().await;
    let endpoints = answer_all(&app.stripe, Answer::Granted).await;
    for (method, suffix, body) in [
        (Method::POST, "", Some(&canary)),
        (Method::GET, "", None),
        (Method::POST, "/verify", None),
        (Method::POST, "", Some(&canary)),
    ] {
        let mut request = app
            .http
            .request(
                method,
                app.url(&format!("{}{suffix}", TestApp::connection_path(&tenant))),
            )
            .bearer_auth(app.tenant_token(&tenant));
        if let Some(api_key) = body {
            request = request.json(&serde_json::json!({ "api_key": api_key }));
        }
        let response = request.send().await.unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        bodies.push(response.text().await.unwrap());
    }
    // A charging service fetches it (the one place it leaves in the clear, by design)...
    let token = app
        .service_token(&[atlas_stripe::auth::Scope::KeysRead])
        .await;
    let fetched = app
        .http
        .get(app.url(&format!("/internal/v1/tenants/{tenant}/stripe/key")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), 200);
    assert!(fetched.text().await.unwrap().contains(&canary));
    // ...and calls Stripe through the proxy, which adds the key (answers and headers of
    // the proxy are checked with the other bodies below).
    let caller = app
        .service_token(&[atlas_stripe::auth::Scope::StripeCall])
        .await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path("/v1/customers"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_raw(
            r#"{"id":"cus_Canary","object":"customer"}"#,
            "application/json",
        ))
        .mount(&app.stripe)
        .await;
    let proxied = app
        .http
        .post(app.url(&format!(
            "/internal/v1/tenants/{tenant}/stripe/v1/customers"
        )))
        .bearer_auth(&caller)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("email=canary%40example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(proxied.status(), 200);
    let headers = format!("{:?}", proxied.headers());
    assert!(!headers.contains(&canary), "the key in the proxy's headers");
    bodies.push(proxied.text().await.unwrap());
    // ...and a master-key rotation re-wraps it.
    let k2 = atlas_stripe::crypto::Keyring::generate_entry(
        &atlas_stripe::crypto::MasterKeyId::parse("k2").unwrap(),
    );
    let rotated = atlas_stripe::crypto::Keyring::from_config(
        &secrecy::SecretString::from(format!(
            "{},{}",
            app.secrets.master_keys,
            secrecy::ExposeSecret::expose_secret(&k2)
        )),
        "k2",
    )
    .unwrap();
    let report = atlas_stripe::rotation::rewrap_all(&*app.store, &rotated, 10, None)
        .await
        .unwrap();
    assert_eq!(
        report.rewrapped, 2,
        "the key and the webhook signing secret"
    );

    // The key did travel: Stripe saw it.
    let sent = app.stripe_requests().await;
    assert!(sent.iter().any(|r| r.headers["authorization"]
        .to_str()
        .unwrap()
        .ends_with(&canary)));

    for body in &bodies {
        assert!(
            !body.contains(&canary),
            "a response body holds the key: {body}"
        );
    }
    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        logs.contains(&tenant),
        "the capture saw this test's requests"
    );
    assert!(logs.contains("TRACE"), "the capture is at trace level");
    // reqwest logs through the `log` crate: its line for the connection to Stripe proves
    // the bridge is there (without it, reqwest's lines, its verbose connection dump of raw
    // request bytes and `Authorization` among them, would never be captured).
    let stripe_host = app.stripe.uri().trim_start_matches("http://").to_owned();
    assert!(
        logs.lines().any(|line| line.contains("reqwest::connect")
            && line.contains("starting new connection")
            && line.contains(&stripe_host)),
        "no line from the log crate was captured"
    );
    assert!(!logs.contains(&canary), "a log line holds the key");
    assert!(
        !logs.contains(&canary[8..]),
        "a log line holds the key's body"
    );

    // The webhook signing secret Stripe returned is a secret too.
    let connection_id = app
        .store
        .find_connection(&atlas_stripe::domain::TenantId::parse(&tenant).unwrap())
        .await
        .unwrap()
        .unwrap()
        .connection_id;
    let webhook_secret = endpoints.secret_for(&connection_id);
    assert!(
        !logs.contains(&webhook_secret),
        "a log line holds the webhook secret"
    );
    for body in &bodies {
        assert!(
            !body.contains(&webhook_secret),
            "a response body holds the webhook secret"
        );
    }

    // Connected, then replaced: each announcement is the summary, never the key.
    let announced = atlas
        .wait_until("two announcements", |r| r.len() >= 2)
        .await;
    for r in &announced {
        let whole = format!("{:?} {}", r.headers, r.raw);
        assert!(
            !whole.contains(&canary),
            "an announcement holds the key: {whole}"
        );
        assert!(
            !whole.contains(&canary[8..]),
            "an announcement holds the key's body"
        );
        assert!(
            !whole.contains(&webhook_secret),
            "an announcement holds the webhook secret"
        );
        assert!(
            !whole.contains(&signing_secret),
            "an announcement holds its signing secret"
        );
    }
    let logs = String::from_utf8_lossy(&captured_logs().0.lock().unwrap()).into_owned();
    assert!(
        !logs.contains(&signing_secret),
        "a log line holds the signing secret"
    );
    assert!(
        !logs.contains(&signing_secret[6..]),
        "a log line holds the signing secret's body"
    );

    let files = database_files(&app).await;
    for file in &files {
        let bytes = std::fs::read(file).unwrap_or_default();
        assert!(
            !contains(&bytes, webhook_secret.as_bytes()),
            "plaintext webhook secret in {}",
            file.display()
        );
        assert!(
            !contains(&bytes, canary.as_bytes()),
            "plaintext key in {}",
            file.display()
        );
        assert!(
            !contains(&bytes, &canary.as_bytes()[8..]),
            "plaintext key body in {}",
            file.display()
        );
    }
}
