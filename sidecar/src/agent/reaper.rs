//! The reaper: one long-lived helper process per sidecar that spawns exec
//! runs, waits for them, and records each run's exit status in its directory.
//!
//! A run must leave its exit status behind even when it ends while the
//! sidecar is down, so something other than the sidecar has to be its parent.
//! A `/bin/sh` wrapper per run did that at the price of a second exec, and on
//! VMs like the benchmark machine every exec of a glibc program costs about
//! half a millisecond of CPU in the loader alone (it sizes the caches with
//! `cpuid`, which traps to the hypervisor). The reaper is exec'd once per
//! sidecar start instead, so a run costs one exec.
//!
//! ```text
//! sidecar ══ socketpair: the reaper's stdin and stdout, JSON lines ══ muster-sidecar reaper
//!   ─▶ Spawn { id, argv, env, cwd, run_dir, task_json }   prepare the run directory, spawn in
//!   ◀─ Spawned { id, pid, start_ticks } | Refused { id }   its own process group, write the handle
//!   ◀─ Exited { id, code }                                after the status record is written
//! ```
//!
//! Lifetime: when the sidecar goes away (its end of the socket closes), the
//! reaper spawns nothing more, waits for the runs it has, records their
//! statuses and exits. A restarted sidecar starts a new reaper and re-attaches
//! to the old runs through their handle and status files, as it would after
//! the wrapper. If the reaper itself dies, its runs lose their parent: the
//! sidecar then watches them by polling, and one that ends leaves no status
//! (`agent_exited`, as with `exec_status = "waited"`).

use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio_util::codec::{FramedRead, FramedWrite, LinesCodec};

use super::launch::{
    Request, agent_stdin, output, overwrite_private, prepare_exec, status_record, write_handle,
};
use super::{RunHandle, RunMode, sys};

/// Bumped when the messages below change; a reaper of another version is not used.
const PROTOCOL: u32 = 1;
/// The subcommand that runs [`main`].
pub const SUBCOMMAND: &str = "reaper";
/// Longest line either side accepts (argv and environment of one run).
const LINE_BYTES_MAX: usize = 1024 * 1024;
/// How long a new reaper may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a spawn may wait for the reaper's answer (it takes milliseconds);
/// a reaper that does not answer is replaced.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(10);
/// After a reaper failed to start, how long runs use the wrapper before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// Sidecar → reaper.
#[derive(Serialize, Deserialize, Debug)]
enum ToReaper {
    /// Spawn one run.
    Spawn { id: u64, run: Request },
}

/// Reaper → sidecar.
#[derive(Serialize, Deserialize, Debug)]
enum FromReaper {
    /// First line: which protocol this reaper speaks.
    Hello { protocol: u32 },
    /// The run is spawned and its handle file written.
    Spawned {
        id: u64,
        pid: u32,
        start_ticks: Option<u64>,
    },
    /// The run could not be spawned.
    Refused { id: u64, error: String },
    /// The run ended with this shell-style code (128 + N for signal N); the
    /// status record is written. -1: it was not our child after all, and its
    /// end is unknown.
    Exited { id: u64, code: i32 },
}

// === The reaper process ===

/// Runs the reaper on stdin and stdout until the sidecar closes them and every
/// run it spawned has ended. `muster-sidecar reaper` calls this; so can any
/// binary that embeds the sidecar and passes its own path to
/// [`super::ProcessRunner::with_reaper`].
pub fn main() -> std::process::ExitCode {
    // Started as `/proc/self/exe`, it would be called "exe" in `top`.
    sys::set_process_name(c"muster-reaper");
    let state = Arc::new(State::default());
    state.send(&FromReaper::Hello { protocol: PROTOCOL });
    let waiter = {
        let state = Arc::clone(&state);
        std::thread::spawn(move || state.reap())
    };
    let mut input = std::io::stdin().lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        match Read::take(&mut input, LINE_BYTES_MAX as u64 + 1).read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) if line.len() > LINE_BYTES_MAX => {
                eprintln!(
                    "muster-sidecar reaper: a request is longer than {LINE_BYTES_MAX} bytes; stopping"
                );
                break;
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("muster-sidecar reaper: reading requests: {e}; stopping");
                break;
            }
        }
        match serde_json::from_slice::<ToReaper>(&line) {
            Ok(ToReaper::Spawn { id, run }) => state.spawn(id, &run),
            Err(e) => {
                eprintln!("muster-sidecar reaper: a malformed request ({e}); stopping");
                break;
            }
        }
    }
    state.close();
    // Every run spawned is waited for and recorded before the process ends.
    let _ = waiter.join();
    std::process::ExitCode::SUCCESS
}

