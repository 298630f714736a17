use std::sync::Arc;

use crate::accounting::KeyFetchRecorder;
use crate::auth::TenantTokens;
use crate::connection::ConnectionService;
use crate::crypto::Keyring;
use crate::store::Store;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub keyring: Arc<Keyring>,
    pub tenant_tokens: Arc<TenantTokens>,
    pub connections: Arc<ConnectionService>,
    pub health: Arc<crate::health::HealthMonitor>,
    pub proxy: Arc<super::proxy::ProxyState>,
    /// `internal.key_fetch_enabled`.
    pub key_fetch_enabled: bool,
    pub key_fetches: KeyFetchRecorder,
    pub webhook_tolerance_secs: i64,
    pub webhook_body_limit: usize,
}
