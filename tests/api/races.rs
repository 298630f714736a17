//! Races between connects and disconnects of one tenant, each interleaving forced by
//! holding one side's Stripe answers until the other side has finished. The invariant
//! after every one: the endpoints on Stripe whose URL is ours are exactly the one our
//! database names, and none once disconnected.

use std::sync::Arc;

use atlas_stripe::domain::{Mode, TenantId};
use atlas_stripe::store::Actor;
use reqwest::Method;

use crate::backend_tests;
use crate::helpers::{spawn_app_with, Backend, TestApp};
use crate::stripe_mock::{answer_all, key, FakeEndpoints, StripeFront};

backend_tests!(
    replacements_onto_two_accounts_leave_one_endpoint,
    a_disconnect_during_a_replacement_leaves_the_new_endpoint_stored,
    a_connect_during_a_disconnects_cleanup_connects_anew,
    a_disconnect_cut_off_after_stripe_deleted_leaves_nothing_stored,
    a_disconnect_cut_off_before_stripe_deleted_leaves_the_endpoint_to_the_sweep,
    the_sweep_spares_the_endpoint_of_a_connect_under_way,
);

/// The app, its Stripe's webhook endpoints, and the front that can hold one of their
/// answers while Stripe goes on serving the other side of the race.
async fn connected(backend: Backend) -> (Arc<TestApp>, FakeEndpoints, StripeFront) {
    let front = StripeFront::start().await;
    let app = Arc::new(spawn_app_with(backend, &[("stripe.api_base", front.uri())]).await);
    front.forward_to(&app.stripe.uri());
    app.create_tenant("ten_1", Mode::Test).await;
    let endpoints = answer_all(&app.stripe, crate::stripe_mock::Answer::Granted).await;
    assert_eq!(
        app.connect("ten_1", &key("rk_test_", "Main"))
            .await
            .status(),
        201
    );
    (app, endpoints, front)
}

/// The invariant: our endpoints on Stripe are exactly the one the database names.
async fn assert_only_the_stored_endpoint(app: &TestApp, endpoints: &FakeEndpoints) {
    let stored = app
        .store
        .find_connection(&TenantId::parse("ten_1").unwrap())
        .await
        .unwrap();
    let named: Vec<String> = stored
        .iter()
        .map(|c| c.webhook.as_ref().expect("a connection has its endpoint"))
        .map(|w| w.endpoint_id.clone())
        .collect();
    let ours: Vec<String> = (endpoints.endpoints().into_iter())
        .filter(|e| e.url.contains("/webhooks/stripe/"))
        .map(|e| e.id)
        .collect();
    assert_eq!(ours, named, "our endpoints on Stripe vs the stored one");
}

/// A and B replace the key with keys of two other accounts at once. B commits while A's
/// registration answer is held; A's save then loses the compare-and-swap, deletes what it
/// registered, and starts over from B's connection.
async fn replacements_onto_two_accounts_leave_one_endpoint(backend: Backend) {
    let (app, endpoints, front) = connected(backend).await;
    let mut gate = front.hold("POST", "XSlw");
    let slow = {
        let app = app.clone();
        tokio::spawn(async move { app.connect("ten_1", &key("rk_test_", "XSlw")).await })
    };
    gate.arrived().await;
    assert_eq!(
        app.connect("ten_1", &key("rk_test_", "YFst"))
            .await
            .status(),
        200
    );
    gate.release();
    assert_eq!(slow.await.unwrap().status(), 200);
    let stored = (app.store)
        .find_connection(&TenantId::parse("ten_1").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.key_last4, "XSlw", "the later commit holds");
    assert_only_the_stored_endpoint(&app, &endpoints).await;
    let accounts: Vec<String> = endpoints
        .endpoints()
        .into_iter()
        .map(|e| e.account)
        .collect();
    assert_eq!(accounts, ["acct_other"]);
}

/// A replacement with a key of the same account keeps the stored endpoint; a disconnect
/// deletes it (and the connection) while A's look-up answer is held. A's save then finds
/// no connection where it expected one and starts over as a first connect.
async fn a_disconnect_during_a_replacement_leaves_the_new_endpoint_stored(backend: Backend) {
    let (app, endpoints, front) = connected(backend).await;
    let mut gate = front.hold("GET", "Slow");
    let slow = {
        let app = app.clone();
        tokio::spawn(async move { app.connect("ten_1", &key("rk_test_", "Slow")).await })
    };
    gate.arrived().await;
    let disconnect = app.tenant_request(Method::DELETE, "ten_1", "").await;
    assert_eq!(disconnect.status(), 204);
    gate.release();
    assert_eq!(slow.await.unwrap().status(), 201, "connected anew");
    assert_only_the_stored_endpoint(&app, &endpoints).await;
    assert_eq!(endpoints.endpoints().len(), 1);
}

