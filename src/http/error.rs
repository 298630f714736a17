//! The one error shape of the API: `{"error": {"code", "message", "request_id", …}}`.
//!
//! Server-side failures log their cause and send an opaque message; client errors say what
//! to fix. No variant carries a secret: key-format errors hold fixed sentences only.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

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
    #[error("Stripe refused to register Atlas's webhook endpoint on this account; nothing was stored. An account holds at most 16 webhook endpoints: delete an unused one in the Stripe dashboard and try again.")]
    WebhookRegistrationFailed,
    #[error("The webhook delivery was rejected.")]
    WebhookRejected,
    #[error("No connection has this webhook URL.")]
    UnknownWebhookConnection,
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
            Self::NotConnected | Self::RouteNotFound | Self::UnknownWebhookConnection => {
                StatusCode::NOT_FOUND
            }
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::InvalidJson(_)
            | Self::InvalidTenantId(_)
            | Self::InvalidRequest(_)
            | Self::KeyFormat(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::WebhookRejected => StatusCode::BAD_REQUEST,
            Self::ModeMismatch { .. }
            | Self::KeyRejected(_)
            | Self::MissingPermissions { .. }
            | Self::WebhookRegistrationFailed => StatusCode::UNPROCESSABLE_ENTITY,
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
            Self::WebhookRegistrationFailed => "webhook_registration_failed",
            Self::WebhookRejected => "webhook_rejected",
            Self::UnknownWebhookConnection => "unknown_connection",
            Self::Internal(_) => "internal_error",
        }
    }
}

/// The error body every failure answers with.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// `code` is stable and machine-readable; `message` is a sentence a person can act on.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct ErrorDetail {
    #[schema(example = "mode_mismatch")]
    pub code: String,
    #[schema(example = "This tenant is in live mode; the pasted key is a test key.")]
    pub message: String,
    pub request_id: String,
    /// `missing_permissions`: the resources the key may not write.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<String>>)]
    pub missing: Option<Vec<Resource>>,
    /// `missing_permissions`: a Stripe dashboard link pre-filling a key with the needed permissions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix_url: Option<String>,
    /// `stripe_unavailable`, `rate_limited`: trying again later may succeed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    /// `rate_limited`: seconds until an attempt is allowed (also the `Retry-After` header).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// `mode_mismatch`: the tenant's mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_mode: Option<Mode>,
    /// `mode_mismatch`: the pasted key's mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_mode: Option<Mode>,
    /// `not_ready`: each readiness check and its verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub checks: Option<serde_json::Value>,
}

impl ErrorDetail {
    pub fn new(code: &str, message: String) -> Self {
        Self {
            code: code.to_owned(),
            message,
            request_id: current_request_id(),
            ..Self::default()
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::Internal(cause) = &self {
            // `{:#}` prints the whole chain; causes are built so that none holds a secret.
            tracing::error!(error = format!("{cause:#}"), "request failed");
        }
        let mut detail = ErrorDetail::new(self.code(), self.to_string());
        let mut retry_after_header = None;
        match self {
            Self::MissingPermissions {
                missing, fix_url, ..
            } => {
                detail.missing = Some(missing);
                detail.fix_url = Some(fix_url);
            }
            Self::ModeMismatch { tenant, key } => {
                detail.tenant_mode = Some(tenant);
                detail.key_mode = Some(key);
            }
            Self::StripeUnavailable => detail.retryable = Some(true),
            Self::RateLimited { retry_after_secs } => {
                detail.retryable = Some(true);
                detail.retry_after = Some(retry_after_secs);
                retry_after_header = Some(retry_after_secs);
            }
            _ => {}
        }
        let mut response = (status, axum::Json(ErrorBody { error: detail })).into_response();
        if let Some(secs) = retry_after_header {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
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
            E::WebhookRefused => Self::WebhookRegistrationFailed,
            E::Internal(cause) => Self::Internal(cause),
        }
    }
}
