//! Recovery of events Stripe could not deliver: a worker that lists a connection's events
//! from Stripe's log (`GET /v1/events`) since its cursor and stores the missing ones with
//! `source: recovered`.
//!
//! **When.** Listing every connection on a timer does not scale: at a million connections
//! every 15 minutes it would be 1,100 Stripe calls a second, nearly all finding nothing,
//! because Stripe delivers and retries on its own (live mode for up to 3 days). So a
//! recovery is triggered by a gap, where events can have been missed:
//! - on demand (`POST …/events/recover`): due now;
//! - our endpoint repaired by a verification (enabled again, or registered again): due now;
//! - our endpoint disabled or missing (deliveries cannot arrive): every
//!   `webhooks.recovery_interval_secs` until it is repaired;
//! - the fleet stopped for longer than Stripe is sure to retry ([`STOP_GAP`], told by a
//!   heartbeat row every sweep moves forward): the first instance back makes every cursor
//!   due, in batches, and the budget spreads the listing;
//! - a new connection: once, from when it connected.
//!
//! Everything else gets a slow safety sweep: each cursor is due once per
//! `webhooks.recovery_sweep_secs` (7 days: 1.65 runs a second at a million, one call each
//! when nothing was missed), well inside Stripe's 30-day log. All listing takes turns under
//! `webhooks.recovery_max_stripe_calls_per_second` (a budget row every instance shares) and
//! under each account's smoothed rate (shared with the proxy). A per-connection delivery gap
//! (traffic through the proxy but no delivery) is not a trigger: the proxy's writes do not
//! all cause subscribed events, so "expected an event" has no sound definition yet, and the
//! sweep bounds how long such a miss can stay.
//!
//! **How.** Every process claims due connections with a lease (one process per connection
//! at a time). A run lists the types our endpoint subscribes to, created since the cursor
//! minus an overlap (events of one second are not ordered, and Stripe's clock is not ours),
//! newest first, paging with `starting_after` until `has_more` is false. Each page is
//! committed with the run's progress, so a process killed mid-run leaves a run the next
//! holder resumes; the cursor moves only when the run ends.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use rand::Rng;
use time::OffsetDateTime;
use tokio::sync::Notify;

use super::announcements;

mod fleet;
use crate::crypto::Keyring;
use crate::domain::{random_id, ConnectionStatus, Mode, StripeKey, TenantId};
use crate::proxy::AccountSmoothing;
use crate::store::{
    ConnectionRecord, NewEvent, RecoveryClaim, RecoveryRun, Store, StoreError, WebhookStatus,
};
use crate::stripe::events::{self, EventPage, RETENTION};
use crate::stripe::{StripeClient, StripeFailure};

/// A fleet stopped longer than this may have lost deliveries: Stripe retries test-mode
/// deliveries only a few times over some hours (live mode for 3 days), so an hour without
/// a sweep anywhere is treated as a gap for every connection.
pub const STOP_GAP: Duration = Duration::from_secs(3600);

/// How often the oldest-gap gauges are read.
const GAP_REPORT_EVERY: Duration = Duration::from_secs(60);

/// The budget row event listing takes its slices from.
const BUDGET: &str = "recovery";

/// How the worker runs, from `webhooks.*` settings.
#[derive(Clone, Debug)]
pub struct RecoverySettings {
    /// A connection whose endpoint is disabled or missing is recovered this often
    /// (`webhooks.recovery_interval_secs`).
    pub interval: Duration,
    /// Every other connection is recovered once in this period, the safety sweep
    /// (`webhooks.recovery_sweep_secs`).
    pub sweep: Duration,
    /// Event-list calls per second across every instance; `None`: no fleet-wide budget.
    pub max_stripe_calls_per_second: Option<NonZeroU32>,
    /// How often the worker looks for due connections.
    pub tick: Duration,
    /// How long a claim holds a connection unless its holder renews it (every third of
    /// it, while the run lasts): how long a killed process keeps others from its claims.
    pub lease: Duration,
    /// Connections claimed at once, and recovered concurrently.
    pub batch: u32,
    pub concurrency: usize,
    /// Listing starts this long before the cursor.
    pub overlap: Duration,
    /// The event types our endpoint subscribes to (`webhooks.enabled_events`).
    pub enabled_events: Vec<String>,
    /// Events per page (Stripe allows 100).
    pub page_limit: u32,
    /// How soon a run that Stripe left inconclusive (429, 5xx, timeouts) is tried again.
    pub retry: Duration,
}

