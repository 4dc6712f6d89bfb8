//! Sidecar sessions: hello and reconciliation, heartbeats, reports and their
//! acknowledgements, each bounded on arrival.

use std::collections::HashSet;

use muster_wire::limits::{self, truncate_utf8};
use muster_wire::msg::{
    Activity, Assign, Failure, HeldTask, Hello, HubMsg, Outcome, Phase, Refused, Report,
    ReportBody, ReportKind, Role, Welcome, WireLimits,
};
use muster_wire::{ReportId, TaskId};

use crate::model::*;

use crate::Archive;
use crate::events::{AgentChange, Event};
use crate::tasks::{check_capabilities, failure, spec_of};
use crate::{Agent, ConnId, Core, Write};

impl Core {
    pub(crate) fn on_hello(&mut self, now: Millis, conn: ConnId, fingerprint: &str, hello: Hello) {
        let refuse = |core: &mut Core, r: Refused| {
            core.counters.sessions_refused += 1;
            core.out.sends.push((conn, HubMsg::Refused(r)));
            core.out.closes.push(conn);
        };
        let Some(id) = self.identities.get(fingerprint).cloned() else {
            return refuse(
                self,
                Refused::Forbidden {
                    reason: "this certificate is not enrolled at this hub".into(),
                },
            );
        };
        if id.revoked_at.is_some() {
            return refuse(self, Refused::Revoked);
        }
        if id.role != Role::Agent {
            return refuse(
                self,
                Refused::Forbidden {
                    reason: format!("a {} credential cannot open an agent session", id.role),
                },
            );
        }
        if hello.agent.as_str() != id.name {
            return refuse(
                self,
                Refused::BadHello {
                    reason: format!(
                        "hello names agent {:?} but the certificate is for {:?}",
                        hello.agent.as_str(),
                        id.name
                    ),
                },
            );
        }
        if let Err(reason) = check_claim(&id, &hello) {
            return refuse(self, Refused::BadHello { reason });
        }
        let name = id.name.clone();
        let agent = self.agents.entry(hello.agent.clone()).or_insert_with(|| {
            Agent::new(
                AgentRecord {
                    name: name.clone(),
                    version: String::new(),
                    capabilities: Vec::new(),
                    slots: 0,
                    enrolled_at: id.created_at,
                    last_seen: None,
                    host: None,
                    self_test: None,
                    drained: false,
                    revoked: false,
                },
                now,
            )
        });
        // A second session for the same agent replaces the first.
        if let Some(old) = agent.conn.replace(conn) {
            self.conns.remove(&old);
            self.out.closes.push(old);
        }
        agent.offline_since = None;
        agent.stopping = false;
        agent.hb_seq = None;
        agent.rec.version = truncate_utf8(hello.version, limits::VERSION_BYTES_MAX);
        agent.rec.capabilities = hello.capabilities;
        agent.rec.slots = hello.slots;
        agent.workspace = hello.workspace;
        agent.rec.last_seen = Some(now);
        // Until its first heartbeat, trust the sidecar's own hello.
        agent.self_test_passed = true;
        let rec = agent.rec.clone();
        self.conns.insert(conn, name.clone());
        self.counters.sessions_opened += 1;
        self.out.writes.push(Write::Agent(rec));
        self.out.sends.push((
            conn,
            HubMsg::Welcome(Welcome {
                hub_version: env!("CARGO_PKG_VERSION").into(),
                heartbeat_interval_ms: self.policy.heartbeat_interval.as_millis() as u64,
                limits: WireLimits {
                    max_frame_bytes: self.limits.max_frame_bytes,
                    max_result_bytes: self.limits.max_result_bytes,
                },
            }),
        ));
        self.agent_event(now, &name, AgentChange::Online, "hello");
        self.reconcile(now, &name, conn, &hello.resume, true);
        // Deadlines skipped while it was away count again.
        let held: Vec<TaskId> = self
            .agents
            .get(name.as_str())
            .map(|a| a.tasks.iter().copied().collect())
            .unwrap_or_default();
        for id in held {
            self.arm_attempt(id);
        }
        if !self.alerts.list().is_empty() {
            self.arm_alerts_now(now);
        }
        self.dirty_schedule = true;
    }

