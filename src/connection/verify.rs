//! Verification: on demand (`POST …/verify`) and in the background. Every process claims
//! due connections with a lease (so no two processes probe one connection at once), probes
//! them with bounded concurrency under a budget of Stripe requests, and records what it
//! finds: every required permission → `active`, some missing → `needs_attention`, 401 →
//! `revoked` (never probed again), inconclusive → unchanged and retried later.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use time::OffsetDateTime;
use tokio::sync::{watch, OnceCell};
use tokio::task::JoinHandle;

use super::{Attempt, ConnectError, ConnectionService};
use crate::config::ReverifySettings;
use crate::domain::{random_id, ConnectionStatus, TenantId};
use crate::store::{Actor, ConnectionRecord, Store, Verification};
use crate::stripe::{probe_write_access, ProbeError};

/// When a verified connection is next looked at again.
#[derive(Clone, Copy, Debug)]
pub struct VerifySchedule {
    pub interval: Duration,
    pub jitter: Duration,
    pub retry: Duration,
}

impl VerifySchedule {
    /// `interval` plus up to `jitter` either way, so connections verified together drift
    /// apart instead of hitting Stripe in waves.
    pub fn next_due(&self) -> OffsetDateTime {
        let jitter = self.jitter.as_secs() as i64;
        let spread = if jitter > 0 {
            rand::thread_rng().gen_range(-jitter..=jitter)
        } else {
            0
        };
        crate::clock::now() + self.interval + time::Duration::seconds(spread)
    }

    pub fn retry_due(&self) -> OffsetDateTime {
        crate::clock::now() + self.retry
    }
}

/// One verify run of a tenant that concurrent verifies share.
pub(super) type Flight = Arc<OnceCell<Result<ConnectionRecord, ConnectError>>>;

impl ConnectionService {
    /// `POST …/verify`: verifies arriving while one runs for the same tenant share its
    /// outcome (one probe run, whatever the number of callers); starting a run takes an
    /// attempt under the tenant's verify limit.
    pub async fn verify_on_demand(
        &self,
        tenant: &TenantId,
        actor: &Actor,
    ) -> Result<ConnectionRecord, ConnectError> {
        let (flight, joined) = {
            let mut verifying = self.verifying.lock().unwrap_or_else(|e| e.into_inner());
            match verifying.get(tenant) {
                Some(flight) => (flight.clone(), true),
                None => {
                    let flight = Flight::default();
                    verifying.insert(tenant.clone(), flight.clone());
                    (flight, false)
                }
            }
        };
        let outcome = flight
            .get_or_init(|| async {
                if !joined {
                    self.take_attempt(tenant, Attempt::Verify).await?;
                }
                self.verify(tenant, actor).await
            })
            .await
            .clone();
        // The run is over: the next verify starts a new one.
        let mut verifying = self.verifying.lock().unwrap_or_else(|e| e.into_inner());
        if verifying
            .get(tenant)
            .is_some_and(|f| Arc::ptr_eq(f, &flight))
        {
            verifying.remove(tenant);
        }
        outcome
    }

    /// Re-probes the stored key and records the outcome. An inconclusive probe changes
    /// nothing.
    pub async fn verify(
        &self,
        tenant: &TenantId,
        actor: &Actor,
    ) -> Result<ConnectionRecord, ConnectError> {
        let record = self
            .store
            .find_connection(tenant)
            .await?
            .ok_or(ConnectError::NotConnected)?;
        let key = self.open_key(&record)?;
        let probed =
            probe_write_access(&self.stripe, &key, &self.required, self.probe_deadline).await;
        let (status, permissions) = match probed {
            Ok(report) if report.grants_all(&self.required) => (ConnectionStatus::Active, report),
            Ok(report) => (ConnectionStatus::NeedsAttention, report),
            Err(ProbeError::KeyRejected { .. }) => {
                (ConnectionStatus::Revoked, record.permissions.clone())
            }
            Err(inconclusive) => return Err(inconclusive.into()),
        };
        let verification = Verification {
            status,
            permissions,
            verified_at: crate::clock::now(),
            next_verify_at: self.schedule.next_due(),
        };
        match self
            .store
            .record_verification(tenant, &record.secret_id, &verification, actor)
            .await?
        {
            Some(updated) => Ok(updated),
            // Replaced or disconnected while we probed: report what is there now.
            None => self
                .store
                .find_connection(tenant)
                .await?
                .ok_or(ConnectError::NotConnected),
        }
    }

    /// Background re-verification of one leased connection. An inconclusive probe leaves
    /// the status alone and gives the lease back with a retry time.
    pub async fn reverify_leased(&self, tenant: &TenantId, owner: &str) {
        let actor = Actor::Reverifier(owner.to_owned());
        let outcome = self.verify(tenant, &actor).await;
        let label = match &outcome {
            Ok(record) => record.status.as_str(),
            Err(ConnectError::NotConnected) => "gone",
            Err(ConnectError::StripeUnavailable(_)) => "inconclusive",
            Err(_) => "error",
        };
        metrics::counter!("atlas_reverify_runs_total", "outcome" => label).increment(1);
        if let Err(e) = outcome {
            if !matches!(e, ConnectError::NotConnected) {
                tracing::warn!(tenant_id = %tenant, error = %e, "re-verification postponed");
            }
            if let Err(e) = self
                .store
                .release_connection(tenant, owner, self.schedule.retry_due())
                .await
            {
                tracing::error!(tenant_id = %tenant, error = %e, "could not release a re-verification lease");
            }
        }
    }
}

/// The background loop of one process.
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
        Self {
            store,
            connections,
            budget: RateLimiter::direct(Quota::per_second(settings.stripe_requests_per_second)),
            settings,
            owner: random_id("proc_", 12),
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Claims and verifies one batch; returns how many connections it took.
    pub async fn run_once(&self) -> usize {
        let now = crate::clock::now();
        let lease_until = now + self.settings.lease;
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
            let tick = self.settings.tick;
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
