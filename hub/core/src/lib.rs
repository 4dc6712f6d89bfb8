//! The hub's decision core: agent registry, enrollment tokens, the task state
//! machine, the scheduler, fencing, timeouts, retries and the circuit breaker.
//!
//! Sans-IO. The shell feeds [`Input`]s with an explicit `now` to
//! [`Core::handle`], then calls [`Core::take_output`] and must, in this order:
//! 1. commit every [`Write`] in one redb transaction,
//! 2. only then deliver `sends`, `replies` and `closes`.
//!
//! That order is the "commit before acknowledge" rule. The core never reads
//! the clock, spawns, or touches a socket or file; tasks that are no longer
//! live are read through the [`Archive`] trait.
pub mod activity;
pub mod admission;
pub mod alerts;
pub mod answer;
mod events;
pub use answer::Answer;
pub use events::{AgentChange, AuditAction, Event};
mod identity;
pub use identity::EnrollGrant;
pub mod model;
mod ops;
pub use ops::{AGENTS_PAGE_MAX, Caller};
pub mod policy;
pub mod retention;
mod sched;
mod session;
mod tasks;
mod timers;
pub mod usage;
pub mod views;
pub mod web;

use std::collections::{BTreeSet, HashMap, HashSet};

use muster_wire::msg::{Hello, HubMsg, OpError, OpRequest, Outcome, ReportKind, Role, SessionMsg};
use muster_wire::pace::Rng;
use muster_wire::{AgentName, Generation, PROTOCOL_VERSION, ReportId, TaskId};

use crate::policy::{Limits, Policy};
pub use model::*;

/// A connection, numbered by the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// A pending reply, numbered by the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplyId(pub u64);

/// Read access to tasks that are no longer live (the shell reads redb).
pub trait Archive {
    /// A task by id, as last committed.
    fn task(&self, id: TaskId) -> Option<TaskRecord>;
}

/// Something that happened, fed to the core.
#[derive(Debug)]
pub enum Input {
    /// A sidecar opened its session with a hello on an authenticated connection.
    Hello {
        /// The connection.
        conn: ConnId,
        /// SHA-256 of the peer's certificate.
        fingerprint: String,
        /// The hello.
        hello: Hello,
    },
    /// A session message from a sidecar.
    Session {
        /// The connection.
        conn: ConnId,
        /// The message.
        msg: SessionMsg,
    },
    /// A session ended.
    Closed {
        /// The connection.
        conn: ConnId,
    },
    /// An operator request (all but the read-only task queries, which the shell serves).
    Op {
        /// SHA-256 of the peer's certificate.
        fingerprint: String,
        /// The request.
        request: OpRequest,
        /// Where the answer goes.
        reply: ReplyId,
        /// For `TokenCreate`: the secret the shell generated, and its hash.
        token_secret: Option<(String, String)>,
    },
    /// An enrollment whose CSR the shell has already signed.
    Enroll {
        /// SHA-256 of the token secret.
        secret_hash: String,
        /// The role the peer asked for.
        role: Role,
        /// The name it asked for.
        name: String,
        /// The signed certificate, its fingerprint, and its key's fingerprint.
        cert: (String, String, String),
        /// The capabilities and slots asked for (agents).
        grant: (Vec<String>, u32),
        /// Where the answer goes.
        reply: ReplyId,
    },
    /// Time passed; check deadlines.
    Tick,
}

/// A state change to persist.
#[derive(Debug, Clone)]
pub enum Write {
    /// Upsert a task.
    Task(TaskRecord),
    /// Upsert an attempt.
    Attempt(AttemptRecord),
    /// Upsert an agent.
    Agent(AgentRecord),
    /// Upsert an identity.
    Identity(Identity),
    /// Upsert a token by the hash of its secret.
    Token(String, TokenRecord),
    /// Record an idempotency key.
    Key(String, TaskId),
    /// Append an event: the shell renders it as the JSON of its [`EventRecord`].
    Event {
        /// Its sequence number.
        seq: u64,
        /// When.
        at: Millis,
        /// What happened.
        event: Event,
    },
    /// The next task id to hand out.
    NextTaskId(u64),
    /// Upsert an API token by the hash of its secret.
    ApiToken(String, web::ApiToken),
}

