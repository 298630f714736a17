//! The one error shape of the API: `{"error": {"code", "message", "request_id", …}}`.
//!
//! Server-side failures log their cause and send an opaque message; client errors say what
//! to fix. No variant carries a secret: key-format errors hold fixed sentences only.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::AuthError;
use crate::connection::{Attempt, ConnectError, KeyError};
use crate::crypto::CryptoError;
use crate::domain::{KeyFormatError, Mode, Resource};
use crate::proxy::ProxyError;
use crate::store::StoreError;
use crate::webhooks::recovery::RecoverError;
use crate::webhooks::DeliveryError;

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
    #[error("The proxy does not forward this method and path (proxy.allowed).")]
    EndpointNotAllowed,
    #[error("The proxy does not forward this expand[] value (proxy.expand_allowed).")]
    ExpandNotAllowed,
    #[error("No Stripe connection exists for this tenant.")]
    NotConnected,
    #[error("No route matches this path.")]
    RouteNotFound,
    #[error("No announcement has this id (delivered ones are deleted after notifications.retention_days).")]
    NotificationNotFound,
    #[error("This path does not accept that method.")]
    MethodNotAllowed,
    #[error("{0}")]
    InvalidJson(String),
    #[error("Send the body as JSON with Content-Type: application/json.")]
    UnsupportedMediaType,
    #[error("Send the body as a form with Content-Type: application/x-www-form-urlencoded, as for Stripe.")]
    FormExpected,
    #[error("The request body is larger than {0} bytes.")]
    PayloadTooLarge(usize),
    #[error("The request body did not arrive in time; send it whole, without pauses.")]
    RequestTimeout,
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
    #[error("{}; try again in {retry_after_secs} s.", limited.sentence())]
    RateLimited {
        limited: Limited,
        retry_after_secs: u64,
    },
    #[error("This tenant has a Stripe connection in the current mode; disconnect it before changing the mode.")]
    TenantHasConnection,
    #[error("The Stripe connection is {0}; reconnect with a working key.")]
    ConnectionNotActive(&'static str),
    #[error("Stripe could not be reached or gave no clear answer; nothing was stored. Try again shortly.")]
    StripeUnavailable,
    #[error("The Stripe connection changed while this request ran (another connect or disconnect of this tenant); nothing of this request was kept. Look at the connection and try again.")]
    ConcurrentChange,
    #[error("Stripe refused to register Atlas's webhook endpoint on this account; nothing was stored. An account holds at most 16 webhook endpoints: delete an unused one in the Stripe dashboard and try again.")]
    WebhookRegistrationFailed,
    #[error("This Stripe account already has the maximum of 16 webhook endpoints, so Atlas cannot register its own; nothing was stored. Delete unused webhook endpoints in the Stripe dashboard (Developers → Webhooks) and try again.")]
    WebhookEndpointLimit,
    #[error(
        "The service cannot reach its database right now; nothing was changed. Try again shortly."
    )]
    ServiceUnavailable,
    #[error("The master key this needs is held by AWS KMS and not decrypted yet (KMS did not answer at start-up; the service keeps asking). Try again shortly.")]
    MasterKeyUnavailable,
    #[error("This instance is not configured with the master key the secret is sealed under (a master-key rollout still under way); nothing was changed. Try again shortly.")]
    MasterKeyNotConfigured,
    #[error("The service is reading as many request bodies as it holds at once (server.inflight_body_bytes); nothing was done. Try again shortly.")]
    Overloaded,
    #[error("The webhook delivery was rejected.")]
    WebhookRejected,
    #[error("This connection's key may not read Events, so missed events cannot be recovered. Create a restricted key that adds Events: Read (the connection's fix_url pre-fills it) and connect it.")]
    EventRecoveryOff,
    #[error("since is older than Stripe keeps events (30 days); give a later time, or none to start where the last recovery ended.")]
    SinceOutOfRange,
    #[error("No connection has this webhook URL.")]
    UnknownWebhookConnection,
    /// Anything that is our fault: logged with its cause, sent opaque.
    #[error(
        "Something went wrong on our side; try again, and quote the request id if it persists."
    )]
    Internal(#[source] anyhow::Error),
}

