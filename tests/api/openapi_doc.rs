//! The served description (`GET /openapi.json`) documents every answer the API gives: the
//! tests provoke each status they can on every route, and each answer is held against the
//! operation that documents it: its status is listed (no catch-all `default`), an error's
//! body is `ErrorBody` as JSON, and the content type is the documented one. A database
//! outage, made by cutting the connection to PostgreSQL, provokes 503 on every route that
//! reads or writes the database. `scripts/fuzz` goes further with Schemathesis; this is the
//! part that runs with `cargo test`.

use std::net::SocketAddr;

use atlas_stripe::auth::Scope;
use atlas_stripe::domain::{Mode, Resource, TenantId};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

use crate::backend_tests;
use crate::helpers::{eventually, json, spawn_app, spawn_app_with, Backend, TestApp, TestDatabase};
use crate::stripe_mock::{answer_all, key, probe, Answer};

backend_tests!(every_answer_the_tests_provoke_is_documented);

/// The operations that read or write the database: each answers 503 while it is
/// unreachable.
const DATABASE_ROUTES: [(&str, &str); 12] = [
    ("POST", "/v1/tenants/{tenant_id}/stripe/connection"),
    ("GET", "/v1/tenants/{tenant_id}/stripe/connection"),
    ("DELETE", "/v1/tenants/{tenant_id}/stripe/connection"),
    ("POST", "/v1/tenants/{tenant_id}/stripe/connection/verify"),
    ("PUT", "/internal/v1/tenants/{tenant_id}"),
    ("GET", "/internal/v1/tenants/{tenant_id}/stripe/key"),
    ("GET", "/internal/v1/connections"),
    ("GET", "/internal/v1/tenants/{tenant_id}/stripe/events"),
    ("POST", "/webhooks/stripe/{connection_id}"),
    ("GET", "/internal/v1/tenants/{tenant_id}/stripe/v1/{path}"),
    ("POST", "/internal/v1/tenants/{tenant_id}/stripe/v1/{path}"),
    (
        "DELETE",
        "/internal/v1/tenants/{tenant_id}/stripe/v1/{path}",
    ),
];

/// The served description, and what the answers seen so far lacked in it.
struct Documented {
    doc: Value,
    gaps: Vec<String>,
    seen: usize,
}

impl Documented {
    async fn fetch(app: &TestApp) -> Self {
        let doc = json(app.http.get(app.url("/openapi.json")).send().await.unwrap()).await;
        Self {
            doc,
            gaps: Vec::new(),
            seen: 0,
        }
    }

    fn responses(&self, method: &str, template: &str) -> &Value {
        let responses = &self.doc["paths"][template][method.to_lowercase()]["responses"];
        assert!(
            responses.is_object(),
            "{method} {template} is not in the description"
        );
        responses
    }

    /// Sends `request` for the operation `method template` and checks its answer against
    /// the description; returns the status and the body (JSON, or `Null`).
    async fn check(
        &mut self,
        method: &str,
        template: &str,
        request: RequestBuilder,
    ) -> (u16, Value) {
        let response = request.send().await.expect("request");
        self.check_response(method, template, response).await
    }

    async fn check_response(
        &mut self,
        method: &str,
        template: &str,
        response: Response,
    ) -> (u16, Value) {
        self.seen += 1;
        let status = response.status().as_u16();
        let media_type = (response.headers().get("content-type"))
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or_default().trim().to_owned());
        let bytes = response.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let operation = format!("{method} {template}");
        let code = body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let documented = self.responses(method, template)[status.to_string()].clone();
        if !documented.is_object() {
            let listed: Vec<&String> = (self.responses(method, template).as_object())
                .map(|r| r.keys().collect())
                .unwrap_or_default();
            self.gaps.push(format!(
                "{operation} answered {status} {code}, documented only {listed:?}"
            ));
            return (status, body);
        }
        let content = &documented["content"];
        match media_type.filter(|_| !bytes.is_empty()) {
            None => {
                if content.is_object() {
                    self.gaps
                        .push(format!("{operation} {status}: documents a body, sent none"));
                }
            }
            Some(media_type) if !content[&media_type].is_object() => self.gaps.push(format!(
                "{operation} {status}: sent {media_type}, documented {content}"
            )),
            Some(_) => {}
        }
        if status >= 400 {
            let schema = &content["application/json"]["schema"]["$ref"];
            if schema != "#/components/schemas/ErrorBody" || code.is_empty() {
                self.gaps.push(format!(
                    "{operation} {status}: an error must be ErrorBody in JSON (documented \
                     {schema}, sent code {code:?})"
                ));
            }
        }
        (status, body)
    }

    fn assert_complete(&self) {
        assert!(
            self.gaps.is_empty(),
            "answers the description does not document ({} of {} seen):\n{}",
            self.gaps.len(),
            self.seen,
            self.gaps.join("\n")
        );
    }
}

