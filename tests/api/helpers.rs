//! One app per test: its own database (a fresh SQLite file, or a fresh PostgreSQL database
//! in the cluster `scripts/test` starts), a random port, and a wiremock Stripe.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use atlas_stripe::auth::{IssuedServiceToken, Scope, TenantTokens};
use atlas_stripe::config::Settings;
use atlas_stripe::crypto::{Keyring, MasterKeyId};
use atlas_stripe::domain::{random_id, Mode, TenantId};
use atlas_stripe::startup::Application;
use atlas_stripe::store::{Actor, NewServiceToken, Store};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sqlx::Connection;
use wiremock::MockServer;

use crate::stripe_contract::StripeSpec;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs an async test body once per backend: `backend_tests!(name)` makes `name::sqlite`
/// and `name::postgres`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::helpers::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::helpers::Backend::Postgres).await
            }
        }
    )+};
}

/// The admin URL of the test cluster. A PostgreSQL test must never silently skip.
pub fn postgres_admin_url() -> String {
    std::env::var("ATLAS_TEST_POSTGRES_URL").expect(
        "ATLAS_TEST_POSTGRES_URL is not set: run the suite with scripts/test, which starts a \
         throwaway PostgreSQL cluster",
    )
}

/// A database of its own for one test.
pub struct TestDatabase {
    pub backend: Backend,
    pub url: String,
    /// The SQLite file (and its folder, removed on drop).
    pub sqlite_path: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDatabase {
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let path = dir.path().join("atlas-stripe.db");
                Self {
                    backend,
                    url: format!("sqlite://{}", path.display()),
                    sqlite_path: Some(path),
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let admin = postgres_admin_url();
                let name = random_id("t_", 16).to_lowercase();
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .expect("connect to the test cluster");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                let base = admin.rsplit_once('/').expect("url with a database").0;
                Self {
                    backend,
                    url: format!("{base}/{name}"),
                    sqlite_path: None,
                    _dir: None,
                }
            }
        }
    }

    /// Runs one statement straight on the database, bypassing the store.
    pub async fn execute(&self, sql: &str) {
        match self.backend {
            Backend::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.url)
                    .await
                    .expect("sqlite");
                sqlx::query(sql).execute(&mut conn).await.expect(sql);
            }
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.url)
                    .await
                    .expect("postgres");
                sqlx::query(sql).execute(&mut conn).await.expect(sql);
            }
        }
    }

    /// A count (or any single integer) straight from the database, bypassing the store.
    pub async fn scalar(&self, sql: &str) -> i64 {
        match self.backend {
            Backend::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.url)
                    .await
                    .expect("sqlite");
                sqlx::query_scalar(sql)
                    .fetch_one(&mut conn)
                    .await
                    .expect(sql)
            }
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.url)
                    .await
                    .expect("postgres");
                sqlx::query_scalar(sql)
                    .fetch_one(&mut conn)
                    .await
                    .expect(sql)
            }
        }
    }
}

pub struct TestSecrets {
    pub master_keys: String,
    pub active_key_id: String,
    pub fingerprint_key: String,
    pub tenant_token_secret: String,
}

impl TestSecrets {
    pub fn generate() -> Self {
        let id = MasterKeyId::parse("test1").unwrap();
        Self {
            master_keys: Keyring::generate_entry(&id).expose_secret().to_owned(),
            active_key_id: "test1".into(),
            fingerprint_key: random_id("fp_", 40),
            tenant_token_secret: random_id("tts_", 40),
        }
    }
}

pub struct TestApp {
    pub address: String,
    /// `http://127.0.0.1:<port>` of the probe listener, when `server.ops_bind` is set.
    pub ops_address: Option<String>,
    pub http: reqwest::Client,
    pub stripe: MockServer,
    pub store: Arc<dyn Store>,
    pub db: Arc<TestDatabase>,
    pub secrets: Arc<TestSecrets>,
    /// This app's own service-token cache (its counts are this app's alone).
    pub token_cache: Arc<atlas_stripe::auth::ServiceTokenCache>,
    /// The app's connection service, whose background sweeps a test runs by hand.
    pub connections: Arc<atlas_stripe::connection::ConnectionService>,
    tenant_tokens: TenantTokens,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    extra: Vec<(String, String)>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Settings for a test app: fast retries and short timeouts, Stripe at `stripe_uri`.
pub fn test_overrides<'a>(
    db: &'a TestDatabase,
    secrets: &'a TestSecrets,
    stripe_uri: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("server.bind", "127.0.0.1:0"),
        // The health snapshot behind /readyz and /metrics gauges, refreshed often in tests.
        ("server.health_refresh_ms", "50"),
        ("database.url", db.url.as_str()),
        ("database.max_connections", "5"),
        ("stripe.api_base", stripe_uri),
        ("stripe.retry_base_delay_ms", "10"),
        ("stripe.retry_max_delay_ms", "40"),
        ("stripe.request_timeout_ms", "2000"),
        ("stripe.probe_deadline_ms", "5000"),
        ("crypto.master_keys", secrets.master_keys.as_str()),
        ("crypto.active_key_id", secrets.active_key_id.as_str()),
        ("crypto.fingerprint_key", secrets.fingerprint_key.as_str()),
        (
            "auth.tenant_token_secret",
            secrets.tenant_token_secret.as_str(),
        ),
        ("dev.generate_secrets", "false"),
        // Background re-verification probes Stripe on its own; tests that want it turn it on.
        ("reverify.enabled", "false"),
        // So does the recovery of missed events.
        ("webhooks.recovery_enabled", "false"),
    ]
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, &[]).await
}