    /// Compares what a sidecar holds with the hub's view: continue, abandon or re-send.
    pub(crate) fn reconcile(
        &mut self,
        now: Millis,
        name: &str,
        conn: ConnId,
        held: &[HeldTask],
        hello: bool,
    ) {
        let mut listed = HashSet::new();
        for h in held {
            listed.insert(h.task);
            let current = self.tasks.get(&h.task).and_then(|l| {
                l.attempt
                    .as_ref()
                    .filter(|a| a.generation == h.generation && a.agent == name)
                    .filter(|a| a.outcome.is_none())
                    .map(|_| l.rec.state)
            });
            match current {
                Some(_) => {}
                None if h.phase == Phase::Finished => {
                    // Its final report is in the outbox and will be replayed or was handled.
                }
                None => self.out.sends.push((
                    conn,
                    HubMsg::Abandon {
                        task: h.task,
                        generation: h.generation,
                        reason: "the hub has no live attempt of this generation on this agent"
                            .into(),
                    },
                )),
            }
        }
        let Some(agent) = self.agents.get(name) else {
            return;
        };
        let mine: Vec<TaskId> = agent.tasks.iter().copied().collect();
        for id in mine {
            if listed.contains(&id) {
                continue;
            }
            let Some(live) = self.tasks.get(&id) else {
                continue;
            };
            match live.rec.state {
                TaskState::Assigned if hello => {
                    if let Some(a) = &live.attempt {
                        let msg = HubMsg::Assign(Assign {
                            task: id,
                            generation: a.generation,
                            spec: spec_of(&live.rec),
                        });
                        self.out.sends.push((conn, msg));
                    }
                }
                TaskState::Accepted | TaskState::Running => {
                    let reason = if hello {
                        "the sidecar came back without this task"
                    } else {
                        "the sidecar's heartbeat no longer lists this task"
                    };
                    self.end_attempt(now, id, Outcome::Lost, Some(failure(reason)), false);
                }
                _ => {}
            }
        }
    }

    pub(crate) fn on_closed(&mut self, now: Millis, conn: ConnId) {
        self.pending_acks.remove(&conn);
        let Some(name) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(agent) = self.agents.get_mut(name.as_str())
            && agent.conn == Some(conn)
        {
            agent.conn = None;
            agent.offline_since = Some(now);
            self.agent_event(now, &name, AgentChange::Offline, "session closed");
            self.arm_offline(&name);
        }
    }

    pub(crate) fn agent_of_conn(&self, conn: ConnId) -> Option<String> {
        self.conns.get(&conn).cloned()
    }

    pub(crate) fn on_heartbeat(
        &mut self,
        now: Millis,
        conn: ConnId,
        mut hb: muster_wire::msg::Heartbeat,
    ) {
        let Some(name) = self.agent_of_conn(conn) else {
            return;
        };
        if hb.tasks.len() > limits::HELD_TASKS_MAX {
            // No honest sidecar holds this many: it is broken or hostile, so end the session.
            let reason = format!(
                "a heartbeat listed {} tasks; the limit is {}",
                hb.tasks.len(),
                limits::HELD_TASKS_MAX
            );
            self.out.sends.push((
                conn,
                HubMsg::Refused(Refused::BadHello {
                    reason: reason.clone(),
                }),
            ));
            self.out.closes.push(conn);
            self.agent_event(now, &name, AgentChange::Refused, &reason);
            return;
        }
        bound_self_test(&mut hb.self_test);
        self.counters.heartbeats += 1;
        let Some(agent) = self.agents.get_mut(name.as_str()) else {
            return;
        };
        agent.rec.last_seen = Some(now);
        agent.rec.host = Some(hb.host.clone());
        // A heartbeat not newer than the last one of this session is a replay:
        // it keeps the agent alive but its activity figures are old news (a
        // second sample of the same CPU total would make a busy run look idle).
        let fresh = agent.hb_seq.is_none_or(|last| hb.seq > last);
        if fresh {
            agent.hb_seq = Some(hb.seq);
        }
        let stopping = hb.state == muster_wire::msg::SidecarState::Draining;
        if stopping && !agent.stopping {
            self.dirty_schedule = true;
        }
        agent.stopping = stopping;
        let was = agent.self_test_passed;
        agent.self_test_passed = hb.self_test.passed;
        agent.rec.self_test = Some(hb.self_test.clone());
        // Heartbeats update the registry in memory; it is persisted on state changes
        // and periodically, not on every heartbeat, to keep the store quiet.
        let mut events = Vec::new();
        if was != hb.self_test.passed {
            self.out.writes.push(Write::Agent(agent.rec.clone()));
            events.push(if hb.self_test.passed {
                (AgentChange::Healthy, "self-test passed")
            } else {
                (AgentChange::Unhealthy, "self-test failed")
            });
        }
        if let Some(until) = agent.breaker_until
            && now >= until
            && hb.self_test.passed
        {
            agent.breaker_until = None;
            agent.infra_failures = 0;
            events.push((
                AgentChange::CircuitClosed,
                "cooldown over and healthy heartbeat",
            ));
        }
        if !events.is_empty() {
            self.dirty_schedule = true;
            if !self.alerts.list().is_empty() {
                self.arm_alerts_now(now);
            }
        }
        for (state, why) in events {
            self.agent_event(now, &name, state, why);
        }
        self.reconcile(now, &name, conn, &hb.tasks, false);
        if fresh {
            self.take_activity(now, &name, &hb.activity);
        }
    }

