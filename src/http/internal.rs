//! Routes for Atlas's internal services, authorised by scoped service tokens.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{AppJson, ServiceCaller, TenantPath};
use super::state::AppState;
use super::summary::ConnectionSummary;
use crate::auth::Scope;
use crate::domain::{ConnectionStatus, Mode};
use crate::store::{Actor, StoreError, TenantWrite};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/internal/v1/tenants/{tenant_id}", put(upsert_tenant))
        .route("/internal/v1/connections", get(list_connections))
}

#[derive(Deserialize)]
struct TenantBody {
    mode: String,
}

async fn upsert_tenant(
    State(state): State<AppState>,
    caller: ServiceCaller,
    TenantPath(tenant): TenantPath,
    AppJson(body): AppJson<TenantBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Scope::TenantsWrite)?;
    let mode = Mode::parse(&body.mode).map_err(|e| ApiError::InvalidRequest(format!("{e}.")))?;
    let actor = Actor::ServiceToken(caller.token_id);
    let status = match state.store.upsert_tenant(&tenant, mode, &actor).await {
        Ok(TenantWrite::Created) => StatusCode::CREATED,
        Ok(TenantWrite::Updated | TenantWrite::Unchanged) => StatusCode::OK,
        Err(StoreError::TenantHasConnection) => return Err(ApiError::TenantHasConnection),
        Err(e) => return Err(ApiError::internal(e)),
    };
    Ok((status, Json(json!({"tenant_id": tenant, "mode": mode}))))
}

#[derive(Deserialize)]
struct ConnectionsQuery {
    status: Option<String>,
}

async fn list_connections(
    State(state): State<AppState>,
    caller: ServiceCaller,
    Query(query): Query<ConnectionsQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::OpsRead)?;
    let status = match query.status.as_deref() {
        None => None,
        Some(raw) => Some(ConnectionStatus::parse(raw).ok_or_else(|| {
            ApiError::InvalidRequest(
                "status must be active, needs_attention or revoked.".to_owned(),
            )
        })?),
    };
    let records = state
        .store
        .list_connections(status)
        .await
        .map_err(ApiError::internal)?;
    let summaries: Vec<ConnectionSummary> = records.iter().map(Into::into).collect();
    Ok(Json(json!({ "connections": summaries })))
}