/// An answer to a request.
#[derive(Debug)]
pub enum Reply {
    /// To an operator request: the shell renders it as the JSON of `OpResponse::Ok`.
    Answer(Answer),
    /// To an operator request: why it was refused (`OpResponse::Error`).
    Error(OpError),
    /// To an enrollment.
    Enroll(muster_wire::msg::EnrollResponse),
    /// To `stats`: the shell adds its own figures and renders it.
    Stats(Box<Stats>),
}

/// The core's part of the `stats` answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Stats {
    /// Attempts that reached an outcome.
    pub finished: u64,
    /// Of those, completed ones.
    pub completed: u64,
    /// Assignments sent.
    pub assigned: u64,
    /// Heartbeats received.
    pub heartbeats: u64,
    /// Reports about an attempt that was no longer current.
    pub stale_reports: u64,
    /// Reports received twice.
    pub duplicate_reports: u64,
    /// Finished attempts by outcome.
    pub outcomes: std::collections::BTreeMap<&'static str, u64>,
    /// Live tasks by state.
    pub live_by_state: std::collections::BTreeMap<&'static str, u64>,
    /// Agents known.
    pub agents: usize,
    /// Tokens and cost reported, in all, per agent and per label.
    pub usage: usage::UsageStats,
}

/// Effects of the inputs since the last [`Core::take_output`].
#[derive(Debug, Default)]
#[must_use]
pub struct Output {
    /// Persist these first, in one transaction.
    pub writes: Vec<Write>,
    /// Then send these, in order per connection.
    pub sends: Vec<(ConnId, HubMsg)>,
    /// Then answer these.
    pub replies: Vec<(ReplyId, Reply)>,
    /// Then close these connections.
    pub closes: Vec<ConnId>,
    /// Alerts raised or cleared, for `alert_command` (they are in the event log too).
    pub alerts: Vec<alerts::AlertNote>,
    /// Submit → running latency of each task that started running, for the histogram.
    pub dispatch_ms: Vec<Millis>,
    /// Certificate fingerprints revoked in this batch: after the commit the shell
    /// closes every connection and stream they hold.
    pub revoked: Vec<String>,
    /// Invariants found broken after this batch (empty unless there is a bug).
    pub violations: Vec<String>,
}

/// Coordination counters, for `stats`.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Tasks that reached a terminal state.
    pub finished: u64,
    /// Tasks completed.
    pub completed: u64,
    /// Attempts ended, by outcome.
    pub outcomes: HashMap<Outcome, u64>,
    /// Assignments made.
    pub assigned: u64,
    /// Heartbeats received.
    pub heartbeats: u64,
    /// Reports refused as stale (answered with Abandon).
    pub stale_reports: u64,
    /// Reports that repeated one already handled.
    pub duplicate_reports: u64,
    /// Tasks that reached each terminal state.
    pub finished_by_state: HashMap<TaskState, u64>,
    /// Tokens and cost reported, in all, per agent and per label.
    pub usage: usage::UsageTotals,
    /// Sidecar sessions welcomed.
    pub sessions_opened: u64,
    /// Sidecar hellos refused.
    pub sessions_refused: u64,
    /// Enrollments that succeeded.
    pub enrollments: u64,
    /// Enrollments refused (bad, used or expired token, name held, …).
    pub enrollments_refused: u64,
}

/// What `/metrics` shows of the core, taken when scraped.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Live tasks by state.
    pub tasks: Vec<(TaskState, u64)>,
    /// Agents by derived state.
    pub agents: Vec<(AgentState, u64)>,
    /// Open alerts by kind.
    pub alerts: Vec<(alerts::AlertKind, u64)>,
    /// The counters.
    pub counters: Counters,
}

