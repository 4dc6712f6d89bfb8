//! The sidecar's decision core: which tasks it holds and in which phase, the
//! outbox of reports, the slots, when a run counts as started or has taken too
//! long, the heartbeat schedule, orphaned runs, and when a forgotten task's run
//! directory may go. Sans-IO: no runtime, store, clock, file or process.
//!
//! Parts: this file (the types and the calling contract), `tasks` (assignments,
//! reports, runner events and agent commands), [`starts`] (start deadlines),
//! [`timers`] (the heartbeat schedule, the orphan claim, [`Core::poll_timeout`]),
//! [`durability`] (how a batch commits, when run directories go), [`policy`]
//! (what the shell configures) and [`run`] (the runner's vocabulary).
//!
//! # Calling contract
//!
//! Time is `now`, a [`Duration`] since an origin the shell keeps fixed for the
//! life of the core (the daemon passes `Instant - start`): monotonic, never
//! persisted.
//!
//! 1. [`Core::new`] with what the queue held, then [`Core::handle_startup`]
//!    once, before any other input.
//! 2. For each input, the matching `handle_*`; once `now` reaches
//!    [`Core::poll_timeout`], [`Core::handle_timeout`].
//! 3. Then [`Core::take_effects`]: the shell applies the store effects
//!    ([`Effect::is_store`]) in one transaction, committed as [`commit_kind`]
//!    says, **before** performing any other effect, in order; so no report
//!    leaves before the state it reports is on disk.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use muster_wire::msg::{Assign, HeldTask, HubMsg, Outcome, Report, SessionMsg, TaskSpec, Welcome};
use muster_wire::pace::Rng;
use muster_wire::work::WorkResult;
use muster_wire::{Generation, ReportId, TaskId};
use serde::{Deserialize, Serialize};

pub mod durability;
pub mod policy;
pub mod run;
pub mod starts;
mod tasks;
pub mod timers;

#[cfg(test)]
mod tests;

pub use durability::{CommitKind, FORGETS_HELD_MAX, HeldForgets, commit_kind};
pub use policy::{Policy, Verifier};

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
    pub phase: muster_wire::msg::Phase,
    /// How to find the agent run again after a restart.
    pub handle: Option<RunHandle>,
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Persist a task.
    PutTask(LocalTask),
    /// Forget a task. Its run directory goes with a later [`Effect::ReleaseRunDir`].
    DeleteTask(TaskId, Generation),
    /// Persist a report in the outbox.
    PutReport(Report),
    /// Drop an acknowledged or obsolete report.
    DeleteReport(ReportId),
    /// Persist the next report id (also the small flushed commit of an idle
    /// sidecar's heartbeat, see [`durability`]).
    NextReport(u64),
    /// Send a message to the hub (if connected).
    Send(SessionMsg),
    /// Start the agent run for an accepted task.
    StartRun(TaskId, Generation, TaskSpec),
    /// Re-attach to the orphaned run of this attempt (spawned before a crash
    /// that lost its acceptance) instead of starting it a second time.
    AdoptRun(TaskId, Generation, TaskSpec),
    /// Stop an agent run (cancel, abandon).
    StopRun(TaskId, Generation),
    /// Stop watching a run that ended by the agent's own report.
    ForgetRun(TaskId, Generation),
    /// The run's start took too long: the runner stops waking or verifying
    /// and ends the run with this outcome (and what it saw) in its `Finished`.
    TimeOutStart(TaskId, Generation, Outcome),
    /// End these orphaned runs (no resent assignment claimed them, or a newer
    /// generation superseded them) and remove their run directories.
    EndOrphans(Vec<(TaskId, Generation)>),
    /// Send a heartbeat now (the shell adds its host figures and self-test).
    Heartbeat,
    /// The forgetting of this attempt is durable: remove its run directory.
    ReleaseRunDir(TaskId, Generation),
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
        /// A link to the work, e.g. a pull request (`task complete --link`).
        #[serde(default)]
        link: Option<String>,
    },
    /// The agent failed.
    Fail {
        /// Why.
        reason: String,
        /// Do not retry.
        no_retry: bool,
    },
    /// The agent says what its attempt has used so far (cumulative).
    Usage(muster_wire::msg::Usage),
}

