//! The agent runner: starts an attempt in exec or wake mode, verifies the
//! start, probes the agent while it runs, stops it on cancel or abandon, and
//! re-attaches to runs that outlived a sidecar restart.

use std::path::PathBuf;
use std::time::Duration;

// The agent's settings are declared with the rest of sidecar.toml; the
// runner reads them through these names.
pub use crate::config::{AgentConfig, ExecStatus, Mode, Probe, Verify};

// === The runner API ===
//
// What the sidecar hands the runner (`RunSpec`), what it persists
// (`RunHandle`), what comes back (`RunEvent`), and the real runner
// (`ProcessRunner`). The submodules split the work by mode:
//
// ```text
//   start/recover ──► Attempt (one per run, owns the event sender)
//                       ├─ exec.rs   spawn (reaper or sh wrapper), settle, wait, stop by process group
//                       │    └─ reaper.rs  the helper process that parents exec runs and records their statuses
//                       └─ wake.rs   wake command, verify (process/command), probe loop
//   launch.rs  run directory, task.json, env, tails, status file
//   sys.rs     signals, /proc, sysinfo process search
// ```

mod exec;
mod launch;
mod reaper;
mod sys;
pub(crate) use sys::{group_of, groups_cpu_ms};
pub mod template;
mod wake;

pub use reaper::{SUBCOMMAND as REAPER_SUBCOMMAND, main as reaper_main};

/// This process's own executable, to start its reaper from: on Linux
/// `/proc/self/exe`, which still names the running binary after an upgrade
/// replaced the file on disk.
///
/// # Errors
/// Elsewhere, when [`std::env::current_exe`] cannot tell.
pub fn own_executable() -> std::io::Result<PathBuf> {
    if cfg!(target_os = "linux") {
        return Ok(PathBuf::from("/proc/self/exe"));
    }
    std::env::current_exe()
}

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use muster_protocol::msg::{Failure, Outcome, TaskSpec};
use muster_protocol::{AgentName, Generation, TaskId};

use tokio::sync::{mpsc, watch};

use crate::workspace::{Fault, WorkspaceConfig, WorkspaceError, WorkspaceMode, Workspaces};

/// Whether any process of the process group `pgid` is still alive.
pub fn group_alive(pgid: u32) -> bool {
    sys::group_alive(pgid)
}

/// The file in a run directory that names the run's process, written right
/// after the spawn and before the sidecar's commit (see `daemon/mod.rs`, "Launch
/// before commit"): a restarted sidecar finds with it a run it never recorded.
pub const HANDLE_FILE: &str = "handle";

/// The handle an exec run wrote into `dir`, if it is this directory's own (a
/// pooled directory may still hold an earlier run's). Blocking.
pub fn recorded_handle(dir: &std::path::Path) -> Option<RunHandle> {
    use std::io::Read;
    let mut text = Vec::new();
    std::fs::File::open(dir.join(HANDLE_FILE))
        .ok()?
        .take(launch::HANDLE_BYTES_MAX)
        .read_to_end(&mut text)
        .ok()?;
    let handle: RunHandle = serde_json::from_slice(&text).ok()?;
    (handle.run_dir == dir && handle.mode == RunMode::Exec && handle.pid.is_some())
        .then_some(handle)
}

/// Ends exec runs nobody watches (each handle from [`recorded_handle`]):
/// SIGTERM to each live process group, SIGKILL to those still alive after
/// `grace`. Returns how many were alive. Blocking for up to `grace`.
pub fn end_orphans(handles: &[RunHandle], grace: Duration) -> usize {
    let groups: Vec<u32> = handles
        .iter()
        .filter_map(|h| {
            let pid = h.pid?;
            // An exited leader may still have children in its group.
            (!sys::pid_reused(pid, h.start_ticks) && sys::group_alive(pid)).then_some(pid)
        })
        .collect();
    for &pgid in &groups {
        sys::signal_group(pgid, libc::SIGTERM);
    }
    let deadline = std::time::Instant::now() + grace;
    let mut left = groups.clone();
    while !left.is_empty() {
        left.retain(|&g| sys::group_alive(g));
        let now = std::time::Instant::now();
        if now >= deadline {
            for &pgid in &left {
                sys::signal_group(pgid, libc::SIGKILL);
            }
            break;
        }
        std::thread::sleep(ORPHAN_POLL.min(deadline - now));
    }
    groups.len()
}