/// A live (non-terminal) task and its current attempt.
#[derive(Debug)]
struct Live {
    rec: TaskRecord,
    attempt: Option<AttemptRecord>,
    /// Report kinds already handled for the current generation.
    seen: HashSet<ReportKind>,
    /// Agents on which this task failed before, to prefer others.
    failed_on: BTreeSet<String>,
    /// Whether the task was attempted before (fresh work goes first).
    retried: bool,
    /// The generation seen by the last invariant check; it never goes back.
    checked_generation: Generation,
    /// The attempt deadline armed in the index for this task, so that re-arming
    /// replaces it and the index holds at most one entry per task.
    armed_at: Option<Millis>,
    /// What the heartbeats said the current attempt is doing (in memory only),
    /// with the generation it is about.
    activity: Option<(Generation, activity::Seen)>,
}

/// An agent in the registry, with its session.
#[derive(Debug)]
struct Agent {
    rec: AgentRecord,
    conn: Option<ConnId>,
    /// Tasks the hub has assigned to it that are not yet terminal.
    tasks: BTreeSet<TaskId>,
    /// When the session ended (or the hub started), for the lost grace.
    offline_since: Option<Millis>,
    infra_failures: u32,
    breaker_until: Option<Millis>,
    breaker_trips: u32,
    self_test_passed: bool,
    /// The sidecar said it is shutting down (SIGTERM): no new work until its next session.
    stopping: bool,
    /// The workspaces its last hello offered; only `git` takes tasks with a repository.
    workspace: muster_wire::work::WorkspaceMode,
    /// The newest heartbeat sequence number of the current session: a heartbeat
    /// that is not newer (a replay) says nothing new about activity.
    hb_seq: Option<u64>,
}

/// The hub's decision core. See the module docs for the calling contract.
pub struct Core {
    policy: Policy,
    limits: Limits,
    started_at: Millis,
    next_task_id: u64,
    next_event_seq: u64,
    rng: Rng,
    // Boxed: the map churns (a task in, a task out), and its rehashes move
    // pointers rather than whole records.
    tasks: HashMap<TaskId, Box<Live>>,
    /// How many of `tasks` are in each state, by [`TaskState::index`]: kept as
    /// states change, since `stats` and `/metrics` are polled and a deep queue
    /// holds tens of thousands of tasks.
    live_by_state: [u64; TaskState::ALL.len()],
    sched: sched::ReadyQueue,
    agents: HashMap<AgentName, Agent>,
    conns: HashMap<ConnId, String>,
    identities: HashMap<String, Identity>,
    tokens: HashMap<String, TokenRecord>,
    keys: HashMap<String, TaskId>,
    /// Blocked tasks by the dependency they wait on.
    waiting_on: HashMap<TaskId, BTreeSet<TaskId>>,
    /// Terminal within the current batch, not yet readable from the archive.
    recent: HashMap<TaskId, TaskRecord>,
    /// Tasks changed since the last output, in first-change order: a batch's
    /// writes then read in causal order (a slot is freed before it is reused),
    /// which per-write checkers such as the fault simulation's store rely on.
    dirty: Vec<TaskId>,
    dirty_set: HashSet<TaskId>,
    counters: Counters,
    out: Output,
    dirty_schedule: bool,
    /// `muster1/<advertise>/<ca fingerprint>/`, to which a token's secret is appended.
    token_prefix: String,
    /// See [`Core::set_token_warning`].
    token_warning: Option<String>,
    /// How long an ack may wait to be combined with later ones (the final report's ack
    /// goes at once): this keeps the happy path at 5 messages per task.
    ack_delay: Millis,
    /// Per connection: the highest report id not yet acknowledged, and since when.
    pending_acks: HashMap<ConnId, (ReportId, Millis)>,
    alerts: alerts::Alerts,
    /// Live tasks per submitter, for `limits.max_tasks_per_submitter`.
    per_submitter: HashMap<String, u64>,
    /// The `now` of the latest input, for records made without one at hand.
    last_now: Millis,
    /// Every deadline, ordered (see [`timers`]).
    deadlines: timers::Deadlines,
    /// The next alert pass, if one is wanted: one slot, not one entry per task.
    alerts_at: Option<Millis>,
    /// When the next retention prune is due.
    prune_at: Millis,
    /// When alerts were last evaluated.
    last_alert_eval: Millis,
    /// Invariant breaches found after batches (see [`Core::check_invariants`]).
    violations: u64,
    /// API tokens and dashboard logins.
    web: web::Web,
}

