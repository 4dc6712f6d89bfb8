//! The sidecar's IO shell: the hub session (connect, hello, welcome, reconnect),
//! heartbeats, the agent runner, the local socket, and the queue, joined around
//! the [`Core`] by one loop that owns it.
//!
//! ```text
//! session task ──ToMain──┐
//! runner events ─────────┼─▶ daemon loop: batch ─▶ Core ─▶ Queue::apply (one commit) ─▶ sends, runs, answers
//! local socket ──────────┘
//! ```
//!
//! # Launch before commit
//!
//! A batch that accepts assignments starts their runs *before* its commit and
//! waits briefly ([`LAUNCH_WAIT`]) for their spawns, so one commit holds the
//! acceptance, the run handle and often the start, and `Accepted` and `Started`
//! leave together after it. That takes one durable commit (about a third of a
//! millisecond here) off the way from assignment to running, and half the
//! sidecar's commits off a short run. Messages still leave only after the
//! commit of what they report.
//!
//! The price is a window in which a run exists that the queue does not know:
//! the sidecar process dies after the spawn and before the commit. (A machine
//! crash ends the run too.) The run writes its handle into its directory right
//! after the spawn (page cache survives the process), so at the restart the
//! sidecar, before it reconnects:
//! - ends the runs of directories whose task it does not hold (the hub never
//!   heard `Accepted`, so it resends or reassigns the task), and
//! - re-attaches to the run of a task it holds without a recorded handle,
//!   instead of starting it a second time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use muster_protocol::client::{self, Credential};
use muster_protocol::msg::{
    Heartbeat, Hello, HubMsg, Open, OpenBody, Refused, SelfTest, SessionMsg, SidecarState, Welcome,
};
use muster_protocol::{PROTOCOL_VERSION, decode, encode, frame_codec};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{debug, error, info, warn};

use crate::agent::{RunEvent, RunSpec, Runner};
use crate::backoff;
use crate::config::SidecarConfig;
use crate::core::{Core, Effect};
use crate::local::{self, Answer, Incoming, Request};
use crate::queue::{Queue, QueueError};
use crate::rundirs::RunDirs;
use muster_protocol::pace::{LogBudget, Rng};

/// Outgoing session queue; a hub this far behind gets the connection closed.
const SEND_QUEUE_LEN: usize = 1024;
/// Run handles remembered for reusing run directories, at most.
const HANDLES_MAX: usize = 4096;
/// Events handled per commit at most.
const BATCH_LEN_MAX: usize = 1024;
/// How long the hub may take to answer a hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a batch waits for the runs it started to spawn before committing.
const LAUNCH_WAIT: Duration = Duration::from_millis(20);
/// How long SIGTERM waits for the hub to acknowledge the outbox.
const DRAIN_GRACE: Duration = Duration::from_secs(3);

/// What the daemon needs.
pub struct Options {
    /// The configuration.
    pub config: SidecarConfig,
    /// The credential for `muster/1`.
    pub credential: Credential,
    /// The agent runner.
    pub runner: Arc<dyn Runner>,
    /// Whether to bind the local socket (benchmarks with many sessions per process don't).
    pub local_socket: bool,
}

/// The daemon could not start or hit a fatal error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The queue failed.
    #[error("{0}")]
    Queue(#[from] QueueError),
    /// Startup failed.
    #[error("{0}")]
    Start(String),
}

enum ToMain {
    HelloWanted(oneshot::Sender<Hello>),
    Connected {
        tx: mpsc::Sender<SessionMsg>,
        welcome: Welcome,
        conn: quinn::Connection,
    },
    Disconnected,
    Hub(HubMsg),
}

