//! One hub core, N sidecar cores, a network and a fleet of simulated agent runs,
//! driven by one event queue in virtual time.
//!
//! ```text
//!  queue (time, seq) ─▶ dispatch ─▶ hub core ─▶ commit (checks) ─▶ sends / replies / closes
//!                               └─▶ sidecar core ─▶ durable effects ─▶ sends / runs
//! ```

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use muster_hub::config::{Limits, Policy};
use muster_hub::core::{ConnId, Core as HubCore, Identity, Input, Reply, ReplyId, TaskState};
use muster_protocol::msg::{
    Failure, Heartbeat, Hello, HostFigures, HubMsg, OpRequest, OpResponse, Outcome, Phase, Role,
    SelfTest, SessionMsg, SidecarState, SubmitRequest, TaskSpec, TimeoutAction, Welcome,
};
use muster_protocol::{AgentName, Generation, ReportId, TaskId};
use muster_sidecar::agent::{RunEvent, RunHandle, RunMode};
use muster_sidecar::core::{AgentCmd, Core as SideCore, Effect, LocalTask};

use super::rng::Rng;
use super::store::HubStore;

/// Wall-clock start of every run, in milliseconds since the epoch.
const T0: u64 = 1_700_000_000_000;
/// The hub shell ticks this often.
const TICK_MS: u64 = 250;
/// The slowest one-way delivery on a connection.
const MAX_LAT: u64 = 1_500;
/// How long a welcomed sidecar may keep running an attempt the hub has moved on from:
/// the Abandon is in flight behind the Welcome or was sent when the attempt ended,
/// so it arrives within one delivery; plus the granularity of the check (one tick).
const ABANDON_BOUND: u64 = MAX_LAT + 2 * TICK_MS;
/// After every task is terminal, time allowed for sidecars to drain and forget.
const SETTLE_MS: u64 = 120_000;
/// The liveness phase may take this long (virtual time) before the run fails.
const HEAL_MAX_MS: u64 = 2 * 3_600_000;
/// Events kept for the failure trace.
const TRACE_LEN: usize = 60;
/// Capabilities some agents have and some tasks require.
const CAPS: [&str; 3] = ["gpu", "linux", "big"];
const ADMIN_FP: &str = "fp-admin";

/// What one run simulates.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) seed: u64,
    pub(crate) agents: usize,
    pub(crate) tasks: usize,
    /// Length of the fault phase, virtual ms; then faults stop and liveness is checked.
    pub(crate) fault_ms: u64,
    /// Events processed at most.
    pub(crate) max_steps: u64,
}

/// What a run did, for the report.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Summary {
    pub(crate) steps: u64,
    pub(crate) virtual_ms: u64,
    pub(crate) submitted: u64,
    pub(crate) acked: u64,
    pub(crate) completed: u64,
    pub(crate) failed: u64,
    pub(crate) cancelled: u64,
    pub(crate) requeued: u64,
    pub(crate) conn_breaks: u64,
    pub(crate) sidecar_crashes: u64,
    pub(crate) runs_survived: u64,
    pub(crate) hub_restarts: u64,
    pub(crate) clock_jumps: u64,
    pub(crate) dup_reports: u64,
    pub(crate) lost_messages: u64,
    pub(crate) runs: u64,
    pub(crate) plans: BTreeMap<&'static str, u64>,
    pub(crate) outcomes: BTreeMap<&'static str, u64>,
    /// Ticks at which two sidecars ran one task (allowed while the older one is unreachable).
    pub(crate) overlap_ticks: u64,
    pub(crate) digest: u64,
}

/// A failed run: what broke, where, and the events that led there.
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) seed: u64,
    pub(crate) step: u64,
    pub(crate) virtual_ms: u64,
    pub(crate) message: String,
    pub(crate) trace: Vec<String>,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "simulation failed: seed {} at step {} (virtual t={} ms)\n{}",
            self.seed, self.step, self.virtual_ms, self.message
        )?;
        writeln!(f, "last {} events (t ms, step, event):", self.trace.len())?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        write!(
            f,
            "reproduce: MUSTER_SIM_SEED={} cargo test -p muster-tests --test simulation -- --nocapture",
            self.seed
        )
    }
}

type Res = Result<(), String>;

/// Runs one seed to the end.
pub(crate) fn run(cfg: Config) -> Result<Summary, Failed> {
    let mut w = World::new(cfg);
    match w.main() {
        Ok(()) => Ok(w.summary()),
        Err(message) => Err(Failed {
            seed: w.cfg.seed,
            step: w.steps,
            virtual_ms: w.now,
            message,
            trace: w
                .trace
                .iter()
                .map(|(t, s, e)| {
                    let mut line = format!("{t:>9} #{s:<8} {e:?}");
                    line.truncate(400);
                    line
                })
                .collect(),
        }),
    }
}

// === Events ===

#[derive(Debug, Clone)]
enum Ev {
    Tick,
    ToHub {
        conn: ConnId,
        msg: ToHub,
    },
    /// The hub's shell notices a session ended.
    Closed {
        conn: ConnId,
        hub_inc: u64,
    },
    ToSide {
        agent: usize,
        conn: ConnId,
        msg: HubMsg,
    },
    Heartbeat {
        agent: usize,
        epoch: u64,
    },
    Connect {
        agent: usize,
        epoch: u64,
    },
    SideRestart {
        agent: usize,
    },
    HubRestart,
    Run {
        agent: usize,
        task: TaskId,
        generation: Generation,
        serial: u64,
        step: Step,
    },
    Submit,
    Op,
    Fault,
    /// Liveness phase: the operator cancels tasks that hang without a timeout.
    Sweep,
}

#[derive(Debug, Clone)]
enum ToHub {
    Hello(Hello),
    Msg(SessionMsg),
}

struct Item {
    t: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        (self.t, self.seq) == (o.t, o.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    fn cmp(&self, o: &Self) -> Ordering {
        // BinaryHeap is a max-heap: the earliest (time, seq) is the greatest.
        (o.t, o.seq).cmp(&(self.t, self.seq))
    }
}

// === Agent runs ===

/// What an agent run will do, drawn when the sidecar starts it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Plan {
    /// Starts and completes (exec exit 0, or `task complete` over the socket).
    Complete { via_agent: bool },
    /// The wake command fails.
    WakeFail,
    /// Woken but never verified; the sidecar's own start timeout may fire.
    NeverStart { sidecar_timeout: bool },
    /// Starts, then nothing: only a task timeout or a cancel ends it.
    Hang,
    /// Starts, then fails (exit status, or `task fail [--no-retry]`).
    Fail { via_agent: bool, no_retry: bool },
    /// Starts, then disappears without a report.
    Exit,
}

