//! A tenant's key, opened for use by a charging service: the key fetch hands it over, the
//! proxy calls Stripe with it. Both open it here.

use std::sync::Arc;

use crate::accounting::{KeyFetchRecorder, Usage};
use crate::auth::{AuthError, PresentedServiceToken, Scope, ServiceTokens, StoredToken};
use crate::crypto::{CryptoError, Keyring, SecretContext};
use crate::domain::{ConnectionStatus, KeyKind, Mode, StripeKey, TenantId};
use crate::store::{FetchedKey, Store, StoreError};

/// An open key, with what the caller is told about it.
pub struct OpenedKey {
    pub key: StripeKey,
    pub mode: Mode,
    pub key_type: KeyKind,
    /// `active` or `needs_attention`: a revoked key is never opened.
    pub status: ConnectionStatus,
}

/// Why no key was handed over. Nothing here holds a key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Auth(#[from] AuthError<StoreError>),
    #[error("no connection")]
    NotConnected,
    #[error("the connection is {}", .0.as_str())]
    NotActive(ConnectionStatus),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
}

/// What opening a key for a charging service needs, built once at start-up.
pub struct KeyAccess {
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    tokens: Arc<ServiceTokens<dyn Store>>,
    usage: KeyFetchRecorder,
}

impl KeyAccess {
    pub fn new(
        store: Arc<dyn Store>,
        keyring: Arc<Keyring>,
        tokens: Arc<ServiceTokens<dyn Store>>,
        usage: KeyFetchRecorder,
    ) -> Self {
        Self {
            store,
            keyring,
            tokens,
            usage,
        }
    }

    /// The charging services' hot path: one database round trip (the sealed key, joined to
    /// the token unless the token cache vouches for it), two AES-GCM opens, and accounting
    /// handed to a background writer.
    pub async fn fetch(
        &self,
        presented: &PresentedServiceToken,
        tenant: &TenantId,
    ) -> Result<OpenedKey, KeyError> {
        let alone = self.store.find_api_key(tenant);
        let joined = async {
            let fetch = self.store.fetch_key(presented.id(), tenant).await?;
            Ok(fetch.map(|fetch| {
                let token = StoredToken {
                    hash: fetch.token_hash,
                    scopes: fetch.token_scopes,
                    revoked: fetch.token_revoked,
                };
                (token, fetch.connection)
            }))
        };
        let found = (self.tokens)
            .authenticate_with(presented, Scope::KeysRead, alone, joined)
            .await?;
        let opened = self.open_key(tenant, found)?;
        self.usage.record(presented.id(), tenant).await;
        Ok(opened)
    }

    /// The tenant's key for a caller already authenticated (the proxy): one row.
    pub async fn open(&self, tenant: &TenantId) -> Result<OpenedKey, KeyError> {
        let found = self.store.find_api_key(tenant).await?;
        self.open_key(tenant, found)
    }

    /// Accounts a call made through the proxy with the tenant's key.
    pub async fn record_stripe_call(&self, token_id: &str, tenant: &TenantId) {
        self.usage
            .record_usage(Usage::StripeCall, token_id, tenant)
            .await;
    }

    /// The one place a key is opened for use: never a revoked one.
    fn open_key(
        &self,
        tenant: &TenantId,
        found: Option<FetchedKey>,
    ) -> Result<OpenedKey, KeyError> {
        let found = found.ok_or(KeyError::NotConnected)?;
        if found.status == ConnectionStatus::Revoked {
            return Err(KeyError::NotActive(found.status));
        }
        let context = SecretContext::api_key(&found.secret_id, tenant, found.mode);
        let key = self.keyring.open_stripe_key(&context, &found.sealed)?;
        Ok(OpenedKey {
            key,
            mode: found.mode,
            key_type: found.key_type,
            status: found.status,
        })
    }
}