/// Runs the sidecar until `shutdown` resolves. Calls `ready` once the queue is
/// open and the local socket bound.
///
/// # Errors
/// [`DaemonError`] on a startup failure or a failed commit (state stays as last committed).
pub async fn run(
    opts: Options,
    ready: impl FnOnce(),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    let cfg = opts.config;
    let data_dir = cfg.data_dir.clone();
    std::fs::create_dir_all(data_dir.join("runs"))
        .map_err(|e| DaemonError::Start(format!("{}: {e}", data_dir.display())))?;
    let queue = Arc::new(Queue::open(&data_dir.join(crate::queue::DB_FILE))?);
    // Before any run starts or re-attaches: every attempt's token derives from it.
    let token_key =
        crate::tasktoken::TokenKey::load_or_create(&data_dir).map_err(DaemonError::Start)?;
    let loaded = queue.load()?;
    let mut core = Core::new(loaded.tasks, loaded.outbox, loaded.next_report);
    let (local_tx, mut local_rx) = mpsc::channel::<Incoming>(64);
    let socket_path = data_dir.join(local::SOCKET_FILE);
    let local_task = if opts.local_socket {
        let (listener, _) = local::bind(&data_dir).map_err(DaemonError::Start)?;
        Some(tokio::spawn(local::serve(listener, local_tx.clone())))
    } else {
        None
    };
    let (run_tx, mut run_rx) = mpsc::channel(256);
    let (to_main, mut from_session) = mpsc::channel::<ToMain>(1024);
    let runner = opts.runner;
    let (health_tx, mut health_rx) = mpsc::channel(1);
    let (scrape_tx, mut scrape_rx) = mpsc::channel::<Scrape>(8);
    let http = match cfg.http_listen {
        Some(addr) => Some(
            muster_protocol::http::serve(addr, http_handler(scrape_tx))
                .await
                .map_err(DaemonError::Start)?,
        ),
        None => None,
    };
    // Reading the pool is a directory listing: off the async workers.
    let runs_root = cfg.data_dir.join("runs");
    let pool_cap = (cfg.slots as usize * 2).max(8);
    let run_dirs = tokio::task::spawn_blocking(move || RunDirs::new(runs_root, pool_cap))
        .await
        .map_err(|e| DaemonError::Start(format!("run directories: {e}")))?;
    let mut d = Daemon {
        token_key,
        run_dirs: Arc::new(run_dirs),
        handles: std::collections::HashMap::new(),
        cfg,
        runner,
        run_tx,
        socket_path,
        tx: None,
        conn: None,
        interval: Duration::from_secs(10),
        hb_seq: 0,
        rng: Rng::new(seed()),
        system: sysinfo::System::new(),
        last_self_test: SelfTest::default(),
        health: Ok(()),
        health_running: false,
        health_tx,
        draining: false,
        stats: SidecarStats::default(),
        starting: std::collections::HashMap::new(),
        orphans: std::collections::HashMap::new(),
        orphan_deadline: None,
        releases: Vec::new(),
    };
    // Both before the session starts: the hub resends assignments not yet
    // accepted, and their runs must not meet an orphan or lose their directory.
    d.sweep_runs(&core).await;
    d.recover(&core).await;
    let session = tokio::spawn(session_loop(
        d.cfg.hub.clone(),
        opts.credential.clone(),
        to_main,
    ));
    ready();
    info!(name = %d.cfg.name, hub = d.cfg.hub, "sidecar started");
    let mut next_hb = tokio::time::Instant::now() + d.interval;
    // Watchdog pings from this loop, at half the interval systemd asked for (at most 1 s apart).
    let ping = sd_notify::watchdog_enabled().map_or(Duration::from_secs(1), |w| {
        (w / 2).min(Duration::from_secs(1))
    });
    let mut tick = tokio::time::interval(ping.max(Duration::from_millis(10)));
    tokio::pin!(shutdown);
    let mut events: Vec<Ev> = Vec::with_capacity(BATCH_LEN_MAX);
    loop {
        tokio::select! {
            Some(m) = from_session.recv() => events.push(Ev::Session(m)),
            Some(e) = run_rx.recv() => events.push(Ev::Run(e)),
            Some(l) = local_rx.recv() => events.push(Ev::Local(l)),
            _ = tokio::time::sleep_until(d.orphan_deadline.unwrap_or(next_hb)), if d.orphan_deadline.is_some() => {
                d.end_orphans();
                continue;
            }
            _ = tokio::time::sleep_until(next_hb) => {
                d.heartbeat(&core);
                next_hb = tokio::time::Instant::now() + d.jittered();
                if !d.releases.is_empty() {
                    // Nothing flushed since tasks were forgotten (an idle sidecar):
                    // one small durable commit makes their forgetting durable, so
                    // their run directories can go.
                    let probe = vec![Effect::NextReport(core.next_report())];
                    match commit(&queue, probe).await? {
                        Ok(()) => d.release_run_dirs(),
                        Err(e) => warn!("cannot flush the queue to release run directories: {e}"),
                    }
                }
                continue;
            }
            Some(req) = scrape_rx.recv() => {
                let metrics = d.render_metrics(&core);
                let q = queue.clone();
                let probe = [Effect::NextReport(core.next_report())];
                // The write probe is a redb commit: off the async workers.
                tokio::spawn(async move {
                    let healthy = tokio::task::spawn_blocking(move || q.apply(&probe).is_ok()).await.unwrap_or(false);
                    let _ = req.send((healthy, metrics));
                });
                continue;
            }
            Some(h) = health_rx.recv() => {
                d.health = h;
                d.health_running = false;
                continue;
            }
            _ = tick.tick() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                continue;
            }
            _ = &mut shutdown => break,
        }
        while events.len() < BATCH_LEN_MAX {
            if let Ok(m) = from_session.try_recv() {
                events.push(Ev::Session(m));
            } else if let Ok(e) = run_rx.try_recv() {
                events.push(Ev::Run(e));
            } else {
                break;
            }
        }
        let mut answers = Vec::new();
        let mut connected = false;
        for ev in events.drain(..) {
            match ev {
                Ev::Session(ToMain::HelloWanted(reply)) => {
                    let _ = reply.send(d.hello(&core));
                }
                Ev::Session(ToMain::Connected { tx, welcome, conn }) => {
                    if d.hb_seq > 0 {
                        d.stats.reconnects.inc();
                    }
                    d.interval = Duration::from_millis(welcome.heartbeat_interval_ms.max(100));
                    core.set_max_result_bytes(welcome.limits.max_result_bytes as usize);
                    d.tx = Some(tx);
                    d.conn = Some(conn);
                    connected = true;
                    if !d.orphans.is_empty() && d.orphan_deadline.is_none() {
                        d.orphan_deadline = Some(tokio::time::Instant::now() + ORPHAN_CLAIM);
                    }
                }
                Ev::Session(ToMain::Disconnected) => {
                    d.tx = None;
                    d.conn = None;
                }
                Ev::Session(ToMain::Hub(msg)) => {
                    if let HubMsg::Assign(a) = &msg {
                        debug!(target: "muster::latency", task = a.task.0, point = "sc_assign_in", at_us = muster_protocol::wall_us());
                    }
                    core.handle_hub(msg)
                }
                Ev::Run(e) => {
                    d.observe_run(&e);
                    core.handle_run(e)
                }
                Ev::Local((req, reply)) => answers.push((d.answer(&mut core, req), reply)),
            }
        }
        let mut effects = core.take_effects();
        if effects.iter().any(|e| matches!(e, Effect::StartRun(..))) {
            d.launch(&mut core, &mut run_rx, &mut effects).await;
        }
        // Commit before acknowledge: store effects are durable before anything is sent.
        let store: Vec<Effect> = effects.iter().filter(|e| e.is_store()).cloned().collect();
        let flushed = crate::queue::commit_kind(&store) == crate::queue::CommitKind::Flushed;
        #[cfg(feature = "test-hooks")]
        crate::test_hooks::hold_before_handle_commit(&d.cfg.data_dir, &store).await;
        if !store.is_empty()
            && let Err(e) = commit(&queue, store).await?
        {
            error!("fatal: {e}");
            return Err(e.into());
        }
        if connected {
            // Replay what the hub has not acknowledged, then tell it our state at once.
            let replay: Vec<SessionMsg> = core.outbox().cloned().map(SessionMsg::Report).collect();
            for m in replay {
                d.send(m);
            }
            d.heartbeat(&core);
            next_hb = tokio::time::Instant::now() + d.jittered();
        }
        for e in effects {
            d.perform(e);
        }
        if flushed {
            // Every earlier unflushed commit is durable now too.
            d.release_run_dirs();
        }
        for (answer, reply) in answers {
            let _ = reply.send(answer);
        }
    }
    // Drain: stop taking work, tell the hub, give it a moment to acknowledge.
    info!("draining");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    d.draining = true;
    d.heartbeat(&core);
    let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
    while core.outbox().next().is_some() && d.tx.is_some() {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline, from_session.recv()).await else {
            break;
        };
        if let ToMain::Hub(msg @ HubMsg::Ack { .. }) = m {
            core.handle_hub(msg);
            let effects = core.take_effects();
            let q = queue.clone();
            let _ = tokio::task::spawn_blocking(move || q.apply(&effects)).await;
        }
    }
    session.abort();
    if let Some(c) = &d.conn {
        c.close(0u32.into(), b"sidecar stopping");
    }
    if let Some(t) = local_task {
        t.abort();
    }
    if let Some(h) = http {
        h.abort();
    }
    let _ = std::fs::remove_file(&d.socket_path);
    Ok(())
}

