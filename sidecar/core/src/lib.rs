//! The sidecar's decision core: which tasks it holds and in which phase, the
//! outbox of reports, and what each event means. Sans-IO.
//!
//! The shell calls [`Core::handle`] for each event and then [`Core::take_effects`].
//! It must apply the store effects ([`Effect::is_store`]) in one durable
//! transaction **before** performing any other effect, so no report leaves
//! before the state it reports is on disk.

use std::collections::BTreeMap;

use muster_wire::limits::truncate_utf8;
use muster_wire::msg::{
    Assign, Failure, HeldTask, HubMsg, Outcome, Phase, Report, ReportBody, SessionMsg, TaskSpec,
};
use muster_wire::{Generation, ReportId, TaskId};
use serde::{Deserialize, Serialize};

pub mod run;

use run::{RunEvent, RunHandle};

/// A task as this sidecar holds it (persisted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalTask {
    /// The task.
    pub task: TaskId,
    /// The generation this sidecar works on.
    pub generation: Generation,
    /// What to do.
    pub spec: TaskSpec,
    /// How far it got.
    pub phase: Phase,
    /// How to find the agent run again after a restart.
    pub handle: Option<RunHandle>,
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Persist a task.
    PutTask(LocalTask),
    /// Forget a task; the shell also removes that attempt's run directory.
    DeleteTask(TaskId, Generation),
    /// Persist a report in the outbox.
    PutReport(Report),
    /// Drop an acknowledged or obsolete report.
    DeleteReport(ReportId),
    /// Persist the next report id.
    NextReport(u64),
    /// Send a message to the hub (if connected).
    Send(SessionMsg),
    /// Start the agent run for an accepted task.
    StartRun(TaskId, Generation, TaskSpec),
    /// Stop an agent run (cancel, abandon).
    StopRun(TaskId, Generation),
    /// Stop watching a run that ended by the agent's own report.
    ForgetRun(TaskId, Generation),
}

impl Effect {
    /// Whether the effect belongs to the durable transaction.
    pub fn is_store(&self) -> bool {
        matches!(
            self,
            Effect::PutTask(_)
                | Effect::DeleteTask(..)
                | Effect::PutReport(_)
                | Effect::DeleteReport(_)
                | Effect::NextReport(_)
        )
    }
}

/// A command from the agent over the local socket, about the attempt that the
/// shell has already authenticated (task, generation and task token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "cmd")]
pub enum AgentCmd {
    /// The agent asks which task it works on (read only).
    Current,
    /// The agent says it started (verify = agent-ack).
    Start,
    /// The agent reports progress.
    Progress {
        /// The note.
        message: String,
    },
    /// The agent finished the work.
    Complete {
        /// Its result.
        result: Option<String>,
    },
    /// The agent failed.
    Fail {
        /// Why.
        reason: String,
        /// Do not retry.
        no_retry: bool,
    },
}

/// The sidecar core. See the module docs for the calling contract.
#[derive(Debug, Default)]
pub struct Core {
    tasks: BTreeMap<TaskId, LocalTask>,
    outbox: BTreeMap<ReportId, Report>,
    next_report: u64,
    effects: Vec<Effect>,
    max_result_bytes: usize,
}

impl Core {
    /// Builds the core from what the queue held at startup.
    pub fn new(tasks: Vec<LocalTask>, outbox: Vec<Report>, next_report: u64) -> Self {
        let next = outbox
            .iter()
            .map(|r| r.id.0 + 1)
            .max()
            .unwrap_or(1)
            .max(next_report);
        Core {
            tasks: tasks.into_iter().map(|t| (t.task, t)).collect(),
            outbox: outbox.into_iter().map(|r| (r.id, r)).collect(),
            next_report: next,
            effects: Vec::new(),
            max_result_bytes: muster_wire::limits::RESULT_BYTES_MAX,
        }
    }

    /// Sets the result limit announced in the hub's welcome.
    pub fn set_max_result_bytes(&mut self, n: usize) {
        self.max_result_bytes = n.min(muster_wire::limits::RESULT_BYTES_MAX);
    }