impl Plan {
    fn name(self) -> &'static str {
        match self {
            Plan::Complete { via_agent: false } => "complete_exec",
            Plan::Complete { via_agent: true } => "complete_agent",
            Plan::WakeFail => "wake_fail",
            Plan::NeverStart { .. } => "never_start",
            Plan::Hang => "hang",
            Plan::Fail { no_retry: true, .. } => "fail_no_retry",
            Plan::Fail { .. } => "fail",
            Plan::Exit => "exit",
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    Spawned,
    /// The runner verified the start.
    Started,
    /// The agent ran `task start`.
    AgentStart,
    Progress,
    /// The runner saw the run end.
    Finish(Outcome),
    AgentComplete,
    AgentFail {
        no_retry: bool,
    },
    /// A stop (cancel, abandon) took effect.
    Stopped,
    /// After a sidecar restart: the run is gone; this is what `recover` reports.
    Exited(Outcome),
}

/// One agent run: a process on the agent's machine, which may outlive its sidecar.
#[derive(Debug)]
struct Run {
    serial: u64,
    alive: bool,
    /// A live sidecar's runner watches it (false while the sidecar is down).
    watched: bool,
    started: bool,
    stopping: bool,
    forgotten: bool,
    /// The exit status left behind when it ended unwatched.
    exit: Option<Outcome>,
}

// === Sidecars ===

#[derive(Debug, Default)]
struct Durable {
    tasks: BTreeMap<TaskId, LocalTask>,
    outbox: BTreeMap<ReportId, muster_protocol::msg::Report>,
    next_report: u64,
}

struct Side {
    name: String,
    agent_name: AgentName,
    fp: String,
    caps: Vec<String>,
    slots: u32,
    core: Option<SideCore>,
    durable: Durable,
    conn: Option<ConnId>,
    welcomed: bool,
    /// Bumped on every (re)connect schedule, so stale timers do nothing.
    epoch: u64,
    interval: u64,
    hb_seq: u64,
}

#[derive(Debug, Clone)]
enum OpKind {
    Submit { key: Option<String> },
    Cancel,
    Requeue,
    Drain { name: String, drained: bool },
}

struct World {
    cfg: Config,
    rng: Rng,
    policy: Policy,
    ack_delay: u64,
    /// Per-seed scale of every fault rate.
    intensity: f64,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Item>,
    steps: u64,
    faults: bool,
    fault_end: u64,
    all_terminal_since: Option<u64>,
    // The hub.
    hub: Option<HubCore>,
    hub_inc: u64,
    skew: u64,
    hub_last: u64,
    store: HubStore,
    next_reply: u64,
    pending_ops: HashMap<u64, OpKind>,
    // The network.
    next_conn: u64,
    live: BTreeSet<ConnId>,
    conn_agent: HashMap<ConnId, usize>,
    fifo_hub: HashMap<ConnId, u64>,
    fifo_side: HashMap<ConnId, u64>,
    // The fleet.
    sides: Vec<Side>,
    runs: BTreeMap<(usize, TaskId, Generation), Run>,
    next_serial: u64,
    drained: BTreeSet<usize>,
    // Operators.
    submits_left: usize,
    acked: Vec<TaskId>,
    acked_set: BTreeSet<TaskId>,
    keys: BTreeMap<String, TaskId>,
    // Checks.
    zombies: HashMap<(usize, TaskId, Generation), u64>,
    trace: VecDeque<(u64, u64, Ev)>,
    stats: Summary,
}

impl World {
    fn new(cfg: Config) -> Self {
        let mut rng = Rng::new(cfg.seed);
        let policy = Policy {
            // Shorter breaker cooldowns and backoff cap than the defaults, so the
            // liveness phase stays short in virtual time; the mechanisms are the same.
            breaker_cooldown: Duration::from_secs(60),
            breaker_cooldown_max: Duration::from_secs(8 * 60),
            backoff_max: Duration::from_secs(3 * 60),
            ..Policy::default()
        };
        let ack_delay = if rng.chance(0.5) { 0 } else { 1000 };
        let intensity = 0.3 + 2.7 * rng.unit();
        let mut sides = Vec::with_capacity(cfg.agents);
        for i in 0..cfg.agents {
            let name = format!("agent-{i:03}");
            // The first agents offer every capability (twice, with six or more agents),
            // so every task can run somewhere; others get one now and then.
            let mut caps = Vec::new();
            if i < 2 * CAPS.len() {
                caps.push(CAPS[i % CAPS.len()].to_string());
            }
            if rng.chance(0.2) {
                caps.push(CAPS[rng.index(CAPS.len())].to_string());
            }
            caps.sort();
            caps.dedup();
            sides.push(Side {
                fp: format!("fp-{name}"),
                agent_name: AgentName::new(name.clone()).expect("agent-NNN is a valid name"),
                name,
                caps,
                slots: rng.range(1, 3) as u32,
                core: Some(SideCore::new(Vec::new(), Vec::new(), 1)),
                durable: Durable {
                    next_report: 1,
                    ..Durable::default()
                },
                conn: None,
                welcomed: false,
                epoch: 0,
                interval: 10_000,
                hb_seq: 0,
            });
        }
        let fault_end = cfg.fault_ms;
        World {
            submits_left: cfg.tasks,
            cfg,
            rng,
            policy,
            ack_delay,
            intensity,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            steps: 0,
            faults: true,
            fault_end,
            all_terminal_since: None,
            hub: None,
            hub_inc: 0,
            skew: 0,
            hub_last: T0,
            store: HubStore::default(),
            next_reply: 0,
            pending_ops: HashMap::new(),
            next_conn: 0,
            live: BTreeSet::new(),
            conn_agent: HashMap::new(),
            fifo_hub: HashMap::new(),
            fifo_side: HashMap::new(),
            sides,
            runs: BTreeMap::new(),
            next_serial: 0,
            drained: BTreeSet::new(),
            acked: Vec::new(),
            acked_set: BTreeSet::new(),
            keys: BTreeMap::new(),
            zombies: HashMap::new(),
            trace: VecDeque::with_capacity(TRACE_LEN + 1),
            stats: Summary::default(),
        }
    }