#[derive(Default)]
struct State {
    inner: Mutex<Inner>,
    changed: Condvar,
}

#[derive(Default)]
struct Inner {
    /// pid → (request id, run directory) of every run not yet reaped.
    runs: HashMap<u32, (u64, PathBuf)>,
    /// The sidecar went away: exit once `runs` is empty.
    closed: bool,
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn send(&self, msg: &FromReaper) {
        // The sidecar may be gone; its successor reads the files instead.
        if let Ok(mut text) = serde_json::to_string(msg) {
            text.push('\n');
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
        }
    }

    fn spawn(&self, id: u64, run: &Request) {
        // Held from the spawn until the answer is out, so the waiter cannot
        // report the run's end before the sidecar has heard of it.
        let mut inner = self.lock();
        match spawn_run(run) {
            Ok((pid, start_ticks)) => {
                inner.runs.insert(pid, (id, PathBuf::from(&run.run_dir)));
                self.send(&FromReaper::Spawned {
                    id,
                    pid,
                    start_ticks,
                });
                self.changed.notify_all();
            }
            Err(error) => self.send(&FromReaper::Refused { id, error }),
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// Waits for runs to end and records them; returns once closed with none left.
    fn reap(&self) {
        loop {
            {
                let mut inner = self.lock();
                while inner.runs.is_empty() {
                    if inner.closed {
                        return;
                    }
                    inner = self
                        .changed
                        .wait(inner)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
            match sys::wait_any() {
                sys::WaitAny::Reaped(r) => {
                    let mut inner = self.lock();
                    let run = inner.runs.remove(&r.pid);
                    // Recorded while the run is still a zombie: whoever sees it gone
                    // (a restarted sidecar polling) finds its status already there.
                    if let Some((_, dir)) = &run {
                        let path = dir.join("status");
                        if let Err(e) = overwrite_private(&path, &status_record(r.code)) {
                            eprintln!(
                                "muster-sidecar reaper: could not record the status of pid {} in {}: {e}",
                                r.pid,
                                path.display()
                            );
                        }
                    }
                    sys::reap(r.pid);
                    if let Some((id, _)) = run {
                        self.send(&FromReaper::Exited { id, code: r.code });
                    }
                }
                sys::WaitAny::NoChildren => {
                    // Nothing left to wait for, so nothing listed can still be ours.
                    let mut inner = self.lock();
                    for (pid, (id, _)) in inner.runs.drain() {
                        eprintln!("muster-sidecar reaper: pid {pid} is not a child any more");
                        self.send(&FromReaper::Exited { id, code: -1 });
                    }
                }
                sys::WaitAny::Again => {}
            }
        }
    }
}

/// Spawns one run in its own process group and records its handle. Blocking.
fn spawn_run(run: &Request) -> Result<(u32, Option<u64>), String> {
    use std::os::unix::process::CommandExt;
    let run_dir = Path::new(&run.run_dir);
    let program = prepare_exec(
        run_dir,
        Path::new(&run.cwd),
        run.task_json.as_bytes(),
        &run.prompt,
        &run.argv,
    )?;
    let (stdout, stderr) = output(run_dir)?;
    let stdin = agent_stdin(run_dir, run.stdin_prompt)?;
    let child = std::process::Command::new(&program)
        .args(&run.argv[1..])
        .envs(run.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&run.cwd)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("could not start `{}`: {e}", program.display()))?;
    // Reaped by `State::reap`; a std `Child` neither kills nor waits on drop.
    let pid = child.id();
    let start_ticks = sys::start_ticks(pid);
    let handle = RunHandle {
        pid: Some(pid),
        session: None,
        run_dir: run_dir.to_owned(),
        mode: RunMode::Exec,
        start_ticks,
    };
    // Before anyone hears of the run: a sidecar that dies before its commit
    // finds the run by this at its restart (see `daemon/mod.rs`, "Launch before commit").
    if let Err(e) = write_handle(run_dir, &handle) {
        eprintln!(
            "muster-sidecar reaper: {e}; a crash before the next commit would leave this run unwatched"
        );
    }
    Ok((pid, start_ticks))
}

// === The sidecar's side ===

/// What a spawn through the reaper gave.
pub(super) struct Spawned {
    pub(super) pid: u32,
    pub(super) start_ticks: Option<u64>,
    /// The run's shell-style exit code once it ends; an error if the reaper died first.
    pub(super) exited: oneshot::Receiver<i32>,
}

/// Why a spawn through the reaper did not happen.
pub(super) enum SpawnError {
    /// The reaper tried and the spawn failed (the agent command is wrong).
    Refused(String),
    /// The reaper went away, or did not answer in time; the run may or may not exist.
    Lost,
}

/// Starts the reaper when first needed and again after it died; the sidecar's
/// handle on it.
pub(super) struct Reaper {
    exe: PathBuf,
    live: tokio::sync::Mutex<Live>,
}

#[derive(Default)]
struct Live {
    client: Option<Arc<Client>>,
    failed_at: Option<Instant>,
}

struct Client {
    writer: tokio::sync::Mutex<FramedWrite<tokio::net::unix::OwnedWriteHalf, LinesCodec>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    alive: AtomicBool,
}

/// The reaper's answer to one spawn: pid and start time, or why not.
type SpawnAnswer = Result<(u32, Option<u64>), String>;

struct Pending {
    spawned: Option<oneshot::Sender<SpawnAnswer>>,
    exited: oneshot::Sender<i32>,
}

impl Reaper {
    /// A reaper started from `exe` (which must run [`main`] for `exe reaper`).
    pub(super) fn new(exe: PathBuf) -> Self {
        Self {
            exe,
            live: tokio::sync::Mutex::new(Live::default()),
        }
    }

    /// Spawns a run through the reaper. `None`: no reaper could be started
    /// (logged); the caller falls back to the wrapper.
    pub(super) async fn spawn(&self, run: Request) -> Option<Result<Spawned, SpawnError>> {
        let client = self.client().await?;
        Some(client.spawn(run).await)
    }

    async fn client(&self) -> Option<Arc<Client>> {
        let mut live = self.live.lock().await;
        if let Some(c) = live
            .client
            .as_ref()
            .filter(|c| c.alive.load(Ordering::Acquire))
        {
            return Some(Arc::clone(c));
        }
        if live.failed_at.is_some_and(|t| t.elapsed() < RETRY_AFTER) {
            return None;
        }
        match start(&self.exe).await {
            Ok(client) => {
                live.client = Some(Arc::clone(&client));
                live.failed_at = None;
                Some(client)
            }
            Err(e) => {
                tracing::warn!(
                    "could not start the reaper ({} {SUBCOMMAND}): {e}; exec runs use the /bin/sh wrapper for the next {RETRY_AFTER:?}",
                    self.exe.display()
                );
                live.client = None;
                live.failed_at = Some(Instant::now());
                None
            }
        }
    }
}

/// Starts a reaper process and waits for its hello.
async fn start(exe: &Path) -> Result<Arc<Client>, String> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    let theirs_out = theirs.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = tokio::process::Command::new(exe);
    // `ps` shows the binary's name, not `/proc/self/exe` (see `own_executable`).
    if let Ok(name) = std::env::current_exe() {
        cmd.arg0(name);
    }
    cmd.arg(SUBCOMMAND)
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs_out)))
        .stderr(Stdio::inherit())
        // Like the runs, it outlives the sidecar and a Ctrl-C meant for it.
        .process_group(0)
        .kill_on_drop(false);
    for var in super::launch::SUPERVISOR_VARS {
        cmd.env_remove(var);
    }
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    // Reap it whenever it ends, so it never lingers as a zombie of the sidecar.
    tokio::spawn(async move {
        match child.wait().await {
            Ok(status) if status.success() => tracing::debug!("the reaper exited"),
            Ok(status) => tracing::warn!("the reaper exited: {status}"),
            Err(e) => tracing::warn!("could not wait for the reaper: {e}"),
        }
    });
    ours.set_nonblocking(true).map_err(|e| e.to_string())?;
    let stream = tokio::net::UnixStream::from_std(ours).map_err(|e| e.to_string())?;
    let (rd, wr) = stream.into_split();
    let mut lines = FramedRead::new(rd, LinesCodec::new_with_max_length(LINE_BYTES_MAX));
    let hello = tokio::time::timeout(HELLO_TIMEOUT, lines.next())
        .await
        .map_err(|_| format!("no hello within {HELLO_TIMEOUT:?}"))?;
    match hello.map(|l| l.map(|l| serde_json::from_str::<FromReaper>(&l))) {
        Some(Ok(Ok(FromReaper::Hello { protocol }))) if protocol == PROTOCOL => {}
        Some(Ok(Ok(FromReaper::Hello { protocol }))) => {
            return Err(format!(
                "it speaks protocol {protocol}, this sidecar {PROTOCOL} (is the binary from another version?)"
            ));
        }
        Some(Ok(Ok(other))) => return Err(format!("it began with {other:?}, not a hello")),
        Some(Ok(Err(e))) => return Err(format!("a malformed hello: {e}")),
        Some(Err(e)) => return Err(format!("reading its hello: {e}")),
        None => return Err("it exited at once".into()),
    }
    let client = Arc::new(Client {
        writer: tokio::sync::Mutex::new(FramedWrite::new(
            wr,
            LinesCodec::new_with_max_length(LINE_BYTES_MAX),
        )),
        pending: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        alive: AtomicBool::new(true),
    });
    tokio::spawn(read_loop(lines, Arc::downgrade(&client)));
    Ok(client)
}

