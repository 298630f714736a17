//! A large fleet, on a small scale: re-verification is spread over its period and kept
//! under one budget that every instance shares; "who is due" takes the right rows; old feed
//! rows and usage tallies are deleted in batches, and nothing newer than the horizon.

use std::time::Duration;

use atlas_stripe::domain::{Mode, TenantId};
use atlas_stripe::store::{
    Actor, EventCursor, EventInsert, Inserted, KeyFetchTally, NewEvent, Retained, Store,
    StoredWebhook, WebhookChange,
};

use crate::backend_tests;
use crate::helpers::{spawn_app_with, Backend};
use crate::store::{new_connection, store};
use crate::stripe_mock::{answer_all, key, Answer};

backend_tests!(
    the_due_claim_takes_the_earliest_due_and_nothing_else,
    the_budget_is_shared_by_every_instance,
    reverification_across_instances_stays_under_the_budget,
    new_connections_are_spread_over_the_period,
    retention_deletes_only_old_feed_rows_in_batches,
    retention_deletes_only_old_usage_tallies,
);

fn tenant(id: &str) -> TenantId {
    TenantId::parse(id).unwrap()
}

/// Due connections are claimed earliest first, one at a time when asked for one; a
/// connection not yet due, or revoked, is never claimed.
async fn the_due_claim_takes_the_earliest_due_and_nothing_else(backend: Backend) {
    let (_db, store) = store(backend).await;
    let now = time::OffsetDateTime::now_utc();
    // Minutes from now each connection is due: three due, one revoked and long due, one
    // not yet due.
    let due_in = [
        (-3, "ten_b"),
        (-10, "ten_a"),
        (-1, "ten_c"),
        (-60, "ten_r"),
        (5, "ten_later"),
    ];
    for (minutes, id) in due_in {
        store
            .upsert_tenant(&tenant(id), Mode::Test, &Actor::Cli)
            .await
            .unwrap();
        let mut connection = new_connection(id, Mode::Test, &format!("sec_{id}"));
        connection.next_verify_at = now + time::Duration::minutes(minutes);
        if id == "ten_r" {
            connection.status = atlas_stripe::domain::ConnectionStatus::Revoked;
        }
        store
            .save_connection(&connection, &Actor::Cli)
            .await
            .unwrap();
    }
    let lease = now + time::Duration::minutes(2);
    let mut order = Vec::new();
    loop {
        let claimed = store
            .claim_due_connections("proc_a", now, lease, 1)
            .await
            .unwrap();
        assert!(claimed.len() <= 1, "asked for one: {claimed:?}");
        match claimed.into_iter().next() {
            Some(t) => order.push(t),
            None => break,
        }
    }
    assert_eq!(
        order,
        vec![tenant("ten_a"), tenant("ten_b"), tenant("ten_c")],
        "earliest due first; revoked and not-yet-due never"
    );
}

/// The fleet-wide budget is one row: two instances (two pools) taking from it at once get
/// no more than its rate between them, and a refusal says how long to wait.
async fn the_budget_is_shared_by_every_instance(backend: Backend) {
    let (db, one) = store(backend).await;
    let settings =
        atlas_stripe::config::Settings::load(None, &[("database.url", db.url.as_str())]).unwrap();
    let two = atlas_stripe::store::connect(&settings.database)
        .await
        .unwrap();
    let cost = Duration::from_millis(200);
    assert_eq!(one.take_budget("test", cost).await.unwrap(), None);
    let wait = two
        .take_budget("test", cost)
        .await
        .unwrap()
        .expect("spent: the other instance took the slice");
    assert!(wait <= cost && wait > Duration::ZERO, "{wait:?}");
    // Both take as fast as they are let, for a while: the rate holds for the two together.
    let window = Duration::from_millis(1_500);
    let taker = |store: std::sync::Arc<dyn Store>| async move {
        let start = tokio::time::Instant::now();
        let mut taken = 0;
        while start.elapsed() < window {
            match store.take_budget("test", cost).await.unwrap() {
                None => taken += 1,
                Some(wait) => tokio::time::sleep(wait.min(Duration::from_millis(20))).await,
            }
        }
        taken
    };
    let (a, b) = tokio::join!(taker(one.clone()), taker(two.clone()));
    // 1.5 s at one slice per 200 ms: 7 or 8 slices, whoever takes them.
    assert!(a + b <= 9, "{a} + {b} slices in 1.5 s at 5 a second");
    assert!(a + b >= 5, "{a} + {b}: the budget kept refusing");
}

