//! The HTTP boundary: one module per audience, merged into one router.

mod connect_page;
pub mod error;
pub mod extract;
mod integrations;
mod internal;
mod openapi;
mod ops;
pub mod proxy;
mod request_metrics;
pub mod state;
mod summary;
mod webhooks;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;

use crate::domain::random_id;
use error::{ApiError, REQUEST_ID};
use request_metrics::HttpMetrics;
pub use state::AppState;
pub use summary::ConnectionSummary;

pub fn router(
    state: AppState,
    body_limit: usize,
    cors_allowed_origins: &[String],
    body_read_timeout: std::time::Duration,
) -> Router {
    Router::new()
        .merge(ops::router())
        .merge(openapi::router())
        .merge(connect_page::router())
        .merge(integrations::router(cors_allowed_origins))
        .merge(internal::router())
        .layer(DefaultBodyLimit::max(body_limit))
        // Stripe's events, and the forms charging services send Stripe, can be larger than
        // any API body: the receiver and the proxy apply limits of their own.
        .merge(webhooks::router())
        .merge(proxy::router())
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal(anyhow::anyhow!("handler panicked")).into_response()
        }))
        .layer(middleware::from_fn_with_state(
            Arc::new(RequestContext {
                metrics: HttpMetrics::default(),
                body_read_timeout,
            }),
            request_context,
        ))
        .with_state(state)
}

const REQUEST_ID_HEADER: &str = "x-request-id";

/// A caller's request id is kept when it is short and plain; otherwise we make one.
fn request_id(req: &Request) -> String {
    req.headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| random_id("req_", 20))
}

/// A metric label and log field from a closed set: a client chooses the method, so copying
/// it would let anyone grow the series without bound.
pub(super) fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Gives each request an id (echoed as `x-request-id`, present in every log line and error
/// body) and a span named by its matched route, never its raw URI.
/// What the per-request middleware keeps across requests.
struct RequestContext {
    metrics: HttpMetrics,
    body_read_timeout: std::time::Duration,
}

/// Also gives a request body its read deadline (`crate::server`): one middleware, not two.
async fn request_context(
    State(context): State<Arc<RequestContext>>,
    req: Request,
    next: Next,
) -> Response {
    let req = crate::server::with_body_deadline(req, context.body_read_timeout);
    let id = request_id(&req);
    // An Arc<str> inside: cloning it allocates nothing.
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let method = method_label(req.method());
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method,
        route = %route,
        tenant_id = tracing::field::Empty,
    );
    let started = Instant::now();
    let mut response = REQUEST_ID
        .scope(id.clone(), next.run(req).instrument(span.clone()))
        .await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    context.metrics.record(route, method, status, elapsed);
    span.in_scope(|| {
        tracing::info!(
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            "request finished"
        )
    });
    response
}
