//! The sidecar's IO shell: the hub session (connect, hello, welcome, reconnect),
//! heartbeats, the agent runner, the local socket, and the queue, joined around
//! the [`Core`] by one loop that owns it.
//!
//! ```text
//! session task ──ToMain──┐
//! runner events ─────────┤
//! local socket ──────────┼─▶ daemon loop: batch ─▶ Core ─▶ Queue::apply (one commit) ─▶ sends, runs, answers
//! Core::poll_timeout ────┘   (the loop's one timer; the core decides heartbeats,
//!                             start deadlines, the orphan claim, run directory release)
//! ```
//!
//! Files: this one (start, the loop, drain and shutdown, the commit),
//! [`session`] (the hub connection), [`effects`] (performing what the core
//! asks, launch before commit), [`recovery`] (re-attaching after a restart,
//! orphans), [`heartbeat`], [`requests`] (the local socket's requests) and
//! [`metrics`].
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
//! - keeps the runs of directories whose task it does not hold as orphans (the
//!   hub never heard `Accepted`, so it resends or reassigns the task): the
//!   resent assignment adopts its run, the core ends the others after its claim
//!   window, and
//! - re-attaches to the run of a task it holds without a recorded handle,
//!   instead of starting it a second time.

mod activity;
mod effects;
mod heartbeat;
mod metrics;
mod recovery;
mod requests;
mod session;
mod workspaces;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use muster_protocol::client::Credential;
use muster_protocol::msg::{HubMsg, SelfTest, SessionMsg};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, error, info};

use crate::agent::{Mode, RunEvent, Runner, Verify};
use crate::config::SidecarConfig;
use crate::core::{Core, Effect, Policy, Verifier};
use crate::local::{self, Incoming};
use crate::queue::{Queue, QueueError};
use crate::rundirs::RunDirs;
use metrics::{Scrape, SidecarStats, WakeClock, http_handler};
use session::{ToMain, session_loop};
use workspaces::{Finalize, Sweep};

/// Events handled per commit at most.
const BATCH_LEN_MAX: usize = 1024;
/// How long SIGTERM waits for the hub to acknowledge the outbox.
const DRAIN_GRACE: Duration = Duration::from_secs(3);
/// Local socket requests waiting for the loop; the socket task answers "busy"
/// beyond (see `local::serve`).
const LOCAL_QUEUE_LEN: usize = 64;
/// Runner events waiting for the loop; a run's task waits for room.
const RUN_QUEUE_LEN: usize = 256;
/// Session messages waiting for the loop; the session task waits for room, so
/// a slow loop slows the reading of the hub's stream.
const SESSION_QUEUE_LEN: usize = 1024;

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
    /// The workspace layer, shared with the runner (one lock per mirror).
    pub workspaces: Arc<crate::workspace::Workspaces>,
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
    let credential = opts.credential.clone();
    let (mut d, mut core, queue, mut io) = start(opts).await?;
    let (to_main, from_session) = mpsc::channel::<ToMain>(SESSION_QUEUE_LEN);
    io.from_session = Some(from_session);
    let mut hubs = vec![d.cfg.hub.clone()];
    hubs.extend(d.cfg.hubs.iter().filter(|h| **h != d.cfg.hub).cloned());
    let session = tokio::spawn(session_loop(hubs, credential, to_main, Arc::clone(&d.logs)));
    io.tasks.push(session);
    ready();
    info!(name = %d.cfg.name, hub = d.cfg.hub, "sidecar started");
    let result = serve(&mut d, &mut core, &queue, &mut io, shutdown).await;
    if result.is_ok() {
        drain(&mut d, &mut core, &queue, &mut io).await;
    }
    for t in io.tasks {
        t.abort();
    }
    if let Some(c) = &d.conn {
        c.close(0u32.into(), b"sidecar stopping");
    }
    let _ = std::fs::remove_file(&d.socket_path);
    result
}

