//! Stripe's deliveries to our endpoint: verified, then stored durably before the 2xx.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde::Serialize;

use super::error::{ApiError, ErrorBody};
use super::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/webhooks/stripe/{connection_id}", post(receive))
}

/// A Stripe event as delivered (schema only: the receiver reads these fields and stores
/// the body as sent).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct WebhookEvent {
    #[schema(example = "evt_1")]
    id: String,
    #[schema(rename = "type", example = "invoice.paid")]
    event_type: String,
    created: i64,
    livemode: bool,
}

/// The answer to a stored delivery.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)] // closes the schema; this type is only serialized
pub struct WebhookReceipt {
    received: bool,
    /// This event id was already stored for this connection (a redelivery).
    duplicate: bool,
}

#[utoipa::path(post, path = "/webhooks/stripe/{connection_id}", tag = "webhooks",
    params(
        ("connection_id" = String, Path, description = "The connection the endpoint was registered for"),
        ("Stripe-Signature" = String, Header, description = "t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.<body>\" with the endpoint's signing secret>[,v1=…]"),
    ),
    request_body(content = WebhookEvent, description = "A Stripe event, as Stripe sent it", content_type = "application/json"),
    responses(
        (status = 200, description = "Stored (or already stored: a redelivery)", body = WebhookReceipt),
        (status = 400, description = "webhook_rejected: bad signature (a malformed or stale Stripe-Signature is refused before the body is read), stale timestamp, livemode contradicting the tenant's mode, or not an event", body = ErrorBody),
        (status = 404, description = "unknown_connection: no connection has this URL", body = ErrorBody),
        (status = 408, description = "request_timeout: the body did not arrive within server.body_read_timeout_ms", body = ErrorBody),
        (status = 413, description = "payload_too_large: the body (or its declared Content-Length, refused before reading) is larger than webhooks.body_limit_bytes", body = ErrorBody),
        (status = 503, description = "service_unavailable: the database cannot be reached (retryable); nothing was stored; overloaded: the request bodies in flight would exceed server.inflight_body_bytes (retryable), answered before the body is read", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ))]
pub async fn receive(
    State(state): State<AppState>,
    connection_id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<WebhookReceipt>), ApiError> {
    // A segment that is not UTF-8 once decoded names no connection either (axum's own
    // rejection would be plain text).
    let Ok(Path(connection_id)) = connection_id else {
        return Err(ApiError::UnknownWebhookConnection);
    };
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    // The raw bytes are what Stripe signed: read as sent, within the limit, and only once
    // the connection is known.
    let body = super::extract::read_body(body, state.webhook_body_limit);
    let stored = (state.webhooks)
        .receive(&connection_id, signature, body)
        .await?;
    Ok((
        StatusCode::OK,
        Json(WebhookReceipt {
            received: true,
            duplicate: stored.duplicate,
        }),
    ))
}
