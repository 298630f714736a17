//! Stripe as wiremock, answering with Stripe's real status codes and body shapes.

use std::time::Duration;

use atlas_stripe::domain::Resource;
use serde_json::json;
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// How Stripe answers a probe.
#[derive(Clone, Copy, Debug)]
pub enum Answer {
    /// 404 `resource_missing`: the key may write, the random object does not exist.
    Granted,
    /// 403: the restricted key lacks the permission.
    Denied,
    /// 401 `Invalid API Key provided`.
    InvalidKey,
    /// 401 with code `api_key_expired`.
    ExpiredKey,
    /// 429 `rate_limit`.
    RateLimited,
    /// 500 `api_error`, optionally with `Stripe-Should-Retry`.
    ServerError { should_retry: Option<bool> },
    /// 502 with an HTML page, as a proxy in front of Stripe might answer.
    Html,
}

pub fn probe_path(resource: Resource) -> &'static str {
    match resource {
        Resource::Customers => r"^/v1/customers/cus_[A-Za-z0-9]+$",
        Resource::CheckoutSessions => r"^/v1/checkout/sessions/cs_[A-Za-z0-9]+/expire$",
        Resource::Coupons => r"^/v1/coupons/[A-Za-z0-9]+$",
        Resource::Invoices => r"^/v1/invoices/in_[A-Za-z0-9]+$",
        Resource::WebhookEndpoints => r"^/v1/webhook_endpoints/we_[A-Za-z0-9]+$",
    }
}

fn object_name(path: &str) -> &'static str {
    match path.split('/').nth(2) {
        Some("customers") => "customer",
        Some("checkout") => "checkout.session",
        Some("coupons") => "coupon",
        Some("invoices") => "invoice",
        _ => "webhook endpoint",
    }
}

fn object_id(path: &str) -> &str {
    let segments: Vec<&str> = path.split('/').collect();
    match segments.last() {
        Some(&"expire") => segments[segments.len() - 2],
        Some(last) => last,
        None => "",
    }
}

/// Stripe masks the key in its messages: prefix, asterisks, last four.
fn masked_key(request: &Request) -> String {
    let key = request
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("sk_test_xxxx");
    let prefix = &key[..key.len().min(8)];
    let last4 = &key[key.len().saturating_sub(4)..];
    format!(
        "{prefix}{}{last4}",
        "*".repeat(key.len().saturating_sub(12))
    )
}

pub struct StripeAnswer {
    pub answer: Answer,
    pub delay: Option<Duration>,
}

impl Respond for StripeAnswer {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let path = request.url.path();
        let request_id = format!(
            "req_{}",
            &object_id(path).chars().rev().take(14).collect::<String>()
        );
        let template = |status: u16, body: serde_json::Value| {
            ResponseTemplate::new(status)
                .insert_header("request-id", request_id.as_str())
                .insert_header("stripe-version", "2023-08-16")
                .set_body_json(body)
        };
        let template = match self.answer {
            Answer::Granted => template(
                404,
                json!({"error": {
                    "code": "resource_missing",
                    "doc_url": "https://stripe.com/docs/error-codes/resource-missing",
                    "message": format!("No such {}: '{}'", object_name(path), object_id(path)),
                    "param": "id",
                    "request_log_url": format!("https://dashboard.stripe.com/test/logs/{request_id}"),
                    "type": "invalid_request_error",
                }}),
            ),
            Answer::Denied => template(
                403,
                json!({"error": {
                    "message": format!(
                        "The provided key '{}' does not have the required permissions for this endpoint on account 'acct_1NxAtlasTest'. Having the 'rak_{}_write' permission would allow this request to continue.",
                        masked_key(request), object_name(path).replace([' ', '.'], "_")),
                    "type": "invalid_request_error",
                }}),
            ),
            Answer::InvalidKey => template(
                401,
                json!({"error": {
                    "message": format!("Invalid API Key provided: {}", masked_key(request)),
                    "type": "invalid_request_error",
                }}),
            ),
            Answer::ExpiredKey => template(
                401,
                json!({"error": {
                    "code": "api_key_expired",
                    "doc_url": "https://stripe.com/docs/error-codes/api-key-expired",
                    "message": format!("Expired API Key provided: {}", masked_key(request)),
                    "type": "invalid_request_error",
                }}),
            ),
            Answer::RateLimited => template(
                429,
                json!({"error": {
                    "code": "rate_limit",
                    "doc_url": "https://stripe.com/docs/error-codes/rate-limit",
                    "message": "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
                    "type": "invalid_request_error",
                }}),
            ),
            Answer::ServerError { should_retry } => {
                let t = template(
                    500,
                    json!({"error": {
                        "message": "An unknown error occurred",
                        "type": "api_error",
                    }}),
                );
                match should_retry {
                    Some(v) => {
                        t.insert_header("stripe-should-retry", if v { "true" } else { "false" })
                    }
                    None => t,
                }
            }
            Answer::Html => ResponseTemplate::new(502)
                .insert_header("content-type", "text/html")
                .set_body_string("<html><body><h1>502 Bad Gateway</h1></body></html>"),
        };
        match self.delay {
            Some(delay) => template.set_delay(delay),
            None => template,
        }
    }
}