/// How often a workspace that takes long to prepare reports progress (well
/// inside the hub's default start_timeout of 60 s).
const PREPARE_PROGRESS_EVERY: Duration = Duration::from_secs(20);

/// The outcome and failure of an attempt whose workspace could not be made:
/// `setup_failed` for the setup command, `failed` (not retried) when the task's
/// repository or base cannot work anywhere, else `workspace_failed`, a fault
/// of this host that the hub retries elsewhere and counts against it.
fn workspace_failure(e: &WorkspaceError) -> (Outcome, Failure) {
    let reason = muster_protocol::limits::truncate_utf8(
        e.to_string(),
        muster_protocol::limits::REASON_BYTES_MAX,
    );
    match e {
        WorkspaceError::Setup {
            command,
            exit_code,
            signal,
            stdout_tail,
            stderr_tail,
            ..
        } => (
            Outcome::SetupFailed,
            Failure {
                reason,
                exit_code: *exit_code,
                signal: *signal,
                command: command.clone(),
                stdout_tail: stdout_tail.clone(),
                stderr_tail: stderr_tail.clone(),
                no_retry: false,
            },
        ),
        e if e.fault() == Fault::Task => (
            Outcome::Failed,
            Failure {
                reason,
                no_retry: true,
                ..Failure::default()
            },
        ),
        _ => (
            Outcome::WorkspaceFailed,
            Failure {
                reason,
                ..Failure::default()
            },
        ),
    }
}

/// What a git workspace's attempt left, as the hub records it; `None` for a
/// workspace that is not a git worktree.
pub fn wire_work(r: crate::workspace::WorkResult) -> Option<muster_protocol::work::WorkResult> {
    let branch = r.branch?;
    let mut diffstat = r.diff_stat.unwrap_or_default();
    if r.diff_stat_cut {
        diffstat.push_str("\n… (cut)");
    }
    Some(muster_protocol::work::WorkResult {
        branch,
        base_commit: r.base_commit.unwrap_or_default(),
        head: r.head.unwrap_or_default(),
        commits: r
            .commits
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
        diffstat,
        dirty: r.dirty,
        checkpoint: r.checkpoint,
        link: None,
    })
}

/// How often [`end_orphans`] checks whether the groups are gone.
const ORPHAN_POLL: Duration = Duration::from_millis(20);

/// How long [`run_health`] lets the health command run.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the runner needs to start one attempt.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The task.
    pub task: TaskId,
    /// The attempt's generation.
    pub generation: Generation,
    /// This sidecar's agent name (`MUSTER_AGENT`).
    pub agent: AgentName,
    /// What to do; written to `task.json`, never onto a command line.
    pub spec: TaskSpec,
    /// Per-attempt directory the runner creates: `task.json`, `stdout`, `stderr`, `status`.
    pub run_dir: PathBuf,
    /// The sidecar's local Unix socket, passed as `MUSTER_SOCKET`.
    pub socket: PathBuf,
    /// The attempt's secret for that socket, passed as `MUSTER_TASK_TOKEN` and
    /// written into `task.json` (see [`crate::tasktoken`]).
    pub token: String,
    /// How often to probe a running wake-mode agent (the heartbeat interval).
    pub probe_interval: Duration,
}

pub use muster_sidecar_core::run::{RunEvent, RunHandle, RunMode};

/// Where a run works: its directory and, for a git workspace, its branch and base.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workdir {
    /// The working directory (`MUSTER_WORKSPACE`, `{workspace}`).
    pub dir: PathBuf,
    /// The branch checked out in it (`MUSTER_BRANCH`).
    pub branch: Option<String>,
    /// The ref it was made from (`MUSTER_BASE`).
    pub base: Option<String>,
}

impl From<Mode> for RunMode {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Exec => RunMode::Exec,
            Mode::Wake => RunMode::Wake,
        }
    }
}

