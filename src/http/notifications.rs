//! The ops view of announcements to Atlas: the list, and redelivery by hand.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::error::{ApiError, ErrorBody};
use super::extract::{AppQuery, OpsRead, OpsWrite, ServiceCaller};
use super::paging::{link_next, page_limit};
use super::state::AppState;
use crate::store::notifications::{AnnouncementRecord, DeliveryStatus};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/internal/v1/notifications", get(list_notifications))
        .route("/internal/v1/notifications/{id}/redeliver", post(redeliver))
}

const PAGE: i64 = 500;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NotificationsQuery {
    /// Only announcements with this status: `pending`, `delivered` or `failed`.
    #[param(value_type = Option<NotificationStatus>, nullable = false, example = "failed")]
    status: Option<String>,
    /// 1 to 1000; 500 by default.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000, nullable = false, example = 500)]
    limit: Option<String>,
    /// Start after (older than) this announcement id (from the `Link` header of the
    /// previous page).
    #[param(pattern = "^(msg_[A-Za-z0-9]{1,60})?$", nullable = false)]
    after: Option<String>,
}

/// `pending` (waiting for an attempt), `delivered`, or `failed` (no more attempts until
/// redelivered).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NotificationStatus {
    Pending,
    Delivered,
    Failed,
}

/// One announcement to Atlas. The body itself is not shown: Atlas has it.
// `deny_unknown_fields` only closes the schema: this type is serialized, never read.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NotificationView {
    /// The `webhook-id` it is sent under, the same on every attempt.
    #[schema(example = "msg_2x8Q0a5Rk3Lc9Zp1Vt7Yb4Nd")]
    id: String,
    #[schema(example = "connection.needs_attention")]
    r#type: String,
    #[schema(example = "ten_123")]
    tenant_id: String,
    status: NotificationStatus,
    /// Attempts made so far (since the last redelivery).
    attempts: i64,
    /// The HTTP status of the last answer; null before the first, or when none came.
    last_status: Option<i64>,
    /// Why the last attempt failed; null after a success.
    last_error: Option<String>,
    /// When it is next attempted (meaningful while `pending`).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    next_attempt_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    delivered_at: Option<OffsetDateTime>,
}

impl From<AnnouncementRecord> for NotificationView {
    fn from(r: AnnouncementRecord) -> Self {
        Self {
            id: r.id,
            r#type: r.kind,
            tenant_id: r.tenant_id,
            // The table's CHECK allows only these three.
            status: match DeliveryStatus::parse(&r.status) {
                Some(DeliveryStatus::Pending) => NotificationStatus::Pending,
                Some(DeliveryStatus::Delivered) => NotificationStatus::Delivered,
                _ => NotificationStatus::Failed,
            },
            attempts: r.attempts,
            last_status: r.last_status_code,
            last_error: r.last_error,
            next_attempt_at: r.next_attempt_at,
            created_at: r.created_at,
            delivered_at: r.delivered_at,
        }
    }
}

#[utoipa::path(get, path = "/internal/v1/notifications", tag = "internal",
    security(("service_token" = ["ops:read"])),
    params(NotificationsQuery),
    responses(
        (status = 200, body = Vec<NotificationView>, description = "A page of announcements, newest first; a full page names the next in `Link: <…>; rel=\"next\"` (RFC 8288)",
            headers(("Link" = String, description = "The next page, when there may be one"))),
        (status = 400, description = "invalid_request (unknown status, limit out of range, malformed after or query string)", body = ErrorBody),
        (status = 401, description = "unauthenticated", body = ErrorBody),
        (status = 403, description = "insufficient_scope", body = ErrorBody),
        (status = 503, description = "service_unavailable: the database cannot be reached (retryable)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ))]
pub async fn list_notifications(
    State(state): State<AppState>,
    _caller: ServiceCaller<OpsRead>,
    AppQuery(query): AppQuery<NotificationsQuery>,
) -> Result<Response, ApiError> {
    let status = match query.status.as_deref() {
        None => None,
        Some(raw) => Some(DeliveryStatus::parse(raw).ok_or_else(|| {
            ApiError::InvalidRequest("status must be pending, delivered or failed.".to_owned())
        })?),
    };
    let limit = page_limit(query.limit.as_deref(), PAGE)?;
    let after = query.after.filter(|a| !a.is_empty());
    if after.as_deref().is_some_and(|a| !is_message_id(a)) {
        return Err(ApiError::InvalidRequest(
            "after must be an announcement id from a previous page's Link header.".into(),
        ));
    }
    let records = (state.store)
        .list_announcements(status, after.as_deref(), limit)
        .await?;
    let returned = records.len();
    let last_id = records.last().map(|r| r.id.clone());
    let views: Vec<NotificationView> = records.into_iter().map(Into::into).collect();
    let mut response = Json(views).into_response();
    link_next(
        &mut response,
        "/internal/v1/notifications",
        limit,
        returned,
        last_id.as_deref(),
        status.map(DeliveryStatus::as_str),
    );
    Ok(response)
}

#[utoipa::path(post, path = "/internal/v1/notifications/{id}/redeliver", tag = "internal",
    security(("service_token" = ["ops:write"])),
    params(("id" = String, Path, description = "The announcement's id (its webhook-id)", example = "msg_2x8Q0a5Rk3Lc9Zp1Vt7Yb4Nd")),
    responses(
        (status = 202, description = "Pending again, due now, under the same webhook-id; its attempts start over"),
        (status = 401, description = "unauthenticated", body = ErrorBody),
        (status = 403, description = "insufficient_scope", body = ErrorBody),
        (status = 404, description = "not_found: no announcement has this id (or the path is not UTF-8 once decoded)", body = ErrorBody),
        (status = 503, description = "service_unavailable: the database cannot be reached (retryable); nothing was changed", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ))]
pub async fn redeliver(
    State(state): State<AppState>,
    _caller: ServiceCaller<OpsWrite>,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(id) = id.map_err(|_| ApiError::RouteNotFound)?;
    if !is_message_id(&id) || !state.store.redeliver_announcement(&id).await? {
        return Err(ApiError::NotificationNotFound);
    }
    Ok(StatusCode::ACCEPTED)
}

/// Our message ids: `msg_` and up to 60 letters and digits.
fn is_message_id(raw: &str) -> bool {
    raw.strip_prefix("msg_").is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 60 && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}
