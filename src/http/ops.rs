//! Probes for orchestrators: open, and revealing nothing secret.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::domain::ConnectionStatus;

use super::error::{ErrorBody, ErrorDetail};
use super::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// Prometheus text format. Gauges that live in the database (connections by status, sealed
/// keys by master key: rewrap progress) are read at scrape time.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    match state.store.count_connections_by_status().await {
        Ok(counts) => {
            for status in ConnectionStatus::ALL {
                let n = counts
                    .iter()
                    .find(|(s, _)| *s == status)
                    .map_or(0, |(_, n)| *n);
                metrics::gauge!("atlas_connections", "status" => status.as_str()).set(n as f64);
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: could not count connections"),
    }
    match state.store.count_secrets_by_master_key().await {
        Ok(counts) => {
            for (master_key_id, n) in counts {
                metrics::gauge!("atlas_sealed_keys", "master_key_id" => master_key_id.as_str().to_owned())
                    .set(n as f64);
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: could not count sealed keys"),
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::metrics().render(),
    )
}

#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "The process serves")))]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when the database answers with every migration applied and the keyring opens
/// what it seals. The failing check is named; its detail goes to the log only.
/// Why a readiness check failed. The detail always goes to the log; it reaches the
/// unauthenticated caller only when `shown` (nothing secret, and actionable for ops).
struct CheckFailure {
    detail: String,
    shown: bool,
}

impl CheckFailure {
    fn private(detail: String) -> Self {
        Self {
            detail,
            shown: false,
        }
    }

    fn shown(detail: String) -> Self {
        Self {
            detail,
            shown: true,
        }
    }
}

#[utoipa::path(get, path = "/readyz", tag = "ops", responses(
    (status = 200, description = "Database and keyring ready"),
    (status = 503, description = "not_ready, naming the failed check in `checks`", body = ErrorBody),
))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let database = state
        .store
        .check_ready()
        .await
        .map_err(|e| CheckFailure::private(e.to_string()));
    let keyring = match state.keyring.self_test() {
        Err(e) => Err(CheckFailure::private(e.to_string())),
        Ok(()) => match crate::rotation::unknown_master_keys(&*state.store, &state.keyring).await {
            Ok(unknown) if unknown.is_empty() => Ok(()),
            // Master-key ids are not secret and tell ops what to add back.
            Ok(unknown) => Err(CheckFailure::shown(format!(
                "stored keys are sealed under master key {}, which the configuration lacks",
                unknown
                    .iter()
                    .map(|id| id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            // The database check reports an unreachable database.
            Err(_) => Ok(()),
        },
    };
    let mut failed = Vec::new();
    let mut checks = serde_json::Map::new();
    for (name, result) in [("database", &database), ("keyring", &keyring)] {
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
