//! Service tokens the database has vouched for, kept in memory so that the key fetch reads
//! one row (the tenant's key) instead of joining the token to it.
//!
//! A revocation must not outlive its commit by more than a moment, in every instance. So
//! the cache is only *live* while a listener is subscribed to the database's notice of
//! every change to `service_tokens` (PostgreSQL `LISTEN`/`NOTIFY`, sent by a trigger at
//! commit, whoever made the change: the CLI, another instance, an operator's SQL):
//! - each notice empties the cache;
//! - losing the subscription empties it and turns it off (every request asks the
//!   database, as before) until a new subscription is in place;
//! - an entry is at most [`MAX_AGE`] old, in case a subscription stalls without failing;
//! - a token read from the database is only remembered if no notice came while it was
//!   being read (a generation count), so a read that raced a revocation is not kept.
//!
//! Only tokens that exist, are unrevoked and matched the presented secret are kept: what
//! an unauthenticated caller sends never grows the cache. The entry holds the stored hash
//! and scopes, never a secret. SQLite has no notices across processes (the CLI is one), so
//! there the cache is never live.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::{Scope, ServiceTokenHash};

/// The channel the `service_tokens` trigger notifies (migration 8).
pub const CHANNEL: &str = "atlas_service_tokens";

/// The longest an entry is trusted, even with the subscription apparently healthy: the
/// bound on a revocation's delay should the subscription stall without failing.
pub const MAX_AGE: Duration = Duration::from_secs(5);

/// A token as the database last vouched for it.
#[derive(Clone, Debug)]
pub struct VouchedToken {
    pub hash: ServiceTokenHash,
    pub scopes: BTreeSet<Scope>,
    vouched_at: Instant,
}

pub struct ServiceTokenCache {
    live: AtomicBool,
    inner: RwLock<Inner>,
    /// `atlas_service_token_cache_total{outcome="hit"|"miss"}`: whether it serves.
    hits: metrics::Counter,
    misses: metrics::Counter,
    /// This cache's own hits: the metric above adds up every cache in the process (tests
    /// run several applications in one).
    served: AtomicU64,
}

impl Default for ServiceTokenCache {
    fn default() -> Self {
        let counter = |outcome: &'static str| metrics::counter!("atlas_service_token_cache_total", "outcome" => outcome);
        Self {
            live: AtomicBool::new(false),
            inner: RwLock::default(),
            hits: counter("hit"),
            misses: counter("miss"),
            served: AtomicU64::new(0),
        }
    }
}

#[derive(Default)]
struct Inner {
    generation: u64,
    tokens: HashMap<String, Arc<VouchedToken>>,
}

/// What [`ServiceTokenCache::generation`] returned before a database read.
#[derive(Clone, Copy, Debug)]
pub struct Generation(Option<u64>);

impl ServiceTokenCache {
    /// A live token entry, if the cache is live and holds one young enough.
    pub fn get(&self, token_id: &str) -> Option<Arc<VouchedToken>> {
        self.get_at(token_id, Instant::now())
    }

    /// [`Self::get`] as of `now`.
    fn get_at(&self, token_id: &str, now: Instant) -> Option<Arc<VouchedToken>> {
        let found = self.live.load(Ordering::Acquire).then(|| {
            let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
            let token = inner.tokens.get(token_id)?;
            (now.saturating_duration_since(token.vouched_at) < MAX_AGE).then(|| token.clone())
        });
        let found = found.flatten();
        match found {
            Some(_) => {
                self.hits.increment(1);
                self.served.fetch_add(1, Ordering::Relaxed);
            }
            None => self.misses.increment(1),
        }
        found
    }