/// Applies `store` in one transaction, blocking this worker in place where the
/// runtime allows it: the loop has nothing else to do until the commit is
/// durable, and a hand-off to the blocking pool and back costs about a tenth
/// of a millisecond here.
async fn commit(
    queue: &Arc<Queue>,
    store: Vec<Effect>,
) -> Result<Result<(), QueueError>, DaemonError> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
        return Ok(tokio::task::block_in_place(|| queue.apply(&store)));
    }
    let q = Arc::clone(queue);
    tokio::task::spawn_blocking(move || q.apply(&store))
        .await
        .map_err(|e| DaemonError::Start(format!("commit task: {e}")))
}

enum Ev {
    Session(ToMain),
    Run(RunEvent),
    Local(Incoming),
}

struct Daemon {
    cfg: SidecarConfig,
    /// Derives each attempt's `MUSTER_TASK_TOKEN` and checks agent requests against it.
    token_key: crate::tasktoken::TokenKey,
    run_dirs: Arc<RunDirs>,
    /// The run handle of each attempt that has one, for deciding whether its
    /// directory can be reused once the task is forgotten.
    handles: std::collections::HashMap<
        (muster_protocol::TaskId, muster_protocol::Generation),
        crate::agent::RunHandle,
    >,
    runner: Arc<dyn Runner>,
    run_tx: mpsc::Sender<crate::agent::RunEvent>,
    socket_path: PathBuf,
    tx: Option<mpsc::Sender<SessionMsg>>,
    conn: Option<quinn::Connection>,
    interval: Duration,
    hb_seq: u64,
    rng: Rng,
    system: Result<sysinfo::System, sysinfo::Error>,
    last_self_test: SelfTest,
    health: Result<(), String>,
    health_running: bool,
    health_tx: mpsc::Sender<Result<(), String>>,
    draining: bool,
    stats: SidecarStats,
    /// When each run was started, for the wake latency.
    starting:
        std::collections::HashMap<(muster_protocol::TaskId, muster_protocol::Generation), Instant>,
    /// Runs found at startup for attempts the store never recorded (spawned, then
    /// the sidecar died before the acceptance's commit). The hub resends such an
    /// assignment when the session opens; the run is then adopted instead of
    /// started a second time. Those not claimed by [`ORPHAN_CLAIM`] are ended.
    orphans: std::collections::HashMap<
        (muster_protocol::TaskId, muster_protocol::Generation),
        crate::agent::RunHandle,
    >,
    /// When the orphans not claimed are ended (set at the first welcome).
    orphan_deadline: Option<tokio::time::Instant>,
    /// Run directories of forgotten tasks, removed once the forgetting is durable:
    /// it commits without a flush, and a directory removed while a crash can still
    /// undo that commit would leave a held task with no trace of its run, which
    /// the restart would then start a second time.
    releases: Vec<(PathBuf, Option<crate::agent::RunHandle>)>,
}

/// How long after the first welcome the hub's resent assignments may claim
/// orphaned runs; it resends them right behind the welcome, so this is ample.
const ORPHAN_CLAIM: Duration = Duration::from_secs(5);

