//! Group commit for deliveries: concurrent verified events share one transaction (one
//! multi-row statement on PostgreSQL), so a burst pays one WAL flush per batch instead of
//! one per event. Each delivery is answered only once its batch has committed, so an event
//! is durable before its 2xx as before; a batch that fails fails every delivery in it.
//!
//! A batch closes when it holds `webhooks.batch_max_events` or `webhooks.batch_wait_us`
//! has passed since its first event arrived (whatever is queued by then joins it), so a
//! lone delivery waits at most the wait. At most `COMMITS_IN_FLIGHT` batches commit at
//! once; while they do, the next batch keeps filling. The default wait is 0: a batch leaves
//! as soon as a commit slot is free, and under load batches form behind the commits in
//! flight (natural group commit). With a wait of 1 ms, 32 concurrent senders (fewer than a
//! batch holds) made every batch wait out its timer: intake measured 0.56-0.60 of the
//! pgbench floor against 0.89-0.91 with none (`scripts/bench-webhooks`, wrk as the senders);
//! 2 slots measured 0.82, 8 the same as 4.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::store::{EventInsert, Inserted, Store, StoreError};

/// Batches committing at once. More than one, so one batch's WAL flush overlaps the next
/// batch's statement; few, so that under load deliveries gather into large batches rather
/// than many small ones racing for the pool.
const COMMITS_IN_FLIGHT: usize = 4;

/// When a batch closes.
#[derive(Clone, Copy, Debug)]
pub struct BatchSettings {
    /// `webhooks.batch_max_events`.
    pub max_events: usize,
    /// `webhooks.batch_wait_us`: how long a batch waits for more events after its first.
    pub wait: Duration,
}

/// A delivery waiting for its batch's commit.
struct Pending {
    row: EventInsert,
    answer: oneshot::Sender<Result<Inserted, StoreError>>,
}

/// Hands verified events to the batch collector, which runs until the committer is
/// dropped.
pub struct GroupCommitter {
    queue: mpsc::UnboundedSender<Pending>,
}

impl GroupCommitter {
    /// Starts the collector on the current Tokio runtime.
    pub fn start(store: Arc<dyn Store>, settings: BatchSettings) -> Self {
        // Unbounded: each entry is a request in flight, and those are bounded by the
        // server's connection and body limits.
        let (queue, queued) = mpsc::unbounded_channel();
        tokio::spawn(collect(store, settings, queued));
        Self { queue }
    }

    /// Stores the event in the next batch; what became of it once the batch has committed.
    pub async fn store(&self, row: EventInsert) -> Result<Inserted, StoreError> {
        let (answer, answered) = oneshot::channel();
        (self.queue.send(Pending { row, answer })).map_err(|_| stopped())?;
        // Dropped unanswered: the collector stopped or the commit task died; nothing tells
        // whether the event was stored, so the delivery is not acknowledged (Stripe retries
        // and a stored event is answered as a duplicate).
        answered.await.map_err(|_| stopped())?
    }
}

/// The committer is gone (shutting down): retryable, like a closed pool.
fn stopped() -> StoreError {
    StoreError::Database(sqlx::Error::PoolClosed)
}

async fn collect(
    store: Arc<dyn Store>,
    settings: BatchSettings,
    mut queued: mpsc::UnboundedReceiver<Pending>,
) {
    let commits = Arc::new(Semaphore::new(COMMITS_IN_FLIGHT));
    let max = settings.max_events.max(1);
    while let Some(first) = queued.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + settings.wait;
        while batch.len() < max {
            // What is queued already joins without a wait.
            if let Ok(next) = queued.try_recv() {
                batch.push(next);
                continue;
            }
            match tokio::time::timeout_at(deadline, queued.recv()).await {
                Ok(Some(next)) => batch.push(next),
                // The wait passed, or the committer is gone: commit what is here.
                Ok(None) | Err(_) => break,
            }
        }
        // The batch is closed on its wait; while every commit slot is busy it still takes
        // arrivals up to its size, since it cannot leave earlier anyway.
        let permit = loop {
            tokio::select! {
                biased;
                permit = commits.clone().acquire_owned() => match permit {
                    Ok(permit) => break Some(permit),
                    Err(_) => break None,
                },
                Some(next) = queued.recv(), if batch.len() < max => batch.push(next),
            }
        };
        tokio::spawn(commit(store.clone(), batch, permit));
    }
}

/// Commits one batch and answers each of its deliveries.
async fn commit(store: Arc<dyn Store>, batch: Vec<Pending>, _slot: Option<OwnedSemaphorePermit>) {
    let (rows, answers): (Vec<EventInsert>, Vec<_>) =
        batch.into_iter().map(|p| (p.row, p.answer)).unzip();
    match store.insert_webhook_events(&rows).await {
        // One answer per row; a short answer would leave the rest unanswered, and those
        // deliveries fail (never a 2xx without a commit).
        Ok(stored) => {
            for (answer, stored) in answers.into_iter().zip(stored) {
                // The delivery may have gone (client disconnected): its event is stored all
                // the same, and a redelivery is answered as a duplicate.
                let _ = answer.send(Ok(stored));
            }
        }
        Err(e) => {
            let e = Arc::new(e);
            for answer in answers {
                let _ = answer.send(Err(StoreError::Batch(e.clone())));
            }
        }
    }
}
