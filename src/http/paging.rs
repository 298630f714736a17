//! The paged ops lists (`GET /internal/v1/connections`, `GET /internal/v1/notifications`):
//! one rule for `limit`, and one `Link: <…>; rel="next"` (RFC 8288) for a full page.

use axum::http::{header, HeaderValue};
use axum::response::Response;

use super::error::ApiError;

/// The most a page may hold, whatever the caller asks.
pub const PAGE_MAX: i64 = 1000;

/// `limit`: `default` when absent, else 1 to [`PAGE_MAX`].
pub fn page_limit(raw: Option<&str>, default: i64) -> Result<i64, ApiError> {
    match raw {
        None => Ok(default),
        Some(raw) => (raw.parse::<i64>().ok())
            .filter(|n| (1..=PAGE_MAX).contains(n))
            .ok_or_else(|| ApiError::InvalidRequest("limit must be 1 to 1000.".into())),
    }
}

/// Names the next page on a full one: it may have a successor, and an empty next page is
/// the honest end. `status` is the caller's filter, carried over.
pub fn link_next(
    response: &mut Response,
    path: &str,
    limit: i64,
    returned: usize,
    last_id: Option<&str>,
    status: Option<&str>,
) {
    let Some(last) = last_id.filter(|_| returned as i64 == limit) else {
        return;
    };
    let mut next = format!("{path}?limit={limit}&after={last}");
    if let Some(status) = status {
        next.push_str("&status=");
        next.push_str(status);
    }
    if let Ok(link) = HeaderValue::from_str(&format!("<{next}>; rel=\"next\"")) {
        response.headers_mut().insert(header::LINK, link);
    }
}