/// Hands the reaper's answers to the runs waiting for them; when it goes
/// away, drops every waiter so each run learns it at once. Holds the client
/// weakly: once the runner and its runs let go of it, its write half closes
/// and the reaper retires.
async fn read_loop(
    mut lines: FramedRead<tokio::net::unix::OwnedReadHalf, LinesCodec>,
    client: std::sync::Weak<Client>,
) {
    let why = loop {
        let line = match lines.next().await {
            Some(Ok(line)) => line,
            Some(Err(e)) => break e.to_string(),
            None => break "it closed its end".to_owned(),
        };
        let Some(client) = client.upgrade() else {
            return;
        };
        match serde_json::from_str::<FromReaper>(&line) {
            Ok(FromReaper::Spawned {
                id,
                pid,
                start_ticks,
            }) => {
                if let Some(p) = client.lock().get_mut(&id)
                    && let Some(tx) = p.spawned.take()
                {
                    let _ = tx.send(Ok((pid, start_ticks)));
                }
            }
            Ok(FromReaper::Refused { id, error }) => {
                if let Some(Pending {
                    spawned: Some(tx), ..
                }) = client.lock().remove(&id)
                {
                    let _ = tx.send(Err(error));
                }
            }
            Ok(FromReaper::Exited { id, code }) => {
                if let Some(p) = client.lock().remove(&id) {
                    let _ = p.exited.send(code);
                }
            }
            Ok(FromReaper::Hello { .. }) => {}
            Err(e) => break format!("a malformed line ({e})"),
        }
    };
    let Some(client) = client.upgrade() else {
        return;
    };
    client.alive.store(false, Ordering::Release);
    let left = std::mem::take(&mut *client.lock());
    if !left.is_empty() {
        tracing::warn!(
            runs = left.len(),
            "the reaper is gone ({why}); its runs are watched by polling and will end without an exit status"
        );
    }
}

