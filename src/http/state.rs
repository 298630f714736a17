use std::sync::Arc;

use crate::auth::{ServiceTokens, TenantTokens};
use crate::connection::{ConnectionService, KeyAccess};
use crate::crypto::Keyring;
use crate::proxy::Proxy;
use crate::store::Store;
use crate::webhooks::WebhookReceiver;

/// What every handler can reach. Cloned for every request: one reference count, not one
/// per field (each a cache line the two cores would fight over).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub store: Arc<dyn Store>,
    pub keyring: Arc<Keyring>,
    pub tenant_tokens: Arc<TenantTokens>,
    /// Every internal route's token check (the cache is live on PostgreSQL only).
    pub service_tokens: Arc<ServiceTokens<dyn Store>>,
    pub connections: Arc<ConnectionService>,
    /// The key fetch's and the proxy's access to a tenant's key.
    pub keys: Arc<KeyAccess>,
    pub health: Arc<crate::health::HealthMonitor>,
    pub proxy: Arc<Proxy>,
    pub webhooks: Arc<WebhookReceiver>,
    /// `internal.key_fetch_enabled`.
    pub key_fetch_enabled: bool,
    pub webhook_body_limit: usize,
    /// `server.body_limit_bytes`: what `AppJson` reads at most.
    pub api_body_limit: usize,
}
