//! The store story, run against both backends through the `Store` trait alone.

use std::collections::BTreeSet;

use atlas_stripe::auth::{IssuedServiceToken, Scope};
use atlas_stripe::crypto::SealedSecret;
use atlas_stripe::domain::{
    Access, ConnectionStatus, KeyKind, Mode, PermissionReport, Resource, TenantId, Warning,
};
use atlas_stripe::store::{
    Actor, KeyFetchTally, NewConnection, NewServiceToken, SaveOutcome, Store, StoreError,
    StoredState, TenantWrite, Verification, WebhookChange,
};

use crate::backend_tests;
use crate::helpers::{Backend, TestDatabase};

backend_tests!(
    tenant_story,
    service_token_story,
    connection_story,
    leases_story,
    usage_story
);

pub(crate) async fn store(backend: Backend) -> (TestDatabase, std::sync::Arc<dyn Store>) {
    let db = TestDatabase::new(backend).await;
    let settings =
        atlas_stripe::config::Settings::load(None, &[("database.url", db.url.as_str())]).unwrap();
    let store = atlas_stripe::store::connect(&settings.database)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.expect("migrations are idempotent");
    store.check_ready().await.unwrap();
    (db, store)
}

fn tenant(id: &str) -> TenantId {
    TenantId::parse(id).unwrap()
}

async fn tenant_story(backend: Backend) {
    let (_db, store) = store(backend).await;
    let t = tenant("ten_1");
    assert_eq!(store.find_tenant(&t).await.unwrap(), None);
    assert_eq!(
        store
            .upsert_tenant(&t, Mode::Test, &Actor::Cli)
            .await
            .unwrap(),
        TenantWrite::Created
    );
    assert_eq!(
        store
            .upsert_tenant(&t, Mode::Test, &Actor::Cli)
            .await
            .unwrap(),
        TenantWrite::Unchanged
    );
    assert_eq!(
        store
            .upsert_tenant(&t, Mode::Live, &Actor::Cli)
            .await
            .unwrap(),
        TenantWrite::Updated
    );
    let found = store.find_tenant(&t).await.unwrap().unwrap();
    assert_eq!((found.tenant_id, found.mode), (t.clone(), Mode::Live));
    store
        .save_connection(&new_connection("ten_1", Mode::Live, "sec_1"), &Actor::Cli)
        .await
        .unwrap();
    assert!(matches!(
        store.upsert_tenant(&t, Mode::Test, &Actor::Cli).await,
        Err(StoreError::TenantHasConnection)
    ));
    // Concurrent creates of one tenant, each on its own task and released together: every
    // one succeeds, exactly one creates and the others find it unchanged (a loser that
    // errors is a failure). Several rounds, so the pool has connections enough for a race.
    for round in 0..10 {
        let other = tenant(&format!("ten_race{round}"));
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(8));
        let results = futures_util::future::join_all((0..8).map(|_| {
            let (store, other, start) = (store.clone(), other.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                store.upsert_tenant(&other, Mode::Test, &Actor::Cli).await
            })
        }))
        .await;
        let mut outcomes: Vec<String> = results
            .into_iter()
            .map(|joined| match joined.expect("task") {
                Ok(write) => format!("{write:?}"),
                Err(e) => panic!("round {round}: a concurrent create failed: {e}"),
            })
            .collect();
        outcomes.sort();
        let mut expected = vec!["Unchanged".to_owned(); 7];
        expected.push("Created".to_owned());
        expected.sort();
        assert_eq!(outcomes, expected, "round {round}");
        let tenant_created = store
            .audit_trail(Some(&other))
            .await
            .unwrap()
            .into_iter()
            .filter(|a| a.action == "tenant.created")
            .count();
        assert_eq!(tenant_created, 1, "one creation audited");
    }
}

async fn service_token_story(backend: Backend) {
    let (_db, store) = store(backend).await;
    let issued = IssuedServiceToken::generate();
    let scopes: BTreeSet<Scope> = [Scope::KeysRead].into();
    let token = NewServiceToken {
        id: issued.id.clone(),
        name: "billing".into(),
        scopes: scopes.clone(),
        hash: issued.hash.clone(),
    };
    store
        .insert_service_token(&token, &Actor::Cli)
        .await
        .unwrap();
    let found = store.find_service_token(&issued.id).await.unwrap().unwrap();
    assert_eq!(
        (found.name.as_str(), &found.scopes, &found.hash),
        ("billing", &scopes, &issued.hash)
    );
    assert!(found.revoked_at.is_none());
    assert_eq!(store.list_service_tokens().await.unwrap().len(), 1);
    assert!(store
        .revoke_service_token(&issued.id, &Actor::Cli)
        .await
        .unwrap());
    assert!(
        !store
            .revoke_service_token(&issued.id, &Actor::Cli)
            .await
            .unwrap(),
        "already revoked"
    );
    assert!(store
        .find_service_token(&issued.id)
        .await
        .unwrap()
        .unwrap()
        .revoked_at
        .is_some());
    assert!(store
        .find_service_token("nosuchtoken00000")
        .await
        .unwrap()
        .is_none());
}

