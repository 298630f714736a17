//! Benchmark-only (feature `bench`): the floor a key fetch is measured against.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use super::error::ApiError;
use super::extract::TenantPath;
use super::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/bench/pk-select/{tenant_id}", get(pk_select))
}

/// One primary-key SELECT through the same pool the key fetch uses.
async fn pk_select(
    State(state): State<AppState>,
    TenantPath(tenant): TenantPath,
) -> Result<StatusCode, ApiError> {
    match state
        .store
        .find_tenant(&tenant)
        .await
        .map_err(ApiError::internal)?
    {
        Some(_) => Ok(StatusCode::NO_CONTENT),
        None => Err(ApiError::NotConnected),
    }
}
