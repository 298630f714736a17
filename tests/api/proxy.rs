//! The Stripe proxy: charging services call Stripe through us and never hold the key.

use std::time::{Duration, Instant};

use atlas_stripe::auth::Scope;
use atlas_stripe::domain::{Mode, TenantId};
use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::backend_tests;
use crate::helpers::{assert_error, eventually, spawn_app_with, Backend, TestApp};
use crate::stripe_mock::{answer_all, key, Answer};

backend_tests!(
    forwards_the_request_and_passes_the_answer_back,
    only_allowlisted_endpoints_are_forwarded,
    expansions_beyond_the_resources_are_refused,
    a_body_on_a_get_or_delete_is_refused,
    a_dot_dot_segment_never_reaches_stripe,
    bodies_are_forms_within_the_limit,
    the_caller_can_shorten_the_deadline,
    scope_tenant_and_connection_state_are_checked,
    only_what_is_safe_to_repeat_is_retried,
    a_401_passes_back_and_makes_the_connection_due,
    each_account_is_smoothed_under_its_rate,
    the_key_fetch_can_be_turned_off,
);

struct Proxied {
    app: TestApp,
    token: String,
    api_key: String,
    /// How many requests the connect sent to Stripe (probes, the webhook registration).
    connect_requests: usize,
}

async fn connected(backend: Backend, extra: &[(&str, &str)]) -> Proxied {
    let app = spawn_app_with(backend, extra).await;
    app.create_tenant("ten_1", Mode::Test).await;
    answer_all(&app.stripe, Answer::Granted).await;
    let api_key = key("rk_test_", "Prxy");
    assert_eq!(app.connect("ten_1", &api_key).await.status(), 201);
    let token = app.service_token(&[Scope::StripeCall]).await;
    let connect_requests = app.stripe_requests().await.len();
    Proxied {
        app,
        token,
        api_key,
        connect_requests,
    }
}

impl Proxied {
    fn call(&self, verb: Method, below_v1: &str) -> reqwest::RequestBuilder {
        self.call_for("ten_1", verb, below_v1)
    }

    fn call_for(&self, tenant: &str, verb: Method, below_v1: &str) -> reqwest::RequestBuilder {
        let url = (self.app).url(&format!(
            "/internal/v1/tenants/{tenant}/stripe/v1/{below_v1}"
        ));
        self.app.http.request(verb, url).bearer_auth(&self.token)
    }

    /// The requests the app forwarded to Stripe (not the probes and webhook calls of the
    /// connect), each checked against Stripe's contract.
    async fn forwarded(&self) -> Vec<wiremock::Request> {
        let requests = self.app.stripe_requests().await;
        requests[self.connect_requests..].to_vec()
    }
}

/// Stripe lists nothing at `GET endpoint`.
async fn empty_list(stripe: &wiremock::MockServer, endpoint: &str) {
    Mock::given(method("GET"))
        .and(path(endpoint))
        .respond_with(stripe_json(
            200,
            json!({"object": "list", "data": [], "has_more": false}),
        ))
        .mount(stripe)
        .await;
}

fn stripe_json(status: u16, body: serde_json::Value) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .set_body_raw(body.to_string(), "application/json")
        .insert_header("request-id", "req_Abc123")
}

