//! Master keys held by AWS KMS, against a real KMS API: moto's server mode, which
//! `scripts/test` installs, starts and exports as ATLAS_TEST_KMS_ENDPOINT. Every test makes
//! its own KMS key (CreateKey) there.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use atlas_stripe::auth::Scope;
use atlas_stripe::crypto::kms::{encryption_context, generate_entry, unlock_pending};
use atlas_stripe::crypto::{Keyring, Kms, KmsConfig, MasterKeyId};
use atlas_stripe::domain::Mode;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::backend_tests;
use crate::helpers::{assert_error, json, spawn_app_with, Backend, TestApp, TestDatabase};
use crate::stripe_mock::{answer_all, key, Answer};

backend_tests!(
    a_kms_master_key_serves_across_restarts,
    migrating_from_a_local_key_to_a_kms_key,
    kms_down_at_start_up_then_up_without_a_restart,
    a_blob_for_another_master_key_id_is_refused,
    a_blob_of_another_kms_key_is_refused,
    access_denied_is_named,
    a_kms_blob_and_its_data_key_leak_nowhere,
);

const REGION: &str = "us-east-1";

/// The local KMS. A test needing it fails, never skips, without it.
fn endpoint() -> String {
    std::env::var("ATLAS_TEST_KMS_ENDPOINT").expect(
        "ATLAS_TEST_KMS_ENDPOINT is not set: run the suite with scripts/test, which starts a \
         local KMS (moto's server mode) and exports it with dummy AWS credentials",
    )
}

fn id(raw: &str) -> MasterKeyId {
    MasterKeyId::parse(raw).unwrap()
}

async fn kms(key_id: &str, region: &str, endpoint: &str) -> Kms {
    Kms::new(KmsConfig {
        key_id: key_id.to_owned(),
        region: region.to_owned(),
        endpoint_url: Some(endpoint.to_owned()),
    })
    .await
}

/// A new symmetric key in the local KMS (in `region`); its key id.
async fn create_key(region: &str) -> String {
    let admin = kms("unused", region, &endpoint()).await;
    let created = admin
        .client()
        .create_key()
        .description("atlas-stripe test master key")
        .send()
        .await
        .expect("CreateKey on the local KMS (is ATLAS_TEST_KMS_ENDPOINT answering?)");
    created
        .key_metadata()
        .expect("key metadata")
        .key_id()
        .to_owned()
}

/// `id:kms:<blob>` from `keys generate --kms`'s code path.
async fn kms_entry(key_id: &str, master_key_id: &str) -> String {
    let kms = kms(key_id, REGION, &endpoint()).await;
    generate_entry(&kms, &id(master_key_id))
        .await
        .expect("GenerateDataKey")
        .expose_secret()
        .to_owned()
}

/// Settings of an app whose keyring is `master_keys`, KMS at `endpoint`.
fn settings<'a>(
    master_keys: &'a str,
    active: &'a str,
    key_id: &'a str,
    endpoint: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("crypto.master_keys", master_keys),
        ("crypto.active_key_id", active),
        ("crypto.aws_kms.key_id", key_id),
        ("crypto.aws_kms.region", REGION),
        ("crypto.aws_kms.endpoint_url", endpoint),
        ("crypto.aws_kms.retry_max_ms", "200"),
    ]
}