/// Default for [`Core::set_ack_delay`].
pub const ACK_DELAY: Millis = 1000;

/// What the core is built from at startup.
#[derive(Debug, Default)]
pub struct Restored {
    /// Every non-terminal task, with its current attempt.
    pub live: Vec<(TaskRecord, Option<AttemptRecord>)>,
    /// The registry.
    pub agents: Vec<AgentRecord>,
    /// Identities.
    pub identities: Vec<Identity>,
    /// Tokens not yet expired or used.
    pub tokens: Vec<(String, TokenRecord)>,
    /// Idempotency keys.
    pub keys: Vec<(String, TaskId)>,
    /// The next task id.
    pub next_task_id: u64,
    /// The next event sequence number.
    pub next_event_seq: u64,
    /// API tokens by the hash of their secret (live ones; the store keeps all).
    pub api_tokens: Vec<(String, web::ApiToken)>,
}

impl Core {
    /// Builds the core from restored state. `now` is the hub's start: every agent
    /// gets a full lost grace from it before its work is re-queued.
    pub fn new(policy: Policy, limits: Limits, restored: Restored, now: Millis, seed: u64) -> Self {
        let mut core = Core {
            policy,
            limits,
            started_at: now,
            next_task_id: restored.next_task_id.max(1),
            next_event_seq: restored.next_event_seq.max(1),
            rng: Rng::new(seed | 1),
            tasks: HashMap::new(),
            sched: sched::ReadyQueue::default(),
            agents: HashMap::new(),
            conns: HashMap::new(),
            identities: restored
                .identities
                .into_iter()
                .map(|i| (i.fingerprint.clone(), i))
                .collect(),
            tokens: restored.tokens.into_iter().collect(),
            keys: restored.keys.into_iter().collect(),
            waiting_on: HashMap::new(),
            live_by_state: [0; TaskState::ALL.len()],
            recent: HashMap::new(),
            dirty: Vec::new(),
            dirty_set: HashSet::new(),
            counters: Counters::default(),
            out: Output::default(),
            dirty_schedule: true,
            token_prefix: String::new(),
            token_warning: None,
            ack_delay: ACK_DELAY,
            pending_acks: HashMap::new(),
            alerts: alerts::Alerts::default(),
            per_submitter: HashMap::new(),
            last_now: now,
            deadlines: timers::Deadlines::default(),
            alerts_at: None,
            prune_at: now + retention::PRUNE_EVERY,
            last_alert_eval: 0,
            violations: 0,
            web: web::Web::new(restored.api_tokens),
        };
        for rec in restored.agents {
            match AgentName::new(rec.name.clone()) {
                Ok(name) => {
                    core.agents.insert(name, Agent::new(rec, now));
                }
                // Only checked names are ever stored; one that is not is reported, not trusted.
                Err(e) => core.out.violations.push(format!(
                    "the store holds an agent with an invalid name {:?} ({e}); it is ignored",
                    rec.name
                )),
            }
        }
        let backoff_max = core.policy.backoff_max.as_millis() as Millis;
        for (mut rec, mut attempt) in restored.live {
            cap_restored_times(now, backoff_max, &mut rec, attempt.as_mut());
            if let (Some(a), true) = (&attempt, rec.state.has_live_attempt())
                && let Some(agent) = core.agents.get_mut(a.agent.as_str())
            {
                agent.tasks.insert(rec.id);
            }
            core.insert_live(rec, attempt);
        }
        let names: Vec<AgentName> = core.agents.keys().cloned().collect();
        for name in names {
            core.arm_offline(name.as_str());
        }
        core
    }
    /// Sets what join tokens start with: `muster1/<advertise>/<ca fingerprint>/`.
    pub fn set_token_prefix(&mut self, prefix: String) {
        self.token_prefix = prefix;
    }
    /// A warning every join token's answer carries (the address in it may not
    /// be reachable from other machines).
    pub fn set_token_warning(&mut self, warning: Option<String>) {
        self.token_warning = warning;
    }
    /// Sets how long acks of non-final reports may wait to be combined (0: at once).
    pub fn set_ack_delay(&mut self, ms: Millis) {
        self.ack_delay = ms;
    }
    /// Takes the effects accumulated since the last call. See the module docs.
    pub fn take_output(&mut self) -> Output {
        // One scheduling pass per batch, after every input of it.
        if self.dirty_schedule {
            self.dirty_schedule = false;
            self.schedule(self.last_now);
        }
        let changed = std::mem::take(&mut self.dirty);
        self.arm_changed(&changed);
        if let Err(breach) = self.check_invariants(&changed) {
            // Tests and debug builds stop here; a release hub keeps serving,
            // logs the breach loudly and counts it in `stats` and `/metrics`.
            debug_assert!(false, "core invariant broken: {breach}");
            self.violations += 1;
            self.out.violations.push(breach);
        }
        // Each changed task is written once, in its final state: a task changes
        // several times in a busy batch, and cloning it at every change was a
        // large share of the core thread's time.
        self.dirty_set.clear();
        for id in changed {
            let rec = self
                .tasks
                .get(&id)
                .map(|l| &l.rec)
                .or_else(|| self.recent.get(&id));
            if let Some(rec) = rec {
                self.out.writes.push(Write::Task(rec.clone()));
            }
        }
        self.recent.clear();
        let mut out = std::mem::take(&mut self.out);
        out.writes = last_write_wins(std::mem::take(&mut out.writes));
        out
    }
    /// Checks, after a batch, what must always hold for the tasks it changed:
    /// a task with a live attempt has one, on an agent that counts it, in the
    /// same generation; generations never go back; a queued task is in the
    /// queue (ready, or waiting out a recorded backoff). Costs O(changed).
    ///
    /// # Errors
    /// The first breach found, naming the task.
    pub fn check_invariants(&mut self, changed: &[TaskId]) -> Result<(), String> {
        for id in changed {
            let Some(live) = self.tasks.get_mut(id) else {
                continue;
            };
            let rec = &live.rec;
            if rec.generation < live.checked_generation {
                return Err(format!(
                    "task {id}: generation went back from {} to {}",
                    live.checked_generation.0, rec.generation.0
                ));
            }
            live.checked_generation = rec.generation;
            if rec.state.has_live_attempt() {
                let Some(a) = &live.attempt else {
                    return Err(format!(
                        "task {id} is {} without an attempt",
                        rec.state.as_str()
                    ));
                };
                if a.generation != rec.generation {
                    return Err(format!(
                        "task {id}: attempt generation {} is not the task's {}",
                        a.generation.0, rec.generation.0
                    ));
                }
                if !self
                    .agents
                    .get(a.agent.as_str())
                    .is_some_and(|g| g.tasks.contains(id))
                {
                    return Err(format!(
                        "task {id} is {} on {}, which does not count it",
                        rec.state.as_str(),
                        a.agent
                    ));
                }
            }
            if rec.state == TaskState::Queued && !self.sched.holds(rec, live.retried) {
                return Err(format!("task {id} is queued but not in the queue"));
            }
        }
        // O(live tasks), so in the tests only: every batch of every test checks it.
        #[cfg(test)]
        {
            let mut n = [0u64; TaskState::ALL.len()];
            for l in self.tasks.values() {
                n[l.rec.state.index()] += 1;
            }
            if n != self.live_by_state {
                return Err(format!(
                    "live tasks by state counted {:?}, but the tasks say {n:?}",
                    self.live_by_state
                ));
            }
        }
        Ok(())
    }