impl Client {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn spawn(&self, run: Request) -> Result<Spawned, SpawnError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (spawned_tx, spawned_rx) = oneshot::channel();
        let (exited_tx, exited_rx) = oneshot::channel();
        self.lock().insert(
            id,
            Pending {
                spawned: Some(spawned_tx),
                exited: exited_tx,
            },
        );
        let request = ToReaper::Spawn { id, run };
        let line = serde_json::to_string(&request).map_err(|e| {
            self.lock().remove(&id);
            SpawnError::Refused(format!("could not encode the spawn request: {e}"))
        })?;
        if self.writer.lock().await.send(line).await.is_err() {
            self.lock().remove(&id);
            self.alive.store(false, Ordering::Release);
            return Err(SpawnError::Lost);
        }
        match tokio::time::timeout(SPAWN_TIMEOUT, spawned_rx).await {
            Ok(Ok(Ok((pid, start_ticks)))) => Ok(Spawned {
                pid,
                start_ticks,
                exited: exited_rx,
            }),
            Ok(Ok(Err(error))) => Err(SpawnError::Refused(error)),
            Ok(Err(_)) => Err(SpawnError::Lost),
            Err(_) => {
                tracing::warn!(
                    "the reaper did not answer a spawn within {SPAWN_TIMEOUT:?}; starting another"
                );
                self.lock().remove(&id);
                self.alive.store(false, Ordering::Release);
                Err(SpawnError::Lost)
            }
        }
    }
}
