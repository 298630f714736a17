//! The deliverer: posts announcements from the outbox to `notifications.url`, signed, at
//! least once and in order per tenant, on the retry schedule.
//!
//! Each claim takes only the oldest pending announcement of a tenant, and each is posted on
//! its own task (up to [`CONCURRENCY`] at once), so a tenant whose announcement waits for a
//! slow answer or a retry holds up only its own later ones. A `failed` announcement does not
//! hold up the tenant's later ones: each carries the whole connection summary, so the latest
//! one delivered tells Atlas the current state, and one poisoned message (an answer Atlas
//! refuses forever) must not silence a tenant until an operator notices.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::settings::{NotificationSettings, RetrySchedule};
use super::signing::Signer;
use crate::clock::now;
use crate::domain::random_id;
use crate::store::notifications::{outbox_written, AttemptOutcome, ClaimedAnnouncement};
use crate::store::Store;

/// Announcements posted at once by one process.
const CONCURRENCY: usize = 16;
/// One attempt, answer included (docs/API.md).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longer than an attempt: a lease outlives its attempt unless the process died.
const LEASE: Duration = Duration::from_secs(60);
/// Claims without a wake-up, for what another instance committed while our subscription
/// was down and for retries that came due.
const POLL: Duration = Duration::from_secs(1);
/// How much of Atlas's answer is read: only its status matters.
const ANSWER_LIMIT: usize = 4096;
/// `Retry-After` is honoured up to this.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(86_400);
/// How often the backlog gauges are refreshed.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

pub struct Deliverer {
    store: Arc<dyn Store>,
    client: reqwest::Client,
    url: String,
    signer: Option<Signer>,
    schedule: RetrySchedule,
    /// This process, as the lease owner.
    owner: String,
}

/// What Atlas answered to one attempt.
#[derive(Debug)]
enum Answer {
    Status {
        code: u16,
        retry_after: Option<Duration>,
    },
    /// No answer: connection refused, reset, or timed out.
    Transport(String),
}

impl Deliverer {
    pub fn new(settings: &NotificationSettings, store: Arc<dyn Store>) -> anyhow::Result<Self> {
        let signer = settings
            .signer()
            .map_err(|problem| anyhow::anyhow!("notifications.secret {problem}"))?;
        if signer.is_none() {
            tracing::warn!(
                "notifications.secret is not set: announcements are sent UNSIGNED (refused in \
                 production)"
            );
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("atlas-stripe/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            store,
            client,
            url: settings.url.trim().to_owned(),
            signer,
            schedule: settings.retry_schedule.clone(),
            owner: random_id("deliverer_", 12),
        })
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn spawn(self, stop: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(Arc::new(self).run(stop))
    }

    async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut wake = outbox_written();
        let mut inflight: JoinSet<Option<Instant>> = JoinSet::new();
        let mut next_due: Option<Instant> = None;
        let mut backlog_at: Option<Instant> = None;
        loop {
            wake.mark_unchanged();
            let free = CONCURRENCY - inflight.len();
            if free > 0 {
                let at = now();
                let lease_until = at + LEASE;
                match (self.store)
                    .claim_announcements(&self.owner, at, lease_until, free as i64)
                    .await
                {
                    Ok(claimed) => {
                        for announcement in claimed {
                            inflight.spawn(self.clone().attempt(announcement));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "claiming announcements failed"),
                }
            }
            if backlog_at.is_none_or(|at| at.elapsed() >= BACKLOG_EVERY) {
                self.report_backlog().await;
                backlog_at = Some(Instant::now());
            }
            let wait = next_due
                .map_or(POLL, |due| due.saturating_duration_since(Instant::now()))
                .min(POLL);
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => break,
                _ = wake.changed() => {}
                Some(done) = inflight.join_next() => {
                    if let Ok(Some(due)) = done {
                        next_due = Some(next_due.map_or(due, |d| d.min(due)));
                    }
                }
                () = tokio::time::sleep(wait) => next_due = None,
            }
        }
        // An attempt cut short is still leased: another instance, or this one restarted,
        // delivers it once the lease expires (at least once).
        inflight.abort_all();
    }

