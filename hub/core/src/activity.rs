//! What a running attempt is doing, from its sidecar's heartbeats: the figures
//! the hub keeps in memory ([`Seen`]) and the classification that tells a busy
//! agent from an idle one ([`classify`]). Pure: every function takes `now`.
//!
//! ```text
//!   silent: no progress note, output or workspace change within `active`
//!   still:  silent, and the CPU time of the run's process group not growing
//!
//!   not silent ─────────────────────────────────────────────▶ active
//!   silent, CPU grew within `active` (or CPU unknown) ──────▶ busy_silent
//!   still for stall_alert ──────────────────────────────────▶ stalled  (alert `stalled`)
//!   still, less long ───────────────────────────────────────▶ idle     (alert `agent_idle`
//!                                                                       after idle_alert)
//! ```
//!
//! A run without activity figures (a sidecar that sends none) keeps the old
//! rule: stalled after `stall_alert` without a progress note, active before.
//! A run whose CPU is unknown (a wake run whose process was not found) cannot
//! be told idle from busy, so it counts as busy while silent and only the
//! stall rule, on progress, output and workspace, applies.

use std::collections::VecDeque;

use muster_wire::limits::{self, truncate_utf8};
use muster_wire::msg::Activity;
use serde::Serialize;

use crate::model::Millis;

/// CPU samples kept per attempt: enough to span a minute at any heartbeat
/// interval the policy allows in practice (16 × 24 bytes).
pub const CPU_SAMPLES_MAX: usize = 16;
/// The span "CPU in the last minute" looks back over.
pub const CPU_SPAN: Millis = 60_000;
/// CPU counts as busy when it grows by at least this many thousandths of the
/// wall time between two heartbeats (2 %: an agent waiting at a prompt uses
/// less; one thinking, compiling or waiting on a model's stream uses more).
pub const CPU_BUSY_PERMILLE: u64 = 20;
/// Samples closer than this to the previous one are not kept: a repeated or
/// bunched heartbeat shows no time for the CPU to grow in.
pub const SAMPLE_GAP_MIN: Millis = 500;
/// The longest "recent" window: output within it is activity.
pub const ACTIVE_WINDOW_MAX: Millis = 60_000;

/// How a running attempt stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Output, progress or workspace changes recently.
    Active,
    /// No output, but its processes use CPU (thinking, building, testing).
    BusySilent,
    /// Alive, no output and no CPU: waiting for input, or hung.
    Idle,
    /// No progress, output or CPU for `stall_alert`.
    Stalled,
}

impl Class {
    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Active => "active",
            Class::BusySilent => "busy_silent",
            Class::Idle => "idle",
            Class::Stalled => "stalled",
        }
    }
}

/// The windows the classification uses, from the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Output or CPU within this long counts as recent.
    pub active: Millis,
    /// Idle this long raises `agent_idle`.
    pub idle_alert: Millis,
    /// Still (no progress, output or CPU) this long is stalled.
    pub stall_alert: Millis,
}

impl Windows {
    /// The windows for a policy's `idle_alert`, `stall_alert` and heartbeat
    /// interval: "recent" is the shortest of the two alert windows and a
    /// minute, but at least two heartbeats, so one late heartbeat never makes a
    /// busy agent idle.
    pub fn new(idle_alert: Millis, stall_alert: Millis, heartbeat: Millis) -> Windows {
        let active = idle_alert
            .min(stall_alert)
            .min(ACTIVE_WINDOW_MAX)
            .max(heartbeat.saturating_mul(2))
            .max(1);
        Windows {
            active,
            idle_alert,
            stall_alert,
        }
    }
}

/// What the hub has seen of one attempt's activity, in memory only (a hub
/// restart forgets it; the next heartbeats rebuild it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// When the last heartbeat with figures for it arrived.
    pub heard_at: Millis,
    /// The CPU time last reported, if the process group is known.
    pub cpu_ms: Option<u64>,
    /// Output bytes last reported.
    pub output_bytes: u64,
    /// When the run last wrote output, as its age said.
    pub output_at: Option<Millis>,
    /// When its workspace last changed, as its age said.
    pub workspace_at: Option<Millis>,
    /// When its CPU time was last seen to grow by [`CPU_BUSY_PERMILLE`] or more.
    pub cpu_at: Option<Millis>,
    /// The last lines of output, once output went quiet.
    pub output_tail: String,
    /// (time, CPU ms) per heartbeat, oldest first, at most [`CPU_SAMPLES_MAX`].
    samples: VecDeque<(Millis, u64)>,
}

