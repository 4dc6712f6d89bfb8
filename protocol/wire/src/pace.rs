//! Pacing shared by both daemons and both cores: a seeded random number
//! generator, exponential backoff with jitter, a fixed-window rate limiter and
//! a bounded log. Pure: time arrives as `now`, a [`Duration`] since any fixed
//! origin the caller keeps (the shells pass `Instant - start`, the hub core its
//! wall-clock milliseconds).

use std::time::Duration;

/// A small deterministic random number generator (xorshift64*): the same seed
/// gives the same sequence, so the simulation and the tests reproduce. Not for
/// secrets; those come from the operating system's generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator started from `seed` (0 is replaced: xorshift would stay at 0).
    pub fn new(seed: u64) -> Self {
        Rng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[0, n)`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

/// Exponential backoff: `floor`, `floor × factor`, … capped at `ceiling`, each
/// delay scaled by a jitter factor drawn uniformly from `[jitter_low, jitter_high]`
/// so that many peers never retry in step.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    floor: Duration,
    ceiling: Duration,
    factor: u32,
    jitter_low: f64,
    jitter_high: f64,
    failures: u32,
}

impl Backoff {
    /// Doubling from `floor` to `ceiling`, jittered within `[base/2, base]`.
    pub fn new(floor: Duration, ceiling: Duration) -> Self {
        Backoff {
            floor,
            ceiling: ceiling.max(floor),
            factor: 2,
            jitter_low: 0.5,
            jitter_high: 1.0,
            failures: 0,
        }
    }

    /// The same backoff growing by `factor` per failure (at least 1).
    pub fn factor(mut self, factor: u32) -> Self {
        self.factor = factor.max(1);
        self
    }

    /// The same backoff with each delay scaled by a factor in `[low, high]`.
    pub fn jitter(mut self, low: f64, high: f64) -> Self {
        let low = low.clamp(0.0, 16.0);
        self.jitter_low = low;
        self.jitter_high = high.clamp(low, 16.0);
        self
    }

    /// The delay after `failures` consecutive failures (1 = the first), with
    /// `unit` a random number in `[0, 1)`. Never below `floor` scaled by the
    /// low jitter, never above `ceiling` scaled by the high one.
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        let exp = failures.saturating_sub(1).min(63);
        let growth = u64::from(self.factor).checked_pow(exp).unwrap_or(u64::MAX);
        let base = u32::try_from(growth)
            .map_or(self.ceiling, |g| self.floor.saturating_mul(g))
            .min(self.ceiling);
        let unit = unit.clamp(0.0, 1.0);
        base.mul_f64(self.jitter_low + (self.jitter_high - self.jitter_low) * unit)
    }

    /// Counts one more failure and returns the delay before the next attempt.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.delay(self.failures, unit)
    }

    /// A success: the next failure waits the floor again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// A fixed window that counts events: at most `max` per window of `len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    len: Duration,
    start: Duration,
    count: u32,
}

impl Window {
    /// A window of length `len` starting at `now`.
    pub fn new(len: Duration, now: Duration) -> Self {
        Window {
            len,
            start: now,
            count: 0,
        }
    }

    /// Whether the window that started last has ended by `now`.
    pub fn expired(&self, now: Duration) -> bool {
        now.saturating_sub(self.start) >= self.len
    }

    /// Counts one event at `now`; `Err(time until the window ends)` when `max`
    /// events were counted in this window already.
    pub fn take(&mut self, now: Duration, max: u32) -> Result<(), Duration> {
        if self.expired(now) {
            self.start = now;
            self.count = 0;
        }
        if self.count >= max {
            return Err(self.len.saturating_sub(now.saturating_sub(self.start)));
        }
        self.count += 1;
        Ok(())
    }

    /// Gives back one counted event (it turned out not to count, e.g. a success).
    pub fn give_back(&mut self) {
        self.count = self.count.saturating_sub(1);
    }

