//! The task lifecycle on this sidecar: assignments (accepted, repeated,
//! superseded, or held back for a slot), reports and the outbox, the runner's
//! events and the agent's commands.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use muster_wire::limits::truncate_utf8;
use muster_wire::msg::{Assign, Failure, Outcome, Phase, Report, ReportBody, SessionMsg, Usage};
use muster_wire::work::WorkResult;
use muster_wire::{Generation, ReportId, TaskId};

use crate::policy::{DEFERRED_HOLD_MAX, DEFERRED_MAX};
use crate::run::RunEvent;
use crate::{AgentCmd, Core, Effect, LocalTask};

impl Core {
    pub(crate) fn assign(&mut self, now: Duration, a: Assign) {
        if let Some(t) = self.tasks.get(&a.task) {
            if t.generation >= a.generation {
                // A repeat (resent after a reconnect): the first one stands. Or an
                // older one arriving late: ignored.
                return;
            }
            // A newer generation supersedes what we hold: stop the old run first.
            let old = t.generation;
            self.drop_task(a.task, old, true);
        }
        if let Some(i) = self.deferred.iter().position(|(_, d)| d.task == a.task) {
            if self.deferred[i].1.generation >= a.generation {
                return;
            }
            self.deferred.remove(i);
        }
        if self.busy() >= self.policy.slots as usize {
            // The hub never assigns beyond the slots; a hub whose view drifted
            // gets its assignment accepted when a slot frees, or re-queues it
            // at its acceptance timeout.
            if self.deferred.len() < DEFERRED_MAX {
                self.deferred.push_back((now, a));
            }
            return;
        }
        self.accept(now, a);
    }

    fn accept(&mut self, now: Duration, a: Assign) {
        let t = LocalTask {
            task: a.task,
            generation: a.generation,
            spec: a.spec.clone(),
            phase: Phase::Accepted,
            handle: None,
        };
        self.effects.push(Effect::PutTask(t.clone()));
        self.tasks.insert(a.task, t);
        self.report(a.task, a.generation, ReportBody::Accepted);
        self.start_run(now, a);
    }

    /// Starts the accepted attempt's run, or adopts the orphan that is this
    /// very attempt; an orphan of an older generation of the task is ended.
    fn start_run(&mut self, now: Duration, a: Assign) {
        let (task, generation) = (a.task, a.generation);
        if self.orphans.remove(&(task, generation)) {
            self.effects
                .push(Effect::AdoptRun(task, generation, a.spec));
            return;
        }
        let older: Vec<_> = self
            .orphans
            .iter()
            .filter(|(t, g)| *t == task && *g < generation)
            .copied()
            .collect();
        if !older.is_empty() {
            for o in &older {
                self.orphans.remove(o);
            }
            self.effects.push(Effect::EndOrphans(older));
        }
        self.effects
            .push(Effect::StartRun(task, generation, a.spec));
        self.run_starting(now, task, generation);
    }

    /// Drops a held-back assignment the hub cancelled or abandoned.
    pub(crate) fn undefer(&mut self, task: TaskId, generation: Generation) {
        self.deferred
            .retain(|(_, d)| !(d.task == task && d.generation == generation));
    }

    /// Accepts held-back assignments while slots are free, oldest first;
    /// drops those held past [`DEFERRED_HOLD_MAX`] (or one heartbeat interval).
    pub(crate) fn admit_deferred(&mut self, now: Duration) {
        let hold = DEFERRED_HOLD_MAX.min(self.heartbeat_interval);
        self.deferred
            .retain(|(at, _)| now.saturating_sub(*at) <= hold);
        while self.busy() < self.policy.slots as usize {
            let Some((_, a)) = self.deferred.pop_front() else {
                return;
            };
            self.assign(now, a);
        }
    }

    /// Stops and forgets a task (cancel, abandon, superseded).
    pub(crate) fn drop_task(&mut self, task: TaskId, generation: Generation, stop: bool) {
        let Some(t) = self.tasks.get(&task) else {
            return;
        };
        if t.generation != generation {
            return;
        }
        if stop && t.phase != Phase::Finished {
            self.effects.push(Effect::StopRun(task, generation));
        }
        self.forget(task, generation);
        // Reports about a superseded attempt are obsolete.
        let obsolete: Vec<ReportId> = self
            .outbox
            .values()
            .filter(|r| r.task == task && r.generation == generation)
            .map(|r| r.id)
            .collect();
        for id in obsolete {
            self.outbox.remove(&id);
            self.effects.push(Effect::DeleteReport(id));
        }
    }

    /// Forgets a held attempt; its run directory goes once that is durable.
    fn forget(&mut self, task: TaskId, generation: Generation) {
        self.tasks.remove(&task);
        self.clear_start(task);
        self.effects.push(Effect::DeleteTask(task, generation));
        self.unreleased.push((task, generation));
    }