impl Seen {
    /// Takes one heartbeat's figures, received at `now`. CPU growth is judged
    /// against the time since the previous sample, at most `gap_max` (two
    /// heartbeats): a late heartbeat, or a wall clock stepped forward, must
    /// not make a busy run look idle.
    pub fn update(&mut self, now: Millis, a: &Activity, gap_max: Millis) {
        self.heard_at = now;
        self.output_bytes = a.output_bytes;
        self.output_at = a.output_age_ms.map(|age| now.saturating_sub(age));
        self.workspace_at = a.workspace_age_ms.map(|age| now.saturating_sub(age));
        if !a.output_tail.is_empty() {
            self.output_tail = truncate_utf8(a.output_tail.clone(), limits::OUTPUT_TAIL_BYTES_MAX);
        }
        self.cpu_ms = a.cpu_ms;
        let Some(cpu) = a.cpu_ms else {
            self.samples.clear();
            return;
        };
        match self.samples.back() {
            // A member with CPU time left the group: start counting again.
            Some(&(_, before)) if cpu < before => self.samples.clear(),
            Some(&(at, _)) if now.saturating_sub(at) < SAMPLE_GAP_MIN => return,
            Some(&(at, before)) => {
                let wall = now.saturating_sub(at).min(gap_max);
                let used = cpu - before;
                if used > 0 && used.saturating_mul(1000) >= wall.saturating_mul(CPU_BUSY_PERMILLE) {
                    self.cpu_at = Some(now);
                }
            }
            None => {}
        }
        if self.samples.len() >= CPU_SAMPLES_MAX {
            self.samples.pop_front();
        }
        self.samples.push_back((now, cpu));
    }

    /// CPU time used over about the last minute: from the newest sample a
    /// minute old or older, else from the oldest one kept; `None` until there
    /// are two samples to compare.
    pub fn cpu_last_minute_ms(&self, now: Millis) -> Option<u64> {
        if self.samples.len() < 2 {
            return None;
        }
        let &(_, last) = self.samples.back()?;
        let floor = now.saturating_sub(CPU_SPAN);
        let base = self
            .samples
            .iter()
            .rev()
            .skip(1)
            .find(|(t, _)| *t <= floor)
            .or_else(|| self.samples.front())?;
        Some(last.saturating_sub(base.1))
    }
}

/// A running attempt's class and the times it was judged from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The class.
    pub class: Class,
    /// The last progress note, output or workspace change.
    pub silent_since: Millis,
    /// The last of those or of CPU growth.
    pub still_since: Millis,
    /// Whether the CPU of the run is known.
    pub cpu_known: bool,
}

/// Classifies a running attempt whose last progress (or start) was at
/// `progress_at`, with what its heartbeats said.
pub fn classify(now: Millis, w: &Windows, progress_at: Millis, seen: Option<&Seen>) -> Verdict {
    let Some(s) = seen else {
        let class = if now.saturating_sub(progress_at) >= w.stall_alert {
            Class::Stalled
        } else {
            Class::Active
        };
        return Verdict {
            class,
            silent_since: progress_at,
            still_since: progress_at,
            cpu_known: false,
        };
    };
    let silent_since = [Some(progress_at), s.output_at, s.workspace_at]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(progress_at)
        .min(now);
    // One sample cannot show CPU growing: until a second one, CPU is unknown.
    let cpu_known = s.cpu_ms.is_some() && s.samples.len() >= 2;
    let still_since = silent_since.max(s.cpu_at.unwrap_or(0)).min(now);
    let class = if now - silent_since < w.active {
        Class::Active
    } else if cpu_known && now - still_since < w.active {
        Class::BusySilent
    } else if now - still_since >= w.stall_alert
        || (!cpu_known && now - silent_since >= w.stall_alert)
    {
        Class::Stalled
    } else if cpu_known {
        Class::Idle
    } else {
        Class::BusySilent
    };
    Verdict {
        class,
        silent_since,
        still_since,
        cpu_known,
    }
}

impl Verdict {
    /// Whether the attempt has been idle long enough for `agent_idle`: still
    /// for `idle_alert` with its CPU known (a stalled attempt is idle too).
    pub fn idle_alert(&self, now: Millis, w: &Windows) -> bool {
        matches!(self.class, Class::Idle | Class::Stalled)
            && self.cpu_known
            && now - self.still_since >= w.idle_alert
    }

