use std::time::Duration;

use rand::Rng;
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use serde_json::Value;

use crate::domain::StripeKey;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StripeMethod {
    Get,
    Post,
    Delete,
}

impl StripeMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
            Self::Delete => "DELETE",
        }
    }
}

/// One request to Stripe. `form` is sent form-encoded (POST) or as the query (GET, DELETE),
/// with Stripe's bracket notation in the names (`enabled_events[]`, `metadata[tenant_id]`).
#[derive(Clone, Debug)]
pub struct StripeRequest {
    pub method: StripeMethod,
    /// The path template, for metrics and logs (`/v1/customers/{id}`).
    pub endpoint: &'static str,
    pub path: String,
    pub form: Vec<(String, String)>,
    /// Required on every creating POST, so a retry never creates a second object.
    pub idempotency_key: Option<String>,
}

/// A conclusive answer from Stripe: a 2xx, or a 4xx Stripe means (not 409/429), in Stripe's
/// JSON shape.
#[derive(Clone, Debug)]
pub struct StripeReply {
    pub status: u16,
    pub body: Value,
}

impl StripeReply {
    /// `error.type` of a Stripe error body.
    pub fn error_type(&self) -> Option<&str> {
        self.body.pointer("/error/type").and_then(Value::as_str)
    }

    /// `error.code` of a Stripe error body (e.g. `resource_missing`, `api_key_expired`).
    pub fn error_code(&self) -> Option<&str> {
        self.body.pointer("/error/code").and_then(Value::as_str)
    }
}

/// Why no conclusive answer came, after the retries allowed.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum StripeFailure {
    #[error("Stripe did not answer in time")]
    Timeout,
    #[error("could not reach Stripe")]
    Transport,
    #[error("Stripe answered {0}")]
    Status(u16),
    #[error("Stripe answered {0} with a body that is not Stripe's JSON")]
    UnexpectedBody(u16),
}

#[derive(Clone, Debug)]
pub struct StripeClientConfig {
    pub api_base: String,
    pub api_version: String,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub max_retries: u32,
    pub retry_base_delay: Duration,
    pub retry_max_delay: Duration,
}

impl StripeClientConfig {
    pub fn from_settings(s: &crate::config::StripeSettings) -> Self {
        Self {
            api_base: s.api_base.trim_end_matches('/').to_owned(),
            api_version: s.api_version.clone(),
            connect_timeout: s.connect_timeout,
            request_timeout: s.request_timeout,
            max_retries: s.max_retries,
            retry_base_delay: s.retry_base_delay,
            retry_max_delay: s.retry_max_delay,
        }
    }
}

/// Stripe's API over reqwest: bearer auth, pinned `Stripe-Version`, form bodies, bounded
/// retries with jittered exponential backoff that honour `Stripe-Should-Retry`.
#[derive(Clone)]
pub struct StripeClient {
    http: reqwest::Client,
    config: StripeClientConfig,
}

/// Stripe's answers are small; anything larger is not Stripe.
const MAX_BODY: usize = 1 << 20;

enum Attempt {
    Done(StripeReply),
    Retry(StripeFailure),
    Final(StripeFailure),
}

impl StripeClient {
    pub fn new(config: StripeClientConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .user_agent(concat!("atlas-stripe/", env!("CARGO_PKG_VERSION")))
            .https_only(config.api_base.starts_with("https://"))
            // A redirect is never Stripe's answer; following one could carry the key elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self { http, config })
    }

    pub fn api_version(&self) -> &str {
        &self.config.api_version
    }

    /// Sends `request`, retrying inconclusive answers, and returns Stripe's conclusive reply.
    pub async fn send(
        &self,
        key: &StripeKey,
        request: &StripeRequest,
    ) -> Result<StripeReply, StripeFailure> {
        let mut attempt = 0;
        loop {
            let outcome = self.attempt(key, request).await;
            let failure = match outcome {
                Attempt::Done(reply) => return Ok(reply),
                Attempt::Final(failure) => return Err(failure),
                Attempt::Retry(failure) => failure,
            };
            if attempt >= self.config.max_retries {
                return Err(failure);
            }
            attempt += 1;
            tracing::debug!(method = request.method.as_str(), attempt, %failure, "retrying Stripe request");
            tokio::time::sleep(self.backoff(attempt)).await;
        }
    }