/// A body larger than the 16 KiB API limit.
fn oversized() -> String {
    format!("{{\"mode\": \"{}\"}}", "x".repeat(20_000))
}

async fn every_answer_the_tests_provoke_is_documented(backend: Backend) {
    let app = spawn_app_with(backend, &[("webhooks.body_limit_bytes", "1024")]).await;
    let mut doc = Documented::fetch(&app).await;
    let endpoints = answer_all(&app.stripe, Answer::Granted).await;
    app.create_tenant("ten_1", Mode::Test).await;
    let all = app
        .service_token(&[
            Scope::TenantsWrite,
            Scope::KeysRead,
            Scope::OpsRead,
            Scope::EventsRead,
        ])
        .await;
    let none = app.service_token(&[]).await;
    let tenant = app.tenant_token("ten_1");
    let stranger = app.tenant_token("ten_2");
    let http = &app.http;
    let url = |path: &str| app.url(path);

    // Ops.
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let (status, _) = doc.check("GET", path, http.get(url(path))).await;
        assert_eq!(status, 200, "{path}");
    }

    // The tenant routes, with the tenant token.
    let connect = "/v1/tenants/{tenant_id}/stripe/connection";
    let verify = "/v1/tenants/{tenant_id}/stripe/connection/verify";
    let ten_1 = "/v1/tenants/ten_1/stripe/connection";
    let paste = |api_key: &str| {
        http.post(url(ten_1))
            .bearer_auth(&tenant)
            .json(&json!({ "api_key": api_key }))
    };
    let expect = [
        (paste(&key("rk_test_", "Main")), 201),
        (paste(&key("rk_test_", "Next")), 200),
        (paste("rk_test_short"), 400),
        (paste(&key("rk_live_", "Live")), 422),
        (
            http.post(url(ten_1))
                .bearer_auth(&tenant)
                .header("content-type", "application/json")
                .body("{"),
            400,
        ),
        (http.post(url(ten_1)).json(&json!({"api_key": "x"})), 401),
        (
            http.post(url(ten_1))
                .bearer_auth(&stranger)
                .json(&json!({"api_key": "x"})),
            404,
        ),
        (
            http.post(url("/v1/tenants/%FF/stripe/connection"))
                .bearer_auth(&tenant)
                .json(&json!({"api_key": "x"})),
            404,
        ),
        (http.post(url(ten_1)).bearer_auth(&tenant).body("{}"), 415),
        (
            http.post(url(ten_1))
                .bearer_auth(&tenant)
                .header("content-type", "application/json")
                .body(oversized()),
            413,
        ),
    ];
    for (request, status) in expect {
        assert_eq!(doc.check("POST", connect, request).await.0, status);
    }
    for (method, template, path) in [
        (Method::GET, connect, ten_1.to_owned()),
        (Method::POST, verify, format!("{ten_1}/verify")),
    ] {
        let m = method.as_str();
        let send = |path: &str| http.request(method.clone(), url(path));
        let bad_path = path.replace("ten_1", "%FF");
        for (request, status) in [
            (send(&path).bearer_auth(&tenant), 200),
            (send(&path), 401),
            (send(&path).bearer_auth(&stranger), 404),
            (send(&bad_path).bearer_auth(&tenant), 404),
        ] {
            assert_eq!(
                doc.check(m, template, request).await.0,
                status,
                "{m} {path}"
            );
        }
    }

    // The internal routes, with service tokens.
    let tenant_route = "/internal/v1/tenants/{tenant_id}";
    let put = |path: &str| http.put(url(path)).bearer_auth(&all);
    let expect = [
        (
            put("/internal/v1/tenants/ten_9").json(&json!({"mode": "test"})),
            201,
        ),
        (
            put("/internal/v1/tenants/ten_9").json(&json!({"mode": "test"})),
            200,
        ),
        (
            put("/internal/v1/tenants/ten_9").json(&json!({"mode": "x"})),
            400,
        ),
        (
            put("/internal/v1/tenants/_bad").json(&json!({"mode": "test"})),
            400,
        ),
        (
            put("/internal/v1/tenants/ten_9")
                .header("content-type", "application/json")
                .body("{"),
            400,
        ),
        (
            put("/internal/v1/tenants/%FF").json(&json!({"mode": "test"})),
            404,
        ),
        (
            put("/internal/v1/tenants/ten_1").json(&json!({"mode": "live"})),
            409,
        ),
        (
            put("/internal/v1/tenants/ten_9").body("{\"mode\": \"test\"}"),
            415,
        ),
        (
            put("/internal/v1/tenants/ten_9")
                .header("content-type", "application/json")
                .body(oversized()),
            413,
        ),
        (
            http.put(url("/internal/v1/tenants/ten_9"))
                .json(&json!({"mode": "test"})),
            401,
        ),
        (
            http.put(url("/internal/v1/tenants/ten_9"))
                .bearer_auth(&none)
                .json(&json!({"mode": "test"})),
            403,
        ),
    ];
    for (request, status) in expect {
        assert_eq!(doc.check("PUT", tenant_route, request).await.0, status);
    }
    let key_route = "/internal/v1/tenants/{tenant_id}/stripe/key";
    let events_route = "/internal/v1/tenants/{tenant_id}/stripe/events";
    let connections_route = "/internal/v1/connections";
    let get = |path: &str, token: &str| http.get(url(path)).bearer_auth(token);
    let expect = [
        (
            key_route,
            get("/internal/v1/tenants/ten_1/stripe/key", &all),
            200,
        ),
        (
            key_route,
            get("/internal/v1/tenants/_bad/stripe/key", &all),
            400,
        ),
        (
            key_route,
            http.get(url("/internal/v1/tenants/ten_1/stripe/key")),
            401,
        ),
        (
            key_route,
            get("/internal/v1/tenants/ten_1/stripe/key", &none),
            403,
        ),
        (
            key_route,
            get("/internal/v1/tenants/ten_9/stripe/key", &all),
            404,
        ),
        (
            key_route,
            get("/internal/v1/tenants/%FF/stripe/key", &all),
            404,
        ),
        (
            events_route,
            get("/internal/v1/tenants/ten_1/stripe/events", &all),
            200,
        ),
        (
            events_route,
            get("/internal/v1/tenants/ten_1/stripe/events?limit=0", &all),
            400,
        ),
        (
            events_route,
            get("/internal/v1/tenants/_bad/stripe/events", &all),
            400,
        ),
        (
            events_route,
            http.get(url("/internal/v1/tenants/ten_1/stripe/events")),
            401,
        ),
        (
            events_route,
            get("/internal/v1/tenants/ten_1/stripe/events", &none),
            403,
        ),
        (
            events_route,
            get("/internal/v1/tenants/%FF/stripe/events", &all),
            404,
        ),
        (
            connections_route,
            get("/internal/v1/connections?status=active", &all),
            200,
        ),
        (
            connections_route,
            get("/internal/v1/connections?limit=0", &all),
            400,
        ),
        (
            connections_route,
            http.get(url("/internal/v1/connections")),
            401,
        ),
        (
            connections_route,
            get("/internal/v1/connections", &none),
            403,
        ),
    ];
    for (template, request, status) in expect {
        assert_eq!(
            doc.check("GET", template, request).await.0,
            status,
            "{template}"
        );
    }

    // Stripe's deliveries.
    let webhook_route = "/webhooks/stripe/{connection_id}";
    let connection_id = (app.store)
        .find_connection(&TenantId::parse("ten_1").unwrap())
        .await
        .unwrap()
        .expect("connected")
        .connection_id;
    let delivery = json!({"id": "evt_doc1", "object": "event", "type": "invoice.paid",
        "created": 1_764_403_200, "livemode": false, "data": {"object": {}}})
    .to_string();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let secret = endpoints.secret_for(&connection_id);
    let signature =
        atlas_stripe::stripe::webhooks::sign(secret.as_bytes(), now, delivery.as_bytes());
    let deliver = |id: &str, signature: &str, body: String| {
        http.post(url(&format!("/webhooks/stripe/{id}")))
            .header("content-type", "application/json")
            .header("stripe-signature", format!("t={now},v1={signature}"))
            .body(body)
    };
    let expect = [
        (deliver(&connection_id, &signature, delivery.clone()), 200),
        (deliver(&connection_id, &signature, delivery.clone()), 200),
        (deliver(&connection_id, "00", delivery.clone()), 400),
        (deliver(&connection_id, "00", "x".repeat(2048)), 413),
        (deliver("con_nothing", &signature, delivery.clone()), 404),
        (deliver("%FF", &signature, delivery.clone()), 404),
    ];
    for (request, status) in expect {
        assert_eq!(doc.check("POST", webhook_route, request).await.0, status);
    }
    // On PostgreSQL the feed holds an event back while an older transaction (another
    // test's) is still open.
    let feed_path = "/internal/v1/tenants/ten_1/stripe/events";
    eventually("the feed releases the event", || async {
        let page = json(get(feed_path, &all).send().await.unwrap()).await;
        page["events"].as_array().is_some_and(|e| e.len() == 1)
    })
    .await;
    let (_, feed) = doc.check("GET", events_route, get(feed_path, &all)).await;
    assert_eq!(feed["events"].as_array().map(Vec::len), Some(1), "{feed}");

    // Stripe now refuses the key: a verify records it revoked, and the fetch refuses it.
    for resource in Resource::ALL {
        probe(resource, Answer::InvalidKey)
            .with_priority(1)
            .mount(&app.stripe)
            .await;
    }
    let (status, summary) = doc
        .check(
            "POST",
            verify,
            http.post(url(&format!("{ten_1}/verify")))
                .bearer_auth(&tenant),
        )
        .await;
    assert_eq!((status, summary["status"].as_str()), (200, Some("revoked")));
    let revoked = get("/internal/v1/tenants/ten_1/stripe/key", &all);
    assert_eq!(doc.check("GET", key_route, revoked).await.0, 409);

    let delete = |token: &str| http.delete(url(ten_1)).bearer_auth(token);
    for (request, status) in [
        (http.delete(url(ten_1)), 401),
        (delete(&stranger), 404),
        (
            http.delete(url("/v1/tenants/%FF/stripe/connection"))
                .bearer_auth(&tenant),
            404,
        ),
        (delete(&tenant), 204),
        (delete(&tenant), 404),
    ] {
        assert_eq!(doc.check("DELETE", connect, request).await.0, status);
    }

    // Limits and an unreachable Stripe, on an app of their own.
    let limited = spawn_app_with(
        backend,
        &[
            ("limits.connect_attempts_per_minute", "1"),
            ("limits.verify_attempts_per_minute", "1"),
            ("stripe.max_retries", "0"),
        ],
    )
    .await;
    limited.create_tenant("ten_1", Mode::Test).await;
    let token = limited.tenant_token("ten_1");
    let connect_once = || {
        limited
            .http
            .post(limited.url(ten_1))
            .bearer_auth(&token)
            .json(&json!({"api_key": key("rk_test_", "Gone")}))
    };
    let verify_once =
        || (limited.http.post(limited.url(&format!("{ten_1}/verify")))).bearer_auth(&token);
    // The mock Stripe knows no path: every probe is inconclusive.
    assert_eq!(doc.check("POST", connect, connect_once()).await.0, 502);
    assert_eq!(doc.check("POST", connect, connect_once()).await.0, 429);
    assert_eq!(doc.check("POST", verify, verify_once()).await.0, 404);
    assert_eq!(doc.check("POST", verify, verify_once()).await.0, 429);

    doc.assert_complete();
}

