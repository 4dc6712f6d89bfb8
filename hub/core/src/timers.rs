//! Timers as data: every deadline the core keeps is an entry in one ordered
//! index, so a tick touches only what is due and the shell sleeps until
//! [`Core::poll_timeout`] or the next input, whichever comes first.
//!
//! Entries are hints, checked when they come due: an entry may be early or
//! stale (the task moved on, the agent came back), and then it is dropped or
//! re-armed at the deadline the current state gives. What must never happen is
//! a deadline with no entry at or before it; every change that can create or
//! move a deadline arms one (see the `arm_*` calls).

use std::collections::BTreeSet;

use muster_wire::TaskId;
use muster_wire::msg::Outcome;

use crate::model::*;
use crate::tasks::failure;
use crate::{ConnId, Core};

/// Alerts are evaluated at most this often (a full pass over agents and running
/// tasks), and only while one may open or close.
pub(crate) const ALERT_EVERY: Millis = 1000;

/// What a deadline is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Due {
    /// A connection's delayed acknowledgement.
    Ack(ConnId),
    /// An offline agent's lost grace: its attempts are re-queued.
    Lost(String),
    /// A task's accept, start or run timeout.
    Attempt(TaskId),
}

/// The deadline index.
#[derive(Debug, Default)]
pub(crate) struct Deadlines {
    set: BTreeSet<(Millis, Due)>,
}

impl Deadlines {
    /// Adds a deadline (a duplicate of an existing entry is one entry).
    pub(crate) fn arm(&mut self, at: Millis, due: Due) {
        self.set.insert((at, due));
    }