    fn summary(&self) -> Summary {
        let mut s = self.stats.clone();
        s.steps = self.steps;
        s.virtual_ms = self.now;
        s.acked = self.acked.len() as u64;
        for t in self.store.tasks.values() {
            match t.state {
                TaskState::Completed => s.completed += 1,
                TaskState::Failed => s.failed += 1,
                TaskState::Cancelled => s.cancelled += 1,
                _ => {}
            }
        }
        s.requeued = self.store.requeues.values().map(|n| u64::from(*n)).sum();
        for a in self.store.attempts.values() {
            if let Some(o) = a.outcome {
                *s.outcomes.entry(o.as_str()).or_default() += 1;
            }
        }
        s.digest = self.store.digest();
        s
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Item {
            t: at,
            seq: self.seq,
            ev,
        });
    }

    fn after(&mut self, delay: u64, ev: Ev) {
        self.push(self.now + delay, ev);
    }

    fn hub_now(&mut self) -> u64 {
        let t = (T0 + self.now + self.skew).max(self.hub_last);
        self.hub_last = t;
        t
    }

    // === The main loop ===

    fn main(&mut self) -> Res {
        self.start_hub()?;
        for i in 0..self.sides.len() {
            let fp = self.sides[i].fp.clone();
            let name = self.sides[i].name.clone();
            self.store.slots.insert(name.clone(), self.sides[i].slots);
            let grant = (self.sides[i].caps.clone(), self.sides[i].slots);
            self.add_identity(&name, Role::Agent, &fp, grant)?;
            let d = self.rng.below(2_000);
            self.schedule_connect(i, d);
        }
        self.add_identity("admin", Role::Admin, ADMIN_FP, (Vec::new(), 0))?;
        self.push(0, Ev::Tick);
        self.push(1_000, Ev::Fault);
        self.push(500, Ev::Op);
        for _ in 0..self.cfg.tasks {
            let at = self.rng.below(self.fault_end * 7 / 10);
            self.push(at, Ev::Submit);
        }
        loop {
            if self.steps >= self.cfg.max_steps {
                return Err(self.liveness_failure(&format!(
                    "the run did not finish within {} steps",
                    self.cfg.max_steps
                )));
            }
            let Some(item) = self.queue.pop() else {
                return Err("the event queue ran dry".into());
            };
            if self.faults && item.t >= self.fault_end {
                self.queue.push(item);
                self.now = self.fault_end;
                self.heal()?;
                continue;
            }
            self.now = item.t;
            self.steps += 1;
            if self.trace.len() == TRACE_LEN {
                self.trace.pop_front();
            }
            self.trace
                .push_back((self.now, self.steps, item.ev.clone()));
            let tick = matches!(item.ev, Ev::Tick);
            self.dispatch(item.ev)?;
            if tick && !self.faults && self.finished()? {
                return Ok(());
            }
        }
    }

    fn dispatch(&mut self, ev: Ev) -> Res {
        match ev {
            Ev::Tick => {
                if self.hub.is_some() {
                    self.hub_input(Input::Tick)?;
                    self.check_fleet()?;
                }
                self.after(TICK_MS, Ev::Tick);
            }
            Ev::ToHub { conn, msg } => {
                if self.hub.is_none() || !self.live.contains(&conn) {
                    self.stats.lost_messages += 1;
                    return Ok(());
                }
                let input = match msg {
                    ToHub::Hello(hello) => {
                        let agent = self.conn_agent.get(&conn).copied().unwrap_or(0);
                        Input::Hello {
                            conn,
                            fingerprint: self.sides[agent].fp.clone(),
                            hello,
                        }
                    }
                    ToHub::Msg(msg) => Input::Session { conn, msg },
                };
                self.hub_input(input)?;
            }
            Ev::Closed { conn, hub_inc } => {
                if self.hub.is_some() && hub_inc == self.hub_inc {
                    self.hub_input(Input::Closed { conn })?;
                }
            }
            Ev::ToSide { agent, conn, msg } => self.deliver_to_side(agent, conn, msg)?,
            Ev::Heartbeat { agent, epoch } => {
                let s = &self.sides[agent];
                if s.epoch == epoch && s.welcomed {
                    self.heartbeat(agent);
                    let next = self.jittered(self.sides[agent].interval);
                    self.after(next, Ev::Heartbeat { agent, epoch });
                }
            }
            Ev::Connect { agent, epoch } => self.connect(agent, epoch),
            Ev::SideRestart { agent } => self.side_restart(agent)?,
            Ev::HubRestart => self.start_hub()?,
            Ev::Run {
                agent,
                task,
                generation,
                serial,
                step,
            } => self.run_step(agent, task, generation, serial, step)?,
            Ev::Submit => self.submit()?,
            Ev::Op => {
                if self.faults {
                    self.random_op()?;
                    let d = self.rng.range(500, 8_000);
                    self.after(d, Ev::Op);
                }
            }
            Ev::Fault => {
                if self.faults {
                    self.inject_faults()?;
                    self.after(1_000, Ev::Fault);
                }
            }
            Ev::Sweep => {
                self.sweep_hung()?;
                self.after(30_000, Ev::Sweep);
            }
        }
        Ok(())
    }

    // === The hub ===

    fn start_hub(&mut self) -> Res {
        let now = self.hub_now();
        let seed = self.rng.next_u64();
        let restored = self.store.restored();
        let mut core = HubCore::new(self.policy.clone(), Limits::default(), restored, now, seed);
        core.set_ack_delay(self.ack_delay);
        if core.live_tasks() != self.store.live.len() {
            return Err(format!(
                "a restarted hub holds {} live tasks but the store has {}",
                core.live_tasks(),
                self.store.live.len()
            ));
        }
        if let Some(id) = self
            .acked
            .iter()
            .find(|id| !self.store.tasks.contains_key(id))
        {
            return Err(format!(
                "task {id} was acknowledged to its submitter but is not in the store after a restart"
            ));
        }
        self.hub = Some(core);
        self.hub_inc += 1;
        Ok(())
    }

    fn crash_hub(&mut self) {
        self.hub = None;
        self.hub_inc += 1;
        self.stats.hub_restarts += 1;
        self.pending_ops.clear();
        let conns: Vec<ConnId> = self.live.iter().copied().collect();
        for c in conns {
            self.close_conn(c, 0);
        }
        let d = self.rng.range(1_000, 20_000);
        self.after(d, Ev::HubRestart);
    }

