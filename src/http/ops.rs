//! Probes for orchestrators: open, and revealing nothing secret.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::{ErrorBody, ErrorDetail};
use super::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "The process serves")))]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when the database answers with every migration applied and the keyring opens
/// what it seals. The failing check is named; its detail goes to the log only.
#[utoipa::path(get, path = "/readyz", tag = "ops", responses(
    (status = 200, description = "Database and keyring ready"),
    (status = 503, description = "not_ready, naming the failed check in `checks`", body = ErrorBody),
))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let database = state.store.check_ready().await;
    let keyring = state.keyring.self_test().map_err(|e| e.to_string());
    let mut failed = Vec::new();
    let mut checks = serde_json::Map::new();
    for (name, result) in [("database", &database), ("keyring", &keyring)] {
        let verdict = match result {
            Ok(()) => "ok",
            Err(detail) => {
                tracing::warn!(check = name, detail = %detail, "readiness check failed");
                failed.push(name);
                "failed"
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
