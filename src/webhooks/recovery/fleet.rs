//! The worker's pace across the fleet: its turn under the fleet-wide budget and the
//! account's smoothed rate, the renewal of its leases, the oldest-gap gauges, the heartbeat
//! that tells a long stop, and the loop every process runs.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{EventRecovery, BUDGET, GAP_REPORT_EVERY, STOP_GAP};
use crate::domain::{Mode, TenantId};
use crate::store::StoreError;

impl EventRecovery {
    /// Waits for a slice of the fleet-wide budget, then for the account's turn under the
    /// rate the proxy also uses; the worker is never in a hurry, so a refusal only means
    /// waiting longer.
    pub(super) async fn take_turn(&self, tenant: &TenantId, mode: Mode) {
        if let Some(rate) = self.settings.max_stripe_calls_per_second {
            let cost = Duration::from_secs_f64(1.0 / f64::from(rate.get()));
            loop {
                match self.store.take_budget(BUDGET, cost).await {
                    Ok(None) => break,
                    Ok(Some(wait)) => tokio::time::sleep(wait).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not take from the event-recovery budget");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
        while let Err(over) = self.smoothing.take_turn(tenant, mode).await {
            tokio::time::sleep(over.retry_after).await;
        }
    }

    /// The age of the oldest cursor per mode: how far back events may still be missing. At
    /// most once a minute: the minimum is read over every cursor.
    pub(super) async fn report_oldest_gaps(&self) {
        {
            let mut last = self.gaps_reported.lock().unwrap_or_else(|e| e.into_inner());
            let now = tokio::time::Instant::now();
            if last.is_some_and(|at| now.duration_since(at) < GAP_REPORT_EVERY) {
                return;
            }
            *last = Some(now);
        }
        let oldest = match self.store.oldest_recovery_cursors().await {
            Ok(oldest) => oldest,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the oldest recovery cursors");
                return;
            }
        };
        let now = crate::clock::now();
        for mode in [Mode::Test, Mode::Live] {
            let age = (oldest.iter())
                .find(|(m, _)| *m == mode)
                .map_or(0.0, |(_, cursor)| (now - *cursor).as_seconds_f64().max(0.0));
            metrics::gauge!("atlas_event_recovery_oldest_gap_seconds", "mode" => mode.as_str())
                .set(age);
        }
    }

    /// Renews the leases of `held` every third of a lease; runs until dropped.
    pub(super) async fn keep_leases(&self, held: &std::sync::Mutex<Vec<String>>) {
        loop {
            tokio::time::sleep(self.settings.lease / 3).await;
            let ids = held.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let until = crate::clock::now() + self.settings.lease;
            if let Err(e) = (self.store)
                .extend_recovery_leases(&self.owner, &ids, until)
                .await
            {
                // The leases lapse; another process resumes the runs from their last page.
                tracing::warn!(error = %e, "could not renew event-recovery leases");
            }
        }
    }

    /// Moves the fleet's heartbeat forward. After a stop longer than [`STOP_GAP`] (no
    /// sweep anywhere meanwhile), the first instance back makes every cursor due now, in
    /// batches, and returns how many; every other call returns 0.
    pub async fn beat(&self) -> Result<u64, StoreError> {
        let now = crate::clock::now();
        let Some(stopped_since) = self.store.beat_recovery(now, STOP_GAP).await? else {
            return Ok(0);
        };
        tracing::warn!(since = %stopped_since, "no instance recovered events for a long while: every connection is due");
        let mut after = String::new();
        let mut marked = 0;
        while let Some((last, n)) = (self.store)
            .mark_recoveries_due(&after, now, i64::from(self.settings.batch.max(1)) * 16)
            .await?
        {
            marked += n;
            after = last;
        }
        Ok(marked)
    }

    /// Runs until `stop` turns true: a sweep every `tick` (with jitter) or when woken; a full
    /// batch is followed at once by the next. A sweep in progress finishes its pages first.
    pub fn spawn(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                if let Err(e) = self.beat().await {
                    tracing::warn!(error = %e, "could not record the event-recovery heartbeat");
                }
                while self.run_once().await == self.settings.batch as usize {
                    if *stop.borrow() {
                        return;
                    }
                }
                let pause = self
                    .settings
                    .tick
                    .mul_f64(rand::thread_rng().gen_range(0.5..1.5));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = self.wake.notified() => {}
                    _ = stop.wait_for(|stopped| *stopped) => return,
                }
            }
        })
    }
}