    pub(crate) fn ack(&mut self, upto: ReportId) {
        let acked: Vec<ReportId> = self.outbox.range(..=upto).map(|(id, _)| *id).collect();
        let mut touched = Vec::new();
        for id in acked {
            if let Some(r) = self.outbox.remove(&id) {
                touched.push(r.task);
            }
            self.effects.push(Effect::DeleteReport(id));
        }
        // A finished task whose reports are all acknowledged is done here.
        for task in touched {
            let done = self
                .tasks
                .get(&task)
                .filter(|t| t.phase == Phase::Finished)
                .map(|t| t.generation)
                .filter(|_| !self.outbox.values().any(|r| r.task == task));
            if let Some(generation) = done {
                self.forget(task, generation);
            }
        }
    }

    pub(crate) fn report(&mut self, task: TaskId, generation: Generation, body: ReportBody) {
        let id = ReportId(self.next_report);
        self.next_report += 1;
        let r = Report {
            id,
            task,
            generation,
            body,
        };
        self.effects.push(Effect::NextReport(self.next_report));
        self.effects.push(Effect::PutReport(r.clone()));
        self.outbox.insert(id, r.clone());
        self.effects.push(Effect::Send(SessionMsg::Report(r)));
    }

    /// Folds the `Started` and `Finished` reports of an attempt that started and
    /// ended within this batch (and its `Accepted`, if that is in the batch too)
    /// into one [`ReportBody::Ran`], in the `Finished` report's place and under
    /// its id. `effects` is a batch's whole effect list, before it commits: none
    /// of its reports is durable or sent yet, so dropping two of them loses
    /// nothing, and the hub learns the same from the one report.
    pub fn coalesce_reports(&mut self, effects: &mut Vec<Effect>) {
        type Attempt = (TaskId, Generation);
        let mut accepted: HashMap<Attempt, ReportId> = HashMap::new();
        let mut started: HashMap<Attempt, (ReportId, Option<u32>, Option<String>)> = HashMap::new();
        let mut dropped: HashSet<ReportId> = HashSet::new();
        let mut ran: HashMap<ReportId, (Option<u32>, Option<String>)> = HashMap::new();
        for e in effects.iter() {
            let Effect::PutReport(r) = e else { continue };
            let attempt = (r.task, r.generation);
            match &r.body {
                ReportBody::Accepted => {
                    accepted.insert(attempt, r.id);
                }
                ReportBody::Started { pid, session } => {
                    started.insert(attempt, (r.id, *pid, session.clone()));
                }
                ReportBody::Finished { .. } => {
                    if let Some((id, pid, session)) = started.remove(&attempt) {
                        dropped.insert(id);
                        dropped.extend(accepted.remove(&attempt));
                        ran.insert(r.id, (pid, session));
                    }
                }
                _ => {}
            }
        }
        if ran.is_empty() {
            return;
        }
        let fold = |r: &mut Report| {
            if let Some((pid, session)) = ran.get(&r.id) {
                r.body = into_ran(
                    std::mem::replace(&mut r.body, ReportBody::Accepted),
                    *pid,
                    session.clone(),
                );
            }
        };
        effects.retain_mut(|e| match e {
            Effect::PutReport(r) | Effect::Send(SessionMsg::Report(r)) => {
                if dropped.contains(&r.id) {
                    return false;
                }
                fold(r);
                true
            }
            _ => true,
        });
        for id in &dropped {
            self.outbox.remove(id);
        }
        for id in ran.keys() {
            if let Some(r) = self.outbox.get_mut(id) {
                fold(r);
            }
        }
    }

    /// Reports usage, replacing an unacknowledged usage report of the same
    /// attempt in the outbox: each one is cumulative, so only the latest
    /// matters, and the outbox holds at most one per attempt.
    pub(crate) fn report_usage(&mut self, task: TaskId, generation: Generation, mut usage: Usage) {
        usage.model = usage
            .model
            .map(|m| truncate_utf8(m, muster_wire::limits::MODEL_BYTES_MAX));
        let older: Vec<ReportId> = self
            .outbox
            .values()
            .filter(|r| r.task == task && r.generation == generation)
            .filter(|r| matches!(r.body, ReportBody::Usage(_)))
            .map(|r| r.id)
            .collect();
        for id in older {
            self.outbox.remove(&id);
            self.effects.push(Effect::DeleteReport(id));
        }
        self.report(task, generation, ReportBody::Usage(usage));
    }

    pub(crate) fn set_phase(&mut self, task: TaskId, phase: Phase) {
        if let Some(t) = self.tasks.get_mut(&task) {
            t.phase = phase;
            self.effects.push(Effect::PutTask(t.clone()));
        }
    }

