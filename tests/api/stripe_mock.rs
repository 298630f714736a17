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
    // The Events: Read probe of every connect and verification: an empty log.
    FakeEvents::default().mount(server).await;
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
    // The Events: Read probe of every connect and verification: an empty log.
    FakeEvents::default().mount(server).await;
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
    /// Endpoints Stripe has disabled (after days of failed deliveries).
    disabled: Vec<String>,
}

/// Stripe's cap on webhook endpoints per account in test mode.
pub const ENDPOINT_CAP: usize = 16;

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
        Mock::given(method("GET"))
            .and(path_regex(r"^/v1/webhook_endpoints$"))
            .respond_with(self.clone())
            .mount(server)
            .await;
        // The update of an endpoint that exists; any other id is the probe's (a random id),
        // answered by the probe's mock.
        Mock::given(method("POST"))
            .and(path_regex(r"^/v1/webhook_endpoints/we_[A-Za-z0-9]+$"))
            .and(KnownEndpoint(self.clone()))
            .respond_with(self.clone())
            .with_priority(1)
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

    /// Stripe disables the endpoint `id` (as after days of failed deliveries).
    pub fn disable(&self, id: &str) {
        self.inner.lock().unwrap().disabled.push(id.to_owned());
    }

    /// Whether Stripe has the endpoint `id` disabled.
    pub fn is_disabled(&self, id: &str) -> bool {
        self.inner.lock().unwrap().disabled.iter().any(|d| d == id)
    }

    /// The tenant deletes the endpoint `id` in their dashboard.
    pub fn delete_on_stripe(&self, id: &str) {
        self.inner.lock().unwrap().endpoints.retain(|e| e.id != id);
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

/// Matches a request naming an endpoint that exists on the key's account.
struct KnownEndpoint(FakeEndpoints);

impl wiremock::Match for KnownEndpoint {
    fn matches(&self, request: &Request) -> bool {
        let id = request.url.path().rsplit('/').next().unwrap_or_default();
        let account = account_of(request);
        (self.0.inner.lock().unwrap().endpoints.iter()).any(|e| e.id == id && e.account == account)
    }
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
        let at_cap = (state.endpoints.iter())
            .filter(|e| e.account == account)
            .count()
            >= ENDPOINT_CAP;
        match request.method.as_str() {
            "GET" if path == "/v1/webhook_endpoints" => {
                let data: Vec<serde_json::Value> = (state.endpoints.iter())
                    .filter(|e| e.account == account)
                    .map(|e| json!({"id": e.id, "object": "webhook_endpoint", "url": e.url,
                        "status": if state.disabled.contains(&e.id) { "disabled" } else { "enabled" }}))
                    .collect();
                ResponseTemplate::new(200).set_body_json(json!({
                    "object": "list", "url": "/v1/webhook_endpoints", "has_more": false, "data": data,
                }))
            }
            "POST" if path != "/v1/webhook_endpoints" => {
                let id = path.rsplit('/').next().unwrap_or_default().to_owned();
                if form_value(&request.body, "disabled").as_deref() == Some("false") {
                    state.disabled.retain(|d| *d != id);
                }
                let status = if state.disabled.contains(&id) {
                    "disabled"
                } else {
                    "enabled"
                };
                ResponseTemplate::new(200).set_body_json(json!({
                    "id": id, "object": "webhook_endpoint", "status": status,
                }))
            }
            "POST" => {
                // Stripe's own answer at its cap: a 400 with no `code`.
                if state.refuse || at_cap {
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
                let status = if state.disabled.contains(&e.id) {
                    "disabled"
                } else {
                    "enabled"
                };
                ResponseTemplate::new(200).set_body_json(json!({
                    "id": e.id, "object": "webhook_endpoint", "url": e.url, "status": status,
                    "enabled_events": ["invoice.paid"], "livemode": false, "metadata": {}, "created": 1_700_000_000,
                }))
            }
        }
    }
}

/// Stripe's event log of every account, kept in memory and listed as `GET /v1/events` does:
/// newest first (ties in the order they happened, newest first), `created[gte]`, `types[]`,
/// `starting_after`, `limit` (1 to 100, default 10) and `has_more`. A key whose last four
/// characters are denied Events: Read gets Stripe's 403.
#[derive(Clone, Default)]
pub struct FakeEvents {
    inner: std::sync::Arc<std::sync::Mutex<EventLog>>,
}

#[derive(Default)]
struct EventLog {
    /// Oldest first.
    events: Vec<FakeEvent>,
    next: u32,
    denied: Vec<String>,
    /// The next this many listings answer 429.
    rate_limited: u32,
    /// Listings answered so far (probes with `limit=1` included).
    listings: u32,
    /// Listings of a recovery (with `created[gte]`) so far.
    pages: u32,
    /// Holds the listing with this number (1-based, probes excluded) until released.
    gate: Option<(u32, GateInside)>,
    /// Every listing is answered this much later.
    page_delay: Option<Duration>,
}

#[derive(Clone, Debug)]
pub struct FakeEvent {
    pub id: String,
    pub account: String,
    pub event_type: String,
    pub created: i64,
    pub livemode: bool,
}

impl FakeEvent {
    /// The event as Stripe lists and delivers it.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "id": self.id, "object": "event", "api_version": "2023-08-16",
            "created": self.created, "livemode": self.livemode, "pending_webhooks": 1,
            "request": {"id": null, "idempotency_key": null}, "type": self.event_type,
            "data": {"object": {"id": format!("in_{}", &self.id[4..]), "object": "invoice"}},
        })
    }
}