/// The sidecar's metrics: counters and a histogram updated as events pass,
/// gauges set when scraped.
struct SidecarStats {
    registry: prometheus_client::registry::Registry,
    queue_depth: prometheus_client::metrics::gauge::Gauge,
    busy: prometheus_client::metrics::gauge::Gauge,
    outbox: prometheus_client::metrics::gauge::Gauge,
    connected: prometheus_client::metrics::gauge::Gauge,
    runs_started: prometheus_client::metrics::counter::Counter,
    probe_failures: prometheus_client::metrics::counter::Counter,
    reconnects: prometheus_client::metrics::counter::Counter,
    wake_latency: prometheus_client::metrics::histogram::Histogram,
}

impl Default for SidecarStats {
    fn default() -> Self {
        use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
        let s = SidecarStats {
            registry: prometheus_client::registry::Registry::with_prefix("muster_sidecar"),
            queue_depth: Default::default(),
            busy: Default::default(),
            outbox: Default::default(),
            connected: Default::default(),
            runs_started: Default::default(),
            probe_failures: Default::default(),
            reconnects: Default::default(),
            wake_latency: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
        };
        let mut r = prometheus_client::registry::Registry::with_prefix("muster_sidecar");
        r.register(
            "queue_depth",
            "Tasks held by this sidecar",
            s.queue_depth.clone(),
        );
        r.register("busy_slots", "Slots in use", s.busy.clone());
        r.register(
            "outbox_depth",
            "Reports awaiting the hub's acknowledgement",
            s.outbox.clone(),
        );
        r.register(
            "connected",
            "1 while the hub session is up",
            s.connected.clone(),
        );
        r.register("runs_started", "Agent runs started", s.runs_started.clone());
        r.register(
            "probe_failures",
            "Runs that ended agent_exited: the agent was gone",
            s.probe_failures.clone(),
        );
        r.register(
            "reconnects",
            "Sessions established after the first",
            s.reconnects.clone(),
        );
        r.register(
            "wake_latency_seconds",
            "Start of a run to its verified start",
            s.wake_latency.clone(),
        );
        SidecarStats { registry: r, ..s }
    }
}

/// A `/metrics` or `/healthz` request to the daemon loop.
type Scrape = oneshot::Sender<(bool, String)>;

fn http_handler(tx: mpsc::Sender<Scrape>) -> muster_protocol::http::Handler {
    use muster_protocol::http::{PROMETHEUS, TEXT};
    Arc::new(move |path: String| {
        let tx = tx.clone();
        Box::pin(async move {
            let (otx, orx) = oneshot::channel();
            if tx.try_send(otx).is_err() {
                return (503, TEXT, "the sidecar loop is busy\n".into());
            }
            let Ok(Ok((healthy, metrics))) =
                tokio::time::timeout(Duration::from_secs(2), orx).await
            else {
                return (
                    503,
                    TEXT,
                    "unhealthy: the sidecar loop did not answer within 2 s\n".into(),
                );
            };
            match path.as_str() {
                "/metrics" => (200, PROMETHEUS, metrics),
                "/healthz" if healthy => (200, TEXT, "ok\n".into()),
                "/healthz" => (503, TEXT, "unhealthy: the queue is not writable\n".into()),
                _ => (404, TEXT, "try /metrics or /healthz\n".into()),
            }
        })
    })
}

impl Daemon {
    /// The heartbeat interval with ±10 % jitter, so agents spread their load.
    fn jittered(&mut self) -> Duration {
        let f = 0.9 + 0.2 * self.rng.unit();
        self.interval.mul_f64(f)
    }

    fn observe_run(&mut self, e: &RunEvent) {
        match e {
            RunEvent::Started {
                task, generation, ..
            } => {
                if let Some(t) = self.starting.remove(&(*task, *generation)) {
                    self.stats.wake_latency.observe(t.elapsed().as_secs_f64());
                }
            }
            RunEvent::Finished {
                task,
                generation,
                outcome,
                ..
            } => {
                self.starting.remove(&(*task, *generation));
                if *outcome == muster_protocol::msg::Outcome::AgentExited {
                    self.stats.probe_failures.inc();
                }
            }
            RunEvent::Spawned {
                task,
                generation,
                handle,
            } => {
                debug!(target: "muster::latency", task = task.0, point = "sc_spawned", at_us = muster_protocol::wall_us());
                // Stale entries (a run spawned after its task was dropped) only cost a
                // reuse; the bound keeps them from piling up.
                if self.handles.len() >= HANDLES_MAX {
                    self.handles.clear();
                }
                self.handles.insert((*task, *generation), handle.clone());
            }
        }
    }

    fn hello(&self, core: &Core) -> Hello {
        Hello {
            version: env!("CARGO_PKG_VERSION").into(),
            agent: self.cfg.name.clone(),
            capabilities: self.cfg.capabilities.clone(),
            slots: self.cfg.slots,
            resume: core.held(),
        }
    }

    fn run_spec(
        &self,
        task: muster_protocol::TaskId,
        generation: muster_protocol::Generation,
        spec: muster_protocol::msg::TaskSpec,
        run_dir: PathBuf,
    ) -> RunSpec {
        RunSpec {
            task,
            generation,
            agent: self.cfg.name.clone(),
            spec,
            run_dir,
            socket: self.socket_path.clone(),
            token: self.token_key.token(task, generation),
            probe_interval: self.interval,
        }
    }

