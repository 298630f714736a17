//! The one error shape of the API: `{"error": {"code", "message", "request_id", …}}`.
//!
//! Server-side failures log their cause and send an opaque message; client errors say what
//! to fix. No variant carries a secret: key-format errors hold fixed sentences only.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::domain::{KeyFormatError, Mode, Resource};

tokio::task_local! {
    /// The current request's id, set by the request-id middleware for the whole request.
    pub static REQUEST_ID: String;
}

pub fn current_request_id() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Authenticate with a valid bearer token.")]
    Unauthenticated,
    #[error("This token does not carry the {0} scope.")]
    InsufficientScope(&'static str),
    #[error("No Stripe connection exists for this tenant.")]
    NotConnected,
    #[error("No route matches this path.")]
    RouteNotFound,
    #[error("This path does not accept that method.")]
    MethodNotAllowed,
    #[error("{0}")]
    InvalidJson(String),
    #[error("Send the body as JSON with Content-Type: application/json.")]
    UnsupportedMediaType,
    #[error("The request body is larger than {0} bytes.")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    InvalidTenantId(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    KeyFormat(KeyFormatError),
    #[error("This tenant is in {tenant} mode; the pasted key is a {key} key.")]
    ModeMismatch { tenant: Mode, key: Mode },
    #[error("{0}")]
    KeyRejected(&'static str),
    #[error("{message}")]
    MissingPermissions {
        missing: Vec<Resource>,
        fix_url: String,
        message: String,
    },
    #[error("Too many connect attempts for this tenant; try again in {retry_after_secs} s.")]
    RateLimited { retry_after_secs: u64 },
    #[error("This tenant has a Stripe connection in the current mode; disconnect it before changing the mode.")]
    TenantHasConnection,
    #[error("The Stripe connection is {0}; reconnect with a working key.")]
    ConnectionNotActive(&'static str),
    #[error("Stripe could not be reached or gave no clear answer; nothing was stored. Try again shortly.")]
    StripeUnavailable,
    /// Anything that is our fault: logged with its cause, sent opaque.
    #[error(
        "Something went wrong on our side; try again, and quote the request id if it persists."
    )]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        Self::Internal(cause.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::InsufficientScope(_) => StatusCode::FORBIDDEN,
            Self::NotConnected | Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::InvalidJson(_)
            | Self::InvalidTenantId(_)
            | Self::InvalidRequest(_)
            | Self::KeyFormat(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::ModeMismatch { .. } | Self::KeyRejected(_) | Self::MissingPermissions { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::TenantHasConnection | Self::ConnectionNotActive(_) => StatusCode::CONFLICT,
            Self::StripeUnavailable => StatusCode::BAD_GATEWAY,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::InsufficientScope(_) => "insufficient_scope",
            Self::NotConnected => "not_connected",
            Self::RouteNotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::InvalidJson(_) => "invalid_json",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::InvalidTenantId(_) => "invalid_tenant_id",
            Self::InvalidRequest(_) => "invalid_request",
            Self::KeyFormat(e) => e.code(),
            Self::ModeMismatch { .. } => "mode_mismatch",
            Self::KeyRejected(_) => "key_rejected",
            Self::MissingPermissions { .. } => "missing_permissions",
            Self::RateLimited { .. } => "rate_limited",
            Self::TenantHasConnection => "tenant_has_connection",
            Self::ConnectionNotActive(_) => "connection_not_active",
            Self::StripeUnavailable => "stripe_unavailable",
            Self::Internal(_) => "internal_error",
        }
    }

    /// Fields beside `code`, `message` and `request_id`.
    fn extra(&self) -> Map<String, Value> {
        let mut extra = Map::new();
        match self {
            Self::MissingPermissions {
                missing, fix_url, ..
            } => {
                extra.insert("missing".into(), json!(missing));
                extra.insert("fix_url".into(), json!(fix_url));
            }
            Self::ModeMismatch { tenant, key } => {
                extra.insert("tenant_mode".into(), json!(tenant));
                extra.insert("key_mode".into(), json!(key));
            }
            Self::StripeUnavailable => {
                extra.insert("retryable".into(), json!(true));
            }
            Self::RateLimited { retry_after_secs } => {
                extra.insert("retryable".into(), json!(true));
                extra.insert("retry_after".into(), json!(retry_after_secs));
            }
            _ => {}
        }
        extra
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::Internal(cause) = &self {
            // `{:#}` prints the whole chain; causes are built so that none holds a secret.
            tracing::error!(error = format!("{cause:#}"), "request failed");
        }
        let mut error = Map::new();
        error.insert("code".into(), json!(self.code()));
        error.insert("message".into(), json!(self.to_string()));
        error.insert("request_id".into(), json!(current_request_id()));
        error.extend(self.extra());
        let mut response = (status, axum::Json(json!({ "error": error }))).into_response();
        if let Self::RateLimited { retry_after_secs } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response
    }
}

impl From<KeyFormatError> for ApiError {
    fn from(e: KeyFormatError) -> Self {
        Self::KeyFormat(e)
    }
}

impl From<crate::connect::ConnectError> for ApiError {
    fn from(e: crate::connect::ConnectError) -> Self {
        use crate::connect::ConnectError as E;
        match e {
            E::RateLimited { retry_after } => Self::RateLimited {
                retry_after_secs: retry_after.as_secs_f64().ceil().max(1.0) as u64,
            },
            E::NotConnected => Self::NotConnected,
            E::KeyFormat(e) => Self::KeyFormat(e),
            E::ModeMismatch { tenant, key } => Self::ModeMismatch { tenant, key },
            E::KeyRejected { expired: true } => Self::KeyRejected(
                "Stripe says this key has expired. Create a new restricted key in the Stripe dashboard and paste it.",
            ),
            E::KeyRejected { expired: false } => Self::KeyRejected(
                "Stripe does not accept this key: it is invalid, or was rolled or deleted. Copy a current key from the Stripe dashboard.",
            ),
            E::MissingPermissions { missing, fix_url } => {
                let names: Vec<&str> = missing.iter().map(|r| r.as_str()).collect();
                let mut message = format!(
                    "The key lacks write access to: {}. Create a restricted key with the needed permissions (fix_url pre-fills it) and paste it.",
                    names.join(", ")
                );
                if missing.len() == Resource::ALL.len() {
                    message.push_str(
                        " Every permission was refused: if the key is limited to certain IP addresses, Stripe refuses Atlas's requests the same way; lift the restriction or allow Atlas's addresses.",
                    );
                }
                Self::MissingPermissions { missing, fix_url, message }
            }
            E::StripeUnavailable(reason) => {
                tracing::warn!(%reason, "Stripe gave no conclusive answer");
                Self::StripeUnavailable
            }
            E::Internal(cause) => Self::Internal(cause),
        }
    }
}
