//! Bad configuration is refused at start-up, naming the setting (the binary, as an operator
//! runs it), and tenant tokens are held to `[auth]` (over HTTP).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;

use crate::backend_tests;
use crate::helpers::{assert_error, spawn_app, spawn_app_with, Backend, TestApp, TestSecrets};

/// What `atlas-stripe serve` did.
enum Outcome {
    /// Exited on its own, with this stderr.
    Refused(String),
    /// Listened; stopped with SIGTERM. Its stderr.
    Served(String),
}

impl Outcome {
    fn refused(self, what: &str) -> String {
        match self {
            Outcome::Refused(stderr) => stderr,
            Outcome::Served(stderr) => panic!("started with {what}:\n{stderr}"),
        }
    }

    fn served(self, what: &str) -> String {
        match self {
            Outcome::Served(stderr) => stderr,
            Outcome::Refused(stderr) => panic!("refused {what}:\n{stderr}"),
        }
    }
}

/// A working directory as the Docker image has it: `config/production.toml` (the shipped
/// one) beside the data.
fn workdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/production.toml"),
        dir.path().join("config/production.toml"),
    )
    .unwrap();
    dir
}

/// `atlas-stripe serve` in `dir` on SQLite, in development unless `configure` says
/// otherwise.
fn serve(dir: &Path, configure: impl FnOnce(&mut Command)) -> Outcome {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let stderr_path = dir.join(format!("stderr-{port}.log"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_atlas-stripe"));
    command
        .current_dir(dir)
        .arg("serve")
        .env_remove("ATLAS_STRIPE_ENVIRONMENT")
        .env_remove("ATLAS_STRIPE_CONFIG")
        .env_remove("RUST_LOG")
        .env(
            "ATLAS_STRIPE__DATABASE__URL",
            format!("sqlite://{}/atlas.db", dir.display()),
        )
        .env(
            "ATLAS_STRIPE__DEV__SECRETS_FILE",
            dir.join("dev-secrets.toml"),
        )
        .env("ATLAS_STRIPE__LOG__FILTER", "warn")
        .env("ATLAS_STRIPE__REVERIFY__ENABLED", "false")
        .env("ATLAS_STRIPE__SERVER__BIND", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    configure(&mut command);
    let mut server = command.spawn().unwrap();
    let started = Instant::now();
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap();
    loop {
        if let Some(status) = server.try_wait().unwrap() {
            assert!(!status.success(), "exited 0 on its own:\n{}", stderr());
            return Outcome::Refused(stderr());
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "neither listened nor exited:\n{}",
            stderr()
        );
        // Tight: the SIGTERM below comes as soon as the port answers, as an orchestrator's
        // might; the service must drain it (exit 0), not die of it.
        std::thread::sleep(Duration::from_millis(1));
    }
    Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    let status = server.wait().unwrap();
    assert!(status.success(), "exit status {status:?}:\n{}", stderr());
    Outcome::Served(stderr())
}

/// A SIGTERM the moment the port answers is a graceful shutdown (exit 0), every time: the
/// handler is in place before the port is bound.
#[test]
fn a_sigterm_as_soon_as_the_port_answers_drains() {
    let dir = workdir();
    for _ in 0..10 {
        serve(dir.path(), |_| {}).served("development defaults");
    }
}

/// Production, with every secret given: only what a test adds can be wrong.
fn production(command: &mut Command, secrets: &TestSecrets) {
    command
        .env("ATLAS_STRIPE_ENVIRONMENT", "production")
        .env("ATLAS_STRIPE__CRYPTO__MASTER_KEYS", &secrets.master_keys)
        .env(
            "ATLAS_STRIPE__CRYPTO__ACTIVE_KEY_ID",
            &secrets.active_key_id,
        )
        .env(
            "ATLAS_STRIPE__CRYPTO__FINGERPRINT_KEY",
            &secrets.fingerprint_key,
        )
        .env(
            "ATLAS_STRIPE__AUTH__TENANT_TOKEN_SECRET",
            &secrets.tenant_token_secret,
        );
}

const PUBLIC_URL: &str = "ATLAS_STRIPE__WEBHOOKS__PUBLIC_BASE_URL";

/// Issue 11, item 11: every production connect would otherwise register a webhook URL
/// Stripe cannot reach (the loopback development default).
#[test]
fn production_refuses_a_webhook_url_stripe_cannot_reach() {
    let dir = workdir();
    let secrets = TestSecrets::generate();

    let missing = serve(dir.path(), |c| production(c, &secrets)).refused("no public URL");
    assert!(
        missing.contains("webhooks.public_base_url is not set") && missing.contains(PUBLIC_URL),
        "{missing}"
    );
    for url in [
        "http://stripe.atlas.example",
        "https://127.0.0.1:8080",
        "https://localhost",
        "https://stripe.localhost",
        "https://10.0.0.7",
        "https://172.20.1.1",
        "https://192.168.0.10",
        "https://169.254.169.254",
        "https://100.64.1.1",
        "https://0.0.0.0",
        "https://[::]",
        "https://[::1]",
        "https://[fd12:3456::1]",
        "https://[fe80::1]",
    ] {
        let stderr = serve(dir.path(), |c| {
            production(c, &secrets);
            c.env(PUBLIC_URL, url);
        })
        .refused(url);
        assert!(
            stderr.contains("webhooks.public_base_url") && stderr.contains(PUBLIC_URL),
            "{url}: {stderr}"
        );
    }

    serve(dir.path(), |c| {
        production(c, &secrets);
        c.env(PUBLIC_URL, "https://stripe.atlas.example");
    })
    .served("a public https URL");
    // Outside production the loopback default is fine.
    serve(dir.path(), |_| {}).served("development");
}

/// Issue 11, item 12: `--config` layers over `config/production.toml` instead of replacing
/// it, and no layer can turn secret generation back on in production.
#[test]
fn production_never_generates_development_secrets() {
    let dir = workdir();
    let file = dir.path().join("mine.toml");
    std::fs::write(&file, "[dev]\ngenerate_secrets = true\n").unwrap();
    let stderr = serve(dir.path(), |c| {
        c.env("ATLAS_STRIPE_ENVIRONMENT", "production")
            .env(PUBLIC_URL, "https://stripe.atlas.example")
            .arg("--config")
            .arg(&file);
    })
    .refused("dev.generate_secrets = true in --config");
    assert!(
        stderr.contains("dev.generate_secrets") && stderr.contains("mine.toml"),
        "names the setting and the file: {stderr}"
    );
    let stderr = serve(dir.path(), |c| {
        c.env("ATLAS_STRIPE_ENVIRONMENT", "production")
            .env(PUBLIC_URL, "https://stripe.atlas.example")
            .env("ATLAS_STRIPE__DEV__GENERATE_SECRETS", "true");
    })
    .refused("ATLAS_STRIPE__DEV__GENERATE_SECRETS=true");
    assert!(
        stderr.contains("dev.generate_secrets")
            && stderr.contains("ATLAS_STRIPE__DEV__GENERATE_SECRETS"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("dev-secrets.toml").exists(),
        "no development secrets were written"
    );

    // A --config file that says nothing of logs: production.toml's JSON logs still apply.
    let secrets = TestSecrets::generate();
    let file = dir.path().join("filter.toml");
    std::fs::write(&file, "[log]\nfilter = \"info\"\n").unwrap();
    let stderr = serve(dir.path(), |c| {
        production(c, &secrets);
        c.env_remove("ATLAS_STRIPE__LOG__FILTER")
            .env(PUBLIC_URL, "https://stripe.atlas.example")
            .arg("--config")
            .arg(&file);
    })
    .served("production with --config");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "info lines were logged");
    for line in lines {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "production.toml's log.format = json was lost under --config: {line}"
        );
    }
}

/// Issue 11, item 13: a mistyped key was silently ignored, and a zero flush interval
/// panicked a background task while the service went on serving.
#[test]
fn unknown_settings_and_senseless_numbers_refuse_to_start() {
    let dir = workdir();
    let stderr = serve(dir.path(), |c| {
        c.env("ATLAS_STRIPE__SERVER__BND", "0.0.0.0:9999");
    })
    .refused("ATLAS_STRIPE__SERVER__BND");
    assert!(
        stderr.contains("unknown setting server.bnd")
            && stderr.contains("ATLAS_STRIPE__SERVER__BND"),
        "{stderr}"
    );

    let file = dir.path().join("typo.toml");
    std::fs::write(&file, "[server]\nbnd = \"0.0.0.0:9999\"\n").unwrap();
    let stderr = serve(dir.path(), |c| {
        c.arg("--config").arg(&file);
    })
    .refused("server.bnd in a file");
    assert!(
        stderr.contains("unknown setting server.bnd") && stderr.contains("typo.toml"),
        "{stderr}"
    );

    for (variable, key) in [
        (
            "ATLAS_STRIPE__ACCOUNTING__FLUSH_INTERVAL_MS",
            "accounting.flush_interval_ms",
        ),
        (
            "ATLAS_STRIPE__SERVER__BODY_LIMIT_BYTES",
            "server.body_limit_bytes",
        ),
        (
            "ATLAS_STRIPE__STRIPE__REQUEST_TIMEOUT_MS",
            "stripe.request_timeout_ms",
        ),
        (
            "ATLAS_STRIPE__DATABASE__MAX_CONNECTIONS",
            "database.max_connections",
        ),
    ] {
        let stderr = serve(dir.path(), |c| {
            c.env(variable, "0");
        })
        .refused(variable);
        assert!(
            stderr.contains(&format!("{key} must be")) && stderr.contains(variable),
            "{stderr}"
        );
    }
}

backend_tests!(
    tenant_tokens_honour_nbf_and_a_bounded_lifetime,
    tenant_tokens_carry_the_configured_issuer_and_audience,
);

fn sign(secret: &str, claims: serde_json::Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// 404 `not_connected` means the token was accepted; 401 that it was not.
async fn accepted(app: &TestApp, claims: serde_json::Value) -> bool {
    let token = sign(&app.secrets.tenant_token_secret, claims.clone());
    let response = app
        .http
        .get(app.url(&TestApp::connection_path("ten_a")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    match response.status().as_u16() {
        404 => {
            assert_error(response, 404, "not_connected").await;
            true
        }
        401 => {
            assert_error(response, 401, "unauthenticated").await;
            false
        }
        other => panic!("{other} for {claims}"),
    }
}

/// Issue 11, item 14: `nbf` honoured; `exp` at most `auth.tenant_token_max_ttl_secs`
/// (3600 by default) plus the leeway (30) away.
async fn tenant_tokens_honour_nbf_and_a_bounded_lifetime(backend: Backend) {
    let app = spawn_app(backend).await;
    app.create_tenant("ten_a", atlas_stripe::domain::Mode::Test)
        .await;
    let soon = now() + 600;
    for (claims, expected) in [
        (json!({"tenant_id": "ten_a", "exp": soon}), true),
        (
            json!({"tenant_id": "ten_a", "exp": soon, "nbf": now() - 60}),
            true,
        ),
        (
            json!({"tenant_id": "ten_a", "exp": soon, "nbf": now() + 5}),
            true,
        ),
        (
            json!({"tenant_id": "ten_a", "exp": soon, "nbf": now() + 300}),
            false,
        ),
        (
            json!({"tenant_id": "ten_a", "exp": soon, "nbf": "later"}),
            false,
        ),
        (json!({"tenant_id": "ten_a", "exp": now() + 3600}), true),
        (
            json!({"tenant_id": "ten_a", "exp": now() + 3600 + 300}),
            false,
        ),
        (
            json!({"tenant_id": "ten_a", "exp": now() + 86_400 * 365}),
            false,
        ),
    ] {
        assert_eq!(accepted(&app, claims.clone()).await, expected, "{claims}");
    }
}

async fn tenant_tokens_carry_the_configured_issuer_and_audience(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[
            ("auth.tenant_token_issuer", "https://app.atlas.example"),
            ("auth.tenant_token_audience", "atlas-stripe"),
            ("auth.tenant_token_max_ttl_secs", "600"),
        ],
    )
    .await;
    app.create_tenant("ten_a", atlas_stripe::domain::Mode::Test)
        .await;
    let exp = now() + 300;
    let iss = "https://app.atlas.example";
    for (claims, expected) in [
        (json!({"tenant_id": "ten_a", "exp": exp}), false),
        (json!({"tenant_id": "ten_a", "exp": exp, "iss": iss}), false),
        (
            json!({"tenant_id": "ten_a", "exp": exp, "aud": "atlas-stripe"}),
            false,
        ),
        (
            json!({"tenant_id": "ten_a", "exp": exp, "iss": "https://evil.example", "aud": "atlas-stripe"}),
            false,
        ),
        (
            json!({"tenant_id": "ten_a", "exp": exp, "iss": iss, "aud": "atlas-billing"}),
            false,
        ),
        (
            json!({"tenant_id": "ten_a", "exp": exp, "iss": iss, "aud": "atlas-stripe"}),
            true,
        ),
        (
            json!({"tenant_id": "ten_a", "exp": exp, "iss": iss, "aud": ["atlas-billing", "atlas-stripe"]}),
            true,
        ),
        // The configured lifetime bound: 600 s plus 30 s of leeway.
        (
            json!({"tenant_id": "ten_a", "exp": now() + 900, "iss": iss, "aud": "atlas-stripe"}),
            false,
        ),
    ] {
        assert_eq!(accepted(&app, claims.clone()).await, expected, "{claims}");
    }
}