    pub(crate) fn run_event(&mut self, now: Duration, ev: RunEvent) {
        let (task, generation) = ev.attempt();
        let Some(t) = self
            .tasks
            .get_mut(&task)
            .filter(|t| t.generation == generation)
        else {
            return;
        };
        match ev {
            RunEvent::Preparing { note, .. } => {
                if t.phase == Phase::Finished || self.start_timed_out(task, generation) {
                    return;
                }
                self.run_preparing(task, generation);
                let note = truncate_utf8(note, muster_wire::limits::NOTE_BYTES_MAX);
                self.report(task, generation, ReportBody::Progress { note });
            }
            RunEvent::Prepared { note, .. } => {
                if t.phase == Phase::Finished || self.start_timed_out(task, generation) {
                    return;
                }
                self.clear_start(task);
                self.run_starting(now, task, generation);
                let note = truncate_utf8(note, muster_wire::limits::NOTE_BYTES_MAX);
                self.report(task, generation, ReportBody::Progress { note });
            }
            RunEvent::Spawned { handle, .. } => {
                let mode = handle.mode;
                t.handle = Some(handle);
                if t.phase == Phase::Accepted {
                    t.phase = Phase::Verifying;
                }
                let t = t.clone();
                let verifying = t.phase == Phase::Verifying;
                self.effects.push(Effect::PutTask(t));
                if verifying && !self.start_timed_out(task, generation) {
                    self.run_spawned(now, task, generation, mode);
                }
            }
            RunEvent::Started { pid, session, .. } => {
                if self.start_timed_out(task, generation) {
                    // The deadline passed first; the runner's Finished follows.
                    return;
                }
                self.clear_start(task);
                self.report_started(task, generation, pid, session);
            }
            RunEvent::Finished {
                outcome,
                result,
                error,
                work,
                ..
            } => {
                let ended = t.phase == Phase::Finished;
                self.clear_start(task);
                if ended {
                    return;
                }
                // An exec run that exited 0 before it counted as started still started.
                if outcome == Outcome::Completed {
                    self.report_started_by_handle(task, generation);
                }
                self.finish(task, generation, outcome, result, error, work.map(|w| *w));
            }
        }
    }

    fn finish(
        &mut self,
        task: TaskId,
        generation: Generation,
        outcome: Outcome,
        result: Option<String>,
        error: Option<Failure>,
        work: Option<WorkResult>,
    ) {
        self.clear_start(task);
        self.set_phase(task, Phase::Finished);
        let result = result.map(|r| truncate_utf8(r, self.max_result_bytes));
        self.report(
            task,
            generation,
            ReportBody::Finished {
                outcome,
                result,
                error,
                work: work.map(|w| Box::new(w.bounded())),
            },
        );
    }

    pub(crate) fn agent_command(
        &mut self,
        task: TaskId,
        generation: Generation,
        cmd: AgentCmd,
        work: Option<WorkResult>,
    ) -> Result<String, String> {
        let phase = self.attempt(task, generation)?.phase;
        if matches!(cmd, AgentCmd::Current) {
            return Ok(format!("task {task} generation {generation}"));
        }
        if phase == Phase::Finished {
            return Err(format!("task {task} has already ended on this sidecar"));
        }
        if self.start_timed_out(task, generation) {
            return Err(format!(
                "task {task} did not start in time on this sidecar; its attempt is ending, stop working on it"
            ));
        }
        match cmd {
            AgentCmd::Current => Ok(String::new()),
            AgentCmd::Start => {
                if phase == Phase::Running {
                    return Ok(format!("task {task} is already running"));
                }
                self.clear_start(task);
                self.report_started(task, generation, None, None);
                Ok(format!("task {task} started"))
            }
            AgentCmd::Progress { message } => {
                let note = truncate_utf8(message, muster_wire::limits::NOTE_BYTES_MAX);
                self.report(task, generation, ReportBody::Progress { note });
                Ok(format!("progress recorded for task {task}"))
            }
            AgentCmd::Complete { result, link } => {
                let work = match link {
                    Some(link) => {
                        check_link(&link)?;
                        let mut w = work.unwrap_or_default();
                        w.link = Some(link);
                        Some(w)
                    }
                    None => work,
                };
                self.report_started(task, generation, None, None);
                self.effects.push(Effect::ForgetRun(task, generation));
                self.finish(task, generation, Outcome::Completed, result, None, work);
                Ok(format!("task {task} completed"))
            }
            AgentCmd::Usage(usage) => {
                self.report_usage(task, generation, usage);
                Ok(format!("usage recorded for task {task}"))
            }
            AgentCmd::Fail { reason, no_retry } => {
                self.effects.push(Effect::ForgetRun(task, generation));
                let error = Failure {
                    reason: format!("the agent reported failure: {reason}"),
                    no_retry,
                    ..Failure::default()
                };
                self.finish(task, generation, Outcome::Failed, None, Some(error), work);
                Ok(format!("task {task} failed"))
            }
        }
    }
}

/// Checks a link the agent gives with `task complete --link`.
fn check_link(link: &str) -> Result<(), String> {
    use muster_wire::work::LINK_BYTES_MAX;
    if link.is_empty() || link.len() > LINK_BYTES_MAX || link.chars().any(char::is_control) {
        return Err(format!(
            "--link must be 1 to {LINK_BYTES_MAX} bytes without control characters, e.g. the pull request's URL"
        ));
    }
    Ok(())
}

/// A `Finished` body as the `Ran` body that also carries the start.
fn into_ran(finished: ReportBody, pid: Option<u32>, session: Option<String>) -> ReportBody {
    match finished {
        ReportBody::Finished {
            outcome,
            result,
            error,
            work,
        } => ReportBody::Ran {
            pid,
            session,
            outcome,
            result,
            error,
            work,
        },
        other => other,
    }
}
