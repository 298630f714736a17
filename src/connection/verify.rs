//! Verification: on demand (`POST …/verify`) and in the background. Every process claims
//! due connections with a lease (so no two processes probe one connection at once), probes
//! them with bounded concurrency, and records what it finds: every required permission →
//! `active`, some missing → `needs_attention`, 401 → `revoked` (never probed again),
//! inconclusive → unchanged and retried later.
//!
//! A large fleet is spread, not waved through: each connection is due once per
//! `reverify.period_secs` (a new one anywhere in its first period), and every claim first
//! takes its verification's share of `reverify.max_stripe_calls_per_second` from a budget
//! row in the database, which all instances share, so N instances together never exceed it.
//! Each account's probes also take turns under the proxy's per-account rate.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use rand::Rng;
use time::OffsetDateTime;
use tokio::sync::{watch, OnceCell};
use tokio::task::JoinHandle;

use super::{calls_per_verification, Attempt, ConnectError, ConnectionService};
use crate::config::ReverifySettings;
use crate::domain::{random_id, ConnectionStatus, TenantId};
use crate::proxy::AccountSmoothing;
use crate::store::{Actor, ConnectionRecord, Store, Verification};
use crate::stripe::{probe_write_access, ProbeError};

/// When a verified connection is next looked at again.
#[derive(Clone, Copy, Debug)]
pub struct VerifySchedule {
    /// Every connection is looked at again within this period.
    pub period: Duration,
    pub jitter: Duration,
    pub retry: Duration,
}

impl VerifySchedule {
    /// `period` less up to `jitter`, so connections verified together drift apart instead
    /// of hitting Stripe in waves, and none waits longer than the period.
    pub fn next_due(&self) -> OffsetDateTime {
        let jitter = self.jitter.min(self.period).as_secs_f64();
        let early = if jitter > 0.0 {
            rand::thread_rng().gen_range(0.0..=jitter)
        } else {
            0.0
        };
        crate::clock::now() + self.period - time::Duration::seconds_f64(early)
    }

    /// A new (or replaced) key was just verified: its first re-verification falls anywhere
    /// in the period, so connections made together (a bulk import, a migration) are spread
    /// evenly over it instead of all coming due a period later.
    pub fn first_due(&self) -> OffsetDateTime {
        let period = self.period.as_secs_f64();
        let offset = if period > 0.0 {
            rand::thread_rng().gen_range(0.0..=period)
        } else {
            0.0
        };
        crate::clock::now() + time::Duration::seconds_f64(offset)
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
        self.verify_paced(tenant, actor, None).await
    }

