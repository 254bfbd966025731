//! Token buckets (events per second) so one project, or one client address, cannot starve
//! the others.
//!
//! - **Per project**, always on: a project's `rate_limit` (events/s) if set, else
//!   [`RateLimitConfig::project_default`] (`--rate-limit-default`, 10,000 events/s). `0`, as
//!   either, means unlimited.
//! - **Per client address**, off by default ([`RateLimitConfig::per_ip`],
//!   `--rate-limit-per-ip`), keyed by [`crate::enrich::client_ip`]. The map of addresses is
//!   bounded ([`MAX_IP_BUCKETS`]): full buckets (idle addresses) are forgotten first, then the
//!   least recently seen.
//!
//! A bucket holds [`BURST_SECS`] seconds of traffic. A batch costs its full event count, one
//! token per event (a status query costs one). A batch larger than the whole bucket (a slow
//! project sending a full 1,000-event batch) is accepted when the bucket is full and leaves it
//! in debt: the following requests wait until the debt is paid back. So a legitimate batch
//! always gets through eventually, and the average rate still holds.
//!
//! Two steps, so a request is refused before its body is read when it can be:
//! [`RateLimiter::check_open`] (no tokens left: refuse at once) then, once the batch is
//! decoded, [`RateLimiter::charge`] (take its events, or refuse without taking any).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use uuid::Uuid;

use crate::store::Project;

/// Seconds of traffic a bucket holds (its burst).
pub const BURST_SECS: u32 = 2;
/// Default of [`RateLimitConfig::project_default`], events per second.
pub const DEFAULT_PROJECT_EVENTS_PER_SEC: u32 = 10_000;
/// Client addresses tracked at most by the per-address limit.
pub const MAX_IP_BUCKETS: usize = 100_000;

/// Rate limits (events per second; 0 = unlimited / off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Applied to projects without their own `rate_limit`.
    pub project_default: u32,
    /// Per client address (all projects together); 0 = off.
    pub per_ip: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            project_default: DEFAULT_PROJECT_EVENTS_PER_SEC,
            per_ip: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("rate limit exceeded; retry in {retry_after_secs} s")]
pub struct RateLimited {
    pub retry_after_secs: u64,
}

/// A token bucket that may go into debt (see the module docs).
#[derive(Debug, Clone)]
struct Bucket {
    rate: u32,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, now: Instant) -> Bucket {
        Bucket {
            rate,
            tokens: burst(rate),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(self.rate)).min(burst(self.rate));
        self.at = now;
    }

    /// Seconds to wait until `tokens` are available (0.0: now).
    fn wait_for(&self, tokens: f64) -> f64 {
        (tokens - self.tokens).max(0.0) / f64::from(self.rate.max(1))
    }

    /// Whether a request may start (at least one token left).
    fn open(&self) -> Result<(), f64> {
        match self.wait_for(1.0) {
            w if w > 0.0 => Err(w),
            _ => Ok(()),
        }
    }

    /// Whether `events` may be taken: enough tokens, or a full bucket for a batch larger than
    /// the bucket.
    fn can_take(&self, events: f64) -> Result<(), f64> {
        match self.wait_for(events.min(burst(self.rate))) {
            w if w > 0.0 => Err(w),
            _ => Ok(()),
        }
    }

    /// `true` when the bucket is full at `now` (an idle bucket: forgetting it changes nothing).
    fn is_full_at(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + elapsed * f64::from(self.rate) >= burst(self.rate)
    }
}

fn burst(rate: u32) -> f64 {
    f64::from(rate) * f64::from(BURST_SECS)
}

fn refused(wait_secs: f64) -> RateLimited {
    RateLimited {
        retry_after_secs: (wait_secs.ceil() as u64).max(1),
    }
}

pub struct RateLimiter {
    config: RateLimitConfig,
    projects: Mutex<HashMap<Uuid, Bucket>>,
    ips: Mutex<HashMap<IpAddr, Bucket>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code path can leave a bucket map inconsistent on panic: keep using it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig) -> RateLimiter {
        RateLimiter {
            config,
            projects: Mutex::new(HashMap::new()),
            ips: Mutex::new(HashMap::new()),
        }
    }

    /// The project's events per second (`None`: unlimited).
    fn project_rate(&self, project: &Project) -> Option<u32> {
        Some(project.rate_limit.unwrap_or(self.config.project_default)).filter(|r| *r > 0)
    }

    /// Refuses at once when the project's bucket (or the client address's) has no token left.
    /// Takes nothing: call before reading the body, then [`RateLimiter::charge`].
    pub fn check_open(&self, project: &Project, ip: Option<IpAddr>) -> Result<(), RateLimited> {
        self.with_buckets(project, ip, |p, i| {
            let wait = [p.map(|b| b.open()), i.map(|b| b.open())]
                .into_iter()
                .flatten()
                .filter_map(Result::err)
                .fold(0.0, f64::max);
            if wait > 0.0 {
                Err(refused(wait))
            } else {
                Ok(())
            }
        })
    }

    /// Takes `events` tokens (at least one) from the project's bucket and the client address's,
    /// or refuses without taking any.
    pub fn charge(
        &self,
        project: &Project,
        ip: Option<IpAddr>,
        events: usize,
    ) -> Result<(), RateLimited> {
        let cost = events.max(1) as f64;
        self.with_buckets(project, ip, |p, i| {
            let wait = [
                p.as_deref().map(|b| b.can_take(cost)),
                i.as_deref().map(|b| b.can_take(cost)),
            ]
            .into_iter()
            .flatten()
            .filter_map(Result::err)
            .fold(0.0, f64::max);
            if wait > 0.0 {
                return Err(refused(wait));
            }
            for bucket in [p, i].into_iter().flatten() {
                bucket.tokens -= cost;
            }
            Ok(())
        })
    }

    /// Runs `f` on the (refilled) buckets that apply, under their locks.
    fn with_buckets<R>(
        &self,
        project: &Project,
        ip: Option<IpAddr>,
        f: impl FnOnce(Option<&mut Bucket>, Option<&mut Bucket>) -> R,
    ) -> R {
        let now = Instant::now();
        let project_rate = self.project_rate(project);
        let ip_rate = Some(self.config.per_ip).filter(|r| *r > 0);
        // Always in this order: projects, then addresses.
        let mut projects = project_rate.map(|_| lock(&self.projects));
        let mut ips = ip_rate.and(ip).map(|_| lock(&self.ips));
        let p = match (projects.as_deref_mut(), project_rate) {
            (Some(map), Some(rate)) => {
                let b = map
                    .entry(project.id)
                    .or_insert_with(|| Bucket::new(rate, now));
                if b.rate != rate {
                    // The project's limit changed (projects refresh): keep the level, capped.
                    b.rate = rate;
                    b.tokens = b.tokens.min(burst(rate));
                }
                b.refill(now);
                Some(b)
            }
            _ => None,
        };
        let i = match (ips.as_deref_mut(), ip_rate, ip) {
            (Some(map), Some(rate), Some(ip)) => {
                if !map.contains_key(&ip) && map.len() >= MAX_IP_BUCKETS {
                    make_room(map, now);
                }
                let b = map.entry(ip).or_insert_with(|| Bucket::new(rate, now));
                b.refill(now);
                Some(b)
            }
            _ => None,
        };
        f(p, i)
    }

    /// Client addresses currently tracked (tests, metrics).
    pub fn tracked_addresses(&self) -> usize {
        lock(&self.ips).len()
    }
}

