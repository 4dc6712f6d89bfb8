//! One hub core, N sidecar cores, a network and a fleet of simulated agent runs,
//! driven by one event queue in virtual time, the way today's daemons drive them
//! (`tests/README.md` lists what is modelled and what is not).
//!
//! ```text
//!  queue (time, seq) ─▶ dispatch ─▶ hub channel ─▶ batch ─▶ hub core ─▶ one commit (checks)
//!                               │                                     ─▶ sends / replies / closes
//!                               └─▶ sidecar core ─▶ launch runs (handle files) ─▶ commit
//!                                                  (flushed unless forget-only) ─▶ sends / stops
//! ```

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use muster_hub::config::{Limits, Policy};
use muster_hub::core::{ConnId, Core as HubCore, Identity, Input, Reply, ReplyId, TaskState};
use muster_protocol::msg::{
    Activity, Failure, Heartbeat, Hello, HostFigures, HubMsg, OpError, OpErrorCode, OpRequest,
    OpResponse, Outcome, Phase, Role, SelfTest, SessionMsg, SidecarState, SubmitRequest, TaskSpec,
    TimeoutAction, Welcome,
};
use muster_protocol::{AgentName, Generation, ReportId, TaskId};
use muster_sidecar::agent::{RunEvent, RunHandle, RunMode};
use muster_sidecar::core::{
    AgentCmd, Core as SideCore, Effect, LocalTask, Policy as SidePolicy, Verifier,
};

use super::rng::Rng;
use super::store::HubStore;

/// Wall-clock start of every run, in milliseconds since the epoch.
const T0: u64 = 1_700_000_000_000;
/// The hub shell ticks this often.
const TICK_MS: u64 = 250;
/// The longest the hub's ticker sleeps at once (`TICK_WAIT_MAX` in the hub).
const TICK_WAIT_MAX: u64 = 5_000;
/// The slowest one-way delivery on a connection.
const MAX_LAT: u64 = 1_500;
/// The longest an input waits in the hub's channel before its batch is handled
/// (usually under 20 ms; now and then a slow commit holds the loop, so inputs pile up
/// into large batches).
const BATCH_WAIT_MAX: u64 = 1_000;
/// Inputs handled per commit at most (as `hub::server` `BATCH_LEN_MAX`).
const HUB_BATCH_LEN_MAX: usize = 4096;
/// How long a welcomed sidecar may keep running an attempt the hub has moved on from:
/// the Abandon is in flight behind the Welcome or was sent when the attempt ended,
/// so it arrives within one delivery; plus the wait for the batch that decided it
/// and for the one that handles the sidecar's next message, and the granularity of
/// the check (one tick).
const ABANDON_BOUND: u64 = MAX_LAT + 2 * BATCH_WAIT_MAX + 2 * TICK_MS;
/// Duplicates that may arrive late do so within this long of the original.
const DUP_DELAY_MAX: u64 = 10_000;
/// How much later than planned the in-flight messages of a broken connection may reach
/// the hub's core (its stream task drains them after the new session started).
const LATE_MAX: u64 = 8_000;
/// Fault kinds each run counts; the aggregate of a large run must have seen every one.
pub(crate) const FAULT_KINDS: [&str; 24] = [
    "connection_break",
    "late_delivery_old_connection",
    "message_lost",
    "sidecar_crash",
    "sidecar_crash_after_launch_before_commit",
    "sidecar_crash_lost_unflushed_batch",
    "run_reattached_by_handle_file",
    "orphan_adopted",
    "orphan_ended_unclaimed",
    "orphan_superseded",
    "hub_crash_between_batches",
    "hub_crash_before_commit",
    "hub_crash_after_commit_before_send",
    "hub_clock_restart_behind",
    "clock_step_forward",
    "clock_step_backward",
    "dup_report",
    "dup_heartbeat",
    "dup_assign",
    "dup_ack",
    "dup_abandon_or_cancel",
    "dup_welcome",
    "dup_operator_request",
    "operator_retry",
];
/// How long after the first welcome since a restart the hub's resent assignments
/// may claim orphaned runs (as `sidecar::daemon` `ORPHAN_CLAIM`).
const ORPHAN_CLAIM_MS: u64 = 5_000;
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
    /// The mixed workload: operators cancel, agents fail for good, timeouts fail,
    /// attempts run out. Without it (the default) every task must complete.
    pub(crate) mixed: bool,
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
    /// Submissions refused because a dependency had already failed or been cancelled
    /// (mixed workload only).
    pub(crate) refused_submits: u64,
    pub(crate) completed: u64,
    pub(crate) failed: u64,
    pub(crate) cancelled: u64,
    pub(crate) requeued: u64,
    /// Hub commits (one per batch) and the inputs they held.
    pub(crate) hub_commits: u64,
    pub(crate) hub_inputs: u64,
    pub(crate) largest_batch: u64,
    pub(crate) runs_survived: u64,
    /// Faults injected, by kind (see [`FAULT_KINDS`]).
    pub(crate) faults: BTreeMap<&'static str, u64>,
    pub(crate) runs: u64,
    pub(crate) plans: BTreeMap<&'static str, u64>,
    pub(crate) outcomes: BTreeMap<&'static str, u64>,
    /// Ticks at which two sidecars ran one task (allowed while the older one is unreachable).
    pub(crate) overlap_ticks: u64,
    /// Attempts spawned again after their first run was ended as an unclaimed orphan.
    pub(crate) orphan_respawns: u64,
    /// Heartbeat activity the hub classified, checked against how the run
    /// behaves, by the class it got.
    pub(crate) activity_classes: BTreeMap<&'static str, u64>,
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
    /// The harness's own cadence: fleet checks and the end-of-run test.
    Tick,
    /// The hub's ticker: the core's next deadline (`poll_timeout`) came.
    HubTick {
        hub_inc: u64,
        at: u64,
    },
    /// The hub's core loop wakes up and handles a batch of what is queued for it.
    HubBatch {
        hub_inc: u64,
    },
    ToHub {
        conn: ConnId,
        msg: ToHub,
        /// Re-queued behind a broken connection: the hub's stream task drains it late.
        late: bool,
    },
    /// An operator client (re)sends request `id`.
    OpSend {
        id: u64,
    },
    /// The request reaches the hub's core channel (over its own stream).
    OpArrive {
        id: u64,
        reply: u64,
        hub_inc: u64,
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
    /// The orphans of sidecar incarnation `inc` not claimed by now are ended.
    OrphanDeadline {
        agent: usize,
        inc: u64,
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
    /// The run wrote its handle file at spawn (durable apart from the sidecar's store).
    handle_file: bool,
    /// Its run directory (with the handle file) is still there: removed when its task
    /// is deleted or it is ended as an orphan.
    dir: bool,
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

/// The sidecar's redb: what a commit wrote. `flushed` is what survives a crash:
/// a batch that only forgets is committed without a flush (as `Queue::apply`), so
/// it is lost unless a later durable commit carries it.
#[derive(Debug, Default, Clone)]
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
    flushed: Durable,
    /// A forget-only batch was committed since the last flush.
    unflushed: bool,
    conn: Option<ConnId>,
    welcomed: bool,
    /// Bumped on every (re)connect schedule, so stale timers do nothing.
    epoch: u64,
    interval: u64,
    hb_seq: u64,
    /// Bumped at every restart, so a dead incarnation's timers do nothing.
    inc: u64,
    /// Runs found at restart for attempts the store never recorded, kept for the
    /// hub's resent assignment to claim (`Daemon::orphans`).
    orphans: BTreeSet<(TaskId, Generation)>,
    /// Run directories of forgotten tasks, removed at the next flushed commit.
    releases: Vec<(TaskId, Generation)>,
    /// The claim deadline was set (at the first welcome after the restart).
    orphan_deadline: bool,
}

#[derive(Debug, Clone)]
enum OpKind {
    /// A new task, under an idempotency key (the client retries until acknowledged).
    Submit {
        key: String,
    },
    /// A second submission under a key already acknowledged: must return that task.
    SubmitRepeat {
        key: String,
    },
    Cancel,
    Requeue {
        id: TaskId,
    },
    Drain {
        name: String,
        drained: bool,
    },
}

/// An operator request a client holds until it is answered (or gives up).
#[derive(Debug, Clone)]
struct PendingOp {
    request: OpRequest,
    kind: OpKind,
    /// Resent after the hub was down or crashed before answering.
    retry: bool,
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
    /// Wall-clock steps so far (both ways).
    skew: i64,
    /// The hub process's held clock (`hub::server::Clock`): restarts with the hub.
    hub_last: u64,
    store: HubStore,
    /// Inputs queued for the hub's core loop.
    inbox: VecDeque<Input>,
    batch_scheduled: bool,
    /// The simulated time of the next hub tick the ticker sleeps until, if any.
    hub_tick_at: Option<u64>,
    /// Agents not in the committed registry when the current batch began.
    unregistered: BTreeSet<String>,
    next_reply: u64,
    next_op: u64,
    ops: HashMap<u64, PendingOp>,
    /// Reply id (this hub incarnation) -> operator request.
    replies: HashMap<u64, u64>,
    // The network.
    next_conn: u64,
    live: BTreeSet<ConnId>,
    conn_agent: HashMap<ConnId, usize>,
    fifo_hub: HashMap<ConnId, u64>,
    fifo_side: HashMap<ConnId, u64>,
    /// Broken connections: messages to the hub planned up to `.0` still reach it,
    /// `.1` ms late, if the hub incarnation `.2` lives.
    closing: HashMap<ConnId, (u64, u64, u64)>,
    // The fleet.
    sides: Vec<Side>,
    runs: BTreeMap<(usize, TaskId, Generation), Run>,
    next_serial: u64,
    /// Every attempt a run was spawned for (at most one run per attempt), and the
    /// attempts whose run was ended as an unclaimed orphan.
    spawned: BTreeSet<(TaskId, Generation)>,
    ended_orphans: BTreeSet<(TaskId, Generation)>,
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
    /// When each run was first seen running by its sidecar's heartbeat: its
    /// activity figures count from there (see [`Behaviour`]).
    running_since: HashMap<(usize, TaskId, Generation), u64>,
}

/// How a simulated run behaves while it runs, by its task id, as its
/// heartbeats' activity shows it: the hub must classify it accordingly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Writes output all the time, uses a little CPU.
    Active,
    /// Writes nothing, uses half a core.
    Busy,
    /// Writes nothing, uses no CPU: waits for input.
    Idle,
}

