//! Connect latency against a Stripe that takes a fixed 100 ms per answer.
//!
//! `cargo bench --bench connect_latency` — 50 connects, one after another, each probing
//! all five resources. One Stripe round trip is the floor (100 ms); a sequential prober
//! would take five (500 ms). Prints p50, p90, p99 and max.

use std::time::{Duration, Instant};

use atlas_stripe::auth::TenantTokens;
use atlas_stripe::config::Settings;
use atlas_stripe::crypto::{Keyring, MasterKeyId};
use atlas_stripe::domain::{random_id, Mode, TenantId};
use atlas_stripe::startup::Application;
use atlas_stripe::store::Actor;
use secrecy::{ExposeSecret, SecretString};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const CONNECTS: usize = 50;
const STRIPE_LATENCY: Duration = Duration::from_millis(100);

#[tokio::main]
async fn main() {
    let stripe = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(404)
                .set_body_json(serde_json::json!({"error": {
                    "code": "resource_missing",
                    "message": "No such customer: 'cus_x'",
                    "param": "id",
                    "type": "invalid_request_error",
                }}))
                .set_delay(STRIPE_LATENCY),
        )
        .mount(&stripe)
        .await;

    let dir = tempfile::tempdir().expect("temp dir");
    let db_url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let master = Keyring::generate_entry(&MasterKeyId::parse("bench").unwrap());
    let token_secret = random_id("", 48);
    let stripe_uri = stripe.uri();
    let settings = Settings::load(
        None,
        &[
            ("server.bind", "127.0.0.1:0"),
            ("database.url", &db_url),
            ("stripe.api_base", &stripe_uri),
            ("crypto.master_keys", master.expose_secret()),
            ("crypto.active_key_id", "bench"),
            ("crypto.fingerprint_key", &random_id("", 48)),
            ("auth.tenant_token_secret", &token_secret),
            ("dev.generate_secrets", "false"),
            ("limits.connect_attempts_per_minute", "100000"),
            ("log.filter", "warn"),
        ],
    )
    .expect("settings");
    let app = Application::build(&settings).await.expect("app");
    let base = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until(std::future::pending()));

    let store = atlas_stripe::store::connect(&settings.database)
        .await
        .expect("store");
    let tenant = TenantId::parse("ten_bench").unwrap();
    store
        .upsert_tenant(&tenant, Mode::Test, &Actor::Cli)
        .await
        .expect("tenant");
    let tokens = TenantTokens::new(&SecretString::from(token_secret.clone()), 0);
    let token = tokens.mint(&tenant, time::Duration::hours(1));
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/tenants/ten_bench/stripe/connection");

    let mut latencies = Vec::with_capacity(CONNECTS);
    for i in 0..=CONNECTS {
        let api_key = random_id("rk_test_", 99);
        let started = Instant::now();
        let response = http
            .post(&url)
            .bearer_auth(token.expose_secret())
            .json(&serde_json::json!({ "api_key": api_key }))
            .send()
            .await
            .expect("connect");
        let elapsed = started.elapsed();
        assert!(
            response.status().is_success(),
            "connect failed: {}",
            response.status()
        );
        // The first connect warms connections and is not counted.
        if i > 0 {
            latencies.push(elapsed);
        }
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1)];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "connect latency over {CONNECTS} connects, Stripe answering in {} ms:",
        STRIPE_LATENCY.as_millis()
    );
    println!(
        "  p50 {:.1} ms   p90 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
        ms(at(0.50)),
        ms(at(0.90)),
        ms(at(0.99)),
        ms(at(1.0))
    );
    println!(
        "  target p50 <= 120 ms (one round trip plus our cost); a sequential prober takes {} ms",
        5 * STRIPE_LATENCY.as_millis()
    );
}