    /// The earliest time, after `now`, at which an alert of this attempt could
    /// open if nothing else happened; `None` if none could.
    pub fn next_alert(&self, now: Millis, w: &Windows) -> Option<Millis> {
        let mut at = vec![self.still_since.saturating_add(w.stall_alert)];
        if self.cpu_known {
            at.push(self.still_since.saturating_add(w.idle_alert));
            // It can only be judged idle once it is silent for `active`.
            at.push(self.silent_since.saturating_add(w.active));
            at.push(self.still_since.saturating_add(w.active));
        } else {
            at.push(self.silent_since.saturating_add(w.stall_alert));
        }
        at.into_iter().filter(|t| *t > now).min()
    }
}

/// The activity of a running attempt as `task show --json` prints it (ages at
/// the time of the query), keys in alphabetical order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActivityView {
    /// `active`, `busy_silent`, `idle` or `stalled`.
    pub class: &'static str,
    /// CPU time used over about the last minute.
    pub cpu_last_minute_ms: Option<u64>,
    /// CPU time of the run's process group in all.
    pub cpu_ms: Option<u64>,
    /// Since the last heartbeat with figures (`None`: none yet).
    pub heard_age_ms: Option<Millis>,
    /// Since the run last wrote output.
    pub output_age_ms: Option<Millis>,
    /// Output bytes written.
    pub output_bytes: u64,
    /// The last lines of output, once output went quiet.
    pub output_tail: String,
    /// Since the last progress note, output or workspace change.
    pub silent_ms: Millis,
    /// Since its workspace last changed.
    pub workspace_age_ms: Option<Millis>,
}

impl ActivityView {
    /// The view at `now`.
    pub fn of(now: Millis, v: &Verdict, seen: Option<&Seen>) -> ActivityView {
        let age = |t: Option<Millis>| t.map(|t| now.saturating_sub(t));
        ActivityView {
            class: v.class.as_str(),
            cpu_last_minute_ms: seen.and_then(|s| s.cpu_last_minute_ms(now)),
            cpu_ms: seen.and_then(|s| s.cpu_ms),
            heard_age_ms: age(seen.map(|s| s.heard_at)),
            output_age_ms: age(seen.and_then(|s| s.output_at)),
            output_bytes: seen.map_or(0, |s| s.output_bytes),
            output_tail: seen.map(|s| s.output_tail.clone()).unwrap_or_default(),
            silent_ms: now.saturating_sub(v.silent_since),
            workspace_age_ms: age(seen.and_then(|s| s.workspace_at)),
        }
    }
}

#[cfg(test)]
mod tests {
    use muster_wire::{Generation, TaskId};

    use super::*;

    const HB: Millis = 10_000;

    fn windows() -> Windows {
        Windows::new(5 * 60_000, 30 * 60_000, HB)
    }

    fn activity(cpu_ms: Option<u64>, output_age_ms: Option<u64>) -> Activity {
        Activity {
            task: TaskId(1),
            generation: Generation(1),
            cpu_ms,
            output_bytes: 10,
            output_age_ms,
            workspace_age_ms: None,
            output_tail: String::new(),
        }
    }

    /// Heartbeats every `HB` from `from` to `to`, CPU growing by `cpu_per_hb`,
    /// output last written at `output_at`.
    fn beats(from: Millis, to: Millis, cpu_per_hb: u64, output_at: Millis) -> Seen {
        let mut s = Seen::default();
        let mut cpu = 0;
        let mut t = from;
        while t <= to {
            s.update(t, &activity(Some(cpu), Some(t - output_at.min(t))), 2 * HB);
            cpu += cpu_per_hb;
            t += HB;
        }
        s
    }

    #[test]
    fn the_windows_are_at_least_two_heartbeats_and_at_most_a_minute() {
        assert_eq!(Windows::new(300_000, 1_800_000, 10_000).active, 60_000);
        assert_eq!(Windows::new(3_000, 1_800_000, 1_000).active, 3_000);
        assert_eq!(Windows::new(300_000, 2_000, 500).active, 2_000);
        assert_eq!(Windows::new(3_000, 1_800_000, 10_000).active, 20_000);
    }

    #[test]
    fn one_sample_cannot_tell_busy_from_idle() {
        let mut s = Seen::default();
        s.update(400_000, &activity(Some(90_000), Some(400_000)), 2 * HB);
        // The same heartbeat again, or one right behind it, is no second sample.
        s.update(400_000, &activity(Some(90_000), Some(400_000)), 2 * HB);
        s.update(400_100, &activity(Some(90_000), Some(400_100)), 2 * HB);
        let v = classify(400_000, &windows(), 0, Some(&s));
        assert_eq!(v.class, Class::BusySilent);
        assert!(!v.idle_alert(400_000, &windows()));
    }

