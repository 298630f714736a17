//! The settings' unit tests: layers, refusals naming key and layer, ranges, secrets.

use std::path::Path;
use std::time::Duration;

use axum::http::HeaderValue;

use secrecy::ExposeSecret;

use super::load::Layers;
use super::*;
use crate::domain::Resource;

/// Loads with named layers, never the process environment.
fn load_with(
    environment: Option<&str>,
    config_dir: &Path,
    file: Option<&Path>,
    vars: &[(&str, &str)],
) -> Result<Settings, SettingsError> {
    let layers = Layers {
        environment: environment.map(str::to_owned),
        config_dir: config_dir.to_owned(),
        file: file.map(Path::to_owned),
        vars: Some(
            vars.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
    };
    Settings::load_layers(&layers, &[])
}

/// A config directory holding the shipped `production.toml`.
fn production_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("production.toml"),
        include_str!("../../config/production.toml"),
    )
    .unwrap();
    dir
}

const PUBLIC_URL: (&str, &str) = (
    "ATLAS_STRIPE__WEBHOOKS__PUBLIC_BASE_URL",
    "https://stripe.atlas.example",
);

fn error(result: Result<Settings, SettingsError>) -> String {
    match result {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn redacts_database_passwords() {
    assert_eq!(
        redact_url("postgres://app:hunter2@db:5432/atlas?sslmode=require"),
        "postgres://…@db:5432/atlas"
    );
    assert_eq!(redact_url("sqlite://data/a.db"), "sqlite://data/a.db");
    let settings = Settings::load(None, &[("database.url", "postgres://u:hunter2@h/d")]).unwrap();
    assert!(!format!("{settings:?}").contains("hunter2"));
}

#[test]
fn production_without_secrets_refuses_to_start() {
    let settings = Settings::load(None, &[("dev.generate_secrets", "false")]).unwrap();
    let err = settings.secrets().err().expect("must refuse").to_string();
    assert!(err.contains("crypto.master_keys is not set"), "{err}");
}

#[test]
fn development_secrets_are_generated_once_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dev-secrets.toml");
    let file_str = file.to_str().unwrap();
    let settings = Settings::load(None, &[("dev.secrets_file", file_str)]).unwrap();
    let first = settings.secrets().unwrap();
    assert_eq!(first.generated_into.as_deref(), Some(file.as_path()));
    let second = settings.secrets().unwrap();
    assert_eq!(
        first.tenant_token_secret.expose_secret(),
        second.tenant_token_secret.expose_secret()
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "secrets file readable by others");
    }
}

#[test]
fn values_their_type_refuses_are_named_with_their_layer() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "ATLAS_STRIPE__STRIPE__REQUIRED_RESOURCES",
            "customers,charges",
            "stripe.required_resources lists a resource Atlas does not know: unknown Stripe \
             resource \"charges\"",
        ),
        (
            "ATLAS_STRIPE__PROXY__ALLOWED",
            "POST /v1/customers,PATCH /v1/customers",
            "proxy.allowed entry \"PATCH /v1/customers\": the method is GET, POST or DELETE",
        ),
        (
            "ATLAS_STRIPE__SERVER__CORS_ALLOWED_ORIGINS",
            "https://app.atlas.example/",
            "server.cors_allowed_origins lists \"https://app.atlas.example/\"",
        ),
        (
            "ATLAS_STRIPE__LIMITS__CONNECT_ATTEMPTS_PER_MINUTE",
            "0",
            "limits.connect_attempts_per_minute must be 1 to 1000000, not 0",
        ),
        (
            "ATLAS_STRIPE__PROXY__LIVE_REQUESTS_PER_SECOND",
            "10001",
            "proxy.live_requests_per_second must be 1 to 10000, not 10001",
        ),
        (
            "ATLAS_STRIPE__SERVER__SHUTDOWN_GRACE_MS",
            "-1",
            "server.shutdown_grace_ms must be a number of milliseconds, not -1",
        ),
        (
            "ATLAS_STRIPE__REVERIFY__LEASE_SECS",
            "-1",
            "reverify.lease_secs must be a number of seconds, not -1",
        ),
        (
            "ATLAS_STRIPE__PROXY__STRIPE_VERSIONS",
            "2023-08-16,latest",
            "proxy.stripe_versions \"latest\" is not a Stripe version (YYYY-MM-DD, optionally .name)",
        ),
    ];
    for (variable, value, expected) in cases {
        let err = error(load_with(None, dir.path(), None, &[(variable, value)]));
        assert!(
            err.contains(expected) && err.contains(&format!("(set in variable {variable})")),
            "{variable}={value}: {err}"
        );
    }
    let s = Settings::load(None, &[]).unwrap();
    assert_eq!(s.stripe.required_resources.len(), 5);
    assert_eq!(s.server.shutdown_grace, Duration::from_millis(20_000));
    assert_eq!(s.reverify.period, Duration::from_secs(604_800));
}

