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

pub mod admission;
pub mod alerts;
pub mod model;
pub mod policy;
mod sched;
pub mod views;

use std::collections::{BTreeSet, HashMap, HashSet};

use muster_wire::limits::{self, truncate_utf8};
use muster_wire::msg::{
    Assign, EnrollRefusal, Failure, HeldTask, Hello, HubMsg, OpError, OpErrorCode, OpRequest,
    OpResponse, Outcome, Phase, Refused, Report, ReportBody, ReportKind, Role, SessionMsg,
    SubmitRequest, TaskSpec, TimeoutAction, Welcome, WireLimits,
};
use muster_wire::pace::{Backoff, Rng};
use muster_wire::{Generation, PROTOCOL_VERSION, ReportId, TaskId};

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
    /// Append an event.
    Event(EventRecord),
    /// The next task id to hand out.
    NextTaskId(u64),
}

/// An answer to a request.
#[derive(Debug)]
pub enum Reply {
    /// To an operator request.
    Op(OpResponse),
    /// To an enrollment.
    Enroll(muster_wire::msg::EnrollResponse),
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
    /// Alerts raised or cleared, as JSON, for `alert_command` (they are in the event log too).
    pub alerts: Vec<serde_json::Value>,
    /// Submit → running latency of each task that started running, for the histogram.
    pub dispatch_ms: Vec<Millis>,
    /// Certificate fingerprints revoked in this batch: after the commit the shell
    /// closes every connection and stream they hold.
    pub revoked: Vec<String>,
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
}