    /// Invariant breaches found since the start (0 unless there is a bug).
    pub fn violations(&self) -> u64 {
        self.violations
    }

    /// Deadlines held in the index, for tests and metrics.
    pub fn deadlines_held(&self) -> usize {
        self.deadlines.len()
    }

    /// Marks a task (live, or ended in this batch) to be written at [`Core::take_output`].
    fn touch(&mut self, id: TaskId) {
        if self.dirty_set.insert(id) {
            self.dirty.push(id);
        }
    }
    /// The identity behind a certificate fingerprint, if enrolled and not revoked.
    pub fn identity(&self, fingerprint: &str) -> Option<&Identity> {
        self.identities
            .get(fingerprint)
            .filter(|i| i.revoked_at.is_none())
    }
    /// The session of the agent named `name`, if it has one now (for the log
    /// streams the shell opens on its connection).
    pub fn agent_conn(&self, name: &str) -> Option<ConnId> {
        self.agents.get(name).and_then(|a| a.conn)
    }
    /// Coordination counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
    /// Number of live (non-terminal) tasks.
    pub fn live_tasks(&self) -> usize {
        self.tasks.len()
    }
    /// Handles one input at time `now`.
    pub fn handle(&mut self, now: Millis, input: Input, archive: &dyn Archive) {
        self.last_now = now;
        match input {
            Input::Hello {
                conn,
                fingerprint,
                hello,
            } => self.on_hello(now, conn, &fingerprint, hello),
            Input::Session { conn, msg } => match msg {
                SessionMsg::Report(r) => self.on_report(now, conn, r, archive),
                SessionMsg::Heartbeat(hb) => self.on_heartbeat(now, conn, hb),
            },
            Input::Closed { conn } => self.on_closed(now, conn),
            Input::Op {
                fingerprint,
                request,
                reply,
                token_secret,
            } => {
                let resp = self.on_op(now, &fingerprint, request, token_secret, archive);
                self.out.replies.push((reply, resp));
            }
            Input::Enroll {
                secret_hash,
                role,
                name,
                cert,
                grant,
                reply,
            } => {
                let resp = self.on_enroll(now, &secret_hash, role, &name, cert, grant);
                match resp {
                    muster_wire::msg::EnrollResponse::Enrolled { .. } => {
                        self.counters.enrollments += 1;
                    }
                    muster_wire::msg::EnrollResponse::Refused(_) => {
                        self.counters.enrollments_refused += 1;
                    }
                }
                self.out.replies.push((reply, Reply::Enroll(resp)));
            }
            Input::Tick => self.on_tick(now),
        }
    }