    /// After a restart: re-attach to runs that outlived us, start what was accepted.
    async fn recover(&mut self, core: &Core) {
        use muster_protocol::msg::Phase;
        for t in core.tasks() {
            if t.phase == Phase::Finished {
                continue;
            }
            let dir = self.run_dirs.path(t.task, t.generation);
            let from_file = t.handle.is_none();
            let handle = match &t.handle {
                Some(h) => Some(h.clone()),
                // Accepted, and the spawn not recorded: the run may have left its
                // handle before the crash (see "Launch before commit").
                None => {
                    let d = dir.clone();
                    tokio::task::spawn_blocking(move || crate::agent::recorded_handle(&d))
                        .await
                        .ok()
                        .flatten()
                }
            };
            match handle {
                Some(h) => {
                    // Its own directory, never a pooled one: that would hold another
                    // run's exit status.
                    let spec = self.run_spec(t.task, t.generation, t.spec.clone(), dir);
                    self.handles.insert((t.task, t.generation), h.clone());
                    if from_file {
                        self.record_handle(t.task, t.generation, &h);
                    }
                    self.runner.recover(spec, h, self.run_tx.clone());
                }
                // Never spawned: start it (at least once).
                None => {
                    let dir = self.run_dirs.take(t.task, t.generation);
                    let spec = self.run_spec(t.task, t.generation, t.spec.clone(), dir);
                    self.runner.start(spec, self.run_tx.clone());
                }
            }
        }
    }

    /// At startup: the run directories of tasks no longer held. One whose run was
    /// spawned (spawned, then the sidecar died before its commit) is kept as an
    /// orphan for the hub's resent assignment to claim; the others are removed.
    async fn sweep_runs(&mut self, core: &Core) {
        let keep: std::collections::HashSet<String> = core
            .tasks()
            .map(|t| format!("{}-{}", t.task, t.generation))
            .collect();
        let dir = self.cfg.data_dir.join("runs");
        let found = tokio::task::spawn_blocking(move || sweep(&dir, &keep))
            .await
            .unwrap_or_default();
        if !found.is_empty() {
            warn!(
                "{} run(s) were started just before a crash and never recorded; \
                 each is adopted if the hub assigns its attempt again, else ended",
                found.len()
            );
        }
        self.orphans = found;
    }

    /// Removes the run directories whose tasks' forgetting is now durable.
    fn release_run_dirs(&mut self) {
        if self.releases.is_empty() {
            return;
        }
        let releases = std::mem::take(&mut self.releases);
        let run_dirs = Arc::clone(&self.run_dirs);
        tokio::task::spawn_blocking(move || {
            for (dir, handle) in releases {
                run_dirs.release(&dir, handle.as_ref());
            }
        });
    }

    /// Records at the core the handle of a run re-attached through its handle
    /// file, so the store holds it: the file alone would be the run's only trace,
    /// and a restart that found neither would start the attempt again.
    fn record_handle(
        &self,
        task: muster_protocol::TaskId,
        generation: muster_protocol::Generation,
        handle: &crate::agent::RunHandle,
    ) {
        let ev = RunEvent::Spawned {
            task,
            generation,
            handle: handle.clone(),
        };
        if self.run_tx.try_send(ev).is_err() {
            warn!(%task, %generation, "could not record a re-attached run's handle now; its handle file still holds it");
        }
    }

    /// Ends the orphans no resent assignment claimed, and removes their directories.
    fn end_orphans(&mut self) {
        self.orphan_deadline = None;
        let all: Vec<_> = self.orphans.keys().copied().collect();
        self.end_orphans_of(&all);
    }

