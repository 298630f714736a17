//! The one service-token check every internal route makes, the proxy included: the token
//! cache when it vouches for the token, else the database.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;

use super::{PresentedServiceToken, Scope, ServiceTokenCache, ServiceTokenHash};

/// A service token as the database holds it.
#[derive(Clone, Debug)]
pub struct StoredToken {
    pub hash: ServiceTokenHash,
    pub scopes: BTreeSet<Scope>,
    pub revoked: bool,
}

/// Where tokens are read from. The store implements it, so that this module needs
/// nothing of the store (which depends on this one).
#[async_trait]
pub trait TokenLookup: Send + Sync {
    type Error: Send;

    async fn find_token(&self, id: &str) -> Result<Option<StoredToken>, Self::Error>;
}

/// Why a presented token was refused, or could not be judged.
#[derive(Debug, thiserror::Error)]
pub enum AuthError<E> {
    /// No such token, revoked, or the secret part does not match.
    #[error("unauthenticated")]
    Unauthenticated,
    #[error("the token lacks the {} scope", .0.as_str())]
    InsufficientScope(Scope),
    /// The token could not be read.
    #[error("looking the token up failed")]
    Lookup(E),
}

/// Service tokens, judged the same way for every route.
pub struct ServiceTokens<L: ?Sized> {
    lookup: Arc<L>,
    cache: Arc<ServiceTokenCache>,
}

impl<L: TokenLookup + ?Sized> ServiceTokens<L> {
    pub fn new(lookup: Arc<L>, cache: Arc<ServiceTokenCache>) -> Self {
        Self { lookup, cache }
    }

    /// The cache, for the listener that keeps it honest.
    pub fn cache(&self) -> &Arc<ServiceTokenCache> {
        &self.cache
    }

    /// Whether `presented` is a live token carrying `scope`: 401 before 403.
    pub async fn authenticate(
        &self,
        presented: &PresentedServiceToken,
        scope: Scope,
    ) -> Result<(), AuthError<L::Error>> {
        let joined = async {
            let token = self.lookup.find_token(presented.id()).await?;
            Ok(token.map(|token| (token, ())))
        };
        self.authenticate_with(presented, scope, async { Ok(()) }, joined)
            .await
    }

    /// [`Self::authenticate`], and a read that goes with it: `alone` when the cache vouches
    /// for the token, else `joined`, which reads the token with it in one round trip (the
    /// key fetch). Neither future runs unless chosen.
    pub async fn authenticate_with<T>(
        &self,
        presented: &PresentedServiceToken,
        scope: Scope,
        alone: impl Future<Output = Result<T, L::Error>>,
        joined: impl Future<Output = Result<Option<(StoredToken, T)>, L::Error>>,
    ) -> Result<T, AuthError<L::Error>> {
        if let Some(token) = self.cache.get(presented.id()) {
            if !presented.matches(&token.hash) {
                return Err(AuthError::Unauthenticated);
            }
            carries(&token.scopes, scope)?;
            return alone.await.map_err(AuthError::Lookup);
        }
        // The token is remembered only if no change was noticed while it was read.
        let seen = self.cache.generation();
        let (token, read) = joined
            .await
            .map_err(AuthError::Lookup)?
            .ok_or(AuthError::Unauthenticated)?;
        if token.revoked || !presented.matches(&token.hash) {
            return Err(AuthError::Unauthenticated);
        }
        self.cache
            .remember(presented.id(), &token.hash, &token.scopes, seen);
        carries(&token.scopes, scope)?;
        Ok(read)
    }
}

fn carries<E>(scopes: &BTreeSet<Scope>, scope: Scope) -> Result<(), AuthError<E>> {
    if scopes.contains(&scope) {
        Ok(())
    } else {
        Err(AuthError::InsufficientScope(scope))
    }
}