impl Behaviour {
    fn of(task: TaskId) -> Behaviour {
        match task.0 % 3 {
            0 => Behaviour::Active,
            1 => Behaviour::Busy,
            _ => Behaviour::Idle,
        }
    }

    /// The activity a heartbeat reports `elapsed` ms after the run was first seen running.
    fn activity(self, task: TaskId, generation: Generation, elapsed: u64) -> Activity {
        let (cpu_ms, output_age_ms) = match self {
            Behaviour::Active => (elapsed / 20, 0),
            Behaviour::Busy => (elapsed / 2, elapsed),
            Behaviour::Idle => (0, elapsed),
        };
        Activity {
            task,
            generation,
            cpu_ms: Some(cpu_ms),
            output_bytes: 0,
            output_age_ms: Some(output_age_ms),
            workspace_age_ms: None,
            output_tail: String::new(),
        }
    }
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
            // In the default workload every task must complete, so a run of bad luck in
            // the fault phase must not use up its attempts; the mixed workload keeps 3.
            max_attempts: if cfg.mixed { 3 } else { 20 },
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
            let slots = rng.range(1, 3) as u32;
            sides.push(Side {
                fp: format!("fp-{name}"),
                agent_name: AgentName::new(name.clone()).expect("agent-NNN is a valid name"),
                name,
                caps,
                slots,
                core: Some(side_core(Vec::new(), Vec::new(), 1, slots, i as u64)),
                durable: Durable {
                    next_report: 1,
                    ..Durable::default()
                },
                flushed: Durable {
                    next_report: 1,
                    ..Durable::default()
                },
                unflushed: false,
                conn: None,
                welcomed: false,
                epoch: 0,
                interval: 10_000,
                hb_seq: 0,
                inc: 0,
                orphans: BTreeSet::new(),
                releases: Vec::new(),
                orphan_deadline: false,
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
            hub_last: 0,
            store: HubStore::default(),
            inbox: VecDeque::new(),
            batch_scheduled: false,
            hub_tick_at: None,
            unregistered: BTreeSet::new(),
            next_reply: 0,
            next_op: 0,
            ops: HashMap::new(),
            replies: HashMap::new(),
            next_conn: 0,
            live: BTreeSet::new(),
            conn_agent: HashMap::new(),
            fifo_hub: HashMap::new(),
            fifo_side: HashMap::new(),
            closing: HashMap::new(),
            sides,
            runs: BTreeMap::new(),
            next_serial: 0,
            spawned: BTreeSet::new(),
            ended_orphans: BTreeSet::new(),
            drained: BTreeSet::new(),
            acked: Vec::new(),
            acked_set: BTreeSet::new(),
            keys: BTreeMap::new(),
            zombies: HashMap::new(),
            trace: VecDeque::with_capacity(TRACE_LEN + 1),
            stats: Summary::default(),
            running_since: HashMap::new(),
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

    /// The machine's wall clock (steps both ways).
    fn wall(&self) -> u64 {
        (T0 as i64 + self.now as i64 + self.skew).max(0) as u64
    }

    /// The hub's clock: the wall clock, held so it never goes back within one process.
    fn hub_now(&mut self) -> u64 {
        let t = self.wall().max(self.hub_last);
        self.hub_last = t;
        t
    }

    fn fault(&mut self, kind: &'static str) {
        debug_assert!(FAULT_KINDS.contains(&kind), "{kind}");
        *self.stats.faults.entry(kind).or_default() += 1;
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
                self.heal();
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
                    self.check_fleet()?;
                }
                self.after(TICK_MS, Ev::Tick);
            }
            Ev::HubTick { hub_inc, at } => {
                if hub_inc == self.hub_inc && self.hub_tick_at == Some(at) {
                    self.hub_tick_at = None;
                    self.hub_input(Input::Tick);
                }
            }
            Ev::HubBatch { hub_inc } => {
                if hub_inc == self.hub_inc {
                    self.batch_scheduled = false;
                    self.hub_batch()?;
                }
            }
            Ev::ToHub { conn, msg, late } => self.deliver_to_hub(conn, msg, late),
            Ev::Closed { conn, hub_inc } => {
                if self.hub.is_some() && hub_inc == self.hub_inc {
                    self.hub_input(Input::Closed { conn });
                }
            }
            Ev::OpSend { id } => self.op_send(id),
            Ev::OpArrive { id, reply, hub_inc } => self.op_arrive(id, reply, hub_inc),
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
            Ev::OrphanDeadline { agent, inc } => {
                let s = &self.sides[agent];
                if s.inc == inc && s.core.is_some() {
                    let all: Vec<_> = s.orphans.iter().copied().collect();
                    self.end_orphans(agent, &all, "orphan_ended_unclaimed");
                }
            }
            Ev::HubRestart => self.start_hub()?,
            Ev::Run {
                agent,
                task,
                generation,
                serial,
                step,
            } => self.run_step(agent, task, generation, serial, step)?,
            Ev::Submit => self.submit(),
            Ev::Op => {
                if self.faults {
                    self.random_op();
                    let d = self.rng.range(500, 8_000);
                    self.after(d, Ev::Op);
                }
            }
            Ev::Fault => {
                if self.faults {
                    self.inject_faults();
                    self.after(1_000, Ev::Fault);
                }
            }
            Ev::Sweep => {
                self.sweep_hung();
                self.after(30_000, Ev::Sweep);
            }
        }
        Ok(())
    }

    // === The hub ===

    /// Starts a hub process: its clock starts from the wall clock again (a restarted
    /// hub may be behind the time its predecessor held), its core from the store.
    fn start_hub(&mut self) -> Res {
        let behind = self.wall() < self.hub_last;
        self.hub_last = 0;
        if behind {
            self.fault("hub_clock_restart_behind");
        }
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
        self.hub_tick_at = None;
        self.arm_hub_tick();
        Ok(())
    }

    /// As `hub::server::tick_at_deadlines`: the ticker sleeps until the core's next
    /// deadline by the wall clock (at most 5 s at a time), then sends a tick.
    fn arm_hub_tick(&mut self) {
        let Some(core) = self.hub.as_ref() else {
            return;
        };
        let Some(deadline) = core.poll_timeout() else {
            return;
        };
        let wait = deadline.saturating_sub(self.wall()).min(TICK_WAIT_MAX);
        let at = self.now + wait;
        if self.hub_tick_at.is_some_and(|t| t <= at) {
            return;
        }
        self.hub_tick_at = Some(at);
        let hub_inc = self.hub_inc;
        self.push(at, Ev::HubTick { hub_inc, at });
    }

    /// The hub process dies: its core, its channel (inputs not yet handled) and
    /// whatever it has not sent go; the store keeps what was committed.
    fn crash_hub(&mut self, kind: &'static str) {
        self.fault(kind);
        self.hub = None;
        self.hub_inc += 1;
        self.inbox.clear();
        self.batch_scheduled = false;
        // Operator clients see their connection break and try again.
        let waiting: Vec<u64> = self.replies.drain().map(|(_, id)| id).collect();
        for id in waiting {
            self.op_retry(id);
        }
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
        self.store.commit(&out.writes, &BTreeSet::new())
    }

    /// Queues an input on the hub's core channel; the core loop wakes up shortly.
    fn hub_input(&mut self, input: Input) {
        if self.hub.is_none() {
            return;
        }
        self.inbox.push_back(input);
        if !self.batch_scheduled {
            self.batch_scheduled = true;
            let d = self.batch_wait();
            let hub_inc = self.hub_inc;
            self.after(d, Ev::HubBatch { hub_inc });
        }
    }

    fn batch_wait(&mut self) -> u64 {
        if self.rng.chance(0.03) {
            self.rng.range(100, BATCH_WAIT_MAX)
        } else {
            self.rng.range(0, 20)
        }
    }

    /// As `hub::server::core_loop`: take what is queued (a random share of it, at
    /// most 4096), handle it all with one `now`, commit once (with the checks), and
    /// only then deliver the batch's sends, replies and closes. A crash before the
    /// commit loses the batch; one after it loses the unsent messages.
    fn hub_batch(&mut self) -> Res {
        let now = self.hub_now();
        let len = self.inbox.len().min(HUB_BATCH_LEN_MAX);
        let take = if self.rng.chance(0.5) {
            len
        } else {
            self.rng.range(1, len as u64) as usize
        };
        let batch: Vec<Input> = self.inbox.drain(..take).collect();
        let Some(core) = self.hub.as_mut() else {
            return Ok(());
        };
        self.stats.hub_inputs += batch.len() as u64;
        self.stats.largest_batch = self.stats.largest_batch.max(batch.len() as u64);
        let mut reported: Vec<(TaskId, Generation)> = Vec::new();
        for input in batch {
            if let Input::Session {
                msg: SessionMsg::Heartbeat(hb),
                ..
            } = &input
            {
                reported.extend(hb.activity.iter().map(|a| (a.task, a.generation)));
            }
            core.handle(now, input, &self.store);
        }
        check_activity(core, now, &reported, &mut self.stats.activity_classes)?;
        let out = core.take_output();
        // Release builds report the core's own invariant checks here (debug ones assert).
        if !out.violations.is_empty() {
            return Err(format!(
                "the hub core broke its invariants: {:?}",
                out.violations
            ));
        }
        let p = self.intensity / 600.0;
        if self.faults && self.rng.chance(p) {
            self.crash_hub("hub_crash_before_commit");
            return Ok(());
        }
        // Requeues this batch acknowledges: the store allows those tasks to live again.
        let requeued: BTreeSet<TaskId> = out
            .replies
            .iter()
            .filter(|(_, r)| matches!(r, Reply::Answer(_)))
            .filter_map(|(id, _)| self.replies.get(&id.0))
            .filter_map(|op| match self.ops.get(op).map(|o| &o.kind) {
                Some(OpKind::Requeue { id }) => Some(*id),
                _ => None,
            })
            .collect();
        // Agents the registry held before this batch: a drain handled ahead of the
        // agent's first hello in the same batch finds no such agent.
        self.unregistered = self
            .sides
            .iter()
            .filter(|s| !self.store.knows_agent(&s.name))
            .map(|s| s.name.clone())
            .collect();
        self.store.commit(&out.writes, &requeued)?;
        self.stats.hub_commits += 1;
        if self.faults && self.rng.chance(p) {
            self.crash_hub("hub_crash_after_commit_before_send");
            return Ok(());
        }
        // Within one batch an attempt may be assigned (or re-sent on a hello) and then
        // ended (a tick's timeout): its Assign still leaves, followed by its Abandon.
        let stopped: BTreeSet<(ConnId, TaskId, Generation)> = out
            .sends
            .iter()
            .filter_map(|(c, m)| match m {
                HubMsg::Abandon {
                    task, generation, ..
                }
                | HubMsg::Cancel { task, generation } => Some((*c, *task, *generation)),
                _ => None,
            })
            .collect();
        for (conn, msg) in out.sends {
            if let Some(&agent) = self.conn_agent.get(&conn) {
                let name = self.sides[agent].name.clone();
                let stopped_later = match &msg {
                    HubMsg::Assign(a) => stopped.contains(&(conn, a.task, a.generation)),
                    _ => false,
                };
                self.store.check_send(&name, &msg, stopped_later)?;
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
        if !self.inbox.is_empty() && !self.batch_scheduled {
            self.batch_scheduled = true;
            let d = self.batch_wait();
            let hub_inc = self.hub_inc;
            self.after(d, Ev::HubBatch { hub_inc });
        }
        if let Some(core) = self.hub.as_mut() {
            // The shell prunes nothing here (the model store keeps every task), but
            // it takes the sweep the core asks for, as the real shell does.
            if let Some(prune) = core.retention_due(now) {
                core.pruned(now, &[], prune.limit);
            }
        }
        self.arm_hub_tick();
        Ok(())
    }

    // === Operator clients ===

    /// An operator runs a command; `retry`: the client tries again until answered.
    fn op(&mut self, request: OpRequest, kind: OpKind, retry: bool) {
        self.next_op += 1;
        let id = self.next_op;
        self.ops.insert(
            id,
            PendingOp {
                request,
                kind,
                retry,
            },
        );
        self.op_send(id);
    }

    fn op_send(&mut self, id: u64) {
        if !self.ops.contains_key(&id) {
            return;
        }
        if self.hub.is_none() {
            self.op_retry(id);
            return;
        }
        self.next_reply += 1;
        let reply = self.next_reply;
        let hub_inc = self.hub_inc;
        let lat = self.latency();
        self.push(self.now + lat, Ev::OpArrive { id, reply, hub_inc });
        // A duplicate: the operator runs the same command again (or a client retries
        // after a timeout), on a stream of its own.
        if self.faults && self.rng.chance(0.02 * self.intensity) {
            self.fault("dup_operator_request");
            self.next_reply += 1;
            let reply = self.next_reply;
            let d = self.rng.range(1, DUP_DELAY_MAX);
            self.push(self.now + d, Ev::OpArrive { id, reply, hub_inc });
        }
    }

    /// The client's connection failed (hub down, or it crashed before answering).
    fn op_retry(&mut self, id: u64) {
        let Some(op) = self.ops.get(&id) else { return };
        if !op.retry {
            self.ops.remove(&id);
            return;
        }
        self.fault("operator_retry");
        let d = self.rng.range(500, 5_000);
        self.after(d, Ev::OpSend { id });
    }

    fn op_arrive(&mut self, id: u64, reply: u64, hub_inc: u64) {
        let Some(op) = self.ops.get(&id) else { return };
        if hub_inc != self.hub_inc || self.hub.is_none() {
            // The hub this request went to is gone: the stream broke.
            self.op_retry(id);
            return;
        }
        let request = op.request.clone();
        self.replies.insert(reply, id);
        self.hub_input(Input::Op {
            fingerprint: ADMIN_FP.into(),
            request,
            reply: ReplyId(reply),
            token_secret: None,
        });
    }

    fn on_reply(&mut self, reply: ReplyId, answer: Reply) -> Res {
        let Some(id) = self.replies.remove(&reply.0) else {
            return Err(format!("a reply to unknown request {}", reply.0));
        };
        // Rendered as the shell renders it, so the checks below read the JSON operators get.
        let resp = match answer {
            Reply::Answer(a) => OpResponse::Ok {
                json: serde_json::to_string(&a).map_err(|e| format!("an answer: {e}"))?,
            },
            Reply::Error(e) => OpResponse::Error(e),
            Reply::Enroll(_) | Reply::Stats(_) => {
                return Err("an enrollment or stats reply to an operator request".into());
            }
        };
        let Some(op) = self.ops.remove(&id) else {
            // The duplicate of a request already answered.
            return self.check_refusal(None, &resp);
        };
        let json = match resp {
            OpResponse::Ok { json } => json,
            refused => {
                self.check_refusal(Some(&op), &refused)?;
                if matches!(op.kind, OpKind::Submit { .. }) {
                    // Mixed workload: refused for a dependency that ended badly.
                    self.stats.refused_submits += 1;
                }
                return Ok(());
            }
        };
        match op.kind {
            OpKind::Submit { key } | OpKind::SubmitRepeat { key } => {
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
                if let Some(prev) = self.keys.get(&key)
                    && *prev != tid
                {
                    return Err(format!(
                        "key {key:?} returned task {tid}, but it was task {prev} before"
                    ));
                }
                self.keys.insert(key, tid);
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
            OpKind::Cancel | OpKind::Requeue { .. } => {}
        }
        Ok(())
    }

    /// A refusal fails the run unless the request could be refused by the task's
    /// state (cancel or requeue racing the task, or a duplicate of either).
    fn check_refusal(&self, op: Option<&PendingOp>, resp: &OpResponse) -> Res {
        let OpResponse::Error(OpError { code, message }) = resp else {
            return Ok(());
        };
        let state_race = *code == OpErrorCode::Conflict
            && op.is_none_or(|o| matches!(o.kind, OpKind::Cancel | OpKind::Requeue { .. }));
        // An agent is in the registry from its first hello on: a drain before that
        // finds no such agent.
        let unknown_agent = *code == OpErrorCode::NotFound
            && matches!(op, Some(PendingOp { kind: OpKind::Drain { name, .. }, .. }) if self.unregistered.contains(name));
        // Mixed workload: a dependency that already ended failed or cancelled.
        let dead_dependency = *code == OpErrorCode::Conflict
            && matches!(op, Some(PendingOp { request: OpRequest::Submit(req), .. }) if req.after.iter().any(|d| {
                self.store.tasks.get(d).is_some_and(|t| {
                    matches!(t.state, TaskState::Failed | TaskState::Cancelled)
                })
            }));
        if state_race || unknown_agent || (self.cfg.mixed && dead_dependency) {
            return Ok(());
        }
        let mut why = format!(
            "the hub refused an operator request: {:?}: {code:?} {message}",
            op.map(|o| &o.request)
        );
        if let Some(PendingOp {
            request: OpRequest::Submit(req),
            ..
        }) = op
        {
            for dep in &req.after {
                why.push_str("\n  dependency ");
                why.push_str(&self.store.describe(*dep));
            }
        }
        Err(why)
    }

    // === The network ===

    fn latency(&mut self) -> u64 {
        if self.rng.chance(0.9) {
            self.rng.range(1, 50)
        } else {
            self.rng.range(50, MAX_LAT)
        }
    }

    /// One stream per connection: FIFO.
    fn send_to_hub(&mut self, conn: ConnId, msg: ToHub) {
        if !self.live.contains(&conn) {
            return;
        }
        let lat = self.latency();
        let last = self.fifo_hub.get(&conn).copied().unwrap_or(0);
        let at = (self.now + lat).max(last);
        self.fifo_hub.insert(conn, at);
        self.push(
            at,
            Ev::ToHub {
                conn,
                msg,
                late: false,
            },
        );
    }

    fn deliver_to_hub(&mut self, conn: ConnId, msg: ToHub, late: bool) {
        if self.hub.is_none() {
            self.fault("message_lost");
            return;
        }
        if !late && !self.live.contains(&conn) {
            // The connection broke with this in flight: a prefix of the stream still
            // reaches the hub's core, late (its stream task drains it), possibly after
            // the sidecar's next session has started; the rest is lost.
            match self.closing.get(&conn) {
                Some(&(cutoff, delay, inc)) if self.now <= cutoff && inc == self.hub_inc => {
                    self.after(
                        delay,
                        Ev::ToHub {
                            conn,
                            msg,
                            late: true,
                        },
                    );
                }
                _ => self.fault("message_lost"),
            }
            return;
        }
        if late {
            self.fault("late_delivery_old_connection");
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
        self.hub_input(input);
    }

    /// One stream per connection: FIFO. `dup_at`: also deliver a copy at that time.
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
        let dup = self.faults && self.rng.chance(0.02 * self.intensity);
        if dup {
            // What a late copy could do: acks, abandons and cancels are harmless at any
            // time; a late Assign would revive an abandoned attempt, and a late Welcome
            // cannot be read, so those are repeated right behind the original.
            let (kind, late) = match &msg {
                HubMsg::Assign(_) => ("dup_assign", false),
                HubMsg::Ack { .. } => ("dup_ack", true),
                HubMsg::Abandon { .. } | HubMsg::Cancel { .. } => ("dup_abandon_or_cancel", true),
                HubMsg::Welcome(_) => ("dup_welcome", false),
                HubMsg::Refused(_) => ("", false),
            };
            if !kind.is_empty() {
                self.fault(kind);
                let t = if late {
                    at + self.rng.range(1, DUP_DELAY_MAX)
                } else {
                    at
                };
                let ev = Ev::ToSide {
                    agent,
                    conn,
                    msg: msg.clone(),
                };
                self.push(at, Ev::ToSide { agent, conn, msg });
                self.push(t, ev);
                return;
            }
        }
        self.push(at, Ev::ToSide { agent, conn, msg });
    }

    /// The connection is gone both ways. Toward the hub a prefix of what is in flight
    /// still arrives, late; toward the sidecar it is lost (the sidecar handles one
    /// session at a time, so nothing of an old session reaches it after a new one).
    /// The hub's shell notices after `closed_after`, and after the last late message;
    /// the sidecar reconnects after a backoff.
    fn close_conn(&mut self, conn: ConnId, closed_after: u64) {
        if !self.live.remove(&conn) {
            return;
        }
        let last = self.fifo_hub.remove(&conn).unwrap_or(0);
        self.fifo_side.remove(&conn);
        let mut closed_at = self.now + closed_after;
        if last > self.now && self.hub.is_some() && self.rng.chance(0.5) {
            let cutoff = self.rng.range(self.now, last);
            let delay = self.rng.range(0, LATE_MAX);
            self.closing.insert(conn, (cutoff, delay, self.hub_inc));
            closed_at = closed_at.max(cutoff + delay + 1);
        }
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
            self.push(closed_at, Ev::Closed { conn, hub_inc });
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
            workspace: Default::default(),
        };
        self.send_to_hub(conn, ToHub::Hello(hello));
    }

    fn deliver_to_side(&mut self, agent: usize, conn: ConnId, msg: HubMsg) -> Res {
        let s = &self.sides[agent];
        if !self.live.contains(&conn) || s.conn != Some(conn) || s.core.is_none() {
            self.fault("message_lost");
            return Ok(());
        }
        match msg {
            HubMsg::Welcome(w) if !s.welcomed => self.welcome(agent, &w),
            HubMsg::Refused(r) => Err(format!("the hub refused {}: {r}", s.name)),
            msg => {
                let now = Duration::from_millis(self.now);
                if let Some(core) = self.sides[agent].core.as_mut() {
                    core.handle_hub(now, msg);
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
        if !s.orphans.is_empty() && !s.orphan_deadline {
            s.orphan_deadline = true;
            let inc = s.inc;
            self.after(ORPHAN_CLAIM_MS, Ev::OrphanDeadline { agent, inc });
        }
        let s = &mut self.sides[agent];
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
        let now = self.now;
        let s = &mut self.sides[agent];
        let Some(core) = &s.core else { return };
        s.hb_seq += 1;
        let activity: Vec<Activity> = core
            .tasks()
            .filter(|t| t.phase == Phase::Running)
            .map(|t| {
                let since = *self
                    .running_since
                    .entry((agent, t.task, t.generation))
                    .or_insert(now);
                Behaviour::of(t.task).activity(t.task, t.generation, now - since)
            })
            .collect();
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
            activity,
        };
        self.side_send(agent, SessionMsg::Heartbeat(hb));
    }

    /// A sidecar sends on its session (dropped when not connected, as the daemon does).
    /// In the fault phase a message is sometimes delivered twice: a report's copy at a
    /// random later time (as an outbox replay would), a heartbeat's right behind it (a
    /// late one would report stale state, which one ordered stream cannot do).
    fn side_send(&mut self, agent: usize, msg: SessionMsg) {
        let s = &self.sides[agent];
        let Some(conn) = s.conn.filter(|_| s.welcomed) else {
            return;
        };
        let dup = self.faults && self.rng.chance(0.03 * self.intensity);
        if dup {
            let copy = ToHub::Msg(msg.clone());
            match msg {
                SessionMsg::Report(_) => {
                    self.fault("dup_report");
                    let lat = self.latency();
                    let t = self.now + lat + self.rng.range(0, DUP_DELAY_MAX);
                    self.send_to_hub(conn, ToHub::Msg(msg));
                    self.push(
                        t,
                        Ev::ToHub {
                            conn,
                            msg: copy,
                            late: false,
                        },
                    );
                }
                SessionMsg::Heartbeat(_) => {
                    self.fault("dup_heartbeat");
                    self.send_to_hub(conn, ToHub::Msg(msg));
                    self.send_to_hub(conn, copy);
                }
            }
            return;
        }
        self.send_to_hub(conn, ToHub::Msg(msg));
    }

    // === Sidecars ===

    /// As the daemon's loop after its core: launch the runs first (each writes its
    /// handle file at spawn; the spawn often joins this batch), then commit the store
    /// effects in one transaction (flushed unless the batch only forgets), then send,
    /// stop and forget. In the fault phase the sidecar may die between the launch and
    /// the commit.
    fn side_effects(&mut self, agent: usize) -> Res {
        let Some(core) = self.sides[agent].core.as_mut() else {
            return Ok(());
        };
        let mut effects = core.take_effects();
        let mut launched = false;
        if effects.iter().any(|e| matches!(e, Effect::StartRun(..))) {
            launched = true;
            let (starts, rest): (Vec<Effect>, Vec<Effect>) = effects
                .into_iter()
                .partition(|e| matches!(e, Effect::StartRun(..)));
            effects = rest;
            let mut spawned = Vec::new();
            for e in starts {
                let Effect::StartRun(task, generation, spec) = e else {
                    continue;
                };
                if self.sides[agent].orphans.remove(&(task, generation)) {
                    // The same attempt, spawned before a crash: adopt it, never run it twice.
                    self.fault("orphan_adopted");
                    self.record_handle(agent, task, generation);
                    self.reattach(agent, task, generation);
                    continue;
                }
                // An older attempt of this task orphaned by the crash is superseded.
                let older: Vec<_> = self.sides[agent]
                    .orphans
                    .iter()
                    .filter(|(t, g)| *t == task && *g < generation)
                    .copied()
                    .collect();
                self.end_orphans(agent, &older, "orphan_superseded");
                if let Some(ev) = self.run_start(agent, task, generation, &spec)? {
                    spawned.push(ev);
                }
            }
            let now = Duration::from_millis(self.now);
            if let Some(core) = self.sides[agent].core.as_mut() {
                for ev in spawned {
                    core.handle_run(now, ev);
                }
                effects.extend(core.take_effects());
            }
        }
        if launched && self.faults && self.rng.chance(0.02 * self.intensity) {
            self.fault("sidecar_crash_after_launch_before_commit");
            self.crash_side(agent);
            return Ok(());
        }
        let s = &mut self.sides[agent];
        let store: Vec<&Effect> = effects.iter().filter(|e| e.is_store()).collect();
        let forget_only = store
            .iter()
            .all(|e| matches!(e, Effect::DeleteReport(_) | Effect::DeleteTask(..)));
        let d = &mut s.durable;
        for e in &store {
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
        let flushed = !store.is_empty() && !forget_only;
        if !store.is_empty() {
            if forget_only {
                s.unflushed = true;
            } else {
                // A durable commit carries every earlier one to the disk.
                s.flushed = s.durable.clone();
                s.unflushed = false;
            }
        }
        for e in effects {
            match e {
                Effect::Send(m) => self.side_send(agent, m),
                Effect::StopRun(task, generation) => self.run_stop(agent, task, generation),
                Effect::ForgetRun(task, generation) => {
                    if let Some(r) = self.runs.get_mut(&(agent, task, generation)) {
                        r.forgotten = true;
                        r.alive = false;
                    }
                }
                Effect::DeleteTask(task, generation) => {
                    // The daemon removes the run directory (handle file included)
                    // once the forgetting is durable.
                    self.sides[agent].releases.push((task, generation));
                }
                _ => {}
            }
        }
        if flushed {
            for (task, generation) in std::mem::take(&mut self.sides[agent].releases) {
                if let Some(r) = self.runs.get_mut(&(agent, task, generation)) {
                    r.dir = false;
                }
            }
        }
        Ok(())
    }

    /// As the daemon's `record_handle`: a run re-attached through its handle file
    /// has its handle put in the store (the core hears `Spawned`).
    fn record_handle(&mut self, agent: usize, task: TaskId, generation: Generation) {
        let serial = self
            .runs
            .get(&(agent, task, generation))
            .map_or(0, |r| r.serial);
        let now = Duration::from_millis(self.now);
        if let Some(core) = self.sides[agent].core.as_mut() {
            core.handle_run(
                now,
                RunEvent::Spawned {
                    task,
                    generation,
                    handle: sim_handle(agent, task, generation, serial),
                },
            );
        }
    }

    /// The sidecar process dies: its memory and session go, and so does a batch that
    /// was committed without a flush; the flushed store, the handle files and (some
    /// of) the agent runs it started stay.
    fn crash_side(&mut self, agent: usize) {
        self.fault("sidecar_crash");
        let s = &mut self.sides[agent];
        if s.unflushed {
            s.durable = s.flushed.clone();
            s.unflushed = false;
            self.fault("sidecar_crash_lost_unflushed_batch");
        }
        let s = &mut self.sides[agent];
        s.core = None;
        s.welcomed = false;
        s.orphans.clear();
        s.releases.clear();
        s.orphan_deadline = false;
        if let Some(c) = s.conn {
            let d = self.rng.range(0, 20_000);
            self.close_conn(c, d);
        }
        self.sides[agent].conn = None;
        let lo = (agent, TaskId(0), Generation(0));
        let hi = (agent + 1, TaskId(0), Generation(0));
        for (_, run) in self.runs.range_mut(lo..hi) {
            run.watched = false;
            if run.forgotten || !run.alive {
                continue;
            }
            if run.stopping {
                run.alive = false;
                run.exit = Some(Outcome::Cancelled);
            } else if run.handle_file && self.rng.chance(0.6) {
                // Own process group, parented by the reaper: it outlives the sidecar.
                self.stats.runs_survived += 1;
            } else {
                // The machine went down with it, or a wake-mode agent died with it.
                run.alive = false;
                run.exit = None;
            }
        }
        let d = self.rng.range(500, 30_000);
        self.after(d, Ev::SideRestart { agent });
    }

    /// As `sidecar::daemon::run` at startup: load the queue, keep the runs of tasks it
    /// does not hold as orphans (spawned before a commit that never happened; a resent
    /// assignment adopts them, `Daemon::sweep_runs`), re-attach to the held ones through
    /// the recorded handle or, failing that, the handle file, start what never spawned,
    /// then connect.
    fn side_restart(&mut self, agent: usize) -> Res {
        let d = &self.sides[agent].durable;
        let tasks: Vec<LocalTask> = d.tasks.values().cloned().collect();
        let core = side_core(
            tasks.clone(),
            d.outbox.values().cloned().collect(),
            d.next_report,
            self.sides[agent].slots,
            agent as u64,
        );
        let held: BTreeSet<(TaskId, Generation)> =
            tasks.iter().map(|t| (t.task, t.generation)).collect();
        let lo = (agent, TaskId(0), Generation(0));
        let hi = (agent + 1, TaskId(0), Generation(0));
        let orphans: BTreeSet<(TaskId, Generation)> = self
            .runs
            .range(lo..hi)
            .filter(|((_, t, g), r)| {
                r.handle_file && r.dir && !r.forgotten && !held.contains(&(*t, *g))
            })
            .map(|((_, t, g), _)| (*t, *g))
            .collect();
        let s = &mut self.sides[agent];
        s.core = Some(core);
        s.inc += 1;
        s.orphans = orphans;
        s.orphan_deadline = false;
        for t in tasks {
            if t.phase == Phase::Finished {
                continue;
            }
            let key = (agent, t.task, t.generation);
            let file = self.runs.get(&key).is_some_and(|r| r.handle_file && r.dir);
            if t.handle.is_none() && !file {
                // Accepted but never spawned: start it (at least once).
                let now = Duration::from_millis(self.now);
                if let Some(ev) = self.run_start(agent, t.task, t.generation, &t.spec)?
                    && let Some(core) = self.sides[agent].core.as_mut()
                {
                    core.handle_run(now, ev);
                }
                continue;
            }
            if t.handle.is_none() {
                self.fault("run_reattached_by_handle_file");
                self.record_handle(agent, t.task, t.generation);
            }
            self.reattach(agent, t.task, t.generation);
        }
        self.side_effects(agent)?;
        let d = self.rng.range(0, 500);
        self.schedule_connect(agent, d);
        Ok(())
    }

    /// The runner's `recover` through a handle: the run is watched again and reports
    /// what it is doing (started) or how it ended (its exit status, if it left one).
    /// It never starts a process.
    fn reattach(&mut self, agent: usize, task: TaskId, generation: Generation) {
        let key = (agent, task, generation);
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
                        handle_file: true,
                        dir: true,
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
                    task,
                    generation,
                    serial,
                    step,
                },
            );
        }
    }

    /// `Daemon::end_orphans_of`: kills the orphans' processes and removes their
    /// directories; nothing is reported (their attempts are not held).
    fn end_orphans(&mut self, agent: usize, which: &[(TaskId, Generation)], kind: &'static str) {
        for &(task, generation) in which {
            if !self.sides[agent].orphans.remove(&(task, generation)) {
                continue;
            }
            self.fault(kind);
            self.ended_orphans.insert((task, generation));
            if let Some(r) = self.runs.get_mut(&(agent, task, generation)) {
                r.alive = false;
                r.watched = false;
                r.forgotten = true;
                r.dir = false;
            }
        }
    }

    // === The simulated runner ===

    /// In the default workload every failure is one a retry gets past: no `fail
    /// --no-retry`, and runs hang only when the task has a timeout (with action retry).
    fn choose_plan(&mut self, has_timeout: bool) -> Plan {
        let via_agent = self.rng.chance(0.5);
        if !self.faults {
            return Plan::Complete { via_agent };
        }
        let mixed = self.cfg.mixed;
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
            (
                if mixed || has_timeout { 0.03 * p } else { 0.0 },
                Plan::Hang,
            ),
            (
                0.06 * p,
                Plan::Fail {
                    via_agent,
                    no_retry: mixed && self.rng.chance(0.3),
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

    /// Starts a run. The spawn happens at once and writes the handle file; its
    /// `Spawned` event is returned when it arrives within the launch wait (the
    /// caller hands it to the core before the commit), else it comes later.
    fn run_start(
        &mut self,
        agent: usize,
        task: TaskId,
        generation: Generation,
        spec: &TaskSpec,
    ) -> Result<Option<RunEvent>, String> {
        let key = (agent, task, generation);
        if let Some(old) = self.runs.get_mut(&key) {
            // A start "at least once" after a restart: the old process is presumed gone.
            old.alive = false;
            old.watched = false;
        }
        let plan = self.choose_plan(spec.timeout_ms.is_some());
        // A wake that fails spawns nothing; any other plan spawns a process.
        if plan != Plan::WakeFail && !self.spawned.insert((task, generation)) {
            if self.ended_orphans.contains(&(task, generation)) {
                // Legitimate: its first run was ended as an unclaimed orphan (the
                // resent assignment came after the claim window), so never two at once.
                self.stats.orphan_respawns += 1;
            } else {
                return Err(format!(
                    "attempt {task}/{generation} spawned a second run (on {}); earlier: {:?}; held: {:?}",
                    self.sides[agent].name,
                    self.runs.get(&key),
                    self.sides[agent].durable.tasks.get(&task)
                ));
            }
        }
        self.stats.runs += 1;
        *self.stats.plans.entry(plan.name()).or_default() += 1;
        self.next_serial += 1;
        let serial = self.next_serial;
        self.runs.insert(
            key,
            Run {
                serial,
                handle_file: plan != Plan::WakeFail,
                dir: plan != Plan::WakeFail,
                alive: true,
                watched: true,
                started: false,
                stopping: false,
                forgotten: false,
                exit: None,
            },
        );
        let mut steps = Vec::new();
        let inline = plan != Plan::WakeFail && self.rng.chance(0.7);
        let spawned = self.now + self.rng.range(1, 500);
        let started = spawned + self.rng.range(100, 3_000);
        let long = self.faults && spec.timeout_ms.is_some() && self.rng.chance(0.15);
        // After the faults, a run ends well within its task's timeout.
        let short_max = spec.timeout_ms.map_or(40_000, |t| (t / 2).min(40_000));
        let ends = started
            + if long {
                self.rng.range(60_000, 240_000)
            } else {
                self.rng.range(1_000, short_max)
            };
        let spawned_ev = RunEvent::Spawned {
            task,
            generation,
            handle: sim_handle(agent, task, generation, serial),
        };
        let start_step = if self.rng.chance(0.5) {
            Step::Started
        } else {
            Step::AgentStart
        };
        match plan {
            Plan::WakeFail => steps.push((spawned, Step::Finish(Outcome::WakeFailed))),
            Plan::NeverStart { sidecar_timeout } => {
                if !inline {
                    steps.push((spawned, Step::Spawned));
                }
                if sidecar_timeout {
                    steps.push((spawned + 60_000, Step::Finish(Outcome::StartTimeout)));
                }
            }
            Plan::Hang => {
                if !inline {
                    steps.push((spawned, Step::Spawned));
                }
                steps.push((started, start_step));
            }
            Plan::Complete { via_agent } => {
                if !inline {
                    steps.push((spawned, Step::Spawned));
                }
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
                if !inline {
                    steps.push((spawned, Step::Spawned));
                }
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
                if !inline {
                    steps.push((spawned, Step::Spawned));
                }
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
        Ok(inline.then_some(spawned_ev))
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
            work: None,
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
                handle: sim_handle(agent, task, generation, serial),
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
                    link: None,
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
        let now = Duration::from_millis(self.now);
        let Some(core) = self.sides[agent].core.as_mut() else {
            return Ok(());
        };
        match to {
            To::Run(ev) => core.handle_run(now, ev),
            To::Agent(cmd) => {
                // A refusal (stale generation, already ended) is what the agent would print.
                let _ = core.handle_agent(now, task, generation, cmd);
            }
        }
        self.side_effects(agent)
    }

    // === Operators ===

    /// A new task under its own idempotency key, resent by its client until the hub
    /// acknowledges it; now and then instead a second submission under a key already
    /// acknowledged, which must return that task.
    fn submit(&mut self) {
        if !self.keys.is_empty() && self.rng.chance(0.05) {
            let i = self.rng.index(self.keys.len());
            if let Some(key) = self.keys.keys().nth(i).cloned() {
                let req = self.submit_request(&key);
                self.op(OpRequest::Submit(req), OpKind::SubmitRepeat { key }, true);
            }
            let d = self.rng.range(1, 1_000);
            self.after(d, Ev::Submit);
            return;
        }
        if self.submits_left == 0 {
            return;
        }
        self.submits_left -= 1;
        self.stats.submitted += 1;
        let key = format!("key-{}", self.stats.submitted);
        let req = self.submit_request(&key);
        self.op(OpRequest::Submit(req), OpKind::Submit { key }, true);
    }

    fn submit_request(&mut self, key: &str) -> SubmitRequest {
        let mixed = self.cfg.mixed;
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
        let timeout_ms = rng.chance(0.2).then(|| rng.range(15_000, 120_000));
        SubmitRequest {
            title: format!("task {key}"),
            description: "simulated work".into(),
            capabilities,
            priority: rng.range(0, 4) as i32 - 2,
            max_attempts: (mixed && rng.chance(0.2)).then(|| rng.range(1, 5) as u32),
            timeout_ms,
            timeout_action: if !mixed || rng.chance(0.5) {
                TimeoutAction::Retry
            } else {
                TimeoutAction::Fail
            },
            after,
            key: Some(key.to_string()),
            ..Default::default()
        }
    }

    /// Operators at work: cancel (mixed workload only), requeue, drain, undrain. A
    /// client gives up on these when the hub is down.
    fn random_op(&mut self) {
        let r = self.rng.below(100);
        if r < 40 {
            if self.cfg.mixed
                && let Some(id) = self.random_acked()
            {
                self.op(OpRequest::TaskCancel { id }, OpKind::Cancel, false);
            }
        } else if r < 60 {
            if let Some(id) = self.random_acked() {
                self.op(OpRequest::TaskRequeue { id }, OpKind::Requeue { id }, false);
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
                    false,
                );
            }
        } else if let Some(&i) = self
            .drained
            .iter()
            .nth(self.rng.index(self.drained.len().max(1)))
        {
            self.undrain(i, false);
        }
    }

    fn undrain(&mut self, i: usize, retry: bool) {
        let name = self.sides[i].name.clone();
        self.op(
            OpRequest::AgentUndrain { name: name.clone() },
            OpKind::Drain {
                name,
                drained: false,
            },
            retry,
        );
    }

    fn random_acked(&mut self) -> Option<TaskId> {
        if self.acked.is_empty() {
            return None;
        }
        let i = self.rng.index(self.acked.len());
        Some(self.acked[i])
    }

    /// Liveness phase: drained agents come back (a drain may have been committed
    /// with its answer lost), and in the mixed workload hung runs of tasks without a
    /// timeout need an operator.
    fn sweep_hung(&mut self) {
        if self.hub.is_none() {
            return;
        }
        let drained: Vec<usize> = self.drained.iter().copied().collect();
        for i in drained {
            self.undrain(i, true);
        }
        // Drains whose answer was lost in a crash are not in `drained`: undrain everyone
        // the store has drained.
        let names: Vec<usize> = (0..self.sides.len())
            .filter(|i| self.store.drained(&self.sides[*i].name))
            .collect();
        for i in names {
            self.undrain(i, true);
        }
        if !self.cfg.mixed {
            return;
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
            self.op(OpRequest::TaskCancel { id }, OpKind::Cancel, false);
        }
    }

    // === Faults ===

    fn inject_faults(&mut self) {
        let n = self.sides.len() as f64;
        let k = self.intensity;
        for _ in 0..self.rng.count(n * k / 400.0) {
            let i = self.rng.index(self.sides.len());
            if let Some(c) = self.sides[i].conn {
                self.fault("connection_break");
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
            self.crash_hub("hub_crash_between_batches");
        }
        if self.rng.chance(k / 200.0) {
            // The machine's wall clock is stepped (NTP, an operator): either way.
            let step = self.rng.range(1_000, 180_000) as i64;
            if self.rng.chance(0.5) {
                self.fault("clock_step_forward");
                self.skew += step;
            } else {
                self.fault("clock_step_backward");
                self.skew -= step;
            }
        }
    }

    /// Ends the fault phase: faults stop, drained agents come back, hung tasks get swept.
    fn heal(&mut self) {
        self.faults = false;
        let drained: Vec<usize> = self.drained.iter().copied().collect();
        for i in drained {
            self.undrain(i, true);
        }
        self.after(30_000, Ev::Sweep);
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
        let submitting = self
            .ops
            .values()
            .any(|o| matches!(o.kind, OpKind::Submit { .. }));
        let idle = self.hub.is_some()
            && self.submits_left == 0
            && !submitting
            && self.store.live.is_empty();
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
        self.check_totals()?;
        Ok(true)
    }

    /// The run's own totals: it submitted work, every submission was acknowledged
    /// and (in the default workload) completed; it cannot pass by doing nothing.
    fn check_totals(&self) -> Res {
        let submitted = self.stats.submitted;
        if submitted == 0 || submitted != self.cfg.tasks as u64 {
            return Err(format!(
                "submitted {submitted} tasks, the workload has {}",
                self.cfg.tasks
            ));
        }
        let refused = self.stats.refused_submits;
        let acked = self.acked.len() as u64;
        if acked + refused != submitted || self.keys.len() as u64 != acked {
            return Err(format!(
                "{submitted} submitted but {acked} acknowledged under {} keys and {refused} refused",
                self.keys.len()
            ));
        }
        if self.store.tasks.len() as u64 != acked {
            return Err(format!(
                "{acked} acknowledged but the store holds {} tasks",
                self.store.tasks.len()
            ));
        }
        if self.cfg.mixed {
            return Ok(());
        }
        let not_completed: Vec<String> = self
            .acked
            .iter()
            .filter(|id| self.store.tasks.get(id).map(|t| t.state) != Some(TaskState::Completed))
            .take(10)
            .map(|id| self.store.describe(*id))
            .collect();
        if !not_completed.is_empty() {
            return Err(format!(
                "the default workload must complete every task; these did not:\n  {}",
                not_completed.join("\n  ")
            ));
        }
        Ok(())
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

/// A sidecar core as the daemon builds one, with this sidecar's slots. The
/// simulated runner reports its runs' starts itself and the world does not
/// drive the sidecar cores' deadlines, so their settle time is long.
fn side_core(
    tasks: Vec<LocalTask>,
    outbox: Vec<muster_protocol::msg::Report>,
    next_report: u64,
    slots: u32,
    seed: u64,
) -> SideCore {
    let policy = SidePolicy {
        slots,
        mode: RunMode::Exec,
        settle: Duration::from_secs(3600),
        start_timeout: Duration::from_secs(3600),
        verify: Verifier::Runner,
    };
    SideCore::new(tasks, outbox, next_report, policy, seed)
}

/// The handle a simulated run records (in its handle file and, once committed, in the store).
fn sim_handle(agent: usize, task: TaskId, generation: Generation, serial: u64) -> RunHandle {
    RunHandle {
        pid: Some(serial as u32),
        session: None,
        run_dir: PathBuf::from(format!("/sim/{agent}/{task}-{generation}")),
        mode: RunMode::Exec,
        start_ticks: None,
    }
}

/// The hub's class of each attempt whose activity this batch delivered must
/// fit how its run behaves ([`Behaviour`]): a run writing output is `active`;
/// a busy one is never `idle` or `stalled`; one with no CPU is never
/// `busy_silent` once two samples show it, and is `idle` (or `stalled`) once
/// silent for the active window. Only attempts the hub took the figures of
/// in this batch are checked (the hub ignores another generation's).
fn check_activity(
    core: &HubCore,
    now: u64,
    reported: &[(TaskId, Generation)],
    classes: &mut BTreeMap<&'static str, u64>,
) -> Res {
    let active = core_windows_active();
    for &(task, _) in reported {
        let Some(v) = core.activity_view(task, now) else {
            continue;
        };
        if v.heard_age_ms != Some(0) {
            continue;
        }
        let judged = v.cpu_last_minute_ms.is_some();
        let fits = match Behaviour::of(task) {
            Behaviour::Active => v.class == "active",
            Behaviour::Busy if judged => v.class == "active" || v.class == "busy_silent",
            Behaviour::Busy => v.class != "idle",
            Behaviour::Idle if !judged => v.class != "idle",
            Behaviour::Idle if v.silent_ms >= active => v.class == "idle" || v.class == "stalled",
            Behaviour::Idle => v.class == "active",
        };
        if !fits {
            return Err(format!(
                "task {task} behaves {:?} but the hub classifies it {:?}: {v:?}",
                Behaviour::of(task),
                v.class
            ));
        }
        *classes.entry(v.class).or_default() += 1;
    }
    Ok(())
}

/// The active window of the simulation's policy (default idle_alert and
/// heartbeat interval): a minute.
fn core_windows_active() -> u64 {
    let p = Policy::default();
    muster_hub::core::activity::Windows::new(
        p.idle_alert.as_millis() as u64,
        p.stall_alert.as_millis() as u64,
        p.heartbeat_interval.as_millis() as u64,
    )
    .active
}