/// Holds one listing until the test says go (see [`RegistrationGate`], the same shape).
pub type ListingGate = RegistrationGate;

impl FakeEvents {
    /// Mounts `GET /v1/events` on `server`.
    pub async fn mount(&self, server: &MockServer) {
        Mock::given(method("GET"))
            .and(path_regex(r"^/v1/events$"))
            .respond_with(self.clone())
            .mount(server)
            .await;
    }

    /// An event of `event_type` on the main account (`acct_main`), created `created` (unix
    /// seconds), in test mode.
    pub fn add(&self, event_type: &str, created: i64) -> FakeEvent {
        self.add_to("acct_main", event_type, created)
    }

    pub fn add_to(&self, account: &str, event_type: &str, created: i64) -> FakeEvent {
        let mut log = self.inner.lock().unwrap();
        log.next += 1;
        let event = FakeEvent {
            id: format!("evt_1Atlas{:08}", log.next),
            account: account.to_owned(),
            event_type: event_type.to_owned(),
            created,
            livemode: false,
        };
        log.events.push(event.clone());
        event
    }

    /// Every event on Stripe, oldest first.
    pub fn all(&self) -> Vec<FakeEvent> {
        self.inner.lock().unwrap().events.clone()
    }

    /// The key ending in `last4` lacks Events: Read.
    pub fn deny_key(&self, last4: &str) {
        self.inner.lock().unwrap().denied.push(last4.to_owned());
    }

    /// The key ending in `last4` may read Events again.
    pub fn allow_key(&self, last4: &str) {
        self.inner.lock().unwrap().denied.retain(|k| k != last4);
    }

    /// The next `count` listings answer 429 (Stripe's rate limit).
    pub fn rate_limit_next(&self, count: u32) {
        self.inner.lock().unwrap().rate_limited = count;
    }

    /// Pages of recoveries answered so far (listings with `created[gte]`).
    pub fn pages(&self) -> u32 {
        self.inner.lock().unwrap().pages
    }

    /// Holds page number `n` of the recoveries (counting from 1; Events: Read probes are
    /// not pages) after it has arrived and before it is answered.
    pub fn gate_listing(&self, n: u32) -> ListingGate {
        let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel();
        let (go, go_rx) = std::sync::mpsc::channel();
        self.inner.lock().unwrap().gate = Some((
            n,
            GateInside {
                arrived: arrived_tx,
                go: go_rx,
            },
        ));
        RegistrationGate { arrived, go }
    }