/// A port nothing listens on (yet).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts listening on `port` and relays every connection to the local KMS: KMS "comes up"
/// at the address the app was configured with. (Plain threads: the relay lives as long as
/// the test process.)
fn kms_comes_up_at(port: u16) {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("listen on the app's KMS port");
    let target = endpoint().trim_start_matches("http://").to_owned();
    std::thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { continue };
            let Ok(outbound) = std::net::TcpStream::connect(&target) else {
                continue;
            };
            for (mut from, mut to) in [
                (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                (outbound, inbound),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
}

async fn readyz(app: &TestApp) -> (u16, Value) {
    let response = app.http.get(app.url("/readyz")).send().await.unwrap();
    let status = response.status().as_u16();
    (status, json(response).await)
}

async fn wait_ready(app: &TestApp) {
    let started = Instant::now();
    loop {
        let (status, body) = readyz(app).await;
        if status == 200 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the first health snapshot to say not ready, and returns the keyring verdict.
async fn keyring_failure(app: &TestApp) -> String {
    let (status, body) = readyz(app).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "not_ready", "{body}");
    assert_eq!(body["error"]["checks"]["database"], "ok", "{body}");
    let verdict = body["error"]["checks"]["keyring"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(verdict.starts_with("failed: "), "{body}");
    verdict
}

fn key_path(tenant: &str) -> String {
    format!("/internal/v1/tenants/{tenant}/stripe/key")
}

async fn fetch(app: &TestApp, tenant: &str, token: &str) -> reqwest::Response {
    app.http
        .get(app.url(&key_path(tenant)))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn fetched_key(app: &TestApp, tenant: &str, token: &str) -> String {
    let response = fetch(app, tenant, token).await;
    assert_eq!(response.status(), 200);
    json(response).await["api_key"].as_str().unwrap().to_owned()
}

async fn connect_tenant(app: &TestApp, tenant: &str) -> String {
    app.create_tenant(tenant, Mode::Live).await;
    answer_all(&app.stripe, Answer::Granted).await;
    let api_key = key("rk_live_", "Live");
    let response = app.connect(tenant, &api_key).await;
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    api_key
}

async fn sealed_under(app: &TestApp) -> Vec<(String, u64)> {
    (app.store.count_secrets_by_master_key().await.unwrap())
        .into_iter()
        .map(|(id, n)| (id.as_str().to_owned(), n))
        .collect()
}

async fn a_kms_master_key_serves_across_restarts(backend: Backend) {
    let key_id = create_key(REGION).await;
    let endpoint = endpoint();
    let entry = kms_entry(&key_id, "k2").await;
    assert!(entry.starts_with("k2:kms:"), "{entry}");
    let app = spawn_app_with(backend, &settings(&entry, "k2", &key_id, &endpoint)).await;
    wait_ready(&app).await;
    let api_key = connect_tenant(&app, "ten_1").await;
    let token = app.service_token(&[Scope::KeysRead]).await;
    assert_eq!(fetched_key(&app, "ten_1", &token).await, api_key);
    assert_eq!(
        sealed_under(&app).await,
        [("k2".to_owned(), 2)],
        "the key and the webhook secret, under the KMS-held master key"
    );
    // A restart decrypts the same blob again and opens what the first process sealed.
    let restarted = app.twin().await;
    app.shut_down().await;
    wait_ready(&restarted).await;
    assert_eq!(fetched_key(&restarted, "ten_1", &token).await, api_key);
}

async fn migrating_from_a_local_key_to_a_kms_key(backend: Backend) {
    let local = Keyring::generate_entry(&id("local1"))
        .expose_secret()
        .to_owned();
    let app = spawn_app_with(
        backend,
        &[
            ("crypto.master_keys", local.as_str()),
            ("crypto.active_key_id", "local1"),
        ],
    )
    .await;
    let api_key = connect_tenant(&app, "ten_1").await;
    let token = app.service_token(&[Scope::KeysRead]).await;
    assert_eq!(sealed_under(&app).await, [("local1".to_owned(), 2)]);

    // Add the KMS key beside the local one, make it active, rewrap (what `keys rewrap` does).
    let key_id = create_key(REGION).await;
    let endpoint = endpoint();
    let entry = kms_entry(&key_id, "k2").await;
    let both = format!("{local},{entry}");
    let keyring = Keyring::from_config(&SecretString::from(both.clone()), "k2").unwrap();
    let kms = kms(&key_id, REGION, &endpoint).await;
    assert!(unlock_pending(&keyring, &kms).await.is_empty());
    let mixed = app
        .twin_with(&settings(&both, "k2", &key_id, &endpoint))
        .await;
    wait_ready(&mixed).await;
    assert_eq!(fetched_key(&mixed, "ten_1", &token).await, api_key);
    let report = atlas_stripe::rotation::rewrap_all(&*app.store, &keyring, 10, None)
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.rewrapped, 2);
    assert_eq!(sealed_under(&app).await, [("k2".to_owned(), 2)]);

    // The local key is dropped: KMS alone serves every key.
    let kms_only = app
        .twin_with(&settings(&entry, "k2", &key_id, &endpoint))
        .await;
    wait_ready(&kms_only).await;
    assert_eq!(fetched_key(&kms_only, "ten_1", &token).await, api_key);
}

async fn kms_down_at_start_up_then_up_without_a_restart(backend: Backend) {
    let key_id = create_key(REGION).await;
    let entry = kms_entry(&key_id, "k2").await;
    let app = spawn_app_with(backend, &settings(&entry, "k2", &key_id, &endpoint())).await;
    wait_ready(&app).await;
    let api_key = connect_tenant(&app, "ten_1").await;
    let token = app.service_token(&[Scope::KeysRead]).await;

    // Another process starts while nothing answers at its KMS address.
    let port = closed_port();
    let down = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let late = app.twin_with(&settings(&entry, "k2", &key_id, &down)).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "start-up waits for KMS"
    );
    let verdict = keyring_failure(&late).await;
    assert!(
        verdict.contains("\"k2\""),
        "names the master key: {verdict}"
    );
    assert!(verdict.contains(&down), "names the endpoint: {verdict}");
    assert!(verdict.contains("unreachable"), "says what: {verdict}");
    // Anything needing the key answers a retryable 503, not a 500.
    let body = assert_error(
        fetch(&late, "ten_1", &token).await,
        503,
        "service_unavailable",
    )
    .await;
    assert_eq!(body["error"]["retryable"], true, "{body}");
    late.create_tenant("ten_2", Mode::Live).await;
    answer_all(&late.stripe, Answer::Granted).await;
    let body = assert_error(
        late.connect("ten_2", &key("rk_live_", "Lat2")).await,
        503,
        "service_unavailable",
    )
    .await;
    assert_eq!(body["error"]["retryable"], true, "{body}");

    // KMS comes up there: the background retry decrypts, and the process becomes ready.
    kms_comes_up_at(port);
    wait_ready(&late).await;
    assert_eq!(fetched_key(&late, "ten_1", &token).await, api_key);
    assert_eq!(
        late.connect("ten_2", &key("rk_live_", "Lat2"))
            .await
            .status(),
        201
    );
}

async fn a_blob_for_another_master_key_id_is_refused(backend: Backend) {
    let key_id = create_key(REGION).await;
    let endpoint = endpoint();
    // Made for k2, listed as k3: the encryption context names k3, so KMS refuses it.
    let blob = kms_entry(&key_id, "k2").await.replacen("k2:", "k3:", 1);
    let app = spawn_app_with(backend, &settings(&blob, "k3", &key_id, &endpoint)).await;
    let verdict = keyring_failure(&app).await;
    assert!(verdict.contains("\"k3\""), "{verdict}");
    assert!(verdict.contains(&endpoint), "{verdict}");
    assert!(verdict.contains("encryption context"), "{verdict}");
    assert!(!verdict.contains(&blob[7..]), "the blob in a body");
}

async fn a_blob_of_another_kms_key_is_refused(backend: Backend) {
    let (configured, other) = (create_key(REGION).await, create_key(REGION).await);
    let endpoint = endpoint();
    let entry = kms_entry(&other, "k2").await;
    let app = spawn_app_with(backend, &settings(&entry, "k2", &configured, &endpoint)).await;
    // AWS answers IncorrectKeyException (named "the blob was made under another KMS key");
    // moto 5.2.5 answers AccessDeniedException, whose sentence names that case too.
    let verdict = keyring_failure(&app).await;
    assert!(verdict.contains("\"k2\""), "{verdict}");
    assert!(verdict.contains(&endpoint), "{verdict}");
    assert!(verdict.contains("another KMS key"), "{verdict}");
}

/// moto enforces no IAM policy on Decrypt; it answers AccessDeniedException, as KMS does, for
/// a blob whose key the caller cannot use: here a key of another region.
async fn access_denied_is_named(backend: Backend) {
    let configured = create_key(REGION).await;
    let elsewhere = create_key("us-west-2").await;
    let endpoint = endpoint();
    let west = kms(&elsewhere, "us-west-2", &endpoint).await;
    let entry = generate_entry(&west, &id("k2"))
        .await
        .unwrap()
        .expose_secret()
        .to_owned();
    let app = spawn_app_with(backend, &settings(&entry, "k2", &configured, &endpoint)).await;
    let verdict = keyring_failure(&app).await;
    assert!(verdict.contains("\"k2\""), "{verdict}");
    assert!(verdict.contains(&endpoint), "{verdict}");
    assert!(verdict.contains("denied access"), "{verdict}");
}

async fn a_kms_blob_and_its_data_key_leak_nowhere(backend: Backend) {
    let logs = crate::secrets::captured_logs();
    let key_id = create_key(REGION).await;
    let endpoint = endpoint();
    // The data key made here, so the test knows the plaintext the service holds.
    let generated = kms(&key_id, REGION, &endpoint)
        .await
        .client()
        .generate_data_key()
        .key_id(&key_id)
        .key_spec(aws_sdk_kms::types::DataKeySpec::Aes256)
        .set_encryption_context(Some(encryption_context(&id("k2"))))
        .send()
        .await
        .unwrap();
    let blob = BASE64.encode(generated.ciphertext_blob().unwrap().as_ref());
    let data_key = generated.plaintext().unwrap().as_ref().to_vec();
    let entry = format!("k2:kms:{blob}");

    let mut bodies = String::new();
    // Down at start-up (every failure path logs), then up.
    let port = closed_port();
    let down = format!("http://127.0.0.1:{port}");
    let app = spawn_app_with(backend, &settings(&entry, "k2", &key_id, &down)).await;
    let token = app.service_token(&[Scope::KeysRead, Scope::OpsRead]).await;
    bodies.push_str(&readyz(&app).await.1.to_string());
    bodies.push_str(&fetch(&app, "ten_1", &token).await.text().await.unwrap());
    kms_comes_up_at(port);
    wait_ready(&app).await;
    let api_key = connect_tenant(&app, "ten_1").await;
    bodies.push_str(&fetched_key(&app, "ten_1", &token).await);
    bodies.push_str(&readyz(&app).await.1.to_string());
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap();
    bodies.push_str(&metrics.text().await.unwrap());
    // A wrong context and another key fail too, with their own log lines.
    let refused = spawn_app_with(
        backend,
        &settings(&entry.replacen("k2:", "k3:", 1), "k3", &key_id, &endpoint),
    )
    .await;
    bodies.push_str(&readyz(&refused).await.1.to_string());

    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(logs.contains("\"k2\""), "the capture saw the KMS failure");
    assert!(bodies.contains(&api_key), "the bodies were captured");
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default();
    let mut needles = vec![
        ("the KMS blob", blob.clone()),
        ("the blob's first bytes", blob[..24].to_owned()),
        ("the data key (base64)", BASE64.encode(&data_key)),
        ("the data key (hex)", hex::encode(&data_key)),
        ("the data key (Debug)", format!("{:?}", &data_key[..8])),
    ];
    if secret.len() >= 12 {
        needles.push(("the AWS secret access key", secret));
    }
    for (what, needle) in &needles {
        assert!(!logs.contains(needle.as_str()), "{what} in a log line");
        assert!(
            !bodies.contains(needle.as_str()),
            "{what} in a response body"
        );
    }
}

// The command line: generate, status, and the tools failing as clearly as the service.

fn cli(db: &TestDatabase, envs: &[(&str, &str)], args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_atlas-stripe"));
    command
        .current_dir(dir.path())
        .env("ATLAS_STRIPE__DATABASE__URL", &db.url)
        .env(
            "ATLAS_STRIPE__DEV__SECRETS_FILE",
            dir.path().join("dev-secrets.toml"),
        )
        .env("ATLAS_STRIPE__LOG__FILTER", "warn")
        .env_remove("RUST_LOG")
        .args(args);
    for (k, v) in envs {
        command.env(k, v);
    }
    command.output().expect("run atlas-stripe")
}

fn kms_env<'a>(key_id: &'a str, endpoint: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("ATLAS_STRIPE__CRYPTO__AWS_KMS__KEY_ID", key_id),
        ("ATLAS_STRIPE__CRYPTO__AWS_KMS__REGION", REGION),
        ("ATLAS_STRIPE__CRYPTO__AWS_KMS__ENDPOINT_URL", endpoint),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_generate_kms_status_and_rewrap_on_the_command_line() {
    let db = TestDatabase::new(Backend::Sqlite).await;
    let key_id = create_key(REGION).await;
    let endpoint = endpoint();
    let generated = cli(
        &db,
        &kms_env(&key_id, &endpoint),
        &["keys", "generate", "--id", "k2", "--kms"],
    );
    let stderr = String::from_utf8_lossy(&generated.stderr);
    assert!(generated.status.success(), "{stderr}");
    let entry = String::from_utf8(generated.stdout)
        .unwrap()
        .trim()
        .to_owned();
    let blob = entry.strip_prefix("k2:kms:").expect("k2:kms:<blob>");
    // The printed blob is a KMS blob for k2: the service's own path decrypts it.
    let keyring = Keyring::from_config(&SecretString::from(entry.clone()), "k2").unwrap();
    let kms = kms(&key_id, REGION, &endpoint).await;
    assert!(unlock_pending(&keyring, &kms).await.is_empty());
    assert!(!stderr.contains(blob));

    // Status says which master key KMS holds, without asking KMS.
    let local = Keyring::generate_entry(&id("k1"))
        .expose_secret()
        .to_owned();
    let both = format!("{local},{entry}");
    let mut env = kms_env(&key_id, &endpoint);
    env.push(("ATLAS_STRIPE__CRYPTO__MASTER_KEYS", &both));
    env.push(("ATLAS_STRIPE__CRYPTO__ACTIVE_KEY_ID", "k2"));
    let status = cli(&db, &env, &["keys", "status"]);
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("k1 ") && l.contains("local")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("k2 ") && l.contains("aws-kms") && l.contains("(active)")),
        "{out}"
    );
    assert!(!out.contains(blob));

    // KMS unreachable: generate and rewrap fail, naming the id, the endpoint and why.
    let down = format!("http://127.0.0.1:{}", closed_port());
    let mut env = kms_env(&key_id, &down);
    let failed = cli(&db, &env, &["keys", "generate", "--id", "k3", "--kms"]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    assert!(failed.stdout.is_empty());
    for part in ["\"k3\"", down.as_str(), "unreachable"] {
        assert!(stderr.contains(part), "{part} in: {stderr}");
    }
    env.push(("ATLAS_STRIPE__CRYPTO__MASTER_KEYS", &both));
    env.push(("ATLAS_STRIPE__CRYPTO__ACTIVE_KEY_ID", "k2"));
    // No credentials anywhere in the chain: said so, not "unreachable".
    let mut none = kms_env(&key_id, &endpoint);
    none.extend([
        ("AWS_ACCESS_KEY_ID", ""),
        ("AWS_SECRET_ACCESS_KEY", ""),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/nonexistent"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
    ]);
    let failed = cli(&db, &none, &["keys", "generate", "--id", "k3", "--kms"]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    assert!(stderr.contains("no AWS credentials"), "{stderr}");
    let failed = cli(&db, &env, &["keys", "rewrap"]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    for part in [
        "\"k2\"",
        down.as_str(),
        "unreachable",
        "nothing was rewrapped",
    ] {
        assert!(stderr.contains(part), "{part} in: {stderr}");
    }
    assert!(!stderr.contains(blob));
}