/// Starts, watches, stops and re-attaches agent runs.
///
/// A trait so the benchmark can supply an in-process runner that completes at
/// once. Contract for every implementation: events for one attempt arrive in
/// the order documented on [`RunEvent`], and at most one `Finished` per attempt
/// whatever mix of `stop`, `forget` and natural ends happens.
pub trait Runner: Send + Sync + 'static {
    /// Starts one attempt; events go to `events`.
    fn start(&self, run: RunSpec, events: mpsc::Sender<RunEvent>);
    /// After a sidecar restart: re-attach to a run recorded before. Still
    /// running → carry on watching (`Started` again, then `Finished` when it
    /// ends, with its real exit status if it can be known); gone → `Finished`
    /// with the recorded status if one was written, else `AgentExited`.
    fn recover(&self, run: RunSpec, handle: RunHandle, events: mpsc::Sender<RunEvent>);
    /// Cancel or abandon: exec → SIGTERM to the run's process group, SIGKILL
    /// after `stop_grace`; wake → `stop_command`. Then `Finished{Cancelled}`,
    /// unless the run already finished (or was forgotten). Unknown runs are ignored.
    fn stop(&self, task: TaskId, generation: Generation);
    /// The attempt ended by a report over the local socket: stop watching it,
    /// kill nothing, and emit no `Finished`.
    fn forget(&self, task: TaskId, generation: Generation);
    /// The core's start deadline passed: stop waking (kill the wake command) or
    /// verifying, and end the run with `outcome` in one `Finished` that says
    /// what was seen. Unknown or ended runs are ignored. Runners that neither
    /// wake nor verify (whose runs start at once) need not act.
    fn time_out(&self, task: TaskId, generation: Generation, outcome: Outcome) {
        let _ = (task, generation, outcome);
    }
}

/// The real runner: spawns processes as `[agent]` in sidecar.toml says.
///
/// Owns a map of active runs (bounded by the sidecar's slots); each run is one
/// tokio task that alone emits that run's events, so `stop` and `forget` only
/// flip a flag the run task acts on. `start` and `recover` spawn tokio
/// tasks, so they must be called from within a Tokio runtime.
pub struct ProcessRunner {
    shared: Arc<Shared>,
}

/// State shared by the runner and its run tasks.
struct Shared {
    config: AgentConfig,
    /// `working_dir`, or `<data_dir>/work`.
    work_dir: PathBuf,
    /// One control channel per active run; the run task removes its entry when it ends.
    runs: Mutex<HashMap<(TaskId, Generation), watch::Sender<Ctl>>>,
    /// Spawns exec runs and keeps their statuses (`exec_status = "recorded"`);
    /// without one, a `/bin/sh` wrapper per run does.
    reaper: Option<Arc<reaper::Reaper>>,
    /// Makes each attempt's workspace before it starts and finishes it after.
    workspaces: Arc<Workspaces>,
}

/// What the sidecar asked of a run; flags only ever turn on.
#[derive(Debug, Clone, Copy, Default)]
struct Ctl {
    stop: bool,
    forget: bool,
    /// The start took too long: end with this outcome.
    timed_out: Option<Outcome>,
}

impl ProcessRunner {
    /// A runner for `config`; runs use `<data_dir>/work` unless `working_dir` is set.
    pub fn new(config: AgentConfig, data_dir: PathBuf) -> Self {
        Self::build(config, data_dir, None)
    }

    /// The same runner, spawning exec runs through a reaper started as
    /// `exe reaper` (a binary whose `main` calls [`reaper_main`] for that
    /// subcommand), so a run costs one exec instead of two.
    pub fn with_reaper(config: AgentConfig, data_dir: PathBuf, exe: PathBuf) -> Self {
        Self::build(config, data_dir, Some(exe))
    }

