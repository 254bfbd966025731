//! Per-project token buckets (events per second) so one project cannot starve the others.
//!
//! Each project gets its own governor limiter sized from its `rate_limit`; the bucket holds
//! two seconds of traffic, and a batch larger than the bucket costs a full bucket.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter as Governor};
use uuid::Uuid;

use crate::store::Project;

#[derive(Debug, thiserror::Error)]
#[error("rate limit exceeded; retry in {retry_after_secs} s")]
pub struct RateLimited {
    pub retry_after_secs: u64,
}

#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<Uuid, (u32, Arc<DefaultDirectRateLimiter>)>>,
}

impl RateLimiter {
    pub fn new() -> RateLimiter {
        RateLimiter::default()
    }

    /// Takes `events` tokens from the project's bucket (projects without a limit always pass).
    pub fn check(&self, project: &Project, events: usize) -> Result<(), RateLimited> {
        let Some(rate) = project.rate_limit.and_then(NonZeroU32::new) else {
            return Ok(());
        };
        // Two seconds of traffic.
        let burst = rate.saturating_mul(NonZeroU32::MIN.saturating_add(1));
        let new_bucket = || {
            (
                rate.get(),
                Arc::new(Governor::direct(Quota::per_second(rate).allow_burst(burst))),
            )
        };
        let limiter = {
            let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
            let entry = buckets.entry(project.id).or_insert_with(new_bucket);
            if entry.0 != rate.get() {
                // The project's limit changed (cache refresh): start a bucket with the new one.
                *entry = new_bucket();
            }
            entry.1.clone()
        };
        let cost =
            NonZeroU32::new((events.max(1) as u32).min(burst.get())).unwrap_or(NonZeroU32::MIN);
        match limiter.check_n(cost) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Err(RateLimited {
                    retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                })
            }
            // Cannot happen (cost <= burst), but never let a request through unchecked.
            Err(_) => Err(RateLimited {
                retry_after_secs: 1,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_holds_two_seconds_then_refuses() {
        let limiter = RateLimiter::new();
        let p = Project::new("p", vec![], Some(5));
        assert!(limiter.check(&p, 10).is_ok());
        let err = limiter.check(&p, 5).unwrap_err();
        assert!(err.retry_after_secs >= 1);
        let unlimited = Project::new("u", vec![], None);
        assert!(limiter.check(&unlimited, 1_000_000).is_ok());
    }
}