    fn add_identity(
        &mut self,
        name: &str,
        role: Role,
        fp: &str,
        (capabilities, slots): (Vec<String>, u32),
    ) -> Res {
        let Some(core) = self.hub.as_mut() else {
            return Err("no hub".into());
        };
        core.add_identity(Identity {
            name: name.into(),
            role,
            fingerprint: fp.into(),
            key_fingerprint: format!("key-{fp}"),
            created_at: T0,
            revoked_at: None,
            capabilities,
            slots,
        });
        let out = core.take_output();
        self.store.commit(&out.writes)
    }

    /// One input: handle, commit (with the checks), then deliver.
    fn hub_input(&mut self, input: Input) -> Res {
        let now = self.hub_now();
        let Some(core) = self.hub.as_mut() else {
            return Ok(());
        };
        core.handle(now, input, &self.store);
        let out = core.take_output();
        self.store.commit(&out.writes)?;
        for (conn, msg) in out.sends {
            if let Some(&agent) = self.conn_agent.get(&conn) {
                let name = self.sides[agent].name.clone();
                self.store.check_send(&name, &msg)?;
            }
            self.send_to_side(conn, msg);
        }
        for (id, reply) in out.replies {
            self.on_reply(id, reply)?;
        }
        for conn in out.closes {
            let d = self.rng.range(1, 100);
            self.close_conn(conn, d);
        }
        Ok(())
    }

    fn op(&mut self, request: OpRequest, kind: OpKind) -> Res {
        if self.hub.is_none() {
            return Ok(());
        }
        self.next_reply += 1;
        self.pending_ops.insert(self.next_reply, kind);
        self.hub_input(Input::Op {
            fingerprint: ADMIN_FP.into(),
            request,
            reply: ReplyId(self.next_reply),
            token_secret: None,
        })
    }

    fn on_reply(&mut self, id: ReplyId, reply: Reply) -> Res {
        let Some(kind) = self.pending_ops.remove(&id.0) else {
            return Err(format!("a reply to unknown request {}", id.0));
        };
        let Reply::Op(resp) = reply else {
            return Err("an enrollment reply to an operator request".into());
        };
        let OpResponse::Ok { json } = resp else {
            return Ok(());
        };
        match kind {
            OpKind::Submit { key } => {
                let v: serde_json::Value =
                    serde_json::from_str(&json).map_err(|e| format!("submit reply: {e}"))?;
                let Some(tid) = v.get("id").and_then(serde_json::Value::as_u64) else {
                    return Err(format!("submit reply without an id: {json}"));
                };
                let tid = TaskId(tid);
                if !self.store.tasks.contains_key(&tid) {
                    return Err(format!(
                        "submit of task {tid} acknowledged before it was committed"
                    ));
                }
                let existing = v.get("existing").is_some();
                if let Some(k) = key {
                    match self.keys.get(&k) {
                        Some(prev) if *prev != tid => {
                            return Err(format!(
                                "key {k:?} returned task {tid}, but it was task {prev} before"
                            ));
                        }
                        None if existing => {
                            return Err(format!(
                                "key {k:?} returned an existing task {tid} never acknowledged before"
                            ));
                        }
                        _ => {
                            self.keys.insert(k, tid);
                        }
                    }
                }
                if self.acked_set.insert(tid) {
                    self.acked.push(tid);
                }
            }
            OpKind::Drain { name, drained } => {
                if let Some(i) = self.sides.iter().position(|s| s.name == name) {
                    if drained {
                        self.drained.insert(i);
                    } else {
                        self.drained.remove(&i);
                    }
                }
            }
            OpKind::Cancel | OpKind::Requeue => {}
        }
        Ok(())
    }

    // === The network ===

    fn latency(&mut self) -> u64 {
        if self.rng.chance(0.9) {
            self.rng.range(1, 50)
        } else {
            self.rng.range(50, MAX_LAT)
        }
    }

    fn send_to_hub(&mut self, conn: ConnId, msg: ToHub) {
        if !self.live.contains(&conn) {
            return;
        }
        let lat = self.latency();
        let last = self.fifo_hub.get(&conn).copied().unwrap_or(0);
        let at = (self.now + lat).max(last);
        self.fifo_hub.insert(conn, at);
        self.push(at, Ev::ToHub { conn, msg });
    }

    fn send_to_side(&mut self, conn: ConnId, msg: HubMsg) {
        if !self.live.contains(&conn) {
            return;
        }
        let Some(&agent) = self.conn_agent.get(&conn) else {
            return;
        };
        let lat = self.latency();
        let last = self.fifo_side.get(&conn).copied().unwrap_or(0);
        let at = (self.now + lat).max(last);
        self.fifo_side.insert(conn, at);
        self.push(at, Ev::ToSide { agent, conn, msg });
    }

    /// The connection is gone both ways: what is in flight is lost; the hub's
    /// shell notices after `closed_after`; the sidecar reconnects after a backoff.
    fn close_conn(&mut self, conn: ConnId, closed_after: u64) {
        if !self.live.remove(&conn) {
            return;
        }
        self.fifo_hub.remove(&conn);
        self.fifo_side.remove(&conn);
        if let Some(&agent) = self.conn_agent.get(&conn)
            && self.sides[agent].conn == Some(conn)
        {
            let s = &mut self.sides[agent];
            s.conn = None;
            s.welcomed = false;
            if s.core.is_some() {
                let d = self.rng.range(200, 10_000);
                self.schedule_connect(agent, d);
            }
        }
        if self.hub.is_some() {
            let hub_inc = self.hub_inc;
            self.after(closed_after, Ev::Closed { conn, hub_inc });
        }
    }

    fn schedule_connect(&mut self, agent: usize, delay: u64) {
        self.sides[agent].epoch += 1;
        let epoch = self.sides[agent].epoch;
        self.after(delay, Ev::Connect { agent, epoch });
    }

    fn connect(&mut self, agent: usize, epoch: u64) {
        let s = &self.sides[agent];
        if s.epoch != epoch || s.core.is_none() || s.conn.is_some() {
            return;
        }
        if self.hub.is_none() {
            let d = self.rng.range(1_000, 5_000);
            self.schedule_connect(agent, d);
            return;
        }
        self.next_conn += 1;
        let conn = ConnId(self.next_conn);
        self.live.insert(conn);
        self.conn_agent.insert(conn, agent);
        let s = &mut self.sides[agent];
        s.conn = Some(conn);
        s.welcomed = false;
        let Some(core) = &s.core else { return };
        let hello = Hello {
            version: "sim".into(),
            agent: s.agent_name.clone(),
            capabilities: s.caps.clone(),
            slots: s.slots,
            resume: core.held(),
        };
        self.send_to_hub(conn, ToHub::Hello(hello));
    }