impl RecoverySettings {
    /// The defaults beside the two values a deployer sets.
    pub fn new(interval: Duration, enabled_events: Vec<String>) -> Self {
        Self {
            interval,
            sweep: Duration::from_secs(7 * 86_400),
            max_stripe_calls_per_second: None,
            tick: Duration::from_secs(5),
            lease: Duration::from_secs(30),
            batch: 64,
            concurrency: 16,
            overlap: Duration::from_secs(300),
            enabled_events,
            page_limit: events::PAGE_LIMIT,
            retry: Duration::from_secs(60),
        }
    }

    /// When a connection is next due after a run: at the sweep while its endpoint is
    /// healthy (deliveries arrive; Stripe retries them), at `interval` while it is disabled
    /// or missing. Either less up to a tenth, so connections recovered together drift apart
    /// instead of listing in waves.
    fn next_due(&self, now: OffsetDateTime, endpoint: WebhookStatus) -> OffsetDateTime {
        let every = match endpoint {
            WebhookStatus::Enabled => self.sweep,
            WebhookStatus::Disabled | WebhookStatus::Missing => self.interval,
        };
        let early = rand::thread_rng().gen_range(0.0..=every.as_secs_f64() / 10.0);
        now + every - time::Duration::seconds_f64(early)
    }

    fn retry_due(&self, now: OffsetDateTime) -> OffsetDateTime {
        let jitter = rand::thread_rng().gen_range(0.5..1.5);
        now + self.retry.mul_f64(jitter)
    }
}

/// How one run ended (the `outcome` label of `atlas_event_recovery_runs_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// Listed to the end; the cursor moved.
    Completed,
    /// The key may not read Events: nothing to list until it may.
    Off,
    /// The connection is gone, replaced or revoked.
    Gone,
    /// Stripe answered 429 after the client's retries: tried again later.
    RateLimited,
    /// Stripe gave no conclusive answer: tried again later, resuming the run.
    Inconclusive,
    /// Another process holds the connection now (this one's lease expired).
    LeaseLost,
    /// The store or the keyring failed.
    Error,
}

impl RunOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Off => "off",
            Self::Gone => "gone",
            Self::RateLimited => "rate_limited",
            Self::Inconclusive => "inconclusive",
            Self::LeaseLost => "lease_lost",
            Self::Error => "error",
        }
    }
}

/// Why an on-demand recovery was not started.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("no such tenant or connection")]
    NotConnected,
    /// The key may not read Events (`GET /v1/events`).
    #[error("event recovery is off for this connection")]
    Off,
    /// Stripe keeps events for 30 days.
    #[error("since is older than Stripe's event retention")]
    SinceOutOfRange,
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// An accepted on-demand recovery.
#[derive(Clone, Debug)]
pub struct RecoveryRequested {
    /// Names the request in logs and in what it announces.
    pub recovery_id: String,
    /// Where the recovery starts: `since` when given, never later than the cursor.
    pub since: OffsetDateTime,
}

