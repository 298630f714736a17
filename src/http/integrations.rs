//! Routes for the integrations modal, authorised by a tenant token.

use axum::extract::State;
use std::time::Duration;

use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use secrecy::SecretString;
use serde::Deserialize;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::error::{ApiError, ErrorBody};
use super::extract::{AppJson, AuthorizedTenant};
use super::state::AppState;
use super::summary::{ConnectionSummary, TenantIdSchema};
use crate::store::{Actor, ConnectionRecord, SaveOutcome};

/// The tenant-facing routes. With `cors_allowed_origins`, exactly those browser origins may
/// call them with a tenant token: only the methods and headers these routes use, no
/// cookies. No other route answers a CORS preflight.
pub fn router(cors_allowed_origins: &[HeaderValue]) -> Router<AppState> {
    let origins = cors_allowed_origins.to_vec();
    let connection = post(connect).get(show).delete(disconnect);
    let verification = post(verify);
    if origins.is_empty() {
        return Router::new()
            .route("/v1/tenants/{tenant_id}/stripe/connection", connection)
            .route(
                "/v1/tenants/{tenant_id}/stripe/connection/verify",
                verification,
            );
    }
    // OPTIONS must reach the route for the CORS layer to answer the preflight; an OPTIONS
    // that is not a preflight gets what it got before.
    let not_a_preflight = || async { ApiError::MethodNotAllowed };
    Router::new()
        .route(
            "/v1/tenants/{tenant_id}/stripe/connection",
            connection.options(not_a_preflight),
        )
        .route(
            "/v1/tenants/{tenant_id}/stripe/connection/verify",
            verification.options(not_a_preflight),
        )
        .layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins.clone()))
                .allow_methods([Method::GET, Method::POST, Method::DELETE])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, REQUEST_ID])
                .expose_headers([REQUEST_ID, header::RETRY_AFTER])
                .allow_credentials(false)
                .max_age(Duration::from_secs(600)),
        )
        // Outermost: tower-http answers every OPTIONS as a preflight, with the allowed
        // methods and headers, whatever its Origin. Only a configured origin gets one.
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                let allowed = (request.method() != Method::OPTIONS)
                    || (request.headers().get(header::ORIGIN))
                        .is_some_and(|origin| origins.contains(origin));
                async move {
                    if allowed {
                        next.run(request).await
                    } else {
                        ApiError::MethodNotAllowed.into_response()
                    }
                }
            },
        ))
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The modal's Activate.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct ConnectBody {
    /// A restricted (`rk_test_`, `rk_live_`) or secret (`sk_test_`, `sk_live_`) key
    /// (surrounding whitespace is trimmed). Anything else is 400: `pk_…`, `whsec_…` and
    /// organization keys each with a code of their own, the rest `invalid_api_key_format`.
    #[schema(value_type = String, pattern = "^(rk|sk)_(test|live)_[A-Za-z0-9]{10,247}$", example = "rk_test_51AtlasExampleKey0000Kgd1")]
    api_key: SecretString,
}

#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/stripe/connection", tag = "integrations",
    security(("tenant_token" = [])),
    params(("tenant_id" = TenantIdSchema, Path, description = "The tenant the token speaks for", example = "ten_0")),
    request_body = ConnectBody,
    responses(
        (status = 201, description = "Connected", body = ConnectionSummary),
        (status = 200, description = "Replaced the previous key", body = ConnectionSummary),
        (status = 400, description = "invalid_api_key_format, publishable_key_not_accepted, webhook_secret_not_accepted, organization_key_not_supported; invalid_json (not JSON, or the wrong shape); invalid_request (the tenant id does not parse)", body = ErrorBody),
        (status = 401, description = "unauthenticated", body = ErrorBody),
        (status = 404, description = "not_connected (unknown tenant, or a token for another tenant); not_found (the path is not UTF-8 once decoded)", body = ErrorBody),
        (status = 408, description = "request_timeout: the body did not arrive within server.body_read_timeout_ms", body = ErrorBody),
        (status = 409, description = "concurrent_change: another connect or disconnect of this tenant committed meanwhile; nothing of this request was kept (retryable)", body = ErrorBody),
        (status = 413, description = "payload_too_large: the body is larger than server.body_limit_bytes", body = ErrorBody),
        (status = 415, description = "unsupported_media_type: the body was not sent as application/json", body = ErrorBody),
        (status = 422, description = "mode_mismatch (with tenant_mode and key_mode), key_rejected, missing_permissions (with missing and fix_url), webhook_registration_failed", body = ErrorBody),
        (status = 429, description = "rate_limited (with retryable and retry_after)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until an attempt is allowed"))),
        (status = 502, description = "stripe_unavailable (retryable); nothing was stored", body = ErrorBody),
        (status = 503, description = "service_unavailable: the database cannot be reached (retryable); nothing was changed; overloaded: the request bodies in flight would exceed server.inflight_body_bytes (retryable), answered before the body is read", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ))]