/// default.toml, then $ENV.toml, then --config, then variables; --config does not
/// replace the environment's file.
#[test]
fn layers_apply_in_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("staging.toml"),
        "[server]\nbind = \"10.0.0.1:9000\"\n[limits]\nconnect_attempts_per_minute = 7\n\
         verify_attempts_per_minute = 7\n[log]\nfilter = \"debug\"\n",
    )
    .unwrap();
    let file = dir.path().join("mine.toml");
    std::fs::write(
        &file,
        "[limits]\nconnect_attempts_per_minute = 8\n[log]\nfilter = \"info\"\n",
    )
    .unwrap();
    let s = load_with(
        Some("staging"),
        dir.path(),
        Some(&file),
        &[("ATLAS_STRIPE__LOG__FILTER", "warn")],
    )
    .unwrap();
    assert_eq!(s.server.bind, "10.0.0.1:9000", "the environment's file");
    assert_eq!(
        s.limits.verify_attempts_per_minute.get(),
        7,
        "the environment's file"
    );
    assert_eq!(
        s.limits.connect_attempts_per_minute.get(),
        8,
        "--config over it"
    );
    assert_eq!(s.log.filter, "warn", "variables over --config");
    assert_eq!(s.server.body_limit_bytes, 16384, "default.toml under all");

    let err = error(load_with(Some("nowhere"), dir.path(), Some(&file), &[]));
    assert!(
        err.contains("nowhere.toml"),
        "a named environment needs its file: {err}"
    );
    for bad in ["", "../production", "prod uction"] {
        let err = error(load_with(Some(bad), dir.path(), None, &[]));
        assert!(err.contains(ENVIRONMENT_VAR), "{err}");
    }
}

#[test]
fn production_never_generates_development_secrets() {
    let dir = production_dir();
    let file = dir.path().join("mine.toml");
    std::fs::write(&file, "[dev]\ngenerate_secrets = true\n").unwrap();
    let err = error(load_with(
        Some(PRODUCTION),
        dir.path(),
        Some(&file),
        &[PUBLIC_URL],
    ));
    assert!(
        err.contains("dev.generate_secrets") && err.contains("mine.toml"),
        "names the setting and the file: {err}"
    );
    let err = error(load_with(
        Some(PRODUCTION),
        dir.path(),
        None,
        &[PUBLIC_URL, ("ATLAS_STRIPE__DEV__GENERATE_SECRETS", "true")],
    ));
    assert!(
        err.contains("dev.generate_secrets") && err.contains("ATLAS_STRIPE__DEV__GENERATE_SECRETS"),
        "names the setting and the variable: {err}"
    );

    // Even when a caller flips it afterwards, secrets() generates nothing.
    let secrets_file = dir.path().join("dev-secrets.toml");
    let mut settings = load_with(
        Some(PRODUCTION),
        dir.path(),
        None,
        &[
            PUBLIC_URL,
            (
                "ATLAS_STRIPE__DEV__SECRETS_FILE",
                secrets_file.to_str().unwrap(),
            ),
        ],
    )
    .unwrap();
    assert!(settings.is_production());
    settings.dev.generate_secrets = true;
    let err = settings.secrets().err().expect("refused").to_string();
    assert!(err.contains("crypto.master_keys is not set"), "{err}");
    assert!(!secrets_file.exists(), "nothing generated");
}