    // === Sessions ===
    /// What `/metrics` shows: task, agent and alert counts, and the counters.
    pub fn snapshot(&self, now: Millis) -> Snapshot {
        let tasks = self.live_counts();
        let mut agents: HashMap<AgentState, u64> = HashMap::new();
        for a in self.agents.values() {
            let state = self.agent_state_kind(now, a);
            let derived = if state != AgentState::Online {
                state
            } else if a.breaker_until.is_some() {
                AgentState::Degraded
            } else if a.rec.drained {
                AgentState::Draining
            } else {
                AgentState::Online
            };
            *agents.entry(derived).or_default() += 1;
        }
        Snapshot {
            tasks: TaskState::ALL
                .iter()
                .filter(|s| !s.is_terminal())
                .map(|s| (*s, tasks[s.index()]))
                .collect(),
            agents: AgentState::ALL
                .into_iter()
                .map(|k| (k, agents.get(&k).copied().unwrap_or(0)))
                .collect(),
            alerts: alerts::AlertKind::ALL
                .into_iter()
                .map(|k| (k, self.alerts.count(k) as u64))
                .collect(),
            counters: self.counters.clone(),
        }
    }
    /// Live tasks by state, indexed by [`TaskState::index`].
    pub(crate) fn live_counts(&self) -> [u64; TaskState::ALL.len()] {
        self.live_by_state
    }

    /// Counts a task into or out of the live map (`None` on the other side).
    fn count_state(
        by_state: &mut [u64; TaskState::ALL.len()],
        from: Option<TaskState>,
        to: Option<TaskState>,
    ) {
        if let Some(f) = from {
            by_state[f.index()] = by_state[f.index()].saturating_sub(1);
        }
        if let Some(t) = to {
            by_state[t.index()] += 1;
        }
    }