    /// Events counted in the current window.
    pub fn count(&self) -> u32 {
        self.count
    }
}

/// Whole seconds to tell a client to wait, rounded up, at least 1.
pub fn retry_after_s(wait: Duration) -> u64 {
    (wait.as_millis().div_ceil(1000) as u64).max(1)
}

/// A bounded log: at most `per_window` lines per window; the first line after a
/// quiet spell says how many were left out, so a storm cannot flood the log.
#[derive(Debug, Clone)]
pub struct LogBudget {
    per_window: u32,
    window: Duration,
    start: Option<Duration>,
    logged: u32,
    suppressed: u64,
}

impl LogBudget {
    /// At most `per_window` lines per `window`.
    pub fn new(per_window: u32, window: Duration) -> Self {
        LogBudget {
            per_window,
            window,
            start: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// `Some(lines left out since the last one logged)` if a line may be logged now.
    pub fn allow(&mut self, now: Duration) -> Option<u64> {
        let fresh = self
            .start
            .is_none_or(|s| now.saturating_sub(s) >= self.window);
        if fresh {
            self.start = Some(now);
            self.logged = 0;
        }
        if self.logged >= self.per_window {
            self.suppressed += 1;
            return None;
        }
        self.logged += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_generator_is_deterministic_and_units_stay_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..1000 {
            let (x, y) = (a.unit(), b.unit());
            assert_eq!(x.to_bits(), y.to_bits());
            assert!((0.0..1.0).contains(&x));
        }
        assert_ne!(Rng::new(0).next_u64(), 0);
        assert_eq!(Rng::new(3).below(0), 0);
        assert!(Rng::new(3).below(10) < 10);
    }

    #[test]
    fn backoff_grows_by_its_factor_up_to_the_ceiling_with_jitter_inside_its_band() {
        let b = Backoff::new(S, 60 * S);
        assert_eq!(b.delay(1, 1.0), S);
        assert_eq!(b.delay(3, 1.0), 4 * S);
        assert_eq!(b.delay(3, 0.0), 2 * S);
        assert_eq!(b.delay(40, 1.0), 60 * S);
        assert_eq!(b.delay(u32::MAX, 1.0), 60 * S);
        let hub = Backoff::new(5 * S, 600 * S).factor(4).jitter(0.8, 1.2);
        assert_eq!(hub.delay(2, 0.5), 20 * S);
        assert_eq!(hub.delay(2, 0.0), 16 * S);
        assert_eq!(hub.delay(2, 1.0), 24 * S);
        let mut r = Backoff::new(S, 4 * S);
        let delays: Vec<_> = (0..4).map(|_| r.next_delay(1.0)).collect();
        assert_eq!(delays, [S, 2 * S, 4 * S, 4 * S]);
        assert_eq!(r.failures(), 4);
        r.reset();
        assert_eq!(r.next_delay(1.0), S);
    }

    #[test]
    fn a_window_counts_up_to_its_bound_then_says_how_long_to_wait() {
        let mut w = Window::new(60 * S, Duration::ZERO);
        assert_eq!(w.take(S, 2), Ok(()));
        assert_eq!(w.take(2 * S, 2), Ok(()));
        assert_eq!(w.take(10 * S, 2), Err(50 * S));
        w.give_back();
        assert_eq!(w.take(11 * S, 2), Ok(()));
        assert_eq!(w.take(60 * S, 2), Ok(()), "a new window");
        assert_eq!(w.count(), 1);
        assert_eq!(retry_after_s(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_s(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn the_log_budget_lets_lines_through_per_window_and_counts_the_rest() {
        let mut l = LogBudget::new(2, 10 * S);
        assert_eq!(l.allow(S), Some(0));
        assert_eq!(l.allow(S), Some(0));
        assert_eq!(l.allow(2 * S), None);
        assert_eq!(l.allow(3 * S), None);
        assert_eq!(l.allow(11 * S), Some(2));
    }
}