/// Re-verification that considers everything due all the time, under a budget of one
/// verification every half second (seven requests at fourteen a second).
const EAGER_UNDER_BUDGET: [(&str, &str); 6] = [
    ("reverify.enabled", "true"),
    ("reverify.period_secs", "0"),
    ("reverify.jitter_secs", "0"),
    ("reverify.retry_secs", "0"),
    ("reverify.tick_ms", "30"),
    ("reverify.max_stripe_calls_per_second", "14"),
];

async fn verifications(store: &dyn Store) -> usize {
    (store.audit_trail(None).await.unwrap().iter())
        .filter(|r| r.action == "connection.verified" && r.actor.starts_with("reverifier"))
        .count()
}

/// Two instances re-verifying a fleet that is always due share one budget: together they
/// verify no faster than it allows.
async fn reverification_across_instances_stays_under_the_budget(backend: Backend) {
    // Connected with the background off (each due at once), then two instances with it on.
    let app = spawn_app_with(
        backend,
        &[("reverify.period_secs", "0"), ("reverify.jitter_secs", "0")],
    )
    .await;
    answer_all(&app.stripe, Answer::Granted).await;
    for i in 0..6 {
        let id = format!("ten_{i}");
        app.create_tenant(&id, Mode::Test).await;
        assert_eq!(
            app.connect(&id, &key("rk_test_", "Fle1")).await.status(),
            201
        );
    }
    let one = app.twin_with(&EAGER_UNDER_BUDGET).await;
    let two = app.twin_with(&EAGER_UNDER_BUDGET).await;
    for instance in [&one, &two] {
        answer_all(&instance.stripe, Answer::Granted).await;
    }
    // Past the first verifications (the budget row may start with a slice in hand).
    crate::helpers::eventually("re-verification runs", || async {
        verifications(app.store.as_ref()).await >= 2
    })
    .await;
    let before = verifications(app.store.as_ref()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = verifications(app.store.as_ref()).await - before;
    // Two a second for 3 s, and one more for a run caught at the edges.
    assert!(
        during <= 7,
        "{during} verifications in 3 s under two a second"
    );
    assert!(during >= 3, "only {during} verifications in 3 s");
    let _ = app.stripe.received_requests().await;
    one.shut_down().await;
    two.shut_down().await;
}

/// A bulk import's connections are first due anywhere in the period, not all a period
/// after they were made.
async fn new_connections_are_spread_over_the_period(backend: Backend) {
    let app = spawn_app_with(backend, &[("reverify.period_secs", "604800")]).await;
    answer_all(&app.stripe, Answer::Granted).await;
    let started = time::OffsetDateTime::now_utc();
    for i in 0..12 {
        let id = format!("ten_{i}");
        app.create_tenant(&id, Mode::Test).await;
        assert_eq!(
            app.connect(&id, &key("rk_test_", "Spr1")).await.status(),
            201
        );
    }
    // Claimed day by day of the period (as a re-verifier would see them come due), leased
    // past its end so each is counted once.
    let lease = started + time::Duration::days(30);
    let mut per_day = Vec::new();
    for day in 1..=7 {
        let at = started + time::Duration::days(day) + time::Duration::minutes(1);
        let claimed = app
            .store
            .claim_due_connections("test", at, lease, 100)
            .await
            .unwrap();
        per_day.push(claimed.len());
    }
    assert_eq!(
        per_day.iter().sum::<usize>(),
        12,
        "all due within the period: {per_day:?}"
    );
    // Twelve uniform draws over seven days all within two days: about 2 in a million.
    assert!(
        per_day.iter().filter(|n| **n > 0).count() >= 3,
        "first due per day of the period: {per_day:?}"
    );
}

fn event(id: &str) -> NewEvent {
    NewEvent {
        event_id: id.to_owned(),
        event_type: "invoice.paid".into(),
        created: 1_700_000_000,
        livemode: false,
        payload: "{}".into(),
    }
}

/// Saves `t`'s connection `con_feed` with the webhook secret `whs_feed` deliveries are
/// checked with (a delivery is stored only while its connection has that secret).
async fn connect_feed(store: &dyn Store, t: &TenantId) {
    let mut connection = new_connection(t.as_str(), Mode::Test, "sec_feed");
    connection.connection_id = "con_feed".into();
    connection.webhook = WebhookChange::Set(StoredWebhook {
        endpoint_id: "we_feed".into(),
        secret_id: "whs_feed".into(),
        sealed: connection.sealed.clone(),
    });
    store
        .save_connection(&connection, &Actor::Cli)
        .await
        .unwrap();
}

/// Stores one delivered event for `t`; whether it was new.
async fn insert_one(store: &dyn Store, t: &TenantId, id: &str) -> bool {
    let batch = [EventInsert {
        tenant: t.clone(),
        connection_id: "con_feed".into(),
        webhook_secret_id: "whs_feed".into(),
        event: event(id),
    }];
    store.insert_webhook_events(&batch).await.unwrap()[0] == Inserted::Stored
}

async fn feed_ids(store: &dyn Store, t: &TenantId) -> Vec<String> {
    (store
        .list_events(t, EventCursor::default(), 1_000)
        .await
        .unwrap())
    .into_iter()
    .map(|e| e.event_id)
    .collect()
}

/// Feed rows received before the horizon go, a bounded batch per statement, oldest first;
/// rows received after it stay, however many batches run.
async fn retention_deletes_only_old_feed_rows_in_batches(backend: Backend) {
    let (_db, store) = store(backend).await;
    let t = tenant("ten_feed");
    store
        .upsert_tenant(&t, Mode::Test, &Actor::Cli)
        .await
        .unwrap();
    connect_feed(&*store, &t).await;
    for i in 0..25 {
        assert!(insert_one(&*store, &t, &format!("evt_old_{i:02}")).await);
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let horizon = atlas_stripe::clock::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut newer = Vec::new();
    for i in 0..5 {
        let id = format!("evt_new_{i}");
        assert!(insert_one(&*store, &t, &id).await);
        newer.push(id);
    }
    let mut batches = Vec::new();
    loop {
        let n = store
            .delete_expired(Retained::Events, horizon, 10)
            .await
            .unwrap();
        batches.push(n);
        if n == 0 {
            break;
        }
    }
    assert_eq!(
        batches,
        [10, 10, 5, 0],
        "bounded batches until none is left"
    );
    // The feed holds back rows of running transactions on PostgreSQL; none run here.
    assert_eq!(feed_ids(store.as_ref(), &t).await, newer);
    // The worker's pass: a retention of 2 s keeps what was received since.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(insert_one(&*store, &t, "evt_fresh").await);
    let deleted =
        atlas_stripe::retention::purge(store.as_ref(), Retained::Events, Duration::from_secs(2), 2)
            .await
            .unwrap();
    assert_eq!(deleted, 5, "every old row, two at a time");
    assert_eq!(feed_ids(store.as_ref(), &t).await, ["evt_fresh"]);
}

/// Usage tallies whose minute began before the horizon go; the rest stay, in both tables.
async fn retention_deletes_only_old_usage_tallies(backend: Backend) {
    let (_db, store) = store(backend).await;
    let now = time::OffsetDateTime::now_utc().replace_second(0).unwrap();
    let t = tenant("ten_usage");
    let tally = |token: &str, days_ago: i64| KeyFetchTally {
        token_id: token.to_owned(),
        tenant_id: t.clone(),
        window_start: now - time::Duration::days(days_ago),
        fetch_count: 1,
        last_fetched_at: now - time::Duration::days(days_ago),
    };
    let tallies: Vec<KeyFetchTally> = (0..7)
        .map(|i| tally(&format!("tok_old_{i}"), 100))
        .chain([tally("tok_edge", 89), tally("tok_new", 0)])
        .collect();
    store.record_usage(&tallies, &tallies).await.unwrap();
    for table in [Retained::KeyFetches, Retained::StripeCalls] {
        let deleted = atlas_stripe::retention::purge(
            store.as_ref(),
            table,
            Duration::from_secs(90 * 86_400),
            3,
        )
        .await
        .unwrap();
        assert_eq!(deleted, 7, "{table:?}: the seven tallies past 90 days");
    }
    for rows in [
        store.key_fetches(&t).await.unwrap(),
        store.stripe_calls(&t).await.unwrap(),
    ] {
        let kept: Vec<&str> = rows.iter().map(|r| r.token_id.as_str()).collect();
        assert_eq!(kept, ["tok_edge", "tok_new"]);
    }
}
