//! Connect latency against a Stripe that takes a fixed 100 ms per answer.
//!
//! `cargo bench --bench connect_latency` — 50 first connects, one after another (each for a
//! tenant of its own, answered 201): the five permission probes, concurrently, then the
//! registration of our webhook endpoint. Two Stripe round trips are the floor (200 ms); a
//! sequential prober would take six (600 ms). Prints p50, p90, p99 and max.
//!
//! `ATLAS_BENCH_QUICK=1` runs three connects (plus the warm-up) and asserts the same, for
//! the test command.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use atlas_stripe::auth::TenantTokens;
use atlas_stripe::config::Settings;
use atlas_stripe::crypto::{Keyring, MasterKeyId};
use atlas_stripe::domain::{random_id, Mode, TenantId};
use atlas_stripe::startup::Application;
use atlas_stripe::store::Actor;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use wiremock::matchers::{any, method, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const STRIPE_LATENCY: Duration = Duration::from_millis(100);

/// Stripe's answer to an update of an object that does not exist: the permission check
/// passed, so the probe counts as granted.
struct NoSuchObject;

impl Respond for NoSuchObject {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let segments: Vec<&str> = request.url.path().split('/').collect();
        let (object, id) = match segments.as_slice() {
            [_, _, "checkout", "sessions", id, "expire"] => ("checkout.session", *id),
            [_, _, "customers", id] => ("customer", *id),
            [_, _, "coupons", id] => ("coupon", *id),
            [_, _, "invoices", id] => ("invoice", *id),
            [_, _, "webhook_endpoints", id] => ("webhook_endpoint", *id),
            _ => ("object", ""),
        };
        ResponseTemplate::new(404)
            .set_body_json(json!({"error": {
                "code": "resource_missing",
                "doc_url": "https://stripe.com/docs/error-codes/resource-missing",
                "message": format!("No such {object}: '{id}'"),
                "param": "id",
                "type": "invalid_request_error",
            }}))
            .set_delay(STRIPE_LATENCY)
    }
}

/// `POST /v1/webhook_endpoints`: Stripe's webhook_endpoint object, with its signing secret
/// (returned at creation only).
#[derive(Default)]
struct RegisterEndpoint {
    next: AtomicU32,
}

impl Respond for RegisterEndpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let form: Vec<(String, String)> = url::form_urlencoded::parse(&request.body)
            .into_owned()
            .collect();
        let value = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let events: Vec<&str> = form
            .iter()
            .filter(|(k, _)| k == "enabled_events[]")
            .map(|(_, v)| v.as_str())
            .collect();
        ResponseTemplate::new(200)
            .set_body_json(json!({
                "id": format!("we_1Bench{n:010}"),
                "object": "webhook_endpoint",
                "api_version": value("api_version"),
                "application": null,
                "created": 1_700_000_000,
                "description": value("description"),
                "enabled_events": events,
                "livemode": false,
                "metadata": {
                    "managed_by": value("metadata[managed_by]"),
                    "tenant_id": value("metadata[tenant_id]"),
                    "connection_id": value("metadata[connection_id]"),
                },
                "secret": format!("whsec_{}", random_id("", 32)),
                "status": "enabled",
                "url": value("url"),
            }))
            .set_delay(STRIPE_LATENCY)
    }
}

/// Stripe's answer to a URL it does not know (never "granted").
fn unrecognized() -> ResponseTemplate {
    ResponseTemplate::new(404).set_body_json(json!({"error": {
        "message": "Unrecognized request URL. Please see https://stripe.com/docs or we can help at https://support.stripe.com/.",
        "type": "invalid_request_error",
    }}))
}

#[tokio::main]
async fn main() {
    let quick = std::env::var_os("ATLAS_BENCH_QUICK").is_some_and(|v| v != "0");
    let connects: usize = if quick { 3 } else { 50 };
    let stripe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path_regex(r"^/v1/webhook_endpoints$"))
        .respond_with(RegisterEndpoint::default())
        .mount(&stripe)
        .await;
    Mock::given(method("POST"))
        .and(path_regex(
            r"^/v1/(customers/cus_|checkout/sessions/cs_[A-Za-z0-9]+/expire$|coupons/|invoices/in_|webhook_endpoints/we_)",
        ))
        .respond_with(NoSuchObject)
        .mount(&stripe)
        .await;
    Mock::given(any())
        .respond_with(unrecognized())
        .with_priority(u8::MAX)
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
            ("reverify.enabled", "false"),
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
    let tokens = TenantTokens::new(&SecretString::from(token_secret.clone()), 0);
    let http = reqwest::Client::new();

    let mut latencies = Vec::with_capacity(connects);
    for i in 0..=connects {
        // A tenant of its own per connect: every one is a first connect (201) that probes
        // and registers, never a replacement that keeps an endpoint.
        let tenant = TenantId::parse(&format!("ten_bench{i}")).unwrap();
        store
            .upsert_tenant(&tenant, Mode::Test, &Actor::Cli)
            .await
            .expect("tenant");
        let token = tokens.mint(&tenant, time::Duration::hours(1));
        let url = format!("{base}/v1/tenants/{tenant}/stripe/connection");
        let api_key = random_id("rk_test_", 99);
        let started = Instant::now();
        let response = http
            .post(&url)
            .bearer_auth(token.expose_secret())
            .json(&json!({ "api_key": api_key }))
            .send()
            .await
            .expect("connect");
        let elapsed = started.elapsed();
        let status = response.status();
        assert_eq!(
            status.as_u16(),
            201,
            "connect {i} failed: {}",
            response.text().await.unwrap_or_default()
        );
        // The first connect warms connections and is not counted.
        if i > 0 {
            latencies.push(elapsed);
        }
    }
    let requests = stripe.received_requests().await.expect("recording");
    let registrations = requests
        .iter()
        .filter(|r| r.url.path() == "/v1/webhook_endpoints")
        .count();
    assert_eq!(
        (requests.len(), registrations),
        ((connects + 1) * 7, connects + 1),
        "five permission probes, the Events: Read probe and one registration per connect"
    );
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1)];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "connect latency over {connects} connects{}, Stripe answering in {} ms:",
        if quick { " (quick mode)" } else { "" },
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
        "  floor: two round trips ({} ms: the probes together, then the registration); \
         sequential probes would take {} ms",
        2 * STRIPE_LATENCY.as_millis(),
        6 * STRIPE_LATENCY.as_millis()
    );
}
