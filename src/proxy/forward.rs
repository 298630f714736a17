//! One proxied call: the tenant's key opened, the account's turn taken, the request sent
//! to Stripe, the use accounted, and a key Stripe refused looked at again now.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::Method;

use super::{AccountSmoothing, Allowlist, Endpoint};
use crate::connection::{ConnectionService, KeyAccess, KeyError};
use crate::domain::{random_id, TenantId};
use crate::store::{Store, StoreError};
use crate::stripe::Forward;

/// What the proxy needs, built once at start-up from `proxy.*`.
pub struct Proxy {
    allowlist: Allowlist,
    expand_allowed: Vec<String>,
    /// Shared with the recovery of missed events: one rate per account.
    smoothing: Arc<AccountSmoothing>,
    body_limit: usize,
    deadline: Duration,
    /// `proxy.stripe_versions`: the caller versions accepted (empty: any).
    stripe_versions: Vec<String>,
    keys: Arc<KeyAccess>,
    connections: Arc<ConnectionService>,
    store: Arc<dyn Store>,
}

/// A caller's request, checked against the allowlist and read whole.
pub struct ProxyCall<'a> {
    pub method: Method,
    pub endpoint: &'a Endpoint,
    /// The raw path below `/v1/`, never a decoded one: what was checked is what Stripe gets.
    pub below_v1: &'a str,
    pub query: Option<&'a str>,
    pub body: Bytes,
    /// The caller's `Idempotency-Key`, when usable.
    pub idempotency_key: Option<String>,
    /// The caller's `Stripe-Version`, checked; `None` sends the pinned `stripe.api_version`.
    pub stripe_version: Option<String>,
    /// The caller's deadline, already bounded by `proxy.deadline_ms`.
    pub deadline: Duration,
}

/// Stripe's answer, whatever its status.
pub struct ProxyAnswer {
    pub status: u16,
    pub body: Vec<u8>,
    pub request_id: Option<String>,
    pub idempotent_replayed: Option<String>,
    /// The idempotency key made up for a POST that came without one: the caller needs it
    /// to retry safely.
    pub generated_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("over the account's rate")]
    RateLimited { retry_after: Duration },
    #[error("Stripe did not answer")]
    StripeUnavailable,
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl Proxy {
    pub fn new(
        settings: &crate::config::ProxySettings,
        smoothing: Arc<AccountSmoothing>,
        keys: Arc<KeyAccess>,
        connections: Arc<ConnectionService>,
        store: Arc<dyn Store>,
    ) -> Self {
        Self {
            allowlist: settings.allowed.clone(),
            expand_allowed: settings.expand_allowed.clone(),
            smoothing,
            body_limit: settings.body_limit_bytes,
            deadline: settings.deadline,
            stripe_versions: settings.stripe_versions.clone(),
            keys,
            connections,
            store,
        }
    }

    /// The allowlisted endpoint `method` and the raw path below `/v1/` match, if any.
    pub fn endpoint(&self, method: &Method, below_v1: &str) -> Option<&Endpoint> {
        self.allowlist.find(method, below_v1)
    }

    /// Whether every `expand[]` of the query and the form body is in `proxy.expand_allowed`.
    pub fn expansions_allowed(&self, query: Option<&str>, body: &[u8]) -> bool {
        super::expansions_allowed(&self.expand_allowed, query, body)
    }

    /// `proxy.body_limit_bytes`.
    pub fn body_limit(&self) -> usize {
        self.body_limit
    }

    /// `proxy.deadline_ms`: the most a caller may ask for.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// The caller versions accepted (`proxy.stripe_versions`; empty: any).
    pub fn stripe_versions(&self) -> &[String] {
        &self.stripe_versions
    }

    /// Forwards an authenticated caller's call to Stripe with the tenant's key.
    pub async fn forward(
        &self,
        token_id: &str,
        tenant: &TenantId,
        call: ProxyCall<'_>,
    ) -> Result<ProxyAnswer, ProxyError> {
        let opened = self.keys.open(tenant).await?;
        if let Err(over) = self.smoothing.take_turn(tenant, opened.mode).await {
            return Err(ProxyError::RateLimited {
                retry_after: over.retry_after,
            });
        }
        // A POST Stripe has no idempotency key for is sent once, under one we make up and
        // return, so the caller can retry it safely; a GET is always safe to repeat.
        let given = call.idempotency_key.is_some();
        let generated = !given && call.method == Method::POST;
        let idempotency_key = call
            .idempotency_key
            .or_else(|| generated.then(|| random_id("atlas_", 32)));
        let retry = call.method == Method::GET || (call.method == Method::POST && given);
        let path_and_query = match call.query {
            Some(query) => format!("/v1/{}?{query}", call.below_v1),
            None => format!("/v1/{}", call.below_v1),
        };
        let request = Forward {
            method: call.method,
            endpoint: call.endpoint.template().to_owned(),
            path_and_query,
            body: call.body,
            idempotency_key: idempotency_key.clone(),
            stripe_version: call.stripe_version,
            retry,
            deadline: tokio::time::Instant::now() + call.deadline,
        };
        let forwarded = (self.connections.stripe())
            .forward(&opened.key, &request)
            .await;
        self.keys.record_stripe_call(token_id, tenant).await;
        let forwarded = forwarded.map_err(|failure| {
            tracing::warn!(endpoint = %request.endpoint, %failure, "a proxied call got no answer");
            ProxyError::StripeUnavailable
        })?;
        if forwarded.status == 401 {
            // The key no longer works: look at the connection again now, not in hours.
            self.store.mark_due_now(tenant).await?;
        }
        Ok(ProxyAnswer {
            status: forwarded.status,
            body: forwarded.body,
            request_id: forwarded.request_id,
            idempotent_replayed: forwarded.idempotent_replayed,
            generated_key: idempotency_key.filter(|_| generated),
        })
    }
}