    /// Effects since the last call, in order.
    #[must_use]
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// Every task held, for hellos and heartbeats.
    pub fn held(&self) -> Vec<HeldTask> {
        self.tasks
            .values()
            .map(|t| HeldTask {
                task: t.task,
                generation: t.generation,
                phase: t.phase,
            })
            .collect()
    }

    /// Tasks held, for status.
    pub fn tasks(&self) -> impl Iterator<Item = &LocalTask> {
        self.tasks.values()
    }

    /// Unacknowledged reports, oldest first, to replay after a reconnect.
    pub fn outbox(&self) -> impl Iterator<Item = &Report> {
        self.outbox.values()
    }

    /// The next report id (persisted as is by a no-op write, e.g. a health probe).
    pub fn next_report(&self) -> u64 {
        self.next_report
    }

    /// Tasks occupying a slot (not yet finished).
    pub fn busy(&self) -> usize {
        self.tasks
            .values()
            .filter(|t| t.phase != Phase::Finished)
            .count()
    }

    /// Handles a message from the hub.
    pub fn handle_hub(&mut self, msg: HubMsg) {
        match msg {
            HubMsg::Assign(a) => self.assign(a),
            HubMsg::Cancel { task, generation } => self.drop_task(task, generation, true),
            HubMsg::Abandon {
                task, generation, ..
            } => self.drop_task(task, generation, true),
            HubMsg::Ack { upto } => self.ack(upto),
            HubMsg::Welcome(_) | HubMsg::Refused(_) => {}
        }
    }

    fn assign(&mut self, a: Assign) {
        if let Some(t) = self.tasks.get(&a.task) {
            if t.generation == a.generation {
                // A repeat (resent after a reconnect): the first one stands.
                return;
            }
            if t.generation > a.generation {
                return;
            }
            // A newer generation supersedes what we hold: stop the old run first.
            let old = t.generation;
            self.drop_task(a.task, old, true);
        }
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
        self.effects
            .push(Effect::StartRun(a.task, a.generation, a.spec));
    }