/// A connect onto another account while a disconnect's call to delete our endpoint is held:
/// the disconnect committed first (the database goes before Stripe), so the connect is a
/// new connection (201) with its own endpoint, and the disconnect deletes only the old one.
async fn a_connect_during_a_disconnects_cleanup_connects_anew(backend: Backend) {
    let (app, endpoints, front) = connected(backend).await;
    let mut gate = front.hold("GET", "Main");
    let disconnect = {
        let app = app.clone();
        tokio::spawn(async move { app.tenant_request(Method::DELETE, "ten_1", "").await })
    };
    gate.arrived().await;
    let connected = app.connect("ten_1", &key("rk_test_", "XOth")).await;
    assert_eq!(connected.status(), 201);
    gate.release();
    let disconnect = disconnect.await.unwrap();
    assert_eq!(disconnect.status(), 204);
    assert_eq!(disconnect.headers()["atlas-stripe-cleanup"], "deleted");
    assert_only_the_stored_endpoint(&app, &endpoints).await;
    assert_eq!(endpoints.endpoints().len(), 1);
}

/// Runs a disconnect of ten_1 and cuts it off (its task aborted, as a kill -9 would) while
/// Stripe's answer to its `verb` call on our endpoint is held.
async fn cut_off_disconnect(app: &TestApp, front: &StripeFront, verb: &str) {
    let mut gate = front.hold(verb, "Main");
    let connections = app.connections.clone();
    let disconnecting = tokio::spawn(async move {
        let tenant = TenantId::parse("ten_1").unwrap();
        connections.disconnect(&tenant, &Actor::Cli).await
    });
    gate.arrived().await;
    disconnecting.abort();
    assert!(disconnecting.await.is_err(), "cut off before it ended");
    gate.release();
}

/// Makes every kept endpoint due and sweeps; the rows left after.
async fn sweep_now(app: &TestApp) -> i64 {
    app.db
        .execute("UPDATE endpoint_cleanups SET due_at = '2000-01-01T00:00:00Z'")
        .await;
    app.connections.clean_up_left_endpoints().await;
    app.db
        .scalar("SELECT COUNT(*) FROM endpoint_cleanups")
        .await
}

/// Found by scripts/chaos (seed 612926814): an instance killed -9 after Stripe deleted our
/// endpoint and before the disconnect deleted the connection left a stored connection
/// naming an endpoint gone from Stripe. The connection now goes first.
async fn a_disconnect_cut_off_after_stripe_deleted_leaves_nothing_stored(backend: Backend) {
    let (app, endpoints, front) = connected(backend).await;
    cut_off_disconnect(&app, &front, "DELETE").await;
    assert_only_the_stored_endpoint(&app, &endpoints).await;
    assert!(endpoints.endpoints().is_empty());
    assert_eq!(
        sweep_now(&app).await,
        0,
        "the kept key goes with nothing left"
    );
}

/// Cut off before Stripe was asked to delete: the connection is gone and the endpoint
/// outlives it only until the sweep, which deletes it with the key kept beside it.
async fn a_disconnect_cut_off_before_stripe_deleted_leaves_the_endpoint_to_the_sweep(
    backend: Backend,
) {
    let (app, endpoints, front) = connected(backend).await;
    cut_off_disconnect(&app, &front, "GET").await;
    let tenant = TenantId::parse("ten_1").unwrap();
    assert!(app.store.find_connection(&tenant).await.unwrap().is_none());
    assert_eq!(endpoints.endpoints().len(), 1, "still on Stripe");
    assert_eq!(sweep_now(&app).await, 0);
    assert!(endpoints.endpoints().is_empty(), "deleted by the sweep");
}

/// Found by scripts/chaos (a 500 "connection vanished in its own transaction"): a disconnect
/// that commits after a replacement's save has read the stored connection and before it
/// updates it. The replacement's update is held on a row lock the test takes; the row is
/// deleted (as the disconnect does) and the lock let go. The replacement starts over and
/// connects anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_inside_a_replacements_save_makes_it_start_over() {
    let (app, _, _) = connected(Backend::Postgres).await;
    let mut disconnect = <sqlx::PgConnection as sqlx::Connection>::connect(&app.db.url)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut disconnect).await.unwrap();
    sqlx::query("SELECT 1 FROM stripe_connections WHERE tenant_id = 'ten_1' FOR UPDATE")
        .execute(&mut disconnect)
        .await
        .unwrap();
    let replacing = {
        let app = app.clone();
        tokio::spawn(async move { app.connect("ten_1", &key("rk_test_", "Next")).await })
    };
    // The save has read the connection and waits to update it.
    let waiting = "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                   AND query LIKE 'UPDATE stripe_connections SET api_key_secret_id%'";
    crate::helpers::eventually("the save waits on the row", || async {
        app.db.scalar(waiting).await == 1
    })
    .await;
    sqlx::query("DELETE FROM stripe_connections WHERE tenant_id = 'ten_1'")
        .execute(&mut disconnect)
        .await
        .unwrap();
    sqlx::query("COMMIT")
        .execute(&mut disconnect)
        .await
        .unwrap();
    let response = replacing.await.unwrap();
    assert_eq!(response.status(), 201, "connected anew, not a 500");
    let stored = app
        .store
        .find_connection(&TenantId::parse("ten_1").unwrap())
        .await
        .unwrap()
        .expect("connected");
    assert_eq!(stored.key_last4, "Next");
}