    /// Forwards a charging service's request and returns Stripe's answer as it came. Retries
    /// only what `request.retry` says is safe, on the answers Stripe marks retryable
    /// (`Stripe-Should-Retry`, 409, 429, 5xx) and on transport errors, within the deadline.
    pub async fn forward(
        &self,
        key: &StripeKey,
        request: &Forward,
    ) -> Result<Forwarded, StripeFailure> {
        let mut attempt = 0;
        loop {
            let left = request
                .deadline
                .saturating_duration_since(tokio::time::Instant::now());
            let outcome = self.forward_once(key, request, left).await;
            let retryable = match &outcome {
                Ok((_, retryable)) => *retryable,
                Err(StripeFailure::Timeout | StripeFailure::Transport) => true,
                Err(_) => false,
            };
            let delay = self.backoff(attempt + 1);
            let in_time = tokio::time::Instant::now() + delay < request.deadline;
            if !(retryable && request.retry && attempt < self.config.max_retries && in_time) {
                return outcome.map(|(reply, _)| reply);
            }
            attempt += 1;
            tracing::debug!(endpoint = %request.endpoint, attempt, "retrying a forwarded request");
            tokio::time::sleep(delay).await;
        }
    }

    async fn forward_once(
        &self,
        key: &StripeKey,
        request: &Forward,
        left: Duration,
    ) -> Result<(Forwarded, bool), StripeFailure> {
        if left.is_zero() {
            return Err(StripeFailure::Timeout);
        }
        let url = format!("{}{}", self.config.api_base, request.path_and_query);
        let mut builder = self
            .http
            .request(request.method.clone(), url)
            .timeout(left.min(self.config.request_timeout))
            .bearer_auth(key.expose_secret())
            .header(
                "Stripe-Version",
                (request.stripe_version.as_deref()).unwrap_or(&self.config.api_version),
            );
        if let Some(idempotency_key) = &request.idempotency_key {
            builder = builder.header("Idempotency-Key", idempotency_key);
        }
        if !request.body.is_empty() || request.method == reqwest::Method::POST {
            builder = builder
                .header(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/x-www-form-urlencoded"),
                )
                .body(request.body.clone());
        }
        let started = std::time::Instant::now();
        let result = self.forward_read(builder).await;
        let outcome = match &result {
            Ok((reply, _)) => reply.status.to_string(),
            Err(StripeFailure::Timeout) => "timeout".into(),
            Err(StripeFailure::Transport) => "transport".into(),
            Err(StripeFailure::Status(s)) => s.to_string(),
            Err(StripeFailure::UnexpectedBody(s)) => format!("{s}_unexpected_body"),
        };
        metrics::counter!("atlas_stripe_requests_total", "endpoint" => request.endpoint.clone(), "outcome" => outcome).increment(1);
        metrics::histogram!("atlas_stripe_request_duration_seconds", "endpoint" => request.endpoint.clone()).record(started.elapsed().as_secs_f64());
        result
    }