#[test]
fn unknown_keys_are_named_with_their_layer() {
    let dir = tempfile::tempdir().unwrap();
    let err = error(load_with(
        None,
        dir.path(),
        None,
        &[("ATLAS_STRIPE__SERVER__BND", "0.0.0.0:80")],
    ));
    assert!(
        err.contains("unknown setting server.bnd")
            && err.contains("ATLAS_STRIPE__SERVER__BND")
            && err.contains("`bind`"),
        "{err}"
    );
    assert!(!err.contains("0.0.0.0:80"), "values are not echoed: {err}");

    let file = dir.path().join("typo.toml");
    std::fs::write(&file, "[auth]\ntenant_token_secrte = \"hunter2\"\n").unwrap();
    let err = error(load_with(None, dir.path(), Some(&file), &[]));
    assert!(
        err.contains("unknown setting auth.tenant_token_secrte") && err.contains("typo.toml"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "values are not echoed: {err}");

    let err = error(load_with(
        None,
        dir.path(),
        None,
        &[("ATLAS_STRIPE__SERVERR__BIND", "x")],
    ));
    assert!(
        err.contains("unknown setting serverr") && err.contains("ATLAS_STRIPE__SERVERR__BIND"),
        "{err}"
    );
    let err = Settings::load(None, &[("limits.connect_attempts", "5")])
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("unknown setting limits.connect_attempts"),
        "{err}"
    );
}

/// The body budget covers every route's limit, so a declared length over the budget is
/// always a 413 of the route, never a 503; probes and the API never share one address; an
/// `expand[]` entry is a field path.
#[test]
fn flood_settings_are_checked_against_each_other() {
    let err = error(Settings::load(
        None,
        &[
            ("server.inflight_body_bytes", "1048576"),
            ("webhooks.body_limit_bytes", "2097152"),
        ],
    ));
    assert!(
        err.contains("server.inflight_body_bytes") && err.contains("webhooks.body_limit_bytes"),
        "{err}"
    );
    let err = error(Settings::load(
        None,
        &[
            ("server.bind", "127.0.0.1:8080"),
            ("server.ops_bind", "127.0.0.1:8080"),
        ],
    ));
    assert!(err.contains("server.ops_bind"), "{err}");
    let err = error(Settings::load(
        None,
        &[("proxy.expand_allowed", "customer,Sources!")],
    ));
    assert!(err.contains("proxy.expand_allowed"), "{err}");
    let s = Settings::load(None, &[("server.ops_bind", "127.0.0.1:9090")]).unwrap();
    assert_eq!(s.server.ops_bind, "127.0.0.1:9090");
    assert_eq!(
        s.server.inflight_body_bytes,
        64 << 20,
        "default.toml: 64 MiB"
    );
}

