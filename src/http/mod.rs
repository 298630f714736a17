//! The HTTP boundary: one module per audience, merged into one router.

mod connect_page;
pub mod error;
pub mod extract;
mod integrations;
mod internal;
mod notifications;
mod openapi;
mod ops;
mod paging;
pub mod proxy;
mod request_metrics;
pub mod state;
mod summary;
mod webhooks;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::FutureExt;
use tracing::Instrument;

use crate::domain::random_id;
use error::{ApiError, REQUEST_ID};
use request_metrics::HttpMetrics;
pub use state::AppState;
pub use summary::ConnectionSummary;

/// Every layer added with `Router::layer` wraps each route on its own and costs every
/// request a boxed service clone and a boxed future (eight allocations, measured): so there
/// is one, `request_context`, which does all that every request needs. Body limits are
/// applied where a body is read (`extract::read_body`).
///
/// `ops_here`: whether `/healthz`, `/readyz` and `/metrics` are served on this router too
/// (no `server.ops_bind`), else only by [`ops_router`].
pub fn router(
    state: AppState,
    cors_allowed_origins: &[axum::http::HeaderValue],
    body_read_timeout: std::time::Duration,
    budget: crate::server::BodyBudget,
    ops_here: bool,
) -> Router {
    let routes = if ops_here {
        ops::router()
    } else {
        Router::new()
    };
    let routes = routes
        .merge(openapi::router())
        .merge(connect_page::router())
        .merge(integrations::router(cors_allowed_origins))
        .merge(internal::router())
        .merge(notifications::router())
        .merge(webhooks::router())
        .merge(proxy::router())
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed });
    with_request_context(routes, body_read_timeout, budget).with_state(state)
}

/// `/healthz`, `/readyz` and `/metrics` alone, for the listener of `server.ops_bind`. No
/// route reads a body: a budget of its own, never touched.
pub fn ops_router(state: AppState, body_read_timeout: std::time::Duration) -> Router {
    let routes = ops::router()
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed });
    let budget = crate::server::BodyBudget::new(0);
    with_request_context(routes, body_read_timeout, budget).with_state(state)
}

/// Adds [`request_context`] to every route of `routes`.
fn with_request_context<S: Clone + Send + Sync + 'static>(
    routes: Router<S>,
    body_read_timeout: std::time::Duration,
    budget: crate::server::BodyBudget,
) -> Router<S> {
    routes.layer(middleware::from_fn_with_state(
        Arc::new(RequestContext {
            metrics: HttpMetrics::default(),
            body_read_timeout,
            budget,
        }),
        request_context,
    ))
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

/// What the per-request middleware keeps across requests.
struct RequestContext {
    metrics: HttpMetrics,
    body_read_timeout: std::time::Duration,
    budget: crate::server::BodyBudget,
}

/// Gives each request an id (echoed as `x-request-id`, present in every log line and error
/// body), a span named by its matched route (never its raw URI), its metrics, and its body
/// read deadline and its share of the body budget (`crate::server`: 503 `overloaded` at
/// once when it does not fit); a handler that panics answers 500 in our error shape, with
/// all of those.
async fn request_context(
    State(context): State<Arc<RequestContext>>,
    req: Request,
    next: Next,
) -> Response {
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
    // On the proxy route the answers made here are Stripe-shaped too, so a caller's Stripe
    // SDK classifies a 503 `overloaded` or a 500 as it does Stripe's own.
    let answer = if route == proxy::ROUTE {
        ApiError::into_stripe_response
    } else {
        IntoResponse::into_response
    };
    let started = Instant::now();
    let guarded = context.budget.guard_body(req, context.body_read_timeout);
    let mut response = REQUEST_ID
        .scope(id.clone(), async {
            let Ok((req, reservation)) = guarded else {
                return answer(ApiError::Overloaded);
            };
            let handled = AssertUnwindSafe(next.run(req).instrument(span.clone())).catch_unwind();
            let response = handled.await.unwrap_or_else(|_| {
                answer(ApiError::internal(anyhow::anyhow!("handler panicked")))
            });
            // Held until here: the handler's copy of the body counts against the budget.
            drop(reservation);
            response
        })
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

#[cfg(test)]
mod tests {
    use axum::routing::get;

    use super::*;

    /// A panicking handler answers 500 in our error shape, with its request id, and the
    /// server goes on serving.
    #[tokio::test]
    async fn a_panicking_handler_answers_500_with_its_request_id() {
        let routes = Router::new()
            .route(
                "/boom",
                get(|| async {
                    if true {
                        panic!("boom");
                    }
                    "unreachable"
                }),
            )
            .route("/fine", get(|| async { "fine" }));
        let app = with_request_context(
            routes,
            std::time::Duration::from_secs(5),
            crate::server::BodyBudget::new(1 << 20),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = reqwest::Client::new();

        let boom = client
            .get(format!("http://{address}/boom"))
            .header(REQUEST_ID_HEADER, "req-panic-1")
            .send()
            .await
            .unwrap();
        assert_eq!(boom.status(), 500);
        assert_eq!(boom.headers()[REQUEST_ID_HEADER], "req-panic-1");
        let body: serde_json::Value = boom.json().await.unwrap();
        assert_eq!(body["error"]["code"], "internal_error", "{body}");
        assert_eq!(body["error"]["request_id"], "req-panic-1", "{body}");

        let fine = client
            .get(format!("http://{address}/fine"))
            .send()
            .await
            .unwrap();
        assert_eq!(fine.status(), 200);
    }
}