async fn forwards_the_request_and_passes_the_answer_back(backend: Backend) {
    // An expansion outside the default list, allowed here: configured ones are forwarded.
    let p = connected(backend, &[("proxy.expand_allowed", "default_source")]).await;
    let customer = json!({"id": "cus_Nw1", "object": "customer", "email": "ada@example.com"});
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(stripe_json(200, customer.clone()))
        .mount(&p.app.stripe)
        .await;
    let card_error = json!({"error": {"type": "card_error", "code": "card_declined",
        "message": "Your card was declined.", "decline_code": "insufficient_funds"}});
    Mock::given(method("POST"))
        .and(path("/v1/invoices/in_1Pay/pay"))
        .respond_with(stripe_json(402, card_error.clone()))
        .mount(&p.app.stripe)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_Nw1"))
        .respond_with(stripe_json(200, customer.clone()))
        .mount(&p.app.stripe)
        .await;

    let form = "email=ada%40example.com&metadata[order]=42";
    let created = p
        .call(Method::POST, "customers")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("idempotency-key", "order-42-create")
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    assert_eq!(created.headers()["request-id"], "req_Abc123");
    assert!(
        created.headers().get("idempotency-key").is_none(),
        "the caller's own key"
    );
    let body = created.text().await.unwrap();
    assert_eq!(body, customer.to_string(), "Stripe's body as it came");
    assert!(!body.contains(&p.api_key));

    let declined = p
        .call(Method::POST, "invoices/in_1Pay/pay")
        .header("idempotency-key", "pay-1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        declined.status(),
        402,
        "Stripe's errors pass back unchanged"
    );
    assert_eq!(declined.text().await.unwrap(), card_error.to_string());

    let retrieved = p
        .call(Method::GET, "customers/cus_Nw1?expand[]=default_source")
        .send()
        .await
        .unwrap();
    assert_eq!(retrieved.status(), 200);

    let sent = p.forwarded().await;
    let bearer = format!("Bearer {}", p.api_key);
    let create = sent
        .iter()
        .find(|r| r.url.path() == "/v1/customers")
        .unwrap();
    assert_eq!(create.method.as_str(), "POST");
    assert_eq!(
        String::from_utf8_lossy(&create.body),
        form,
        "the form as sent"
    );
    assert_eq!(create.headers["authorization"], bearer.as_str());
    assert_eq!(create.headers["idempotency-key"], "order-42-create");
    assert_eq!(create.headers["stripe-version"], "2023-08-16");
    let get = sent.iter().find(|r| r.method.as_str() == "GET").unwrap();
    assert_eq!(get.url.query(), Some("expand[]=default_source"));
    assert_eq!(get.headers["authorization"], bearer.as_str());

    // Every call is tallied per token, tenant and minute; nothing of the call is kept.
    let tenant = TenantId::parse("ten_1").unwrap();
    eventually("three calls tallied", || async {
        let tallies = p.app.store.stripe_calls(&tenant).await.unwrap();
        tallies.iter().map(|t| t.fetch_count).sum::<i64>() == 3
    })
    .await;
}

async fn only_allowlisted_endpoints_are_forwarded(backend: Backend) {
    let p = connected(backend, &[]).await;
    let before = p.forwarded().await.len();
    for (verb, below_v1) in [
        (Method::POST, "charges"),
        (Method::GET, "customers/search"),
        (Method::DELETE, "customers/cus_1"),
        (Method::POST, "invoices/in_1/pay/extra"),
        // An encoded slash alone (the `..` is tested over a raw socket, below).
        (Method::GET, "customers/cus%2F1"),
        (Method::GET, "customers/cus_1%2Fsources"),
        (Method::PUT, "customers/cus_1"),
        (Method::POST, "webhook_endpoints"),
        // Issue 21: a literal of Stripe's API, or another object's id, is not an id of the
        // resource the template names.
        (Method::POST, "invoices/create_preview"),
        (Method::POST, "invoices/upcoming"),
        (Method::GET, "customers/cs_test_1"),
        (Method::POST, "invoices/ii_1/pay"),
        (Method::GET, "coupons/search"),
    ] {
        let refused = p.call(verb.clone(), below_v1).send().await.unwrap();
        assert_error(refused, 403, "endpoint_not_allowed").await;
    }
    assert_eq!(
        p.forwarded().await.len(),
        before,
        "nothing refused reached Stripe"
    );
}

