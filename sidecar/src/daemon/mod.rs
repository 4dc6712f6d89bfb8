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

mod effects;
mod heartbeat;
mod metrics;
mod recovery;
mod requests;
mod session;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use muster_protocol::client::Credential;
use muster_protocol::msg::{HubMsg, SelfTest, SessionMsg};
use muster_protocol::pace::Rng;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::agent::{RunEvent, Runner};
use crate::config::SidecarConfig;
use crate::core::{Core, Effect};
use crate::local::{self, Incoming};
use crate::queue::{Queue, QueueError};
use crate::rundirs::RunDirs;
use metrics::{Scrape, SidecarStats, WakeClock, http_handler};
use recovery::ORPHAN_CLAIM;
use session::{ToMain, session_loop};

/// Events handled per commit at most.
const BATCH_LEN_MAX: usize = 1024;
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
        wake: WakeClock::default(),
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
        d.note_effects(&effects);
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

/// One input to the daemon loop.
enum Ev {
    Session(ToMain),
    Run(RunEvent),
    Local(Incoming),
}

/// The shell's state beside the core, owned by the daemon loop.
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
    wake: WakeClock,
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

/// A seed for jitter that differs between sidecars started at once.
fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ u64::from(std::process::id()).rotate_left(40)) | 1
}
