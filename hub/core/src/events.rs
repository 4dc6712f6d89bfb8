//! The event log and alerts: every change recorded once, alerts raised and cleared.
//!
//! The core records what happened as an [`Event`]; the shell renders it as the
//! JSON text of its [`EventRecord`] when it commits the write (`watch --json`
//! prints that text, and the log keeps it).

use muster_wire::msg::Role;
use muster_wire::{Generation, TaskId};
use serde::{Serialize, Serializer};

use crate::model::*;

use crate::activity;
use crate::alerts::{self, AlertKind, AlertNote};
use crate::ops::format_age;
use crate::{Core, Write};

/// Something that happened, for the event log.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A task changed state (or was submitted or requeued).
    Task {
        /// The task.
        id: TaskId,
        /// Its latest attempt's generation.
        generation: Generation,
        /// Its title.
        title: String,
        /// The agent of its latest attempt.
        agent: Option<String>,
        /// The state it left (its state, for a submission or a requeue).
        from: TaskState,
        /// The state it is in now.
        state: TaskState,
        /// Why, in a few words.
        why: String,
    },
    /// An agent came, went, changed its health, or was refused.
    Agent {
        /// The agent.
        name: String,
        /// What changed.
        change: AgentChange,
        /// Why, in a few words.
        why: String,
    },
    /// An operator changed an agent, an identity or a task.
    Audit {
        /// The identity that acted.
        who: String,
        /// What it did.
        action: AuditAction,
        /// The agent, identity or task it acted on.
        subject: String,
    },
    /// An operator created a join token.
    TokenCreated {
        /// The identity that created it.
        who: String,
        /// The role it grants.
        role: Role,
        /// Its lifetime in seconds.
        ttl_s: u64,
        /// The only name that may enroll with it.
        name: Option<String>,
    },
    /// An enrollment with a name-bound token replaced that name's live identity.
    IdentityReplaced {
        /// The name.
        who: String,
        /// Its role.
        role: Role,
        /// The certificate fingerprint of the identity it replaced.
        old_fingerprint: String,
    },
    /// An identity enrolled.
    Enrolled {
        /// Its name.
        who: String,
        /// Its role.
        role: Role,
    },
    /// An alert was raised or cleared.
    Alert(AlertNote),
    /// A running attempt's agent reported progress.
    Progress {
        /// The task.
        id: TaskId,
        /// The attempt.
        generation: Generation,
        /// Its agent.
        agent: String,
        /// The note.
        note: String,
    },
}

impl Event {
    /// What the event is about, for the shell's choice of log level.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Task { .. } | Event::Progress { .. } => EventKind::Task,
            Event::Agent { .. } => EventKind::Agent,
            Event::Alert(_) => EventKind::Alert,
            Event::Audit { .. }
            | Event::TokenCreated { .. }
            | Event::IdentityReplaced { .. }
            | Event::Enrolled { .. } => EventKind::Audit,
        }
    }

    /// A task's change from `from` to its current state.
    pub(crate) fn task(t: &TaskRecord, from: TaskState, why: String) -> Event {
        Event::Task {
            id: t.id,
            generation: t.generation,
            title: t.title.clone(),
            agent: t.agent.clone(),
            from,
            state: t.state,
            why,
        }
    }
}

/// How an agent changed, as its event names it (`state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentChange {
    /// Its session opened.
    Online,
    /// Its session closed.
    Offline,
    /// Its session was refused.
    Refused,
    /// Its circuit breaker tripped.
    Degraded,
    /// Its self-test passed again.
    Healthy,
    /// Its self-test failed.
    Unhealthy,
    /// Its circuit breaker closed.
    CircuitClosed,
}

/// An operator's action, as its audit event names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    /// `agent revoke`.
    AgentRevoke,
    /// `identity revoke`.
    IdentityRevoke,
    /// `agent set`.
    AgentSet,
    /// `agent drain`.
    AgentDrain,
    /// `agent undrain`.
    AgentUndrain,
    /// `task cancel`.
    TaskCancel,
    /// `task requeue`.
    TaskRequeue,
    /// `token create --kind api`.
    ApiTokenCreate,
    /// `token revoke --kind api`.
    ApiTokenRevoke,
    /// `token revoke --kind join`.
    JoinTokenRevoke,
}