/// What a 429 refused: each is limited on its own, and the message names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limited {
    /// `limits.connect_attempts_per_minute`, per tenant.
    Connect,
    /// `limits.verify_attempts_per_minute`, per tenant.
    Verify,
    /// The proxy's smoothed rate, per connected account.
    Proxy,
}

impl Limited {
    fn sentence(self) -> &'static str {
        match self {
            Self::Connect => "Too many connect attempts for this tenant",
            Self::Verify => "Too many verify attempts for this tenant",
            Self::Proxy => "Too many Stripe calls through the proxy for this account",
        }
    }
}

impl ApiError {
    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        Self::Internal(cause.into())
    }

    /// 429, allowed again after `retry_after` (rounded up to whole seconds, at least one).
    pub fn rate_limited(limited: Limited, retry_after: std::time::Duration) -> Self {
        Self::RateLimited {
            limited,
            retry_after_secs: retry_after.as_secs_f64().ceil().max(1.0) as u64,
        }
    }

    /// The one table that gives each variant its HTTP status and stable `code`.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            Self::Unauthenticated => (S::UNAUTHORIZED, "unauthenticated"),
            Self::InsufficientScope(_) => (S::FORBIDDEN, "insufficient_scope"),
            Self::EndpointNotAllowed => (S::FORBIDDEN, "endpoint_not_allowed"),
            Self::ExpandNotAllowed => (S::FORBIDDEN, "expand_not_allowed"),
            Self::NotConnected => (S::NOT_FOUND, "not_connected"),
            Self::RouteNotFound | Self::NotificationNotFound => (S::NOT_FOUND, "not_found"),
            Self::UnknownWebhookConnection => (S::NOT_FOUND, "unknown_connection"),
            Self::MethodNotAllowed => (S::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::InvalidJson(_) => (S::BAD_REQUEST, "invalid_json"),
            Self::InvalidRequest(_) => (S::BAD_REQUEST, "invalid_request"),
            Self::KeyFormat(e) => (S::BAD_REQUEST, e.code()),
            Self::WebhookRejected => (S::BAD_REQUEST, "webhook_rejected"),
            Self::UnsupportedMediaType | Self::FormExpected => {
                (S::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            Self::PayloadTooLarge(_) => (S::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::RequestTimeout => (S::REQUEST_TIMEOUT, "request_timeout"),
            Self::ModeMismatch { .. } => (S::UNPROCESSABLE_ENTITY, "mode_mismatch"),
            Self::KeyRejected(_) => (S::UNPROCESSABLE_ENTITY, "key_rejected"),
            Self::MissingPermissions { .. } => (S::UNPROCESSABLE_ENTITY, "missing_permissions"),
            Self::WebhookRegistrationFailed => {
                (S::UNPROCESSABLE_ENTITY, "webhook_registration_failed")
            }
            Self::SinceOutOfRange => (S::UNPROCESSABLE_ENTITY, "since_out_of_range"),
            Self::WebhookEndpointLimit => (S::UNPROCESSABLE_ENTITY, "webhook_endpoint_limit"),
            Self::RateLimited { .. } => (S::TOO_MANY_REQUESTS, "rate_limited"),
            Self::EventRecoveryOff => (S::CONFLICT, "event_recovery_off"),
            Self::TenantHasConnection => (S::CONFLICT, "tenant_has_connection"),
            Self::ConnectionNotActive(_) => (S::CONFLICT, "connection_not_active"),
            Self::ConcurrentChange => (S::CONFLICT, "concurrent_change"),
            Self::StripeUnavailable => (S::BAD_GATEWAY, "stripe_unavailable"),
            Self::ServiceUnavailable
            | Self::MasterKeyUnavailable
            | Self::MasterKeyNotConfigured => (S::SERVICE_UNAVAILABLE, "service_unavailable"),
            Self::Overloaded => (S::SERVICE_UNAVAILABLE, "overloaded"),
            Self::Internal(_) => (S::INTERNAL_SERVER_ERROR, "internal_error"),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status_and_code().0
    }

    pub fn code(&self) -> &'static str {
        self.status_and_code().1
    }
}

/// The error body every failure answers with.
// `deny_unknown_fields` only closes the schemas (`additionalProperties: false`): these types
// are serialized, never deserialized.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// `code` is stable and machine-readable; `message` is a sentence a person can act on.
#[derive(Debug, Default, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    #[schema(example = "mode_mismatch", pattern = "^[a-z][a-z_]*$")]
    pub code: String,
    #[schema(example = "This tenant is in live mode; the pasted key is a test key.")]
    pub message: String,
    /// The request's `x-request-id`: the caller's own when plain and short, else `req_…`.
    #[schema(
        example = "req_8Hq2mXv0c9LrT4aZpQ1w",
        pattern = "^[A-Za-z0-9_.:-]{1,64}$"
    )]
    pub request_id: String,
    /// `missing_permissions`: the resources the key may not write.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<super::summary::ResourceName>>, nullable = false)]
    pub missing: Option<Vec<Resource>>,
    /// `missing_permissions`: a Stripe dashboard link pre-filling a key with the needed permissions.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub fix_url: Option<String>,
    /// `stripe_unavailable`, `rate_limited`, `service_unavailable`, `overloaded`,
    /// `concurrent_change`:
    /// trying again later may succeed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub retryable: Option<bool>,
    /// `rate_limited`: seconds until an attempt is allowed (also the `Retry-After` header).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub retry_after: Option<u64>,
    /// `mode_mismatch`: the tenant's mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub tenant_mode: Option<Mode>,
    /// `mode_mismatch`: the pasted key's mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub key_mode: Option<Mode>,
    /// The proxy route only (`…/stripe/v1/{path}`): Stripe's error `type` for our own
    /// refusals, which Stripe's SDKs read beside `code` to pick their exception.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    #[schema(rename = "type", nullable = false)]
    pub stripe_type: Option<StripeErrorType>,
    /// `not_ready`: each readiness check (`database`, `keyring`) and its verdict (`ok`,
    /// `failed`, or `failed: ` and what to do).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<std::collections::BTreeMap<String, String>>, nullable = false)]
    pub checks: Option<serde_json::Value>,
}