/// A mock for the probe of `resource`.
pub fn probe(resource: Resource, answer: Answer) -> Mock {
    Mock::given(method("POST"))
        .and(path_regex(probe_path(resource)))
        .respond_with(StripeAnswer {
            answer,
            delay: None,
        })
}

pub fn probe_delayed(resource: Resource, answer: Answer, delay: Duration) -> Mock {
    Mock::given(method("POST"))
        .and(path_regex(probe_path(resource)))
        .respond_with(StripeAnswer {
            answer,
            delay: Some(delay),
        })
}

/// Stripe's answer to a URL it does not know: 404 `invalid_request_error` with no `code`
/// ("Unrecognized request URL"). A probe that drifted off Stripe's paths gets this, and it
/// must never read as "granted".
pub struct UnknownUrl;

impl Respond for UnknownUrl {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        ResponseTemplate::new(404)
            .insert_header("stripe-version", "2023-08-16")
            .set_body_json(json!({"error": {
                "message": format!(
                    "Unrecognized request URL ({}: {}). Please see https://stripe.com/docs or we can help at https://support.stripe.com/.",
                    request.method.as_str(),
                    request.url.path()
                ),
                "type": "invalid_request_error",
            }}))
    }
}

/// Answers every request no other mock matches the way Stripe answers an unknown URL
/// (lowest priority, so every specific mock wins).
pub async fn mount_unknown_urls(server: &MockServer) {
    Mock::given(wiremock::matchers::any())
        .respond_with(UnknownUrl)
        .with_priority(u8::MAX)
        .mount(server)
        .await;
}

/// Every probe answers `answer`; webhook endpoints behave like Stripe's (a fresh set);
/// any other path is unknown to Stripe.
pub async fn answer_all(server: &MockServer, answer: Answer) -> FakeEndpoints {
    for resource in Resource::ALL {
        probe(resource, answer).mount(server).await;
    }
    let endpoints = FakeEndpoints::default();
    endpoints.mount(server).await;
    endpoints
}

/// Every probe is granted except those in `denied`; webhook endpoints as in `answer_all`.
pub async fn grant_all_but(server: &MockServer, denied: &[Resource]) -> FakeEndpoints {
    for resource in Resource::ALL {
        let answer = if denied.contains(&resource) {
            Answer::Denied
        } else {
            Answer::Granted
        };
        probe(resource, answer).mount(server).await;
    }
    let endpoints = FakeEndpoints::default();
    endpoints.mount(server).await;
    endpoints
}

/// The permission probes among recorded requests (not webhook registrations or lookups).
pub fn probes(requests: &[Request]) -> Vec<&Request> {
    requests
        .iter()
        .filter(|r| r.method.as_str() == "POST" && r.url.path() != "/v1/webhook_endpoints")
        .collect()
}

/// Every request in `requests` authenticated with exactly `api_key` (a verification that
/// opened the wrong key, or sent another, fails here: the mocks answer any key).
#[track_caller]
pub fn assert_bearer(requests: &[Request], api_key: &str) {
    assert!(!requests.is_empty(), "no request reached Stripe");
    let expected = format!("Bearer {api_key}");
    for request in requests {
        let sent = request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(
            sent == expected,
            "{} {} was sent with another key (…{})",
            request.method,
            request.url.path(),
            &sent[sent.len().saturating_sub(4)..]
        );
    }
}

