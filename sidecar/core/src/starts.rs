//! The start of each run: when it counts as started, and when it has taken too
//! long and what that means. The runner only spawns, probes and reports; the
//! deadlines live here.
//!
//! ```text
//! exec:  StartRun ─Spawned─▶ Settling ──settle elapsed──▶ Started (reported here)
//! wake:  StartRun ─▶ Waking ─Spawned─▶ Verifying ─runner's Started─▶ (done)
//! either, with a workspace to make first:
//!        StartRun ─Preparing─▶ Preparing (no deadline: fetch_timeout and
//!        setup_timeout bound it) ─Prepared─▶ as above, the deadline from now
//!                      │ start_timeout      │ start_timeout
//!                      ▼                    ▼
//!            TimeOutStart(WakeFailed)  TimeOutStart(StartTimeout)
//! restart, a wake run held with its handle (runner verifies):
//!        Reattaching ─runner's Started─▶ (done); start_timeout ▶ TimeOutStart(AgentExited)
//! ```
//!
//! After `TimeOutStart` the attempt waits in `TimedOut` for the runner's
//! `Finished` (which carries what the runner saw); a `Started` that crossed the
//! decision is ignored, the decision stands.

use std::time::Duration;

use muster_wire::msg::{Outcome, Phase, ReportBody};
use muster_wire::{Generation, TaskId};

use crate::policy::Verifier;
use crate::run::RunMode;
use crate::{Core, Effect};

/// Where a run's start stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Wake: the wake command runs.
    Waking,
    /// Wake: the runner verifies the start.
    Verifying,
    /// Exec: spawned; started once the settle time has passed.
    Settling,
    /// Wake, after a restart: the runner looks for the run again.
    Reattaching,
    /// The workspace is being made; the workspace layer's own limits bound it.
    Preparing,
    /// The deadline passed and the runner was told; its `Finished` ends the attempt.
    TimedOut,
}

/// One run's start, until it is established or the attempt ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Start {
    pub(crate) generation: Generation,
    pub(crate) stage: Stage,
    /// `None` only in [`Stage::TimedOut`].
    pub(crate) deadline: Option<Duration>,
}

impl Core {
    /// Records a run's start stage, replacing (and disarming) any earlier one.
    pub(crate) fn set_start(
        &mut self,
        task: TaskId,
        generation: Generation,
        stage: Stage,
        deadline: Option<Duration>,
    ) {
        self.clear_start(task);
        if let Some(at) = deadline {
            self.deadlines.arm(at, task);
        }
        self.starts.insert(
            task,
            Start {
                generation,
                stage,
                deadline,
            },
        );
    }

    /// Forgets a run's start (established, or the attempt ended).
    pub(crate) fn clear_start(&mut self, task: TaskId) {
        if let Some(Start {
            deadline: Some(at), ..
        }) = self.starts.remove(&task)
        {
            self.deadlines.disarm(at, task);
        }
    }

    /// Whether the start of this attempt was already declared too late.
    pub(crate) fn start_timed_out(&self, task: TaskId, generation: Generation) -> bool {
        self.starts
            .get(&task)
            .is_some_and(|s| s.generation == generation && s.stage == Stage::TimedOut)
    }

    /// A run is being started for this attempt: a wake command gets its deadline.
    pub(crate) fn run_starting(&mut self, now: Duration, task: TaskId, generation: Generation) {
        if self.policy.mode == RunMode::Wake {
            let at = now.saturating_add(self.policy.start_timeout);
            self.set_start(task, generation, Stage::Waking, Some(at));
        }
    }

    /// The runner is making the attempt's workspace: no start deadline runs
    /// until it is ready.
    pub(crate) fn run_preparing(&mut self, task: TaskId, generation: Generation) {
        self.set_start(task, generation, Stage::Preparing, None);
    }

    /// The run was spawned (exec) or its wake command succeeded (wake), and the
    /// attempt now waits for its start.
    pub(crate) fn run_spawned(
        &mut self,
        now: Duration,
        task: TaskId,
        generation: Generation,
        mode: RunMode,
    ) {
        match mode {
            RunMode::Exec if self.policy.settle.is_zero() => {
                self.clear_start(task);
                self.report_started_by_handle(task, generation);
            }
            RunMode::Exec => {
                let at = now.saturating_add(self.policy.settle);
                self.set_start(task, generation, Stage::Settling, Some(at));
            }
            RunMode::Wake => match self.policy.verify {
                Verifier::Runner => {
                    let at = now.saturating_add(self.policy.start_timeout);
                    self.set_start(task, generation, Stage::Verifying, Some(at));
                }
                Verifier::Agent => self.clear_start(task),
            },
        }
    }

    /// At startup, for a held wake attempt: the shell starts its wake command
    /// again (no handle) or has the runner look for it again (a handle, when
    /// the runner verifies); either gets a deadline.
    pub(crate) fn run_restored(
        &mut self,
        now: Duration,
        task: TaskId,
        generation: Generation,
        handle: Option<RunMode>,
    ) {
        let at = Some(now.saturating_add(self.policy.start_timeout));
        match handle {
            None if self.policy.mode == RunMode::Wake => {
                self.set_start(task, generation, Stage::Waking, at);
            }
            Some(RunMode::Wake) if self.policy.verify == Verifier::Runner => {
                self.set_start(task, generation, Stage::Reattaching, at);
            }
            _ => {}
        }
    }

    /// A start deadline came due (the entry may be stale: then nothing happens).
    pub(crate) fn start_due(&mut self, now: Duration, task: TaskId) {
        let Some(start) = self.starts.get(&task).copied() else {
            return;
        };
        if start.deadline.is_none_or(|at| at > now) {
            return;
        }
        let live = self
            .tasks
            .get(&task)
            .is_some_and(|t| t.generation == start.generation && t.phase != Phase::Finished);
        if !live {
            self.starts.remove(&task);
            return;
        }
        let generation = start.generation;
        let outcome = match start.stage {
            Stage::Settling => {
                self.starts.remove(&task);
                self.report_started_by_handle(task, generation);
                return;
            }
            Stage::TimedOut | Stage::Preparing => return,
            Stage::Waking => Outcome::WakeFailed,
            Stage::Verifying => Outcome::StartTimeout,
            Stage::Reattaching => Outcome::AgentExited,
        };
        self.starts.insert(
            task,
            Start {
                generation,
                stage: Stage::TimedOut,
                deadline: None,
            },
        );
        self.effects
            .push(Effect::TimeOutStart(task, generation, outcome));
    }

    /// Reports the start of an attempt that has not started yet, with the pid
    /// and session its handle records (exec: the process group leader).
    pub(crate) fn report_started_by_handle(&mut self, task: TaskId, generation: Generation) {
        let Some(t) = self.tasks.get(&task).filter(|t| t.generation == generation) else {
            return;
        };
        let (pid, session) = t
            .handle
            .as_ref()
            .map_or((None, None), |h| (h.pid, h.session.clone()));
        self.report_started(task, generation, pid, session);
    }

    /// Reports the start of an attempt unless it has started already.
    pub(crate) fn report_started(
        &mut self,
        task: TaskId,
        generation: Generation,
        pid: Option<u32>,
        session: Option<String>,
    ) {
        let Some(t) = self.tasks.get(&task).filter(|t| t.generation == generation) else {
            return;
        };
        if !matches!(t.phase, Phase::Accepted | Phase::Waking | Phase::Verifying) {
            return;
        }
        self.set_phase(task, Phase::Running);
        self.report(task, generation, ReportBody::Started { pid, session });
    }
}