    fn answer(&self, request: &Request) -> ResponseTemplate {
        let query: Vec<(String, String)> = request
            .url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let value = |name: &str| {
            (query.iter())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let probe = value("created[gte]").is_none();
        let mut log = self.inner.lock().unwrap();
        log.listings += 1;
        if !probe {
            log.pages += 1;
        }
        if log.denied.iter().any(|k| k == last4_of(request)) {
            return ResponseTemplate::new(403).set_body_json(json!({"error": {
                "message": format!(
                    "The provided key '{}' does not have the required permissions for this endpoint on account '{}'. Having the 'rak_event_read' permission would allow this request to continue.",
                    masked_key(request), account_of(request)),
                "type": "invalid_request_error",
            }}));
        }
        if log.rate_limited > 0 {
            log.rate_limited -= 1;
            return ResponseTemplate::new(429).set_body_json(json!({"error": {
                "code": "rate_limit",
                "doc_url": "https://stripe.com/docs/error-codes/rate-limit",
                "message": "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
                "type": "invalid_request_error",
            }}));
        }
        let Ok(limit) = value("limit").unwrap_or("10").parse::<usize>() else {
            return invalid_param("limit");
        };
        if !(1..=100).contains(&limit) {
            return invalid_param("limit");
        }
        let gte = match value("created[gte]").map(str::parse::<i64>) {
            None => i64::MIN,
            Some(Ok(gte)) => gte,
            Some(Err(_)) => return invalid_param("created[gte]"),
        };
        let types: Vec<&str> = (query.iter())
            .filter(|(k, _)| k == "types[]" || k.starts_with("types["))
            .map(|(_, v)| v.as_str())
            .collect();
        let account = account_of(request);
        // Newest first: by `created`, then by the order they happened.
        let mut matching: Vec<&FakeEvent> = (log.events.iter().rev())
            .filter(|e| e.account == account && e.created >= gte)
            .filter(|e| types.is_empty() || types.contains(&e.event_type.as_str()))
            .collect();
        matching.sort_by_key(|e| std::cmp::Reverse(e.created));
        let start = match value("starting_after") {
            None => 0,
            Some(after) => match matching.iter().position(|e| e.id == after) {
                Some(index) => index + 1,
                None if log
                    .events
                    .iter()
                    .any(|e| e.id == after && e.account == account) =>
                {
                    // Listed with other filters: Stripe pages from the object's place in
                    // the whole log; the mock's tests never do that.
                    return invalid_param("starting_after");
                }
                None => {
                    return ResponseTemplate::new(404).set_body_json(json!({"error": {
                        "code": "resource_missing",
                        "message": format!("No such event: '{after}'"),
                        "param": "starting_after",
                        "type": "invalid_request_error",
                    }}))
                }
            },
        };
        let page: Vec<serde_json::Value> = (matching.iter().skip(start).take(limit))
            .map(|e| e.body())
            .collect();
        let has_more = matching.len() > start + limit;
        let body =
            json!({"object": "list", "url": "/v1/events", "has_more": has_more, "data": page});
        let gate = match &log.gate {
            Some((n, _)) if !probe && log.pages == *n => log.gate.take().map(|(_, g)| g),
            _ => None,
        };
        let delay = log.page_delay;
        drop(log);
        if let Some(gate) = gate {
            let _ = gate.arrived.send(String::new());
            let _ = gate.go.recv_timeout(Duration::from_secs(10));
        }
        let template = ResponseTemplate::new(200).set_body_json(body);
        match delay {
            Some(delay) => template.set_delay(delay),
            None => template,
        }
    }
}

fn invalid_param(param: &str) -> ResponseTemplate {
    ResponseTemplate::new(400).set_body_json(json!({"error": {
        "message": format!("Invalid {param}"),
        "param": param,
        "type": "invalid_request_error",
    }}))
}

impl Respond for FakeEvents {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        self.answer(request)
    }
}