/// An RFC 3339 timestamp from a response body.
#[track_caller]
pub fn timestamp(value: &serde_json::Value) -> time::OffsetDateTime {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a timestamp: {value}"));
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// A well-formed key of the given prefix (built at run time: no key-shaped literal is
/// committed) whose last four characters are `last4`.
pub fn key(prefix: &str, last4: &str) -> String {
    use rand::distributions::{Alphanumeric, DistString};
    let body = Alphanumeric.sample_string(&mut rand::thread_rng(), 95);
    format!("{prefix}{body}{last4}")
}

/// Stripe's webhook endpoints across accounts, kept in memory: create, retrieve and delete
/// behave like Stripe's, scoped to the account of the key used. A key whose last four
/// characters start with `X` belongs to another account than every other key, one whose
/// last four start with `Y` to a third.
#[derive(Clone, Default)]
pub struct FakeEndpoints {
    inner: std::sync::Arc<std::sync::Mutex<FakeState>>,
}

#[derive(Default)]
struct FakeState {
    endpoints: Vec<FakeEndpoint>,
    next: u32,
    refuse: bool,
    omit_secret: bool,
    gate: Option<GateInside>,
}

/// The mock's side of a [`RegistrationGate`].
struct GateInside {
    arrived: tokio::sync::mpsc::UnboundedSender<String>,
    go: std::sync::mpsc::Receiver<()>,
}

/// Holds an answer after Stripe has acted on the request (the next registration, created;
/// or a request [`StripeFront::hold`] names) and before it answers, until the test says
/// go: the test acts at a known point of the flow (no sleeps).
pub struct RegistrationGate {
    arrived: tokio::sync::mpsc::UnboundedReceiver<String>,
    go: std::sync::mpsc::Sender<()>,
}

impl RegistrationGate {
    /// Waits until a registration has arrived (and the endpoint exists on Stripe); its id.
    pub async fn arrived(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.arrived.recv())
            .await
            .expect("no webhook registration arrived")
            .expect("gate dropped")
    }

    /// Lets Stripe answer the held registration.
    pub fn release(&self) {
        let _ = self.go.send(());
    }
}

#[derive(Clone, Debug)]
pub struct FakeEndpoint {
    pub id: String,
    pub account: String,
    pub url: String,
    pub secret: String,
}

fn last4_of(request: &Request) -> &str {
    let key = request
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    key.get(key.len().saturating_sub(4)..).unwrap_or_default()
}

fn account_of(request: &Request) -> String {
    match last4_of(request).chars().next() {
        Some('X') => "acct_other".into(),
        Some('Y') => "acct_third".into(),
        _ => "acct_main".into(),
    }
}