    fn deliver_to_side(&mut self, agent: usize, conn: ConnId, msg: HubMsg) -> Res {
        let s = &self.sides[agent];
        if !self.live.contains(&conn) || s.conn != Some(conn) || s.core.is_none() {
            self.stats.lost_messages += 1;
            return Ok(());
        }
        match msg {
            HubMsg::Welcome(w) => self.welcome(agent, &w),
            HubMsg::Refused(r) => Err(format!("the hub refused {}: {r}", s.name)),
            msg => {
                if let Some(core) = self.sides[agent].core.as_mut() {
                    core.handle_hub(msg);
                }
                self.side_effects(agent)
            }
        }
    }

    /// As the daemon does on `Connected`: replay the outbox, heartbeat at once.
    fn welcome(&mut self, agent: usize, w: &Welcome) -> Res {
        let s = &mut self.sides[agent];
        s.welcomed = true;
        s.interval = w.heartbeat_interval_ms.max(100);
        let Some(core) = s.core.as_mut() else {
            return Ok(());
        };
        core.set_max_result_bytes(w.limits.max_result_bytes as usize);
        let replay: Vec<SessionMsg> = core.outbox().cloned().map(SessionMsg::Report).collect();
        for m in replay {
            self.side_send(agent, m);
        }
        self.heartbeat(agent);
        let epoch = self.sides[agent].epoch;
        let next = self.jittered(self.sides[agent].interval);
        self.after(next, Ev::Heartbeat { agent, epoch });
        Ok(())
    }

    fn jittered(&mut self, interval: u64) -> u64 {
        let lo = interval * 9 / 10;
        self.rng.range(lo, interval * 11 / 10)
    }

    fn heartbeat(&mut self, agent: usize) {
        let s = &mut self.sides[agent];
        let Some(core) = &s.core else { return };
        s.hb_seq += 1;
        let hb = Heartbeat {
            seq: s.hb_seq,
            state: SidecarState::Ready,
            tasks: core.held(),
            free_slots: s.slots.saturating_sub(core.busy() as u32),
            self_test: SelfTest {
                passed: true,
                hub_rtt_us: Some(1_000),
                command_ok: true,
                disk_ok: true,
                problems: Vec::new(),
            },
            host: HostFigures::default(),
        };
        self.side_send(agent, SessionMsg::Heartbeat(hb));
    }

    /// A sidecar sends on its session (dropped when not connected, as the daemon does);
    /// in the fault phase a report is sometimes delivered twice.
    fn side_send(&mut self, agent: usize, msg: SessionMsg) {
        let s = &self.sides[agent];
        let Some(conn) = s.conn.filter(|_| s.welcomed) else {
            return;
        };
        let dup = self.faults
            && matches!(msg, SessionMsg::Report(_))
            && self.rng.chance(0.03 * self.intensity);
        if dup {
            self.stats.dup_reports += 1;
            self.send_to_hub(conn, ToHub::Msg(msg.clone()));
        }
        self.send_to_hub(conn, ToHub::Msg(msg));
    }

    // === Sidecars ===

