//! Probes for orchestrators: open, and revealing nothing secret.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
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
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::metrics().render(),
    )
}

#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "The process serves")))]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when the database answered with every migration applied and the keyring opened
/// what it sealed, at the last look (at most `server.health_refresh_ms` ago). The failing
/// check is named; its detail goes to the log only, unless it is safe and actionable.
#[utoipa::path(get, path = "/readyz", tag = "ops", responses(
    (status = 200, description = "Database and keyring ready"),
    (status = 503, description = "not_ready, naming the failed check in `checks`", body = ErrorBody),
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
