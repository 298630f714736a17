//! Probes for orchestrators: open, and revealing nothing secret.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Value};

use super::error::{ErrorBody, ErrorDetail};
use super::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// Prometheus text format. The gauges that live in the database (connections by status,
/// sealed keys by master key: rewrap progress) come from the health snapshot, refreshed in
/// the background: a scrape never reaches the database.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses(
    (status = 200, description = "Prometheus text format, version 0.0.4", body = String, content_type = "text/plain"),
))]
pub async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::metrics().render(),
    )
}

/// `/healthz`: the process serves.
// `deny_unknown_fields` only closes the schemas below (`additionalProperties: false`).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[schema(value_type = HealthStatus)]
    status: &'static str,
}

/// Always `ok`.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum HealthStatus {
    Ok,
}

/// `/readyz` when every check passed (schema only: the handler builds it as JSON).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Readiness {
    #[schema(value_type = ReadyStatus)]
    status: String,
    checks: ReadinessChecks,
}

/// Always `ready`.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum ReadyStatus {
    Ready,
}

/// Each readiness check and its verdict.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct ReadinessChecks {
    /// The database answered with every migration applied.
    #[schema(value_type = HealthStatus)]
    database: String,
    /// Every configured master key sealed and opened a canary, and no stored secret needs a
    /// master key the configuration lacks.
    #[schema(value_type = HealthStatus)]
    keyring: String,
}

#[utoipa::path(get, path = "/healthz", tag = "ops", responses(
    (status = 200, description = "The process serves", body = Health),
))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Ready when the database answered with every migration applied and the keyring opened
/// what it sealed, at the last look (at most `server.health_refresh_ms` ago). The failing
/// check is named; its detail goes to the log only, unless it is safe and actionable.
#[utoipa::path(get, path = "/readyz", tag = "ops", responses(
    (status = 200, description = "Database and keyring ready", body = Readiness),
    (status = 503, description = "not_ready, with each check's verdict in `checks`", body = ErrorBody),
))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let snapshot = state.health.snapshot();
    let (database, keyring) = (&snapshot.database, &snapshot.keyring);
    let mut failed = Vec::new();
    let mut checks = serde_json::Map::new();
    for (name, result) in [("database", database), ("keyring", keyring)] {
        let verdict = match result {
            Ok(()) => "ok".to_owned(),
            Err(failure) => {
                tracing::warn!(check = name, detail = %failure.detail, "readiness check failed");
                failed.push(name);
                if failure.shown {
                    format!("failed: {}", failure.detail)
                } else {
                    "failed".to_owned()
                }
            }
        };
        checks.insert(name.to_owned(), json!(verdict));
    }
    if failed.is_empty() {
        return (
            StatusCode::OK,
            Json(json!({"status": "ready", "checks": checks})),
        );
    }
    let mut detail = ErrorDetail::new(
        "not_ready",
        format!("Not ready: the {} check failed.", failed.join(" and ")),
    );
    detail.checks = Some(Value::Object(checks));
    let body = serde_json::to_value(ErrorBody { error: detail }).unwrap_or_default();
    (StatusCode::SERVICE_UNAVAILABLE, Json(body))
}
