//! Retry policy: when a transiently failed job runs again.
//!
//! Capped exponential backoff with jitter: the n-th failed attempt waits
//! `min(max_delay, base_delay * 2^(n-1))`, shortened by up to 25% at random
//! so that jobs that failed together do not come back together. The delay is
//! added to the database's `now()`, never the worker's clock, so workers with
//! skewed clocks agree on when a job is due.

use std::time::Duration;

use crate::config::RetrySettings;
use crate::store::cycle::BACKOFF_JITTER as JITTER;
use crate::store::Backoff;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    pub fn from_settings(s: &RetrySettings) -> RetryPolicy {
        RetryPolicy {
            base_delay: s.base_delay,
            max_delay: s.max_delay,
        }
    }

    /// The range the write cycle draws the delay after failed attempt
    /// `attempt` from (it adds the delay to the database's clock).
    pub fn delay_bounds(&self, attempt: i32) -> (Duration, Duration) {
        let exp = 2f64.powi((attempt - 1).clamp(0, 62));
        let full = (self.base_delay.as_secs_f64() * exp).min(self.max_delay.as_secs_f64());
        (
            Duration::from_secs_f64(full * (1.0 - JITTER)),
            Duration::from_secs_f64(full),
        )
    }

    /// The policy as the store's write cycle takes it.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            base_secs: self.base_delay.as_secs_f64(),
            max_secs: self.max_delay.as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps() {
        let p = RetryPolicy {
            base_delay: Duration::from_secs(5),
            max_delay: Duration::from_secs(60),
        };
        assert_eq!(p.delay_bounds(1).1, Duration::from_secs(5));
        assert_eq!(p.delay_bounds(2).1, Duration::from_secs(10));
        assert_eq!(p.delay_bounds(4).1, Duration::from_secs(40));
        assert_eq!(p.delay_bounds(5).1, Duration::from_secs(60));
        assert_eq!(p.delay_bounds(500).1, Duration::from_secs(60));
        assert_eq!(p.delay_bounds(1).0, Duration::from_secs_f64(3.75));
    }

    #[test]
    fn jitter_takes_off_at_most_a_quarter_and_never_adds() {
        let p = RetryPolicy {
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
        };
        for attempt in [-3, 0, 1, 2, 3, 4, 5, 62, 63, i32::MAX] {
            let (low, high) = p.delay_bounds(attempt);
            assert!(low <= high, "attempt {attempt}");
            assert!(high <= p.max_delay, "attempt {attempt}: {high:?}");
            assert!(high >= p.base_delay, "attempt {attempt}: {high:?}");
            let taken = 1.0 - low.as_secs_f64() / high.as_secs_f64();
            assert!((taken - JITTER).abs() < 1e-9, "attempt {attempt}: {taken}");
        }
    }

    #[test]
    fn the_store_gets_seconds() {
        let b = RetryPolicy {
            base_delay: Duration::from_millis(1500),
            max_delay: Duration::from_secs(90),
        }
        .backoff();
        assert_eq!((b.base_secs, b.max_secs), (1.5, 90.0));
    }
}
