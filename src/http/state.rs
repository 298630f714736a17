use std::sync::Arc;

use crate::accounting::KeyFetchRecorder;
use crate::auth::TenantTokens;
use crate::connection::ConnectionService;
use crate::crypto::Keyring;
use crate::store::Store;

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

impl axum::extract::FromRef<AppState> for super::extract::BodyLimit {
    fn from_ref(state: &AppState) -> Self {
        Self(state.api_body_limit)
    }
}

pub struct Shared {
    pub store: Arc<dyn Store>,
    pub keyring: Arc<Keyring>,
    pub tenant_tokens: Arc<TenantTokens>,
    pub connections: Arc<ConnectionService>,
    pub health: Arc<crate::health::HealthMonitor>,
    pub proxy: Arc<super::proxy::ProxyState>,
    /// `internal.key_fetch_enabled`.
    pub key_fetch_enabled: bool,
    pub key_fetches: KeyFetchRecorder,
    /// Service tokens the database vouched for (live on PostgreSQL only).
    pub service_tokens: Arc<crate::auth::ServiceTokenCache>,
    pub webhook_tolerance_secs: i64,
    pub webhook_body_limit: usize,
    /// `server.body_limit_bytes`: what `AppJson` reads at most.
    pub api_body_limit: usize,
}
