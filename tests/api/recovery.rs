//! Recovery of events Stripe could not deliver: listed from Stripe's event log (the mock
//! lists as Stripe does), stored once each beside the deliveries, resumable after a kill,
//! one process per connection, under Stripe's rate limits.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use atlas_stripe::auth::Scope;
use atlas_stripe::crypto::Keyring;
use atlas_stripe::domain::{Mode, TenantId};
use atlas_stripe::proxy::AccountSmoothing;
use atlas_stripe::store::{EventCursor, StoredEvent, WebhookStatus};
use atlas_stripe::stripe::{StripeClient, StripeClientConfig};
use atlas_stripe::webhooks::recovery::{EventRecovery, RecoverySettings};
use serde_json::json;

use crate::backend_tests;
use crate::helpers::{assert_error, json, spawn_app_with, Backend, TestApp};
use crate::stripe_mock::{answer_all, key, Answer, FakeEndpoints, FakeEvents};

backend_tests!(
    events_missed_while_stopped_are_stored_once,
    delivered_and_recovered_overlap_without_duplicates,
    a_run_killed_between_pages_resumes,
    a_run_longer_than_its_lease_keeps_it,
    two_instances_recover_one_connection_once,
    a_rate_limited_listing_is_tried_again,
    a_key_without_events_read_recovers_nothing,
    recovery_on_demand_fills_the_feed,
    a_restart_recovers_what_arrived_while_stopped,
    a_key_without_events_read_connects_with_recovery_off,
    a_disabled_endpoint_is_enabled_again_then_recovered,
    a_deleted_endpoint_is_registered_again_then_recovered,
    the_endpoint_cap_is_a_clear_422,
    idle_healthy_connections_are_not_listed_on_a_timer,
    a_long_stop_makes_every_connection_due,
    events_read_regained_makes_a_recovery_due,
    a_revoked_connection_is_put_off_to_the_sweep,
);

const TYPES: [&str; 2] = ["invoice.paid", "checkout.session.completed"];

struct Connected {
    app: TestApp,
    endpoints: FakeEndpoints,
    events: FakeEvents,
    connection_id: String,
    keyring: Arc<Keyring>,
}

async fn connected(backend: Backend) -> Connected {
    connected_with(backend, &[]).await
}

/// Connected on an app whose own recovery worker runs (ticking every few seconds, woken by
/// requests and repairs).
async fn connected_with(backend: Backend, settings: &[(&str, &str)]) -> Connected {
    let app = spawn_app_with(backend, settings).await;
    app.create_tenant("ten_1", Mode::Test).await;
    let events = FakeEvents::default();
    events.mount(&app.stripe).await;
    let endpoints = answer_all(&app.stripe, Answer::Granted).await;
    assert_eq!(
        app.connect("ten_1", &key("rk_test_", "Main"))
            .await
            .status(),
        201
    );
    let connection_id = app
        .store
        .find_connection(&tenant())
        .await
        .unwrap()
        .expect("connected")
        .connection_id;
    let keyring = Arc::new(app.keyring());
    Connected {
        app,
        endpoints,
        events,
        connection_id,
        keyring,
    }
}

fn tenant() -> TenantId {
    TenantId::parse("ten_1").unwrap()
}

fn settings() -> RecoverySettings {
    let mut settings = RecoverySettings::new(
        Duration::from_secs(900),
        TYPES.iter().map(|t| (*t).to_owned()).collect(),
    );
    settings.retry = Duration::from_millis(50);
    settings
}

/// A worker of its own, as another process would have.
fn worker(c: &Connected, settings: RecoverySettings) -> Arc<EventRecovery> {
    let stripe = StripeClient::new(StripeClientConfig {
        api_base: c.app.stripe.uri(),
        api_version: "2023-08-16".into(),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(15),
        max_retries: 2,
        retry_base_delay: Duration::from_millis(10),
        retry_max_delay: Duration::from_millis(40),
    })
    .unwrap();
    let smoothing = AccountSmoothing::new(
        NonZeroU32::new(25).unwrap(),
        NonZeroU32::new(25).unwrap(),
        Duration::from_secs(1),
    );
    Arc::new(EventRecovery::new(
        c.app.store.clone(),
        c.keyring.clone(),
        stripe,
        Arc::new(smoothing),
        settings,
        Arc::default(),
    ))
}