    /// Keeps what a heartbeat says each running attempt of `agent` is doing,
    /// and asks for an alert pass when one of them could next raise one.
    fn take_activity(&mut self, now: Millis, agent: &str, activity: &[Activity]) {
        let windows = self.activity_windows();
        let gap_max = 2 * self.policy.heartbeat_interval.as_millis() as Millis;
        let mut next: Option<Millis> = None;
        for a in activity.iter().take(limits::HELD_TASKS_MAX) {
            let Some(live) = self.tasks.get_mut(&a.task) else {
                continue;
            };
            let current = live
                .attempt
                .as_ref()
                .is_some_and(|at| at.generation == a.generation && at.agent == agent);
            if !current || live.rec.state != TaskState::Running {
                continue;
            }
            if live
                .activity
                .as_ref()
                .is_none_or(|(g, _)| *g != a.generation)
            {
                live.activity = Some((a.generation, Default::default()));
            }
            let Some((_, seen)) = live.activity.as_mut() else {
                continue;
            };
            seen.update(now, a, gap_max);
            let progress = live.rec.progress_at.unwrap_or(now);
            let verdict = crate::activity::classify(now, &windows, progress, Some(seen));
            if let Some(t) = verdict.next_alert(now, &windows) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        if let Some(at) = next {
            self.arm_alerts(at);
        }
    }

    pub(crate) fn on_report(
        &mut self,
        now: Millis,
        conn: ConnId,
        report: Report,
        archive: &dyn Archive,
    ) {
        let Some(name) = self.agent_of_conn(conn) else {
            return;
        };
        let report = bound_report(report);
        let kind = report.body.kind();
        let urgent = kind == ReportKind::Finished;
        self.ack(conn, report.id, now, urgent);
        let Some(live) = self.tasks.get_mut(&report.task) else {
            // Not live: a repeat about the attempt that ended the task is a duplicate;
            // anything else is stale.
            let ended_here = self
                .recent
                .get(&report.task)
                .map(|r| (r.generation, r.agent.clone()))
                .or_else(|| archive.task(report.task).map(|r| (r.generation, r.agent)))
                .is_some_and(|(g, a)| {
                    g == report.generation && a.as_deref() == Some(name.as_str())
                });
            if ended_here {
                self.counters.duplicate_reports += 1;
                self.flush_ack(conn);
            } else {
                self.stale(conn, &report, "the task is no longer live at the hub");
            }
            return;
        };
        let attempt = live
            .attempt
            .as_ref()
            .filter(|a| a.generation == report.generation && a.agent == name);
        // An attempt the hub already ended (timeout, loss) is not current any more:
        // its late final report is a harmless repeat, anything else is stale.
        if let Some(a) = attempt
            && a.outcome.is_some()
        {
            if kind == ReportKind::Finished {
                self.counters.duplicate_reports += 1;
                self.flush_ack(conn);
            } else {
                self.stale(conn, &report, "this attempt has already ended at the hub");
            }
            return;
        }
        if attempt.is_none() {
            let reason = if report.generation < live.rec.generation {
                "a newer attempt of this task exists"
            } else {
                "this agent has no such attempt"
            };
            self.stale(conn, &report, reason);
            return;
        }
        // Progress notes and usage reports repeat by design; the rest count once.
        let repeatable = matches!(kind, ReportKind::Progress | ReportKind::Usage);
        if !repeatable && !live.seen.insert(kind) {
            self.counters.duplicate_reports += 1;
            self.flush_ack(conn);
            return;
        }
        let id = report.task;
        match report.body {
            ReportBody::Accepted => {
                if live.rec.state == TaskState::Assigned {
                    if let Some(a) = live.attempt.as_mut() {
                        a.accepted_at = Some(now);
                    }
                    self.set_state(now, id, TaskState::Accepted, "accepted by the sidecar");
                }
            }
            ReportBody::Started { pid, session } => {
                if let Some(a) = live.attempt.as_mut() {
                    a.accepted_at.get_or_insert(now);
                    a.started_at = Some(now);
                    a.pid = pid;
                    a.session = session;
                }
                live.rec.progress_at = Some(now);
                self.set_state(now, id, TaskState::Running, "start verified");
            }
            ReportBody::Progress { note } => {
                let note = truncate_utf8(note, muster_wire::limits::NOTE_BYTES_MAX);
                live.rec.progress_at = Some(now);
                live.rec.progress_note = Some(note.clone());
                live.rec.updated_at = now;
                let event = Event::Progress {
                    id,
                    generation: report.generation,
                    agent: name.clone(),
                    note,
                };
                self.touch(id);
                self.push_event(now, event);
            }
            ReportBody::Usage(usage) => {
                let labels = live.rec.labels.clone();
                let Some(a) = live.attempt.as_mut() else {
                    return;
                };
                let growth = usage.growth_since(a.usage.as_ref().unwrap_or(&Default::default()));
                a.usage = Some(usage);
                let write = Write::Attempt(a.clone());
                self.out.writes.push(write);
                self.counters.usage.count(&name, &labels, &growth);
                self.touch(id);
            }
            ReportBody::Finished {
                outcome,
                result,
                error,
                work,
            } => self.finish_attempt(now, id, outcome, result, error, work),
            ReportBody::Ran {
                pid,
                session,
                outcome,
                result,
                error,
                work,
            } => {
                // Accepted, started and ended within one of the sidecar's
                // commits. Watchers still see the verified start as its own
                // `running` change (the lifecycle they rely on); the attempt
                // row is written once, by the end.
                live.seen.insert(ReportKind::Accepted);
                live.seen.insert(ReportKind::Started);
                if let Some(a) = live.attempt.as_mut() {
                    a.accepted_at.get_or_insert(now);
                    a.started_at.get_or_insert(now);
                    a.pid = pid;
                    a.session = session;
                }
                live.rec.progress_at = Some(now);
                let from = live.rec.state;
                if from != TaskState::Running {
                    Core::move_state(&mut self.live_by_state, &mut live.rec, TaskState::Running);
                    live.rec.updated_at = now;
                    let event = Event::task(&live.rec, from, "start verified".to_string());
                    let waited = now.saturating_sub(live.rec.submitted_at);
                    self.out.dispatch_ms.push(waited);
                    self.push_event(now, event);
                }
                self.finish_attempt(now, id, outcome, result, error, work);
            }
        }
    }

    /// Ends the attempt a `Finished` (or `Ran`) report is about.
    fn finish_attempt(
        &mut self,
        now: Millis,
        id: TaskId,
        outcome: Outcome,
        result: Option<String>,
        error: Option<Failure>,
        work: Option<Box<muster_wire::work::WorkResult>>,
    ) {
        let Some(live) = self.tasks.get_mut(&id) else {
            return;
        };
        if let Some(a) = live.attempt.as_mut().filter(|a| a.outcome.is_none()) {
            a.work = work.map(|w| *w);
        }
        live.rec.result = result.map(|r| truncate_utf8(r, self.limits.max_result_bytes as usize));
        let no_retry = error.as_ref().is_some_and(|e| e.no_retry);
        self.end_attempt(now, id, outcome, error, no_retry);
    }

    pub(crate) fn stale(&mut self, conn: ConnId, report: &Report, reason: &str) {
        self.counters.stale_reports += 1;
        self.flush_ack(conn);
        self.out.sends.push((
            conn,
            HubMsg::Abandon {
                task: report.task,
                generation: report.generation,
                reason: reason.into(),
            },
        ));
    }

    /// Notes a report to acknowledge; sends the ack now if `urgent` or acks are not delayed.
    pub(crate) fn ack(&mut self, conn: ConnId, id: ReportId, now: Millis, urgent: bool) {
        let e = self.pending_acks.entry(conn).or_insert((id, now));
        e.0 = e.0.max(id);
        let due = e.1 + self.ack_delay;
        if urgent || self.ack_delay == 0 {
            self.flush_ack(conn);
        } else {
            self.deadlines.arm(due, crate::timers::Due::Ack(conn));
        }
    }

    pub(crate) fn flush_ack(&mut self, conn: ConnId) {
        let Some((id, _)) = self.pending_acks.remove(&conn) else {
            return;
        };
        // One ack per connection per output, carrying the highest id.
        if let Some((_, HubMsg::Ack { upto })) = self
            .out
            .sends
            .iter_mut()
            .rev()
            .find(|(c, m)| *c == conn && matches!(m, HubMsg::Ack { .. }))
        {
            if id > *upto {
                *upto = id;
            }
            return;
        }
        self.out.sends.push((conn, HubMsg::Ack { upto: id }));
    }

    // === Tasks ===
}

/// Checks a hello against the identity's grant and the declared limits.
pub(crate) fn check_claim(id: &Identity, hello: &Hello) -> Result<(), String> {
    if hello.resume.len() > limits::HELD_TASKS_MAX {
        return Err(format!(
            "the hello lists {} held tasks; the limit is {}",
            hello.resume.len(),
            limits::HELD_TASKS_MAX
        ));
    }
    check_capabilities(&hello.capabilities)?;
    let extra: Vec<&str> = hello
        .capabilities
        .iter()
        .filter(|c| !id.capabilities.contains(c))
        .map(String::as_str)
        .collect();
    if !extra.is_empty() {
        return Err(format!(
            "{} claims capabilities [{}] that are not granted to it (granted: [{}]); remove them from sidecar.toml, or grant them with `muster-hub agent set {} --capability …`",
            id.name,
            extra.join(", "),
            id.capabilities.join(", "),
            id.name
        ));
    }
    if hello.slots > id.slots {
        return Err(format!(
            "{} claims {} slots but is granted {}; lower slots in sidecar.toml, or grant more with `muster-hub agent set {} --slots {}`",
            id.name, hello.slots, id.slots, id.name, hello.slots
        ));
    }
    Ok(())
}

/// Cuts a failure's agent-supplied text to the documented limits.
pub(crate) fn bound_failure(mut f: Failure) -> Failure {
    f.reason = truncate_utf8(f.reason, limits::REASON_BYTES_MAX);
    f.command.truncate(limits::COMMAND_WORDS_MAX);
    f.command = f
        .command
        .into_iter()
        .map(|w| truncate_utf8(w, limits::REASON_BYTES_MAX))
        .collect();
    f.stdout_tail = tail_utf8(f.stdout_tail, limits::TAIL_BYTES_MAX);
    f.stderr_tail = tail_utf8(f.stderr_tail, limits::TAIL_BYTES_MAX);
    f
}

/// Keeps the last `max` bytes of `s` at a character boundary (a tail's end matters most).
pub(crate) fn tail_utf8(s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}

/// Cuts a report's agent-supplied text to the documented limits, on arrival.
pub(crate) fn bound_report(mut r: Report) -> Report {
    r.body = match r.body {
        ReportBody::Started { pid, session } => ReportBody::Started {
            pid,
            session: session.map(|s| truncate_utf8(s, limits::SESSION_BYTES_MAX)),
        },
        ReportBody::Progress { note } => ReportBody::Progress {
            note: truncate_utf8(note, limits::NOTE_BYTES_MAX),
        },
        ReportBody::Usage(mut u) => {
            u.model = u.model.map(|m| truncate_utf8(m, limits::MODEL_BYTES_MAX));
            ReportBody::Usage(u)
        }
        ReportBody::Finished {
            outcome,
            result,
            error,
            work,
        } => ReportBody::Finished {
            outcome,
            result,
            error: error.map(bound_failure),
            work: work.map(|w| Box::new(w.bounded())),
        },
        ReportBody::Ran {
            pid,
            session,
            outcome,
            result,
            error,
            work,
        } => ReportBody::Ran {
            pid,
            session: session.map(|s| truncate_utf8(s, limits::SESSION_BYTES_MAX)),
            outcome,
            result,
            error: error.map(bound_failure),
            work: work.map(|w| Box::new(w.bounded())),
        },
        other => other,
    };
    r
}

/// Cuts a self-test's problem lines to the documented limits.
pub(crate) fn bound_self_test(t: &mut muster_wire::msg::SelfTest) {
    t.problems.truncate(limits::PROBLEMS_MAX);
    for p in &mut t.problems {
        *p = truncate_utf8(std::mem::take(p), limits::REASON_BYTES_MAX);
    }
}