/// Issue 21: `expand[]` was forwarded unfiltered, so a customer's `sources` (outside the
/// allowlist) came back expanded. Only `proxy.expand_allowed` passes, from the query or the
/// form.
async fn expansions_beyond_the_resources_are_refused(backend: Backend) {
    let p = connected(backend, &[]).await;
    empty_list(&p.app.stripe, "/v1/invoices").await;
    let before = p.forwarded().await.len();
    for below_v1 in [
        "customers/cus_1?expand[]=sources",
        "customers/cus_1?expand%5B%5D=sources",
        "customers/cus_1?expand[0]=default_source",
        "invoices?expand[]=data.customer.sources",
    ] {
        let refused = p.call(Method::GET, below_v1).send().await.unwrap();
        assert_error(refused, 403, "expand_not_allowed").await;
    }
    let in_form = (p.call(Method::POST, "customers/cus_1"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("email=a%40b.c&expand[]=sources")
        .send()
        .await
        .unwrap();
    assert_error(in_form, 403, "expand_not_allowed").await;
    assert_eq!(
        p.forwarded().await.len(),
        before,
        "nothing refused reached Stripe"
    );
    let within = p
        .call(Method::GET, "invoices?expand[]=data.customer")
        .send()
        .await;
    assert_eq!(within.unwrap().status(), 200, "the default list passes");
}

/// Issue 21: a GET's body was forwarded. A GET or DELETE with a body is 400, unread.
async fn a_body_on_a_get_or_delete_is_refused(backend: Backend) {
    let p = connected(backend, &[]).await;
    let before = p.forwarded().await.len();
    for (verb, below_v1) in [
        (Method::GET, "customers/cus_1"),
        (Method::DELETE, "invoiceitems/ii_1"),
    ] {
        let refused = (p.call(verb, below_v1))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("email=a%40b.c")
            .send()
            .await
            .unwrap();
        let body = assert_error(refused, 400, "invalid_request").await;
        assert!(body.to_string().contains("query string"), "{body}");
    }
    assert_eq!(
        p.forwarded().await.len(),
        before,
        "nothing refused reached Stripe"
    );
}

/// `..` (and `.`) as a path segment: reqwest and most clients resolve it before sending, so
/// it is sent as it is over a raw socket. Taken for an id, `customers/..` would reach Stripe
/// as `GET /v1/`.
async fn a_dot_dot_segment_never_reaches_stripe(backend: Backend) {
    let p = connected(backend, &[]).await;
    let before = p.forwarded().await.len();
    for below_v1 in ["customers/..", "customers/.", "invoices/.."] {
        let host = p.app.address.trim_start_matches("http://");
        let mut socket = TcpStream::connect(host).await.unwrap();
        let head = format!(
            "GET /internal/v1/tenants/ten_1/stripe/v1/{below_v1} HTTP/1.1\r\nHost: {host}\r\n\
             Authorization: Bearer {}\r\nConnection: close\r\n\r\n",
            p.token
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer))
            .await
            .expect("answered in time")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 403"), "{below_v1}: {answer}");
        assert!(
            answer.contains(r#""code":"endpoint_not_allowed""#),
            "{below_v1}: {answer}"
        );
    }
    assert_eq!(
        p.forwarded().await.len(),
        before,
        "nothing refused reached Stripe"
    );
}

/// The proxy's body limit (`proxy.body_limit_bytes`, 256 KiB by default).
const BODY_LIMIT: usize = 256 * 1024;

/// A `description=…` form of exactly `len` bytes.
fn form_of(len: usize) -> String {
    let field = "description=";
    format!("{field}{}", "a".repeat(len - field.len()))
}

async fn bodies_are_forms_within_the_limit(backend: Backend) {
    let p = connected(backend, &[]).await;
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(stripe_json(
            200,
            json!({"id": "cus_Big", "object": "customer"}),
        ))
        .mount(&p.app.stripe)
        .await;
    let post = |body: String, content_type: &str| {
        p.call(Method::POST, "customers")
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let form = "application/x-www-form-urlencoded";
    let at_limit = post(form_of(BODY_LIMIT), form).await.unwrap();
    assert_eq!(at_limit.status(), 200, "a form of the limit is forwarded");
    // Refused before the body is read (issue 21), so the answer is read over a socket that
    // sends the head alone: a client still sending meets a closed connection.
    let host = p.app.address.trim_start_matches("http://");
    let mut socket = TcpStream::connect(host).await.unwrap();
    let head = format!(
        "POST /internal/v1/tenants/ten_1/stripe/v1/customers HTTP/1.1\r\nHost: {host}\r\n\
         Authorization: Bearer {}\r\nContent-Type: {form}\r\nContent-Length: {}\r\n\r\n",
        p.token,
        BODY_LIMIT + 1
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut answer))
        .await
        .expect("answered before the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#""code":"payload_too_large""#), "{answer}");
    assert!(answer.contains("262144"), "{answer}");
    // Stripe takes forms only: JSON (or any other body) is refused, not passed on.
    let not_a_form = post(r#"{"email":"ada@example.com"}"#.into(), "application/json").await;
    let refused = assert_error(not_a_form.unwrap(), 415, "unsupported_media_type").await;
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("application/x-www-form-urlencoded") && !message.contains("JSON"),
        "the 415 names what the proxy takes: {refused}"
    );
    let sent = p.forwarded().await;
    assert_eq!(
        sent.len(),
        1,
        "only the form within the limit reached Stripe"
    );
    assert_eq!(sent[0].body.len(), BODY_LIMIT);
}

/// `X-Deadline-Ms` bounds the whole call: a Stripe slower than the caller's deadline is a
/// 502 at the deadline, while the same answer within the configured deadline comes back.
async fn the_caller_can_shorten_the_deadline(backend: Backend) {
    let p = connected(backend, &[("stripe.max_retries", "0")]).await;
    Mock::given(method("GET"))
        .and(path("/v1/customers"))
        .respond_with(
            stripe_json(
                200,
                json!({"object": "list", "data": [], "has_more": false}),
            )
            .set_delay(Duration::from_millis(1200)),
        )
        .mount(&p.app.stripe)
        .await;
    let started = Instant::now();
    let hurried = (p.call(Method::GET, "customers"))
        .header("x-deadline-ms", "300")
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_error(hurried, 502, "stripe_unavailable").await;
    assert!(waited < Duration::from_millis(1000), "{waited:?}");
    let patient = p.call(Method::GET, "customers").send().await.unwrap();
    assert_eq!(
        patient.status(),
        200,
        "the same call, within proxy.deadline_ms"
    );
    for bad in ["0", "soon", "-5"] {
        let refused = (p.call(Method::GET, "customers"))
            .header("x-deadline-ms", bad)
            .send()
            .await
            .unwrap();
        assert_error(refused, 400, "invalid_request").await;
    }
    assert_eq!(
        p.forwarded().await.len(),
        2,
        "the refused calls did not reach Stripe"
    );
}

async fn scope_tenant_and_connection_state_are_checked(backend: Backend) {
    let p = connected(backend, &[]).await;
    let keys_only = p.app.service_token(&[Scope::KeysRead]).await;
    let url = p.app.url("/internal/v1/tenants/ten_1/stripe/v1/customers");
    let forbidden = p
        .app
        .http
        .get(&url)
        .bearer_auth(keys_only)
        .send()
        .await
        .unwrap();
    assert_error(forbidden, 403, "insufficient_scope").await;
    let anonymous = p.app.http.get(&url).send().await.unwrap();
    assert_error(anonymous, 401, "unauthenticated").await;
    p.app.create_tenant("ten_2", Mode::Test).await;
    let other = p
        .app
        .http
        .get(p.app.url("/internal/v1/tenants/ten_2/stripe/v1/customers"))
        .bearer_auth(&p.token)
        .send()
        .await
        .unwrap();
    assert_error(other, 404, "not_connected").await;
    // Stripe refuses the key: the connection is revoked, and the proxy stops using it.
    p.app.stripe.reset().await;
    Mock::given(wiremock::matchers::any())
        .respond_with(stripe_json(
            401,
            json!({"error": {"type": "invalid_request_error",
                "message": "Invalid API Key provided: rk_test_****Prxy"}}),
        ))
        .mount(&p.app.stripe)
        .await;
    let verified = p.app.tenant_request(Method::POST, "ten_1", "/verify").await;
    assert_eq!(verified.status(), 200);
    let revoked = p.call(Method::GET, "customers").send().await.unwrap();
    assert_error(revoked, 409, "connection_not_active").await;
}

async fn only_what_is_safe_to_repeat_is_retried(backend: Backend) {
    let p = connected(backend, &[("stripe.max_retries", "2")]).await;
    let overloaded = || {
        stripe_json(
            500,
            json!({"error": {"type": "api_error", "message": "An error occurred."}}),
        )
    };
    // A GET: retried after a 500, and the second answer comes back.
    Mock::given(method("GET"))
        .and(path("/v1/customers"))
        .respond_with(overloaded())
        .up_to_n_times(1)
        .mount(&p.app.stripe)
        .await;
    empty_list(&p.app.stripe, "/v1/customers").await;
    // POSTs: always 500.
    for endpoint in ["/v1/coupons", "/v1/invoiceitems"] {
        Mock::given(method("POST"))
            .and(path(endpoint))
            .respond_with(overloaded())
            .mount(&p.app.stripe)
            .await;
    }
    let listed = p
        .call(Method::GET, "customers?limit=3")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);

    // No idempotency key: sent once, under one we made up and return.
    let once = p
        .call(Method::POST, "coupons")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("percent_off=10")
        .send()
        .await
        .unwrap();
    assert_eq!(once.status(), 500, "Stripe's answer, passed back");
    let made_up = once.headers()["idempotency-key"]
        .to_str()
        .unwrap()
        .to_owned();

    // The caller's idempotency key: safe to repeat, so repeated.
    let repeated = p
        .call(Method::POST, "invoiceitems")
        .header("idempotency-key", "item-7")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("customer=cus_1&amount=500&currency=usd")
        .send()
        .await
        .unwrap();
    assert_eq!(repeated.status(), 500);
    assert!(repeated.headers().get("idempotency-key").is_none());

    let sent = p.forwarded().await;
    let count = |verb: &str, endpoint: &str| {
        (sent.iter())
            .filter(|r| r.method.as_str() == verb && r.url.path() == endpoint)
            .count()
    };
    assert_eq!(count("GET", "/v1/customers"), 2, "the GET was retried once");
    assert_eq!(
        count("POST", "/v1/coupons"),
        1,
        "a POST without a key is sent once"
    );
    assert_eq!(
        count("POST", "/v1/invoiceitems"),
        3,
        "with a key: the tries allowed"
    );
    let coupon = sent.iter().find(|r| r.url.path() == "/v1/coupons").unwrap();
    assert_eq!(coupon.headers["idempotency-key"], made_up.as_str());
}

async fn a_401_passes_back_and_makes_the_connection_due(backend: Backend) {
    let p = connected(backend, &[]).await;
    let rejected = json!({"error": {"type": "invalid_request_error",
        "message": "Invalid API Key provided: rk_test_****Prxy"}});
    Mock::given(method("GET"))
        .and(path("/v1/invoices"))
        .respond_with(stripe_json(401, rejected.clone()))
        .mount(&p.app.stripe)
        .await;
    let answer = p.call(Method::GET, "invoices").send().await.unwrap();
    assert_eq!(answer.status(), 401);
    assert_eq!(answer.text().await.unwrap(), rejected.to_string());
    let now = atlas_stripe::clock::now();
    let due = p
        .app
        .store
        .claim_due_connections("test", now, now + time::Duration::minutes(1), 10)
        .await
        .unwrap();
    assert_eq!(
        due,
        [TenantId::parse("ten_1").unwrap()],
        "re-verified at once"
    );
}

async fn each_account_is_smoothed_under_its_rate(backend: Backend) {
    let p = connected(
        backend,
        &[
            ("proxy.test_requests_per_second", "1"),
            ("proxy.max_wait_ms", "0"),
        ],
    )
    .await;
    // A second account, connected before any call so that its calls below come within the
    // first account's second.
    p.app.create_tenant("ten_2", Mode::Test).await;
    let second_key = key("rk_test_", "Scnd");
    assert_eq!(p.app.connect("ten_2", &second_key).await.status(), 201);
    let before = p.forwarded().await.len();
    empty_list(&p.app.stripe, "/v1/coupons").await;
    let coupons = |tenant: &str| p.call_for(tenant, Method::GET, "coupons").send();
    assert_eq!(coupons("ten_1").await.unwrap().status(), 200);
    let limited = coupons("ten_1").await.unwrap();
    assert_eq!(limited.headers()["retry-after"], "1");
    let body = assert_error(limited, 429, "rate_limited").await;
    assert_eq!(body["error"]["retryable"], true);
    // The first account's turn used up is not the second's: it is served at once, and then
    // smoothed under its own rate.
    assert_eq!(coupons("ten_2").await.unwrap().status(), 200);
    assert_error(coupons("ten_2").await.unwrap(), 429, "rate_limited").await;
    assert_eq!(
        p.forwarded().await.len(),
        before + 2,
        "the refused calls did not reach Stripe"
    );

    // With room to wait, the next call waits for its turn instead.
    let waiting = connected(
        backend,
        &[
            ("proxy.test_requests_per_second", "1"),
            ("proxy.max_wait_ms", "2000"),
        ],
    )
    .await;
    empty_list(&waiting.app.stripe, "/v1/coupons").await;
    assert_eq!(
        waiting
            .call(Method::GET, "coupons")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let started = Instant::now();
    assert_eq!(
        waiting
            .call(Method::GET, "coupons")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );
}

async fn the_key_fetch_can_be_turned_off(backend: Backend) {
    let p = connected(backend, &[("internal.key_fetch_enabled", "false")]).await;
    let keys = p.app.service_token(&[Scope::KeysRead]).await;
    let fetch = p
        .app
        .http
        .get(p.app.url("/internal/v1/tenants/ten_1/stripe/key"))
        .bearer_auth(keys)
        .send()
        .await
        .unwrap();
    let body = assert_error(fetch, 404, "not_found").await;
    assert!(!body.to_string().contains(&p.api_key));
    empty_list(&p.app.stripe, "/v1/customers").await;
    assert_eq!(
        p.call(Method::GET, "customers")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// Every endpoint the proxy forwards by default exists, with that method, in Stripe's API
/// (the committed contract extract), and each has its parameters extracted so that the
/// contract check covers what the proxy forwards.
#[test]
fn the_default_allowlist_is_stripes_own_endpoints() {
    let root = env!("CARGO_MANIFEST_DIR");
    let defaults: toml::Value =
        toml::from_str(&std::fs::read_to_string(format!("{root}/config/default.toml")).unwrap())
            .unwrap();
    let contract: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/tests/fixtures/stripe-contract.json")).unwrap(),
    )
    .unwrap();
    let allowed = defaults["proxy"]["allowed"].as_array().unwrap();
    assert!(allowed.len() > 20);
    for entry in allowed {
        let entry = entry.as_str().unwrap();
        let (verb, template) = entry.split_once(' ').unwrap();
        let methods = contract["paths"][template]
            .as_array()
            .unwrap_or_else(|| panic!("{template} is not a Stripe path"));
        assert!(
            methods.iter().any(|m| m == verb),
            "{entry}: Stripe has no such method"
        );
        assert!(
            contract["endpoints"][entry].is_object() || contract["endpoints"][entry].is_array(),
            "{entry}: its parameters are not in the contract extract"
        );
    }
}
