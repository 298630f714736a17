//! Routes for Atlas's internal services, authorised by scoped service tokens.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorBody};
use super::extract::{
    parse_tenant_path, AppJson, AppQuery, EventsRead, EventsWrite, OpsRead, OptionalAppJson,
    ServiceCaller, TenantPath, TenantsWrite,
};
use super::paging::{link_next, page_limit};
use super::state::AppState;
use super::summary::{ConnectionSummary, KeyType, TenantIdSchema};
use crate::auth::{PresentedServiceToken, Scope};
use crate::domain::{ConnectionStatus, Mode, TenantId};
use crate::store::{Actor, EventCursor, TenantWrite};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/internal/v1/tenants/{tenant_id}", put(upsert_tenant))
        .route(
            "/internal/v1/tenants/{tenant_id}/stripe/key",
            get(fetch_key),
        )
        .route("/internal/v1/connections", get(list_connections))
        .route(
            "/internal/v1/tenants/{tenant_id}/stripe/events",
            get(list_events),
        )
        .route(
            "/internal/v1/tenants/{tenant_id}/stripe/events/recover",
            post(recover_events),
        )
}

/// Where a recovery should start.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecoverBody {
    /// RFC 3339; at most 30 days ago (Stripe's retention). Omit to start where the last
    /// recovery ended.
    #[schema(value_type = Option<String>, format = DateTime, example = "2026-11-01T00:00:00Z", nullable = false)]
    #[serde(default, with = "time::serde::rfc3339::option")]
    since: Option<time::OffsetDateTime>,
}

/// An accepted recovery: it runs in the background and its result is announced.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecoveryAccepted {
    #[schema(example = "rcv_8Hq2mXv0c9LrT4aZpQ1w")]
    recovery_id: String,
    /// Where it starts: `since` when given, never later than where the last recovery ended.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    since: time::OffsetDateTime,
}

#[utoipa::path(post, path = "/internal/v1/tenants/{tenant_id}/stripe/events/recover", tag = "internal",
    security(("service_token" = ["events:write"])),
    params(("tenant_id" = TenantIdSchema, Path, example = "ten_0")),
    request_body(content = Option<RecoverBody>, description = "Optional; `{}` or no body starts where the last recovery ended", content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted: the tenant's events are listed from Stripe's event log since `since`, in the background", body = RecoveryAccepted),
        (status = 400, description = "invalid_request (the tenant id does not parse); invalid_json (not JSON, or the wrong shape)", body = ErrorBody),
        (status = 401, description = "unauthenticated", body = ErrorBody),
        (status = 403, description = "insufficient_scope", body = ErrorBody),
        (status = 404, description = "not_connected (no connection, or no such tenant); not_found (the path is not UTF-8 once decoded)", body = ErrorBody),
        (status = 408, description = "request_timeout: the body did not arrive within server.body_read_timeout_ms", body = ErrorBody),
        (status = 409, description = "event_recovery_off: the key may not read Events", body = ErrorBody),
        (status = 413, description = "payload_too_large: the body is larger than server.body_limit_bytes", body = ErrorBody),
        (status = 415, description = "unsupported_media_type: a body was sent, but not as application/json", body = ErrorBody),
        (status = 422, description = "since_out_of_range: since is older than Stripe's 30-day retention", body = ErrorBody),
        (status = 503, description = "service_unavailable: the database cannot be reached (retryable); nothing was changed", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ))]