    fn end_orphans_of(&mut self, which: &[(muster_protocol::TaskId, muster_protocol::Generation)]) {
        let mut ending = Vec::new();
        for k in which {
            if let Some(h) = self.orphans.remove(k) {
                ending.push((self.run_dirs.path(k.0, k.1), h));
            }
        }
        if ending.is_empty() {
            return;
        }
        warn!(
            "ending {} run(s) started before a crash whose attempts the hub did not assign again",
            ending.len()
        );
        let grace = self.cfg.agent.stop_grace;
        tokio::task::spawn_blocking(move || {
            let handles: Vec<_> = ending.iter().map(|(_, h)| h.clone()).collect();
            crate::agent::end_orphans(&handles, grace);
            for (dir, _) in ending {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    warn!("could not remove the run directory {}: {e}", dir.display());
                }
            }
        });
    }

    fn send(&mut self, msg: SessionMsg) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(msg).is_err() {
            // The hub is not reading; drop the session, the outbox replays on reconnect.
            warn!("send queue to the hub is full; reconnecting");
            if let Some(c) = &self.conn {
                c.close(5u32.into(), b"send queue full");
            }
            self.tx = None;
        }
    }

    /// Renders the sidecar's metrics from its current state.
    fn render_metrics(&self, core: &Core) -> String {
        let m = &self.stats;
        m.queue_depth.set(core.tasks().count() as i64);
        m.busy.set(core.busy() as i64);
        m.outbox.set(core.outbox().count() as i64);
        m.connected.set(i64::from(self.tx.is_some()));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &m.registry).is_err() {
            out.push_str("# encoding failed\n");
        }
        out
    }

    /// Launch before commit (see the module docs): starts the runs `effects`
    /// ask for, then handles what those runs report within [`LAUNCH_WAIT`] (the
    /// spawn, often the start too), so it joins the assignment's commit.
    async fn launch(
        &mut self,
        core: &mut Core,
        run_rx: &mut mpsc::Receiver<RunEvent>,
        effects: &mut Vec<Effect>,
    ) {
        let (starts, rest): (Vec<Effect>, Vec<Effect>) = std::mem::take(effects)
            .into_iter()
            .partition(|e| matches!(e, Effect::StartRun(..)));
        *effects = rest;
        let mut waiting = std::collections::HashSet::new();
        for e in starts {
            if let Effect::StartRun(task, generation, _) = &e {
                waiting.insert((*task, *generation));
            }
            self.perform(e);
        }
        #[cfg(feature = "test-hooks")]
        crate::test_hooks::hold_before_accept_commit(&self.cfg.data_dir, waiting.iter().copied())
            .await;
        #[cfg(feature = "test-hooks")]
        if crate::test_hooks::holding(&self.cfg.data_dir) {
            // The acceptance commits without its spawn (see `test_hooks`).
            return;
        }
        let deadline = tokio::time::Instant::now() + LAUNCH_WAIT;
        while !waiting.is_empty() {
            let Ok(Some(e)) = tokio::time::timeout_at(deadline, run_rx.recv()).await else {
                break;
            };
            if !matches!(e, RunEvent::Started { .. }) {
                waiting.remove(&e.attempt());
            }
            self.observe_run(&e);
            core.handle_run(e);
        }
        // What is already there comes along, e.g. a start right after its spawn.
        while let Ok(e) = run_rx.try_recv() {
            self.observe_run(&e);
            core.handle_run(e);
        }
        effects.extend(core.take_effects());
    }

    fn perform(&mut self, e: Effect) {
        match e {
            Effect::Send(m) => {
                if let SessionMsg::Report(r) = &m {
                    debug!(target: "muster::latency", task = r.task.0, point = "sc_report_out", kind = ?r.body.kind(), at_us = muster_protocol::wall_us());
                }
                self.send(m)
            }
            Effect::StartRun(task, generation, spec) => {
                self.stats.runs_started.inc();
                self.starting.insert((task, generation), Instant::now());
                if let Some(handle) = self.orphans.remove(&(task, generation)) {
                    // The same attempt, spawned before a crash: adopt it, never run it twice.
                    info!(%task, %generation, "adopting the run started before the crash");
                    let dir = self.run_dirs.path(task, generation);
                    let spec = self.run_spec(task, generation, spec, dir);
                    self.handles.insert((task, generation), handle.clone());
                    self.record_handle(task, generation, &handle);
                    self.runner.recover(spec, handle, self.run_tx.clone());
                    return;
                }
                // An older attempt of this task orphaned by the crash is superseded.
                let older: Vec<_> = self
                    .orphans
                    .keys()
                    .filter(|(t, g)| *t == task && *g < generation)
                    .copied()
                    .collect();
                if !older.is_empty() {
                    self.end_orphans_of(&older);
                }
                let dir = self.run_dirs.take(task, generation);
                let spec = self.run_spec(task, generation, spec, dir);
                self.runner.start(spec, self.run_tx.clone());
            }
            Effect::StopRun(task, generation) => self.runner.stop(task, generation),
            Effect::ForgetRun(task, generation) => self.runner.forget(task, generation),
            Effect::DeleteTask(task, generation) => {
                // Nothing of ours reads the directory once the task is forgotten; a run
                // still stopping keeps its open files. Without this, every attempt would
                // leave its files behind until the next restart's sweep. It goes once
                // the forgetting is durable (see `releases`).
                let dir = self.run_dirs.path(task, generation);
                let handle = self.handles.remove(&(task, generation));
                self.releases.push((dir, handle));
            }
            _ => {}
        }
    }

    fn heartbeat(&mut self, core: &Core) {
        if self.tx.is_none() {
            return;
        }
        let rtt = self.conn.as_ref().map(|c| c.rtt().as_micros() as u64);
        let host = match &mut self.system {
            Ok(s) => crate::host::figures(s, &self.cfg.data_dir),
            Err(_) => muster_protocol::msg::HostFigures::default(),
        };
        self.last_self_test = crate::host::self_test(
            &self.cfg.agent,
            rtt,
            host.disk_free_bytes,
            self.cfg.disk_floor_mb,
            self.health.clone(),
        );
        self.hb_seq += 1;
        let busy = core.busy() as u32;
        let hb = Heartbeat {
            seq: self.hb_seq,
            state: if self.draining {
                SidecarState::Draining
            } else {
                SidecarState::Ready
            },
            tasks: core.held(),
            free_slots: self.cfg.slots.saturating_sub(busy),
            self_test: self.last_self_test.clone(),
            host,
        };
        self.send(SessionMsg::Heartbeat(hb));
        if busy == 0 && !self.cfg.agent.health_command.is_empty() && !self.health_running {
            // The health command runs when idle, off the loop; its result joins the next heartbeat.
            self.health_running = true;
            let agent = self.cfg.agent.clone();
            let tx = self.health_tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(crate::agent::run_health(&agent).await).await;
            });
        }
    }

    fn answer(&mut self, core: &mut Core, req: Request) -> Answer {
        match req {
            Request::Agent(req) => self.agent(core, req),
            Request::Query { cmd } if cmd == "status" => Answer::ok("status", self.status(core)),
            Request::Query { cmd } if cmd == "whoami" => Answer::ok(
                self.cfg.name.to_string(),
                serde_json::json!({ "name": self.cfg.name.as_str(), "hub": self.cfg.hub, "capabilities": self.cfg.capabilities }),
            ),
            Request::Query { cmd } => Answer::err(&format!("unknown request {cmd:?}")),
        }
    }

    /// An agent request: only for the attempt whose token it carries.
    fn agent(&mut self, core: &mut Core, req: local::AgentRequest) -> Answer {
        use muster_protocol::{Generation, TaskId};
        let (Some(task), Some(generation)) = (req.task, req.generation) else {
            warn!(
                task = req.task,
                generation = req.generation,
                "local socket: refused an agent request that names no attempt"
            );
            return Answer::err(
                "this request does not say which attempt it is about: run it from the agent's environment, where MUSTER_TASK_ID, MUSTER_GENERATION and MUSTER_TASK_TOKEN are set",
            );
        };
        let (task, generation) = (TaskId(task), Generation(generation));
        let Some(token) = req.token else {
            warn!(%task, %generation, "local socket: refused an agent request without a task token");
            return Answer::err(&format!(
                "this request carries no task token for task {task} generation {generation}: run it from the agent's environment, where MUSTER_TASK_TOKEN is set (the agent may only report on its own attempt)"
            ));
        };
        if !self.token_key.verify(task, generation, &token) {
            warn!(%task, %generation, "local socket: refused an agent request whose task token does not match");
            return Answer::err(&format!(
                "this request's task token does not match task {task} generation {generation}; the agent may only report on its own attempt"
            ));
        }
        if matches!(req.cmd, crate::core::AgentCmd::Current) {
            return match core.attempt(task, generation) {
                Ok(t) => Answer::ok(
                    format!("task {task} generation {generation}"),
                    serde_json::json!({ "id": t.task.0, "generation": t.generation.0, "phase": t.phase, "title": t.spec.title, "pid": t.handle.as_ref().and_then(|h| h.pid) }),
                ),
                Err(m) => Answer::err(&m),
            };
        }
        match core.handle_agent(task, generation, req.cmd) {
            Ok(m) => Answer::ok(m, serde_json::Value::Null),
            Err(m) => Answer::err(&m),
        }
    }

    fn status(&self, core: &Core) -> serde_json::Value {
        let tasks: Vec<_> = core
            .tasks()
            .map(|t| serde_json::json!({ "id": t.task.0, "generation": t.generation.0, "phase": t.phase, "title": t.spec.title, "pid": t.handle.as_ref().and_then(|h| h.pid) }))
            .collect();
        serde_json::json!({
            "name": self.cfg.name.as_str(),
            "hub": self.cfg.hub,
            "connected": self.tx.is_some(),
            "state": if self.draining { "draining" } else { "ready" },
            "slots": self.cfg.slots,
            "free_slots": self.cfg.slots.saturating_sub(core.busy() as u32),
            "tasks": tasks,
            "outbox": core.outbox().count(),
            "heartbeat_interval_ms": self.interval.as_millis() as u64,
            "self_test": self.last_self_test,
        })
    }
}