fn report(missing: &[Resource]) -> PermissionReport {
    Resource::ALL
        .into_iter()
        .map(|r| {
            (
                r,
                if missing.contains(&r) {
                    Access::Missing
                } else {
                    Access::Granted
                },
            )
        })
        .collect()
}

pub(crate) fn new_connection(tenant_id: &str, mode: Mode, secret_id: &str) -> NewConnection {
    NewConnection {
        connection_id: format!("con_{tenant_id}"),
        expected: StoredState::Absent,
        webhook: WebhookChange::Keep,
        tenant_id: tenant(tenant_id),
        mode,
        key_type: KeyKind::Secret,
        key_last4: "Ab12".into(),
        key_fingerprint: vec![7; 32],
        secret_id: secret_id.into(),
        sealed: SealedSecret {
            master_key_id: "k1".into(),
            wrapped_key: vec![1; 60],
            ciphertext: vec![2; 140],
        },
        status: ConnectionStatus::Active,
        permissions: report(&[]),
        warnings: vec![Warning::SecretKeyFullAccess],
        verified_at: time::OffsetDateTime::now_utc(),
        next_verify_at: time::OffsetDateTime::now_utc(),
    }
}

async fn connection_story(backend: Backend) {
    let (_db, store) = store(backend).await;
    let t = tenant("ten_1");
    assert!(matches!(
        store
            .save_connection(&new_connection("ten_1", Mode::Test, "sec_1"), &Actor::Cli)
            .await,
        Err(StoreError::TenantMissing)
    ));
    store
        .upsert_tenant(&t, Mode::Test, &Actor::Cli)
        .await
        .unwrap();
    assert!(matches!(
        store
            .save_connection(&new_connection("ten_1", Mode::Live, "sec_1"), &Actor::Cli)
            .await,
        Err(StoreError::ModeChanged(Mode::Test))
    ));

    // Microsecond precision (what both backends keep), with every digit significant.
    let verified_at = time::macros::datetime!(2024-02-29 23:59:58.123457 UTC);
    let mut first = new_connection("ten_1", Mode::Test, "sec_1");
    first.verified_at = verified_at;
    let before = atlas_stripe::clock::now();
    let SaveOutcome::Created(created) = store.save_connection(&first, &Actor::Cli).await.unwrap()
    else {
        panic!("first save creates");
    };
    let after = atlas_stripe::clock::now();
    let found = store.find_connection(&t).await.unwrap().unwrap();
    assert_eq!(found.connection_id, created.connection_id);
    assert_eq!(found.sealed, first.sealed, "the sealed bytes round-trip");
    assert_eq!(found.permissions, report(&[]));
    assert_eq!(found.warnings, vec![Warning::SecretKeyFullAccess]);
    assert_eq!(
        (created.verified_at, found.verified_at),
        (verified_at, verified_at),
        "timestamps round-trip exactly"
    );
    assert_eq!(found.connected_at, created.connected_at);
    assert!(
        before <= found.connected_at && found.connected_at <= after,
        "connected_at is the time of the save: {before} <= {} <= {after}",
        found.connected_at
    );

    // A save that read no connection, or another endpoint than the stored one, lost a race.
    let stale_endpoint = StoredState::Present {
        endpoint_id: Some("we_gone".into()),
    };
    for stale in [StoredState::Absent, stale_endpoint] {
        let mut late = new_connection("ten_1", Mode::Test, "sec_9");
        late.expected = stale;
        assert!(matches!(
            store.save_connection(&late, &Actor::Cli).await,
            Err(StoreError::Conflict)
        ));
    }
    let mut replacement = new_connection("ten_1", Mode::Test, "sec_2");
    replacement.expected = StoredState::Present { endpoint_id: None };
    let SaveOutcome::Replaced(replaced) = store
        .save_connection(&replacement, &Actor::Cli)
        .await
        .unwrap()
    else {
        panic!("second save replaces");
    };
    assert_eq!(
        replaced.connection_id, created.connection_id,
        "the connection id is stable"
    );
    assert_eq!(replaced.secret_id, "sec_2");

    // A verification of the replaced key is dropped; of the current one, recorded.
    let reverified_at = time::macros::datetime!(2024-03-01 00:00:01.000001 UTC);
    let verification = Verification {
        status: ConnectionStatus::NeedsAttention,
        permissions: report(&[Resource::Coupons]),
        verified_at: reverified_at,
        next_verify_at: time::OffsetDateTime::now_utc(),
    };
    assert!(store
        .record_verification(&t, "sec_1", &verification, &Actor::Cli)
        .await
        .unwrap()
        .is_none());
    let verified = store
        .record_verification(&t, "sec_2", &verification, &Actor::Cli)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(verified.status, ConnectionStatus::NeedsAttention);
    assert_eq!(verified.permissions.missing(), vec![Resource::Coupons]);
    assert_eq!(verified.verified_at, reverified_at, "exactly the input");
    assert_eq!(
        store
            .find_connection(&t)
            .await
            .unwrap()
            .unwrap()
            .verified_at,
        reverified_at
    );

    assert_eq!(store.list_connections(None, "", 10).await.unwrap().len(), 1);
    assert_eq!(
        store
            .list_connections(Some(ConnectionStatus::NeedsAttention), "", 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(store
        .list_connections(Some(ConnectionStatus::Active), "", 10)
        .await
        .unwrap()
        .is_empty());

    // Deleting is a compare-and-swap on the endpoint too.
    let gone = Some("we_gone");
    assert!(!store
        .delete_connection(&t, gone, &Actor::Cli)
        .await
        .unwrap());
    assert!(store.find_connection(&t).await.unwrap().is_some());
    assert!(store
        .delete_connection(&t, None, &Actor::Cli)
        .await
        .unwrap());
    assert!(!store
        .delete_connection(&t, None, &Actor::Cli)
        .await
        .unwrap());
    assert!(store.find_connection(&t).await.unwrap().is_none());

    let actions: Vec<String> = store
        .audit_trail(Some(&t))
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.action)
        .collect();
    assert_eq!(
        actions,
        [
            "tenant.created",
            "connection.created",
            "connection.replaced",
            "connection.verified",
            "connection.deleted"
        ]
    );
}

/// Claimer A leases `held` in a transaction left open (as a claim in flight does) on its own
/// connection; claimer B claims everything through the store meanwhile. Returns what each
/// ended up with.
///
/// PostgreSQL: B skips the rows A holds (`FOR UPDATE SKIP LOCKED`) and returns at once,
/// without them, while A's transaction is still open.
///
/// SQLite has one writer at a time, so nothing can be skipped: the equivalent guarantee is
/// that B's claim waits until A commits (it cannot finish while A's write is open) and then
/// sees A's leases, so it takes only the rest.
async fn claim_while_another_claim_is_open(
    db: &TestDatabase,
    store: &std::sync::Arc<dyn Store>,
    held: &[&str],
    now: time::OffsetDateTime,
    lease: time::OffsetDateTime,
) -> (Vec<TenantId>, Vec<TenantId>) {
    use sqlx::Connection;
    use std::time::Duration;
    let in_list = held
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let lease_a = format!(
        "UPDATE stripe_connections SET lease_owner = 'proc_a', lease_until = $1 \
         WHERE tenant_id IN ({in_list})"
    );
    let expected_a: Vec<TenantId> = held.iter().map(|t| tenant(t)).collect();
    match db.backend {
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
            let mut tx = conn.begin().await.unwrap();
            let leased = sqlx::query(&lease_a)
                .bind(lease)
                .execute(&mut *tx)
                .await
                .unwrap();
            assert_eq!(leased.rows_affected(), held.len() as u64);
            // A's transaction is open: B must not wait for the rows it holds.
            let b = tokio::time::timeout(
                Duration::from_secs(3),
                store.claim_due_connections("proc_b", now, lease, 10),
            )
            .await
            .expect("the claim waited for rows another claimer holds (no SKIP LOCKED?)")
            .unwrap();
            for t in &b {
                assert!(!expected_a.contains(t), "B took {t:?}, held by A");
            }
            tx.commit().await.unwrap();
            (expected_a, b)
        }
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut conn)
                .await
                .unwrap();
            let leased = sqlx::query(&lease_a)
                .bind(lease)
                .execute(&mut conn)
                .await
                .unwrap();
            assert_eq!(leased.rows_affected(), held.len() as u64);
            let mut claim_b = {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .claim_due_connections("proc_b", now, lease, 10)
                        .await
                        .unwrap()
                })
            };
            assert!(
                tokio::time::timeout(Duration::from_millis(300), &mut claim_b)
                    .await
                    .is_err(),
                "B claimed while A's write was open"
            );
            sqlx::query("COMMIT").execute(&mut conn).await.unwrap();
            let b = tokio::time::timeout(Duration::from_secs(4), claim_b)
                .await
                .expect("B never got the writer lock")
                .unwrap();
            (expected_a, b)
        }
    }
}