/// The loop's inputs and the tasks that feed them.
struct Io {
    from_session: Option<mpsc::Receiver<ToMain>>,
    /// Kept so the local and scrape inputs stay open when nothing else holds
    /// their senders (no local socket, no HTTP listener).
    _senders: (mpsc::Sender<Incoming>, mpsc::Sender<Scrape>),
    run_rx: mpsc::Receiver<RunEvent>,
    local_rx: mpsc::Receiver<Incoming>,
    /// Agent reports that ended an attempt, back with what its workspace holds.
    finalize_rx: mpsc::Receiver<Finalize>,
    health_rx: mpsc::Receiver<Result<(), String>>,
    scrape_rx: mpsc::Receiver<Scrape>,
    /// The session, local socket, HTTP and output-cap tasks, aborted at the end.
    tasks: Vec<JoinHandle<()>>,
}

/// Opens the queue, binds the sockets, builds the core, and re-attaches to
/// the runs that outlived the last process: all before the session starts,
/// since the hub resends assignments not yet accepted, and their runs must not
/// meet an orphan or lose their directory.
async fn start(opts: Options) -> Result<(Daemon, Core, Arc<Queue>, Io), DaemonError> {
    let cfg = opts.config;
    let data_dir = cfg.data_dir.clone();
    std::fs::create_dir_all(data_dir.join("runs"))
        .map_err(|e| DaemonError::Start(format!("{}: {e}", data_dir.display())))?;
    let queue = Arc::new(Queue::open(&data_dir.join(crate::queue::DB_FILE))?);
    // Before any run starts or re-attaches: every attempt's token derives from it.
    let token_key =
        crate::tasktoken::TokenKey::load_or_create(&data_dir).map_err(DaemonError::Start)?;
    let loaded = queue.load()?;
    let mut core = Core::new(
        loaded.tasks,
        loaded.outbox,
        loaded.next_report,
        policy(&cfg),
        seed(),
    );
    let mut tasks = Vec::new();
    let (local_tx, local_rx) = mpsc::channel::<Incoming>(LOCAL_QUEUE_LEN);
    let socket_path = data_dir.join(local::SOCKET_FILE);
    if opts.local_socket {
        let (listener, _) = local::bind(&data_dir).map_err(DaemonError::Start)?;
        tasks.push(tokio::spawn(local::serve(listener, local_tx.clone())));
    }
    let (run_tx, run_rx) = mpsc::channel(RUN_QUEUE_LEN);
    let (health_tx, health_rx) = mpsc::channel(1);
    let (finalize_tx, finalize_rx) = mpsc::channel(LOCAL_QUEUE_LEN);
    let (scrape_tx, scrape_rx) = mpsc::channel::<Scrape>(8);
    if let Some(addr) = cfg.http_listen {
        let http = muster_protocol::http::serve(addr, http_handler(scrape_tx.clone()))
            .await
            .map_err(DaemonError::Start)?;
        tasks.push(http);
    }
    // Reading the pool is a directory listing: off the async workers.
    let runs_root = cfg.data_dir.join("runs");
    let pool_cap = (cfg.slots as usize * 2).max(8);
    let run_dirs = tokio::task::spawn_blocking(move || RunDirs::new(runs_root, pool_cap))
        .await
        .map_err(|e| DaemonError::Start(format!("run directories: {e}")))?;
    let logs = Arc::new(crate::logs::Logs::new(&cfg.data_dir, cfg.logs.clone()));
    let mut d = Daemon {
        logs,
        log_sweep: workspaces::LogSweep::default(),
        origin: Instant::now(),
        token_key,
        run_dirs: Arc::new(run_dirs),
        handles: std::collections::HashMap::new(),
        cfg,
        runner: opts.runner,
        run_tx,
        socket_path,
        tx: None,
        conn: None,
        hb_seq: 0,
        system: sysinfo::System::new(),
        last_self_test: SelfTest::default(),
        health: Ok(()),
        health_running: false,
        health_tx,
        draining: false,
        stats: SidecarStats::default(),
        wake: WakeClock::default(),
        probe: Arc::new(std::sync::Mutex::new(None)),
        run_spawned: std::collections::HashMap::new(),
        orphans: std::collections::HashMap::new(),
        releases: Vec::new(),
        workspaces: opts.workspaces,
        finalize_tx,
        sweep: Sweep::default(),
        transcripts: activity::Transcripts::default(),
        held: crate::core::HeldForgets::default(),
    };
    let orphans = d.sweep_runs(&core).await;
    // After the sweep: the pass looks at every directory under runs/.
    tasks.push(tokio::spawn(workspaces::cap_running(Arc::clone(&d.logs))));
    core.handle_startup(d.now(), orphans);
    d.recover(&core).await;
    d.finish_abandoned_workspaces(&core);
    let io = Io {
        from_session: None,
        _senders: (local_tx, scrape_tx),
        run_rx,
        local_rx,
        finalize_rx,
        health_rx,
        scrape_rx,
        tasks,
    };
    Ok((d, core, queue, io))
}