pub async fn recover_events(
    State(state): State<AppState>,
    caller: ServiceCaller<EventsWrite>,
    TenantPath(tenant): TenantPath,
    OptionalAppJson(body): OptionalAppJson<RecoverBody>,
) -> Result<(StatusCode, Json<RecoveryAccepted>), ApiError> {
    let since = body.and_then(|body| body.since);
    let requested = state.recovery.request(&tenant, since).await?;
    tracing::info!(token_id = %caller.token_id, recovery_id = %requested.recovery_id, "recovery of missed events accepted");
    Ok((
        StatusCode::ACCEPTED,
        Json(RecoveryAccepted {
            recovery_id: requested.recovery_id,
            since: requested.since,
        }),
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// The `next_cursor` of the previous page; omit (or leave empty) to start at the beginning.
    #[param(pattern = r"^([0-9]+\.[0-9]+)?$", nullable = false)]
    after: Option<String>,
    /// 1 to 500; 100 by default.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500, nullable = false, example = 100)]
    limit: Option<String>,
}

// `deny_unknown_fields` on the response types below only closes their schemas
// (`additionalProperties: false`): they are serialized, never deserialized.

/// Where a feed event came from: `webhook` (delivered to our endpoint) or `recovered`
/// (found in Stripe's event log after a missed delivery).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventSource {
    Webhook,
    Recovered,
}

impl EventSource {
    fn of(stored: &str) -> Self {
        if stored == crate::store::EventSource::Recovered.as_str() {
            Self::Recovered
        } else {
            Self::Webhook
        }
    }
}

/// One delivered (or recovered) event, in the tenant's feed order.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventView {
    /// Opaque: pass the last one's as `after`.
    #[schema(example = "812.40")]
    cursor: String,
    /// Stripe's event id.
    #[schema(example = "evt_1")]
    id: String,
    #[serde(rename = "type")]
    #[schema(example = "invoice.paid")]
    event_type: String,
    created: i64,
    livemode: bool,
    #[schema(pattern = "^con_[A-Za-z0-9]{1,60}$")]
    connection_id: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    received_at: time::OffsetDateTime,
    source: EventSource,
    /// The event exactly as Stripe sent it (a recovered one as Stripe lists it).
    #[schema(value_type = Object)]
    payload: Box<serde_json::value::RawValue>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventPage {
    events: Vec<EventView>,
    /// Pass as `after` for the next page; unchanged when there was nothing new.
    next_cursor: String,
}

#[utoipa::path(get, path = "/internal/v1/tenants/{tenant_id}/stripe/events", tag = "internal",
    security(("service_token" = ["events:read"])),
    params(("tenant_id" = TenantIdSchema, Path, example = "ten_0"), EventsQuery),
    responses(
        (status = 200, description = "Events after the cursor, oldest first (an unknown tenant has none)", body = EventPage),
        (status = 400, description = "invalid_request: the tenant id, cursor or limit does not parse, or the query string does not", body = ErrorBody),
        (status = 401, description = "unauthenticated", body = ErrorBody),
        (status = 403, description = "insufficient_scope", body = ErrorBody),
        (status = 404, description = "not_found: the path is not UTF-8 once decoded", body = ErrorBody),
        (status = 503, description = "service_unavailable: the database cannot be reached (retryable)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ))]
pub async fn list_events(
    State(state): State<AppState>,
    _caller: ServiceCaller<EventsRead>,
    TenantPath(tenant): TenantPath,
    AppQuery(query): AppQuery<EventsQuery>,
) -> Result<Json<EventPage>, ApiError> {
    let after = match query.after.as_deref() {
        None | Some("") => EventCursor::default(),
        Some(raw) => EventCursor::parse(raw).ok_or_else(|| {
            ApiError::InvalidRequest("after must be a cursor from a previous page.".into())
        })?,
    };
    let limit = match query.limit.as_deref() {
        None => 100,
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=500).contains(n))
            .ok_or_else(|| ApiError::InvalidRequest("limit must be 1 to 500.".into()))?,
    };
    let events = state.store.list_events(&tenant, after, limit).await?;
    let next_cursor = events.last().map_or(after, |e| e.cursor()).encode();
    let events = events
        .into_iter()
        .map(|e| {
            Ok(EventView {
                cursor: e.cursor().encode(),
                payload: serde_json::value::RawValue::from_string(e.payload)
                    .map_err(ApiError::internal)?,
                id: e.event_id,
                event_type: e.event_type,
                created: e.created,
                livemode: e.livemode,
                connection_id: e.connection_id,
                received_at: e.received_at,
                source: EventSource::of(&e.source),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Json(EventPage {
        events,
        next_cursor,
    }))
}

/// A tenant's decrypted key, for charging services.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyBody<'a> {
    #[schema(value_type = TenantIdSchema)]
    tenant_id: &'a TenantId,
    mode: Mode,
    #[schema(value_type = KeyType)]
    key_type: &'static str,
    /// `active` or `needs_attention` (a revoked key is never served).
    status: ConnectionStatus,
    #[schema(value_type = String, pattern = "^(rk|sk)_(test|live)_[A-Za-z0-9]{10,247}$")]
    api_key: &'a str,
}

/// The charging services' hot path: one database round trip (the sealed key, joined to the
/// token unless the token cache vouches for it), two AES-GCM opens, and accounting handed
/// to a background writer.
#[utoipa::path(get, path = "/internal/v1/tenants/{tenant_id}/stripe/key", tag = "internal",
    security(("service_token" = ["keys:read"])),
    params(("tenant_id" = TenantIdSchema, Path, example = "ten_0")),
    responses(
        (status = 200, description = "The key", body = KeyBody,
            headers(("Cache-Control" = String, description = "no-store"), ("Pragma" = String, description = "no-cache"))),
        (status = 400, description = "invalid_request: the tenant id does not parse", body = ErrorBody),
        (status = 401, description = "unauthenticated", body = ErrorBody),
        (status = 403, description = "insufficient_scope", body = ErrorBody),
        (status = 404, description = "not_connected (no connection, or no such tenant); not_found (the path is not UTF-8 once decoded)", body = ErrorBody),
        (status = 409, description = "connection_not_active: the connection is revoked", body = ErrorBody),
        (status = 503, description = "service_unavailable: the database cannot be reached, or this instance lacks the master key the key is sealed under (retryable)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ))]
pub async fn fetch_key(
    State(state): State<AppState>,
    presented: PresentedServiceToken,
    raw_tenant: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    if !state.key_fetch_enabled {
        // internal.key_fetch_enabled = false: the proxy is the only way to use a key.
        return Err(ApiError::RouteNotFound);
    }
    // A segment that is not UTF-8 once decoded gets the 404 the other tenant routes give it,
    // in our error shape (axum's own rejection is plain text).
    let parsed = match raw_tenant {
        Ok(Path(raw)) => parse_tenant_path(&raw),
        Err(_) => Err(ApiError::RouteNotFound),
    };
    let tenant = match parsed {
        Ok(tenant) => tenant,
        // Off the hot path: the token is judged (401, 403) before the parameter (400).
        Err(invalid) => {
            (state.service_tokens)
                .authenticate(&presented, Scope::KeysRead)
                .await?;
            return Err(invalid);
        }
    };
    tracing::Span::current().record("tenant_id", tenant.as_str());
    let key = state.keys.fetch(&presented, &tenant).await?;
    let body = serde_json::to_vec(&KeyBody {
        tenant_id: &tenant,
        mode: key.mode,
        key_type: key.key_type.as_str(),
        status: key.status,
        api_key: key.key.expose_secret(),
    })
    .map_err(ApiError::internal)?;
    // The response buffer is handed to hyper, which does not zeroise it: the plaintext
    // outlives this function only there, for as long as the write takes.
    Ok((
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
            (header::PRAGMA, "no-cache"),
        ],
        body,
    )
        .into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct TenantBody {
    /// Any other value is 400 `invalid_request`.
    #[schema(value_type = Mode, example = "test")]
    mode: String,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantView {
    #[schema(value_type = TenantIdSchema)]
    tenant_id: TenantId,
    mode: Mode,
}

#[utoipa::path(put, path = "/internal/v1/tenants/{tenant_id}", tag = "internal",
    security(("service_token" = ["tenants:write"])),
    params(("tenant_id" = TenantIdSchema, Path, example = "ten_0")),
    request_body = TenantBody,
    responses(
        (status = 201, description = "Created", body = TenantView),
        (status = 200, description = "Updated or unchanged", body = TenantView),
        (status = 400, description = "invalid_request (the tenant id does not parse, or a mode other than test or live); invalid_json (not JSON, or the wrong shape)", body = ErrorBody),
        (status = 401, description = "unauthenticated", body = ErrorBody),
        (status = 403, description = "insufficient_scope", body = ErrorBody),
        (status = 404, description = "not_found: the path is not UTF-8 once decoded", body = ErrorBody),
        (status = 408, description = "request_timeout: the body did not arrive within server.body_read_timeout_ms", body = ErrorBody),
        (status = 409, description = "tenant_has_connection: the mode would change while a key is connected", body = ErrorBody),
        (status = 413, description = "payload_too_large: the body is larger than server.body_limit_bytes", body = ErrorBody),
        (status = 415, description = "unsupported_media_type: the body was not sent as application/json", body = ErrorBody),
        (status = 503, description = "service_unavailable: the database cannot be reached (retryable); nothing was changed; overloaded: the request bodies in flight would exceed server.inflight_body_bytes (retryable), answered before the body is read", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ))]
pub async fn upsert_tenant(
    State(state): State<AppState>,
    caller: ServiceCaller<TenantsWrite>,
    TenantPath(tenant): TenantPath,
    AppJson(body): AppJson<TenantBody>,
) -> Result<(StatusCode, Json<TenantView>), ApiError> {
    let mode = Mode::parse(&body.mode).map_err(|e| ApiError::InvalidRequest(format!("{e}.")))?;
    let actor = Actor::ServiceToken(caller.token_id);
    let status = match state.store.upsert_tenant(&tenant, mode, &actor).await {
        Ok(TenantWrite::Created) => StatusCode::CREATED,
        Ok(TenantWrite::Updated | TenantWrite::Unchanged) => StatusCode::OK,
        Err(e) => return Err(e.into()),
    };
    Ok((
        status,
        Json(TenantView {
            tenant_id: tenant,
            mode,
        }),
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConnectionsQuery {
    /// Only connections with this status: `active`, `needs_attention` or `revoked`.
    #[param(value_type = Option<ConnectionStatus>, nullable = false, example = "active")]
    status: Option<String>,
    /// 1 to 1000; 500 by default.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000, nullable = false, example = 500)]
    limit: Option<String>,
    /// Start after this connection id (from the `Link` header of the previous page).
    #[param(pattern = "^(con_[A-Za-z0-9]{1,60})?$", nullable = false)]
    after: Option<String>,
}

const CONNECTIONS_PAGE: i64 = 500;

#[utoipa::path(get, path = "/internal/v1/connections", tag = "internal",
    security(("service_token" = ["ops:read"])),
    params(ConnectionsQuery),
    responses(
        (status = 200, body = Vec<ConnectionSummary>, description = "A page of connections in connection-id order; a full page names the next in `Link: <…>; rel=\"next\"` (RFC 8288)",
            headers(("Link" = String, description = "The next page, when there may be one"))),
        (status = 400, description = "invalid_request (unknown status, limit out of range, malformed after or query string)", body = ErrorBody),
        (status = 401, description = "unauthenticated", body = ErrorBody),
        (status = 403, description = "insufficient_scope", body = ErrorBody),
        (status = 503, description = "service_unavailable: the database cannot be reached (retryable)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ))]
pub async fn list_connections(
    State(state): State<AppState>,
    _caller: ServiceCaller<OpsRead>,
    AppQuery(query): AppQuery<ConnectionsQuery>,
) -> Result<Response, ApiError> {
    let status = match query.status.as_deref() {
        None => None,
        Some(raw) => Some(ConnectionStatus::parse(raw).ok_or_else(|| {
            ApiError::InvalidRequest(
                "status must be active, needs_attention or revoked.".to_owned(),
            )
        })?),
    };
    let limit = page_limit(query.limit.as_deref(), CONNECTIONS_PAGE)?;
    let after = query.after.unwrap_or_default();
    if !after.is_empty() && !is_connection_id(&after) {
        return Err(ApiError::InvalidRequest(
            "after must be a connection id from a previous page's Link header.".into(),
        ));
    }
    let records = state.store.list_connections(status, &after, limit).await?;
    let summaries: Vec<ConnectionSummary> = records.iter().map(Into::into).collect();
    let mut response = Json(summaries).into_response();
    link_next(
        &mut response,
        "/internal/v1/connections",
        limit,
        records.len(),
        records.last().map(|r| r.connection_id.as_str()),
        status.map(ConnectionStatus::as_str),
    );
    Ok(response)
}

/// Our connection ids: `con_` and up to 60 letters and digits.
fn is_connection_id(raw: &str) -> bool {
    raw.strip_prefix("con_").is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 60 && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}