    /// Moves a live task's record to `to` and its count with it: the one way a
    /// live task's state changes, so the counts cannot drift from the records.
    fn move_state(by_state: &mut [u64; TaskState::ALL.len()], rec: &mut TaskRecord, to: TaskState) {
        Core::count_state(by_state, Some(rec.state), Some(to));
        rec.state = to;
    }

    /// Forgets the idempotency keys of pruned tasks.
    pub fn forget_keys(&mut self, pruned: &[TaskId]) {
        let gone: HashSet<TaskId> = pruned.iter().copied().collect();
        self.keys.retain(|_, id| !gone.contains(id));
    }
    /// Registers an identity created outside enrollment (the admin credential at init).
    pub fn add_identity(&mut self, id: Identity) {
        self.identities.insert(id.fingerprint.clone(), id.clone());
        self.out.writes.push(Write::Identity(id));
    }
}

impl Agent {
    fn new(rec: AgentRecord, now: Millis) -> Self {
        Agent {
            rec,
            conn: None,
            tasks: BTreeSet::new(),
            offline_since: Some(now),
            infra_failures: 0,
            breaker_until: None,
            breaker_trips: 0,
            self_test_passed: false,
            stopping: false,
            workspace: muster_wire::work::WorkspaceMode::Shared,
            hb_seq: None,
        }
    }
}

/// A restored task whose times lie after `now` (the hub's start) was written by a
/// hub whose clock has since stepped back. Its deadlines (accept, start, task
/// timeout, stall alert, backoff) would wait for the length of the step, so they
/// count from the restart instead: times of past events are capped at `now`, and
/// a backoff at `now + backoff_max`, the longest one the hub sets.
fn cap_restored_times(
    now: Millis,
    backoff_max: Millis,
    rec: &mut TaskRecord,
    attempt: Option<&mut AttemptRecord>,
) {
    if let Some(t) = rec.not_before.as_mut() {
        *t = (*t).min(now.saturating_add(backoff_max));
    }
    let mut past = vec![rec.progress_at.as_mut()];
    if let Some(a) = attempt {
        past.extend([
            Some(&mut a.assigned_at),
            a.accepted_at.as_mut(),
            a.started_at.as_mut(),
        ]);
    }
    for t in past.into_iter().flatten() {
        *t = (*t).min(now);
    }
}

/// Keeps only the last upsert of each record (an agent or an attempt can change
/// several times in a busy batch; only its final state needs writing). Tasks are
/// already written once, by [`Core::take_output`]. Events are all kept, in order.
fn last_write_wins(writes: Vec<Write>) -> Vec<Write> {
    #[derive(PartialEq, Eq, Hash)]
    enum Key<'a> {
        Task(TaskId),
        Attempt(TaskId, Generation),
        Agent(&'a str),
        Identity(&'a str),
        Token(&'a str),
        ApiToken(&'a str),
        Idempotency(&'a str),
        NextTaskId,
    }
    fn key(w: &Write) -> Option<Key<'_>> {
        Some(match w {
            Write::Task(t) => Key::Task(t.id),
            Write::Attempt(a) => Key::Attempt(a.task, a.generation),
            Write::Agent(a) => Key::Agent(&a.name),
            Write::Identity(i) => Key::Identity(&i.fingerprint),
            Write::Token(h, _) => Key::Token(h),
            Write::ApiToken(h, _) => Key::ApiToken(h),
            Write::Key(k, _) => Key::Idempotency(k),
            Write::NextTaskId(_) => Key::NextTaskId,
            Write::Event { .. } => return None,
        })
    }
    let mut seen = HashSet::new();
    let keep: Vec<bool> = writes
        .iter()
        .rev()
        .map(|w| key(w).is_none_or(|k| seen.insert(k)))
        .collect();
    writes
        .into_iter()
        .zip(keep.into_iter().rev())
        .filter_map(|(w, k)| k.then_some(w))
        .collect()
}

/// The protocol version, re-exported for the shell's refusal messages.
pub const PROTOCOL: u32 = PROTOCOL_VERSION;

#[cfg(test)]
mod tests;