pub async fn connect(
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
        SaveOutcome::Created(record) => {
            (StatusCode::CREATED, Json(summarize(&state, &record).await?))
        }
        SaveOutcome::Replaced(record) => (StatusCode::OK, Json(summarize(&state, &record).await?)),
    })
}

/// The summary of a connection with what its recovery cursor says of events.
async fn summarize(
    state: &AppState,
    record: &ConnectionRecord,
) -> Result<ConnectionSummary, ApiError> {
    let summary = ConnectionSummary::from(record);
    let cursor = state
        .store
        .find_recovery_cursor(&record.connection_id)
        .await?;
    Ok(match cursor {
        Some(cursor) => summary.with_recovery(
            &cursor,
            crate::connection::fix_url(record.mode, state.connections.required()),
        ),
        None => summary,
    })
}

#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/stripe/connection", tag = "integrations",
    security(("tenant_token" = [])),
    params(("tenant_id" = TenantIdSchema, Path, description = "The tenant the token speaks for", example = "ten_0")),
    responses(
        (status = 200, description = "The connection", body = ConnectionSummary),
        (status = 400, description = "invalid_request: the tenant id does not parse", body = ErrorBody),
        (status = 401, description = "unauthenticated", body = ErrorBody),
        (status = 404, description = "not_connected (no connection, unknown tenant, or a token for another tenant); not_found (the path is not UTF-8 once decoded)", body = ErrorBody),
        (status = 503, description = "service_unavailable: the database cannot be reached (retryable)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ))]
pub async fn show(
    State(state): State<AppState>,
    AuthorizedTenant(tenant): AuthorizedTenant,
) -> Result<Json<ConnectionSummary>, ApiError> {
    let record = state
        .store
        .find_connection(&tenant)
        .await?
        .ok_or(ApiError::NotConnected)?;
    Ok(Json(summarize(&state, &record).await?))
}

#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/stripe/connection/verify", tag = "integrations",
    security(("tenant_token" = [])),
    params(("tenant_id" = TenantIdSchema, Path, description = "The tenant the token speaks for", example = "ten_0")),
    responses(
        (status = 200, description = "Re-probed; the status may have changed. Concurrent verifies of one tenant share one probe run.", body = ConnectionSummary),
        (status = 400, description = "invalid_request: the tenant id does not parse", body = ErrorBody),
        (status = 401, description = "unauthenticated", body = ErrorBody),
        (status = 404, description = "not_connected (no connection, unknown tenant, or a token for another tenant); not_found (the path is not UTF-8 once decoded)", body = ErrorBody),
        (status = 429, description = "rate_limited: too many verify runs for this tenant (limits.verify_attempts_per_minute)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a verify run is allowed"))),
        (status = 502, description = "stripe_unavailable (retryable); nothing changed", body = ErrorBody),
        (status = 503, description = "service_unavailable: the database cannot be reached (retryable); nothing changed", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ))]
pub async fn verify(
    State(state): State<AppState>,
    AuthorizedTenant(tenant): AuthorizedTenant,
) -> Result<Json<ConnectionSummary>, ApiError> {
    let actor = Actor::Tenant(tenant.clone());
    let record = state.connections.verify_on_demand(&tenant, &actor).await?;
    Ok(Json(summarize(&state, &record).await?))
}

#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/stripe/connection", tag = "integrations",
    security(("tenant_token" = [])),
    params(("tenant_id" = TenantIdSchema, Path, description = "The tenant the token speaks for", example = "ten_0")),
    responses(
        (status = 204, description = "Disconnected; the sealed key is deleted",
            headers(("atlas-stripe-cleanup" = String, description = "What became of our webhook endpoint on Stripe: deleted, already_gone, not_ours (left alone), not_needed or failed"))),
        (status = 400, description = "invalid_request: the tenant id does not parse", body = ErrorBody),
        (status = 401, description = "unauthenticated", body = ErrorBody),
        (status = 404, description = "not_connected (no connection, unknown tenant, or a token for another tenant); not_found (the path is not UTF-8 once decoded)", body = ErrorBody),
        (status = 409, description = "concurrent_change: a connect of this tenant kept replacing the connection meanwhile (retryable)", body = ErrorBody),
        (status = 503, description = "service_unavailable: the database cannot be reached (retryable)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ))]
pub async fn disconnect(
    State(state): State<AppState>,
    AuthorizedTenant(tenant): AuthorizedTenant,
) -> Result<Response, ApiError> {
    let actor = Actor::Tenant(tenant.clone());
    let cleanup = state.connections.disconnect(&tenant, &actor).await?;
    // 204 has no body: whether our endpoint on Stripe is gone travels in a header.
    Ok((
        StatusCode::NO_CONTENT,
        [("atlas-stripe-cleanup", cleanup.as_str())],
    )
        .into_response())
}
