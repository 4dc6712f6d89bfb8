//! The event log and alerts: every change recorded once, alerts raised and cleared.

use crate::model::*;

use crate::alerts::{self, AlertKind};
use crate::ops::format_age;
use crate::{Core, Write};

impl Core {
    pub(crate) fn agent_event(&mut self, now: Millis, name: &str, state: &str, why: &str) {
        let json = serde_json::json!({ "kind": "agent", "name": name, "state": state, "why": why });
        self.push_event(now, EventKind::Agent, json.to_string());
    }

    pub(crate) fn audit_event(&mut self, now: Millis, who: &str, action: &str, subject: &str) {
        let json = serde_json::json!({ "kind": "audit", "who": who, "action": action, "subject": subject });
        self.push_event(now, EventKind::Audit, json.to_string());
    }

    pub(crate) fn push_event(&mut self, now: Millis, kind: EventKind, json: String) {
        let seq = self.next_event_seq;
        self.next_event_seq += 1;
        self.out
            .writes
            .push(Write::Event(EventRecord { seq, at: now, json }, kind));
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
            self.push_event(now, EventKind::Alert, c.to_string());
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
        let stall_after = self.policy.stall_alert.as_millis() as u64;
        let stalled: Vec<(String, String)> = self
            .tasks
            .values()
            .filter(|l| l.rec.state == TaskState::Running)
            .filter_map(|l| {
                let last = l.rec.progress_at?;
                if now < last + stall_after {
                    later(last + stall_after);
                }
                (now >= last + stall_after).then(|| {
                    (
                        l.rec.id.to_string(),
                        format!(
                            "task {} ({}) has run {} without progress",
                            l.rec.id,
                            l.rec.title,
                            format_age(now - last)
                        ),
                    )
                })
            })
            .collect();
        down.sort();
        circuit.sort();
        let mut stalled = stalled;
        stalled.sort();
        let mut changes = Vec::new();
        self.alerts
            .sync(now, AlertKind::AgentDown, down, &mut changes);
        self.alerts
            .sync(now, AlertKind::CircuitOpen, circuit, &mut changes);
        self.alerts
            .sync(now, AlertKind::Stalled, stalled, &mut changes);
        self.alerts.check_storm(now, &mut changes);
        self.alert_changes(now, changes);
        next
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