    async fn forward_read(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> Result<(Forwarded, bool), StripeFailure> {
        let response = match builder.send().await {
            Ok(response) => response,
            Err(e) if e.is_timeout() => return Err(StripeFailure::Timeout),
            Err(_) => return Err(StripeFailure::Transport),
        };
        let status = response.status().as_u16();
        let header = |name: &str| {
            (response.headers().get(name))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let should_retry = header("Stripe-Should-Retry");
        let request_id = header("Request-Id");
        let idempotent_replayed = header("Idempotent-Replayed");
        let retryable = match should_retry.as_deref() {
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            _ => matches!(status, 409 | 429) || status >= 500,
        };
        let body = match read_bounded(response, MAX_BODY).await {
            Ok(body) => body,
            Err(BoundedReadError::TooLarge) => return Err(StripeFailure::UnexpectedBody(status)),
            Err(BoundedReadError::Read(e)) if e.is_timeout() => return Err(StripeFailure::Timeout),
            Err(BoundedReadError::Read(_)) => return Err(StripeFailure::Transport),
        };
        let reply = Forwarded {
            status,
            body,
            request_id,
            idempotent_replayed,
        };
        Ok((reply, retryable))
    }

    /// Full jitter: a random delay up to base·2^(attempt-1), capped.
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .config
            .retry_base_delay
            .saturating_mul(1 << (attempt - 1).min(16));
        let cap = exp.min(self.config.retry_max_delay);
        let millis = cap.as_millis() as u64;
        Duration::from_millis(rand::thread_rng().gen_range(millis / 2..=millis.max(1)))
    }

    async fn attempt(&self, key: &StripeKey, request: &StripeRequest) -> Attempt {
        let url = format!("{}{}", self.config.api_base, request.path);
        let method = match request.method {
            StripeMethod::Get => reqwest::Method::GET,
            StripeMethod::Post => reqwest::Method::POST,
            StripeMethod::Delete => reqwest::Method::DELETE,
        };
        let encoded = serde_urlencoded::to_string(&request.form).unwrap_or_default();
        let mut builder = self
            .http
            .request(method, url)
            .bearer_auth(key.expose_secret())
            .header("Stripe-Version", &self.config.api_version);
        if let Some(idempotency_key) = &request.idempotency_key {
            builder = builder.header("Idempotency-Key", idempotency_key);
        }
        builder = match request.method {
            StripeMethod::Post => builder
                .header(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/x-www-form-urlencoded"),
                )
                .body(encoded),
            _ if encoded.is_empty() => builder,
            _ => builder.query(&request.form),
        };
        let started = std::time::Instant::now();
        let attempt = self.send_once(builder).await;
        let outcome = match &attempt {
            Attempt::Done(reply) => reply.status.to_string(),
            Attempt::Retry(f) | Attempt::Final(f) => match f {
                StripeFailure::Timeout => "timeout".into(),
                StripeFailure::Transport => "transport".into(),
                StripeFailure::Status(s) => s.to_string(),
                StripeFailure::UnexpectedBody(s) => format!("{s}_unexpected_body"),
            },
        };
        metrics::counter!("atlas_stripe_requests_total", "endpoint" => request.endpoint, "outcome" => outcome.clone()).increment(1);
        metrics::histogram!("atlas_stripe_request_duration_seconds", "endpoint" => request.endpoint).record(started.elapsed().as_secs_f64());
        tracing::debug!(method = request.method.as_str(), endpoint = request.endpoint, %outcome, "Stripe answered");
        attempt
    }

    async fn send_once(&self, builder: reqwest::RequestBuilder) -> Attempt {
        let response = match builder.send().await {
            Ok(response) => response,
            Err(e) if e.is_timeout() => return Attempt::Retry(StripeFailure::Timeout),
            Err(_) => return Attempt::Retry(StripeFailure::Transport),
        };
        let status = response.status().as_u16();
        let should_retry = response
            .headers()
            .get("Stripe-Should-Retry")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.eq_ignore_ascii_case("true"));
        let bytes = match read_bounded(response, MAX_BODY).await {
            Ok(bytes) => bytes,
            // A larger answer is not Stripe's, and will not be smaller next time.
            Err(BoundedReadError::TooLarge) => {
                return Attempt::Final(StripeFailure::UnexpectedBody(status))
            }
            Err(BoundedReadError::Read(e)) if e.is_timeout() => {
                return Attempt::Retry(StripeFailure::Timeout)
            }
            Err(BoundedReadError::Read(_)) => return Attempt::Retry(StripeFailure::Transport),
        };
        classify(status, should_retry, &bytes)
    }
}

/// A charging service's request, forwarded as it came (the proxy), with the tenant's key.
#[derive(Debug)]
pub struct Forward {
    pub method: reqwest::Method,
    /// The allowlisted template it matched (for metrics and logs).
    pub endpoint: String,
    /// `/v1/…` and the query string, as the caller sent them.
    pub path_and_query: String,
    /// The form body, as the caller sent it.
    pub body: axum::body::Bytes,
    pub idempotency_key: Option<String>,
    /// The caller's `Stripe-Version`; `None` sends the pinned `stripe.api_version`.
    pub stripe_version: Option<String>,
    /// Whether the request is safe to send again (a GET, or a POST with an idempotency key).
    pub retry: bool,
    pub deadline: tokio::time::Instant,
}

