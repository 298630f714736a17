//! Extractors that turn raw requests into domain values, or into our error shape.

use std::marker::PhantomData;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Path, RawPathParams, Request};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use futures_util::StreamExt;
use http_body::Body as _;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::state::AppState;
use crate::auth::{PresentedServiceToken, Scope};
use crate::domain::TenantId;

/// JSON body whose every failure is our error shape, read within `server.body_limit_bytes`.
/// Parses to a `Value` first so that a data error (wrong type, missing field) never echoes
/// the value sent, which may be a key.
pub struct AppJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for AppJson<T>
where
    BodyLimit: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = read_body(req.into_body(), BodyLimit::from_ref(state).0).await?;
        let axum::Json(value) =
            axum::Json::<serde_json::Value>::from_bytes(&bytes).map_err(|rejection| {
                ApiError::InvalidJson(
                    match rejection {
                        JsonRejection::JsonSyntaxError(_) => "The request body is not valid JSON.",
                        _ => "The request body could not be read as JSON.",
                    }
                    .into(),
                )
            })?;
        serde_json::from_value(value).map(AppJson).map_err(|e| {
            let message = e.to_string();
            let field = message
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next());
            ApiError::InvalidJson(match field {
                Some(field) => format!("The JSON body lacks the field \"{field}\"."),
                None => "The JSON body has a field of the wrong type or an unknown shape.".into(),
            })
        })
    }
}

/// Like [`AppJson`], for a route whose body may be left out: no body (or an empty one) is
/// `None`.
pub struct OptionalAppJson<T>(pub Option<T>);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for OptionalAppJson<T>
where
    BodyLimit: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        let bytes = read_body(body, BodyLimit::from_ref(state).0).await?;
        if bytes.is_empty() {
            return Ok(Self(None));
        }
        let req = Request::from_parts(parts, Body::from(bytes));
        let AppJson(value) = AppJson::from_request(req, state).await?;
        Ok(Self(Some(value)))
    }
}

/// `application/json` or `application/<anything>+json`, parameters allowed: what axum's
/// `Json` accepts.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    let subtype = subtype.to_ascii_lowercase();
    kind.eq_ignore_ascii_case("application") && (subtype == "json" || subtype.ends_with("+json"))
}

/// A request body read whole within `limit` bytes (a declared length over it is refused
/// before a byte is read), or 413, or 408 when its read deadline passed, or 503 when the
/// body budget ran out while it arrived (`crate::server`).
///
/// A body of declared length is copied into one buffer of that length as it arrives, each
/// chunk dropped at once: what a stalled body holds is its bytes, not hyper's read buffers
/// behind the chunks (measured: about 2.5 times the bytes when the chunks are kept).
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let failed = |e: axum::Error| {
        if crate::server::is_body_deadline(&e) {
            ApiError::RequestTimeout
        } else if crate::server::is_budget_spent(&e) {
            ApiError::Overloaded
        } else {
            ApiError::PayloadTooLarge(limit)
        }
    };
    // `to_bytes` alone would wait for the body until the limit is crossed or the deadline
    // passes: the declared length (hyper's exact size hint) is judged first.
    let hint = body.size_hint();
    if hint.lower() > limit as u64 {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let Some(declared) = hint.exact() else {
        return axum::body::to_bytes(body, limit).await.map_err(failed);
    };
    // At most `limit` (checked above), so it fits.
    let mut buffer = Vec::with_capacity(usize::try_from(declared).unwrap_or(limit));
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(failed)?;
        if buffer.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buffer))
}

/// `server.body_limit_bytes`, made visible to [`AppJson`] through the state.
#[derive(Clone, Copy, Debug, Default)]
pub struct BodyLimit(pub usize);

impl FromRef<AppState> for BodyLimit {
    fn from_ref(state: &AppState) -> Self {
        Self(state.api_body_limit)
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A well-formed service token, not yet checked against the store: the key fetch checks it
/// in the same query that reads the key.
impl<S: Send + Sync> FromRequestParts<S> for PresentedServiceToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        bearer(parts)
            .and_then(PresentedServiceToken::parse)
            .ok_or(ApiError::Unauthenticated)
    }
}

