//! Alerts: raised when their cause appears, cleared when it goes. Pure.
//!
//! Kinds: `agent_down` (offline past `agent_down_alert`), `task_failed` (a task
//! failed for good; cleared by requeue), `stalled` (running past `stall_alert`
//! without progress, output or CPU), `circuit_open` (an agent's breaker
//! tripped), `retry_storm` (retries far outrun completions), and `agent_idle`
//! (a running agent without output or CPU past `idle_alert`: waiting for
//! input, or hung), `unschedulable` (a queued task no enrolled agent could
//! ever run: a capability nobody has). See [`crate::activity`] for how busy is told from idle.

use std::collections::{BTreeMap, VecDeque};

use serde::{Serialize, Serializer};

use super::Millis;

/// The window the retry-storm rule looks at.
pub const STORM_WINDOW: Millis = 5 * 60 * 1000;
/// Retries in the window below which there is no storm, whatever the ratio.
pub const STORM_RETRIES_MIN: usize = 20;
/// A storm: more than this many retries per completion in the window.
pub const STORM_RATIO: usize = 3;
/// Most open `task_failed` alerts kept; older ones are dropped (they stay in the event log).
pub const FAILED_ALERTS_MAX: usize = 1000;
/// Most samples kept for the storm rule, so a burst cannot grow memory without bound.
const SAMPLES_MAX: usize = 100_000;

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// An agent offline past `agent_down_alert`.
    AgentDown,
    /// A task failed for good; cleared by requeue.
    TaskFailed,
    /// A task running past `stall_alert` without progress, output or CPU.
    Stalled,
    /// An agent's circuit breaker tripped.
    CircuitOpen,
    /// Retries far outrun completions.
    RetryStorm,
    /// A running agent with no output and no CPU past `idle_alert`.
    AgentIdle,
    /// A queued task that no enrolled agent could ever run.
    Unschedulable,
}

impl AlertKind {
    /// Every kind, in the order `/metrics` lists them.
    pub const ALL: [AlertKind; 7] = [
        AlertKind::AgentDown,
        AlertKind::TaskFailed,
        AlertKind::Stalled,
        AlertKind::CircuitOpen,
        AlertKind::RetryStorm,
        AlertKind::AgentIdle,
        AlertKind::Unschedulable,
    ];

    /// The stable name (JSON, metrics labels).
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::AgentDown => "agent_down",
            AlertKind::TaskFailed => "task_failed",
            AlertKind::Stalled => "stalled",
            AlertKind::CircuitOpen => "circuit_open",
            AlertKind::RetryStorm => "retry_storm",
            AlertKind::AgentIdle => "agent_idle",
            AlertKind::Unschedulable => "unschedulable",
        }
    }
}

/// One open alert.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// What it is about.
    pub kind: AlertKind,
    /// The agent name or task id it is about (empty for fleet-wide ones).
    pub subject: String,
    /// A sentence for the operator.
    pub message: String,
    /// When it was raised.
    pub since: Millis,
}

impl Alert {
    /// The alert with what happened to it.
    pub fn note(&self, state: AlertState) -> AlertNote {
        AlertNote {
            alert: self.clone(),
            state,
        }
    }
}

/// Where an alert stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    /// Open (as `alerts` lists it).
    Open,
    /// Just raised.
    Raised,
    /// Just cleared.
    Cleared,
}

/// An alert and where it stands: what `alerts --json` lists (open), and what
/// the event log and `alert_command` get (raised, cleared).
#[derive(Debug, Clone, PartialEq)]
pub struct AlertNote {
    /// The alert.
    pub alert: Alert,
    /// Where it stands.
    pub state: AlertState,
}

/// `{"alert", "kind": "alert", "message", "since", "state", "subject"}`, keys in
/// alphabetical order.
impl Serialize for AlertNote {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Shape<'a> {
            alert: AlertKind,
            kind: &'static str,
            message: &'a str,
            since: Millis,
            state: AlertState,
            subject: &'a str,
        }
        let a = &self.alert;
        Shape {
            alert: a.kind,
            kind: "alert",
            message: &a.message,
            since: a.since,
            state: self.state,
            subject: &a.subject,
        }
        .serialize(s)
    }
}

/// Most alert changes (raised, cleared) kept for the dashboard's "recent" list.
pub const RECENT_MAX: usize = 50;

/// An alert raised or cleared, and when: `{"alert", "at", "message", "since",
/// "state", "subject"}`, keys in alphabetical order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertChange {
    /// What it is about.
    pub alert: AlertKind,
    /// When it was raised or cleared.
    pub at: Millis,
    /// Its sentence.
    pub message: String,
    /// When it was raised.
    pub since: Millis,
    /// Raised or cleared.
    pub state: AlertState,
    /// The agent name or task id it is about.
    pub subject: String,
}

/// Open alerts and the samples the storm rule needs.
#[derive(Debug, Default)]
pub struct Alerts {
    open: BTreeMap<(AlertKind, String), Alert>,
    /// The latest raises and clears, oldest first, at most [`RECENT_MAX`]
    /// (in memory: the event log keeps them all).
    recent: VecDeque<AlertChange>,
    retries: VecDeque<Millis>,
    completions: VecDeque<Millis>,
}

/// What changed: alerts raised and cleared.
pub type Changes = Vec<AlertNote>;

impl Alerts {
    /// Open alerts, oldest first.
    pub fn list(&self) -> Vec<&Alert> {
        let mut v: Vec<&Alert> = self.open.values().collect();
        v.sort_by_key(|a| a.since);
        v
    }