/// Due connections are leased to one claimer at a time; a lease expires; a release
/// reschedules; revoked connections are never claimed.
async fn leases_story(backend: Backend) {
    let (db, store) = store(backend).await;
    let now = time::OffsetDateTime::now_utc();
    for i in 0..10 {
        let id = format!("ten_{i}");
        store
            .upsert_tenant(&tenant(&id), Mode::Test, &Actor::Cli)
            .await
            .unwrap();
        let mut connection = new_connection(&id, Mode::Test, &format!("sec_{i}"));
        connection.next_verify_at = now - time::Duration::minutes(1);
        if i == 9 {
            connection.status = ConnectionStatus::Revoked;
        }
        store
            .save_connection(&connection, &Actor::Cli)
            .await
            .unwrap();
    }
    let lease = now + time::Duration::minutes(2);
    // Two claimers at once. Claimer A is caught mid-claim: its transaction has leased four
    // due rows and not committed. Claimer B, asking for everything, must not wait for A
    // nor take A's rows.
    let held = ["ten_0", "ten_1", "ten_2", "ten_3"];
    let (a, b) = claim_while_another_claim_is_open(&db, &store, &held, now, lease).await;
    let mut all: Vec<TenantId> = a.iter().chain(b.iter()).cloned().collect();
    all.sort();
    all.dedup();
    assert_eq!(
        all.len(),
        a.len() + b.len(),
        "a connection was claimed twice: {a:?} {b:?}"
    );
    assert_eq!(
        all.len(),
        9,
        "every due, unrevoked connection is claimed once"
    );
    // Leased: nobody else gets them until the lease expires.
    assert!(store
        .claim_due_connections("proc_c", now, lease, 10)
        .await
        .unwrap()
        .is_empty());
    let later = lease + time::Duration::seconds(1);
    let c = store
        .claim_due_connections("proc_c", later, later + time::Duration::minutes(2), 3)
        .await
        .unwrap();
    assert_eq!(c.len(), 3, "expired leases are claimable again");
    // Only the holder can release: proc_a's release of proc_c's lease changes nothing.
    store
        .release_connection(&c[1], "proc_a", later + time::Duration::hours(6))
        .await
        .unwrap();
    // The holder's release reschedules it six hours out.
    store
        .release_connection(&c[0], "proc_c", later + time::Duration::hours(6))
        .await
        .unwrap();
    let far = later + time::Duration::minutes(5);
    let claimed = store
        .claim_due_connections("proc_d", far, far + time::Duration::minutes(2), 10)
        .await
        .unwrap();
    assert!(!claimed.contains(&c[0]));
    assert!(claimed.contains(&c[1]));
    assert_eq!(claimed.len(), 8);
}