/// The tenant a tenant token authorises, matched against `{tenant_id}` in the path.
/// A token for another tenant gets the same 404 as a tenant that does not exist.
pub struct AuthorizedTenant(pub TenantId);

impl FromRequestParts<AppState> for AuthorizedTenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or(ApiError::Unauthenticated)?;
        let claimed = state
            .tenant_tokens
            .verify(token)
            .map_err(|_| ApiError::Unauthenticated)?;
        let Path(path_tenant) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::RouteNotFound)?;
        if claimed != path_tenant {
            return Err(ApiError::NotConnected);
        }
        let tenant = parse_tenant_path(&path_tenant)?;
        tracing::Span::current().record("tenant_id", tenant.as_str());
        Ok(Self(tenant))
    }
}

/// A scope a route requires, as a type, so the extractor judges it before any parameter.
pub trait RequiredScope: Send + Sync {
    const SCOPE: Scope;
}

pub struct TenantsWrite;
impl RequiredScope for TenantsWrite {
    const SCOPE: Scope = Scope::TenantsWrite;
}

pub struct OpsRead;
impl RequiredScope for OpsRead {
    const SCOPE: Scope = Scope::OpsRead;
}

pub struct OpsWrite;
impl RequiredScope for OpsWrite {
    const SCOPE: Scope = Scope::OpsWrite;
}

pub struct EventsRead;
impl RequiredScope for EventsRead {
    const SCOPE: Scope = Scope::EventsRead;
}

pub struct EventsWrite;
impl RequiredScope for EventsWrite {
    const SCOPE: Scope = Scope::EventsWrite;
}

pub struct StripeCall;
impl RequiredScope for StripeCall {
    const SCOPE: Scope = Scope::StripeCall;
}

/// An internal caller holding a valid, unrevoked service token with scope `S`. Extract it
/// first: a caller without the scope learns nothing about the parameters (403 before 400).
pub struct ServiceCaller<S> {
    pub token_id: String,
    scope: PhantomData<S>,
}

impl<S: RequiredScope> FromRequestParts<AppState> for ServiceCaller<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented = PresentedServiceToken::from_request_parts(parts, state).await?;
        (state.service_tokens)
            .authenticate(&presented, S::SCOPE)
            .await?;
        Ok(Self {
            token_id: presented.id().to_owned(),
            scope: PhantomData,
        })
    }
}

/// `{tenant_id}` of an internal route, parsed.
pub struct TenantPath(pub TenantId);

impl<S: Send + Sync> FromRequestParts<S> for TenantPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::RouteNotFound)?;
        let raw = (params.iter())
            .find(|(name, _)| *name == "tenant_id")
            .map(|(_, value)| value)
            .ok_or(ApiError::RouteNotFound)?;
        let tenant = parse_tenant_path(raw)?;
        tracing::Span::current().record("tenant_id", tenant.as_str());
        Ok(Self(tenant))
    }
}

/// A tenant id from a path, or 400 `invalid_request` saying what a tenant id is.
pub fn parse_tenant_path(raw: &str) -> Result<TenantId, ApiError> {
    TenantId::parse(raw).map_err(|e| ApiError::InvalidRequest(format!("{e}.")))
}

/// A query string whose every failure (a repeated or malformed parameter) is a 400
/// `invalid_request` in our error shape, never echoing what was sent.
pub struct AppQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for AppQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded::from_str(query).map(Self).map_err(|_| {
            ApiError::InvalidRequest(
                "The query string does not parse: give each parameter at most once, \
                 URL-encoded."
                    .into(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn json_content_types_are_what_axum_accepts() {
        let judge = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
            is_json(&headers)
        };
        for yes in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/merge-patch+json",
        ] {
            assert!(judge(yes), "{yes}");
        }
        for no in [
            "text/json",
            "application/jsonx",
            "application/x-www-form-urlencoded",
            "json",
            "",
        ] {
            assert!(!judge(no), "{no}");
        }
        assert!(!is_json(&HeaderMap::new()));
    }
}
