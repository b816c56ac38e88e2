//! Retry policy: when a transiently failed job runs again.
//!
//! Capped exponential backoff with jitter: the n-th failed attempt waits
//! `min(max_delay, base_delay * 2^(n-1))`, shortened by up to 25% at random
//! so that jobs that failed together do not come back together. The delay is
//! added to the database's `now()`, never the worker's clock, so workers with
//! skewed clocks agree on when a job is due.

use std::time::Duration;

use crate::config::RetrySettings;

/// The largest share of the delay that jitter may take off.
pub const JITTER: f64 = 0.25;

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

    /// SQL for the moment a job whose attempt number is `attempt` (an SQL
    /// expression) runs again; `base` and `max` are float8 seconds parameters.
    pub fn retry_at_sql(attempt: &str, base: &str, max: &str) -> String {
        format!(
            "now() + make_interval(secs => least({max}::float8, {base}::float8 * 2 ^ least({attempt} - 1, 62)) * (1 - {JITTER} * random()))"
        )
    }

    /// The range the SQL above draws from, for checks and documentation.
    pub fn delay_bounds(&self, attempt: i32) -> (Duration, Duration) {
        let exp = 2f64.powi((attempt - 1).clamp(0, 62));
        let full = (self.base_delay.as_secs_f64() * exp).min(self.max_delay.as_secs_f64());
        (
            Duration::from_secs_f64(full * (1.0 - JITTER)),
            Duration::from_secs_f64(full),
        )
    }

    pub fn params(&self) -> (f64, f64) {
        (self.base_delay.as_secs_f64(), self.max_delay.as_secs_f64())
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
}