/// A replacement commits between a disconnect's read and its delete (forced: the delete
/// waits on a row lock the test holds while it moves the connection to another endpoint).
/// The disconnect's compare-and-swap fails, it reads again and deletes the connection with
/// the endpoint it names now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_that_loses_its_compare_and_swap_reads_again() {
    let (app, endpoints, _) = connected(Backend::Postgres).await;
    let first = endpoints.endpoints()[0].id.clone();
    let mut replacement = <sqlx::PgConnection as sqlx::Connection>::connect(&app.db.url)
        .await
        .unwrap();
    sqlx::query("BEGIN")
        .execute(&mut replacement)
        .await
        .unwrap();
    sqlx::query("SELECT 1 FROM stripe_connections WHERE tenant_id = 'ten_1' FOR UPDATE")
        .execute(&mut replacement)
        .await
        .unwrap();
    let disconnect = {
        let app = app.clone();
        tokio::spawn(async move { app.tenant_request(Method::DELETE, "ten_1", "").await })
    };
    let waiting = "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                   AND query LIKE 'DELETE FROM stripe_connections%'";
    crate::helpers::eventually("the disconnect waits on the row", || async {
        app.db.scalar(waiting).await == 1
    })
    .await;
    sqlx::query(
        "UPDATE stripe_connections SET webhook_endpoint_id = 'we_moved' WHERE tenant_id = 'ten_1'",
    )
    .execute(&mut replacement)
    .await
    .unwrap();
    sqlx::query("COMMIT")
        .execute(&mut replacement)
        .await
        .unwrap();
    let response = disconnect.await.unwrap();
    assert_eq!(response.status(), 204);
    // The second round's endpoint, which Stripe does not have; the first is left alone.
    assert_eq!(response.headers()["atlas-stripe-cleanup"], "already_gone");
    assert_eq!(endpoints.endpoints()[0].id, first);
    let tenant = TenantId::parse("ten_1").unwrap();
    assert!(app.store.find_connection(&tenant).await.unwrap().is_none());
}

/// A replacement cut off after registering its endpoint leaves its intent, which the sweep
/// settles later. Meanwhile another replacement of the same connection (the same URL) has
/// registered its endpoint and not stored it yet, when the sweep comes: it must not delete
/// that endpoint, which the replacement is about to store.
async fn the_sweep_spares_the_endpoint_of_a_connect_under_way(backend: Backend) {
    let (app, endpoints, front) = connected(backend).await;
    let mut cut = front.hold("POST", "XKil");
    // The service's own call, so that aborting the task cuts the connect off (a request
    // over HTTP would go on in the server after its client went away).
    let killed = {
        let connections = app.connections.clone();
        tokio::spawn(async move {
            let tenant = TenantId::parse("ten_1").unwrap();
            let pasted = secrecy::SecretString::from(key("rk_test_", "XKil"));
            connections.connect(&tenant, &pasted, &Actor::Cli).await
        })
    };
    let orphan = cut.arrived().await;
    killed.abort();
    let _ = killed.await;
    cut.release();
    app.db
        .execute("UPDATE endpoint_cleanups SET due_at = '2000-01-01T00:00:00Z'")
        .await;

    let mut held = front.hold("POST", "XNew");
    let replacing = {
        let app = app.clone();
        tokio::spawn(async move { app.connect("ten_1", &key("rk_test_", "XNew")).await })
    };
    let registered = held.arrived().await;
    app.connections.clean_up_left_endpoints().await;
    let ids: Vec<String> = endpoints.endpoints().into_iter().map(|e| e.id).collect();
    assert!(
        ids.contains(&registered),
        "the sweep spared {registered}: {ids:?}"
    );
    held.release();
    assert_eq!(replacing.await.unwrap().status(), 200);

    // Once the replacement has ended, the sweep deletes the orphan and keeps what is stored.
    assert_eq!(sweep_now(&app).await, 0);
    let ids: Vec<String> = endpoints.endpoints().into_iter().map(|e| e.id).collect();
    assert!(!ids.contains(&orphan), "{ids:?}");
    assert_only_the_stored_endpoint(&app, &endpoints).await;
}