#[test]
fn every_number_is_checked_and_the_error_names_it() {
    let cases = [
        ("server.body_limit_bytes", "0"),
        ("server.body_limit_bytes", "1000000000"),
        ("server.shutdown_grace_ms", "86400000"),
        ("server.header_read_timeout_ms", "0"),
        ("server.body_read_timeout_ms", "0"),
        ("server.idle_timeout_ms", "0"),
        ("server.max_connections", "0"),
        ("server.max_connections_per_peer", "2000"),
        ("server.inflight_body_bytes", "1000"),
        ("database.max_connections", "0"),
        ("database.acquire_timeout_ms", "0"),
        ("stripe.connect_timeout_ms", "0"),
        ("stripe.request_timeout_ms", "0"),
        ("stripe.max_retries", "1000"),
        ("stripe.retry_base_delay_ms", "0"),
        ("stripe.retry_max_delay_ms", "100"),
        ("stripe.probe_deadline_ms", "0"),
        ("auth.tenant_token_leeway_secs", "86400"),
        ("auth.tenant_token_max_ttl_secs", "0"),
        ("auth.tenant_token_max_ttl_secs", "31536000"),
        ("limits.connect_attempts_per_minute", "0"),
        ("limits.verify_attempts_per_minute", "0"),
        ("reverify.jitter_secs", "999999"),
        ("reverify.tick_ms", "0"),
        ("reverify.batch", "0"),
        ("reverify.concurrency", "0"),
        ("reverify.lease_secs", "5"),
        ("reverify.max_stripe_calls_per_second", "6"),
        ("webhooks.recovery_sweep_secs", "60"),
        ("webhooks.recovery_sweep_secs", "2592000"),
        ("webhooks.retention_days", "30"),
        ("accounting.retention_days", "0"),
        ("webhooks.tolerance_secs", "0"),
        ("webhooks.tolerance_secs", "-5"),
        ("webhooks.body_limit_bytes", "0"),
        ("accounting.flush_interval_ms", "0"),
        ("accounting.flush_interval_ms", "86400000"),
    ];
    for (key, value) in cases {
        let err = error(Settings::load(None, &[(key, value)]));
        assert!(
            err.contains(&format!("{key} must be")),
            "{key} = {value}: {err}"
        );
    }
    // Which layer set it.
    let dir = tempfile::tempdir().unwrap();
    let err = error(load_with(
        None,
        dir.path(),
        None,
        &[("ATLAS_STRIPE__ACCOUNTING__FLUSH_INTERVAL_MS", "0")],
    ));
    assert!(
        err.contains("accounting.flush_interval_ms must be 1 to 3600000, not 0")
            && err.contains("ATLAS_STRIPE__ACCOUNTING__FLUSH_INTERVAL_MS"),
        "{err}"
    );
    // A value that is not a number at all.
    let err = error(Settings::load(None, &[("server.max_connections", "many")]));
    assert!(err.contains("server.max_connections"), "{err}");
    // Everything else too.
    for (key, value) in [
        ("log.filter", "info,[[["),
        ("auth.tenant_token_issuer", " "),
        ("stripe.api_base", "ftp://api.stripe.com"),
        ("database.url", "mysql://db/atlas"),
        ("webhooks.enabled_events", ""),
        ("stripe.required_resources", "customers,charges"),
    ] {
        let err = error(Settings::load(None, &[(key, value)]));
        assert!(err.contains(key), "{key} = {value}: {err}");
    }
    // The defaults pass, and the new settings have them.
    let s = Settings::load(None, &[]).unwrap();
    assert_eq!(
        (
            s.server.header_read_timeout,
            s.server.body_read_timeout,
            s.server.idle_timeout,
            s.server.max_connections,
            s.limits.verify_attempts_per_minute.get(),
            s.auth.tenant_token_max_ttl,
        ),
        (
            Duration::from_millis(10_000),
            Duration::from_millis(30_000),
            Duration::from_millis(60_000),
            1024,
            6,
            Duration::from_secs(3600)
        )
    );
    assert!(s.server.cors_allowed_origins.is_empty());
    assert_eq!(s.auth.tenant_token_issuer, None);
    assert_eq!(s.auth.tenant_token_audience, None);
}

#[test]
fn list_settings_split_a_variable_on_commas() {
    let dir = tempfile::tempdir().unwrap();
    let s = load_with(
        None,
        dir.path(),
        None,
        &[
            (
                "ATLAS_STRIPE__SERVER__CORS_ALLOWED_ORIGINS",
                "https://app.atlas.example, http://localhost:3000",
            ),
            (
                "ATLAS_STRIPE__WEBHOOKS__ENABLED_EVENTS",
                "invoice.paid,invoice.payment_failed",
            ),
            ("ATLAS_STRIPE__STRIPE__REQUIRED_RESOURCES", "customers"),
        ],
    )
    .unwrap();
    assert_eq!(
        s.server.cors_allowed_origins,
        [
            HeaderValue::from_static("https://app.atlas.example"),
            HeaderValue::from_static("http://localhost:3000")
        ]
    );
    assert_eq!(
        s.webhooks.enabled_events,
        ["invoice.paid", "invoice.payment_failed"]
    );
    assert_eq!(s.stripe.required_resources, [Resource::Customers]);
    let s = load_with(
        None,
        dir.path(),
        None,
        &[("ATLAS_STRIPE__SERVER__CORS_ALLOWED_ORIGINS", "")],
    )
    .unwrap();
    assert!(s.server.cors_allowed_origins.is_empty());
}