    /// `verify`, with the account's calls first taking their turns under `pace` (the
    /// proxy's per-account rate) when given: the background is never in a hurry.
    async fn verify_paced(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        pace: Option<&AccountSmoothing>,
    ) -> Result<ConnectionRecord, ConnectError> {
        let record = self
            .store
            .find_connection(tenant)
            .await?
            .ok_or(ConnectError::NotConnected)?;
        if let Some(pace) = pace {
            for _ in 0..calls_per_verification(self.required.len()) {
                while let Err(over) = pace.take_turn(tenant, record.mode).await {
                    tokio::time::sleep(over.retry_after).await;
                }
            }
        }
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
        if status != ConnectionStatus::Revoked {
            self.keep_endpoint_alive(&record, &key).await;
        }
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
        let outcome = self.verify_paced(tenant, &actor, Some(&self.pace)).await;
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

/// The budget row re-verification takes its slices from.
const BUDGET: &str = "reverify";

/// The background loop of one process.
pub struct Reverifier {
    store: Arc<dyn Store>,
    connections: Arc<ConnectionService>,
    settings: ReverifySettings,
    /// Names this process in leases and the audit trail.
    owner: String,
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
            settings,
            owner: random_id("proc_", 12),
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// One verification's share of the fleet-wide budget: its Stripe calls over the rate.
    fn cost(&self) -> Duration {
        let calls = calls_per_verification(self.connections.required().len()) as f64;
        Duration::from_secs_f64(calls / f64::from(self.settings.max_stripe_calls_per_second.get()))
    }

    /// Claims and verifies up to a batch, one connection per claim, each claim after its
    /// slice of the budget; returns how many connections it took. A claim that finds
    /// nothing due ends the run.
    pub async fn run_once(&self) -> usize {
        let (_keep, running) = watch::channel(false);
        self.run_until(&running).await
    }

    /// `run_once`, claiming nothing more once `stop` turns true (verifications under way
    /// finish; a claim waiting for the budget is given back).
    async fn run_until(&self, stop: &watch::Receiver<bool>) -> usize {
        let taken = AtomicUsize::new(0);
        let done = AtomicBool::new(false);
        let (taken_ref, done_ref) = (&taken, &done);
        stream::iter(0..self.settings.batch)
            .for_each_concurrent(self.settings.concurrency as usize, |_| async move {
                if done_ref.load(Ordering::Relaxed) || *stop.borrow() {
                    return;
                }
                match self.claim_one(stop.clone()).await {
                    Some(tenant) => {
                        taken_ref.fetch_add(1, Ordering::Relaxed);
                        self.connections.reverify_leased(&tenant, &self.owner).await;
                    }
                    None => done_ref.store(true, Ordering::Relaxed),
                }
            })
            .await;
        taken.into_inner()
    }

    /// Leases one due connection and waits for its slice of the budget. `None` when
    /// nothing is due, the store failed, `stop` turned true, or the budget would keep it
    /// waiting past half its lease (the claim is then given back, still due).
    async fn claim_one(&self, mut stop: watch::Receiver<bool>) -> Option<TenantId> {
        let now = crate::clock::now();
        let lease_until = now + self.settings.lease;
        let claimed = match (self.store)
            .claim_due_connections(&self.owner, now, lease_until, 1)
            .await
        {
            Ok(claimed) => claimed.into_iter().next()?,
            Err(e) => {
                tracing::warn!(error = %e, "could not claim connections to re-verify");
                return None;
            }
        };
        let give_up = tokio::time::Instant::now() + self.settings.lease / 2;
        loop {
            let wait = match self.store.take_budget(BUDGET, self.cost()).await {
                Ok(None) => return Some(claimed),
                Ok(Some(wait)) => wait,
                Err(e) => {
                    tracing::warn!(error = %e, "could not take from the re-verification budget");
                    Duration::from_secs(1)
                }
            };
            if tokio::time::Instant::now() + wait > give_up {
                metrics::counter!("atlas_reverify_budget_waits_total").increment(1);
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|stopped| *stopped) => break,
            }
        }
        if let Err(e) = (self.store)
            .release_connection(&claimed, &self.owner, crate::clock::now())
            .await
        {
            tracing::error!(tenant_id = %claimed, error = %e, "could not release a re-verification lease");
        }
        None
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
                while self.run_until(&stop).await == self.settings.batch as usize {
                    if *stop.borrow() {
                        return;
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    /// A re-verification is due within the period, at most `jitter` early; a first one
    /// anywhere in it, and the first ones of many connections are spread over all of it.
    #[test]
    fn due_times_stay_within_the_period_and_spread_new_connections() {
        let schedule = VerifySchedule {
            period: DAY * 7,
            jitter: DAY / 2,
            retry: Duration::from_secs(300),
        };
        let before = crate::clock::now();
        let next: Vec<OffsetDateTime> = (0..200).map(|_| schedule.next_due()).collect();
        let first: Vec<OffsetDateTime> = (0..200).map(|_| schedule.first_due()).collect();
        let after = crate::clock::now();
        for due in &next {
            assert!(*due >= before + DAY * 7 - DAY / 2 && *due <= after + DAY * 7);
        }
        for due in &first {
            assert!(*due >= before && *due <= after + DAY * 7);
        }
        // In each of the seven days of the period: 200 draws miss a day with odds 10^-13.
        for day in 0..7 {
            let (from, to) = (before + DAY * day, before + DAY * (day + 1));
            assert!(
                first.iter().any(|due| *due >= from && *due < to),
                "no first due time on day {day}"
            );
        }
    }
}
