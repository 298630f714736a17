use atlas_stripe::auth::Scope;
use atlas_stripe::domain::TenantId;
use serde_json::json;

use crate::backend_tests;
use crate::helpers::{assert_error, json, spawn_app, Backend, TestApp};
use crate::stripe_mock::{answer_all, key, Answer};

backend_tests!(
    tenants_are_created_then_updated,
    the_mode_cannot_change_under_a_connected_key,
    bad_tenant_input_is_a_clear_400,
    malformed_bodies_get_our_error_shape,
);

async fn put(
    app: &TestApp,
    token: &str,
    tenant: &str,
    body: serde_json::Value,
) -> reqwest::Response {
    app.http
        .put(app.url(&format!("/internal/v1/tenants/{tenant}")))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn tenants_are_created_then_updated(backend: Backend) {
    let app = spawn_app(backend).await;
    let token = app.service_token(&[Scope::TenantsWrite]).await;
    let created = put(&app, &token, "ten_123", json!({"mode": "test"})).await;
    assert_eq!(created.status(), 201);
    assert_eq!(
        json(created).await,
        json!({"tenant_id": "ten_123", "mode": "test"})
    );
    let same = put(&app, &token, "ten_123", json!({"mode": "test"})).await;
    assert_eq!(same.status(), 200);
    let changed = put(&app, &token, "ten_123", json!({"mode": "live"})).await;
    assert_eq!(changed.status(), 200);
    assert_eq!(json(changed).await["mode"], "live");
    let stored = app
        .store
        .find_tenant(&TenantId::parse("ten_123").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.mode.as_str(), "live");
    let actions: Vec<String> = app
        .store
        .audit_trail(Some(&stored.tenant_id))
        .await
        .unwrap()
        .into_iter()
        .map(|a| format!("{} {}", a.action, a.detail["mode"]))
        .collect();
    assert_eq!(
        actions,
        ["tenant.created \"test\"", "tenant.mode_changed \"live\""]
    );
}

async fn the_mode_cannot_change_under_a_connected_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let token = app.service_token(&[Scope::TenantsWrite]).await;
    assert_eq!(
        put(&app, &token, "ten_1", json!({"mode": "test"}))
            .await
            .status(),
        201
    );
    answer_all(&app.stripe, Answer::Granted).await;
    assert_eq!(
        app.connect("ten_1", &key("rk_test_", "Kgd1"))
            .await
            .status(),
        201
    );
    assert_error(
        put(&app, &token, "ten_1", json!({"mode": "live"})).await,
        409,
        "tenant_has_connection",
    )
    .await;
    // Re-asserting the same mode is fine.
    assert_eq!(
        put(&app, &token, "ten_1", json!({"mode": "test"}))
            .await
            .status(),
        200
    );
}

async fn bad_tenant_input_is_a_clear_400(backend: Backend) {
    let app = spawn_app(backend).await;
    let token = app.service_token(&[Scope::TenantsWrite]).await;
    assert_error(
        put(&app, &token, "ten_1", json!({"mode": "prod"})).await,
        400,
        "invalid_request",
    )
    .await;
    assert_error(
        put(&app, &token, "ten_1", json!({"mode": 1})).await,
        400,
        "invalid_json",
    )
    .await;
    let body = assert_error(
        put(&app, &token, "ten_1", json!({})).await,
        400,
        "invalid_json",
    )
    .await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"mode\""),
        "{body}"
    );
    let long = "t".repeat(65);
    for bad in [long.as_str(), "ten%20x", "ten%2Fx", ".hidden", "ten%C3%A9"] {
        assert_error(
            put(&app, &token, bad, json!({"mode": "test"})).await,
            400,
            "invalid_request",
        )
        .await;
    }
}

async fn malformed_bodies_get_our_error_shape(backend: Backend) {
    let app = spawn_app(backend).await;
    let token = app.service_token(&[Scope::TenantsWrite]).await;
    let url = app.url("/internal/v1/tenants/ten_1");
    let send = |body: Vec<u8>, content_type: &'static str| {
        app.http
            .put(url.clone())
            .bearer_auth(&token)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    assert_error(
        send(b"{\"mode\": ".to_vec(), "application/json")
            .await
            .unwrap(),
        400,
        "invalid_json",
    )
    .await;
    assert_error(
        send(b"mode=test".to_vec(), "application/x-www-form-urlencoded")
            .await
            .unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    let oversize = format!(
        "{{\"mode\": \"test\", \"pad\": \"{}\"}}",
        "x".repeat(20_000)
    );
    assert_error(
        send(oversize.into_bytes(), "application/json")
            .await
            .unwrap(),
        413,
        "payload_too_large",
    )
    .await;
    // A value that looks like a key is never echoed back in an error.
    let secretish = key("sk_live_", "Zz99");
    let body = assert_error(
        put(&app, &token, "ten_1", json!({"mode": secretish})).await,
        400,
        "invalid_request",
    )
    .await;
    assert!(!body.to_string().contains(&secretish));
    // The connect route parses the same way.
    let response = app
        .http
        .post(app.url(&TestApp::connection_path("ten_1")))
        .bearer_auth(app.tenant_token("ten_1"))
        .json(&json!({"api_key": 5}))
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "invalid_json").await;
}
