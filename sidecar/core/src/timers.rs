//! Timers as data: the next heartbeat and the orphan claim deadline are one
//! slot each, the start deadlines of runs one ordered index (see
//! [`crate::starts`]). [`Core::poll_timeout`] names the earliest; the shell
//! sleeps until it or the next input, whichever comes first, and then calls
//! [`Core::handle_timeout`], which handles only what is due.

use std::collections::BTreeSet;
use std::time::Duration;

use muster_wire::TaskId;

use crate::policy::{HEARTBEAT_INTERVAL_MIN, HEARTBEAT_JITTER};
use crate::{Core, Effect, commit_kind};

/// The start deadlines, ordered; each names a task whose entry in
/// `Core::starts` holds the same deadline (an entry without one is stale).
#[derive(Debug, Default)]
pub(crate) struct Deadlines {
    set: BTreeSet<(Duration, TaskId)>,
}

impl Deadlines {
    pub(crate) fn arm(&mut self, at: Duration, task: TaskId) {
        self.set.insert((at, task));
    }

    pub(crate) fn disarm(&mut self, at: Duration, task: TaskId) {
        self.set.remove(&(at, task));
    }

    pub(crate) fn next(&self) -> Option<Duration> {
        self.set.first().map(|(at, _)| *at)
    }

    /// Removes and returns the tasks due at `now`, earliest first.
    fn pop_due(&mut self, now: Duration) -> Vec<TaskId> {
        let mut due = Vec::new();
        while let Some(&(at, task)) = self.set.first() {
            if at > now {
                break;
            }
            self.set.pop_first();
            due.push(task);
        }
        due
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.set.len()
    }
}

impl Core {
    /// When the core next needs [`Core::handle_timeout`]: the next heartbeat,
    /// the end of the orphan claim, or the earliest start deadline. `None`
    /// when nothing is pending; the shell then waits for input alone.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Duration> {
        [
            self.heartbeat_at,
            self.orphan_claim_at,
            self.deadlines.next(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Handles every deadline due at `now` (early calls are harmless).
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.heartbeat_at.is_some_and(|at| at <= now) {
            self.heartbeat_due(now);
        }
        if self.orphan_claim_at.is_some_and(|at| at <= now) {
            self.orphan_claim_at = None;
            let all: Vec<_> = std::mem::take(&mut self.orphans).into_iter().collect();
            if !all.is_empty() {
                self.effects.push(Effect::EndOrphans(all));
            }
        }
        for task in self.deadlines.pop_due(now) {
            self.start_due(now, task);
        }
        self.admit_deferred(now);
    }

    /// The heartbeat interval in force (the hub's, once welcomed), without jitter.
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }

    /// Sets the interval a welcome announced and schedules the next heartbeat.
    pub(crate) fn heartbeat_welcomed(&mut self, now: Duration, interval: Duration) {
        self.heartbeat_interval = interval.max(HEARTBEAT_INTERVAL_MIN);
        self.schedule_heartbeat(now);
    }

    pub(crate) fn schedule_heartbeat(&mut self, now: Duration) {
        let f = 1.0 - HEARTBEAT_JITTER + 2.0 * HEARTBEAT_JITTER * self.rng.unit();
        self.heartbeat_at = Some(now.saturating_add(self.heartbeat_interval.mul_f64(f)));
    }

    /// A heartbeat is due: send it if a session is up, and make the forgetting
    /// of ended tasks durable if nothing else has (an idle sidecar), so their
    /// run directories can go (see [`crate::durability`]).
    fn heartbeat_due(&mut self, now: Duration) {
        if self.connected {
            self.effects.push(Effect::Heartbeat);
        }
        if !self.unreleased.is_empty() && commit_kind(&self.effects) != crate::CommitKind::Flushed {
            self.effects.push(Effect::NextReport(self.next_report));
        }
        self.schedule_heartbeat(now);
    }
}