/// Ends orphaned runs under `runs` (directories not in `keep`) and removes
/// those directories; the pool (`.free`) stays. Returns how many runs were
/// still alive. Blocking, for up to `grace` when there are any.
/// Removes the run directories of attempts not in `keep` that never spawned a
/// run, and returns those that did (by attempt, parsed from `<task>-<generation>`).
fn sweep(
    runs: &std::path::Path,
    keep: &std::collections::HashSet<String>,
) -> std::collections::HashMap<
    (muster_protocol::TaskId, muster_protocol::Generation),
    crate::agent::RunHandle,
> {
    let mut orphans = std::collections::HashMap::new();
    let Ok(entries) = std::fs::read_dir(runs) else {
        return orphans;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy().into_owned();
        if name.starts_with('.') || keep.contains(&name) {
            continue;
        }
        let dir = e.path();
        let attempt = name.split_once('-').and_then(|(t, g)| {
            Some((
                muster_protocol::TaskId(t.parse().ok()?),
                muster_protocol::Generation(g.parse().ok()?),
            ))
        });
        match (attempt, crate::agent::recorded_handle(&dir)) {
            (Some(a), Some(h)) => {
                orphans.insert(a, h);
            }
            (None, Some(h)) => {
                // Not an attempt's directory name: nothing can claim it.
                crate::agent::end_orphans(&[h], Duration::from_secs(10));
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    warn!("could not remove the run directory {}: {e}", dir.display());
                }
            }
            _ => {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    warn!("could not remove the run directory {}: {e}", dir.display());
                }
            }
        }
    }
    orphans
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ u64::from(std::process::id()).rotate_left(40)) | 1
}

/// Keeps one session to the hub, reconnecting with backoff.
async fn session_loop(hub: String, cred: Credential, to_main: mpsc::Sender<ToMain>) {
    let mut backoff = backoff::reconnect();
    // A hub at its handshake or connection cap (a whole fleet reconnecting after
    // its restart) refuses at once: those retries come soon, jittered, and do not
    // grow the backoff that real failures use.
    let mut busy = backoff::busy();
    let mut storm = LogBudget::new(1, Duration::from_secs(30));
    let origin = Instant::now();
    let mut rng = Rng::new(seed());
    loop {
        let (htx, hrx) = oneshot::channel();
        if to_main.send(ToMain::HelloWanted(htx)).await.is_err() {
            return;
        }
        let Ok(hello) = hrx.await else { return };
        match connect(&hub, &cred, hello).await {
            Ok((endpoint, conn, welcome, wr, rd)) => {
                if backoff.failures() > 0 {
                    info!(
                        hub,
                        "reconnected after {} failed attempts",
                        backoff.failures()
                    );
                } else {
                    info!(hub, "connected");
                }
                backoff.reset();
                busy.reset();
                let (tx, rx) = mpsc::channel(SEND_QUEUE_LEN);
                let connected = ToMain::Connected {
                    tx,
                    welcome,
                    conn: conn.clone(),
                };
                if to_main.send(connected).await.is_err() {
                    return;
                }
                let reason = pump(wr, rd, rx, &to_main).await;
                conn.close(0u32.into(), b"session over");
                drop(endpoint);
                if to_main.send(ToMain::Disconnected).await.is_err() {
                    return;
                }
                warn!(hub, "session ended: {reason}");
            }
            Err(ConnectFailure::Busy(e)) => {
                debug!(hub, "{e}");
                tokio::time::sleep(busy.next_delay(rng.unit())).await;
                continue;
            }
            Err(ConnectFailure::Failed(e)) => {
                if let Some(suppressed) = storm.allow(origin.elapsed()) {
                    let more = if suppressed > 0 {
                        format!(" ({suppressed} more failures not logged)")
                    } else {
                        String::new()
                    };
                    warn!(
                        hub,
                        attempt = backoff.failures() + 1,
                        "cannot connect: {e}{more}"
                    );
                }
            }
        }
        tokio::time::sleep(backoff.next_delay(rng.unit())).await;
    }
}