/// Stripe's `error.type` for an answer of ours, by its status, as Stripe types its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StripeErrorType {
    InvalidRequestError,
    RateLimitError,
    ApiError,
}

impl StripeErrorType {
    pub fn for_status(status: StatusCode) -> Self {
        match status.as_u16() {
            429 => Self::RateLimitError,
            500.. => Self::ApiError,
            _ => Self::InvalidRequestError,
        }
    }
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
        self.respond(None)
    }
}

impl ApiError {
    /// The answer on the proxy route: the same body plus Stripe's `type`, so the caller's
    /// Stripe SDK classifies our refusals as it does Stripe's.
    pub fn into_stripe_response(self) -> Response {
        let stripe_type = StripeErrorType::for_status(self.status());
        self.respond(Some(stripe_type))
    }

    fn respond(self, stripe_type: Option<StripeErrorType>) -> Response {
        let status = self.status();
        if let Self::Internal(cause) = &self {
            // `{:#}` prints the whole chain; causes are built so that none holds a secret.
            tracing::error!(error = format!("{cause:#}"), "request failed");
        }
        let mut detail = ErrorDetail::new(self.code(), self.to_string());
        detail.stripe_type = stripe_type;
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
            Self::StripeUnavailable | Self::ConcurrentChange => detail.retryable = Some(true),
            Self::ServiceUnavailable
            | Self::MasterKeyUnavailable
            | Self::MasterKeyNotConfigured => {
                detail.retryable = Some(true);
                retry_after_header = Some(DATABASE_RETRY_AFTER_SECS);
            }
            Self::Overloaded => {
                detail.retryable = Some(true);
                retry_after_header = Some(OVERLOADED_RETRY_AFTER_SECS);
            }
            Self::RateLimited {
                retry_after_secs, ..
            } => {
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

/// How long a caller is asked to wait while the database is unreachable.
const DATABASE_RETRY_AFTER_SECS: u64 = 1;

/// How long a caller is asked to wait while the body budget is spent: bodies in flight are
/// read within `server.body_read_timeout_ms`, most within a second.
const OVERLOADED_RETRY_AFTER_SECS: u64 = 1;

impl ApiError {
    /// The answer a store error gets when it is not our fault.
    fn for_store(e: &StoreError) -> Option<Self> {
        match e {
            StoreError::TenantHasConnection => Some(Self::TenantHasConnection),
            e if e.is_unavailable() => {
                tracing::warn!(error = %e, "database unavailable");
                Some(Self::ServiceUnavailable)
            }
            _ => None,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::for_store(&e).unwrap_or_else(|| Self::Internal(e.into()))
    }
}

impl From<CryptoError> for ApiError {
    fn from(e: CryptoError) -> Self {
        match e {
            CryptoError::MasterKeyUnavailable(id) => {
                tracing::warn!(master_key_id = %id, "master key held by AWS KMS not decrypted yet");
                Self::MasterKeyUnavailable
            }
            // Instances configured apart: the master key was made active on some before
            // all of them knew it (README: add it everywhere, then make it active). Another
            // instance, or this one once redeployed, opens it; `/readyz` names the id.
            CryptoError::UnknownMasterKey(id) => {
                tracing::error!(master_key_id = %id, "a stored secret is sealed under a master key this instance is not configured with");
                Self::MasterKeyNotConfigured
            }
            e => Self::Internal(e.into()),
        }
    }
}

impl From<ConnectError> for ApiError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::RateLimited {
                attempt,
                retry_after,
            } => {
                let limited = match attempt {
                    Attempt::Connect => Limited::Connect,
                    Attempt::Verify => Limited::Verify,
                };
                Self::rate_limited(limited, retry_after)
            }
            ConnectError::NotConnected => Self::NotConnected,
            ConnectError::KeyFormat(e) => Self::KeyFormat(e),
            ConnectError::ModeMismatch { tenant, key } => Self::ModeMismatch { tenant, key },
            ConnectError::KeyRejected { expired: true } => Self::KeyRejected(
                "Stripe says this key has expired. Create a new restricted key in the Stripe dashboard and paste it.",
            ),
            ConnectError::KeyRejected { expired: false } => Self::KeyRejected(
                "Stripe does not accept this key: it is invalid, or was rolled or deleted. Copy a current key from the Stripe dashboard.",
            ),
            ConnectError::MissingPermissions {
                missing,
                fix_url,
                all_refused,
            } => {
                let names: Vec<&str> = missing.iter().map(|r| r.as_str()).collect();
                let mut message = format!(
                    "The key lacks write access to: {}. Create a restricted key with the needed permissions (fix_url pre-fills it) and paste it.",
                    names.join(", ")
                );
                if all_refused {
                    message.push_str(
                        " Every permission was refused: if the key is limited to certain IP addresses, Stripe refuses Atlas's requests the same way; lift the restriction or allow Atlas's addresses.",
                    );
                }
                Self::MissingPermissions {
                    missing,
                    fix_url,
                    message,
                }
            }
            ConnectError::StripeUnavailable(reason) => {
                tracing::warn!(%reason, "Stripe gave no conclusive answer");
                Self::StripeUnavailable
            }
            ConnectError::WebhookRefused => Self::WebhookRegistrationFailed,
            ConnectError::WebhookEndpointLimit => Self::WebhookEndpointLimit,
            ConnectError::Store(e) => {
                Self::for_store(&e).unwrap_or_else(|| Self::Internal(anyhow::Error::new(e)))
            }
            ConnectError::Crypto(e) => e.into(),
            ConnectError::ConcurrentChange => Self::ConcurrentChange,
        }
    }
}

impl From<AuthError<StoreError>> for ApiError {
    fn from(e: AuthError<StoreError>) -> Self {
        match e {
            AuthError::Unauthenticated => Self::Unauthenticated,
            AuthError::InsufficientScope(scope) => Self::InsufficientScope(scope.as_str()),
            AuthError::Lookup(e) => e.into(),
        }
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Auth(e) => e.into(),
            KeyError::NotConnected => Self::NotConnected,
            KeyError::NotActive(status) => Self::ConnectionNotActive(status.as_str()),
            KeyError::Store(e) => e.into(),
            KeyError::Crypto(e) => e.into(),
        }
    }
}