    /// Removes a deadline armed before (absent is fine).
    pub(crate) fn disarm(&mut self, at: Millis, due: &Due) {
        self.set.remove(&(at, due.clone()));
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Millis> {
        self.set.first().map(|(t, _)| *t)
    }

    /// Removes and returns every entry due at `now`, earliest first.
    fn pop_due(&mut self, now: Millis) -> Vec<Due> {
        let mut due = Vec::new();
        while let Some((t, _)) = self.set.first() {
            if *t > now {
                break;
            }
            if let Some((_, d)) = self.set.pop_first() {
                due.push(d);
            }
        }
        due
    }

    /// Entries held, for tests and metrics.
    pub(crate) fn len(&self) -> usize {
        self.set.len()
    }
}

impl Core {
    /// When the core next needs a [`crate::Input::Tick`]: the earliest deadline it
    /// keeps (timeouts, delayed acks, retries leaving their backoff, alerts).
    /// `None` when nothing is pending; the shell then waits for input alone.
    pub fn poll_timeout(&self) -> Option<Millis> {
        [
            self.deadlines.next(),
            self.sched.next_delayed(),
            self.alerts_at,
            Some(self.prune_at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Time passed: handles what came due, nothing else.
    pub(crate) fn on_tick(&mut self, now: Millis) {
        for due in self.deadlines.pop_due(now) {
            match due {
                Due::Ack(conn) => match self.pending_acks.get(&conn) {
                    Some(&(_, since)) if now >= since + self.ack_delay => self.flush_ack(conn),
                    Some(&(_, since)) => self.deadlines.arm(since + self.ack_delay, due),
                    None => {}
                },
                Due::Lost(name) => self.lost_due(now, name),
                Due::Attempt(id) => {
                    if let Some(l) = self.tasks.get_mut(&id) {
                        l.armed_at = None;
                    }
                    self.attempt_due(now, id);
                }
            }
        }
        if self.alerts_at.is_some_and(|t| t <= now) {
            self.alerts_at = None;
            self.last_alert_eval = now;
            let mut next = self.evaluate_alerts(now);
            if !self.alerts.list().is_empty() {
                // Open alerts may close without an event of their own.
                next = Some(next.map_or(now + ALERT_EVERY, |n| n.min(now + ALERT_EVERY)));
            }
            if let Some(at) = next {
                self.arm_alerts(at);
            }
        }
        if self.sched.next_delayed().is_some_and(|t| t <= now) {
            self.dirty_schedule = true;
        }
    }

    fn lost_due(&mut self, now: Millis, name: String) {
        let Some(at) = self.lost_deadline(&name) else {
            return;
        };
        if now < at {
            return self.deadlines.arm(at, Due::Lost(name));
        }
        let grace = self.policy.lost_grace.as_millis() as u64;
        let lost: Vec<TaskId> = self
            .agents
            .get(name.as_str())
            .map(|a| a.tasks.iter().copied().collect())
            .unwrap_or_default();
        for id in lost {
            let failure = failure(&format!(
                "the agent was offline for more than {} s",
                grace / 1000
            ));
            self.end_attempt(now, id, Outcome::Lost, Some(failure), false);
        }
    }

    fn attempt_due(&mut self, now: Millis, id: TaskId) {
        let Some((at, outcome, why)) = self.attempt_deadline(id) else {
            return;
        };
        if now < at {
            return self.arm_attempt(id);
        }
        self.end_attempt(now, id, outcome, Some(failure(why)), false);
    }

    /// When an offline agent's attempts are re-queued, if it is offline with work.
    fn lost_deadline(&self, name: &str) -> Option<Millis> {
        let agent = self.agents.get(name)?;
        let since = agent.offline_since?;
        if agent.tasks.is_empty() {
            return None;
        }
        // A restarted hub counts the grace from its own start.
        Some(since.max(self.started_at) + self.policy.lost_grace.as_millis() as u64)
    }

    /// The current attempt's deadline: accept, start or run timeout.
    fn attempt_deadline(&self, id: TaskId) -> Option<(Millis, Outcome, &'static str)> {
        let live = self.tasks.get(&id)?;
        let a = live.attempt.as_ref()?;
        // An agent that is away is the lost grace's business, and a restarted hub
        // counts these deadlines from its own start, never from before it.
        let connected = self
            .agents
            .get(a.agent.as_str())
            .is_some_and(|g| g.conn.is_some());
        let since = |t: Millis| t.max(self.started_at);
        match live.rec.state {
            TaskState::Assigned | TaskState::Accepted if !connected => None,
            TaskState::Assigned => Some((
                since(a.assigned_at) + self.policy.accept_timeout.as_millis() as u64,
                Outcome::AcceptTimeout,
                "the sidecar did not accept in time",
            )),
            // Counted from the sidecar's last word: while it makes the
            // attempt's workspace (a clone can take minutes) it reports
            // progress, and the start has start_timeout from the last report.
            TaskState::Accepted => Some((
                since(
                    a.accepted_at
                        .unwrap_or(a.assigned_at)
                        .max(live.rec.progress_at.unwrap_or(0)),
                ) + self.policy.start_timeout.as_millis() as u64,
                Outcome::StartTimeout,
                "the agent's start was not verified in time",
            )),
            TaskState::Running => {
                let (t, s) = (live.rec.timeout_ms?, a.started_at?);
                Some((
                    s.saturating_add(t),
                    Outcome::TimedOut,
                    "the task ran past its timeout",
                ))
            }
            _ => None,
        }
    }

    /// Arms the current attempt's deadline, replacing the one armed before.
    pub(crate) fn arm_attempt(&mut self, id: TaskId) {
        let at = self.attempt_deadline(id).map(|(at, ..)| at);
        let Some(live) = self.tasks.get_mut(&id) else {
            return;
        };
        if live.armed_at == at {
            return;
        }
        if let Some(old) = live.armed_at {
            self.deadlines.disarm(old, &Due::Attempt(id));
        }
        live.armed_at = at;
        if let Some(at) = at {
            self.deadlines.arm(at, Due::Attempt(id));
        }
    }

    /// Arms an offline agent's lost grace and its agent-down alert.
    pub(crate) fn arm_offline(&mut self, name: &str) {
        if let Some(at) = self.lost_deadline(name) {
            self.deadlines.arm(at, Due::Lost(name.to_string()));
        }
        if let Some(since) = self.agents.get(name).and_then(|a| a.offline_since) {
            let down = self.policy.agent_down_alert.as_millis() as u64;
            self.arm_alerts(since.max(self.started_at) + down);
        }
    }

    /// Asks for an alert pass at once: for rare events that may open or close
    /// one (an agent back, a circuit tripped or closed, a revocation).
    pub(crate) fn arm_alerts_now(&mut self, now: Millis) {
        self.alerts_at = Some(self.alerts_at.map_or(now, |t| t.min(now)));
    }

    /// Asks for an alert pass at `at`, or a little later: at most one per [`ALERT_EVERY`].
    pub(crate) fn arm_alerts(&mut self, at: Millis) {
        let at = at.max(self.last_alert_eval.saturating_add(ALERT_EVERY));
        self.alerts_at = Some(self.alerts_at.map_or(at, |t| t.min(at)));
    }

    /// After a batch: the deadlines of every task it changed. A running task's
    /// stall alert is armed from its last progress; a task leaving a state with
    /// an open alert asks for a pass that can close it.
    pub(crate) fn arm_changed(&mut self, changed: &[TaskId]) {
        // The earliest an alert of a running task can open is its idle or
        // stall window after its last progress; the pass then says exactly when.
        let stall = (self.policy.stall_alert.min(self.policy.idle_alert)).as_millis() as u64;
        let alerts_open = !self.alerts.list().is_empty();
        let mut alert_at: Option<Millis> = None;
        for &id in changed {
            self.arm_attempt(id);
            let Some(l) = self.tasks.get(&id) else {
                continue;
            };
            if l.rec.state == TaskState::Running
                && let Some(p) = l.rec.progress_at
            {
                alert_at = Some(alert_at.map_or(p + stall, |a| a.min(p + stall)));
            }
            // A task never assigned may need what no agent has (`unschedulable`);
            // one that ran once had a match (agent changes arm their own pass).
            if l.rec.state == TaskState::Queued && l.rec.generation.0 == 0 {
                alert_at = Some(self.last_now);
            }
        }
        if alerts_open {
            alert_at = Some(self.last_now);
        }
        if let Some(at) = alert_at {
            self.arm_alerts(at);
        }
    }
}