/// The sidecar core. See the crate docs for the calling contract.
#[derive(Debug)]
pub struct Core {
    tasks: BTreeMap<TaskId, LocalTask>,
    outbox: BTreeMap<ReportId, Report>,
    next_report: u64,
    effects: Vec<Effect>,
    max_result_bytes: usize,
    policy: Policy,
    /// Assignments beyond the slots, oldest first, accepted as slots free;
    /// at most [`policy::DEFERRED_MAX`].
    /// Assignments held back for a slot, with when each arrived.
    deferred: VecDeque<(Duration, Assign)>,
    /// The start of each run not yet established (at most one per held task).
    starts: BTreeMap<TaskId, starts::Start>,
    /// The deadlines of `starts`.
    deadlines: timers::Deadlines,
    /// Draws the heartbeat jitter.
    rng: Rng,
    heartbeat_interval: Duration,
    /// When the next heartbeat is due; `None` until startup.
    heartbeat_at: Option<Duration>,
    /// Whether a hub session is up (heartbeats are sent only then).
    connected: bool,
    /// Runs found at startup for attempts the store never recorded; the hub's
    /// resent assignment adopts one, the claim deadline ends the rest.
    orphans: BTreeSet<(TaskId, Generation)>,
    /// When unclaimed orphans are ended (armed at the first welcome).
    orphan_claim_at: Option<Duration>,
    /// Forgotten attempts whose run directories wait for a flushed commit.
    unreleased: Vec<(TaskId, Generation)>,
}