/// The event's JSON: an object with a `kind`, its keys in alphabetical order
/// (as `watch --json` has always printed them).
impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct TaskShape<'a> {
            agent: Option<&'a str>,
            from: TaskState,
            generation: Generation,
            id: TaskId,
            kind: &'static str,
            state: TaskState,
            title: &'a str,
            why: &'a str,
        }
        #[derive(Serialize)]
        struct AgentShape<'a> {
            kind: &'static str,
            name: &'a str,
            state: AgentChange,
            why: &'a str,
        }
        #[derive(Serialize)]
        struct AuditShape<'a> {
            action: AuditAction,
            kind: &'static str,
            subject: &'a str,
            who: &'a str,
        }
        #[derive(Serialize)]
        struct TokenShape<'a> {
            action: &'static str,
            kind: &'static str,
            name: &'a Option<String>,
            role: Role,
            ttl_s: u64,
            who: &'a str,
        }
        #[derive(Serialize)]
        struct ReplacedShape<'a> {
            action: &'static str,
            kind: &'static str,
            old_fingerprint: &'a str,
            role: Role,
            who: &'a str,
        }
        #[derive(Serialize)]
        struct ProgressShape<'a> {
            agent: &'a str,
            generation: Generation,
            id: TaskId,
            kind: &'static str,
            note: &'a str,
        }
        #[derive(Serialize)]
        struct EnrolledShape<'a> {
            action: &'static str,
            kind: &'static str,
            role: Role,
            who: &'a str,
        }
        match self {
            Event::Task {
                id,
                generation,
                title,
                agent,
                from,
                state,
                why,
            } => TaskShape {
                agent: agent.as_deref(),
                from: *from,
                generation: *generation,
                id: *id,
                kind: "task",
                state: *state,
                title,
                why,
            }
            .serialize(s),
            Event::Agent { name, change, why } => AgentShape {
                kind: "agent",
                name,
                state: *change,
                why,
            }
            .serialize(s),
            Event::Audit {
                who,
                action,
                subject,
            } => AuditShape {
                action: *action,
                kind: "audit",
                subject,
                who,
            }
            .serialize(s),
            Event::TokenCreated {
                who,
                role,
                ttl_s,
                name,
            } => TokenShape {
                action: "token_create",
                kind: "audit",
                name,
                role: *role,
                ttl_s: *ttl_s,
                who,
            }
            .serialize(s),
            Event::IdentityReplaced {
                who,
                role,
                old_fingerprint,
            } => ReplacedShape {
                action: "identity_replaced",
                kind: "audit",
                old_fingerprint,
                role: *role,
                who,
            }
            .serialize(s),
            Event::Enrolled { who, role } => EnrolledShape {
                action: "enroll",
                kind: "audit",
                role: *role,
                who,
            }
            .serialize(s),
            Event::Alert(note) => note.serialize(s),
            Event::Progress {
                id,
                generation,
                agent,
                note,
            } => ProgressShape {
                agent,
                generation: *generation,
                id: *id,
                kind: "progress",
                note,
            }
            .serialize(s),
        }
    }
}

impl Core {
    pub(crate) fn agent_event(&mut self, now: Millis, name: &str, change: AgentChange, why: &str) {
        let event = Event::Agent {
            name: name.into(),
            change,
            why: why.into(),
        };
        self.push_event(now, event);
    }

    pub(crate) fn audit_event(
        &mut self,
        now: Millis,
        who: &str,
        action: AuditAction,
        subject: &str,
    ) {
        let event = Event::Audit {
            who: who.into(),
            action,
            subject: subject.into(),
        };
        self.push_event(now, event);
    }

    pub(crate) fn push_event(&mut self, now: Millis, event: Event) {
        let seq = self.next_event_seq;
        self.next_event_seq += 1;
        self.out.writes.push(Write::Event {
            seq,
            at: now,
            event,
        });
    }

    pub(crate) fn alert_raise(
        &mut self,
        now: Millis,
        kind: AlertKind,
        subject: &str,
        message: String,
    ) {
        let mut changes = Vec::new();
        self.alerts.raise(now, kind, subject, message, &mut changes);
        self.alert_changes(now, changes);
    }

    pub(crate) fn alert_clear(&mut self, kind: AlertKind, subject: &str) {
        let mut changes = Vec::new();
        self.alerts.clear(kind, subject, &mut changes);
        // Clearing needs no `now` in the record; the event carries the batch's time.
        self.alert_changes(self.last_now, changes);
    }

    pub(crate) fn alert_changes(&mut self, now: Millis, changes: alerts::Changes) {
        for c in changes {
            self.alerts.note_change(now, &c);
            self.push_event(now, Event::Alert(c.clone()));
            self.out.alerts.push(c);
        }
    }