    /// Stops and forgets a task (cancel, abandon, superseded).
    fn drop_task(&mut self, task: TaskId, generation: Generation, stop: bool) {
        let Some(t) = self.tasks.get(&task) else {
            return;
        };
        if t.generation != generation {
            return;
        }
        if stop && t.phase != Phase::Finished {
            self.effects.push(Effect::StopRun(task, generation));
        }
        self.tasks.remove(&task);
        self.effects.push(Effect::DeleteTask(task, generation));
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

    fn ack(&mut self, upto: ReportId) {
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
                self.tasks.remove(&task);
                self.effects.push(Effect::DeleteTask(task, generation));
            }
        }
    }

    fn report(&mut self, task: TaskId, generation: Generation, body: ReportBody) {
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

    fn set_phase(&mut self, task: TaskId, phase: Phase) {
        if let Some(t) = self.tasks.get_mut(&task) {
            t.phase = phase;
            self.effects.push(Effect::PutTask(t.clone()));
        }
    }

    /// Handles an event from the agent runner.
    pub fn handle_run(&mut self, ev: RunEvent) {
        let (task, generation) = ev.attempt();
        let Some(t) = self
            .tasks
            .get_mut(&task)
            .filter(|t| t.generation == generation)
        else {
            return;
        };
        match ev {
            RunEvent::Spawned { handle, .. } => {
                t.handle = Some(handle);
                if t.phase == Phase::Accepted {
                    t.phase = Phase::Verifying;
                }
                let t = t.clone();
                self.effects.push(Effect::PutTask(t));
            }
            RunEvent::Started { pid, session, .. } => {
                if matches!(t.phase, Phase::Accepted | Phase::Waking | Phase::Verifying) {
                    self.set_phase(task, Phase::Running);
                    self.report(task, generation, ReportBody::Started { pid, session });
                }
            }
            RunEvent::Finished {
                outcome,
                result,
                error,
                ..
            } => {
                if t.phase == Phase::Finished {
                    return;
                }
                // An exec run that exited 0 before the agent said it started still started.
                if outcome == Outcome::Completed && t.phase != Phase::Running {
                    self.set_phase(task, Phase::Running);
                    self.report(
                        task,
                        generation,
                        ReportBody::Started {
                            pid: None,
                            session: None,
                        },
                    );
                }
                self.finish(task, generation, outcome, result, error);
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
    ) {
        self.set_phase(task, Phase::Finished);
        let result = result.map(|r| truncate_utf8(r, self.max_result_bytes));
        self.report(
            task,
            generation,
            ReportBody::Finished {
                outcome,
                result,
                error,
            },
        );
    }

    /// Handles a command from the agent about its attempt (task, generation);
    /// `Err` is the plain message to show it. The shell checks the attempt's
    /// token before calling this.
    ///
    /// # Errors
    /// A sentence when the command makes no sense now (no such task, stale generation, ended).
    pub fn handle_agent(
        &mut self,
        task: TaskId,
        generation: Generation,
        cmd: AgentCmd,
    ) -> Result<String, String> {
        let phase = self.attempt(task, generation)?.phase;
        if matches!(cmd, AgentCmd::Current) {
            return Ok(format!("task {task} generation {generation}"));
        }
        if phase == Phase::Finished {
            return Err(format!("task {task} has already ended on this sidecar"));
        }
        match cmd {
            AgentCmd::Current => Ok(String::new()),
            AgentCmd::Start => {
                if phase == Phase::Running {
                    return Ok(format!("task {task} is already running"));
                }
                self.set_phase(task, Phase::Running);
                self.report(
                    task,
                    generation,
                    ReportBody::Started {
                        pid: None,
                        session: None,
                    },
                );
                Ok(format!("task {task} started"))
            }
            AgentCmd::Progress { message } => {
                let note = truncate_utf8(message, muster_wire::limits::NOTE_BYTES_MAX);
                self.report(task, generation, ReportBody::Progress { note });
                Ok(format!("progress recorded for task {task}"))
            }
            AgentCmd::Complete { result } => {
                if phase != Phase::Running {
                    self.set_phase(task, Phase::Running);
                    self.report(
                        task,
                        generation,
                        ReportBody::Started {
                            pid: None,
                            session: None,
                        },
                    );
                }
                self.effects.push(Effect::ForgetRun(task, generation));
                self.finish(task, generation, Outcome::Completed, result, None);
                Ok(format!("task {task} completed"))
            }
            AgentCmd::Fail { reason, no_retry } => {
                self.effects.push(Effect::ForgetRun(task, generation));
                let error = Failure {
                    reason: format!("the agent reported failure: {reason}"),
                    no_retry,
                    ..Failure::default()
                };
                self.finish(task, generation, Outcome::Failed, None, Some(error));
                Ok(format!("task {task} failed"))
            }
        }
    }

    /// The attempt an agent command refers to, if this sidecar holds it.
    ///
    /// # Errors
    /// A sentence when the task is not held here or the generation is stale.
    pub fn attempt(&self, task: TaskId, generation: Generation) -> Result<&LocalTask, String> {
        let t = self.tasks.get(&task).ok_or_else(|| {
            format!("task {task} is not held by this sidecar (it ended, was cancelled, or was never assigned here)")
        })?;
        if generation != t.generation {
            return Err(format!(
                "task {task} generation {generation} is stale: this sidecar works on generation {}; stop working on it",
                t.generation
            ));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TaskSpec {
        TaskSpec {
            title: "t".into(),
            description: String::new(),
            capabilities: vec![],
            priority: 0,
            timeout_ms: None,
        }
    }

    fn assign(task: u64, g: u64) -> HubMsg {
        HubMsg::Assign(Assign {
            task: TaskId(task),
            generation: Generation(g),
            spec: spec(),
        })
    }

    fn sends(e: &[Effect]) -> Vec<&SessionMsg> {
        e.iter()
            .filter_map(|e| match e {
                Effect::Send(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn assign_is_persisted_before_accepted_and_repeats_are_noops() {
        let mut c = Core::new(vec![], vec![], 1);
        c.handle_hub(assign(1, 1));
        let e = c.take_effects();
        let put = e
            .iter()
            .position(|e| matches!(e, Effect::PutTask(_)))
            .expect("put");
        let send = e
            .iter()
            .position(|e| matches!(e, Effect::Send(_)))
            .expect("send");
        assert!(put < send, "the task is stored before Accepted is sent");
        assert!(e.iter().any(|e| matches!(e, Effect::StartRun(..))));
        c.handle_hub(assign(1, 1));
        assert!(
            c.take_effects().is_empty(),
            "a repeated assignment is a no-op"
        );
    }

    #[test]
    fn happy_path_reports_and_acks_clean_up() {
        let mut c = Core::new(vec![], vec![], 1);
        c.handle_hub(assign(1, 1));
        let _ = c.take_effects();
        c.handle_run(RunEvent::Started {
            task: TaskId(1),
            generation: Generation(1),
            pid: Some(9),
            session: None,
        });
        c.handle_run(RunEvent::Finished {
            task: TaskId(1),
            generation: Generation(1),
            outcome: Outcome::Completed,
            result: Some("ok".into()),
            error: None,
        });
        // A second Finished (exit after the agent's own report) is ignored.
        c.handle_run(RunEvent::Finished {
            task: TaskId(1),
            generation: Generation(1),
            outcome: Outcome::Failed,
            result: None,
            error: None,
        });
        let e = c.take_effects();
        assert_eq!(sends(&e).len(), 2);
        assert_eq!(c.outbox().count(), 3);
        c.handle_hub(HubMsg::Ack { upto: ReportId(3) });
        let e = c.take_effects();
        assert!(e.contains(&Effect::DeleteTask(TaskId(1), Generation(1))));
        assert_eq!(c.outbox().count(), 0);
        assert!(c.held().is_empty());
    }

    #[test]
    fn abandon_stops_the_run_and_drops_its_reports() {
        let mut c = Core::new(vec![], vec![], 1);
        c.handle_hub(assign(1, 1));
        let _ = c.take_effects();
        c.handle_hub(HubMsg::Abandon {
            task: TaskId(1),
            generation: Generation(1),
            reason: "x".into(),
        });
        let e = c.take_effects();
        assert!(e.contains(&Effect::StopRun(TaskId(1), Generation(1))));
        assert!(e.contains(&Effect::DeleteReport(ReportId(1))));
        assert_eq!(c.busy(), 0);
        // Abandon of another generation is ignored.
        c.handle_hub(assign(2, 5));
        let _ = c.take_effects();
        c.handle_hub(HubMsg::Abandon {
            task: TaskId(2),
            generation: Generation(4),
            reason: "x".into(),
        });
        assert!(c.take_effects().is_empty());
    }

    #[test]
    fn agent_commands_check_task_and_generation() {
        let mut c = Core::new(vec![], vec![], 1);
        let (t, g) = (TaskId(3), Generation(2));
        assert!(
            c.handle_agent(t, g, AgentCmd::Start)
                .expect_err("refused")
                .contains("not held")
        );
        c.handle_hub(assign(3, 2));
        let _ = c.take_effects();
        let stale = c.handle_agent(t, Generation(1), AgentCmd::Start);
        assert!(stale.expect_err("refused").contains("stale"));
        assert!(c.handle_agent(t, g, AgentCmd::Start).is_ok());
        assert!(c.handle_agent(t, g, AgentCmd::Current).is_ok());
        assert!(
            c.handle_agent(t, g, AgentCmd::Complete { result: None })
                .is_ok()
        );
        let e = c.take_effects();
        assert!(e.contains(&Effect::ForgetRun(t, g)));
        assert!(
            c.handle_agent(t, g, AgentCmd::Complete { result: None })
                .expect_err("refused")
                .contains("already ended")
        );
    }

    #[test]
    fn a_newer_generation_supersedes_the_old_run() {
        let mut c = Core::new(vec![], vec![], 1);
        c.handle_hub(assign(1, 1));
        let _ = c.take_effects();
        c.handle_hub(assign(1, 2));
        let e = c.take_effects();
        assert!(e.contains(&Effect::StopRun(TaskId(1), Generation(1))));
        assert_eq!(c.held()[0].generation, Generation(2));
        // An older one arriving late is ignored.
        c.handle_hub(assign(1, 1));
        assert!(c.take_effects().is_empty());
    }
}