    #[test]
    fn recent_output_is_active() {
        let s = beats(0, 600_000, 0, 595_000);
        let v = classify(600_000, &windows(), 0, Some(&s));
        assert_eq!(v.class, Class::Active);
    }

    #[test]
    fn silence_with_cpu_is_busy_for_as_long_as_it_lasts() {
        // 20 minutes without a byte of output, CPU at half a core.
        let s = beats(0, 1_200_000, 5_000, 0);
        let w = windows();
        let v = classify(1_200_000, &w, 0, Some(&s));
        assert_eq!(v.class, Class::BusySilent);
        assert!(!v.idle_alert(1_200_000, &w));
    }

    #[test]
    fn silence_without_cpu_is_idle_then_alerts_then_stalls() {
        let w = windows();
        let s = beats(0, 400_000, 0, 0);
        let v = classify(60_000, &w, 0, Some(&s));
        assert_eq!(
            v.class,
            Class::Idle,
            "silent and still for the active window"
        );
        assert!(!v.idle_alert(60_000, &w));
        assert_eq!(v.next_alert(60_000, &w), Some(300_000));
        let v = classify(300_000, &w, 0, Some(&s));
        assert!(v.idle_alert(300_000, &w), "idle for idle_alert");
        let v = classify(1_800_000, &w, 0, Some(&s));
        assert_eq!(v.class, Class::Stalled);
        assert!(v.idle_alert(1_800_000, &w), "a stalled agent is idle too");
    }

    #[test]
    fn a_trickle_of_cpu_below_the_threshold_is_idle() {
        // 100 ms per 10 s heartbeat is 1 %: a prompt's timers, not work.
        let s = beats(0, 400_000, 100, 0);
        assert_eq!(
            classify(400_000, &windows(), 0, Some(&s)).class,
            Class::Idle
        );
    }

    #[test]
    fn progress_notes_and_workspace_changes_count_as_activity() {
        let w = windows();
        let s = beats(0, 400_000, 0, 0);
        assert_eq!(
            classify(400_000, &w, 390_000, Some(&s)).class,
            Class::Active
        );
        let mut s = s;
        let mut a = activity(Some(0), Some(400_000));
        a.workspace_age_ms = Some(5_000);
        s.update(400_000, &a, 2 * HB);
        assert_eq!(classify(400_000, &w, 0, Some(&s)).class, Class::Active);
    }

    #[test]
    fn without_figures_the_old_stall_rule_applies() {
        let w = windows();
        assert_eq!(classify(1_000_000, &w, 0, None).class, Class::Active);
        assert_eq!(classify(1_800_000, &w, 0, None).class, Class::Stalled);
        // CPU unknown: silence is not idleness.
        let mut s = Seen::default();
        s.update(400_000, &activity(None, Some(400_000)), 2 * HB);
        let v = classify(400_000, &w, 0, Some(&s));
        assert_eq!(v.class, Class::BusySilent);
        assert!(!v.idle_alert(400_000, &w));
        assert_eq!(classify(1_800_000, &w, 0, Some(&s)).class, Class::Stalled);
    }

    #[test]
    fn cpu_in_the_last_minute_compares_samples_a_minute_apart() {
        let s = beats(0, 120_000, 1_000, 0);
        // 13 samples, 1 s of CPU each 10 s: 6 s over the last minute.
        assert_eq!(s.cpu_last_minute_ms(120_000), Some(6_000));
        let mut one = Seen::default();
        one.update(0, &activity(Some(500), None), 2 * HB);
        assert_eq!(
            one.cpu_last_minute_ms(0),
            None,
            "one sample compares nothing"
        );
    }

    #[test]
    fn a_group_that_lost_cpu_time_starts_counting_again() {
        let mut s = beats(0, 60_000, 1_000, 0);
        s.update(70_000, &activity(Some(10), Some(70_000)), 2 * HB);
        assert_eq!(s.cpu_last_minute_ms(70_000), None);
        s.update(80_000, &activity(Some(10), Some(80_000)), 2 * HB);
        assert_eq!(s.cpu_last_minute_ms(80_000), Some(0));
        let v = classify(400_000, &windows(), 0, Some(&s));
        assert_eq!(v.class, Class::Idle);
    }
}