#[test]
fn cors_origins_must_be_origins() {
    for good in [
        "https://app.atlas.example",
        "http://localhost:3000",
        "https://[::1]:8443",
    ] {
        let s = Settings::load(None, &[("server.cors_allowed_origins", good)]).unwrap();
        assert_eq!(
            s.server.cors_allowed_origins,
            [HeaderValue::from_static(good)]
        );
    }
    for bad in [
        "*",
        "app.atlas.example",
        "https://app.atlas.example/",
        "https://app.atlas.example/path",
        "https://app.atlas.example?x=1",
        "https://APP.atlas.example",
        "https://app.atlas.example:443",
        "ftp://app.atlas.example",
        "https://user@app.atlas.example",
        "null",
    ] {
        let err = error(Settings::load(
            None,
            &[("server.cors_allowed_origins", bad)],
        ));
        assert!(err.contains("server.cors_allowed_origins"), "{bad}: {err}");
    }
}

#[test]
fn production_needs_a_public_https_webhook_url() {
    let dir = production_dir();
    let prod = |url: Option<&str>| {
        let mut vars = vec![];
        if let Some(url) = url {
            vars.push(("ATLAS_STRIPE__WEBHOOKS__PUBLIC_BASE_URL", url));
        }
        load_with(Some(PRODUCTION), dir.path(), None, &vars)
    };
    let err = error(prod(None));
    assert!(
        err.contains("webhooks.public_base_url is not set")
            && err.contains("production.toml")
            && err.contains("ATLAS_STRIPE__WEBHOOKS__PUBLIC_BASE_URL"),
        "{err}"
    );
    for bad in [
        "",
        "stripe.atlas.example",
        "http://stripe.atlas.example",
        "https://127.0.0.1",
        "https://127.1:8443",
        "https://2130706433",
        "https://localhost",
        "https://LOCALHOST.:8443",
        "https://api.localhost",
        "https://atlas-stripe:8080",
        "https://printer.local",
        "https://10.1.2.3",
        "https://172.16.0.1",
        "https://172.31.255.255",
        "https://192.168.1.10",
        "https://169.254.169.254",
        "https://100.64.0.1",
        "https://100.127.255.254",
        "https://0.0.0.0",
        "https://255.255.255.255",
        "https://[::]",
        "https://[::1]",
        "https://[fd00::1]",
        "https://[fc00::1]",
        "https://[fe80::1]",
        "https://[::ffff:10.0.0.1]",
        "https://[::ffff:127.0.0.1]",
        "https://[64:ff9b::a00:1]",
        "https://stripe.atlas.example?x=1",
        "https://user:pw@stripe.atlas.example",
    ] {
        let err = error(prod(Some(bad)));
        assert!(
            err.contains("webhooks.public_base_url")
                && err.contains("ATLAS_STRIPE__WEBHOOKS__PUBLIC_BASE_URL"),
            "{bad:?}: {err}"
        );
        assert!(!err.contains("pw@"), "credentials are not echoed: {err}");
    }
    for good in [
        "https://stripe.atlas.example",
        "https://stripe.atlas.example:8443/atlas-stripe/",
        "https://8.8.8.8",
        "https://100.128.0.1",
        "https://172.32.0.1",
        "https://[2606:4700::1111]",
    ] {
        let s = prod(Some(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
        assert_eq!(s.webhooks.public_base_url, good);
    }
    // Outside production a loopback URL is the default, and fine.
    let s = load_with(None, dir.path(), None, &[]).unwrap();
    assert_eq!(s.webhooks.public_base_url, "http://127.0.0.1:8080");
    assert!(!s.is_production());
}
