//! The served OpenAPI description of this API (`GET /openapi.json`), generated from the
//! handlers' annotations so it cannot drift from the routes.

use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::{ErrorBody, ErrorDetail};
use super::state::AppState;
use super::summary::ConnectionSummary;
use super::{integrations, internal, notifications, ops, proxy, webhooks};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "atlas-stripe",
        description = "Connects an Atlas tenant's Stripe account: verifies a pasted key without side effects, seals it, and serves it to charging services. Beyond the HTTP contract in docs/API.md: extra error codes (endpoint_not_allowed, not_found, method_not_allowed, unsupported_media_type, payload_too_large, request_timeout, invalid_request, concurrent_change, service_unavailable, not_ready, internal_error) in the same error shape; the key fetch also returns `status`; an unknown tenant on connect is 404 not_connected, like a token for another tenant."
    ),
    paths(
        integrations::connect,
        integrations::show,
        integrations::verify,
        integrations::disconnect,
        internal::upsert_tenant,
        internal::fetch_key,
        internal::list_connections,
        notifications::list_notifications,
        notifications::redeliver,
        ops::healthz,
        ops::readyz,
        ops::metrics,
        webhooks::receive,
        internal::list_events,
        proxy::forward,
        openapi_json,
    ),
    components(schemas(ConnectionSummary, ErrorBody, ErrorDetail)),
    modifiers(&BearerSchemes),
    tags(
        (name = "integrations", description = "The integrations modal; tenant tokens (HS256 JWT with tenant_id and exp)"),
        (name = "internal", description = "Atlas's internal services; scoped service tokens"),
        (name = "ops", description = "Probes; open and revealing nothing secret"),
        (name = "webhooks", description = "Stripe's deliveries to the endpoint registered on each connected account"),
        (name = "proxy", description = "Charging services call Stripe through this service, which adds the tenant's key; scope stripe:call. Stripe's official SDKs work unchanged with the API base …/internal/v1/tenants/{tenant_id}/stripe and the service token as key: the caller's Stripe-Version is forwarded, and this route's own refusals add Stripe's error `type` beside `code`"),
    )
)]
pub struct ApiDoc;

struct BearerSchemes;

impl Modify for BearerSchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "tenant_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "service_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(openapi_json))
}

#[utoipa::path(get, path = "/openapi.json", tag = "ops", responses((status = 200, description = "This document", body = Object)))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