    /// Notes a raise or clear at `at` for [`Alerts::recent`].
    pub fn note_change(&mut self, at: Millis, note: &AlertNote) {
        if self.recent.len() >= RECENT_MAX {
            self.recent.pop_front();
        }
        self.recent.push_back(AlertChange {
            alert: note.alert.kind,
            at,
            message: note.alert.message.clone(),
            since: note.alert.since,
            state: note.state,
            subject: note.alert.subject.clone(),
        });
    }

    /// The latest raises and clears, newest first.
    pub fn recent(&self) -> Vec<AlertChange> {
        self.recent.iter().rev().cloned().collect()
    }

    /// Open alerts by kind, for metrics.
    pub fn count(&self, kind: AlertKind) -> usize {
        self.open.keys().filter(|(k, _)| *k == kind).count()
    }

    /// Raises an alert unless it is open already.
    pub fn raise(
        &mut self,
        now: Millis,
        kind: AlertKind,
        subject: &str,
        message: String,
        changes: &mut Changes,
    ) {
        let key = (kind, subject.to_string());
        if self.open.contains_key(&key) {
            return;
        }
        if kind == AlertKind::TaskFailed && self.count(AlertKind::TaskFailed) >= FAILED_ALERTS_MAX {
            let oldest = self
                .open
                .iter()
                .filter(|((k, _), _)| *k == AlertKind::TaskFailed)
                .min_by_key(|(_, a)| a.since)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.open.remove(&k);
            }
        }
        let alert = Alert {
            kind,
            subject: subject.into(),
            message,
            since: now,
        };
        changes.push(alert.note(AlertState::Raised));
        self.open.insert(key, alert);
    }

    /// Clears an alert if it is open.
    pub fn clear(&mut self, kind: AlertKind, subject: &str, changes: &mut Changes) {
        if let Some(a) = self.open.remove(&(kind, subject.to_string())) {
            changes.push(a.note(AlertState::Cleared));
        }
    }

    /// Sets the alerts of one kind to exactly `wanted` (subject, message): raises new, clears gone.
    pub fn sync(
        &mut self,
        now: Millis,
        kind: AlertKind,
        wanted: Vec<(String, String)>,
        changes: &mut Changes,
    ) {
        let keep: std::collections::HashSet<&String> = wanted.iter().map(|(s, _)| s).collect();
        let gone: Vec<String> = self
            .open
            .keys()
            .filter(|(k, s)| *k == kind && !keep.contains(s))
            .map(|(_, s)| s.clone())
            .collect();
        for s in gone {
            self.clear(kind, &s, changes);
        }
        for (subject, message) in wanted {
            self.raise(now, kind, &subject, message, changes);
        }
    }

    /// Counts a retry (an assignment of a task attempted before).
    pub fn note_retry(&mut self, now: Millis) {
        push_bounded(&mut self.retries, now);
    }

    /// Counts a completion.
    pub fn note_completion(&mut self, now: Millis) {
        push_bounded(&mut self.completions, now);
    }

    /// The retry-storm rule over the last [`STORM_WINDOW`].
    pub fn check_storm(&mut self, now: Millis, changes: &mut Changes) {
        let floor = now.saturating_sub(STORM_WINDOW);
        for q in [&mut self.retries, &mut self.completions] {
            while q.front().is_some_and(|t| *t < floor) {
                q.pop_front();
            }
        }
        let (r, c) = (self.retries.len(), self.completions.len());
        let wanted = if r >= STORM_RETRIES_MIN && r > STORM_RATIO * c {
            vec![(
                String::new(),
                format!(
                    "{r} retries but {c} completions in the last 5 minutes: something fails over and over"
                ),
            )]
        } else {
            Vec::new()
        };
        self.sync(now, AlertKind::RetryStorm, wanted, changes);
    }
}

fn push_bounded(q: &mut VecDeque<Millis>, now: Millis) {
    if q.len() >= SAMPLES_MAX {
        q.pop_front();
    }
    q.push_back(now);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_is_idempotent_and_sync_clears_what_is_gone() {
        let mut a = Alerts::default();
        let mut ch = Vec::new();
        a.raise(1, AlertKind::AgentDown, "x", "down".into(), &mut ch);
        a.raise(2, AlertKind::AgentDown, "x", "down".into(), &mut ch);
        assert_eq!(ch.len(), 1);
        a.sync(
            3,
            AlertKind::AgentDown,
            vec![("y".into(), "down".into())],
            &mut ch,
        );
        assert_eq!(ch.len(), 3, "x cleared, y raised");
        assert_eq!(a.list().len(), 1);
        assert_eq!(a.list()[0].subject, "y");
    }

    #[test]
    fn storm_needs_many_retries_and_few_completions() {
        let mut a = Alerts::default();
        let mut ch = Vec::new();
        for t in 0..25 {
            a.note_retry(t);
        }
        for t in 0..5 {
            a.note_completion(t);
        }
        a.check_storm(100, &mut ch);
        assert_eq!(a.count(AlertKind::RetryStorm), 1);
        for t in 0..10 {
            a.note_completion(200 + t);
        }
        a.check_storm(300, &mut ch);
        assert_eq!(
            a.count(AlertKind::RetryStorm),
            0,
            "25 retries vs 15 completions is no storm"
        );
        a.check_storm(STORM_WINDOW * 3, &mut ch);
        assert_eq!(a.count(AlertKind::RetryStorm), 0);
    }
}
