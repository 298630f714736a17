//! Announcements to Atlas: recorded with the change, signed per Standard Webhooks (checked
//! with the `standardwebhooks` crate, not our signer), at least once, in order per tenant.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atlas_stripe::auth::Scope;
use atlas_stripe::domain::{Mode, Resource, TenantId};
use atlas_stripe::notifications::{Announcement, EndpointRepair};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use reqwest::Method;
use serde_json::Value;
use sqlx::Connection;
use tokio::sync::{Notify, Semaphore};

use crate::backend_tests;
use crate::helpers::{eventually, json, spawn_app_with, Backend, TestApp};
use crate::stripe_mock::{answer_all, grant_all_but, key, Answer};

backend_tests!(
    every_connection_change_is_announced_signed_in_order,
    retries_keep_the_webhook_id_and_follow_the_schedule_and_retry_after,
    a_410_stops_and_a_failed_announcement_is_redelivered_by_hand,
    a_slow_tenant_holds_up_only_its_own_announcements,
    a_change_committed_before_a_crash_is_delivered_after_restart,
    two_instances_deliver_each_announcement_once,
    a_rolled_back_change_announces_nothing,
    a_dead_instances_claim_comes_back_when_its_lease_expires,
    retention_deletes_only_old_delivered_announcements_in_batches,
);

pub fn secret(fill: u8) -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([fill; 32])
    )
}

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub id: String,
    pub body: Value,
    pub raw: String,
    pub headers: HeaderMap,
    pub at: Instant,
}

impl Received {
    pub fn kind(&self) -> &str {
        self.body["type"].as_str().unwrap_or_default()
    }
    pub fn tenant(&self) -> &str {
        self.body["data"]["tenant_id"].as_str().unwrap_or_default()
    }
}

/// How the receiver answers one request: a status, maybe a `Retry-After`, maybe only once
/// a gate lets it.
#[derive(Clone, Default)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<&'static str>,
    pub gate: Option<Arc<Semaphore>>,
}

type Script = Box<dyn Fn(&Received, usize) -> Reply + Send + Sync>;

struct ReceiverState {
    verifiers: Vec<standardwebhooks::Webhook>,
    received: Mutex<Vec<Received>>,
    script: Mutex<Script>,
    arrived: Notify,
}

/// Atlas's side: verifies every signature with each secret it was given, records what came
/// and answers as scripted (200 by default).
pub struct Receiver {
    pub url: String,
    state: Arc<ReceiverState>,
}

impl Receiver {
    pub async fn start(secrets: &[&str]) -> Self {
        let state = Arc::new(ReceiverState {
            verifiers: (secrets.iter())
                .map(|s| standardwebhooks::Webhook::new(s).expect("secret"))
                .collect(),
            received: Mutex::default(),
            script: Mutex::new(Box::new(|_, _| Reply {
                status: 200,
                ..Reply::default()
            })),
            arrived: Notify::new(),
        });
        let app = axum::Router::new()
            .route("/atlas", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/atlas", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, state }
    }

    /// `script(request, how many times this id came before)`.
    pub fn answer(&self, script: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static) {
        *self.state.script.lock().unwrap() = Box::new(script);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until `check` holds for what came.
    pub async fn wait_until(
        &self,
        what: &str,
        check: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let arrived = self.state.arrived.notified();
            let received = self.received();
            if check(&received) {
                return received;
            }
            if Instant::now() > deadline {
                let kinds: Vec<_> = received
                    .iter()
                    .map(|r| (r.tenant().to_owned(), r.kind().to_owned()))
                    .collect();
                panic!("never happened: {what}; received {kinds:?}");
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), arrived).await;
        }
    }

