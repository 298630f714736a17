//! `ANY /internal/v1/tenants/{tenant_id}/stripe/v1/{path…}`: charging services call Stripe
//! through this service, which adds the tenant's key, so the key never leaves it. The
//! method, the path below `/v1/`, the query string, the form body and the caller's
//! `Idempotency-Key` and `Stripe-Version` are forwarded (`crate::proxy::caller_headers`); Stripe's status, JSON body and `Request-Id` come back
//! as they came. Bodies are customer data: never logged, never stored.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use http_body::Body as _;

use super::error::{ApiError, ErrorBody};
use super::extract::{ServiceCaller, StripeCall, TenantPath};
use super::state::AppState;
use crate::proxy::ProxyCall;

/// The proxy's route: its refusals carry Stripe's error `type` (see `super::request_context`).
pub(super) const ROUTE: &str = "/internal/v1/tenants/{tenant_id}/stripe/v1/{*path}";

pub fn router() -> Router<AppState> {
    Router::new().route(ROUTE, any(forward))
}

const PREFIX_END: &str = "/stripe/v1/";

#[utoipa::path(method(get, post, delete), path = "/internal/v1/tenants/{tenant_id}/stripe/v1/{path}", tag = "proxy",
    security(("service_token" = ["stripe:call"])),
    params(
        ("tenant_id" = String, Path),
        ("path" = String, Path, description = "A Stripe path below /v1/, e.g. customers or invoices/in_123/pay; GET, POST and DELETE are forwarded the same way"),
        ("Idempotency-Key" = Option<String>, Header, description = "Forwarded to Stripe; a POST without one gets a generated key, returned in the answer's Idempotency-Key header"),
        ("X-Deadline-Ms" = Option<u64>, Header, description = "The caller's deadline for the whole call, retries included (at most proxy.deadline_ms)"),
        ("Stripe-Version" = Option<String>, Header, description = "Forwarded as sent (YYYY-MM-DD, optionally .name; one of proxy.stripe_versions when that is set); without it, the pinned stripe.api_version. Stripe-Account and Stripe-Context are refused (400); no other header of the caller is forwarded"),
    ),
    request_body(content = String, description = "Stripe's form body, as for Stripe", content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "Stripe's answer, status, JSON body and Request-Id as they came; any status Stripe answers is passed back the same way", content_type = "application/json"),
        (status = 400, description = "invalid_request (tenant id, deadline, a body on a GET or DELETE, a malformed or not accepted Stripe-Version, a Stripe-Account or Stripe-Context header). Every refusal of this route also carries Stripe's error `type`: invalid_request_error (4xx), rate_limit_error (429), api_error (5xx)", body = ErrorBody),
        (status = 401, description = "unauthenticated", body = ErrorBody),
        (status = 403, description = "insufficient_scope; endpoint_not_allowed (outside proxy.allowed, or a path segment that is not an id of the resource); expand_not_allowed (an expand[] value outside proxy.expand_allowed)", body = ErrorBody),
        (status = 404, description = "not_connected", body = ErrorBody),
        (status = 409, description = "connection_not_active (revoked)", body = ErrorBody),
        (status = 413, description = "payload_too_large (proxy.body_limit_bytes; a declared Content-Length over it is refused before the body is read)", body = ErrorBody),
        (status = 415, description = "unsupported_media_type: a body that is not a form", body = ErrorBody),
        (status = 408, description = "request_timeout: the body did not arrive in time", body = ErrorBody),
        (status = 429, description = "rate_limited: over this account's smoothed rate", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a call is allowed"))),
        (status = 502, description = "stripe_unavailable: Stripe did not answer (in time)", body = ErrorBody),
        (status = 503, description = "service_unavailable: the database cannot be reached (retryable); overloaded: the request bodies in flight would exceed server.inflight_body_bytes (retryable)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ))]
pub async fn forward(
    State(state): State<AppState>,
    caller: Result<ServiceCaller<StripeCall>, ApiError>,
    tenant: Result<TenantPath, ApiError>,
    request: Request,
) -> Response {
    // Every refusal of this route, the extractors' included, carries Stripe's `type`.
    let answer = async {
        let caller = caller?;
        let TenantPath(tenant) = tenant?;
        call_stripe(state, caller, tenant, request).await
    };
    answer.await.unwrap_or_else(ApiError::into_stripe_response)
}

async fn call_stripe(
    state: AppState,
    caller: ServiceCaller<StripeCall>,
    tenant: crate::domain::TenantId,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    // The raw path, never a decoded one: what is checked is what Stripe gets.
    let raw_path = parts.uri.path();
    let below_v1 = raw_path
        .split_once(PREFIX_END)
        .map(|(_, rest)| rest)
        .ok_or(ApiError::RouteNotFound)?;
    let endpoint = (state.proxy)
        .endpoint(&parts.method, below_v1)
        .ok_or(ApiError::EndpointNotAllowed)?;
    let deadline = caller_deadline(&parts.headers, state.proxy.deadline())?;
    let passed = crate::proxy::caller_headers(&parts.headers, state.proxy.stripe_versions())
        .map_err(|refusal| ApiError::InvalidRequest(refusal.to_string()))?;
    // Stripe ignores a GET's or DELETE's body: whatever is in it was meant for something
    // else, and is refused before a byte of it is read.
    if matches!(parts.method, Method::GET | Method::DELETE) && !body.is_end_stream() {
        return Err(ApiError::InvalidRequest(
            "A GET or DELETE through the proxy carries no body; send its parameters in the \
             query string."
                .into(),
        ));
    }
    let body = read_form_body(&parts.headers, body, state.proxy.body_limit()).await?;
    if !state.proxy.expansions_allowed(parts.uri.query(), &body) {
        return Err(ApiError::ExpandNotAllowed);
    }
    let call = ProxyCall {
        method: parts.method.clone(),
        endpoint,
        below_v1,
        query: parts.uri.query(),
        body,
        idempotency_key: passed.idempotency_key,
        stripe_version: passed.stripe_version,
        deadline,
    };
    let answer = (state.proxy)
        .forward(&caller.token_id, &tenant, call)
        .await?;
    metrics::counter!("atlas_proxy_requests_total",
        "method" => super::method_label(&parts.method),
        "endpoint" => endpoint.template().to_owned(),
        "status" => answer.status.to_string())
    .increment(1);

    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, Body::from(answer.body)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let pass = [
        ("request-id", answer.request_id),
        ("idempotent-replayed", answer.idempotent_replayed),
        ("idempotency-key", answer.generated_key),
    ];
    for (name, value) in pass {
        if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert(name, value);
        }
    }
    Ok(response)
}

/// `X-Deadline-Ms`, bounded by `proxy.deadline_ms`.
fn caller_deadline(headers: &HeaderMap, most: Duration) -> Result<Duration, ApiError> {
    let Some(raw) = headers.get("x-deadline-ms") else {
        return Ok(most);
    };
    let millis = (raw.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .ok_or_else(|| {
            ApiError::InvalidRequest(
                "X-Deadline-Ms must be a positive number of milliseconds.".into(),
            )
        })?;
    Ok(Duration::from_millis(millis).min(most))
}

/// The form body as sent, within the limit; anything but a form (or nothing) is 415.
async fn read_form_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let bytes = super::extract::read_body(body, limit).await?;
    if bytes.is_empty() {
        return Ok(bytes);
    }
    let form = (headers.get(header::CONTENT_TYPE))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if form {
        Ok(bytes)
    } else {
        Err(ApiError::FormExpected)
    }
}