impl Core {
    /// Builds the core from what the queue held at startup. `seed` feeds the
    /// heartbeat jitter: give each sidecar its own.
    pub fn new(
        tasks: Vec<LocalTask>,
        outbox: Vec<Report>,
        next_report: u64,
        policy: Policy,
        seed: u64,
    ) -> Self {
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
            policy,
            deferred: VecDeque::new(),
            starts: BTreeMap::new(),
            deadlines: timers::Deadlines::default(),
            rng: Rng::new(seed),
            heartbeat_interval: policy::HEARTBEAT_INTERVAL_DEFAULT,
            heartbeat_at: None,
            connected: false,
            orphans: BTreeSet::new(),
            orphan_claim_at: None,
            unreleased: Vec::new(),
        }
    }

    /// At startup, before any other input: schedules the first heartbeat,
    /// gives the restored wake runs their start deadlines (the shell restarts
    /// or re-attaches them next), and takes the `orphans` the shell found (runs
    /// spawned for attempts the store never recorded).
    pub fn handle_startup(&mut self, now: Duration, orphans: Vec<(TaskId, Generation)>) {
        self.schedule_heartbeat(now);
        self.orphans = orphans.into_iter().collect();
        let restored: Vec<_> = self
            .tasks
            .values()
            .filter(|t| t.phase != muster_wire::msg::Phase::Finished)
            .map(|t| (t.task, t.generation, t.handle.as_ref().map(|h| h.mode)))
            .collect();
        for (task, generation, mode) in restored {
            self.run_restored(now, task, generation, mode);
        }
    }

    /// The hub welcomed a session: replay the outbox, heartbeat at once and
    /// then on the welcome's interval, and start the orphans' claim window.
    /// Held-back assignments are dropped: the hub resends, behind the welcome,
    /// those it still means this sidecar to have.
    pub fn handle_connected(&mut self, now: Duration, welcome: &Welcome) {
        self.connected = true;
        self.deferred.clear();
        self.set_max_result_bytes(welcome.limits.max_result_bytes as usize);
        let replay: Vec<Effect> = self
            .outbox
            .values()
            .map(|r| Effect::Send(SessionMsg::Report(r.clone())))
            .collect();
        self.effects.extend(replay);
        self.effects.push(Effect::Heartbeat);
        let interval = Duration::from_millis(welcome.heartbeat_interval_ms);
        self.heartbeat_welcomed(now, interval);
        if !self.orphans.is_empty() && self.orphan_claim_at.is_none() {
            self.orphan_claim_at = Some(now.saturating_add(policy::ORPHAN_CLAIM));
        }
    }

    /// The session ended; reports wait in the outbox for the next welcome.
    pub fn handle_disconnected(&mut self) {
        self.connected = false;
        // The hub resends, behind its next welcome, what it still means us to have.
        self.deferred.clear();
    }

    /// Sets the result limit announced in the hub's welcome.
    pub fn set_max_result_bytes(&mut self, n: usize) {
        self.max_result_bytes = n.min(muster_wire::limits::RESULT_BYTES_MAX);
    }

    /// Handles a message from the hub.
    pub fn handle_hub(&mut self, now: Duration, msg: HubMsg) {
        match msg {
            HubMsg::Assign(a) => self.assign(now, a),
            HubMsg::Cancel { task, generation }
            | HubMsg::Abandon {
                task, generation, ..
            } => {
                self.undefer(task, generation);
                self.drop_task(task, generation, true);
            }
            HubMsg::Ack { upto } => self.ack(upto),
            HubMsg::Welcome(_) | HubMsg::Refused(_) => {}
        }
        self.admit_deferred(now);
    }

    /// Handles an event from the agent runner.
    pub fn handle_run(&mut self, now: Duration, ev: RunEvent) {
        self.run_event(now, ev);
        self.admit_deferred(now);
    }

    /// Handles a command from the agent about its attempt (task, generation);
    /// `Err` is the plain message to show it. The shell checks the attempt's
    /// token before calling this.
    ///
    /// # Errors
    /// A sentence when the command makes no sense now (no such task, stale
    /// generation, ended, or its start already timed out).
    pub fn handle_agent(
        &mut self,
        now: Duration,
        task: TaskId,
        generation: Generation,
        cmd: AgentCmd,
    ) -> Result<String, String> {
        self.handle_agent_work(now, task, generation, cmd, None)
    }

    /// [`Core::handle_agent`] for a command that ends the attempt, with what the
    /// shell found in the attempt's workspace (it reads git; the agent's own
    /// word is never taken for it).
    pub fn handle_agent_work(
        &mut self,
        now: Duration,
        task: TaskId,
        generation: Generation,
        cmd: AgentCmd,
        work: Option<WorkResult>,
    ) -> Result<String, String> {
        let answer = self.agent_command(task, generation, cmd, work);
        self.admit_deferred(now);
        answer
    }

    /// What the attempt has used so far (cumulative), as the shell read it from
    /// the run's transcript. Ignored for an attempt not held here, of another
    /// generation, or ended; see [`Core::handle_agent`] for the agent's own word.
    pub fn handle_usage(
        &mut self,
        task: TaskId,
        generation: Generation,
        usage: muster_wire::msg::Usage,
    ) {
        let live = self.tasks.get(&task).is_some_and(|t| {
            t.generation == generation && t.phase != muster_wire::msg::Phase::Finished
        });
        if live {
            self.report_usage(task, generation, usage);
        }
    }

    /// Effects since the last call, in order. When the batch commits flushed,
    /// it also releases the run directories of every task forgotten so far.
    #[must_use]
    pub fn take_effects(&mut self) -> Vec<Effect> {
        if !self.unreleased.is_empty() && commit_kind(&self.effects) == CommitKind::Flushed {
            let released = self
                .unreleased
                .drain(..)
                .map(|(t, g)| Effect::ReleaseRunDir(t, g));
            self.effects.extend(released);
        }
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

    /// Unacknowledged reports, oldest first.
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
            .filter(|t| t.phase != muster_wire::msg::Phase::Finished)
            .count()
    }

    /// Assignments waiting for a free slot.
    pub fn deferred(&self) -> usize {
        self.deferred.len()
    }

    /// The policy the core decides with.
    pub fn policy(&self) -> &Policy {
        &self.policy
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