/// Spawns the app with extra settings layered over the test defaults.
pub async fn spawn_app_with(backend: Backend, extra: &[(&str, &str)]) -> TestApp {
    let db = Arc::new(TestDatabase::new(backend).await);
    let extra = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    start(db, Arc::new(TestSecrets::generate()), extra).await
}

async fn start(
    db: Arc<TestDatabase>,
    secrets: Arc<TestSecrets>,
    extra: Vec<(String, String)>,
) -> TestApp {
    let stripe = MockServer::start().await;
    let stripe_uri = stripe.uri();
    let mut overrides = test_overrides(&db, &secrets, &stripe_uri);
    overrides.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let settings = Settings::load(None, &overrides).expect("test settings");
    let app = Application::build(&settings).await.expect("build app");
    let port = app.port();
    let ops_port = app.ops_port();
    let token_cache = app.service_token_cache();
    let connections = app.connections();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    let store = atlas_stripe::store::connect(&settings.database)
        .await
        .expect("test store handle");
    let tenant_tokens =
        TenantTokens::new(&SecretString::from(secrets.tenant_token_secret.clone()), 0);
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        ops_address: ops_port.map(|port| format!("http://127.0.0.1:{port}")),
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client"),
        stripe,
        store,
        db,
        secrets,
        token_cache,
        connections,
        tenant_tokens,
        shutdown: Some(tx),
        server: Some(server),
        extra,
    }
}

impl TestApp {
    /// A second server on the same database and secrets, as a second process would be:
    /// nothing in memory is shared.
    pub async fn twin(&self) -> TestApp {
        self.twin_with(&[]).await
    }

    /// A second server on the same database with some settings changed (a restart with a
    /// new configuration, or another process configured differently).
    pub async fn twin_with(&self, changes: &[(&str, &str)]) -> TestApp {
        let mut extra = self.extra.clone();
        extra.extend(changes.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        start(self.db.clone(), self.secrets.clone(), extra).await
    }

    /// The keyring the app seals with.
    pub fn keyring(&self) -> atlas_stripe::crypto::Keyring {
        atlas_stripe::crypto::Keyring::from_config(
            &SecretString::from(self.secrets.master_keys.clone()),
            &self.secrets.active_key_id,
        )
        .expect("test keyring")
    }

    /// Stops the server gracefully and waits until it has finished (flushes included).
    pub async fn shut_down(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server result");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub fn tenant_token(&self, tenant: &str) -> String {
        let tenant = TenantId::parse(tenant).expect("test tenant id");
        self.tenant_tokens
            .mint(&tenant, time::Duration::minutes(10))
            .expose_secret()
            .to_owned()
    }

    pub async fn service_token(&self, scopes: &[Scope]) -> String {
        let issued = IssuedServiceToken::generate();
        let token = NewServiceToken {
            id: issued.id.clone(),
            name: "test".into(),
            scopes: scopes.iter().copied().collect::<BTreeSet<_>>(),
            hash: issued.hash.clone(),
        };
        self.store
            .insert_service_token(&token, &Actor::Cli)
            .await
            .expect("insert service token");
        issued.plaintext.expose_secret().to_owned()
    }

    pub async fn create_tenant(&self, tenant: &str, mode: Mode) {
        let tenant = TenantId::parse(tenant).expect("test tenant id");
        self.store
            .upsert_tenant(&tenant, mode, &Actor::Cli)
            .await
            .expect("create tenant");
    }

    pub fn connection_path(tenant: &str) -> String {
        format!("/v1/tenants/{tenant}/stripe/connection")
    }

    /// The modal's Activate, with the tenant's own token.
    pub async fn connect(&self, tenant: &str, api_key: &str) -> reqwest::Response {
        self.http
            .post(self.url(&Self::connection_path(tenant)))
            .bearer_auth(self.tenant_token(tenant))
            .json(&serde_json::json!({ "api_key": api_key }))
            .send()
            .await
            .expect("request")
    }

    pub async fn tenant_request(
        &self,
        method: reqwest::Method,
        tenant: &str,
        suffix: &str,
    ) -> reqwest::Response {
        self.http
            .request(
                method,
                self.url(&format!("{}{suffix}", Self::connection_path(tenant))),
            )
            .bearer_auth(self.tenant_token(tenant))
            .send()
            .await
            .expect("request")
    }

    /// Every request the app sent to Stripe, each checked against Stripe's OpenAPI
    /// description and for the headers every call must carry.
    pub async fn stripe_requests(&self) -> Vec<wiremock::Request> {
        let requests = self.stripe.received_requests().await.expect("recording on");
        let spec = StripeSpec::load();
        for request in &requests {
            if let Err(problem) = spec.check_request(request) {
                panic!("request outside Stripe's API: {problem}");
            }
            let header = |name: &str| {
                request
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            assert_eq!(
                header("stripe-version"),
                spec.api_version(),
                "pinned Stripe-Version"
            );
            assert!(
                header("authorization").starts_with("Bearer "),
                "bearer auth"
            );
        }
        requests
    }
}

/// Reads a JSON body, failing the test with the text when it is not JSON.
pub async fn json(response: reqwest::Response) -> Value {
    let status = response.status();
    let text = response.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status}: not JSON: {text}"))
}

/// Asserts our error shape and code, returning the body.
pub async fn assert_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    let actual = response.status().as_u16();
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = json(response).await;
    assert_eq!(actual, status, "status; body: {body}");
    assert_eq!(body["error"]["code"], code, "code; body: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.len() > 10, "a sentence a person can act on: {body}");
    assert_eq!(
        body["error"]["request_id"].as_str(),
        request_id.as_deref(),
        "request_id matches x-request-id"
    );
    body
}

/// Waits until `check` holds, trying every 20 ms for up to 5 s: for what the service
/// reports from a snapshot refreshed in the background (`/readyz`, `/metrics` gauges).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..250 {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("never happened: {what}");
}