/// The core's policy from sidecar.toml: the one place the core's view of
/// `[agent]` is made.
fn policy(cfg: &SidecarConfig) -> Policy {
    Policy {
        slots: cfg.slots,
        mode: cfg.agent.mode.into(),
        settle: cfg.agent.settle,
        start_timeout: cfg.agent.start_timeout,
        verify: match (cfg.agent.mode, &cfg.agent.verify) {
            (Mode::Wake, Verify::Probe(_)) => Verifier::Runner,
            _ => Verifier::Agent,
        },
    }
}

/// The loop: wait for input or the core's next deadline, take what else is
/// queued (up to [`BATCH_LEN_MAX`]), hand it all to the core, commit, then act.
async fn serve(
    d: &mut Daemon,
    core: &mut Core,
    queue: &Arc<Queue>,
    io: &mut Io,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    // Watchdog pings from this loop, at half the interval systemd asked for (at most 1 s apart).
    let ping = sd_notify::watchdog_enabled().map_or(Duration::from_secs(1), |w| {
        (w / 2).min(Duration::from_secs(1))
    });
    let mut tick = tokio::time::interval(ping.max(Duration::from_millis(10)));
    tokio::pin!(shutdown);
    let mut events: Vec<Ev> = Vec::with_capacity(BATCH_LEN_MAX);
    let Some(from_session) = io.from_session.as_mut() else {
        return Err(DaemonError::Start("no session channel".into()));
    };
    loop {
        // A deadline too far to name as an Instant is never.
        let due = core.poll_timeout().and_then(|at| d.origin.checked_add(at));
        tokio::select! {
            Some(m) = from_session.recv() => events.push(Ev::Session(m)),
            Some(e) = io.run_rx.recv() => events.push(Ev::Run(e)),
            Some(l) = io.local_rx.recv() => events.push(Ev::Local(l)),
            Some(f) = io.finalize_rx.recv() => events.push(Ev::Finalized(f)),
            _ = sleep_until(due), if due.is_some() => events.push(Ev::Timeout),
            Some(req) = io.scrape_rx.recv() => {
                scrape(d, core, queue, req);
                continue;
            }
            Some(h) = io.health_rx.recv() => {
                d.health = h;
                d.health_running = false;
                continue;
            }
            _ = tick.tick() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                d.maybe_sweep();
                continue;
            }
            _ = &mut shutdown => return Ok(()),
        }
        while events.len() < BATCH_LEN_MAX {
            if let Ok(m) = from_session.try_recv() {
                events.push(Ev::Session(m));
            } else if let Ok(e) = io.run_rx.try_recv() {
                events.push(Ev::Run(e));
            } else {
                break;
            }
        }
        let mut answers = Vec::new();
        for ev in events.drain(..) {
            if let Some(answer) = d.handle(core, ev) {
                answers.push(answer);
            }
        }
        let mut effects = core.take_effects();
        d.note_effects(&effects);
        if effects
            .iter()
            .any(|e| matches!(e, Effect::StartRun(..) | Effect::AdoptRun(..)))
        {
            d.launch(core, &mut io.run_rx, &mut effects).await;
        }
        core.coalesce_reports(&mut effects);
        // Commit before acknowledge: store effects are durable before anything is sent.
        // A batch that only forgets commits nothing now: it rides on the next flushed one.
        let store = d
            .held
            .commit_now(effects.iter().filter(|e| e.is_store()).cloned().collect());
        #[cfg(feature = "test-hooks")]
        crate::test_hooks::hold_before_handle_commit(&d.cfg.data_dir, &store).await;
        if !store.is_empty()
            && let Err(e) = commit(queue, store).await?
        {
            error!("fatal: {e}");
            return Err(e.into());
        }
        for e in effects {
            d.perform(core, e);
        }
        d.release_run_dirs();
        d.maybe_sweep();
        for (answer, reply) in answers {
            let _ = reply.send(answer);
        }
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Answers a `/metrics`, `/livez` or `/readyz` request: metrics from the loop's
/// state; whether the queue is writable from a write probe (a redb commit, off
/// the async workers) at most once per [`metrics::PROBE_EVERY`].
fn scrape(d: &Daemon, core: &Core, queue: &Arc<Queue>, req: Scrape) {
    let metrics = d.render_metrics(core);
    let connected = d.tx.is_some();
    let cache = Arc::clone(&d.probe);
    let fresh = lock(&cache)
        .as_ref()
        .filter(|(at, _)| at.elapsed() < metrics::PROBE_EVERY)
        .map(|(_, v)| v.clone());
    if let Some(writable) = fresh {
        let _ = req.send(metrics::Answer {
            writable,
            connected,
            metrics,
        });
        return;
    }
    let q = Arc::clone(queue);
    let probe = [Effect::NextReport(core.next_report())];
    tokio::spawn(async move {
        let writable = tokio::task::spawn_blocking(move || {
            q.apply(&probe).map(drop).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|_| Err("the write probe panicked".into()));
        *lock(&cache) = Some((Instant::now(), writable.clone()));
        let _ = req.send(metrics::Answer {
            writable,
            connected,
            metrics,
        });
    });
}

/// The last verdict of the queue's write probe and when it was made, shared
/// with the task that makes the probe.
type ProbeCache = Arc<std::sync::Mutex<Option<(Instant, Result<(), String>)>>>;

/// The probe cache's lock; a panic while it was held leaves a usable value.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Stops taking work, tells the hub, and gives it [`DRAIN_GRACE`] to
/// acknowledge the outbox.
async fn drain(d: &mut Daemon, core: &mut Core, queue: &Arc<Queue>, io: &mut Io) {
    info!("draining");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    d.draining = true;
    d.heartbeat(core);
    let Some(from_session) = io.from_session.as_mut() else {
        return;
    };
    let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
    while core.outbox().next().is_some() && d.tx.is_some() {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline, from_session.recv()).await else {
            break;
        };
        if let ToMain::Hub(msg @ HubMsg::Ack { .. }) = m {
            core.handle_hub(d.now(), msg);
            // Only the store effects: nothing else is done while draining.
            let effects = core.take_effects();
            let now = d
                .held
                .commit_now(effects.into_iter().filter(Effect::is_store).collect());
            if !now.is_empty() {
                let q = Arc::clone(queue);
                let _ = tokio::task::spawn_blocking(move || q.apply(&now)).await;
            }
        }
    }
    // What was forgotten, flushed before the process ends (the next-report
    // write makes the commit a flushed one): the next start then replays
    // nothing the hub already has.
    let mut held = d.held.take();
    if !held.is_empty() {
        held.push(Effect::NextReport(core.next_report()));
        let q = Arc::clone(queue);
        let _ = tokio::task::spawn_blocking(move || q.apply(&held)).await;
    }
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

/// One input to the daemon loop.
enum Ev {
    Session(ToMain),
    Run(RunEvent),
    Local(Incoming),
    /// An agent's `complete` or `fail`, with what its workspace holds.
    Finalized(Finalize),
    /// The core's [`Core::poll_timeout`] has come.
    Timeout,
}

/// A local request's answer, sent once the batch's commit is done.
type Reply = (local::Answer, oneshot::Sender<local::Answer>);

/// The shell's state beside the core, owned by the daemon loop.
struct Daemon {
    cfg: SidecarConfig,
    /// The origin of the core's `now`: fixed for the life of the process.
    origin: Instant,
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
    hb_seq: u64,
    system: Result<sysinfo::System, sysinfo::Error>,
    last_self_test: SelfTest,
    health: Result<(), String>,
    health_running: bool,
    health_tx: mpsc::Sender<Result<(), String>>,
    draining: bool,
    stats: SidecarStats,
    /// When each run was started, for the wake latency.
    wake: WakeClock,
    /// The last verdict of the queue's write probe, and when it was made.
    probe: ProbeCache,
    /// When each run was spawned, for the run duration histogram.
    run_spawned:
        std::collections::HashMap<(muster_protocol::TaskId, muster_protocol::Generation), Instant>,
    /// The handles of runs found at startup for attempts the store never
    /// recorded (spawned, then the sidecar died before the acceptance's
    /// commit). The core decides which are adopted and which ended.
    orphans: std::collections::HashMap<
        (muster_protocol::TaskId, muster_protocol::Generation),
        crate::agent::RunHandle,
    >,
    /// Run directories the core released in this batch, removed after it
    /// (their output kept first).
    releases: Vec<(
        (muster_protocol::TaskId, muster_protocol::Generation),
        PathBuf,
        Option<crate::agent::RunHandle>,
    )>,
    /// Each attempt's output: kept, capped, swept, read.
    logs: Arc<crate::logs::Logs>,
    /// When logs were last capped and swept.
    log_sweep: workspaces::LogSweep,
    /// The workspace layer, shared with the runner.
    workspaces: Arc<crate::workspace::Workspaces>,
    /// Where finished workspaces come back for [`Ev::Finalized`].
    finalize_tx: mpsc::Sender<Finalize>,
    /// When the finished workspaces were last swept, and whether a sweep runs.
    sweep: Sweep,
    /// The transcripts followed for usage (`[agent] transcript`).
    transcripts: activity::Transcripts,
    /// Forget-only batches waiting for the next flushed commit.
    held: crate::core::HeldForgets,
}

impl Daemon {
    /// The core's `now`.
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Hands one input to the core; a local request's answer comes back to be
    /// sent after the commit.
    fn handle(&mut self, core: &mut Core, ev: Ev) -> Option<Reply> {
        let now = self.now();
        match ev {
            Ev::Session(ToMain::HelloWanted(reply)) => {
                let _ = reply.send(self.hello(core));
            }
            Ev::Session(ToMain::Connected { tx, welcome, conn }) => {
                if self.hb_seq > 0 {
                    self.stats.reconnects.inc();
                }
                self.tx = Some(tx);
                self.conn = Some(conn);
                core.handle_connected(now, &welcome);
            }
            Ev::Session(ToMain::Disconnected) => {
                self.tx = None;
                self.conn = None;
                core.handle_disconnected();
            }
            Ev::Session(ToMain::Hub(msg)) => {
                if let HubMsg::Assign(a) = &msg {
                    debug!(target: "muster::latency", task = a.task.0, point = "sc_assign_in", at_us = muster_protocol::wall_us());
                }
                core.handle_hub(now, msg);
            }
            Ev::Run(e) => {
                self.observe_run(&e);
                if let RunEvent::Finished {
                    task, generation, ..
                } = &e
                {
                    self.sweep.due = true;
                    // The transcript's last lines (the result, with the cost)
                    // are reported before the end.
                    self.read_usage(core, Some(e.attempt()));
                    self.logs.mark_ended(*task, *generation);
                }
                core.handle_run(now, e);
            }
            Ev::Local((req, reply)) => {
                if let local::Request::Agent(a) = &req
                    && matches!(
                        a.cmd,
                        crate::core::AgentCmd::Complete { .. } | crate::core::AgentCmd::Fail { .. }
                    )
                    && let (Some(t), Some(g)) = (a.task, a.generation)
                {
                    let attempt = (muster_protocol::TaskId(t), muster_protocol::Generation(g));
                    self.read_usage(core, Some(attempt));
                }
                return self.local(core, req, reply);
            }
            Ev::Finalized(f) => {
                self.sweep.due = true;
                return Some(self.finalized(core, f));
            }
            Ev::Timeout => {
                // Timeouts are mostly heartbeats: usage is read at their pace.
                self.read_usage(core, None);
                core.handle_timeout(now);
            }
        }
        None
    }
}

/// A seed for jitter that differs between sidecars started at once.
fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ u64::from(std::process::id()).rotate_left(40)) | 1
}