    /// The announcements of `tenant`, in arrival order.
    pub fn kinds_of(received: &[Received], tenant: &str) -> Vec<String> {
        (received.iter())
            .filter(|r| r.tenant() == tenant)
            .map(|r| r.kind().to_owned())
            .collect()
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    for verifier in &state.verifiers {
        if let Err(e) = verifier.verify(body.as_bytes(), &headers) {
            panic!("signature refused ({e:?}): {headers:?}");
        }
    }
    let received = Received {
        id: headers["webhook-id"].to_str().unwrap().to_owned(),
        body: serde_json::from_str(&body).expect("JSON body"),
        raw: body,
        headers,
        at: Instant::now(),
    };
    let reply = {
        let mut all = state.received.lock().unwrap();
        let before = all.iter().filter(|r| r.id == received.id).count();
        let reply = (state.script.lock().unwrap())(&received, before);
        all.push(received);
        reply
    };
    state.arrived.notify_waiters();
    if let Some(gate) = reply.gate {
        let _held = gate.acquire().await;
    }
    let mut response = StatusCode::from_u16(reply.status).unwrap().into_response();
    if let Some(retry_after) = reply.retry_after {
        response
            .headers_mut()
            .insert("retry-after", retry_after.parse().unwrap());
    }
    response
}

/// An app announcing to `receiver`, signed with `secrets`, retrying on `schedule`.
async fn app_for(backend: Backend, receiver: &Receiver, secrets: &str, schedule: &str) -> TestApp {
    spawn_app_with(
        backend,
        &[
            ("notifications.url", receiver.url.as_str()),
            ("notifications.secret", secrets),
            ("notifications.retry_schedule", schedule),
        ],
    )
    .await
}

async fn connect(app: &TestApp, tenant: &str, last4: &str) {
    let response = app.connect(tenant, &key("rk_test_", last4)).await;
    assert!(response.status().is_success(), "{}", response.status());
}

async fn verify(app: &TestApp) {
    let response = app.tenant_request(Method::POST, "ten_1", "/verify").await;
    assert!(response.status().is_success(), "{}", response.status());
}

async fn every_connection_change_is_announced_signed_in_order(backend: Backend) {
    // A rotation: both secrets sign, and the receiver checks each signature on its own.
    let (old, new) = (secret(1), secret(2));
    let receiver = Receiver::start(&[&old, &new]).await;
    let app = app_for(backend, &receiver, &format!("{old},{new}"), "0s,100ms").await;
    app.create_tenant("ten_1", Mode::Test).await;
    answer_all(&app.stripe, Answer::Granted).await;
    connect(&app, "ten_1", "Aaa1").await;
    connect(&app, "ten_1", "Aaa2").await;
    app.stripe.reset().await;
    grant_all_but(&app.stripe, &[Resource::Coupons]).await;
    verify(&app).await;
    // Unchanged: nothing to announce.
    verify(&app).await;
    app.stripe.reset().await;
    answer_all(&app.stripe, Answer::Granted).await;
    verify(&app).await;
    app.stripe.reset().await;
    answer_all(&app.stripe, Answer::InvalidKey).await;
    verify(&app).await;
    app.stripe.reset().await;
    answer_all(&app.stripe, Answer::Granted).await;
    let gone = app.tenant_request(Method::DELETE, "ten_1", "").await;
    assert!(gone.status().is_success(), "{}", gone.status());

    let expected = [
        "connection.connected",
        "connection.replaced",
        "connection.needs_attention",
        "connection.restored",
        "connection.revoked",
        "connection.disconnected",
    ];
    let received = receiver
        .wait_until("six announcements", |r| r.len() >= expected.len())
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = receiver.received().len().max(received.len());
    assert_eq!(
        received,
        expected.len(),
        "one per change, none for an unchanged status"
    );
    let received = receiver.received();
    assert_eq!(Receiver::kinds_of(&received, "ten_1"), expected);
    for r in &received {
        assert!(r.id.starts_with("msg_"), "{}", r.id);
        let signatures = r.headers["webhook-signature"].to_str().unwrap();
        assert_eq!(signatures.split(' ').count(), 2, "{signatures}");
        assert_eq!(r.headers["content-type"], "application/json");
        assert!(r.body["timestamp"].is_string());
    }
    let ids: BTreeSet<_> = received.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids.len(), received.len(), "one id per announcement");