    /// Applies the durable effects first, then the others in order (commit before send).
    fn side_effects(&mut self, agent: usize) -> Res {
        let Some(core) = self.sides[agent].core.as_mut() else {
            return Ok(());
        };
        let effects = core.take_effects();
        let d = &mut self.sides[agent].durable;
        for e in &effects {
            match e {
                Effect::PutTask(t) => {
                    d.tasks.insert(t.task, t.clone());
                }
                Effect::DeleteTask(id, _) => {
                    d.tasks.remove(id);
                }
                Effect::PutReport(r) => {
                    d.outbox.insert(r.id, r.clone());
                }
                Effect::DeleteReport(id) => {
                    d.outbox.remove(id);
                }
                Effect::NextReport(n) => d.next_report = *n,
                _ => {}
            }
        }
        for e in effects {
            match e {
                Effect::Send(m) => self.side_send(agent, m),
                Effect::StartRun(task, generation, spec) => {
                    self.run_start(agent, task, generation, &spec);
                }
                Effect::StopRun(task, generation) => self.run_stop(agent, task, generation),
                Effect::ForgetRun(task, generation) => {
                    if let Some(r) = self.runs.get_mut(&(agent, task, generation)) {
                        r.forgotten = true;
                        r.alive = false;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The sidecar process dies: its memory and session go; its durable state and
    /// (some of) the agent runs it started stay.
    fn crash_side(&mut self, agent: usize) {
        self.stats.sidecar_crashes += 1;
        self.sides[agent].core = None;
        self.sides[agent].welcomed = false;
        if let Some(c) = self.sides[agent].conn {
            let d = self.rng.range(0, 20_000);
            self.close_conn(c, d);
        }
        self.sides[agent].conn = None;
        let lo = (agent, TaskId(0), Generation(0));
        let hi = (agent + 1, TaskId(0), Generation(0));
        let durable = &self.sides[agent].durable;
        for ((_, task, generation), run) in self.runs.range_mut(lo..hi) {
            run.watched = false;
            if run.forgotten || !run.alive {
                continue;
            }
            let spawned = durable
                .tasks
                .get(task)
                .is_some_and(|t| t.generation == *generation && t.handle.is_some());
            if run.stopping {
                run.alive = false;
                run.exit = Some(Outcome::Cancelled);
            } else if spawned && self.rng.chance(0.6) {
                self.stats.runs_survived += 1;
            } else {
                run.alive = false;
                run.exit = None;
            }
        }
        let d = self.rng.range(500, 30_000);
        self.after(d, Ev::SideRestart { agent });
    }

    /// As `sidecar::daemon::run` at startup: load the queue, recover runs, connect.
    fn side_restart(&mut self, agent: usize) -> Res {
        let d = &self.sides[agent].durable;
        let tasks: Vec<LocalTask> = d.tasks.values().cloned().collect();
        let core = SideCore::new(
            tasks.clone(),
            d.outbox.values().cloned().collect(),
            d.next_report,
        );
        self.sides[agent].core = Some(core);
        for t in tasks {
            if t.phase == Phase::Finished {
                continue;
            }
            let key = (agent, t.task, t.generation);
            if t.handle.is_none() {
                // Accepted but the spawn was never recorded: start it (at least once).
                self.run_start(agent, t.task, t.generation, &t.spec);
                continue;
            }
            let delay = self.rng.range(10, 300);
            let serial = match self.runs.get_mut(&key) {
                Some(run) if !run.forgotten => {
                    run.watched = true;
                    if run.alive {
                        run.started.then_some((run.serial, Step::Started))
                    } else {
                        let o = run.exit.unwrap_or(Outcome::AgentExited);
                        Some((run.serial, Step::Exited(o)))
                    }
                }
                _ => {
                    self.next_serial += 1;
                    let serial = self.next_serial;
                    self.runs.insert(
                        key,
                        Run {
                            serial,
                            alive: false,
                            watched: true,
                            started: false,
                            stopping: false,
                            forgotten: false,
                            exit: None,
                        },
                    );
                    Some((serial, Step::Exited(Outcome::AgentExited)))
                }
            };
            if let Some((serial, step)) = serial {
                self.after(
                    delay,
                    Ev::Run {
                        agent,
                        task: t.task,
                        generation: t.generation,
                        serial,
                        step,
                    },
                );
            }
        }
        self.side_effects(agent)?;
        let d = self.rng.range(0, 500);
        self.schedule_connect(agent, d);
        Ok(())
    }

    // === The simulated runner ===

    fn choose_plan(&mut self) -> Plan {
        let via_agent = self.rng.chance(0.5);
        if !self.faults {
            return Plan::Complete { via_agent };
        }
        let p = self.intensity / 1.5;
        let r = self.rng.unit();
        let mut acc = 0.0;
        let table = [
            (0.05 * p, Plan::WakeFail),
            (
                0.04 * p,
                Plan::NeverStart {
                    sidecar_timeout: via_agent,
                },
            ),
            (0.03 * p, Plan::Hang),
            (
                0.06 * p,
                Plan::Fail {
                    via_agent,
                    no_retry: self.rng.chance(0.3),
                },
            ),
            (0.04 * p, Plan::Exit),
        ];
        for (w, plan) in table {
            acc += w;
            if r < acc {
                return plan;
            }
        }
        Plan::Complete { via_agent }
    }

    fn run_start(&mut self, agent: usize, task: TaskId, generation: Generation, spec: &TaskSpec) {
        let key = (agent, task, generation);
        if let Some(old) = self.runs.get_mut(&key) {
            // A start "at least once" after a restart: the old process is presumed gone.
            old.alive = false;
            old.watched = false;
        }
        let plan = self.choose_plan();
        self.stats.runs += 1;
        *self.stats.plans.entry(plan.name()).or_default() += 1;
        self.next_serial += 1;
        let serial = self.next_serial;
        self.runs.insert(
            key,
            Run {
                serial,
                alive: true,
                watched: true,
                started: false,
                stopping: false,
                forgotten: false,
                exit: None,
            },
        );
        let mut steps = Vec::new();
        let spawned = self.now + self.rng.range(10, 500);
        let started = spawned + self.rng.range(100, 3_000);
        let long = spec.timeout_ms.is_some() && self.rng.chance(0.15);
        let ends = started
            + if long {
                self.rng.range(60_000, 240_000)
            } else {
                self.rng.range(1_000, 40_000)
            };
        let start_step = if self.rng.chance(0.5) {
            Step::Started
        } else {
            Step::AgentStart
        };
        match plan {
            Plan::WakeFail => steps.push((spawned, Step::Finish(Outcome::WakeFailed))),
            Plan::NeverStart { sidecar_timeout } => {
                steps.push((spawned, Step::Spawned));
                if sidecar_timeout {
                    steps.push((spawned + 60_000, Step::Finish(Outcome::StartTimeout)));
                }
            }
            Plan::Hang => {
                steps.push((spawned, Step::Spawned));
                steps.push((started, start_step));
            }
            Plan::Complete { via_agent } => {
                steps.push((spawned, Step::Spawned));
                steps.push((started, start_step));
                if self.rng.chance(0.3) {
                    steps.push(((started + ends) / 2, Step::Progress));
                }
                steps.push((
                    ends,
                    if via_agent {
                        Step::AgentComplete
                    } else {
                        Step::Finish(Outcome::Completed)
                    },
                ));
            }
            Plan::Fail {
                via_agent,
                no_retry,
            } => {
                steps.push((spawned, Step::Spawned));
                steps.push((started, start_step));
                steps.push((
                    ends,
                    if via_agent {
                        Step::AgentFail { no_retry }
                    } else {
                        Step::Finish(Outcome::Failed)
                    },
                ));
            }
            Plan::Exit => {
                steps.push((spawned, Step::Spawned));
                steps.push((started, start_step));
                steps.push((ends, Step::Finish(Outcome::AgentExited)));
            }
        }
        for (at, step) in steps {
            self.push(
                at,
                Ev::Run {
                    agent,
                    task,
                    generation,
                    serial,
                    step,
                },
            );
        }
    }

    fn run_stop(&mut self, agent: usize, task: TaskId, generation: Generation) {
        let Some(run) = self.runs.get_mut(&(agent, task, generation)) else {
            return;
        };
        if !run.alive || run.stopping || run.forgotten {
            return;
        }
        run.stopping = true;
        let serial = run.serial;
        let d = self.rng.range(10, 3_000);
        self.after(
            d,
            Ev::Run {
                agent,
                task,
                generation,
                serial,
                step: Step::Stopped,
            },
        );
    }

    fn run_step(
        &mut self,
        agent: usize,
        task: TaskId,
        generation: Generation,
        serial: u64,
        step: Step,
    ) -> Res {
        let Some(run) = self.runs.get_mut(&(agent, task, generation)) else {
            return Ok(());
        };
        if run.serial != serial || run.forgotten {
            return Ok(());
        }
        let failure = |reason: &str| Failure {
            reason: reason.into(),
            ..Failure::default()
        };
        let finished = |outcome: Outcome, error: Option<Failure>| RunEvent::Finished {
            task,
            generation,
            outcome,
            result: (outcome == Outcome::Completed).then(|| "done".to_string()),
            error,
        };
        enum To {
            Run(RunEvent),
            Agent(AgentCmd),
        }
        let to = match step {
            Step::Stopped => {
                if !run.stopping || !run.alive {
                    return Ok(());
                }
                run.alive = false;
                if !run.watched {
                    return Ok(());
                }
                To::Run(finished(Outcome::Cancelled, Some(failure("stopped"))))
            }
            Step::Exited(o) => {
                if !run.watched {
                    return Ok(());
                }
                let err = (o != Outcome::Completed).then(|| failure("gone after a restart"));
                To::Run(finished(o, err))
            }
            _ if !run.alive || run.stopping => return Ok(()),
            step if !run.watched => {
                // The sidecar is down: the process carries on and leaves an exit status.
                match step {
                    Step::Started | Step::AgentStart => run.started = true,
                    Step::Finish(o) => {
                        run.alive = false;
                        run.exit = Some(o);
                    }
                    Step::AgentComplete => {
                        run.alive = false;
                        run.exit = Some(Outcome::Completed);
                    }
                    Step::AgentFail { .. } => {
                        run.alive = false;
                        run.exit = Some(Outcome::Failed);
                    }
                    _ => {}
                }
                return Ok(());
            }
            Step::Spawned => To::Run(RunEvent::Spawned {
                task,
                generation,
                handle: RunHandle {
                    pid: Some(serial as u32),
                    session: None,
                    run_dir: PathBuf::from(format!("/sim/{agent}/{task}-{generation}")),
                    mode: RunMode::Exec,
                    start_ticks: None,
                },
            }),
            Step::Started => {
                run.started = true;
                To::Run(RunEvent::Started {
                    task,
                    generation,
                    pid: Some(serial as u32),
                    session: None,
                })
            }
            Step::AgentStart => {
                run.started = true;
                To::Agent(AgentCmd::Start)
            }
            Step::Progress => To::Agent(AgentCmd::Progress {
                message: "half way".into(),
            }),
            Step::Finish(o) => {
                run.alive = false;
                let err = (o != Outcome::Completed).then(|| failure(o.as_str()));
                To::Run(finished(o, err))
            }
            Step::AgentComplete => {
                run.alive = false;
                To::Agent(AgentCmd::Complete {
                    result: Some("done".into()),
                })
            }
            Step::AgentFail { no_retry } => {
                run.alive = false;
                To::Agent(AgentCmd::Fail {
                    reason: "the agent gave up".into(),
                    no_retry,
                })
            }
        };
        let Some(core) = self.sides[agent].core.as_mut() else {
            return Ok(());
        };
        match to {
            To::Run(ev) => core.handle_run(ev),
            To::Agent(cmd) => {
                // A refusal (stale generation, already ended) is what the agent would print.
                let _ = core.handle_agent(task, generation, cmd);
            }
        }
        self.side_effects(agent)
    }

    // === Operators ===

    fn submit(&mut self) -> Res {
        if self.submits_left == 0 {
            return Ok(());
        }
        self.submits_left -= 1;
        self.stats.submitted += 1;
        let n = self.stats.submitted;
        let rng = &mut self.rng;
        let mut capabilities = Vec::new();
        if rng.chance(0.25) {
            capabilities.push(CAPS[rng.index(CAPS.len())].to_string());
        }
        let mut after = Vec::new();
        if !self.acked.is_empty() && rng.chance(0.15) {
            let from = self.acked.len().saturating_sub(50);
            for _ in 0..rng.range(1, 2) {
                let i = from + rng.index(self.acked.len() - from);
                after.push(self.acked[i]);
            }
            after.sort();
            after.dedup();
        }
        let key = if rng.chance(0.2) {
            if !self.keys.is_empty() && rng.chance(0.3) {
                let i = rng.index(self.keys.len());
                self.keys.keys().nth(i).cloned()
            } else {
                Some(format!("key-{n}"))
            }
        } else {
            None
        };
        let timeout_ms = rng.chance(0.2).then(|| rng.range(15_000, 120_000));
        let req = SubmitRequest {
            title: format!("task {n}"),
            description: "simulated work".into(),
            capabilities,
            priority: rng.range(0, 4) as i32 - 2,
            max_attempts: rng.chance(0.2).then(|| rng.range(1, 5) as u32),
            timeout_ms,
            timeout_action: if rng.chance(0.5) {
                TimeoutAction::Retry
            } else {
                TimeoutAction::Fail
            },
            after,
            key: key.clone(),
        };
        self.op(OpRequest::Submit(req), OpKind::Submit { key })
    }

    fn random_op(&mut self) -> Res {
        let r = self.rng.below(100);
        if r < 40 {
            if let Some(id) = self.random_acked() {
                self.op(OpRequest::TaskCancel { id }, OpKind::Cancel)?;
            }
        } else if r < 60 {
            if let Some(id) = self.random_acked() {
                self.op(OpRequest::TaskRequeue { id }, OpKind::Requeue)?;
            }
        } else if r < 80 {
            if self.drained.len() * 5 < self.sides.len() {
                let i = self.rng.index(self.sides.len());
                let name = self.sides[i].name.clone();
                self.op(
                    OpRequest::AgentDrain { name: name.clone() },
                    OpKind::Drain {
                        name,
                        drained: true,
                    },
                )?;
            }
        } else if let Some(&i) = self
            .drained
            .iter()
            .nth(self.rng.index(self.drained.len().max(1)))
        {
            self.undrain(i)?;
        }
        Ok(())
    }

    fn undrain(&mut self, i: usize) -> Res {
        let name = self.sides[i].name.clone();
        self.op(
            OpRequest::AgentUndrain { name: name.clone() },
            OpKind::Drain {
                name,
                drained: false,
            },
        )
    }

    fn random_acked(&mut self) -> Option<TaskId> {
        if self.acked.is_empty() {
            return None;
        }
        let i = self.rng.index(self.acked.len());
        Some(self.acked[i])
    }

    /// Liveness phase: drained agents come back (an undrain sent while the hub was
    /// down never arrived), and hung runs of tasks without a timeout need an operator.
    fn sweep_hung(&mut self) -> Res {
        let drained: Vec<usize> = self.drained.iter().copied().collect();
        for i in drained {
            self.undrain(i)?;
        }
        let hub_now = self.hub_now();
        let hung: Vec<TaskId> = self
            .store
            .live
            .iter()
            .filter_map(|id| self.store.tasks.get(id))
            .filter(|t| t.state == TaskState::Running && t.timeout_ms.is_none())
            .filter(|t| {
                self.store
                    .attempts
                    .get(&(t.id, t.generation))
                    .and_then(|a| a.started_at)
                    .is_some_and(|s| s + 10 * 60_000 < hub_now)
            })
            .map(|t| t.id)
            .collect();
        for id in hung {
            self.op(OpRequest::TaskCancel { id }, OpKind::Cancel)?;
        }
        Ok(())
    }

    // === Faults ===

    fn inject_faults(&mut self) -> Res {
        let n = self.sides.len() as f64;
        let k = self.intensity;
        for _ in 0..self.rng.count(n * k / 400.0) {
            let i = self.rng.index(self.sides.len());
            if let Some(c) = self.sides[i].conn {
                self.stats.conn_breaks += 1;
                let d = self.rng.range(0, 20_000);
                self.close_conn(c, d);
            }
        }
        for _ in 0..self.rng.count(n * k / 1_200.0) {
            let i = self.rng.index(self.sides.len());
            if self.sides[i].core.is_some() {
                self.crash_side(i);
            }
        }
        if self.hub.is_some() && self.rng.chance(k / 300.0) {
            self.crash_hub();
        }
        if self.rng.chance(k / 200.0) {
            self.stats.clock_jumps += 1;
            self.skew += self.rng.range(1_000, 180_000);
        }
        Ok(())
    }

    /// Ends the fault phase: faults stop, drained agents come back, hung tasks get swept.
    fn heal(&mut self) -> Res {
        self.faults = false;
        let drained: Vec<usize> = self.drained.iter().copied().collect();
        for i in drained {
            self.undrain(i)?;
        }
        self.after(30_000, Ev::Sweep);
        Ok(())
    }

    // === Checks ===

    /// Every tick: what the sidecars run against what the hub committed.
    ///
    /// A sidecar that is connected (welcomed) and holds an attempt in a non-finished
    /// phase that is not the hub's live attempt of that task on that agent is a
    /// *zombie*. The hub sent its Abandon (or Cancel) when the attempt ended, or sends
    /// it right behind the Welcome when the sidecar reconnects, so a zombie must be
    /// gone within [`ABANDON_BOUND`] of being seen on a connected sidecar. A sidecar
    /// that cannot be reached (disconnected, crashed) may keep running it: that is
    /// the window the lost grace and reconciliation exist for.
    ///
    /// One generation on two sidecars at once is never allowed.
    fn check_fleet(&mut self) -> Res {
        let now = self.now;
        let mut seen = BTreeSet::new();
        let mut running: BTreeMap<TaskId, Vec<(usize, Generation)>> = BTreeMap::new();
        for (i, s) in self.sides.iter().enumerate() {
            let Some(core) = &s.core else { continue };
            for t in core.tasks() {
                if t.phase == Phase::Finished {
                    continue;
                }
                if t.phase == Phase::Running {
                    running.entry(t.task).or_default().push((i, t.generation));
                }
                if !s.welcomed {
                    continue;
                }
                let current = self.store.tasks.get(&t.task).is_some_and(|r| {
                    r.state.has_live_attempt()
                        && r.generation == t.generation
                        && r.agent.as_deref() == Some(s.name.as_str())
                });
                if current {
                    continue;
                }
                let key = (i, t.task, t.generation);
                seen.insert(key);
                let since = *self.zombies.entry(key).or_insert(now);
                if now - since > ABANDON_BOUND {
                    return Err(format!(
                        "{} is connected and still runs {}/{} ({:?}) {} ms after the hub moved on from it; hub: {}",
                        s.name,
                        t.task,
                        t.generation,
                        t.phase,
                        now - since,
                        self.store.describe(t.task)
                    ));
                }
            }
        }
        self.zombies.retain(|k, _| seen.contains(k));
        for (task, holders) in running {
            if holders.len() < 2 {
                continue;
            }
            self.stats.overlap_ticks += 1;
            let gens: BTreeSet<Generation> = holders.iter().map(|h| h.1).collect();
            if gens.len() < holders.len() {
                return Err(format!(
                    "task {task}: one generation runs on two sidecars: {holders:?}"
                ));
            }
        }
        Ok(())
    }

    /// Liveness: once every task is terminal, let the fleet settle, then check it is quiet.
    fn finished(&mut self) -> Result<bool, String> {
        if self.now > self.fault_end + HEAL_MAX_MS {
            return Err(self.liveness_failure(&format!(
                "tasks still live {} virtual minutes after the faults stopped",
                HEAL_MAX_MS / 60_000
            )));
        }
        let idle = self.hub.is_some() && self.submits_left == 0 && self.store.live.is_empty();
        if !idle {
            self.all_terminal_since = None;
            return Ok(false);
        }
        let since = *self.all_terminal_since.get_or_insert(self.now);
        if self.now < since + SETTLE_MS {
            return Ok(false);
        }
        for id in &self.acked {
            match self.store.tasks.get(id) {
                Some(t) if t.state.is_terminal() => {}
                _ => return Err(format!("acknowledged {}", self.store.describe(*id))),
            }
        }
        self.store.check_attempts_recorded()?;
        for s in &self.sides {
            let Some(core) = &s.core else {
                return Err(format!("{} is still down at the end", s.name));
            };
            if !s.welcomed {
                return Err(format!("{} is not connected at the end", s.name));
            }
            if let Some(t) = core.tasks().find(|t| t.phase != Phase::Finished) {
                return Err(format!(
                    "{} still holds {}/{} in phase {:?} after every task ended",
                    s.name, t.task, t.generation, t.phase
                ));
            }
            if let Some(r) = core.outbox().next() {
                return Err(format!(
                    "{} still has report {} ({}/{} {:?}) unacknowledged at the end",
                    s.name,
                    r.id,
                    r.task,
                    r.generation,
                    r.body.kind()
                ));
            }
        }
        if let Some(((a, t, g), _)) = self.runs.iter().find(|(_, r)| r.alive && !r.forgotten) {
            return Err(format!(
                "the run of {t}/{g} on {} is still alive after every task ended",
                self.sides[*a].name
            ));
        }
        Ok(true)
    }

    fn liveness_failure(&self, why: &str) -> String {
        let mut msg = format!(
            "liveness: {why}; {} tasks live (faults stopped at t={} ms):",
            self.store.live.len(),
            self.fault_end
        );
        for id in self.store.live.iter().take(20) {
            msg.push_str("\n  ");
            msg.push_str(&self.store.describe(*id));
            if let Some(t) = self.store.tasks.get(id) {
                for dep in &t.after {
                    msg.push_str("\n    dependency ");
                    msg.push_str(&self.store.describe(*dep));
                    let requeues = self.store.requeues.get(dep).copied().unwrap_or(0);
                    msg.push_str(&format!(" (requeued {requeues} times)"));
                }
            }
        }
        let down: Vec<&str> = self
            .sides
            .iter()
            .filter(|s| !s.welcomed)
            .map(|s| s.name.as_str())
            .collect();
        msg.push_str(&format!(
            "\n  hub up: {}; sidecars not connected: {down:?}; drained: {:?}",
            self.hub.is_some(),
            self.drained
        ));
        msg
    }
}
