//! Each connected account's calls are smoothed under a rate below Stripe's limits: a call
//! over the rate waits briefly for its turn, and past `max_wait` is refused, rather than
//! letting Stripe answer 429 to the tenant's own traffic. Per process: with several
//! instances, set the rates to a share of Stripe's limit.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::domain::{Mode, TenantId};

pub struct AccountSmoothing {
    live: DefaultKeyedRateLimiter<TenantId>,
    test: DefaultKeyedRateLimiter<TenantId>,
    max_wait: Duration,
}

/// Over the rate for longer than a call may wait: try again after `retry_after`.
#[derive(Debug)]
pub struct OverRate {
    pub retry_after: Duration,
}

impl AccountSmoothing {
    pub fn new(
        live_per_second: NonZeroU32,
        test_per_second: NonZeroU32,
        max_wait: Duration,
    ) -> Self {
        Self {
            live: RateLimiter::keyed(Quota::per_second(live_per_second)),
            test: RateLimiter::keyed(Quota::per_second(test_per_second)),
            max_wait,
        }
    }

    /// Waits for the account's turn, or refuses when that would take longer than
    /// `max_wait`.
    pub async fn take_turn(&self, tenant: &TenantId, mode: Mode) -> Result<(), OverRate> {
        let limiter = match mode {
            Mode::Live => &self.live,
            Mode::Test => &self.test,
        };
        // Forget accounts whose buckets are full again, so memory stays bounded.
        if limiter.len() > 10_000 {
            limiter.retain_recent();
        }
        let give_up = tokio::time::Instant::now() + self.max_wait;
        loop {
            match limiter.check_key(tenant) {
                Ok(()) => return Ok(()),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    if tokio::time::Instant::now() + wait > give_up {
                        return Err(OverRate { retry_after: wait });
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}
