use crate::backend_tests;
use crate::helpers::{assert_error, eventually, json, spawn_app, Backend};

backend_tests!(
    health_and_readiness_answer,
    unknown_routes_and_methods_get_our_error_shape,
    request_ids_are_kept_or_made
);

async fn health_and_readiness_answer(backend: Backend) {
    let app = spawn_app(backend).await;
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body = json(ready).await;
    assert_eq!(body["checks"]["database"], "ok");
    assert_eq!(body["checks"]["keyring"], "ok");
}

async fn unknown_routes_and_methods_get_our_error_shape(backend: Backend) {
    let app = spawn_app(backend).await;
    let missing = app.http.get(app.url("/v2/nothing")).send().await.unwrap();
    assert_error(missing, 404, "not_found").await;
    let wrong_method = app.http.put(app.url("/healthz")).send().await.unwrap();
    assert_error(wrong_method, 405, "method_not_allowed").await;
}

async fn request_ids_are_kept_or_made(backend: Backend) {
    let app = spawn_app(backend).await;
    let kept = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", "atlas-upstream-42")
        .send()
        .await
        .unwrap();
    assert_eq!(kept.headers()["x-request-id"], "atlas-upstream-42");
    // A header that is not plain is replaced, not echoed.
    let replaced = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", "a b<script>")
        .send()
        .await
        .unwrap();
    let id = replaced.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(id.starts_with("req_") && id.len() == 24, "{id}");
}

#[tokio::test]
async fn readiness_fails_naming_the_database_when_postgres_is_gone() {
    let app = spawn_app(Backend::Postgres).await;
    let name = app.db.url.rsplit('/').next().unwrap().to_owned();
    let mut admin =
        <sqlx::PgConnection as sqlx::Connection>::connect(&crate::helpers::postgres_admin_url())
            .await
            .unwrap();
    // Drop the app's database under it (WITH FORCE ends its connections).
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
    let ready = || async { app.http.get(app.url("/readyz")).send().await.unwrap() };
    eventually("readiness sees the database gone", || async {
        ready().await.status() == 503
    })
    .await;
    let body = assert_error(ready().await, 503, "not_ready").await;
    assert_eq!(body["error"]["checks"]["database"], "failed");
    assert_eq!(body["error"]["checks"]["keyring"], "ok");
    assert!(
        !body.to_string().contains(&name),
        "no detail leaks to the caller: {body}"
    );
}

/// The served description lists every route the contract names, and every path it lists
/// is routed (so the two cannot drift apart).
#[tokio::test]
async fn the_openapi_description_matches_the_routes() {
    let app = spawn_app(Backend::Sqlite).await;
    let doc = json(app.http.get(app.url("/openapi.json")).send().await.unwrap()).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let mut documented: Vec<String> = Vec::new();
    for (path, operations) in paths {
        for method in operations.as_object().unwrap().keys() {
            documented.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    documented.sort();
    assert_eq!(
        documented,
        [
            "DELETE /internal/v1/tenants/{tenant_id}/stripe/v1/{path}",
            "DELETE /v1/tenants/{tenant_id}/stripe/connection",
            "GET /healthz",
            "GET /internal/v1/connections",
            "GET /internal/v1/notifications",
            "GET /internal/v1/tenants/{tenant_id}/stripe/events",
            "GET /internal/v1/tenants/{tenant_id}/stripe/key",
            "GET /internal/v1/tenants/{tenant_id}/stripe/v1/{path}",
            "GET /metrics",
            "GET /openapi.json",
            "GET /readyz",
            "GET /v1/tenants/{tenant_id}/stripe/connection",
            "POST /internal/v1/notifications/{id}/redeliver",
            "POST /internal/v1/tenants/{tenant_id}/stripe/v1/{path}",
            "POST /v1/tenants/{tenant_id}/stripe/connection",
            "POST /v1/tenants/{tenant_id}/stripe/connection/verify",
            "POST /webhooks/stripe/{connection_id}",
            "PUT /internal/v1/tenants/{tenant_id}",
        ]
    );
    for operation in &documented {
        let (method, path) = operation.split_once(' ').unwrap();
        let response = app
            .http
            .request(
                method.parse().unwrap(),
                app.url(&path.replace("{tenant_id}", "ten_1")),
            )
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let code = if status >= 400 {
            json(response).await["error"]["code"].clone()
        } else {
            serde_json::Value::Null
        };
        assert!(
            code != "not_found" && code != "method_not_allowed",
            "{operation} is not routed: {code}"
        );
    }
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["tenant_token"]["scheme"], "bearer");
    assert_eq!(schemes["service_token"]["scheme"], "bearer");
    assert!(
        doc["components"]["schemas"]["ConnectionSummary"]["properties"]["key_last4"].is_object()
    );
}