/// `count` events of subscribed types created from now on, and one of a type we do not
/// subscribe to for every ten.
fn missed(events: &FakeEvents, count: usize) -> Vec<String> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut ids = Vec::new();
    for i in 0..count {
        // Several per second: Stripe does not order events within one second.
        let created = now + (i / 7) as i64;
        ids.push(events.add(TYPES[i % 2], created).id);
        if i % 10 == 0 {
            events.add("customer.created", created);
        }
    }
    ids
}

/// The whole feed, once every stored row is in it: on PostgreSQL the feed holds back rows
/// while an older transaction anywhere in the cluster (another test's) is still running.
async fn feed(c: &Connected) -> Vec<StoredEvent> {
    let stored = c.app.db.scalar("SELECT COUNT(*) FROM webhook_events").await;
    // Up to 30 s: a test elsewhere in the cluster may hold a transaction open at a gate.
    for _ in 0..1_500 {
        let feed = c
            .app
            .store
            .list_events(&tenant(), EventCursor::default(), 10_000)
            .await
            .unwrap();
        if feed.len() as i64 >= stored {
            return feed;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the feed never showed the {stored} stored events");
}

/// How many announcements of `kind` whose body holds `fragment` are in the outbox.
async fn announced(c: &Connected, kind: &str, fragment: &str) -> i64 {
    let sql = format!(
        "SELECT COUNT(*) FROM notifications WHERE type = '{kind}' AND body LIKE '%{fragment}%'"
    );
    c.app.db.scalar(&sql).await
}

#[track_caller]
fn assert_once(feed: &[StoredEvent], ids: &[String]) {
    let mut stored: Vec<&str> = feed.iter().map(|e| e.event_id.as_str()).collect();
    stored.sort_unstable();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(stored, expected, "each missed event exactly once");
}

async fn events_missed_while_stopped_are_stored_once(backend: Backend) {
    let c = connected(backend).await;
    let ids = missed(&c.events, 250);
    let worker = worker(&c, settings());
    let started = atlas_stripe::clock::now();
    assert_eq!(worker.run_once().await, 1, "the connection was due");
    let stored = feed(&c).await;
    assert_once(&stored, &ids);
    assert!(stored.iter().all(|e| e.source == "recovered"));
    assert_eq!(
        announced(&c, "events.recovered", "\"count\":250").await,
        1,
        "the recovery is announced to Atlas, with its count"
    );
    assert!(stored
        .iter()
        .all(|e| TYPES.contains(&e.event_type.as_str())));
    let payload: serde_json::Value = serde_json::from_str(&stored[0].payload).unwrap();
    assert_eq!(payload["object"], "event");
    assert_eq!(
        c.events.pages(),
        3,
        "100 a page, newest first, until has_more is false"
    );
    // The cursor moved: the next run lists only the overlap, and stores nothing again.
    let cursor = c
        .app
        .store
        .request_recovery(&c.connection_id, None)
        .await
        .unwrap()
        .unwrap();
    assert!(cursor.run.is_none(), "the run ended");
    assert!(
        cursor.recovered_through >= started,
        "the cursor moved to where the run began"
    );
    assert_eq!(worker.run_once().await, 1, "due again on request");
    assert_once(&feed(&c).await, &ids);
    // Every request was Stripe's API, with the tenant's key.
    let requests = c.app.stripe_requests().await;
    let listings: Vec<_> = (requests.iter())
        .filter(|r| {
            r.url.path() == "/v1/events" && r.url.query_pairs().any(|(k, _)| k == "created[gte]")
        })
        .collect();
    assert_eq!(
        listings.len(),
        6,
        "three pages a run: the overlap lists them again"
    );
    for listing in &listings {
        let types: Vec<String> = (listing.url.query_pairs())
            .filter(|(k, _)| k == "types[]")
            .map(|(_, v)| v.into_owned())
            .collect();
        assert_eq!(types, TYPES, "only the subscribed types");
    }
}

async fn delivered_and_recovered_overlap_without_duplicates(backend: Backend) {
    let c = connected(backend).await;
    let ids = missed(&c.events, 30);
    // Stripe delivered some of them before the outage.
    let secret = c.endpoints.secret_for(&c.connection_id);
    let delivered = &c.events_bodies()[..5];
    for body in delivered {
        let text = body.to_string();
        let t = time::OffsetDateTime::now_utc().unix_timestamp();
        let signature = atlas_stripe::stripe::webhooks::sign(secret.as_bytes(), t, text.as_bytes());
        let response = c
            .app
            .http
            .post(c.app.url(&format!("/webhooks/stripe/{}", c.connection_id)))
            .header("stripe-signature", format!("t={t},v1={signature}"))
            .body(text)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    worker(&c, settings()).run_once().await;
    let stored = feed(&c).await;
    assert_once(&stored, &ids);
    let from_webhook: Vec<&str> = (stored.iter())
        .filter(|e| e.source == "webhook")
        .map(|e| e.event_id.as_str())
        .collect();
    assert_eq!(from_webhook.len(), 5, "deliveries keep their source");
    // A delivery arriving after its recovery is a duplicate, not a second row.
    let late = c.events_bodies()[10].to_string();
    let t = time::OffsetDateTime::now_utc().unix_timestamp();
    let signature = atlas_stripe::stripe::webhooks::sign(secret.as_bytes(), t, late.as_bytes());
    let response = c
        .app
        .http
        .post(c.app.url(&format!("/webhooks/stripe/{}", c.connection_id)))
        .header("stripe-signature", format!("t={t},v1={signature}"))
        .body(late)
        .send()
        .await
        .unwrap();
    assert_eq!(
        crate::helpers::json(response).await,
        json!({"received": true, "duplicate": true})
    );
    assert_once(&feed(&c).await, &ids);
}

impl Connected {
    /// The subscribed events on Stripe, as delivered.
    fn events_bodies(&self) -> Vec<serde_json::Value> {
        self.events
            .all()
            .iter()
            .filter(|e| TYPES.contains(&e.event_type.as_str()))
            .map(|e| e.body())
            .collect()
    }
}

async fn a_run_killed_between_pages_resumes(backend: Backend) {
    let c = connected(backend).await;
    let ids = missed(&c.events, 250);
    let mut short = settings();
    short.lease = Duration::from_secs(3);
    let first = worker(&c, short.clone());
    let mut gate = c.events.gate_listing(2);
    let running = tokio::spawn({
        let first = first.clone();
        async move { first.run_once().await }
    });
    gate.arrived().await;
    // Killed while the second page is on its way: nothing after the first page happens.
    running.abort();
    let _ = running.await;
    gate.release();
    let after_kill = feed(&c).await;
    assert_eq!(after_kill.len(), 100, "the first page was committed");
    // Another process takes over once the lease has run out, and resumes after page one.
    let second = worker(&c, short);
    assert_eq!(
        second.run_once().await,
        0,
        "still leased to the killed process"
    );
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    assert_eq!(second.run_once().await, 1);
    assert_once(&feed(&c).await, &ids);
    assert_eq!(c.events.pages(), 4, "page one is not listed again");
    let requests = c.app.stripe_requests().await;
    let third = (requests.iter())
        .filter(|r| {
            r.url.path() == "/v1/events" && r.url.query().is_some_and(|q| q.contains("created"))
        })
        .nth(2)
        .expect("a third page");
    assert!(
        third.url.query_pairs().any(|(k, _)| k == "starting_after"),
        "the resumed run starts after the committed page"
    );
}

async fn a_run_longer_than_its_lease_keeps_it(backend: Backend) {
    let c = connected(backend).await;
    let ids = missed(&c.events, 150);
    let mut short = settings();
    short.lease = Duration::from_secs(1);
    let one = worker(&c, short.clone());
    let two = worker(&c, short);
    let mut gate = c.events.gate_listing(1);
    let running = tokio::spawn({
        let one = one.clone();
        async move { one.run_once().await }
    });
    gate.arrived().await;
    // Stripe holds the first page past three leases: the live holder renews its lease
    // (a killed one's lapses, above), so no other process takes the connection meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        two.run_once().await,
        0,
        "still leased to the process whose run is in progress"
    );
    gate.release();
    assert_eq!(running.await.unwrap(), 1);
    assert_once(&feed(&c).await, &ids);
    assert_eq!(c.events.pages(), 2, "no page listed twice");
}

async fn two_instances_recover_one_connection_once(backend: Backend) {
    let c = connected(backend).await;
    let ids = missed(&c.events, 150);
    let one = worker(&c, settings());
    let two = worker(&c, settings());
    let mut gate = c.events.gate_listing(1);
    let running = tokio::spawn({
        let one = one.clone();
        async move { one.run_once().await }
    });
    gate.arrived().await;
    assert_eq!(
        two.run_once().await,
        0,
        "the connection is leased to the first"
    );
    gate.release();
    assert_eq!(running.await.unwrap(), 1);
    assert_once(&feed(&c).await, &ids);
    assert_eq!(c.events.pages(), 2, "no page listed twice");
}

async fn a_rate_limited_listing_is_tried_again(backend: Backend) {
    let c = connected(backend).await;
    let ids = missed(&c.events, 20);
    let worker = worker(&c, settings());
    // One 429 the client's backoff absorbs.
    c.events.rate_limit_next(1);
    assert_eq!(worker.run_once().await, 1);
    assert_once(&feed(&c).await, &ids);
    // More 429s than the client retries: the run stops, stores nothing, and is retried.
    let more = missed(&c.events, 5);
    c.app
        .store
        .request_recovery(&c.connection_id, None)
        .await
        .unwrap();
    c.events.rate_limit_next(3);
    assert_eq!(worker.run_once().await, 1);
    assert_eq!(
        feed(&c).await.len(),
        20,
        "nothing stored from a refused listing"
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(worker.run_once().await, 1, "due again soon after");
    let all: Vec<String> = ids.into_iter().chain(more).collect();
    assert_once(&feed(&c).await, &all);
}

async fn a_key_without_events_read_recovers_nothing(backend: Backend) {
    let c = connected(backend).await;
    missed(&c.events, 10);
    c.events.deny_key("Main");
    let worker = worker(&c, settings());
    assert_eq!(worker.run_once().await, 1);
    assert!(feed(&c).await.is_empty());
    let cursor = c
        .app
        .store
        .find_recovery_cursor(&c.connection_id)
        .await
        .unwrap()
        .unwrap();
    assert!(
        !cursor.event_recovery,
        "off until a verification finds Events: Read"
    );
    assert_eq!(worker.run_once().await, 0, "not claimed while off");
}

/// Waits until `check` holds, for up to 30 s: the worker and the feed's horizon run on
/// their own time, which a loaded machine stretches.
async fn within<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..1_500 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never happened: {what}");
}

const WORKER_ON: [(&str, &str); 1] = [("webhooks.recovery_enabled", "true")];

/// `POST …/events/recover` as a charging service would send it.
async fn recover(
    c: &Connected,
    token: &str,
    tenant: &str,
    body: Option<serde_json::Value>,
) -> reqwest::Response {
    let mut request = c
        .app
        .http
        .post(c.app.url(&format!(
            "/internal/v1/tenants/{tenant}/stripe/events/recover"
        )))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.unwrap()
}

/// The feed as a charging service reads it.
async fn served_feed(c: &Connected, token: &str) -> Vec<serde_json::Value> {
    let page = json(
        c.app
            .http
            .get(
                c.app
                    .url("/internal/v1/tenants/ten_1/stripe/events?limit=500"),
            )
            .bearer_auth(token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    page["events"].as_array().cloned().unwrap_or_default()
}

async fn recovery_on_demand_fills_the_feed(backend: Backend) {
    let c = connected_with(backend, &WORKER_ON).await;
    let writer = c.app.service_token(&[Scope::EventsWrite]).await;
    let reader = c.app.service_token(&[Scope::EventsRead]).await;
    // The worker's first sweep finds nothing yet; the events come after.
    let ids = missed(&c.events, 40);
    let accepted = recover(&c, &writer, "ten_1", Some(json!({}))).await;
    assert_eq!(accepted.status(), 202);
    let accepted = json(accepted).await;
    assert!(accepted["recovery_id"]
        .as_str()
        .unwrap()
        .starts_with("rcv_"));
    let since = crate::stripe_mock::timestamp(&accepted["since"]);
    assert!(since <= atlas_stripe::clock::now());
    within("the recovered events are in the feed", || async {
        served_feed(&c, &reader).await.len() == ids.len()
    })
    .await;
    let served = served_feed(&c, &reader).await;
    assert!(
        served.iter().all(|e| e["source"] == "recovered"),
        "{served:?}"
    );
    // A recovery from a given point, and without a body.
    let from = (time::OffsetDateTime::now_utc() - time::Duration::days(2))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let accepted = json(recover(&c, &writer, "ten_1", Some(json!({"since": from}))).await).await;
    assert_eq!(
        crate::stripe_mock::timestamp(&accepted["since"]),
        crate::stripe_mock::timestamp(&json!(from))
    );
    assert_eq!(recover(&c, &writer, "ten_1", None).await.status(), 202);
    // What is refused, and how.
    assert_error(
        recover(&c, &reader, "ten_1", None).await,
        403,
        "insufficient_scope",
    )
    .await;
    c.app.create_tenant("ten_2", Mode::Test).await;
    assert_error(
        recover(&c, &writer, "ten_2", None).await,
        404,
        "not_connected",
    )
    .await;
    let too_old = (time::OffsetDateTime::now_utc() - time::Duration::days(31))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert_error(
        recover(&c, &writer, "ten_1", Some(json!({"since": too_old}))).await,
        422,
        "since_out_of_range",
    )
    .await;
    assert_error(
        recover(&c, &writer, "ten_1", Some(json!({"since": "yesterday"}))).await,
        400,
        "invalid_json",
    )
    .await;
    // Still exactly once each, whatever ran meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_once(&feed(&c).await, &ids);
}

async fn a_key_without_events_read_connects_with_recovery_off(backend: Backend) {
    let app = spawn_app_with(backend, &[]).await;
    app.create_tenant("ten_1", Mode::Test).await;
    let events = FakeEvents::default();
    events.deny_key("NoEv");
    events.mount(&app.stripe).await;
    answer_all(&app.stripe, Answer::Granted).await;
    let response = app.connect("ten_1", &key("rk_test_", "NoEv")).await;
    assert_eq!(response.status(), 201, "Events: Read is not required");
    let body = json(response).await;
    assert_eq!(body["status"], "active");
    assert_eq!(body["warnings"], json!(["event_recovery_off"]));
    assert_eq!(body["webhook"]["event_recovery"], "off");
    assert_eq!(body["webhook"]["status"], "enabled");
    let fix_url = body["webhook"]["fix_url"].as_str().expect("a fix link");
    assert!(
        fix_url.contains("permissions[]=rak_event_read"),
        "{fix_url}"
    );
    let writer = app.service_token(&[Scope::EventsWrite]).await;
    let refused = app
        .http
        .post(app.url("/internal/v1/tenants/ten_1/stripe/events/recover"))
        .bearer_auth(&writer)
        .send()
        .await
        .unwrap();
    assert_error(refused, 409, "event_recovery_off").await;
    // A key that may read Events: on, no warning.
    let body = json(app.connect("ten_1", &key("rk_test_", "Evts")).await).await;
    assert_eq!(body["warnings"], json!([]));
    assert_eq!(body["webhook"]["event_recovery"], "on");
    assert!(body["webhook"].get("fix_url").is_none());
}

async fn a_disabled_endpoint_is_enabled_again_then_recovered(backend: Backend) {
    let c = connected_with(backend, &WORKER_ON).await;
    let endpoint = c.endpoints.endpoints()[0].id.clone();
    c.endpoints.disable(&endpoint);
    let ids = missed(&c.events, 12);
    let body = json(
        c.app
            .tenant_request(reqwest::Method::POST, "ten_1", "/verify")
            .await,
    )
    .await;
    assert!(
        !c.endpoints.is_disabled(&endpoint),
        "enabled again on Stripe"
    );
    assert_eq!(body["webhook"]["status"], "enabled");
    let enable = (c.app.stripe_requests().await.into_iter())
        .find(|r| {
            r.method.as_str() == "POST"
                && r.url.path() == format!("/v1/webhook_endpoints/{endpoint}")
        })
        .expect("an update of our endpoint");
    assert_eq!(String::from_utf8_lossy(&enable.body), "disabled=false");
    assert_eq!(
        announced(&c, "webhook_endpoint.repaired", "\"repair\":\"reenabled\"").await,
        1,
        "the repair is announced to Atlas"
    );
    within("what the endpoint missed is recovered", || async {
        c.app.db.scalar("SELECT COUNT(*) FROM webhook_events").await == ids.len() as i64
    })
    .await;
    assert_once(&feed(&c).await, &ids);
    within("the recovery is announced", || async {
        announced(&c, "events.recovered", "\"count\":12").await == 1
    })
    .await;
}

async fn a_deleted_endpoint_is_registered_again_then_recovered(backend: Backend) {
    let c = connected_with(backend, &WORKER_ON).await;
    let old = c.endpoints.endpoints()[0].id.clone();
    c.endpoints.delete_on_stripe(&old);
    let ids = missed(&c.events, 12);
    let body = json(
        c.app
            .tenant_request(reqwest::Method::POST, "ten_1", "/verify")
            .await,
    )
    .await;
    assert_eq!(body["webhook"]["status"], "enabled");
    let on_stripe = c.endpoints.endpoints();
    assert_eq!(on_stripe.len(), 1, "one endpoint again, ours");
    assert!(on_stripe[0]
        .url
        .ends_with(&format!("/webhooks/stripe/{}", c.connection_id)));
    let stored = c
        .app
        .store
        .find_connection(&tenant())
        .await
        .unwrap()
        .unwrap();
    let webhook = stored.webhook.expect("an endpoint stored");
    assert_eq!(webhook.endpoint_id, on_stripe[0].id);
    assert_ne!(webhook.endpoint_id, old);
    assert_eq!(
        announced(&c, "webhook_endpoint.repaired", "\"repair\":\"registered\"").await,
        1,
        "the repair is announced to Atlas"
    );
    within("what the endpoint missed is recovered", || async {
        c.app.db.scalar("SELECT COUNT(*) FROM webhook_events").await == ids.len() as i64
    })
    .await;
    assert_once(&feed(&c).await, &ids);
}

async fn the_endpoint_cap_is_a_clear_422(backend: Backend) {
    let app = spawn_app_with(backend, &[]).await;
    app.create_tenant("ten_1", Mode::Test).await;
    let endpoints = answer_all(&app.stripe, Answer::Granted).await;
    for n in 0..crate::stripe_mock::ENDPOINT_CAP {
        endpoints.add_foreign("acct_main", &format!("https://example.com/hooks/{n}"));
    }
    let body = assert_error(
        app.connect("ten_1", &key("rk_test_", "Main")).await,
        422,
        "webhook_endpoint_limit",
    )
    .await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Delete unused webhook endpoints"));
    assert!(
        app.store
            .find_connection(&tenant())
            .await
            .unwrap()
            .is_none(),
        "nothing stored"
    );
    assert_eq!(
        endpoints.endpoints().len(),
        crate::stripe_mock::ENDPOINT_CAP
    );
    // Any other refusal stays the generic one.
    endpoints.delete_on_stripe(&endpoints.endpoints()[0].id.clone());
    endpoints.refuse(true);
    assert_error(
        app.connect("ten_1", &key("rk_test_", "Main")).await,
        422,
        "webhook_registration_failed",
    )
    .await;
}

async fn a_restart_recovers_what_arrived_while_stopped(backend: Backend) {
    // Connected on an instance without the worker; events happen while "it is down"; the
    // next start-up finds the connection due and recovers them, once.
    let c = connected(backend).await;
    let ids = missed(&c.events, 30);
    let restarted = c.app.twin_with(&WORKER_ON).await;
    // The twin talks to its own mock: point it at the same event log and endpoints.
    c.events.mount(&restarted.stripe).await;
    crate::stripe_mock::mount_unknown_urls(&restarted.stripe).await;
    within("recovered at start-up", || async {
        c.app.db.scalar("SELECT COUNT(*) FROM webhook_events").await == ids.len() as i64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_once(&feed(&c).await, &ids);
    restarted.shut_down().await;
}

/// How many event listings (not the Events: Read probe) Stripe has seen.
async fn listings(c: &Connected) -> usize {
    (c.app.stripe_requests().await.iter())
        .filter(|r| {
            r.url.path() == "/v1/events" && r.url.query_pairs().any(|(k, _)| k == "created[gte]")
        })
        .count()
}

/// A healthy connection (endpoint enabled: Stripe delivers and retries) is not listed again
/// at the short interval, only by the sweep; one whose endpoint is disabled is listed at the
/// interval until it is healthy again.
async fn idle_healthy_connections_are_not_listed_on_a_timer(backend: Backend) {
    let c = connected(backend).await;
    let mut fast = settings();
    fast.interval = Duration::from_millis(50);
    let worker = worker(&c, fast);
    assert_eq!(
        worker.run_once().await,
        1,
        "a new connection is listed once"
    );
    let listed = listings(&c).await;
    assert_eq!(listed, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(worker.run_once().await, 0, "healthy: left to the sweep");
    assert_eq!(listings(&c).await, listed, "no listing on a timer");
    // Stripe disabled our endpoint and it could not be enabled again: deliveries cannot
    // arrive, so it is listed now and then at the interval.
    (c.app.store)
        .record_webhook_health(&c.connection_id, true, WebhookStatus::Disabled, true)
        .await
        .unwrap();
    assert_eq!(worker.run_once().await, 1, "the gap makes it due at once");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        worker.run_once().await,
        1,
        "due again at the interval while disabled"
    );
    assert_eq!(listings(&c).await, listed + 2);
    // Healthy again: back to the sweep after its next run.
    (c.app.store)
        .record_webhook_health(&c.connection_id, true, WebhookStatus::Enabled, false)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        worker.run_once().await,
        1,
        "its last interval was still due"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        worker.run_once().await,
        0,
        "healthy: left to the sweep again"
    );
}

/// After the whole fleet was stopped longer than Stripe is sure to retry, the first
/// instance back makes every connection due and its missed events are recovered; another
/// instance coming back at the same time does not do it again.
async fn a_long_stop_makes_every_connection_due(backend: Backend) {
    let c = connected(backend).await;
    let worker = worker(&c, settings());
    assert_eq!(
        worker.beat().await.unwrap(),
        0,
        "the first start: no stop before it"
    );
    assert_eq!(
        worker.run_once().await,
        1,
        "a new connection is listed once"
    );
    assert_eq!(worker.run_once().await, 0, "then left to the sweep");
    // A beat a minute ago is no gap.
    assert_eq!(worker.beat().await.unwrap(), 0);
    // Stopped two days: the heartbeat is that old, and events happened meanwhile.
    c.app
        .db
        .execute(&format!(
            "UPDATE fleet_heartbeats SET beat_at = '{}'",
            (time::OffsetDateTime::now_utc() - time::Duration::days(2))
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap()
        ))
        .await;
    let ids = missed(&c.events, 15);
    let other = self::worker(&c, settings());
    let (one, two) = tokio::join!(worker.beat(), other.beat());
    let mut marked = [one.unwrap(), two.unwrap()];
    marked.sort_unstable();
    assert_eq!(marked, [0, 1], "exactly one instance makes the cursors due");
    assert_eq!(worker.run_once().await, 1, "due after the stop");
    assert_once(&feed(&c).await, &ids);
}

/// A key that lost Events: Read and got it back: the verification that finds it makes a
/// recovery due at once, not at the next sweep.
async fn events_read_regained_makes_a_recovery_due(backend: Backend) {
    let c = connected(backend).await;
    c.events.deny_key("Main");
    let worker = worker(&c, settings());
    assert_eq!(worker.run_once().await, 1, "listed once, refused: off");
    assert_eq!(worker.run_once().await, 0);
    c.events.allow_key("Main");
    let ids = missed(&c.events, 8);
    let verified = c
        .app
        .tenant_request(reqwest::Method::POST, "ten_1", "/verify")
        .await;
    assert_eq!(json(verified).await["webhook"]["event_recovery"], "on");
    assert_eq!(
        worker.run_once().await,
        1,
        "due at once after Events: Read came back"
    );
    assert_once(&feed(&c).await, &ids);
}

/// A revoked connection's due cursor is claimed, found gone without a Stripe call, and put
/// off to the sweep: it does not stay due at the front of the index for every claim to walk
/// past.
async fn a_revoked_connection_is_put_off_to_the_sweep(backend: Backend) {
    let c = connected(backend).await;
    let worker = worker(&c, settings());
    assert_eq!(
        worker.run_once().await,
        1,
        "a new connection is listed once"
    );
    let listed = listings(&c).await;
    c.app
        .db
        .execute("UPDATE stripe_connections SET status = 'revoked'")
        .await;
    (c.app.store)
        .request_recovery(&c.connection_id, None)
        .await
        .unwrap();
    assert_eq!(worker.run_once().await, 1, "claimed while due");
    assert_eq!(listings(&c).await, listed, "no listing for a revoked key");
    assert_eq!(worker.run_once().await, 0, "put off, no longer due");
}