    /// Re-derives the alerts whose cause is a condition: agent down, stalled, circuit, storm.
    /// One pass over agents and running tasks: opens and closes the alerts that
    /// depend on time. Returns when the next one could open, if any could.
    pub(crate) fn evaluate_alerts(&mut self, now: Millis) -> Option<Millis> {
        let mut next: Option<Millis> = None;
        let mut later = |t: Millis| next = Some(next.map_or(t, |n: Millis| n.min(t)));
        let down_after = self.policy.agent_down_alert.as_millis() as u64;
        let mut down = Vec::new();
        let mut circuit = Vec::new();
        for a in self.agents.values() {
            if a.rec.revoked {
                continue;
            }
            let since = if a.conn.is_none() {
                a.offline_since.map(|t| t.max(self.started_at))
            } else {
                None
            };
            if let Some(t) = since
                && now < t + down_after
            {
                later(t + down_after);
            }
            if let Some(t) = since
                && now >= t + down_after
            {
                down.push((
                    a.rec.name.clone(),
                    format!(
                        "agent {} has been offline for {} s",
                        a.rec.name,
                        (now - t) / 1000
                    ),
                ));
            }
            if let Some(until) = a.breaker_until {
                circuit.push((a.rec.name.clone(), format!("agent {} is degraded after repeated infrastructure failures; circuit open until {until}", a.rec.name)));
            }
        }
        let windows = self.activity_windows();
        let mut stalled: Vec<(String, String)> = Vec::new();
        let mut idle: Vec<(String, String)> = Vec::new();
        for l in self.tasks.values() {
            if l.rec.state != TaskState::Running {
                continue;
            }
            let Some(progress) = l.rec.progress_at else {
                continue;
            };
            let seen = l.current_activity();
            let v = activity::classify(now, &windows, progress, seen);
            if let Some(t) = v.next_alert(now, &windows) {
                later(t);
            }
            let (id, title) = (l.rec.id, &l.rec.title);
            if v.class == activity::Class::Stalled {
                stalled.push((
                    id.to_string(),
                    format!(
                        "task {id} ({title}) has run {} without progress, output or CPU",
                        format_age(now - v.still_since)
                    ),
                ));
            }
            if v.idle_alert(now, &windows) {
                let agent = l.rec.agent.as_deref().unwrap_or("?");
                let tail = seen.map(|s| s.output_tail.trim_end()).unwrap_or_default();
                let last = if tail.is_empty() {
                    String::new()
                } else {
                    format!("; last output: {tail}")
                };
                idle.push((
                    id.to_string(),
                    format!(
                        "task {id} ({title}) on {agent} has been idle for {}: no output and no CPU (waiting for input, or hung){last}",
                        format_age(now - v.still_since)
                    ),
                ));
            }
        }
        down.sort();
        circuit.sort();
        stalled.sort();
        idle.sort();
        let mut changes = Vec::new();
        self.alerts
            .sync(now, AlertKind::AgentDown, down, &mut changes);
        self.alerts
            .sync(now, AlertKind::CircuitOpen, circuit, &mut changes);
        self.alerts
            .sync(now, AlertKind::Stalled, stalled, &mut changes);
        self.alerts
            .sync(now, AlertKind::AgentIdle, idle, &mut changes);
        let unschedulable = self.unschedulable();
        self.alerts
            .sync(now, AlertKind::Unschedulable, unschedulable, &mut changes);
        self.alerts.check_storm(now, &mut changes);
        self.alert_changes(now, changes);
        next
    }
}

impl Core {
    /// The windows of the activity classification, from the policy.
    pub(crate) fn activity_windows(&self) -> activity::Windows {
        let ms = |d: std::time::Duration| d.as_millis() as Millis;
        activity::Windows::new(
            ms(self.policy.idle_alert),
            ms(self.policy.stall_alert),
            ms(self.policy.heartbeat_interval),
        )
    }

    /// What a running task's current attempt is doing, as `task show` prints
    /// it at `now`; `None` for a task that is not running.
    pub fn activity_view(&self, id: TaskId, now: Millis) -> Option<activity::ActivityView> {
        let l = self.tasks.get(&id)?;
        if l.rec.state != TaskState::Running {
            return None;
        }
        let progress = l.rec.progress_at?;
        let seen = l.current_activity();
        let v = activity::classify(now, &self.activity_windows(), progress, seen);
        Some(activity::ActivityView::of(now, &v, seen))
    }
}

impl crate::Live {
    /// The activity seen of the current attempt, if any.
    pub(crate) fn current_activity(&self) -> Option<&activity::Seen> {
        let (g, seen) = self.activity.as_ref()?;
        (self.attempt.as_ref()?.generation == *g).then_some(seen)
    }
}

pub(crate) fn push_audit(rec: &mut TaskRecord, now: Millis, who: &str, action: &str) {
    if rec.audit.len() >= AUDIT_LEN_MAX {
        rec.audit.remove(1);
    }
    rec.audit.push(Audit {
        at: now,
        who: who.into(),
        action: action.into(),
    });
}
