//! Deadlines: accept, start and lost-agent timeouts, task timeouts, breaker
//! cooldowns, retries that became due, alerts.

use muster_wire::msg::Outcome;

use crate::model::*;

use crate::tasks::failure;
use crate::{ConnId, Core};

impl Core {
    pub(crate) fn on_tick(&mut self, now: Millis) {
        let due: Vec<ConnId> = self
            .pending_acks
            .iter()
            .filter(|(_, (_, since))| now >= since + self.ack_delay)
            .map(|(c, _)| *c)
            .collect();
        // HashMap order varies per process; sort so a run replays exactly from its inputs.
        let mut due = due;
        due.sort();
        for conn in due {
            self.flush_ack(conn);
        }
        let grace = self.policy.lost_grace.as_millis() as u64;
        let accept = self.policy.accept_timeout.as_millis() as u64;
        let start = self.policy.start_timeout.as_millis() as u64;
        let mut lost = Vec::new();
        for agent in self.agents.values() {
            if let Some(since) = agent.offline_since {
                // A restarted hub counts the grace from its own start.
                if now >= since.max(self.started_at) + grace && !agent.tasks.is_empty() {
                    lost.extend(agent.tasks.iter().copied());
                }
            }
        }
        lost.sort();
        for id in lost {
            let failure = failure(&format!(
                "the agent was offline for more than {} s",
                grace / 1000
            ));
            self.end_attempt(now, id, Outcome::Lost, Some(failure), false);
        }
        let mut expired = Vec::new();
        for live in self.tasks.values() {
            let Some(a) = &live.attempt else { continue };
            // An agent that is away is the lost grace's business, and a restarted hub
            // counts these deadlines from its own start, never from before it.
            let connected = self.agents.get(&a.agent).is_some_and(|g| g.conn.is_some());
            let since = |t: Millis| t.max(self.started_at);
            match live.rec.state {
                TaskState::Assigned | TaskState::Accepted if !connected => {}
                TaskState::Assigned if now >= since(a.assigned_at) + accept => {
                    expired.push((
                        live.rec.id,
                        Outcome::AcceptTimeout,
                        "the sidecar did not accept in time",
                    ));
                }
                TaskState::Accepted
                    if now >= since(a.accepted_at.unwrap_or(a.assigned_at)) + start =>
                {
                    expired.push((
                        live.rec.id,
                        Outcome::StartTimeout,
                        "the agent's start was not verified in time",
                    ));
                }
                TaskState::Running => {
                    if let (Some(t), Some(s)) = (live.rec.timeout_ms, a.started_at)
                        && now >= s.saturating_add(t)
                    {
                        expired.push((
                            live.rec.id,
                            Outcome::TimedOut,
                            "the task ran past its timeout",
                        ));
                    }
                }
                _ => {}
            }
        }
        expired.sort_by_key(|(id, ..)| *id);
        for (id, outcome, why) in expired {
            self.end_attempt(now, id, outcome, Some(failure(why)), false);
        }
        self.evaluate_alerts(now);
        // Backoff deadlines and breaker cooldowns may have passed.
        self.dirty_schedule = true;
    }

    // === Operators ===
}