/// Frees room in a full address map: full buckets first (forgetting them changes nothing),
/// then, if that freed less than a tenth, the least recently seen half (amortised: the next
/// `MAX_IP_BUCKETS / 2` new addresses need no sweep).
fn make_room(map: &mut HashMap<IpAddr, Bucket>, now: Instant) {
    map.retain(|_, b| !b.is_full_at(now));
    if map.len() >= MAX_IP_BUCKETS - MAX_IP_BUCKETS / 10 {
        let mut seen: Vec<Instant> = map.values().map(|b| b.at).collect();
        let middle = seen.len() / 2;
        let (_, cutoff, _) = seen.select_nth_unstable(middle);
        let cutoff = *cutoff;
        map.retain(|_, b| b.at > cutoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(project_default: u32, per_ip: u32) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            project_default,
            per_ip,
        })
    }

    #[test]
    fn bucket_holds_two_seconds_and_charges_every_event() {
        let limiter = limiter(0, 0);
        let p = Project::new("p", vec![], Some(500));
        assert!(limiter.check_open(&p, None).is_ok());
        assert!(limiter.charge(&p, None, 600).is_ok());
        assert!(limiter.charge(&p, None, 600).is_err(), "400 left");
        assert!(limiter.charge(&p, None, 400).is_ok());
        let err = limiter.check_open(&p, None).unwrap_err();
        assert!(err.retry_after_secs >= 1);
        let unlimited = Project::new("u", vec![], None);
        assert!(limiter.charge(&unlimited, None, 1_000_000).is_ok());
        let zero = Project::new("z", vec![], Some(0));
        assert!(limiter.charge(&zero, None, 1_000_000).is_ok());
    }

    #[test]
    fn a_batch_larger_than_the_bucket_passes_when_full_then_leaves_debt() {
        let limiter = limiter(0, 0);
        let p = Project::new("p", vec![], Some(100)); // bucket of 200
        assert!(limiter.charge(&p, None, 1000).is_ok());
        let err = limiter.check_open(&p, None).unwrap_err();
        // 800 events of debt at 100/s.
        assert!((8..=9).contains(&err.retry_after_secs), "{err}");
        assert!(limiter.charge(&p, None, 1).is_err());
    }

    #[test]
    fn the_default_applies_to_projects_without_a_limit() {
        let limiter = limiter(10, 0);
        let p = Project::new("p", vec![], None);
        assert!(limiter.charge(&p, None, 20).is_ok());
        assert!(limiter.check_open(&p, None).is_err());
        // An explicit limit overrides the default.
        let q = Project::new("q", vec![], Some(1000));
        assert!(limiter.charge(&q, None, 2000).is_ok());
    }

    #[test]
    fn addresses_have_their_own_buckets_and_refusal_takes_nothing() {
        let limiter = limiter(0, 10);
        let p = Project::new("p", vec![], Some(1000));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(limiter.charge(&p, Some(a), 20).is_ok());
        assert!(limiter.check_open(&p, Some(a)).is_err());
        assert!(limiter.charge(&p, Some(a), 1).is_err());
        assert!(limiter.charge(&p, Some(b), 20).is_ok());
        // The project paid for the two accepted batches only.
        assert!(limiter.charge(&p, None, 1960).is_ok());
        assert!(limiter.check_open(&p, None).is_err());
    }

    #[test]
    fn the_address_map_is_bounded() {
        let limiter = limiter(0, 1);
        let p = Project::new("p", vec![], None);
        for n in 0..(MAX_IP_BUCKETS as u32 + 10) {
            let ip = IpAddr::from(n.to_be_bytes());
            assert!(limiter.charge(&p, Some(ip), 1).is_ok());
        }
        assert!(limiter.tracked_addresses() <= MAX_IP_BUCKETS);
    }
}
