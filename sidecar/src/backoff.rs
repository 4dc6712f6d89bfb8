//! Reconnect pacing, pure: exponential backoff with full jitter between a floor
//! and a ceiling, and a log limiter so a reconnect storm prints a bounded number of lines.

use std::time::Duration;

/// Exponential backoff: 1 s, 2 s, 4 s … capped at 60 s, each delay jittered.
#[derive(Debug, Clone)]
pub struct Backoff {
    floor: Duration,
    ceiling: Duration,
    failures: u32,
}

impl Backoff {
    /// The sidecar's reconnect policy.
    pub fn reconnect() -> Self {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Retries after the hub refused a connection at a cap: 250 ms doubling to
    /// at most 4 s, jittered, so a fleet reconnecting at once spreads out
    /// without waiting the reconnect backoff's minute.
    pub fn busy() -> Self {
        Backoff::new(Duration::from_millis(250), Duration::from_secs(4))
    }

    /// A backoff between `floor` and `ceiling`.
    pub fn new(floor: Duration, ceiling: Duration) -> Self {
        Backoff {
            floor,
            ceiling: ceiling.max(floor),
            failures: 0,
        }
    }

    /// The delay before the next attempt; `unit` is a random number in [0, 1).
    /// The delay is uniform in [base/2, base] so many sidecars never retry in step.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let base = self
            .floor
            .saturating_mul(1u32 << self.failures.min(16))
            .min(self.ceiling);
        self.failures = self.failures.saturating_add(1);
        let unit = unit.clamp(0.0, 1.0);
        base.mul_f64(0.5 + 0.5 * unit).max(self.floor.min(base))
    }

    /// A session was established: start again from the floor.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// Lets one log line through per window and counts the rest.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    window: Duration,
    last: Option<Duration>,
    suppressed: u64,
}

impl LogLimiter {
    /// At most one line per `window`.
    pub fn new(window: Duration) -> Self {
        LogLimiter {
            window,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a line may be logged now (n = lines suppressed since the last one).
    /// `now` is any monotonic time since a fixed origin.
    pub fn allow(&mut self, now: Duration) -> Option<u64> {
        match self.last {
            Some(t) if now < t + self.window => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_ceiling_with_jitter() {
        let mut b = Backoff::reconnect();
        let top: Vec<u64> = (0..10).map(|_| b.next_delay(1.0).as_secs()).collect();
        assert_eq!(top, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        let mut b = Backoff::reconnect();
        let low: Vec<u64> = (0..8)
            .map(|_| b.next_delay(0.0).as_millis() as u64)
            .collect();
        assert_eq!(low, [1000, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_secs(1));
    }

    #[test]
    fn log_limiter_bounds_lines_and_counts_the_rest() {
        let mut l = LogLimiter::new(Duration::from_secs(30));
        assert_eq!(l.allow(Duration::from_secs(0)), Some(0));
        for s in 1..30 {
            assert_eq!(l.allow(Duration::from_secs(s)), None);
        }
        assert_eq!(l.allow(Duration::from_secs(30)), Some(29));
    }
}
