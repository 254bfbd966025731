//! When to try again after a failed send: exponential backoff with full jitter, and the
//! server's `Retry-After`, which no caller (not even `forceSend()`) may jump.

use crate::ids::Rng;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackoffSchedule {
    pub base_ms: u64,
    pub cap_ms: u64,
}

impl Default for BackoffSchedule {
    fn default() -> Self {
        BackoffSchedule {
            base_ms: 1_000,
            cap_ms: 300_000,
        }
    }
}

impl BackoffSchedule {
    /// Delay before attempt number `failures + 1`, after `failures` failures in a row:
    /// uniform in `0..=min(cap, base * 2^(failures-1))` ("full jitter"), at least 100 ms.
    pub fn delay_ms(&self, failures: u32, rng: &mut Rng) -> u64 {
        let exp = failures.saturating_sub(1).min(30);
        let ceiling = self.base_ms.saturating_mul(1u64 << exp).min(self.cap_ms);
        rng.below(ceiling + 1).max(100)
    }
}

/// Retry state shared by the tabs of an origin (persisted), so a collector that is down
/// is not hammered by every tab or after every reload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryState {
    /// Failed attempts in a row.
    pub failures: u32,
    /// Earliest time of the next automatic attempt.
    pub next_at: u64,
    /// The server's `Retry-After`: no attempt before this, forced or not.
    pub not_before: u64,
}

impl RetryState {
    /// `<failures> <next_at> <not_before>`.
    pub fn encode(&self) -> alloc::string::String {
        use tracklet_wire::json::push_u64;
        let mut s = alloc::string::String::new();
        push_u64(&mut s, self.failures as u64);
        s.push(' ');
        push_u64(&mut s, self.next_at);
        s.push(' ');
        push_u64(&mut s, self.not_before);
        s
    }

    pub fn decode(s: &str) -> Option<Self> {
        let (failures, rest) = s.split_once(' ')?;
        let (next_at, not_before) = rest.split_once(' ')?;
        Some(RetryState {
            failures: failures.parse().ok()?,
            next_at: next_at.parse().ok()?,
            not_before: not_before.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_with_full_jitter_up_to_the_cap() {
        let s = BackoffSchedule::default();
        let mut rng = Rng::new(42);
        for failures in 1..=20u32 {
            let ceiling = (1_000u64 << (failures - 1).min(30)).min(300_000);
            let mut max_seen = 0;
            let mut min_seen = u64::MAX;
            for _ in 0..2_000 {
                let d = s.delay_ms(failures, &mut rng);
                assert!(
                    d <= ceiling.max(100),
                    "failures {failures}: {d} > {ceiling}"
                );
                max_seen = max_seen.max(d);
                min_seen = min_seen.min(d);
            }
            // Full jitter: the spread covers most of 0..ceiling.
            assert!(
                max_seen > ceiling * 9 / 10,
                "failures {failures}: max {max_seen}"
            );
            assert!(
                min_seen < ceiling / 10 + 100,
                "failures {failures}: min {min_seen}"
            );
        }
    }

    #[test]
    fn same_seed_same_schedule() {
        let s = BackoffSchedule::default();
        let a: alloc::vec::Vec<u64> = {
            let mut r = Rng::new(5);
            (1..10).map(|f| s.delay_ms(f, &mut r)).collect()
        };
        let b: alloc::vec::Vec<u64> = {
            let mut r = Rng::new(5);
            (1..10).map(|f| s.delay_ms(f, &mut r)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn retry_state_round_trips_and_rejects_garbage() {
        let st = RetryState {
            failures: 3,
            next_at: 123,
            not_before: 456,
        };
        assert_eq!(RetryState::decode(&st.encode()), Some(st));
        for bad in ["", "1 2", "a b c", "1 2 3 4", "-1 2 3"] {
            assert_eq!(RetryState::decode(bad), None, "{bad}");
        }
    }
}