impl From<ProxyError> for ApiError {
    fn from(e: ProxyError) -> Self {
        match e {
            ProxyError::Key(e) => e.into(),
            ProxyError::RateLimited { retry_after } => {
                Self::rate_limited(Limited::Proxy, retry_after)
            }
            ProxyError::StripeUnavailable => Self::StripeUnavailable,
            ProxyError::Store(e) => e.into(),
        }
    }
}

impl From<RecoverError> for ApiError {
    fn from(e: RecoverError) -> Self {
        match e {
            RecoverError::NotConnected => Self::NotConnected,
            RecoverError::Off => Self::EventRecoveryOff,
            RecoverError::SinceOutOfRange => Self::SinceOutOfRange,
            RecoverError::Store(e) => e.into(),
        }
    }
}

/// A delivery whose body could not be read answers as the read failed (408, 413).
impl From<DeliveryError<ApiError>> for ApiError {
    fn from(e: DeliveryError<ApiError>) -> Self {
        match e {
            DeliveryError::UnknownConnection => Self::UnknownWebhookConnection,
            DeliveryError::Rejected => Self::WebhookRejected,
            DeliveryError::Body(e) => e,
            DeliveryError::Store(e) => e.into(),
            DeliveryError::Crypto(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A 429 names what was limited; its code, status and `Retry-After` are the same for all.
    #[test]
    fn a_rate_limit_names_what_was_limited() {
        let wait = Duration::from_millis(1_200);
        let cases = [
            (
                ApiError::from(ConnectError::RateLimited {
                    attempt: Attempt::Connect,
                    retry_after: wait,
                }),
                "Too many connect attempts for this tenant; try again in 2 s.",
            ),
            (
                ApiError::from(ConnectError::RateLimited {
                    attempt: Attempt::Verify,
                    retry_after: wait,
                }),
                "Too many verify attempts for this tenant; try again in 2 s.",
            ),
            (
                ApiError::from(ProxyError::RateLimited { retry_after: wait }),
                "Too many Stripe calls through the proxy for this account; try again in 2 s.",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
            assert_eq!(error.code(), "rate_limited");
            let response = error.into_response();
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        }
    }

    async fn body(response: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("a small body");
        serde_json::from_slice(&bytes).expect("JSON")
    }

    #[tokio::test]
    async fn the_proxys_refusals_carry_stripes_type_by_status() {
        let cases = [
            (ApiError::EndpointNotAllowed, "invalid_request_error"),
            (ApiError::NotConnected, "invalid_request_error"),
            (
                ApiError::InvalidRequest("Stripe-Version …".into()),
                "invalid_request_error",
            ),
            (
                ApiError::rate_limited(Limited::Proxy, Duration::from_secs(1)),
                "rate_limit_error",
            ),
            (ApiError::StripeUnavailable, "api_error"),
            (ApiError::ServiceUnavailable, "api_error"),
        ];
        for (error, expected) in cases {
            let code = error.code();
            let error_body = body(error.into_stripe_response()).await;
            assert_eq!(error_body["error"]["type"], expected, "{code}");
            assert_eq!(error_body["error"]["code"], code);
        }
    }

    #[tokio::test]
    async fn other_routes_answer_without_a_type() {
        let error_body = body(ApiError::NotConnected.into_response()).await;
        assert_eq!(error_body["error"]["code"], "not_connected");
        assert!(error_body["error"].get("type").is_none(), "{error_body}");
    }
}