/// Usage tallies are added to what is stored, never replace it, in batches larger than
/// one PostgreSQL statement takes (5,000 rows); the latest fetch time wins.
async fn usage_story(backend: Backend) {
    let (_db, store) = store(backend).await;
    let minute = time::macros::datetime!(2026-11-29 10:00 UTC);
    let batch = |count: i64, second: i64| -> Vec<KeyFetchTally> {
        (0..12_001)
            .map(|i| KeyFetchTally {
                token_id: format!("tok_{i}"),
                tenant_id: tenant("ten_usage"),
                window_start: minute,
                fetch_count: count + i % 3,
                last_fetched_at: minute + time::Duration::seconds(second),
            })
            .collect()
    };
    let calls = |count: i64| -> Vec<KeyFetchTally> {
        vec![KeyFetchTally {
            token_id: "tok_proxy".into(),
            tenant_id: tenant("ten_usage"),
            window_start: minute,
            fetch_count: count,
            last_fetched_at: minute + time::Duration::seconds(count),
        }]
    };
    store.record_usage(&batch(1, 30), &calls(2)).await.unwrap();
    store.record_usage(&batch(2, 10), &calls(5)).await.unwrap();
    store.record_usage(&[], &[]).await.unwrap();

    let stored = store.key_fetches(&tenant("ten_usage")).await.unwrap();
    assert_eq!(stored.len(), 12_001);
    for tally in &stored {
        let i: i64 = tally.token_id["tok_".len()..].parse().unwrap();
        assert_eq!(tally.fetch_count, 3 + 2 * (i % 3), "{}", tally.token_id);
        assert_eq!(tally.window_start, minute);
        // The earlier second batch does not move the latest fetch back.
        assert_eq!(tally.last_fetched_at, minute + time::Duration::seconds(30));
    }
    let proxied = store.stripe_calls(&tenant("ten_usage")).await.unwrap();
    assert_eq!(proxied.len(), 1);
    assert_eq!(proxied[0].fetch_count, 7);
    assert_eq!(
        proxied[0].last_fetched_at,
        minute + time::Duration::seconds(5)
    );
    assert!(store
        .key_fetches(&tenant("ten_other"))
        .await
        .unwrap()
        .is_empty());
}
