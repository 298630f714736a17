//! `ANY /internal/v1/tenants/{tenant_id}/stripe/v1/{path…}`: charging services call Stripe
//! through this service, which adds the tenant's key, so the key never leaves it. The
//! method, the path below `/v1/`, the query string, the form body and the caller's
//! `Idempotency-Key` and `Stripe-Version` are forwarded (`crate::proxy::caller_headers`); Stripe's status, JSON body and `Request-Id` come back
//! as they came. Bodies are customer data: never logged, never stored.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;

use super::error::{ApiError, ErrorBody};
use super::extract::{ServiceCaller, StripeCall, TenantPath};
use super::state::AppState;
use crate::accounting::Usage;
use crate::crypto::SecretContext;
use crate::domain::{random_id, ConnectionStatus};
use crate::proxy::{AccountSmoothing, Allowlist};
use crate::stripe::Forward;

/// What the proxy needs, built once at start-up from `proxy.*`.
pub struct ProxyState {
    pub allowlist: Allowlist,
    pub smoothing: AccountSmoothing,
    pub body_limit: usize,
    pub deadline: Duration,
    /// `proxy.stripe_versions`: the caller versions accepted (empty: any).
    pub stripe_versions: Vec<String>,
}

pub fn router() -> Router<AppState> {
    Router::new().route(
        "/internal/v1/tenants/{tenant_id}/stripe/v1/{*path}",
        any(forward),
    )
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
        (status = 400, description = "invalid_request (tenant id, deadline, a malformed or not accepted Stripe-Version, a Stripe-Account or Stripe-Context header). Every refusal of this route also carries Stripe's error `type`: invalid_request_error (4xx), rate_limit_error (429), api_error (5xx)", body = ErrorBody),
        (status = 401, description = "unauthenticated", body = ErrorBody),
        (status = 403, description = "insufficient_scope; endpoint_not_allowed (outside proxy.allowed)", body = ErrorBody),
        (status = 404, description = "not_connected", body = ErrorBody),
        (status = 409, description = "connection_not_active (revoked)", body = ErrorBody),
        (status = 413, description = "payload_too_large (proxy.body_limit_bytes)", body = ErrorBody),
        (status = 415, description = "unsupported_media_type: a body that is not a form", body = ErrorBody),
        (status = 408, description = "request_timeout: the body did not arrive in time", body = ErrorBody),
        (status = 429, description = "rate_limited: over this account's smoothed rate", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a call is allowed"))),
        (status = 502, description = "stripe_unavailable: Stripe did not answer (in time)", body = ErrorBody),
        (status = 503, description = "service_unavailable: the database cannot be reached (retryable)", body = ErrorBody,
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
    let proxy = state.proxy.clone();
    let (parts, body) = request.into_parts();
    // The raw path, never a decoded one: what is checked is what Stripe gets.
    let raw_path = parts.uri.path();
    let below_v1 = raw_path
        .split_once(PREFIX_END)
        .map(|(_, rest)| rest)
        .ok_or(ApiError::RouteNotFound)?;
    let endpoint = (proxy.allowlist)
        .find(&parts.method, below_v1)
        .ok_or(ApiError::EndpointNotAllowed)?;
    let deadline = caller_deadline(&parts.headers, proxy.deadline)?;
    let passed = crate::proxy::caller_headers(&parts.headers, &proxy.stripe_versions)
        .map_err(|refusal| ApiError::InvalidRequest(refusal.to_string()))?;
    let body = read_form_body(&parts.headers, body, proxy.body_limit).await?;

    let connection = (state.store.find_api_key(&tenant).await?).ok_or(ApiError::NotConnected)?;
    if connection.status == ConnectionStatus::Revoked {
        return Err(ApiError::ConnectionNotActive(connection.status.as_str()));
    }
    let context = SecretContext::api_key(&connection.secret_id, &tenant, connection.mode);
    let key = state
        .keyring
        .open_stripe_key(&context, &connection.sealed)?;
    if let Err(over) = proxy.smoothing.take_turn(&tenant, connection.mode).await {
        return Err(ApiError::rate_limited(over.retry_after));
    }

    // A POST Stripe has no idempotency key for is sent once, under one we make up and
    // return, so the caller can retry it safely; a GET is always safe to repeat.
    let given = passed.idempotency_key;
    let generated = given.is_none() && parts.method == Method::POST;
    let idempotency_key = given
        .clone()
        .or_else(|| generated.then(|| random_id("atlas_", 32)));
    let retry = parts.method == Method::GET || (parts.method == Method::POST && given.is_some());
    let path_and_query = match parts.uri.query() {
        Some(query) => format!("/v1/{below_v1}?{query}"),
        None => format!("/v1/{below_v1}"),
    };
    let request = Forward {
        method: parts.method.clone(),
        endpoint: endpoint.template().to_owned(),
        path_and_query,
        body,
        idempotency_key: idempotency_key.clone(),
        stripe_version: passed.stripe_version,
        retry,
        deadline: tokio::time::Instant::now() + deadline,
    };
    let forwarded = state.connections.stripe().forward(&key, &request).await;
    state
        .key_fetches
        .record_usage(Usage::StripeCall, &caller.token_id, &tenant)
        .await;
    let forwarded = forwarded.map_err(|failure| {
        tracing::warn!(endpoint = %request.endpoint, %failure, "a proxied call got no answer");
        ApiError::StripeUnavailable
    })?;
    metrics::counter!("atlas_proxy_requests_total",
        "method" => super::method_label(&parts.method),
        "endpoint" => request.endpoint.clone(),
        "status" => forwarded.status.to_string())
    .increment(1);
    if forwarded.status == 401 {
        // The key no longer works: look at the connection again now, not in hours.
        state.store.mark_due_now(&tenant).await?;
    }

    let status = StatusCode::from_u16(forwarded.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, Body::from(forwarded.body)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let pass = [
        ("request-id", forwarded.request_id),
        ("idempotent-replayed", forwarded.idempotent_replayed),
        ("idempotency-key", idempotency_key.filter(|_| generated)),
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
        Err(ApiError::UnsupportedMediaType)
    }
}

impl ProxyState {
    pub fn new(settings: &crate::config::ProxySettings) -> Result<Arc<Self>, String> {
        let per_second = |n: u32| std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN);
        Ok(Arc::new(Self {
            allowlist: Allowlist::parse(&settings.allowed)?,
            smoothing: AccountSmoothing::new(
                per_second(settings.live_requests_per_second),
                per_second(settings.test_requests_per_second),
                Duration::from_millis(settings.max_wait_ms),
            ),
            body_limit: settings.body_limit_bytes,
            deadline: Duration::from_millis(settings.deadline_ms),
            stripe_versions: settings.stripe_versions.clone(),
        }))
    }
}