    fn build(config: AgentConfig, data_dir: PathBuf, reaper: Option<PathBuf>) -> Self {
        let work_dir = config
            .working_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("work"));
        let workspaces = Arc::new(Workspaces::with_shared_dir(
            WorkspaceConfig::default(),
            &data_dir,
            work_dir.clone(),
        ));
        Self {
            shared: Arc::new(Shared {
                config,
                work_dir,
                runs: Mutex::new(HashMap::new()),
                reaper: reaper.map(|exe| Arc::new(reaper::Reaper::new(exe))),
                workspaces,
            }),
        }
    }

    /// The same runner with `workspaces` (`[workspace]` in sidecar.toml)
    /// instead of the shared working directory; call before the first run.
    #[must_use]
    pub fn with_workspaces(mut self, workspaces: Arc<Workspaces>) -> Self {
        match Arc::get_mut(&mut self.shared) {
            Some(shared) => shared.workspaces = workspaces,
            None => tracing::error!("workspaces set on a runner already in use; ignored"),
        }
        self
    }

    /// How many runs are being watched now.
    pub fn active(&self) -> usize {
        self.shared.lock_runs().len()
    }

    fn register(&self, run: RunSpec, events: mpsc::Sender<RunEvent>) -> Option<Attempt> {
        let key = (run.task, run.generation);
        let (tx, rx) = watch::channel(Ctl::default());
        let mut runs = self.shared.lock_runs();
        if runs.contains_key(&key) {
            tracing::error!(
                task = key.0.0,
                generation = key.1.0,
                "run started twice; ignored"
            );
            return None;
        }
        runs.insert(key, tx);
        drop(runs);
        Some(Attempt {
            has_workspace: false,
            shared: Arc::clone(&self.shared),
            launch: Arc::new(launch::Launch::new(
                &run,
                &Workdir {
                    dir: self.shared.work_dir.clone(),
                    ..Workdir::default()
                },
                self.shared.config.stdin,
            )),
            run,
            ctl: rx,
            events,
        })
    }

    fn control(&self, task: TaskId, generation: Generation, set: impl FnOnce(&mut Ctl)) {
        match self.shared.lock_runs().get(&(task, generation)) {
            Some(tx) => tx.send_modify(set),
            None => tracing::debug!(task = task.0, generation = generation.0, "no such run"),
        }
    }
}

impl Runner for ProcessRunner {
    fn start(&self, run: RunSpec, events: mpsc::Sender<RunEvent>) {
        let Some(attempt) = self.register(run, events) else {
            return;
        };
        match self.shared.config.mode {
            Mode::Exec => tokio::spawn(exec::run(attempt)),
            Mode::Wake => tokio::spawn(wake::run(attempt)),
        };
    }

    fn recover(&self, run: RunSpec, handle: RunHandle, events: mpsc::Sender<RunEvent>) {
        let Some(mut attempt) = self.register(run, events) else {
            return;
        };
        attempt.restore_workspace();
        match handle.mode {
            RunMode::Exec => tokio::spawn(exec::recover(attempt, handle)),
            RunMode::Wake => tokio::spawn(wake::recover(attempt, handle)),
        };
    }

    fn stop(&self, task: TaskId, generation: Generation) {
        self.control(task, generation, |c| c.stop = true);
    }

    fn forget(&self, task: TaskId, generation: Generation) {
        self.control(task, generation, |c| c.forget = true);
    }

    fn time_out(&self, task: TaskId, generation: Generation, outcome: Outcome) {
        self.control(task, generation, |c| {
            c.timed_out.get_or_insert(outcome);
        });
    }
}