    let data =
        |kind: &str| received.iter().find(|r| r.kind() == kind).unwrap().body["data"].clone();
    let connected = data("connection.connected");
    assert_eq!(connected["tenant_id"], "ten_1");
    assert_eq!(connected["status"], "active");
    assert_eq!(connected["key_last4"], "Aaa1");
    assert_eq!(connected["permissions"]["coupons"], "granted");
    assert_eq!(data("connection.replaced")["key_last4"], "Aaa2");
    let attention = data("connection.needs_attention");
    assert_eq!(attention["status"], "needs_attention");
    assert_eq!(attention["missing"], serde_json::json!(["coupons"]));
    assert!(
        attention["fix_url"]
            .as_str()
            .unwrap()
            .starts_with("https://dashboard.stripe.com/test/apikeys/create"),
        "{attention}"
    );
    assert_eq!(data("connection.restored")["status"], "active");
    assert_eq!(data("connection.revoked")["status"], "revoked");
    let disconnected = data("connection.disconnected");
    assert_eq!(disconnected["key_last4"], "Aaa2");
    assert!(disconnected["connection_id"]
        .as_str()
        .unwrap()
        .starts_with("con_"));

    // The ops list: newest first, everything delivered once.
    let token = app.service_token(&[Scope::OpsRead]).await;
    let listed = json(
        app.http
            .get(app.url("/internal/v1/notifications?status=delivered"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let listed: Vec<&str> = (listed.as_array().unwrap().iter())
        .map(|n| n["type"].as_str().unwrap())
        .collect();
    let mut newest_first = expected.to_vec();
    newest_first.reverse();
    assert_eq!(listed, newest_first);
}

async fn retries_keep_the_webhook_id_and_follow_the_schedule_and_retry_after(backend: Backend) {
    let s = secret(3);
    let receiver = Receiver::start(&[&s]).await;
    receiver.answer(|_, before| match before {
        0 => Reply {
            status: 500,
            ..Reply::default()
        },
        1 => Reply {
            status: 503,
            retry_after: Some("1"),
            ..Reply::default()
        },
        _ => Reply {
            status: 204,
            ..Reply::default()
        },
    });
    let app = app_for(backend, &receiver, &s, "0s,200ms,200ms,200ms").await;
    app.create_tenant("ten_1", Mode::Test).await;
    answer_all(&app.stripe, Answer::Granted).await;
    connect(&app, "ten_1", "Rtr1").await;
    let received = receiver
        .wait_until("three attempts", |r| r.len() >= 3)
        .await;
    assert!(
        received.iter().all(|r| r.id == received[0].id),
        "the same webhook-id on every attempt"
    );
    assert!(
        received.iter().all(|r| r.raw == received[0].raw),
        "the same body on every attempt"
    );
    let first_wait = received[1].at - received[0].at;
    assert!(
        first_wait >= Duration::from_millis(200),
        "the schedule's 200 ms: {first_wait:?}"
    );
    let second_wait = received[2].at - received[1].at;
    assert!(
        second_wait >= Duration::from_secs(1),
        "Retry-After: 1 over 200 ms: {second_wait:?}"
    );
    // Delivered: no fourth attempt.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(receiver.received().len(), 3);
    let token = app.service_token(&[Scope::OpsRead]).await;
    let listed = json(
        app.http
            .get(app.url("/internal/v1/notifications"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(listed[0]["status"], "delivered", "{listed}");
    assert_eq!(listed[0]["attempts"], 3, "{listed}");
    assert_eq!(listed[0]["last_status"], 204, "{listed}");
}

async fn a_410_stops_and_a_failed_announcement_is_redelivered_by_hand(backend: Backend) {
    let s = secret(4);
    let receiver = Receiver::start(&[&s]).await;
    // ten_gone's receiver says 410 Gone; every other tenant's fails three times.
    receiver.answer(|r, _| match r.tenant() {
        "ten_gone" => Reply {
            status: 410,
            ..Reply::default()
        },
        _ => Reply {
            status: 500,
            ..Reply::default()
        },
    });
    let app = app_for(backend, &receiver, &s, "0s,50ms,50ms").await;
    answer_all(&app.stripe, Answer::Granted).await;
    for tenant in ["ten_gone", "ten_down"] {
        app.create_tenant(tenant, Mode::Test).await;
        connect(&app, tenant, "Fld1").await;
    }
    let ops = app.service_token(&[Scope::OpsRead]).await;
    let list = |query: &'static str| {
        let (app, ops) = (&app, ops.clone());
        async move {
            json(
                app.http
                    .get(app.url(&format!("/internal/v1/notifications{query}")))
                    .bearer_auth(&ops)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    eventually("both failed", || async {
        list("?status=failed").await.as_array().unwrap().len() == 2
    })
    .await;
    let received = receiver.received();
    assert_eq!(
        Receiver::kinds_of(&received, "ten_gone").len(),
        1,
        "410 stops at once"
    );
    assert_eq!(
        Receiver::kinds_of(&received, "ten_down").len(),
        3,
        "the whole schedule"
    );
    let failed = list("?status=failed").await;
    let down = (failed.as_array().unwrap().iter())
        .find(|n| n["tenant_id"] == "ten_down")
        .unwrap()
        .clone();
    assert_eq!(down["attempts"], 3, "{down}");
    assert_eq!(down["last_status"], 500, "{down}");
    assert_eq!(down["last_error"], "answered 500", "{down}");
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("atlas_notification_deliveries_total{outcome=\"failed\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("atlas_notification_deliveries_total{outcome=\"gone\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("atlas_notification_queue_depth"),
        "{metrics}"
    );
    assert!(
        metrics.contains("atlas_notification_oldest_undelivered_seconds"),
        "{metrics}"
    );

    // Paging: one a page, newest first, the next named in Link.
    let first = app
        .http
        .get(app.url("/internal/v1/notifications?status=failed&limit=1"))
        .bearer_auth(&ops)
        .send()
        .await
        .unwrap();
    let link = first.headers()["link"].to_str().unwrap().to_owned();
    let first = json(first).await;
    assert_eq!(first[0]["tenant_id"], "ten_down", "newest first: {first}");
    let next = link
        .trim_start_matches('<')
        .split('>')
        .next()
        .unwrap()
        .to_owned();
    assert!(next.contains("status=failed"), "{link}");
    let second = json(
        app.http
            .get(app.url(&next))
            .bearer_auth(&ops)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(second[0]["tenant_id"], "ten_gone", "{second}");

    // Redelivery needs ops:write, and sends it again under the same id.
    let id = down["id"].as_str().unwrap().to_owned();
    let path = format!("/internal/v1/notifications/{id}/redeliver");
    let refused = app
        .http
        .post(app.url(&path))
        .bearer_auth(&ops)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    receiver.answer(|_, _| Reply {
        status: 200,
        ..Reply::default()
    });
    let writer = app.service_token(&[Scope::OpsWrite]).await;
    let unknown = app
        .http
        .post(app.url("/internal/v1/notifications/msg_nosuch/redeliver"))
        .bearer_auth(&writer)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let accepted = app
        .http
        .post(app.url(&path))
        .bearer_auth(&writer)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    let received = receiver
        .wait_until("the redelivery", |r| {
            r.iter().filter(|r| r.id == id).count() == 4
        })
        .await;
    assert_eq!(received.iter().filter(|r| r.id == id).count(), 4);
    eventually("delivered", || async {
        list("?status=delivered").await.as_array().unwrap().len() == 1
    })
    .await;
}

async fn a_slow_tenant_holds_up_only_its_own_announcements(backend: Backend) {
    let s = secret(5);
    let receiver = Receiver::start(&[&s]).await;
    let gate = Arc::new(Semaphore::new(0));
    let held = gate.clone();
    receiver.answer(move |r, _| Reply {
        status: 200,
        gate: (r.tenant() == "ten_slow").then(|| held.clone()),
        ..Reply::default()
    });
    let app = app_for(backend, &receiver, &s, "0s,5s").await;
    answer_all(&app.stripe, Answer::Granted).await;
    for tenant in ["ten_slow", "ten_fast"] {
        app.create_tenant(tenant, Mode::Test).await;
    }
    connect(&app, "ten_slow", "Slo1").await;
    receiver
        .wait_until("the slow tenant's first", |r| {
            Receiver::kinds_of(r, "ten_slow").len() == 1
        })
        .await;
    connect(&app, "ten_slow", "Slo2").await;
    connect(&app, "ten_fast", "Fst1").await;
    connect(&app, "ten_fast", "Fst2").await;
    let gone = app.tenant_request(Method::DELETE, "ten_fast", "").await;
    assert!(gone.status().is_success());
    let received = receiver
        .wait_until("the fast tenant's three", |r| {
            Receiver::kinds_of(r, "ten_fast").len() == 3
        })
        .await;
    assert_eq!(
        Receiver::kinds_of(&received, "ten_fast"),
        [
            "connection.connected",
            "connection.replaced",
            "connection.disconnected"
        ]
    );
    // The slow tenant's second waits behind its first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        Receiver::kinds_of(&receiver.received(), "ten_slow"),
        ["connection.connected"]
    );
    gate.add_permits(100);
    let received = receiver
        .wait_until("the slow tenant's second", |r| {
            Receiver::kinds_of(r, "ten_slow").len() == 2
        })
        .await;
    assert_eq!(
        Receiver::kinds_of(&received, "ten_slow"),
        ["connection.connected", "connection.replaced"]
    );
}

async fn a_change_committed_before_a_crash_is_delivered_after_restart(backend: Backend) {
    let s = secret(6);
    let receiver = Receiver::start(&[&s]).await;
    // No deliverer: the change commits and the process goes away before anything is sent.
    let app = spawn_app_with(backend, &[("notifications.secret", s.as_str())]).await;
    app.create_tenant("ten_1", Mode::Test).await;
    answer_all(&app.stripe, Answer::Granted).await;
    connect(&app, "ten_1", "Crs1").await;
    let restarted = app
        .twin_with(&[("notifications.url", receiver.url.as_str())])
        .await;
    drop(app);
    let received = receiver
        .wait_until("the announcement", |r| !r.is_empty())
        .await;
    assert_eq!(
        Receiver::kinds_of(&received, "ten_1"),
        ["connection.connected"]
    );
    drop(restarted);
}

async fn two_instances_deliver_each_announcement_once(backend: Backend) {
    let s = secret(7);
    let receiver = Receiver::start(&[&s]).await;
    let app = app_for(backend, &receiver, &s, "0s,5s").await;
    let twin = app.twin().await;
    answer_all(&app.stripe, Answer::Granted).await;
    answer_all(&twin.stripe, Answer::Granted).await;
    let tenants: Vec<String> = (0..8).map(|i| format!("ten_{i}")).collect();
    for (i, tenant) in tenants.iter().enumerate() {
        app.create_tenant(tenant, Mode::Test).await;
        // Changes on both instances.
        let on = if i % 2 == 0 { &app } else { &twin };
        connect(on, tenant, "Two1").await;
        connect(on, tenant, "Two2").await;
    }
    receiver
        .wait_until("sixteen announcements", |r| r.len() >= 16)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = receiver.received();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for r in &received {
        *seen.entry(r.id.as_str()).or_default() += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "delivered twice: {seen:?}");
    assert_eq!(received.len(), 16);
    for tenant in &tenants {
        assert_eq!(
            Receiver::kinds_of(&received, tenant),
            ["connection.connected", "connection.replaced"]
        );
    }
}

async fn a_rolled_back_change_announces_nothing(backend: Backend) {
    let s = secret(8);
    let receiver = Receiver::start(&[&s]).await;
    let app = app_for(backend, &receiver, &s, "0s,5s").await;
    app.create_tenant("ten_1", Mode::Test).await;
    answer_all(&app.stripe, Answer::Granted).await;
    connect(&app, "ten_1", "Rbk1").await;
    receiver.wait_until("connected", |r| r.len() == 1).await;
    let tenant = TenantId::parse("ten_1").unwrap();
    let record = app.store.find_connection(&tenant).await.unwrap().unwrap();

    // Issue 22's events, recorded inside a transaction that rolls back: nothing is sent.
    let at = time::OffsetDateTime::now_utc();
    let rolled_back = Announcement::events_unrecoverable(&record, at);
    match backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&app.db.url).await.unwrap();
            let mut tx = conn.begin().await.unwrap();
            atlas_stripe::store::notifications::record_announcement_in::<sqlx::Sqlite>(
                &mut tx,
                &rolled_back,
            )
            .await
            .unwrap();
            tx.rollback().await.unwrap();
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
            let mut tx = conn.begin().await.unwrap();
            atlas_stripe::store::notifications::record_announcement_in::<sqlx::Postgres>(
                &mut tx,
                &rolled_back,
            )
            .await
            .unwrap();
            tx.rollback().await.unwrap();
        }
    }
    // Then the three of issue 22, each in a transaction of its own.
    let from = at - time::Duration::hours(2);
    for announcement in [
        Announcement::webhook_endpoint_repaired(&record, EndpointRepair::Registered),
        Announcement::events_recovered(&record, 12, from, at),
        Announcement::events_unrecoverable(&record, from),
    ] {
        app.store.record_announcement(&announcement).await.unwrap();
    }
    let received = receiver.wait_until("four", |r| r.len() >= 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = receiver.received().len().max(received.len());
    assert_eq!(received, 4, "the rolled-back one was sent");
    let received = receiver.received();
    assert_eq!(
        Receiver::kinds_of(&received, "ten_1"),
        [
            "connection.connected",
            "webhook_endpoint.repaired",
            "events.recovered",
            "events.unrecoverable"
        ]
    );
    let data = |i: usize| received[i].body["data"].clone();
    assert_eq!(data(1)["repair"], "registered");
    assert_eq!(data(1)["key_last4"], "Rbk1");
    assert_eq!(data(2)["count"], 12);
    assert!(
        data(2)["from"].is_string() && data(2)["to"].is_string(),
        "{}",
        data(2)
    );
    assert!(data(3)["before"].is_string(), "{}", data(3));
    assert_eq!(
        app.db.scalar("SELECT COUNT(*) FROM notifications").await,
        4,
        "the rolled-back row is not in the outbox"
    );
}

async fn a_dead_instances_claim_comes_back_when_its_lease_expires(backend: Backend) {
    let s = secret(10);
    let receiver = Receiver::start(&[&s]).await;
    // No deliverer yet: the change is recorded, then claimed by an instance that dies.
    let app = spawn_app_with(backend, &[("notifications.secret", s.as_str())]).await;
    app.create_tenant("ten_1", Mode::Test).await;
    answer_all(&app.stripe, Answer::Granted).await;
    connect(&app, "ten_1", "Dead").await;
    let now = atlas_stripe::clock::now();
    let lease = Duration::from_millis(1500);
    let claimed = app
        .store
        .claim_announcements("deliverer_dead", now, now + lease, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let started = Instant::now();
    let live = app
        .twin_with(&[("notifications.url", receiver.url.as_str())])
        .await;
    let received = receiver
        .wait_until("the orphaned announcement", |r| !r.is_empty())
        .await;
    assert!(
        received[0].at - started >= lease - Duration::from_millis(300),
        "delivered while the dead instance's lease ran: {:?}",
        received[0].at - started
    );
    assert_eq!(received[0].id, claimed[0].id, "under the same webhook-id");
    drop(live);
}

async fn retention_deletes_only_old_delivered_announcements_in_batches(backend: Backend) {
    let s = secret(11);
    let receiver = Receiver::start(&[&s]).await;
    receiver.answer(|r, _| Reply {
        status: if r.tenant() == "ten_down" { 500 } else { 200 },
        ..Reply::default()
    });
    let app = app_for(backend, &receiver, &s, "0s,1h").await;
    answer_all(&app.stripe, Answer::Granted).await;
    for tenant in ["ten_1", "ten_2", "ten_down"] {
        app.create_tenant(tenant, Mode::Test).await;
        connect(&app, tenant, "Ret1").await;
    }
    receiver.wait_until("three", |r| r.len() >= 3).await;
    let delivered = "SELECT COUNT(*) FROM notifications WHERE status = 'delivered'";
    eventually("two delivered", || async {
        app.db.scalar(delivered).await == 2
    })
    .await;
    use atlas_stripe::notifications::retention::purge;
    // Delivered just now: within a day's retention, kept.
    assert_eq!(
        purge(app.store.as_ref(), Duration::from_secs(86_400), 1)
            .await
            .unwrap(),
        0
    );
    // Older than no retention at all: both go, one batch at a time; the pending one stays.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        purge(app.store.as_ref(), Duration::ZERO, 1).await.unwrap(),
        2
    );
    assert_eq!(app.db.scalar("SELECT COUNT(*) FROM notifications").await, 1);
    assert_eq!(app.db.scalar(delivered).await, 0);
}