type Writer = FramedWrite<quinn::SendStream, tokio_util::codec::LengthDelimitedCodec>;
type Reader = FramedRead<quinn::RecvStream, tokio_util::codec::LengthDelimitedCodec>;

/// Why a connection attempt failed.
enum ConnectFailure {
    /// The hub refused the connection at a cap (a fleet reconnecting at once):
    /// retry soon, without the growing backoff.
    Busy(String),
    /// Anything else.
    Failed(String),
}

impl From<String> for ConnectFailure {
    fn from(s: String) -> Self {
        ConnectFailure::Failed(s)
    }
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectFailure::Busy(s) | ConnectFailure::Failed(s) => f.write_str(s),
        }
    }
}

/// Connects, sends the hello and waits for the welcome: only then is the session up.
async fn connect(
    hub: &str,
    cred: &Credential,
    hello: Hello,
) -> Result<(quinn::Endpoint, quinn::Connection, Welcome, Writer, Reader), ConnectFailure> {
    let (endpoint, conn) = client::connect(hub, cred).await.map_err(|e| match e {
        client::ClientError::Busy(_) => ConnectFailure::Busy(e.to_string()),
        e => ConnectFailure::Failed(e.to_string()),
    })?;
    let (welcome, wr, rd) = open_session(&conn, hello)
        .await
        .map_err(ConnectFailure::Failed)?;
    Ok((endpoint, conn, welcome, wr, rd))
}

/// Opens the session stream on `conn`: the hello, then the hub's welcome or refusal.
async fn open_session(
    conn: &quinn::Connection,
    hello: Hello,
) -> Result<(Welcome, Writer, Reader), String> {
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| client::refused_or_lost(e).to_string())?;
    let max = muster_protocol::limits::FRAME_BYTES_MAX;
    let mut wr = FramedWrite::new(send, frame_codec(max));
    let mut rd = FramedRead::new(recv, frame_codec(max));
    let open = Open {
        protocol: PROTOCOL_VERSION,
        body: OpenBody::Session(hello),
    };
    let bytes = encode(&open).map_err(|e| e.to_string())?;
    // A hub that refused the certificate at accept closes the connection with a
    // code that says so: report that rather than the bare write error.
    wr.send(Bytes::from(bytes))
        .await
        .map_err(|e| match conn.close_reason() {
            Some(r) => client::refused_or_lost(r).to_string(),
            None => e.to_string(),
        })?;
    let frame = match tokio::time::timeout(WELCOME_TIMEOUT, rd.next()).await {
        Ok(Some(Ok(f))) => f,
        Ok(Some(Err(e))) => {
            return Err(match conn.close_reason() {
                Some(r) => client::refused_or_lost(r).to_string(),
                None => e.to_string(),
            });
        }
        Ok(None) => {
            return Err(match conn.close_reason() {
                Some(r) => client::refused_or_lost(r).to_string(),
                None => "the hub closed the session before welcoming it".into(),
            });
        }
        Err(_) => return Err("no welcome from the hub within 10 s".into()),
    };
    match decode::<HubMsg>(&frame) {
        Ok(HubMsg::Welcome(w)) => Ok((w, wr, rd)),
        Ok(HubMsg::Refused(r)) => Err(match r {
            Refused::Revoked => format!(
                "refused: {r} (this sidecar's credential no longer works; run `muster-sidecar enroll` with a new token)"
            ),
            other => format!("refused: {other}"),
        }),
        Ok(other) => Err(format!("expected a welcome, got {other:?}")),
        Err(e) => Err(format!("malformed welcome: {e}")),
    }
}

/// Moves frames both ways until either side fails; returns why.
async fn pump(
    mut wr: Writer,
    mut rd: Reader,
    mut rx: mpsc::Receiver<SessionMsg>,
    to_main: &mpsc::Sender<ToMain>,
) -> String {
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { return "closed locally".into() };
                let bytes = match encode(&msg) {
                    Ok(b) => b,
                    Err(e) => return e.to_string(),
                };
                if let Err(e) = wr.send(Bytes::from(bytes)).await {
                    return format!("send: {e}");
                }
            }
            frame = rd.next() => {
                let frame = match frame {
                    Some(Ok(f)) => f,
                    Some(Err(e)) => return format!("receive: {e}"),
                    None => return "the hub closed the session".into(),
                };
                match decode::<HubMsg>(&frame) {
                    Ok(HubMsg::Refused(r)) => return format!("refused: {r}"),
                    Ok(m) => {
                        if to_main.send(ToMain::Hub(m)).await.is_err() {
                            return "stopping".into();
                        }
                    }
                    Err(e) => return format!("malformed message from the hub: {e}"),
                }
            }
        }
    }
}