fn form_value(body: &[u8], name: &str) -> Option<String> {
    url::form_urlencoded::parse(body)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

impl FakeEndpoints {
    /// Mounts create, retrieve and delete of webhook endpoints on `server`, and Stripe's
    /// answer to unknown URLs for everything else.
    pub async fn mount(&self, server: &MockServer) {
        mount_unknown_urls(server).await;
        Mock::given(method("POST"))
            .and(path_regex(r"^/v1/webhook_endpoints$"))
            .respond_with(self.clone())
            .mount(server)
            .await;
        for verb in ["GET", "DELETE"] {
            Mock::given(method(verb))
                .and(path_regex(r"^/v1/webhook_endpoints/we_[A-Za-z0-9]+$"))
                .respond_with(self.clone())
                .mount(server)
                .await;
        }
    }

    pub fn endpoints(&self) -> Vec<FakeEndpoint> {
        self.inner.lock().unwrap().endpoints.clone()
    }

    /// The signing secret of the endpoint whose URL ends with `/{connection_id}`.
    pub fn secret_for(&self, connection_id: &str) -> String {
        self.endpoints()
            .into_iter()
            .find(|e| e.url.ends_with(&format!("/{connection_id}")))
            .map(|e| e.secret)
            .expect("an endpoint for that connection")
    }

    /// Adds an endpoint the tenant made themselves (not ours).
    pub fn add_foreign(&self, account: &str, url: &str) -> String {
        let mut state = self.inner.lock().unwrap();
        state.next += 1;
        let id = format!("we_foreign{}", state.next);
        state.endpoints.push(FakeEndpoint {
            id: id.clone(),
            account: account.into(),
            url: url.into(),
            secret: "whsec_theirs".into(),
        });
        id
    }

    /// Stripe refuses registrations (e.g. the account has 16 endpoints already).
    pub fn refuse(&self, refuse: bool) {
        self.inner.lock().unwrap().refuse = refuse;
    }

    /// Stripe answers a registration without its secret.
    pub fn omit_secret(&self, omit: bool) {
        self.inner.lock().unwrap().omit_secret = omit;
    }

    /// Holds the next registration at the gate returned (see [`RegistrationGate`]).
    pub fn gate_registration(&self) -> RegistrationGate {
        let (inside, gate) = gate_pair();
        self.inner.lock().unwrap().gate = Some(inside);
        gate
    }
}

fn gate_pair() -> (GateInside, RegistrationGate) {
    let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let inside = GateInside {
        arrived: arrived_tx,
        go: go_rx,
    };
    (inside, RegistrationGate { arrived, go })
}

/// A pass-through in front of the mock Stripe that can hold one answer while the mock goes
/// on serving everything else: [`FakeEndpoints::gate_registration`] holds the mock's own
/// thread, so nothing can reach Stripe meanwhile, which a race between two connects needs.
/// The app is pointed at [`StripeFront::uri`], the front at the mock with
/// [`StripeFront::forward_to`] once the mock exists.
pub struct StripeFront {
    uri: String,
    state: std::sync::Arc<FrontState>,
}

struct FrontState {
    target: std::sync::OnceLock<String>,
    holds: std::sync::Mutex<Vec<FrontHold>>,
    client: reqwest::Client,
}

/// The next webhook-endpoint request `verb` made with the key ending in `last4` is held.
struct FrontHold {
    verb: String,
    last4: String,
    gate: GateInside,
}

impl StripeFront {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap());
        let state = std::sync::Arc::new(FrontState {
            target: Default::default(),
            holds: Default::default(),
            client: reqwest::Client::new(),
        });
        let router = axum::Router::new()
            .fallback(pass_through)
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self { uri, state }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn forward_to(&self, mock: &str) {
        self.state.target.set(mock.to_owned()).expect("set once");
    }

    /// Holds the answer to the next webhook-endpoint request `verb` (a registration for
    /// `POST`, a call on an endpoint otherwise) made with the key ending in `last4`, after the mock has acted on it (created, looked up, deleted), until the
    /// gate is released. `arrived` gives the endpoint's id.
    pub fn hold(&self, verb: &str, last4: &str) -> RegistrationGate {
        let (gate, held) = gate_pair();
        self.state.holds.lock().unwrap().push(FrontHold {
            verb: verb.to_owned(),
            last4: last4.to_owned(),
            gate,
        });
        held
    }
}

/// A registration (`POST /v1/webhook_endpoints`) or a call on one endpoint; not the
/// permission probe, which POSTs to a made-up endpoint id.
fn is_endpoint_call(path: &str, verb: &str) -> bool {
    match verb {
        "POST" => path == "/v1/webhook_endpoints",
        _ => path.starts_with("/v1/webhook_endpoints/"),
    }
}