/// Every operation that touches the database documents 503 `service_unavailable` with its
/// `Retry-After`; no operation has a catch-all `default` answer.
#[tokio::test]
async fn database_routes_document_503_and_nothing_is_a_catch_all() {
    let app = spawn_app(Backend::Sqlite).await;
    let doc = Documented::fetch(&app).await;
    for (method, template) in DATABASE_ROUTES {
        let unavailable = &doc.responses(method, template)["503"];
        assert_eq!(
            unavailable["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ErrorBody",
            "{method} {template} documents 503 with ErrorBody"
        );
        assert!(
            unavailable["headers"]["Retry-After"].is_object(),
            "{method} {template} documents Retry-After on 503"
        );
    }
    for (template, operations) in doc.doc["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            assert!(
                operation["responses"].get("default").is_none(),
                "{method} {template} has a catch-all default response"
            );
        }
    }
}

/// A TCP forwarder to the test cluster that can be cut: its connections are closed and its
/// port stops listening (connections are refused), as when the database host goes away.
struct Cuttable {
    port: u16,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Cuttable {
    async fn to(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (cut, mut watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let mut inbound = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((inbound, _)) => inbound,
                        Err(_) => return,
                    },
                    // The listener is dropped with this task.
                    _ = watch.wait_for(|cut| *cut) => return,
                };
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Self { port, cut }
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_database_route_answers_a_documented_503_in_an_outage() {
    let db = TestDatabase::new(Backend::Postgres).await;
    let parsed = url::Url::parse(&db.url).expect("database url");
    let upstream: SocketAddr = format!(
        "{}:{}",
        parsed.host_str().expect("host"),
        parsed.port().unwrap_or(5432)
    )
    .parse()
    .expect("the test cluster listens on an IP address");
    let proxy = Cuttable::to(upstream).await;
    let mut proxied = parsed.clone();
    proxied.set_port(Some(proxy.port)).unwrap();
    let app = spawn_app_with(
        Backend::Postgres,
        &[
            ("database.url", proxied.as_str()),
            ("database.acquire_timeout_ms", "300"),
        ],
    )
    .await;
    let mut doc = Documented::fetch(&app).await;
    app.create_tenant("ten_1", Mode::Test).await;
    let service = app
        .service_token(&[
            Scope::TenantsWrite,
            Scope::KeysRead,
            Scope::OpsRead,
            Scope::EventsRead,
            Scope::StripeCall,
        ])
        .await;
    let tenant = app.tenant_token("ten_1");
    proxy.cut();

    for (method, template) in DATABASE_ROUTES {
        // The proxy: an allowlisted Stripe endpoint for each method.
        let stripe_path = match method {
            "DELETE" => "invoiceitems/ii_1",
            _ => "customers",
        };
        let path = template
            .replace("{tenant_id}", "ten_1")
            .replace("{connection_id}", "con_outage")
            .replace("{path}", stripe_path);
        let mut request = app.http.request(method.parse().unwrap(), app.url(&path));
        if !template.contains("{path}") {
            request = request.header("content-type", "application/json");
        }
        request = match path.split('/').nth(1) {
            Some("v1") => request.bearer_auth(&tenant),
            Some("internal") => request.bearer_auth(&service),
            _ => request,
        };
        let body = match (method, template) {
            ("PUT", _) => json!({"mode": "test"}),
            ("POST", "/v1/tenants/{tenant_id}/stripe/connection") => {
                json!({"api_key": key("rk_test_", "Down")})
            }
            _ => json!({}),
        };
        let request = match template.contains("{path}") {
            true => request,
            false => request.body(body.to_string()),
        };
        let (status, answer) = doc.check(method, template, request).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (503, Some("service_unavailable")),
            "{method} {path}: {answer}"
        );
    }
    doc.assert_complete();
}
