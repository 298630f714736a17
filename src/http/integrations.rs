//! Routes for the integrations modal, authorised by a tenant token.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use secrecy::SecretString;
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{AppJson, AuthorizedTenant};
use super::state::AppState;
use super::summary::ConnectionSummary;
use crate::store::{Actor, SaveOutcome};

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/tenants/{tenant_id}/stripe/connection",
            post(connect).get(show).delete(disconnect),
        )
        .route(
            "/v1/tenants/{tenant_id}/stripe/connection/verify",
            post(verify),
        )
}

#[derive(Deserialize)]
struct ConnectBody {
    api_key: SecretString,
}

async fn connect(
    State(state): State<AppState>,
    AuthorizedTenant(tenant): AuthorizedTenant,
    AppJson(body): AppJson<ConnectBody>,
) -> Result<(StatusCode, Json<ConnectionSummary>), ApiError> {
    let actor = Actor::Tenant(tenant.clone());
    let outcome = state
        .connections
        .connect(&tenant, &body.api_key, &actor)
        .await?;
    Ok(match outcome {
        SaveOutcome::Created(record) => (StatusCode::CREATED, Json((&record).into())),
        SaveOutcome::Replaced(record) => (StatusCode::OK, Json((&record).into())),
    })
}

async fn show(
    State(state): State<AppState>,
    AuthorizedTenant(tenant): AuthorizedTenant,
) -> Result<Json<ConnectionSummary>, ApiError> {
    let record = state
        .store
        .find_connection(&tenant)
        .await
        .map_err(ApiError::internal)?
        .ok_or(ApiError::NotConnected)?;
    Ok(Json((&record).into()))
}

async fn verify(
    State(state): State<AppState>,
    AuthorizedTenant(tenant): AuthorizedTenant,
) -> Result<Json<ConnectionSummary>, ApiError> {
    let actor = Actor::Tenant(tenant.clone());
    let record = state.connections.verify(&tenant, &actor).await?;
    Ok(Json((&record).into()))
}

async fn disconnect(
    State(state): State<AppState>,
    AuthorizedTenant(tenant): AuthorizedTenant,
) -> Result<StatusCode, ApiError> {
    let actor = Actor::Tenant(tenant.clone());
    if state
        .store
        .delete_connection(&tenant, &actor)
        .await
        .map_err(ApiError::internal)?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotConnected)
    }
}