impl Shared {
    fn lock_runs(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(TaskId, Generation), watch::Sender<Ctl>>> {
        // Critical sections are a map lookup or insert, never an await; a
        // poisoned lock still holds a consistent map.
        self.runs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl Attempt ===

/// One run in progress: owns the event sender, and emits `Finished` by
/// consuming itself, so a run cannot finish twice. Dropping it unregisters the run.
struct Attempt {
    /// The attempt has a workspace of its own to finish when it ends.
    has_workspace: bool,
    shared: Arc<Shared>,
    run: RunSpec,
    launch: Arc<launch::Launch>,
    ctl: watch::Receiver<Ctl>,
    events: mpsc::Sender<RunEvent>,
}

/// What happened while waiting on something else.
enum Wait<T> {
    /// The thing finished.
    Done(T),
    /// `stop` was called.
    Stop,
    /// `forget` was called (and not `stop`).
    Forget,
    /// `time_out` was called (and neither `stop` nor `forget`).
    TimedOut(Outcome),
}

impl Attempt {
    fn config(&self) -> &AgentConfig {
        &self.shared.config
    }

    async fn emit(&self, event: RunEvent) {
        // A closed channel means the sidecar is shutting down; the run itself
        // carries on and is recovered after the restart.
        if self.events.send(event).await.is_err() {
            tracing::debug!(task = self.run.task.0, "event receiver gone");
        }
    }

    async fn spawned(&self, handle: RunHandle) {
        self.emit(RunEvent::Spawned {
            task: self.run.task,
            generation: self.run.generation,
            handle,
        })
        .await;
    }

    async fn started(&self, pid: Option<u32>) {
        self.started_as(pid, None).await;
    }

    async fn started_as(&self, pid: Option<u32>, session: Option<String>) {
        self.emit(RunEvent::Started {
            task: self.run.task,
            generation: self.run.generation,
            pid,
            session,
        })
        .await;
    }

    /// Emits the one `Finished` of this run, unless it was forgotten. A run
    /// with a workspace finishes it first: its work is checkpointed, and what
    /// it left goes with the report.
    async fn finish(self, outcome: Outcome, error: Option<Failure>) {
        if self.ctl.borrow().forget {
            return;
        }
        let work = if self.has_workspace {
            let ws = &self.shared.workspaces;
            match ws.finish(self.run.task, self.run.generation).await {
                Ok(r) => wire_work(r).map(Box::new),
                Err(e) => {
                    tracing::warn!(
                        task = self.run.task.0,
                        generation = self.run.generation.0,
                        "could not finish the workspace: {e}"
                    );
                    None
                }
            }
        } else {
            None
        };
        tracing::debug!(
            task = self.run.task.0,
            generation = self.run.generation.0,
            outcome = outcome.as_str(),
            "run finished"
        );
        self.emit(RunEvent::Finished {
            task: self.run.task,
            generation: self.run.generation,
            outcome,
            result: None,
            error,
            work,
        })
        .await;
    }

    /// Makes the attempt's workspace (or takes the shared directory) and points
    /// the launch at it. `None` when the run ended here: the workspace could
    /// not be made (`workspace_failed`, `setup_failed`, or `failed` for a task
    /// whose repository or base cannot work anywhere), or a stop came first.
    async fn prepare_workspace(mut self) -> Option<Self> {
        let ws = Arc::clone(&self.shared.workspaces);
        let (task, generation) = (self.run.task, self.run.generation);
        let (repo, base) = (self.run.spec.repo.clone(), self.run.spec.base.clone());
        if ws.config().mode == WorkspaceMode::Shared && repo.is_none() {
            return Some(self);
        }
        let note = match &repo {
            Some(repo) => format!("preparing a git worktree of {repo}"),
            None => "preparing an empty workspace".to_owned(),
        };
        self.emit(RunEvent::Preparing {
            task,
            generation,
            note: note.clone(),
        })
        .await;
        let began = tokio::time::Instant::now();
        let prepare = ws.prepare(task, generation, repo.as_deref(), base.as_deref());
        tokio::pin!(prepare);
        let result = loop {
            // Progress now and then, so the hub's start deadline waits for a long fetch.
            match self
                .or_ctl(tokio::time::timeout(PREPARE_PROGRESS_EVERY, &mut prepare))
                .await
            {
                Wait::Done(Ok(result)) => break Ok(result),
                Wait::Done(Err(_)) => {
                    let note = format!("{note} ({} s so far)", began.elapsed().as_secs());
                    self.emit(RunEvent::Preparing {
                        task,
                        generation,
                        note,
                    })
                    .await;
                }
                Wait::Stop => break Err(Wait::<()>::Stop),
                Wait::Forget => break Err(Wait::Forget),
                Wait::TimedOut(outcome) => break Err(Wait::TimedOut(outcome)),
            }
        };
        match result {
            Ok(Ok(p)) => {
                let note = match (&p.branch, &p.base_commit) {
                    (Some(branch), Some(commit)) => format!(
                        "workspace ready: {} on {branch} from {}{}",
                        p.dir.display(),
                        &commit[..commit.len().min(12)],
                        p.continued_from
                            .as_ref()
                            .map(|c| format!(", continuing {c}"))
                            .unwrap_or_default()
                    ),
                    _ => format!("workspace ready: {}", p.dir.display()),
                };
                let work = Workdir {
                    dir: p.dir,
                    branch: p.branch,
                    base: p.base,
                };
                self.launch = Arc::new(launch::Launch::new(
                    &self.run,
                    &work,
                    self.shared.config.stdin,
                ));
                self.has_workspace = true;
                self.emit(RunEvent::Prepared {
                    task,
                    generation,
                    note,
                })
                .await;
                Some(self)
            }
            Ok(Err(e)) => {
                let (outcome, failure) = workspace_failure(&e);
                self.finish(outcome, Some(failure)).await;
                None
            }
            Err(Wait::Stop) => {
                let failure = Failure {
                    reason: "stopped while its workspace was being prepared".into(),
                    ..Failure::default()
                };
                self.finish(Outcome::Cancelled, Some(failure)).await;
                None
            }
            Err(Wait::TimedOut(outcome)) => {
                let failure = Failure {
                    reason: "the start deadline passed while its workspace was being prepared"
                        .into(),
                    ..Failure::default()
                };
                self.finish(outcome, Some(failure)).await;
                None
            }
            Err(_) => None,
        }
    }

    /// After a restart: the attempt works in the workspace it was given then.
    fn restore_workspace(&mut self) {
        let ws = &self.shared.workspaces;
        if ws.config().mode == WorkspaceMode::Shared {
            return;
        }
        let dir = ws.path(self.run.task, self.run.generation);
        if !dir.exists() {
            return;
        }
        let work = Workdir {
            dir,
            branch: self
                .run
                .spec
                .repo
                .as_ref()
                .map(|_| format!("muster/{}", self.run.task)),
            base: self.run.spec.base.clone(),
        };
        self.launch = Arc::new(launch::Launch::new(
            &self.run,
            &work,
            self.shared.config.stdin,
        ));
        self.has_workspace = true;
    }

    /// Resolves once `stop`, `forget` or `time_out` was called; cancel safe.
    async fn ctl_changed(&mut self) -> Ctl {
        let ctl = self
            .ctl
            .wait_for(|c| c.stop || c.forget || c.timed_out.is_some())
            .await
            .map(|c| *c);
        match ctl {
            Ok(ctl) => ctl,
            // The sender lives in the map until this attempt drops; never here.
            Err(_) => std::future::pending().await,
        }
    }

    /// Runs `fut` unless `stop`, `forget` or `time_out` comes first.
    async fn or_ctl<F: Future>(&mut self, fut: F) -> Wait<F::Output> {
        tokio::select! {
            out = fut => Wait::Done(out),
            ctl = self.ctl_changed() => ctl.into(),
        }
    }

    /// Sleeps `period` unless `stop`, `forget` or `time_out` comes first.
    async fn pause(&mut self, period: Duration) -> Wait<()> {
        self.or_ctl(tokio::time::sleep(period)).await
    }
}

impl<T> From<Ctl> for Wait<T> {
    fn from(ctl: Ctl) -> Self {
        match ctl {
            Ctl { stop: true, .. } => Wait::Stop,
            Ctl { forget: true, .. } => Wait::Forget,
            Ctl {
                timed_out: Some(outcome),
                ..
            } => Wait::TimedOut(outcome),
            // `ctl_changed` resolves only with one of the above.
            Ctl { .. } => Wait::Forget,
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.shared
            .lock_runs()
            .remove(&(self.run.task, self.run.generation));
    }
}

// === Self-test helpers ===

/// Whether `command[0]` exists and is executable (searching `PATH` when it has
/// no '/'), for heartbeats and `doctor`.
///
/// # Errors
/// A sentence naming the command and what is wrong with it.
pub fn check_command(config: &AgentConfig) -> Result<(), String> {
    let Some(program) = config.command.first() else {
        return Err("the agent command is empty; set [agent] command in sidecar.toml".into());
    };
    launch::resolve(program)
        .map(|_| ())
        .map_err(|e| format!("the agent command `{program}` cannot run: {e}"))
}

/// Runs `health_command` (if set) for at most [`HEALTH_TIMEOUT`].
///
/// # Errors
/// A sentence naming the command and how it failed, with the last line of its stderr.
pub async fn run_health(config: &AgentConfig) -> Result<(), String> {
    launch::run_health(config, HEALTH_TIMEOUT).await
}
