//! Background re-verification: every process claims due connections with a lease (so no
//! two processes probe one connection at once), probes them with bounded concurrency under
//! a global budget of Stripe requests, and records what it finds.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::ReverifySettings;
use crate::connect::ConnectionService;
use crate::domain::random_id;
use crate::store::Store;

pub struct Reverifier {
    store: Arc<dyn Store>,
    connections: Arc<ConnectionService>,
    settings: ReverifySettings,
    /// Names this process in leases and the audit trail.
    owner: String,
    budget: DefaultDirectRateLimiter,
}

impl Reverifier {
    pub fn new(
        store: Arc<dyn Store>,
        connections: Arc<ConnectionService>,
        settings: ReverifySettings,
    ) -> Self {
        let per_second =
            NonZeroU32::new(settings.stripe_requests_per_second).unwrap_or(NonZeroU32::MIN);
        Self {
            store,
            connections,
            settings,
            owner: random_id("proc_", 12),
            budget: RateLimiter::direct(Quota::per_second(per_second)),
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Claims and verifies one batch; returns how many connections it took.
    pub async fn run_once(&self) -> usize {
        let now = crate::clock::now();
        let lease_until = now + Duration::from_secs(self.settings.lease_secs);
        let claimed = match self
            .store
            .claim_due_connections(
                &self.owner,
                now,
                lease_until,
                i64::from(self.settings.batch),
            )
            .await
        {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(error = %e, "could not claim connections to re-verify");
                return 0;
            }
        };
        let count = claimed.len();
        let per_verification =
            NonZeroU32::new(self.connections.required().len() as u32).unwrap_or(NonZeroU32::MIN);
        stream::iter(claimed)
            .for_each_concurrent(self.settings.concurrency as usize, |tenant| async move {
                // Each verification costs one request per required resource.
                if self.budget.until_n_ready(per_verification).await.is_err() {
                    tracing::error!("re-verification budget is below one verification's cost");
                    return;
                }
                self.connections.reverify_leased(&tenant, &self.owner).await;
            })
            .await;
        count
    }

    /// Runs until `stop` turns true, ticking every `tick_ms` with jitter; a full batch is
    /// followed immediately by the next.
    pub fn spawn(self, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let tick = Duration::from_millis(self.settings.tick_ms);
            loop {
                let pause = tick.mul_f64(rand::thread_rng().gen_range(0.5..1.5));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.wait_for(|stopped| *stopped) => return,
                }
                while self.run_once().await == self.settings.batch as usize {
                    if *stop.borrow() {
                        return;
                    }
                }
            }
        })
    }
}