async fn pass_through(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<FrontState>>,
    request: axum::extract::Request,
) -> axum::response::Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let target = state.target.get().expect("StripeFront::forward_to first");
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut forwarded = (state.client)
        .request(parts.method.clone(), format!("{target}{path_and_query}"))
        .body(body);
    for (name, value) in &parts.headers {
        if !matches!(
            name.as_str(),
            "host" | "content-length" | "transfer-encoding"
        ) {
            forwarded = forwarded.header(name, value);
        }
    }
    let answer = forwarded.send().await.expect("the mock answers");
    let status = answer.status();
    let headers = answer.headers().clone();
    let bytes = answer.bytes().await.expect("the mock's body");

    let key = (parts.headers.get("authorization"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let last4 = key.get(key.len().saturating_sub(4)..).unwrap_or_default();
    let path = parts.uri.path();
    let hold = {
        let mut holds = state.holds.lock().unwrap();
        (holds.iter())
            .position(|h| {
                h.verb == parts.method.as_str()
                    && h.last4 == last4
                    && is_endpoint_call(path, &h.verb)
            })
            .map(|i| holds.remove(i))
    };
    if let Some(hold) = hold {
        let created = serde_json::from_slice::<serde_json::Value>(&bytes).ok();
        let id = (created.as_ref())
            .and_then(|c| c["id"].as_str())
            .unwrap_or_else(|| path.rsplit('/').next().unwrap_or_default())
            .to_owned();
        let _ = hold.gate.arrived.send(id);
        let go = hold.gate.go;
        let _ = tokio::task::spawn_blocking(move || go.recv_timeout(Duration::from_secs(10))).await;
    }

    let mut response = axum::response::Response::new(axum::body::Body::from(bytes));
    *response.status_mut() = status;
    for (name, value) in &headers {
        if !matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection"
        ) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

fn not_found(id: &str) -> ResponseTemplate {
    ResponseTemplate::new(404).set_body_json(json!({"error": {
        "code": "resource_missing",
        "message": format!("No such webhook endpoint: '{id}'"),
        "param": "id",
        "type": "invalid_request_error",
    }}))
}

impl Respond for FakeEndpoints {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        self.answer(request)
    }
}

impl FakeEndpoints {
    fn answer(&self, request: &Request) -> ResponseTemplate {
        let account = account_of(request);
        let mut state = self.inner.lock().unwrap();
        let path = request.url.path().to_owned();
        match request.method.as_str() {
            "POST" => {
                if state.refuse {
                    return ResponseTemplate::new(400).set_body_json(json!({"error": {
                        "message": "You have reached the maximum of 16 test webhook endpoints.",
                        "type": "invalid_request_error",
                    }}));
                }
                state.next += 1;
                let id = format!("we_1Atlas{:06}", state.next);
                let secret = format!(
                    "whsec_{}",
                    crate::stripe_mock::key("", &format!("{:04}", state.next))
                );
                let url = form_value(&request.body, "url").unwrap_or_default();
                let events: Vec<String> = url::form_urlencoded::parse(&request.body)
                    .filter(|(k, _)| k == "enabled_events[]")
                    .map(|(_, v)| v.into_owned())
                    .collect();
                state.endpoints.push(FakeEndpoint {
                    id: id.clone(),
                    account,
                    url: url.clone(),
                    secret: secret.clone(),
                });
                let mut body = json!({
                    "id": id, "object": "webhook_endpoint", "api_version": form_value(&request.body, "api_version"),
                    "application": null, "created": 1_700_000_000, "description": form_value(&request.body, "description"),
                    "enabled_events": events, "livemode": false, "metadata": {}, "secret": secret,
                    "status": "enabled", "url": url,
                });
                if state.omit_secret {
                    body.as_object_mut().unwrap().remove("secret");
                }
                let gate = state.gate.take();
                drop(state);
                if let Some(gate) = gate {
                    // The endpoint exists on Stripe; the answer waits for the test. (This
                    // blocks the mock server's own thread, which serves nothing else now.)
                    let _ = gate.arrived.send(id.clone());
                    let _ = gate.go.recv_timeout(Duration::from_secs(10));
                }
                ResponseTemplate::new(200).set_body_json(body)
            }
            verb => {
                let id = path.rsplit('/').next().unwrap_or_default().to_owned();
                let Some(index) = state
                    .endpoints
                    .iter()
                    .position(|e| e.id == id && e.account == account)
                else {
                    return not_found(&id);
                };
                if verb == "DELETE" {
                    state.endpoints.remove(index);
                    return ResponseTemplate::new(200).set_body_json(
                        json!({"id": id, "object": "webhook_endpoint", "deleted": true}),
                    );
                }
                let e = &state.endpoints[index];
                ResponseTemplate::new(200).set_body_json(json!({
                    "id": e.id, "object": "webhook_endpoint", "url": e.url, "status": "enabled",
                    "enabled_events": ["invoice.paid"], "livemode": false, "metadata": {}, "created": 1_700_000_000,
                }))
            }
        }
    }
}