    /// Posts one announcement and records what came of it. Returns when a retry is due.
    async fn attempt(self: Arc<Self>, announcement: ClaimedAnnouncement) -> Option<Instant> {
        let answer = self.post(&announcement).await;
        let (outcome, label) = self.judge(announcement.attempts, &answer);
        metrics::counter!("atlas_notification_deliveries_total", "outcome" => label).increment(1);
        let attempt = announcement.attempts + 1;
        match &outcome {
            AttemptOutcome::Delivered { .. } => tracing::debug!(
                msg_id = %announcement.id, tenant_id = %announcement.tenant_id, attempt,
                "announcement delivered"
            ),
            AttemptOutcome::Retry { error, at, .. } => tracing::warn!(
                msg_id = %announcement.id, tenant_id = %announcement.tenant_id, attempt,
                error = %error, next_attempt_at = %at, "announcement not delivered; will retry"
            ),
            AttemptOutcome::Failed { error, .. } => tracing::error!(
                msg_id = %announcement.id, tenant_id = %announcement.tenant_id, attempt,
                error = %error,
                "announcement FAILED: no more attempts; redeliver it with \
                 POST /internal/v1/notifications/{{id}}/redeliver"
            ),
        }
        let due = match &outcome {
            AttemptOutcome::Retry { at, .. } => {
                let wait = (*at - now()).try_into().unwrap_or(Duration::ZERO);
                Some(Instant::now() + wait)
            }
            _ => None,
        };
        if let Err(e) = (self.store)
            .record_attempt(announcement.position, &self.owner, &outcome)
            .await
        {
            // The lease runs out and the announcement is attempted again: at least once.
            tracing::warn!(msg_id = %announcement.id, error = %e, "recording an attempt failed");
        }
        due
    }

    async fn post(&self, announcement: &ClaimedAnnouncement) -> Answer {
        let timestamp = now().unix_timestamp();
        let mut request = (self.client.post(&self.url))
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", &announcement.id)
            .header("webhook-timestamp", timestamp.to_string());
        if let Some(signer) = &self.signer {
            let signature = signer.signature(&announcement.id, timestamp, &announcement.body);
            request = request.header("webhook-signature", signature);
        }
        let exchange = async {
            let mut response = request.body(announcement.body.clone()).send().await?;
            let code = response.status().as_u16();
            let retry_after = retry_after(response.headers());
            // A bounded read: the status is the answer, and a receiver streaming an endless
            // body must not hold the attempt. What is left goes with the connection.
            let mut read = 0;
            while read < ANSWER_LIMIT {
                match response.chunk().await {
                    Ok(Some(chunk)) => read += chunk.len(),
                    Ok(None) | Err(_) => break,
                }
            }
            Ok::<_, reqwest::Error>(Answer::Status { code, retry_after })
        };
        match tokio::time::timeout(ATTEMPT_TIMEOUT, exchange).await {
            Err(_) => Answer::Transport("no answer within 15 s".into()),
            Ok(Err(e)) if e.is_timeout() => Answer::Transport("no answer within 15 s".into()),
            // Without the URL: it is configuration, and may carry credentials.
            Ok(Err(e)) => Answer::Transport(e.without_url().to_string()),
            Ok(Ok(answer)) => answer,
        }
    }

    /// What an answer means for an announcement that had `attempts` attempts before it.
    fn judge(&self, attempts: i64, answer: &Answer) -> (AttemptOutcome, &'static str) {
        let (status_code, retry_after, error) = match answer {
            Answer::Status { code, .. } if (200..300).contains(code) => {
                return (
                    AttemptOutcome::Delivered { status_code: *code },
                    "delivered",
                )
            }
            Answer::Status { code: 410, .. } => {
                let outcome = AttemptOutcome::Failed {
                    status_code: Some(410),
                    error: "410 Gone: the receiver asked for no more attempts".into(),
                };
                return (outcome, "gone");
            }
            Answer::Status { code, retry_after } => {
                (Some(*code), *retry_after, format!("answered {code}"))
            }
            Answer::Transport(error) => (None, None, error.clone()),
        };
        let made = usize::try_from(attempts + 1).unwrap_or(usize::MAX);
        match self.schedule.before_attempt(made) {
            Some(wait) => {
                let wait = retry_after.map_or(wait, |r| wait.max(r.min(RETRY_AFTER_MAX)));
                let at = now() + wait;
                let outcome = AttemptOutcome::Retry {
                    status_code,
                    error,
                    at,
                };
                (outcome, "retry")
            }
            None => (AttemptOutcome::Failed { status_code, error }, "failed"),
        }
    }

    async fn report_backlog(&self) {
        match self.store.outbox_backlog().await {
            Ok(backlog) => {
                metrics::gauge!("atlas_notification_queue_depth").set(backlog.pending as f64);
                let age = backlog
                    .oldest_created_at
                    .map_or(0.0, |at| (now() - at).as_seconds_f64().max(0.0));
                metrics::gauge!("atlas_notification_oldest_undelivered_seconds").set(age);
            }
            Err(e) => tracing::warn!(error = %e, "reading the announcement backlog failed"),
        }
    }
}

/// `Retry-After` in seconds or as an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let raw = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = raw.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at =
        time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc2822).ok()?;
    (at - now()).try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn reads_retry_after_in_seconds_and_as_a_date() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(120)));
        let later = now() + Duration::from_secs(600);
        let date = later
            .format(&time::format_description::well_known::Rfc2822)
            .unwrap();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&date).unwrap());
        let wait = retry_after(&headers).unwrap();
        assert!(
            wait > Duration::from_secs(590) && wait <= Duration::from_secs(600),
            "{wait:?}"
        );
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }
}
