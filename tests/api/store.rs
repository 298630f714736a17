//! The store story, run against both backends through the `Store` trait alone.

use std::collections::BTreeSet;

use atlas_stripe::auth::{IssuedServiceToken, Scope};
use atlas_stripe::crypto::SealedSecret;
use atlas_stripe::domain::{
    Access, ConnectionStatus, KeyKind, Mode, PermissionReport, Resource, TenantId, Warning,
};
use atlas_stripe::store::{
    Actor, NewConnection, NewServiceToken, SaveOutcome, Store, StoreError, TenantWrite,
    Verification,
};

use crate::backend_tests;
use crate::helpers::{Backend, TestDatabase};

backend_tests!(tenant_story, service_token_story, connection_story);

async fn store(backend: Backend) -> (TestDatabase, std::sync::Arc<dyn Store>) {
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
    // Concurrent creates of one tenant: exactly one is Created.
    let other = tenant("ten_2");
    let results = futures_util::future::join_all(
        (0..4).map(|_| store.upsert_tenant(&other, Mode::Test, &Actor::Cli)),
    )
    .await;
    let created = results
        .iter()
        .filter(|r| matches!(r, Ok(TenantWrite::Created)))
        .count();
    assert_eq!(created, 1, "{results:?}");
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

fn new_connection(tenant_id: &str, mode: Mode, secret_id: &str) -> NewConnection {
    NewConnection {
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

    let SaveOutcome::Created(created) = store
        .save_connection(&new_connection("ten_1", Mode::Test, "sec_1"), &Actor::Cli)
        .await
        .unwrap()
    else {
        panic!("first save creates");
    };
    let found = store.find_connection(&t).await.unwrap().unwrap();
    assert_eq!(found.connection_id, created.connection_id);
    assert_eq!(found.sealed, created.sealed);
    assert_eq!(found.permissions, report(&[]));
    assert_eq!(found.warnings, vec![Warning::SecretKeyFullAccess]);
    assert_eq!(
        found.connected_at, created.connected_at,
        "timestamps round-trip exactly"
    );

    let SaveOutcome::Replaced(replaced) = store
        .save_connection(&new_connection("ten_1", Mode::Test, "sec_2"), &Actor::Cli)
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
    let verification = Verification {
        status: ConnectionStatus::NeedsAttention,
        permissions: report(&[Resource::Coupons]),
        verified_at: time::OffsetDateTime::now_utc(),
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

    assert_eq!(store.list_connections(None).await.unwrap().len(), 1);
    assert_eq!(
        store
            .list_connections(Some(ConnectionStatus::NeedsAttention))
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(store
        .list_connections(Some(ConnectionStatus::Active))
        .await
        .unwrap()
        .is_empty());

    assert!(store.delete_connection(&t, &Actor::Cli).await.unwrap());
    assert!(!store.delete_connection(&t, &Actor::Cli).await.unwrap());
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