    /// How often this cache served a token.
    pub fn hits(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Take before reading a token from the database; hand to [`Self::remember`].
    pub fn generation(&self) -> Generation {
        if !self.live.load(Ordering::Acquire) {
            return Generation(None);
        }
        Generation(Some(
            self.inner
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .generation,
        ))
    }

    /// Keeps an unrevoked token the database returned, unless a change was noticed (or the
    /// cache went off) since `seen` was taken.
    pub fn remember(
        &self,
        token_id: &str,
        hash: &ServiceTokenHash,
        scopes: &BTreeSet<Scope>,
        seen: Generation,
    ) {
        self.remember_at(token_id, hash, scopes, seen, Instant::now());
    }

    /// [`Self::remember`] as of `now`.
    fn remember_at(
        &self,
        token_id: &str,
        hash: &ServiceTokenHash,
        scopes: &BTreeSet<Scope>,
        seen: Generation,
        now: Instant,
    ) {
        let Generation(Some(seen)) = seen else {
            return;
        };
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if inner.generation != seen || !self.live.load(Ordering::Acquire) {
            return;
        }
        inner.tokens.insert(
            token_id.to_owned(),
            Arc::new(VouchedToken {
                hash: hash.clone(),
                scopes: scopes.clone(),
                vouched_at: now,
            }),
        );
    }

    /// A change to `service_tokens` was noticed: forget everything.
    pub fn invalidate(&self) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.generation += 1;
        inner.tokens.clear();
    }

    /// The subscription started (`true`) or was lost (`false`). Either way what was kept
    /// is forgotten: notices may have been missed in between.
    pub fn set_live(&self, live: bool) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.generation += 1;
        inner.tokens.clear();
        self.live.store(live, Ordering::Release);
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> (ServiceTokenHash, BTreeSet<Scope>) {
        (ServiceTokenHash([7; 32]), BTreeSet::from([Scope::KeysRead]))
    }

    #[test]
    fn nothing_is_kept_or_served_while_not_live() {
        let cache = ServiceTokenCache::default();
        let (hash, scopes) = token();
        cache.remember("tok", &hash, &scopes, cache.generation());
        assert!(cache.get("tok").is_none());
        cache.set_live(true);
        assert!(cache.get("tok").is_none(), "kept while off");
        cache.remember("tok", &hash, &scopes, cache.generation());
        assert_eq!(cache.get("tok").unwrap().scopes, scopes);
        cache.set_live(false);
        assert!(cache.get("tok").is_none());
        cache.set_live(true);
        assert!(
            cache.get("tok").is_none(),
            "kept across a lost subscription"
        );
    }

    #[test]
    fn a_read_that_raced_a_change_is_not_kept() {
        let cache = ServiceTokenCache::default();
        cache.set_live(true);
        let (hash, scopes) = token();
        let seen = cache.generation();
        // The token is revoked (and noticed) while the database read is in flight.
        cache.invalidate();
        cache.remember("tok", &hash, &scopes, seen);
        assert!(cache.get("tok").is_none());
        // The subscription was lost and found again meanwhile: the same.
        let seen = cache.generation();
        cache.set_live(false);
        cache.set_live(true);
        cache.remember("tok", &hash, &scopes, seen);
        assert!(cache.get("tok").is_none());
    }

    #[test]
    fn an_entry_is_trusted_for_five_seconds_at_most() {
        let cache = ServiceTokenCache::default();
        cache.set_live(true);
        let (hash, scopes) = token();
        let vouched = Instant::now();
        cache.remember_at("tok", &hash, &scopes, cache.generation(), vouched);
        let at = |millis| vouched + Duration::from_millis(millis);
        assert!(cache.get_at("tok", at(4_900)).is_some());
        assert!(cache.get_at("tok", at(5_000)).is_none(), "trusted past 5 s");
        assert!(cache.get_at("tok", at(3_600_000)).is_none());
        assert_eq!(cache.hits(), 1);
    }

    #[test]
    fn a_notice_forgets_every_token() {
        let cache = ServiceTokenCache::default();
        cache.set_live(true);
        let (hash, scopes) = token();
        for id in ["a", "b"] {
            cache.remember(id, &hash, &scopes, cache.generation());
        }
        assert!(cache.get("a").is_some() && cache.get("b").is_some());
        cache.invalidate();
        assert!(cache.get("a").is_none() && cache.get("b").is_none());
    }
}