/// The worker of one process.
pub struct EventRecovery {
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    stripe: StripeClient,
    smoothing: Arc<AccountSmoothing>,
    settings: RecoverySettings,
    /// Names this process in leases.
    owner: String,
    /// Rings when a recovery was asked for or an endpoint repaired, so it starts before the
    /// next tick.
    wake: Arc<Notify>,
    /// When the oldest-gap gauges were last read.
    gaps_reported: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl EventRecovery {
    pub fn new(
        store: Arc<dyn Store>,
        keyring: Arc<Keyring>,
        stripe: StripeClient,
        smoothing: Arc<AccountSmoothing>,
        settings: RecoverySettings,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            keyring,
            stripe,
            smoothing,
            settings,
            owner: random_id("proc_", 12),
            wake,
            gaps_reported: Default::default(),
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Starts a sweep now (a recovery was requested or an endpoint repaired).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// `POST …/stripe/events/recover`: makes the tenant's connection due now, from `since`
    /// (default: where the last recovery ended), and wakes this process's worker (any
    /// process's worker will take it at its next tick).
    pub async fn request(
        &self,
        tenant: &TenantId,
        since: Option<OffsetDateTime>,
    ) -> Result<RecoveryRequested, RecoverError> {
        if since.is_some_and(|since| since < crate::clock::now() - RETENTION) {
            return Err(RecoverError::SinceOutOfRange);
        }
        let record =
            (self.store.find_connection(tenant).await?).ok_or(RecoverError::NotConnected)?;
        let cursor = (self.store)
            .find_recovery_cursor(&record.connection_id)
            .await?
            .ok_or(RecoverError::NotConnected)?;
        if !cursor.event_recovery {
            return Err(RecoverError::Off);
        }
        let requested = (self.store)
            .request_recovery(&record.connection_id, since)
            .await?
            .ok_or(RecoverError::NotConnected)?;
        let recovery_id = random_id("rcv_", 20);
        let since = requested
            .requested_since
            .unwrap_or(requested.recovered_through);
        tracing::info!(tenant_id = %tenant, %recovery_id, since = %since, "event recovery requested");
        self.wake();
        Ok(RecoveryRequested { recovery_id, since })
    }

    /// Claims and recovers one batch; returns how many connections it took.
    pub async fn run_once(&self) -> usize {
        let now = crate::clock::now();
        let claimed = match self
            .store
            .claim_due_recoveries(
                &self.owner,
                now,
                now + self.settings.lease,
                i64::from(self.settings.batch),
            )
            .await
        {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(error = %e, "could not claim connections to recover events for");
                return 0;
            }
        };
        let count = claimed.len();
        let held = std::sync::Mutex::new(
            (claimed.iter())
                .map(|claim| claim.connection_id.clone())
                .collect::<Vec<_>>(),
        );
        let work = stream::iter(claimed).for_each_concurrent(self.settings.concurrency, |claim| {
            let held = &held;
            async move {
                let outcome = self.recover_leased(&claim).await;
                metrics::counter!("atlas_event_recovery_runs_total", "outcome" => outcome.as_str())
                    .increment(1);
                (held.lock().unwrap_or_else(|e| e.into_inner()))
                    .retain(|id| *id != claim.connection_id);
            }
        });
        // The claims waiting their turn and the runs in progress keep their leases while
        // this process lives; a killed one's lapse within `lease`.
        tokio::select! {
            () = work => {}
            () = self.keep_leases(&held) => {}
        }
        self.report_oldest_gaps().await;
        count
    }

    /// Recovers one leased connection and gives the lease back.
    pub async fn recover_leased(&self, claim: &RecoveryClaim) -> RunOutcome {
        let outcome = match self.recover(claim).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(tenant_id = %claim.tenant_id, error = %e, "event recovery failed");
                RunOutcome::Error
            }
        };
        let now = crate::clock::now();
        let due = match outcome {
            // Given back by `finish_recovery_run`, or held by another process now.
            RunOutcome::Completed | RunOutcome::LeaseLost => return outcome,
            // Off: a verification that finds Events: Read again makes it due at once. Gone:
            // its cursor is dropped with the connection; a revoked one is only looked at by
            // the sweep.
            RunOutcome::Off | RunOutcome::Gone => {
                self.settings.next_due(now, WebhookStatus::Enabled)
            }
            RunOutcome::RateLimited | RunOutcome::Inconclusive | RunOutcome::Error => {
                self.settings.retry_due(now)
            }
        };
        if let Err(e) = (self.store)
            .release_recovery(&claim.connection_id, &self.owner, due)
            .await
        {
            tracing::error!(tenant_id = %claim.tenant_id, error = %e, "could not release an event-recovery lease");
        }
        outcome
    }

    async fn recover(&self, claim: &RecoveryClaim) -> Result<RunOutcome, RecoveryError> {
        let tenant = &claim.tenant_id;
        let Some(record) = self.store.find_connection(tenant).await? else {
            return Ok(RunOutcome::Gone);
        };
        if record.connection_id != claim.connection_id || record.status == ConnectionStatus::Revoked
        {
            return Ok(RunOutcome::Gone);
        }
        let Some(cursor) = self
            .store
            .find_recovery_cursor(&claim.connection_id)
            .await?
        else {
            return Ok(RunOutcome::Gone);
        };
        if !cursor.event_recovery {
            return Ok(RunOutcome::Off);
        }
        let key = self
            .keyring
            .open_stripe_key(&record.secret_context(), &record.sealed)?;
        let now = crate::clock::now();
        let run = match cursor.run {
            // A run a process left behind (killed, or its lease ran out): resume it, unless a
            // recovery from further back was requested since.
            Some(run) if cursor.requested_since.is_none_or(|r| r >= run.since) => run,
            _ => {
                let from = (cursor.requested_since).map_or(cursor.recovered_through, |r| {
                    r.min(cursor.recovered_through)
                });
                let since = self
                    .within_retention(&record, from - self.settings.overlap, now)
                    .await;
                if !(self.store)
                    .begin_recovery_run(&claim.connection_id, &self.owner, since, now)
                    .await?
                {
                    return Ok(RunOutcome::LeaseLost);
                }
                RecoveryRun {
                    since,
                    until: now,
                    after: None,
                }
            }
        };
        let listing = Listing {
            claim,
            key: &key,
            mode: record.mode,
        };
        let recovered = match self.list_and_store(&listing, &run).await? {
            Ok(recovered) => recovered,
            Err(outcome) => return Ok(outcome),
        };
        let next_due = (self.settings).next_due(crate::clock::now(), cursor.webhook_status);
        if !(self.store)
            .finish_recovery_run(&claim.connection_id, &self.owner, run.until, next_due)
            .await?
        {
            return Ok(RunOutcome::LeaseLost);
        }
        if recovered > 0 {
            tracing::info!(tenant_id = %tenant, recovered, "missed events recovered");
            announcements::events_recovered(
                self.store.as_ref(),
                &record,
                recovered,
                run.since,
                run.until,
            )
            .await;
        }
        Ok(RunOutcome::Completed)
    }

    /// `since`, or the oldest point Stripe still lists when `since` is older: a gap beyond
    /// the retention is reported (log, metric, announcement), never skipped in silence.
    async fn within_retention(
        &self,
        record: &ConnectionRecord,
        since: OffsetDateTime,
        now: OffsetDateTime,
    ) -> OffsetDateTime {
        // A margin, so an event at the edge is not dropped by Stripe while we list.
        let oldest_listable = now - RETENTION + time::Duration::minutes(10);
        if since >= oldest_listable {
            return since;
        }
        metrics::counter!("atlas_event_recovery_unrecoverable_total").increment(1);
        tracing::warn!(tenant_id = %record.tenant_id, since = %since, before = %oldest_listable,
            "events before this may have been missed and are past Stripe's retention");
        announcements::events_unrecoverable(self.store.as_ref(), record, oldest_listable).await;
        oldest_listable
    }

    /// Lists the run's pages from where it stands and stores each; the count of new events,
    /// or how the run stopped early.
    async fn list_and_store(
        &self,
        listing: &Listing<'_>,
        run: &RecoveryRun,
    ) -> Result<Result<u64, RunOutcome>, RecoveryError> {
        let types = &self.settings.enabled_events;
        let tenant = &listing.claim.tenant_id;
        let mut after = run.after.clone();
        let mut restarted = false;
        let mut recovered = 0;
        loop {
            self.take_turn(tenant, listing.mode).await;
            let request = events::list_request(
                types,
                run.since.unix_timestamp(),
                after.as_deref(),
                self.settings.page_limit,
            );
            let page = match self.stripe.send(listing.key, &request).await {
                Ok(reply) if reply.status == 200 => match events::parse_page(&reply, types) {
                    Some(page) => page,
                    None => {
                        tracing::warn!(tenant_id = %tenant, "Stripe's event list was not a list of events");
                        return Ok(Err(RunOutcome::Inconclusive));
                    }
                },
                // The event a resumed run starts after is no longer listable: list the run
                // again from its newest event (stored events are skipped).
                Ok(reply) if matches!(reply.status, 400 | 404) && after.is_some() && !restarted => {
                    tracing::info!(tenant_id = %tenant, "restarting a recovery run: its position is gone");
                    after = None;
                    restarted = true;
                    continue;
                }
                Ok(reply) if reply.status == 403 => {
                    // The key lost Events: Read: off until a verification finds it again.
                    let status = self.webhook_status(&listing.claim.connection_id).await?;
                    (self.store)
                        .record_webhook_health(&listing.claim.connection_id, false, status, false)
                        .await?;
                    return Ok(Err(RunOutcome::Off));
                }
                Ok(reply) => {
                    tracing::warn!(tenant_id = %tenant, status = reply.status, code = ?reply.error_code(), "Stripe refused to list events");
                    if reply.status == 401 {
                        // The key is no longer valid: let re-verification find out now.
                        self.store.mark_due_now(tenant).await?;
                    }
                    return Ok(Err(RunOutcome::Inconclusive));
                }
                Err(StripeFailure::Status(429)) => return Ok(Err(RunOutcome::RateLimited)),
                Err(failure) => {
                    tracing::info!(tenant_id = %tenant, %failure, "event listing inconclusive");
                    return Ok(Err(RunOutcome::Inconclusive));
                }
            };
            let EventPage {
                events: listed,
                has_more,
                oldest_id,
            } = page;
            let Some(oldest_id) = oldest_id else {
                // An empty page: nothing (more) in the window.
                return Ok(Ok(recovered));
            };
            let events = self.to_store(tenant, listing.mode, listed);
            let lease_until = crate::clock::now() + self.settings.lease;
            let Some(stored) = self
                .store
                .store_recovered_page(
                    tenant,
                    &listing.claim.connection_id,
                    &self.owner,
                    &events,
                    &oldest_id,
                    lease_until,
                )
                .await?
            else {
                return Ok(Err(RunOutcome::LeaseLost));
            };
            recovered += stored;
            metrics::counter!("atlas_events_recovered_total").increment(stored);
            if !has_more {
                return Ok(Ok(recovered));
            }
            after = Some(oldest_id);
        }
    }

    async fn webhook_status(&self, connection_id: &str) -> Result<WebhookStatus, StoreError> {
        Ok(self
            .store
            .find_recovery_cursor(connection_id)
            .await?
            .map_or(WebhookStatus::Enabled, |c| c.webhook_status))
    }

    /// The listed events as rows; one whose livemode contradicts the tenant's mode is left
    /// out, as a delivery of it would be refused.
    fn to_store(
        &self,
        tenant: &TenantId,
        mode: Mode,
        listed: Vec<events::ListedEvent>,
    ) -> Vec<NewEvent> {
        listed
            .into_iter()
            .filter(|event| {
                let matches = event.livemode == (mode == Mode::Live);
                if !matches {
                    tracing::warn!(tenant_id = %tenant, event_id = %event.id, "listed event's livemode contradicts the tenant's mode");
                }
                matches
            })
            .map(|event| NewEvent {
                event_id: event.id,
                event_type: event.event_type,
                created: event.created,
                livemode: event.livemode,
                payload: event.payload,
            })
            .collect()
    }
}

/// What a run lists with.
struct Listing<'a> {
    claim: &'a RecoveryClaim,
    key: &'a StripeKey,
    mode: Mode,
}

#[derive(Debug, thiserror::Error)]
enum RecoveryError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("crypto: {0}")]
    Crypto(#[from] crate::crypto::CryptoError),
}