/// What `/metrics` shows of the core, taken when scraped.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Live tasks by state.
    pub tasks: Vec<(TaskState, u64)>,
    /// Agents by derived state (`online`, `suspect`, `offline`, `degraded`, `draining`).
    pub agents: Vec<(&'static str, u64)>,
    /// Open alerts by kind.
    pub alerts: Vec<(&'static str, u64)>,
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
}

/// The hub's decision core. See the module docs for the calling contract.
pub struct Core {
    policy: Policy,
    limits: Limits,
    started_at: Millis,
    next_task_id: u64,
    next_event_seq: u64,
    rng: Rng,
    tasks: HashMap<TaskId, Live>,
    sched: sched::ReadyQueue,
    agents: HashMap<String, Agent>,
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
}

/// Bytes of agent documents in one `agents` answer; the rest is counted, not listed
/// (a frame is at most 1 MiB; `agent show NAME` gives any one agent).
pub const AGENTS_REPLY_BYTES_MAX: usize = 768 * 1024;

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
            recent: HashMap::new(),
            dirty: Vec::new(),
            dirty_set: HashSet::new(),
            counters: Counters::default(),
            out: Output::default(),
            dirty_schedule: true,
            token_prefix: String::new(),
            ack_delay: ACK_DELAY,
            pending_acks: HashMap::new(),
            alerts: alerts::Alerts::default(),
            per_submitter: HashMap::new(),
            last_now: now,
        };
        for rec in restored.agents {
            core.agents.insert(rec.name.clone(), Agent::new(rec, now));
        }
        let backoff_max = core.policy.backoff_max.as_millis() as Millis;
        for (mut rec, mut attempt) in restored.live {
            cap_restored_times(now, backoff_max, &mut rec, attempt.as_mut());
            if let (Some(a), true) = (&attempt, rec.state.has_live_attempt())
                && let Some(agent) = core.agents.get_mut(&a.agent)
            {
                agent.tasks.insert(rec.id);
            }
            core.insert_live(rec, attempt);
        }
        core
    }

    /// Sets what join tokens start with: `muster1/<advertise>/<ca fingerprint>/`.
    pub fn set_token_prefix(&mut self, prefix: String) {
        self.token_prefix = prefix;
    }

    /// Sets how long acks of non-final reports may wait to be combined (0: at once).
    pub fn set_ack_delay(&mut self, ms: Millis) {
        self.ack_delay = ms;
    }

    /// Takes the effects accumulated since the last call. See the module docs.
    pub fn take_output(&mut self) -> Output {
        // Each changed task is written once, in its final state: a task changes
        // several times in a busy batch, and cloning it at every change was a
        // large share of the core thread's time.
        self.dirty_set.clear();
        for id in std::mem::take(&mut self.dirty) {
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
                self.out.replies.push((reply, Reply::Op(resp)));
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
                self.out.replies.push((reply, Reply::Enroll(resp)));
            }
            Input::Tick => self.on_tick(now),
        }
        if self.dirty_schedule {
            self.dirty_schedule = false;
            self.schedule(now);
        }
    }

    // === Sessions ===

    fn on_hello(&mut self, now: Millis, conn: ConnId, fingerprint: &str, hello: Hello) {
        let refuse = |core: &mut Core, r: Refused| {
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
        let agent = self.agents.entry(name.clone()).or_insert_with(|| {
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
        agent.rec.version = truncate_utf8(hello.version, limits::VERSION_BYTES_MAX);
        agent.rec.capabilities = hello.capabilities;
        agent.rec.slots = hello.slots;
        agent.rec.last_seen = Some(now);
        // Until its first heartbeat, trust the sidecar's own hello.
        agent.self_test_passed = true;
        let rec = agent.rec.clone();
        self.conns.insert(conn, name.clone());
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
        self.event(now, "agent", &name, "online", "hello");
        self.reconcile(now, &name, conn, &hello.resume, true);
        self.dirty_schedule = true;
    }

    /// Compares what a sidecar holds with the hub's view: continue, abandon or re-send.
    fn reconcile(&mut self, now: Millis, name: &str, conn: ConnId, held: &[HeldTask], hello: bool) {
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

    fn on_closed(&mut self, now: Millis, conn: ConnId) {
        self.pending_acks.remove(&conn);
        let Some(name) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(agent) = self.agents.get_mut(&name)
            && agent.conn == Some(conn)
        {
            agent.conn = None;
            agent.offline_since = Some(now);
            self.event(now, "agent", &name, "offline", "session closed");
        }
    }

    fn agent_of_conn(&self, conn: ConnId) -> Option<String> {
        self.conns.get(&conn).cloned()
    }

    fn on_heartbeat(&mut self, now: Millis, conn: ConnId, mut hb: muster_wire::msg::Heartbeat) {
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
            self.event(now, "agent", &name, "refused", &reason);
            return;
        }
        bound_self_test(&mut hb.self_test);
        self.counters.heartbeats += 1;
        let Some(agent) = self.agents.get_mut(&name) else {
            return;
        };
        agent.rec.last_seen = Some(now);
        agent.rec.host = Some(hb.host.clone());
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
                ("healthy", "self-test passed")
            } else {
                ("unhealthy", "self-test failed")
            });
        }
        if let Some(until) = agent.breaker_until
            && now >= until
            && hb.self_test.passed
        {
            agent.breaker_until = None;
            agent.infra_failures = 0;
            events.push(("circuit_closed", "cooldown over and healthy heartbeat"));
        }
        if !events.is_empty() {
            self.dirty_schedule = true;
        }
        for (state, why) in events {
            self.event(now, "agent", &name, state, why);
        }
        self.reconcile(now, &name, conn, &hb.tasks, false);
    }

    fn on_report(&mut self, now: Millis, conn: ConnId, report: Report, archive: &dyn Archive) {
        let Some(name) = self.agent_of_conn(conn) else {
            return;
        };
        let report = bound_report(report);
        let urgent = matches!(report.body, ReportBody::Finished { .. });
        self.ack(conn, report.id, now, urgent);
        let kind = report.body.kind();
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
            if matches!(report.body, ReportBody::Finished { .. }) {
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
        if kind != ReportKind::Progress && !live.seen.insert(kind) {
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
                live.rec.progress_at = Some(now);
                live.rec.progress_note =
                    Some(truncate_utf8(note, muster_wire::limits::NOTE_BYTES_MAX));
                live.rec.updated_at = now;
                self.touch(id);
            }
            ReportBody::Finished {
                outcome,
                result,
                error,
            } => {
                live.rec.result =
                    result.map(|r| truncate_utf8(r, self.limits.max_result_bytes as usize));
                let no_retry = error.as_ref().is_some_and(|e| e.no_retry);
                self.end_attempt(now, id, outcome, error, no_retry);
            }
        }
    }

    fn stale(&mut self, conn: ConnId, report: &Report, reason: &str) {
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
    fn ack(&mut self, conn: ConnId, id: ReportId, now: Millis, urgent: bool) {
        let e = self.pending_acks.entry(conn).or_insert((id, now));
        e.0 = e.0.max(id);
        if urgent || self.ack_delay == 0 {
            self.flush_ack(conn);
        }
    }

    fn flush_ack(&mut self, conn: ConnId) {
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

    fn insert_live(&mut self, rec: TaskRecord, attempt: Option<AttemptRecord>) {
        let id = rec.id;
        *self
            .per_submitter
            .entry(submitter(&rec).to_string())
            .or_default() += 1;
        let retried = rec.attempts > 0;
        if rec.state == TaskState::Queued {
            self.sched.insert(&rec, retried);
        }
        if rec.state == TaskState::Blocked {
            for dep in &rec.after {
                self.waiting_on.entry(*dep).or_default().insert(id);
            }
        }
        self.tasks.insert(
            id,
            Live {
                rec,
                attempt,
                seen: HashSet::new(),
                failed_on: BTreeSet::new(),
                retried,
            },
        );
    }

    fn set_state(&mut self, now: Millis, id: TaskId, to: TaskState, why: &str) {
        let Some(live) = self.tasks.get_mut(&id) else {
            return;
        };
        let from = live.rec.state;
        if from == TaskState::Queued {
            self.sched.remove(&live.rec, live.retried);
        }
        live.rec.state = to;
        live.rec.updated_at = now;
        if to == TaskState::Queued {
            self.sched.insert(&live.rec, live.retried);
            self.dirty_schedule = true;
        }
        if let Some(a) = &live.attempt {
            self.out.writes.push(Write::Attempt(a.clone()));
        }
        let json = views::task_event_json(&live.rec, from, why);
        let failed = (to == TaskState::Failed).then(|| {
            format!(
                "task {id} ({}) failed for good: {}",
                live.rec.title,
                live.rec.reason.as_deref().unwrap_or_default()
            )
        });
        self.touch(id);
        self.push_event(now, json);
        if let Some(msg) = failed {
            self.alert_raise(now, "task_failed", &id.to_string(), msg);
        }
        if to == TaskState::Completed {
            self.alerts.note_completion(now);
        }
        if to == TaskState::Running && from != TaskState::Running {
            let submitted = self.tasks.get(&id).map_or(now, |l| l.rec.submitted_at);
            self.out.dispatch_ms.push(now.saturating_sub(submitted));
        }
        if to.is_terminal() {
            *self.counters.finished_by_state.entry(to).or_default() += 1;
        }
        if to.is_terminal() {
            self.finish_task(now, id);
        }
    }

    /// Ends the current attempt of a live task and decides what comes next.
    fn end_attempt(
        &mut self,
        now: Millis,
        id: TaskId,
        outcome: Outcome,
        error: Option<Failure>,
        no_retry: bool,
    ) {
        let Some(live) = self.tasks.get_mut(&id) else {
            return;
        };
        let Some(attempt) = live.attempt.as_mut().filter(|a| a.outcome.is_none()) else {
            return;
        };
        attempt.ended_at = Some(now);
        attempt.outcome = Some(outcome);
        attempt.error = error.clone();
        let agent_name = attempt.agent.clone();
        let generation = attempt.generation;
        *self.counters.outcomes.entry(outcome).or_default() += 1;
        if outcome != Outcome::Completed {
            live.failed_on.insert(agent_name.clone());
            live.retried = true;
        }
        let reason = error.as_ref().map(|e| e.reason.clone());
        let attempts = live.rec.attempts;
        let max = live.rec.max_attempts;
        let timeout_retry =
            outcome == Outcome::TimedOut && live.rec.timeout_action == TimeoutAction::Retry;
        let retryable = match outcome {
            Outcome::Completed | Outcome::Cancelled => false,
            Outcome::TimedOut => timeout_retry,
            Outcome::Failed => !no_retry,
            _ => true,
        };
        let superseded = !matches!(outcome, Outcome::Completed | Outcome::Failed);
        // The agent's bookkeeping: slot, breaker, and stopping a superseded run.
        let mut tripped = None;
        if let Some(agent) = self.agents.get_mut(&agent_name) {
            agent.tasks.remove(&id);
            if outcome.is_infrastructure() {
                agent.infra_failures += 1;
                if agent.infra_failures >= self.policy.breaker_failures
                    && agent.breaker_until.is_none()
                {
                    let factor = 1u32 << agent.breaker_trips.min(16);
                    let cooldown = self
                        .policy
                        .breaker_cooldown
                        .saturating_mul(factor)
                        .min(self.policy.breaker_cooldown_max);
                    agent.breaker_until = Some(now + cooldown.as_millis() as u64);
                    agent.breaker_trips += 1;
                    tripped = Some(format!(
                        "{} consecutive infrastructure failures",
                        agent.infra_failures
                    ));
                }
            } else if outcome == Outcome::Completed || outcome == Outcome::Failed {
                agent.infra_failures = 0;
            }
            if superseded && let Some(conn) = agent.conn {
                let msg = if outcome == Outcome::Cancelled {
                    HubMsg::Cancel {
                        task: id,
                        generation,
                    }
                } else {
                    HubMsg::Abandon {
                        task: id,
                        generation,
                        reason: format!("attempt ended at the hub: {}", outcome.as_str()),
                    }
                };
                self.out.sends.push((conn, msg));
            }
        }
        if let Some(why) = tripped {
            self.event(now, "agent", &agent_name, "degraded", &why);
        }
        self.dirty_schedule = true;
        let why = format!("attempt {generation} ended {}", outcome.as_str());
        if outcome == Outcome::Completed {
            self.set_state(now, id, TaskState::Completed, &why);
        } else if outcome == Outcome::Cancelled {
            if let Some(l) = self.tasks.get_mut(&id) {
                l.rec.reason = reason.or(Some("cancelled".into()));
            }
            self.set_state(now, id, TaskState::Cancelled, &why);
        } else if retryable && attempts < max {
            let delay = self.backoff(attempts);
            if let Some(l) = self.tasks.get_mut(&id) {
                l.rec.not_before = Some(now + delay);
                l.rec.reason = reason;
            }
            self.set_state(now, id, TaskState::Queued, &why);
        } else {
            if let Some(l) = self.tasks.get_mut(&id) {
                let r = reason.unwrap_or_else(|| outcome.as_str().into());
                l.rec.reason = Some(if retryable {
                    format!("{r} (attempt {attempts} of {max}; no attempts left)")
                } else {
                    r
                });
            }
            self.set_state(now, id, TaskState::Failed, &why);
        }
    }

    /// Retry backoff: `backoff_initial × factor^(n-1)`, capped, ±20 % jitter.
    fn backoff(&mut self, attempts: u32) -> Millis {
        let unit = self.rng.unit();
        Backoff::new(self.policy.backoff_initial, self.policy.backoff_max)
            .factor(self.policy.backoff_factor)
            .jitter(0.8, 1.2)
            .delay(attempts, unit)
            .as_millis() as u64
    }

    /// A task reached a terminal state: drop it from memory, release dependants.
    fn finish_task(&mut self, now: Millis, id: TaskId) {
        let Some(live) = self.tasks.remove(&id) else {
            return;
        };
        if let Some(n) = self.per_submitter.get_mut(submitter(&live.rec)) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_submitter.remove(submitter(&live.rec));
            }
        }
        self.counters.finished += 1;
        let state = live.rec.state;
        if state == TaskState::Completed {
            self.counters.completed += 1;
        }
        self.recent.insert(id, live.rec);
        let Some(dependants) = self.waiting_on.remove(&id) else {
            return;
        };
        for dep in dependants {
            if state == TaskState::Completed {
                self.maybe_unblock(now, dep);
            } else if let Some(l) = self.tasks.get_mut(&dep)
                && l.rec.state == TaskState::Blocked
            {
                l.rec.reason = Some(format!("dependency {id} ended {}", state.as_str()));
                self.set_state(
                    now,
                    dep,
                    TaskState::Cancelled,
                    "a dependency did not complete",
                );
            }
        }
    }

    fn maybe_unblock(&mut self, now: Millis, id: TaskId) {
        let Some(live) = self.tasks.get(&id) else {
            return;
        };
        if live.rec.state != TaskState::Blocked {
            return;
        }
        let pending = live.rec.after.iter().any(|d| self.tasks.contains_key(d));
        if !pending {
            self.set_state(now, id, TaskState::Queued, "dependencies completed");
        }
    }

    // === Ticks: deadlines ===

    fn on_tick(&mut self, now: Millis) {
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

    fn on_op(
        &mut self,
        now: Millis,
        fingerprint: &str,
        request: OpRequest,
        token_secret: Option<(String, String)>,
        archive: &dyn Archive,
    ) -> OpResponse {
        let Some(who) = self.identity(fingerprint).cloned() else {
            return op_error(
                OpErrorCode::Forbidden,
                "this credential is not enrolled at this hub or has been revoked",
            );
        };
        let allowed = match who.role {
            Role::Admin => true,
            Role::Operator => !request.is_write(),
            Role::Agent => false,
        };
        if !allowed {
            let what = if request.is_write() {
                "change state (role admin needed)"
            } else {
                "read (role operator or admin needed)"
            };
            return op_error(
                OpErrorCode::Forbidden,
                &format!("{} has role {} and may not {what}", who.name, who.role),
            );
        }
        match request {
            OpRequest::Agents => ok_json(&self.agents_reply(now)),
            OpRequest::AgentShow { name } => match self.agent_view(now, &name) {
                Some(v) => ok_json(&v),
                None => not_found_agent(&name),
            },
            OpRequest::AgentRevoke { name } => self.revoke(now, &name, &who.name),
            OpRequest::AgentDrain { name } => self.drain(now, &name, true, &who.name),
            OpRequest::AgentUndrain { name } => self.drain(now, &name, false, &who.name),
            OpRequest::TokenCreate {
                role,
                ttl_s,
                name,
                capabilities,
                slots,
            } => {
                if let Err(msg) =
                    check_token_grant(role, name.as_ref(), capabilities.as_deref(), slots)
                {
                    return op_error(OpErrorCode::Invalid, &msg);
                }
                let Some((secret, hash)) = token_secret else {
                    return op_error(
                        OpErrorCode::Internal,
                        "the hub could not draw a random secret (system RNG failed); see its log and try again",
                    );
                };
                let rec = TokenRecord {
                    role,
                    created_by: who.name.clone(),
                    created_at: now,
                    expires_at: now.saturating_add(ttl_s.saturating_mul(1000)),
                    used_at: None,
                    name: name.map(String::from),
                    capabilities,
                    slots,
                };
                self.tokens.insert(hash.clone(), rec.clone());
                self.out.writes.push(Write::Token(hash, rec.clone()));
                let json = serde_json::json!({"kind": "audit", "action": "token_create", "who": who.name, "role": role.as_str(), "ttl_s": ttl_s, "name": rec.name});
                self.push_event(now, json.to_string());
                ok_json(&serde_json::json!({
                    "token": format!("{}{secret}", self.token_prefix),
                    "role": role.as_str(),
                    "expires_at": rec.expires_at,
                    "name": rec.name,
                    "capabilities": rec.capabilities,
                    "slots": rec.slots,
                }))
            }
            OpRequest::Submit(req) => self.submit(now, req, &who.name, archive),
            OpRequest::SubmitBatch(reqs) => self.submit_batch(now, reqs, &who.name, archive),
            OpRequest::TaskCancel { id } => self.cancel(now, id, &who.name),
            OpRequest::TaskRequeue { id } => self.requeue(now, id, &who.name, archive),
            OpRequest::Stats => ok_json(&self.stats_json()),
            OpRequest::Alerts => {
                let all = self.alerts.list();
                let total = all.len();
                let (list, left_out) =
                    views::fit(all.iter().map(|a| a.json("open")), views::REPLY_BYTES_MAX);
                ok_json(&serde_json::json!({
                    "alerts": list,
                    "total": total,
                    "truncated": left_out > 0,
                }))
            }
            OpRequest::IdentityRevoke(target) => self.revoke_target(now, target, &who.name),
            OpRequest::AgentSet {
                name,
                capabilities,
                slots,
            } => self.agent_set(now, &name, capabilities, slots, &who.name),
            OpRequest::Tasks { .. } | OpRequest::TaskShow { .. } | OpRequest::Watch { .. } => {
                op_error(OpErrorCode::Internal, "served by the shell")
            }
        }
    }

    /// The `agents` answer: counts by state for the whole fleet, and the agents
    /// themselves up to a byte budget, so a fleet of any size fits in one frame.
    fn agents_reply(&self, now: Millis) -> serde_json::Value {
        let views = self.agent_views(now);
        let total = views.len();
        let mut by_state: std::collections::BTreeMap<String, u64> =
            std::collections::BTreeMap::new();
        let mut shown = Vec::new();
        let mut bytes = 0;
        for v in views {
            *by_state
                .entry(v["state"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
            let n = v.to_string().len();
            if bytes + n <= AGENTS_REPLY_BYTES_MAX {
                bytes += n;
                shown.push(v);
            }
        }
        let truncated = shown.len() < total;
        let mut reply = views::agents_json(shown);
        reply["total"] = total.into();
        reply["by_state"] = serde_json::json!(by_state);
        reply["truncated"] = truncated.into();
        reply
    }

    fn agent_views(&self, now: Millis) -> Vec<serde_json::Value> {
        let mut names: Vec<&String> = self.agents.keys().collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|n| self.agent_view(now, n))
            .collect()
    }

    fn agent_view(&self, now: Millis, name: &str) -> Option<serde_json::Value> {
        let a = self.agents.get(name)?;
        let (state, why) = self.agent_state(now, a);
        let (available, reason) = self.availability(now, a);
        Some(views::agent_json(
            &a.rec,
            state,
            &why,
            available,
            &reason,
            a.tasks.len(),
            now,
        ))
    }

    /// online / suspect (missed 2 heartbeats) / offline, with the reason.
    fn agent_state(&self, now: Millis, a: &Agent) -> (&'static str, String) {
        if a.rec.revoked {
            return ("offline", "revoked".into());
        }
        if a.conn.is_none() {
            return ("offline", "no session".into());
        }
        let interval = self.policy.heartbeat_interval.as_millis() as u64;
        let age = now.saturating_sub(a.rec.last_seen.unwrap_or(0));
        let offline_after = (3 * interval).max(limits::IDLE_TIMEOUT.as_millis() as u64);
        if age > offline_after {
            ("offline", format!("no heartbeat for {} s", age / 1000))
        } else if age > 2 * interval {
            (
                "suspect",
                format!("missed heartbeats: last one {} s ago", age / 1000),
            )
        } else {
            ("online", String::new())
        }
    }

    /// Whether the agent may get work now, and why not.
    fn availability(&self, now: Millis, a: &Agent) -> (bool, String) {
        let (state, why) = self.agent_state(now, a);
        if state != "online" {
            return (false, format!("{state}: {why}"));
        }
        if a.rec.drained {
            return (false, "draining".into());
        }
        if a.stopping {
            return (false, "the sidecar is shutting down".into());
        }
        if let Some(until) = a.breaker_until {
            // Only a healthy heartbeat after the cooldown closes the circuit (see on_heartbeat).
            let when = if now < until {
                "until its cooldown ends at"
            } else {
                "until a healthy heartbeat; cooldown ended at"
            };
            return (false, format!("degraded: circuit open {when} {until}"));
        }
        if !a.self_test_passed {
            let problems = a
                .rec
                .self_test
                .as_ref()
                .map(|s| s.problems.join("; "))
                .unwrap_or_default();
            return (false, format!("self-test failed: {problems}"));
        }
        (true, String::new())
    }

    /// `agent revoke NAME`: the live agent identity of that name (never an operator's).
    fn revoke(&mut self, now: Millis, name: &str, who: &str) -> OpResponse {
        let fp = self
            .live_identity(Role::Agent, name)
            .map(|i| i.fingerprint.clone());
        if fp.is_none() && !self.agents.contains_key(name) {
            return not_found_agent(name);
        }
        if let Some(fp) = fp {
            self.revoke_identity(now, &fp);
        } else if let Some(agent) = self.agents.get_mut(name) {
            // Registered but with no live identity: mark the registry entry all the same.
            agent.rec.revoked = true;
            self.out.writes.push(Write::Agent(agent.rec.clone()));
        }
        self.audit_event(now, who, "agent_revoke", name);
        ok_json(&serde_json::json!({ "name": name, "role": "agent", "revoked": true }))
    }

    /// `identity revoke`: one identity by role and name, or by fingerprint.
    fn revoke_target(
        &mut self,
        now: Millis,
        target: muster_wire::msg::IdentityTarget,
        who: &str,
    ) -> OpResponse {
        use muster_wire::msg::IdentityTarget;
        let found = match &target {
            IdentityTarget::Named { role, name } => self
                .identities
                .values()
                .find(|i| i.role == *role && i.name == *name && i.revoked_at.is_none())
                .cloned()
                .ok_or_else(|| {
                    format!(
                        "no live {role} identity named {name}; `muster-hub identities` lists them"
                    )
                }),
            IdentityTarget::Fingerprint(prefix) => {
                let prefix = prefix.to_ascii_lowercase();
                if prefix.len() < 8 {
                    return op_error(
                        OpErrorCode::Invalid,
                        "give at least 8 hex digits of the fingerprint",
                    );
                }
                let mut hits = self
                    .identities
                    .values()
                    .filter(|i| i.fingerprint.starts_with(&prefix));
                match (hits.next(), hits.next()) {
                    (Some(i), None) => Ok(i.clone()),
                    (None, _) => Err(format!("no identity has a fingerprint starting {prefix}")),
                    (Some(_), Some(_)) => {
                        return op_error(
                            OpErrorCode::Invalid,
                            &format!("{prefix} matches several fingerprints; give more digits"),
                        );
                    }
                }
            }
        };
        let id = match found {
            Ok(i) => i,
            Err(msg) => return op_error(OpErrorCode::NotFound, &msg),
        };
        if id.revoked_at.is_some() {
            return op_error(
                OpErrorCode::Conflict,
                &format!("{} {} is already revoked", id.role, id.name),
            );
        }
        if id.role == Role::Admin {
            let admins = self
                .identities
                .values()
                .filter(|i| i.role == Role::Admin && i.revoked_at.is_none())
                .count();
            if admins <= 1 {
                return op_error(
                    OpErrorCode::Conflict,
                    &format!(
                        "{} is the last admin identity; enroll another admin (`muster-hub token create --role admin`, then `login`) before revoking this one",
                        id.name
                    ),
                );
            }
        }
        self.revoke_identity(now, &id.fingerprint);
        self.audit_event(
            now,
            who,
            "identity_revoke",
            &format!(
                "{} {} {}",
                id.role,
                id.name,
                &id.fingerprint[..16.min(id.fingerprint.len())]
            ),
        );
        ok_json(&serde_json::json!({
            "name": id.name,
            "role": id.role.as_str(),
            "fingerprint": id.fingerprint,
            "revoked": true,
        }))
    }

    /// The live identity holding `name` in `role`'s namespace.
    fn live_identity(&self, role: Role, name: &str) -> Option<&Identity> {
        self.identities
            .values()
            .find(|i| i.name == name && i.same_namespace(role) && i.revoked_at.is_none())
    }

    /// Revokes one identity and cuts what it holds: an agent's session at once, and
    /// (through `Output::revoked`) every connection and stream of that certificate.
    fn revoke_identity(&mut self, now: Millis, fingerprint: &str) {
        let Some(i) = self.identities.get_mut(fingerprint) else {
            return;
        };
        i.revoked_at = Some(now);
        let id = i.clone();
        self.out.writes.push(Write::Identity(id.clone()));
        self.out.revoked.push(id.fingerprint.clone());
        if id.role != Role::Agent {
            return;
        }
        if let Some(agent) = self.agents.get_mut(&id.name) {
            agent.rec.revoked = true;
            self.out.writes.push(Write::Agent(agent.rec.clone()));
            if let Some(conn) = agent.conn.take() {
                self.conns.remove(&conn);
                agent.offline_since = Some(now);
                self.out
                    .sends
                    .push((conn, HubMsg::Refused(Refused::Revoked)));
                self.out.closes.push(conn);
            }
        }
        self.dirty_schedule = true;
    }

    /// `agent set`: changes an agent's grant; its live session keeps only what the
    /// new grant allows, at once.
    fn agent_set(
        &mut self,
        now: Millis,
        name: &str,
        capabilities: Option<Vec<String>>,
        slots: Option<u32>,
        who: &str,
    ) -> OpResponse {
        if let Err(msg) = check_token_grant(Role::Agent, None, capabilities.as_deref(), slots) {
            return op_error(OpErrorCode::Invalid, &msg);
        }
        if capabilities.is_none() && slots.is_none() {
            return op_error(
                OpErrorCode::Invalid,
                "nothing to change; give --capability C (repeatable), --no-capabilities or --slots N",
            );
        }
        let Some(fp) = self
            .live_identity(Role::Agent, name)
            .map(|i| i.fingerprint.clone())
        else {
            return not_found_agent(name);
        };
        let Some(id) = self.identities.get_mut(&fp) else {
            return not_found_agent(name);
        };
        if let Some(c) = capabilities {
            id.capabilities = c;
        }
        if let Some(s) = slots {
            id.slots = s;
        }
        let id = id.clone();
        self.out.writes.push(Write::Identity(id.clone()));
        if let Some(agent) = self.agents.get_mut(name) {
            agent
                .rec
                .capabilities
                .retain(|c| id.capabilities.contains(c));
            agent.rec.slots = agent.rec.slots.min(id.slots);
            self.out.writes.push(Write::Agent(agent.rec.clone()));
        }
        self.audit_event(now, who, "agent_set", name);
        self.dirty_schedule = true;
        ok_json(&serde_json::json!({
            "name": name,
            "capabilities": id.capabilities,
            "slots": id.slots,
        }))
    }

    fn drain(&mut self, now: Millis, name: &str, drained: bool, who: &str) -> OpResponse {
        let Some(agent) = self.agents.get_mut(name) else {
            return not_found_agent(name);
        };
        agent.rec.drained = drained;
        self.out.writes.push(Write::Agent(agent.rec.clone()));
        self.audit_event(
            now,
            who,
            if drained {
                "agent_drain"
            } else {
                "agent_undrain"
            },
            name,
        );
        self.dirty_schedule = true;
        ok_json(&serde_json::json!({ "name": name, "drained": drained }))
    }

    /// One submission: the task's view, or why it was refused.
    fn submit(
        &mut self,
        now: Millis,
        req: SubmitRequest,
        who: &str,
        archive: &dyn Archive,
    ) -> OpResponse {
        match self.admit(now, req, who, archive) {
            Ok(Admitted::New(id)) => match self.tasks.get(&id) {
                Some(live) => OpResponse::Ok {
                    json: views::task_json_string(&live.rec),
                },
                None => op_error(OpErrorCode::Internal, "the new task vanished"),
            },
            Ok(Admitted::Existing(rec)) => {
                let mut v = views::task_json(&rec);
                v["existing"] = serde_json::Value::Bool(true);
                ok_json(&v)
            }
            Err(refused) => OpResponse::Error(refused),
        }
    }

    /// Several submissions, each accepted or refused on its own, in order:
    /// `{"results": [{"id", "state"[, "existing"]} | {"error", "code"}], "accepted", "refused"}`.
    fn submit_batch(
        &mut self,
        now: Millis,
        reqs: Vec<SubmitRequest>,
        who: &str,
        archive: &dyn Archive,
    ) -> OpResponse {
        use muster_wire::limits::SUBMIT_BATCH_MAX;
        if reqs.len() > SUBMIT_BATCH_MAX {
            return op_error(
                OpErrorCode::Invalid,
                &format!(
                    "a batch of {} tasks; the limit is {SUBMIT_BATCH_MAX} per request, so split it",
                    reqs.len()
                ),
            );
        }
        let mut results = Vec::with_capacity(reqs.len());
        let mut refused = 0;
        for req in reqs {
            results.push(match self.admit(now, req, who, archive) {
                Ok(Admitted::New(id)) => {
                    let state = self.tasks.get(&id).map_or("queued", |l| l.rec.state.as_str());
                    serde_json::json!({ "id": id.0, "state": state })
                }
                Ok(Admitted::Existing(rec)) => {
                    serde_json::json!({ "id": rec.id.0, "state": rec.state.as_str(), "existing": true })
                }
                Err(e) => {
                    refused += 1;
                    serde_json::json!({ "error": e.message, "code": e.code })
                }
            });
        }
        let accepted = results.len() - refused;
        ok_json(&serde_json::json!({
            "results": results,
            "accepted": accepted,
            "refused": refused,
        }))
    }

    /// Checks a submission against the limits and records the new task; a
    /// repeated idempotency key names the task it made before.
    fn admit(
        &mut self,
        now: Millis,
        req: SubmitRequest,
        who: &str,
        archive: &dyn Archive,
    ) -> Result<Admitted, OpError> {
        let refuse = |code: OpErrorCode, message: &str| OpError {
            code,
            message: message.into(),
        };
        if let Some(key) = &req.key
            && let Some(id) = self.keys.get(key)
        {
            let rec = self
                .tasks
                .get(id)
                .map(|l| l.rec.clone())
                .or_else(|| self.recent.get(id).cloned())
                .or_else(|| archive.task(*id));
            if let Some(rec) = rec {
                return Ok(Admitted::Existing(Box::new(rec)));
            }
        }
        if let Err(msg) = self.validate_submit(&req) {
            return Err(refuse(OpErrorCode::Invalid, &msg));
        }
        if self.tasks.len() as u64 >= self.limits.max_queued_tasks {
            return Err(refuse(
                OpErrorCode::Busy,
                &format!(
                    "the hub holds {} unfinished tasks, the limit (limits.max_queued_tasks); wait for some to finish or raise the limit",
                    self.limits.max_queued_tasks
                ),
            ));
        }
        let mine = self.per_submitter.get(who).copied().unwrap_or(0);
        if mine >= self.limits.max_tasks_per_submitter {
            return Err(refuse(
                OpErrorCode::Busy,
                &format!(
                    "{who} has {mine} unfinished tasks, the limit per submitter (limits.max_tasks_per_submitter); wait for some to finish"
                ),
            ));
        }
        // Dependencies: each must exist; a failed or cancelled one refuses at once.
        let mut blocked = false;
        for dep in &req.after {
            let state = self
                .tasks
                .get(dep)
                .map(|l| l.rec.state)
                .or_else(|| self.recent.get(dep).map(|r| r.state))
                .or_else(|| archive.task(*dep).map(|r| r.state));
            match state {
                None => {
                    return Err(refuse(
                        OpErrorCode::Invalid,
                        &format!("--after {dep}: no such task"),
                    ));
                }
                Some(TaskState::Completed) => {}
                Some(s) if s.is_terminal() => {
                    return Err(refuse(
                        OpErrorCode::Conflict,
                        &format!(
                            "--after {dep}: that task already ended {}, so this one could never run",
                            s.as_str()
                        ),
                    ));
                }
                Some(_) => blocked = true,
            }
        }
        let id = TaskId(self.next_task_id);
        self.next_task_id += 1;
        self.out.writes.push(Write::NextTaskId(self.next_task_id));
        let rec = TaskRecord {
            id,
            title: req.title,
            description: req.description,
            capabilities: req.capabilities,
            priority: req.priority,
            max_attempts: req.max_attempts.unwrap_or(self.policy.max_attempts),
            timeout_ms: req.timeout_ms,
            timeout_action: req.timeout_action,
            after: req.after,
            key: req.key.clone(),
            state: if blocked {
                TaskState::Blocked
            } else {
                TaskState::Queued
            },
            generation: Generation(0),
            attempts: 0,
            not_before: None,
            agent: None,
            submitted_at: now,
            updated_at: now,
            progress_at: None,
            progress_note: None,
            result: None,
            reason: None,
            audit: vec![Audit {
                at: now,
                who: who.into(),
                action: "submit".into(),
            }],
        };
        if let Some(key) = req.key {
            self.keys.insert(key.clone(), id);
            self.out.writes.push(Write::Key(key, id));
        }
        self.push_event(
            now,
            views::task_event_json(&rec, rec.state, &format!("submitted by {who}")),
        );
        self.insert_live(rec, None);
        self.touch(id);
        self.dirty_schedule = true;
        Ok(Admitted::New(id))
    }

    fn validate_submit(&self, req: &SubmitRequest) -> Result<(), String> {
        use muster_wire::limits::TITLE_BYTES_MAX;
        if req.title.trim().is_empty() {
            return Err("--title is empty; give the task a one-line title".into());
        }
        if req.title.len() > TITLE_BYTES_MAX {
            return Err(format!(
                "--title is {} bytes; the limit is {TITLE_BYTES_MAX}",
                req.title.len()
            ));
        }
        let max_desc = self.limits.max_description_bytes as usize;
        if req.description.len() > max_desc {
            return Err(format!(
                "the description is {} bytes; the limit is {max_desc} (limits.max_description_bytes)",
                req.description.len()
            ));
        }
        check_capabilities(&req.capabilities).map_err(|e| format!("--capability: {e}"))?;
        if req.max_attempts == Some(0) {
            return Err("--max-attempts 0 would never run the task; use 1 or more".into());
        }
        if let Some(n) = req.max_attempts
            && n > limits::ATTEMPTS_MAX
        {
            return Err(format!(
                "--max-attempts {n}: the limit is {}",
                limits::ATTEMPTS_MAX
            ));
        }
        if let Some(t) = req.timeout_ms
            && !(1..=limits::TIMEOUT_MS_MAX).contains(&t)
        {
            return Err(format!(
                "--timeout of {t} ms: use 1 ms to {} days",
                limits::TIMEOUT_MS_MAX / 86_400_000
            ));
        }
        if req.after.len() > 64 {
            return Err("more than 64 --after dependencies".into());
        }
        if let Some(k) = &req.key
            && (k.is_empty() || k.len() > 256)
        {
            return Err("--key must be 1 to 256 bytes".into());
        }
        Ok(())
    }

    fn cancel(&mut self, now: Millis, id: TaskId, who: &str) -> OpResponse {
        let Some(live) = self.tasks.get_mut(&id) else {
            return if self.recent.contains_key(&id) {
                op_error(
                    OpErrorCode::Conflict,
                    &format!("task {id} has already ended"),
                )
            } else {
                op_error(
                    OpErrorCode::Conflict,
                    &format!(
                        "task {id} is not live (unknown or already ended); see `muster-hub task show {id}`"
                    ),
                )
            };
        };
        push_audit(&mut live.rec, now, who, "cancel");
        let reason = format!("cancelled by {who}");
        if live.rec.state.has_live_attempt() {
            self.end_attempt(now, id, Outcome::Cancelled, Some(failure(&reason)), true);
        } else {
            live.rec.reason = Some(reason);
            self.set_state(now, id, TaskState::Cancelled, "cancelled by an operator");
        }
        self.audit_event(now, who, "task_cancel", &id.to_string());
        let rec = self.recent.get(&id).cloned();
        ok_json(&rec.map(|r| views::task_json(&r)).unwrap_or_default())
    }

    fn requeue(&mut self, now: Millis, id: TaskId, who: &str, archive: &dyn Archive) -> OpResponse {
        if self.tasks.contains_key(&id) {
            return op_error(
                OpErrorCode::Conflict,
                &format!(
                    "task {id} has not ended; only a completed, failed or cancelled task can be requeued"
                ),
            );
        }
        let Some(mut rec) = self.recent.remove(&id).or_else(|| archive.task(id)) else {
            return op_error(OpErrorCode::NotFound, &format!("no task {id}"));
        };
        if self.tasks.len() as u64 >= self.limits.max_queued_tasks {
            return op_error(
                OpErrorCode::Busy,
                "the queue is full (limits.max_queued_tasks)",
            );
        }
        rec.attempts = 0;
        rec.not_before = None;
        rec.reason = None;
        rec.result = None;
        rec.state = TaskState::Queued;
        rec.updated_at = now;
        push_audit(&mut rec, now, who, "requeue");
        self.alert_clear("task_failed", &id.to_string());
        self.push_event(
            now,
            views::task_event_json(&rec, rec.state, &format!("requeued by {who}")),
        );
        self.audit_event(now, who, "task_requeue", &id.to_string());
        let view = views::task_json(&rec);
        self.insert_live(rec, None);
        self.touch(id);
        // Tasks still blocked on it must hear when it ends again.
        let dependants: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|l| l.rec.state == TaskState::Blocked && l.rec.after.contains(&id))
            .map(|l| l.rec.id)
            .collect();
        if !dependants.is_empty() {
            self.waiting_on.entry(id).or_default().extend(dependants);
        }
        self.dirty_schedule = true;
        ok_json(&view)
    }

    fn stats_json(&self) -> serde_json::Value {
        let c = &self.counters;
        let outcomes: serde_json::Map<String, serde_json::Value> = c
            .outcomes
            .iter()
            .map(|(o, n)| (o.as_str().to_string(), (*n).into()))
            .collect();
        let mut by_state: HashMap<&str, u64> = HashMap::new();
        for l in self.tasks.values() {
            *by_state.entry(l.rec.state.as_str()).or_default() += 1;
        }
        serde_json::json!({
            "finished": c.finished,
            "completed": c.completed,
            "assigned": c.assigned,
            "heartbeats": c.heartbeats,
            "stale_reports": c.stale_reports,
            "duplicate_reports": c.duplicate_reports,
            "outcomes": outcomes,
            "live_by_state": by_state,
            "agents": self.agents.len(),
        })
    }

    // === Enrollment ===

    fn on_enroll(
        &mut self,
        now: Millis,
        secret_hash: &str,
        role: Role,
        name: &str,
        (cert_pem, fingerprint, key_fingerprint): (String, String, String),
        (asked_caps, asked_slots): (Vec<String>, u32),
    ) -> muster_wire::msg::EnrollResponse {
        use muster_wire::msg::EnrollResponse;
        let refuse = EnrollResponse::Refused;
        let Some(token) = self.tokens.get(secret_hash) else {
            return refuse(EnrollRefusal::UnknownToken);
        };
        if let Some(at) = token.used_at {
            return refuse(EnrollRefusal::AlreadyUsed { at_unix: at / 1000 });
        }
        if now >= token.expires_at {
            return refuse(EnrollRefusal::Expired {
                at_unix: token.expires_at / 1000,
            });
        }
        if token.role != role {
            return refuse(EnrollRefusal::WrongRole {
                token: token.role,
                requested: role,
            });
        }
        // Names are checked again here: the core must not trust its shell's decoding.
        if let Err(e) = muster_wire::AgentName::new(name) {
            return refuse(EnrollRefusal::BadRequest {
                reason: format!("name: {e}"),
            });
        }
        if name == RESERVED_NAME {
            return refuse(EnrollRefusal::NameRefused {
                reason: format!(
                    "{RESERVED_NAME:?} is reserved for the hub's own admin credential; pick another --name"
                ),
            });
        }
        if let Some(bound) = token.name.as_deref().filter(|b| *b != name) {
            return refuse(EnrollRefusal::NameRefused {
                reason: format!(
                    "this token is for the name {bound}, not {name}; enroll with --name {bound}"
                ),
            });
        }
        let replaces = token.name.is_some();
        let holder = self.live_identity(role, name).cloned();
        if let Some(h) = &holder
            && !replaces
        {
            return refuse(EnrollRefusal::NameTaken {
                name: name.into(),
                holder: h.fingerprint.chars().take(16).collect(),
                enrolled_at_unix: h.created_at / 1000,
            });
        }
        let revoked_key = self
            .identities
            .values()
            .any(|i| i.key_fingerprint == key_fingerprint && i.revoked_at.is_some());
        if revoked_key {
            return refuse(EnrollRefusal::RevokedKey);
        }
        let (capabilities, slots) = if role == Role::Agent {
            match grant_for(token, asked_caps, asked_slots) {
                Ok(g) => g,
                Err(reason) => return refuse(EnrollRefusal::NotGranted { reason }),
            }
        } else {
            (Vec::new(), 0)
        };
        let mut token = token.clone();
        token.used_at = Some(now);
        self.tokens.insert(secret_hash.into(), token.clone());
        self.out
            .writes
            .push(Write::Token(secret_hash.into(), token));
        // Replacing a host: the old identity goes in the same commit as the new one.
        if let Some(h) = holder {
            self.revoke_identity(now, &h.fingerprint);
            let json = serde_json::json!({"kind": "audit", "action": "identity_replaced", "who": name, "role": role.as_str(), "old_fingerprint": h.fingerprint});
            self.push_event(now, json.to_string());
        }
        let id = Identity {
            name: name.into(),
            role,
            fingerprint: fingerprint.clone(),
            key_fingerprint,
            created_at: now,
            revoked_at: None,
            capabilities,
            slots,
        };
        self.identities.insert(fingerprint, id.clone());
        self.out.writes.push(Write::Identity(id));
        if role == Role::Agent
            && let Some(agent) = self.agents.get_mut(name)
        {
            // Re-enrolled under a fresh key: no longer revoked.
            agent.rec.revoked = false;
            self.out.writes.push(Write::Agent(agent.rec.clone()));
        }
        let json = serde_json::json!({"kind": "audit", "action": "enroll", "who": name, "role": role.as_str()});
        self.push_event(now, json.to_string());
        EnrollResponse::Enrolled {
            cert_pem,
            ca_pem: String::new(),
        }
    }

    // === Events ===

    fn event(&mut self, now: Millis, kind: &str, subject: &str, state: &str, why: &str) {
        let json = serde_json::json!({ "kind": kind, "name": subject, "state": state, "why": why });
        self.push_event(now, json.to_string());
    }

    fn audit_event(&mut self, now: Millis, who: &str, action: &str, subject: &str) {
        let json = serde_json::json!({ "kind": "audit", "who": who, "action": action, "subject": subject });
        self.push_event(now, json.to_string());
    }

    fn push_event(&mut self, now: Millis, json: String) {
        let seq = self.next_event_seq;
        self.next_event_seq += 1;
        self.out
            .writes
            .push(Write::Event(EventRecord { seq, at: now, json }));
    }

    fn alert_raise(&mut self, now: Millis, kind: &'static str, subject: &str, message: String) {
        let mut changes = Vec::new();
        self.alerts.raise(now, kind, subject, message, &mut changes);
        self.alert_changes(now, changes);
    }

    fn alert_clear(&mut self, kind: &'static str, subject: &str) {
        let mut changes = Vec::new();
        self.alerts.clear(kind, subject, &mut changes);
        // Clearing needs no `now` in the record; the event carries the batch's time.
        self.alert_changes(self.last_now, changes);
    }

    fn alert_changes(&mut self, now: Millis, changes: alerts::Changes) {
        for c in changes {
            self.push_event(now, c.to_string());
            self.out.alerts.push(c);
        }
    }

    /// Re-derives the alerts whose cause is a condition: agent down, stalled, circuit, storm.
    fn evaluate_alerts(&mut self, now: Millis) {
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
        self.alerts.sync(now, "agent_down", down, &mut changes);
        self.alerts.sync(now, "circuit_open", circuit, &mut changes);
        self.alerts.sync(now, "stalled", stalled, &mut changes);
        self.alerts.check_storm(now, &mut changes);
        self.alert_changes(now, changes);
    }

    /// What `/metrics` shows: task, agent and alert counts, and the counters.
    pub fn snapshot(&self, now: Millis) -> Snapshot {
        let mut tasks: HashMap<TaskState, u64> = HashMap::new();
        for l in self.tasks.values() {
            *tasks.entry(l.rec.state).or_default() += 1;
        }
        let mut agents: HashMap<&'static str, u64> = HashMap::new();
        for a in self.agents.values() {
            let (state, _) = self.agent_state(now, a);
            let derived = if state != "online" {
                state
            } else if a.breaker_until.is_some() {
                "degraded"
            } else if a.rec.drained {
                "draining"
            } else {
                "online"
            };
            *agents.entry(derived).or_default() += 1;
        }
        let kinds = [
            "agent_down",
            "task_failed",
            "stalled",
            "circuit_open",
            "retry_storm",
        ];
        Snapshot {
            tasks: TaskState::ALL
                .iter()
                .filter(|s| !s.is_terminal())
                .map(|s| (*s, tasks.get(s).copied().unwrap_or(0)))
                .collect(),
            agents: ["online", "suspect", "offline", "degraded", "draining"]
                .into_iter()
                .map(|k| (k, agents.get(k).copied().unwrap_or(0)))
                .collect(),
            alerts: kinds
                .into_iter()
                .map(|k| (k, self.alerts.count(k) as u64))
                .collect(),
            counters: self.counters.clone(),
        }
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

fn push_audit(rec: &mut TaskRecord, now: Millis, who: &str, action: &str) {
    if rec.audit.len() >= AUDIT_LEN_MAX {
        rec.audit.remove(1);
    }
    rec.audit.push(Audit {
        at: now,
        who: who.into(),
        action: action.into(),
    });
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
            Write::Key(k, _) => Key::Idempotency(k),
            Write::NextTaskId(_) => Key::NextTaskId,
            Write::Event(_) => return None,
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

/// "42 s" or "31 min", for alert messages.
fn format_age(ms: Millis) -> String {
    if ms < 120_000 {
        format!("{} s", ms / 1000)
    } else {
        format!("{} min", ms / 60_000)
    }
}

/// What [`Core::admit`] did with a submission.
enum Admitted {
    /// A new task.
    New(TaskId),
    /// The task an earlier submission with the same idempotency key made.
    Existing(Box<TaskRecord>),
}

/// Who submitted a task: the first entry of its audit trail.
fn submitter(rec: &TaskRecord) -> &str {
    rec.audit.first().map_or("", |a| a.who.as_str())
}

fn spec_of(rec: &TaskRecord) -> TaskSpec {
    TaskSpec {
        title: rec.title.clone(),
        description: rec.description.clone(),
        capabilities: rec.capabilities.clone(),
        priority: rec.priority,
        timeout_ms: rec.timeout_ms,
    }
}

fn failure(reason: &str) -> Failure {
    Failure {
        reason: reason.into(),
        ..Failure::default()
    }
}

fn ok_json(v: &serde_json::Value) -> OpResponse {
    OpResponse::Ok {
        json: v.to_string(),
    }
}

fn op_error(code: OpErrorCode, message: &str) -> OpResponse {
    OpResponse::Error(OpError {
        code,
        message: message.into(),
    })
}

fn not_found_agent(name: &str) -> OpResponse {
    op_error(
        OpErrorCode::NotFound,
        &format!("no agent named {name:?}; `muster-hub agents` lists them"),
    )
}

/// The name of the hub's own admin credential; nobody may enroll under it.
pub const RESERVED_NAME: &str = "admin";

/// Checks capability names: at most [`limits::CAPABILITIES_MAX`], each a valid name.
fn check_capabilities(caps: &[String]) -> Result<(), String> {
    if caps.len() > limits::CAPABILITIES_MAX {
        return Err(format!(
            "{} capabilities; the limit is {}",
            caps.len(),
            limits::CAPABILITIES_MAX
        ));
    }
    for c in caps {
        if let Err(e) = muster_wire::AgentName::new(c.as_str()) {
            let shown: String = c.chars().take(64).collect();
            return Err(format!("capability {shown:?}: {e}"));
        }
    }
    Ok(())
}

/// Checks what a token (or `agent set`) grants.
fn check_token_grant(
    role: Role,
    name: Option<&muster_wire::AgentName>,
    caps: Option<&[String]>,
    slots: Option<u32>,
) -> Result<(), String> {
    if name.is_some_and(|n| n.as_str() == RESERVED_NAME) {
        return Err(format!(
            "{RESERVED_NAME:?} is reserved for the hub's own admin credential; pick another name"
        ));
    }
    if role != Role::Agent && (caps.is_some() || slots.is_some()) {
        return Err(format!(
            "capabilities and slots are granted to agents only, not to role {role}"
        ));
    }
    if let Some(c) = caps {
        check_capabilities(c)?;
    }
    if let Some(s) = slots
        && !(1..=limits::SLOTS_MAX).contains(&s)
    {
        return Err(format!("--slots {s}: use 1 to {}", limits::SLOTS_MAX));
    }
    Ok(())
}

/// What an agent enrollment is granted: the token's grant where it sets one, else
/// what the host asked for; asking beyond the token's grant is refused.
fn grant_for(
    token: &TokenRecord,
    asked_caps: Vec<String>,
    asked_slots: u32,
) -> Result<(Vec<String>, u32), String> {
    check_capabilities(&asked_caps)?;
    let asked_slots = asked_slots.max(1);
    if asked_slots > limits::SLOTS_MAX {
        return Err(format!(
            "{asked_slots} slots asked; the limit is {}",
            limits::SLOTS_MAX
        ));
    }
    let caps = match &token.capabilities {
        Some(granted) => {
            let extra: Vec<&str> = asked_caps
                .iter()
                .filter(|c| !granted.contains(c))
                .map(String::as_str)
                .collect();
            if !extra.is_empty() {
                return Err(format!(
                    "capabilities {} asked, but the token grants only [{}]",
                    extra.join(", "),
                    granted.join(", ")
                ));
            }
            granted.clone()
        }
        None => asked_caps,
    };
    let slots = match token.slots {
        Some(granted) if asked_slots > granted => {
            return Err(format!(
                "{asked_slots} slots asked, but the token grants {granted}"
            ));
        }
        Some(granted) => granted,
        None => asked_slots,
    };
    Ok((caps, slots))
}

/// Checks a hello against the identity's grant and the declared limits.
fn check_claim(id: &Identity, hello: &Hello) -> Result<(), String> {
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
fn bound_failure(mut f: Failure) -> Failure {
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
fn tail_utf8(s: String, max: usize) -> String {
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
fn bound_report(mut r: Report) -> Report {
    r.body = match r.body {
        ReportBody::Started { pid, session } => ReportBody::Started {
            pid,
            session: session.map(|s| truncate_utf8(s, limits::SESSION_BYTES_MAX)),
        },
        ReportBody::Progress { note } => ReportBody::Progress {
            note: truncate_utf8(note, limits::NOTE_BYTES_MAX),
        },
        ReportBody::Finished {
            outcome,
            result,
            error,
        } => ReportBody::Finished {
            outcome,
            result,
            error: error.map(bound_failure),
        },
        other => other,
    };
    r
}

/// Cuts a self-test's problem lines to the documented limits.
fn bound_self_test(t: &mut muster_wire::msg::SelfTest) {
    t.problems.truncate(limits::PROBLEMS_MAX);
    for p in &mut t.problems {
        *p = truncate_utf8(std::mem::take(p), limits::REASON_BYTES_MAX);
    }
}

/// The protocol version, re-exported for the shell's refusal messages.
pub const PROTOCOL: u32 = PROTOCOL_VERSION;

#[cfg(test)]
mod tests;