/// Stripe's answer to a forwarded request, whatever its status.
#[derive(Debug)]
pub struct Forwarded {
    pub status: u16,
    pub body: Vec<u8>,
    pub request_id: Option<String>,
    pub idempotent_replayed: Option<String>,
}

pub(crate) enum BoundedReadError {
    TooLarge,
    Read(reqwest::Error),
}

/// Reads a response body, but never more than `cap` bytes, whatever its framing: a
/// `Content-Length` over the cap is refused before reading, and a chunked body is cut off
/// as soon as it passes the cap.
pub(crate) async fn read_bounded(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>, BoundedReadError> {
    if response
        .content_length()
        .is_some_and(|len| len > cap as u64)
    {
        return Err(BoundedReadError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BoundedReadError::Read)? {
        if body.len() + chunk.len() > cap {
            return Err(BoundedReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Sorts an answer into conclusive, retryable or final-but-inconclusive.
fn classify(status: u16, should_retry: Option<bool>, bytes: &[u8]) -> Attempt {
    let body: Option<Value> = serde_json::from_slice(bytes).ok();
    let is_success = (200..300).contains(&status);
    let well_formed = match &body {
        Some(Value::Object(_)) if is_success => true,
        Some(body) => body.pointer("/error/type").is_some_and(Value::is_string),
        None => false,
    };
    let retryable_status = matches!(status, 409 | 429) || status >= 500;
    match (well_formed, should_retry) {
        // Stripe says explicitly whether a retry may succeed; believe it.
        (_, Some(true)) => Attempt::Retry(failure(status, well_formed)),
        (true, Some(false)) if retryable_status => Attempt::Final(StripeFailure::Status(status)),
        (false, Some(false)) => Attempt::Final(StripeFailure::UnexpectedBody(status)),
        (false, None) => Attempt::Retry(StripeFailure::UnexpectedBody(status)),
        (true, _) if retryable_status => Attempt::Retry(StripeFailure::Status(status)),
        (true, _) if is_success || (400..500).contains(&status) => Attempt::Done(StripeReply {
            status,
            body: body.unwrap_or(Value::Null),
        }),
        (true, _) => Attempt::Retry(StripeFailure::Status(status)),
    }
}

fn failure(status: u16, well_formed: bool) -> StripeFailure {
    if well_formed {
        StripeFailure::Status(status)
    } else {
        StripeFailure::UnexpectedBody(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(a: Attempt) -> String {
        match a {
            Attempt::Done(r) => format!("done {}", r.status),
            Attempt::Retry(f) => format!("retry {f:?}"),
            Attempt::Final(f) => format!("final {f:?}"),
        }
    }

    #[test]
    fn classifies_answers() {
        let err = br#"{"error":{"type":"invalid_request_error","code":"resource_missing"}}"#;
        assert_eq!(kind(classify(404, None, err)), "done 404");
        assert_eq!(kind(classify(403, None, err)), "done 403");
        assert_eq!(kind(classify(200, None, b"{}")), "done 200");
        assert_eq!(kind(classify(429, None, err)), "retry Status(429)");
        assert_eq!(kind(classify(409, None, err)), "retry Status(409)");
        assert_eq!(kind(classify(500, None, err)), "retry Status(500)");
        assert_eq!(kind(classify(500, Some(false), err)), "final Status(500)");
        assert_eq!(kind(classify(400, Some(true), err)), "retry Status(400)");
        assert_eq!(
            kind(classify(404, None, b"<html>")),
            "retry UnexpectedBody(404)"
        );
        assert_eq!(
            kind(classify(200, None, b"[]")),
            "retry UnexpectedBody(200)"
        );
        assert_eq!(
            kind(classify(404, None, br#"{"message":"x"}"#)),
            "retry UnexpectedBody(404)"
        );
        assert_eq!(kind(classify(302, None, err)), "retry Status(302)");
    }
}
