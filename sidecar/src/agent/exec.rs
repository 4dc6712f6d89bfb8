//! Exec mode: the command is the run.
//!
//! Every run has its own process group, so it outlives a sidecar restart, and
//! it leaves its exit status in its run directory, so the status is known even
//! when the run ends while the sidecar is down. What writes the status:
//!
//! - the reaper (`reaper.rs`), when the runner has one: a long-lived helper
//!   process that is the run's parent. One exec per run.
//! - otherwise a fixed `/bin/sh` wrapper per run, which costs a second exec
//!   (about 1 ms of CPU per run with dash on the benchmark VM):
//!
//! ```text
//! /bin/sh -c 'WRAPPER' muster-run <run_dir>/status <agent argv…>
//! ```
//!
//! The agent's argv are positional parameters: the shell expands `"$@"` and
//! never parses them, so no task or config text is ever interpreted. With
//! `exec_status = "waited"` the agent is spawned directly as our child (same
//! process group, environment and files) and its status comes from `wait` alone.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use muster_protocol::msg::{Failure, Outcome};
use tokio::process::Child;
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep, timeout};

use super::launch::{Exit, Launch};
use super::reaper::SpawnError;
use super::{Attempt, ExecStatus, RunHandle, RunMode, Wait, sys};

/// The only shell the runner uses, with the only script it runs.
const SHELL: &str = "/bin/sh";
/// Runs `"$@"`, records its status in the file named by `$1`, exits with it.
/// `1<>` opens the record without truncating it, so its block is reused (see
/// `launch::prepare_exec`).
const WRAPPER: &str = r#"s=$1; shift; "$@"; rc=$?; printf '%-3s\n' "$rc" 1<>"$s"; exit "$rc""#;
/// `$0` of the wrapper, which is what `ps` shows for it.
const WRAPPER_NAME: &str = "muster-run";

/// How often a stop checks whether the process group is gone.
const STOP_POLL: Duration = Duration::from_millis(50);
/// How often a recovered run (not our child any more) is checked.
const RECOVER_POLL: Duration = Duration::from_millis(200);
/// How long to wait for the killed wrapper to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(5);

/// How the end of a run is learned.
enum Watch {
    /// Our child: the wrapper (whose status carries the agent's) or, with
    /// `exec_status = "waited"`, the agent itself.
    Child(Child, ExecStatus),
    /// A run the reaper spawned: it sends the exit code.
    Reaper(oneshot::Receiver<i32>),
    /// Nobody tells us: poll the process and read the status record.
    Poll,
}

impl Watch {
    /// Resolves when the run has ended: its exit, or why it is unknown. Cancel safe.
    async fn wait(
        &mut self,
        launch: &Arc<Launch>,
        pid: u32,
        ticks: Option<u64>,
    ) -> Result<Exit, String> {
        loop {
            match self {
                Watch::Child(child, status) => {
                    return match child.wait().await {
                        Ok(exited) if *status == ExecStatus::Waited => {
                            Ok(Exit::from_direct(exited))
                        }
                        Ok(exited) => Ok(Exit::from_wrapper(exited)),
                        Err(e) => {
                            // Only possible if something else reaped our child; the wrapper
                            // still wrote the status file.
                            tracing::warn!(pid, "could not wait for the agent: {e}");
                            read_status(launch)
                                .await
                                .map(Exit::from_shell_code)
                                .ok_or_else(|| {
                                    format!("could not wait for the agent process {pid}: {e}")
                                })
                        }
                    };
                }
                Watch::Reaper(exited) => match exited.await {
                    Ok(code) if code >= 0 => return Ok(Exit::from_shell_code(code)),
                    // The reaper is gone (or lost the run): watch it ourselves.
                    _ => *self = Watch::Poll,
                },
                Watch::Poll => {
                    while still_running(launch, pid, ticks).await {
                        sleep(RECOVER_POLL).await;
                    }
                    return read_status(launch)
                        .await
                        .map(Exit::from_shell_code)
                        .ok_or_else(|| {
                            format!("the agent process {pid} exited and left no exit status")
                        });
                }
            }
        }
    }

    /// The child to reap after a stop, if the run is ours.
    fn into_child(self) -> Option<Child> {
        match self {
            Watch::Child(child, _) => Some(child),
            Watch::Reaper(_) | Watch::Poll => None,
        }
    }
}

/// Starts an exec run and watches it to the end. When it counts as started
/// is the core's decision (its settle time, counted from `Spawned`).
pub(super) async fn run(at: Attempt) {
    let Some(mut at) = at.prepare_workspace().await else {
        return;
    };
    let argv = at.launch.argv(&at.config().command);
    let (mut watch, handle) = match launch(&at, &argv).await {
        Ok(launched) => launched,
        Err(reason) => return fail_to_start(at, reason, argv).await,
    };
    let (pid, ticks) = (handle.pid.unwrap_or_default(), handle.start_ticks);
    let launch = Arc::clone(&at.launch);
    at.spawned(handle).await;
    let exit = match at.or_ctl(watch.wait(&launch, pid, ticks)).await {
        Wait::Done(exit) => exit,
        Wait::Stop => return stop(at, watch.into_child(), pid, argv, Outcome::Cancelled).await,
        Wait::TimedOut(outcome) => return stop(at, watch.into_child(), pid, argv, outcome).await,
        Wait::Forget => return,
    };
    match exit {
        Ok(exit) => finish_exit(at, exit, argv).await,
        Err(reason) => exited_without_status(at, argv, reason).await,
    }
}

/// Prepares the run directory and spawns the run: through the reaper when it
/// keeps the status (and one is running), else as our own child.
async fn launch(at: &Attempt, argv: &[String]) -> Result<(Watch, RunHandle), String> {
    let status = at.config().exec_status;
    let launch = Arc::clone(&at.launch);
    let owned = argv.to_vec();
    let reaper = match status {
        ExecStatus::Recorded => at.shared.reaper.clone(),
        ExecStatus::Waited => None,
    };
    // The reaper prepares the run directory itself: nothing here blocks.
    let spawned = match reaper.and_then(|r| Some((r, launch.reaper_request(argv)?))) {
        Some((reaper, request)) => reaper.spawn(request).await,
        None => None,
    };
    if let Some(spawned) = spawned {
        return match spawned {
            Ok(s) => {
                let handle = RunHandle {
                    pid: Some(s.pid),
                    session: None,
                    run_dir: launch.run_dir().to_owned(),
                    mode: RunMode::Exec,
                    start_ticks: s.start_ticks,
                };
                Ok((Watch::Reaper(s.exited), handle))
            }
            Err(SpawnError::Refused(reason)) => Err(reason),
            Err(SpawnError::Lost) => {
                // The reaper died mid-spawn: the run exists if it left its handle.
                let dir = launch.run_dir().to_owned();
                blocking(move || Ok(super::recorded_handle(&dir)))
                    .await?
                    .map(|handle| (Watch::Poll, handle))
                    .ok_or_else(|| {
                        "the reaper stopped or did not answer before it confirmed the spawn"
                            .to_owned()
                    })
            }
        };
    }
    // Preparing and spawning block for a fraction of a millisecond; keep that
    // off the async workers.
    blocking(move || {
        let program = launch.prepare_exec(&owned)?;
        spawn_child(&launch, &program, &owned[1..], status)
    })
    .await
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(format!("the spawn task failed: {e}")))
}

/// Re-attaches to an exec run after a sidecar restart.
pub(super) async fn recover(mut at: Attempt, handle: RunHandle) {
    let argv = at.launch.argv(&at.config().command);
    let Some(pid) = handle.pid else {
        return exited_without_status(at, argv, "the run has no recorded pid".into()).await;
    };
    let ticks = handle.start_ticks;
    if still_running(&at.launch, pid, ticks).await {
        at.started(Some(pid)).await;
        let launch = Arc::clone(&at.launch);
        return match at.or_ctl(Watch::Poll.wait(&launch, pid, ticks)).await {
            Wait::Done(Ok(exit)) => finish_exit(at, exit, argv).await,
            Wait::Done(Err(reason)) => exited_without_status(at, argv, reason).await,
            Wait::Stop => stop(at, None, pid, argv, Outcome::Cancelled).await,
            Wait::TimedOut(outcome) => stop(at, None, pid, argv, outcome).await,
            Wait::Forget => {}
        };
    }
    match read_status(&at.launch).await {
        Some(code) => finish_exit(at, Exit::from_shell_code(code), argv).await,
        None => {
            let reason =
                "the agent exited while the sidecar was down and left no exit status".to_owned();
            exited_without_status(at, argv, reason).await
        }
    }
}

/// Spawns the run as our child: under the wrapper, or directly with
/// `exec_status = "waited"`. Blocking.
fn spawn_child(
    launch: &Launch,
    program: &Path,
    args: &[String],
    status: ExecStatus,
) -> Result<(Watch, RunHandle), String> {
    let status_path = launch.status_path();
    let (stdout, stderr) = launch.output()?;
    let stdin = launch.agent_stdin()?;
    let (mut cmd, through) = match status {
        ExecStatus::Recorded => {
            let mut cmd = launch.command(SHELL);
            cmd.arg("-c")
                .arg(WRAPPER)
                .arg(WRAPPER_NAME)
                .arg(&status_path)
                .arg(program);
            (cmd, format!(" through {SHELL}"))
        }
        ExecStatus::Waited => (launch.command(program), String::new()),
    };
    cmd.args(args)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr)
        // The run must outlive the sidecar.
        .kill_on_drop(false);
    let shown = program.display();
    let child = cmd
        .spawn()
        .map_err(|e| format!("could not start `{shown}`{through}: {e}"))?;
    let pid = child
        .id()
        .ok_or_else(|| format!("`{shown}` was spawned but has no pid"))?;
    let handle = RunHandle {
        pid: Some(pid),
        session: None,
        run_dir: launch.run_dir().to_owned(),
        mode: RunMode::Exec,
        start_ticks: sys::start_ticks(pid),
    };
    // Before anyone hears of the run: a sidecar that dies before its commit
    // finds the run by this at its restart and ends it.
    if let Err(e) = launch.write_handle(&handle) {
        tracing::warn!(
            pid,
            "{e}; a crash before the next commit would leave this run unwatched"
        );
    }
    Ok((Watch::Child(child, status), handle))
}

/// SIGTERM to the group, SIGKILL after `stop_grace`, then `outcome`
/// (`Cancelled` for a stop).
async fn stop(
    at: Attempt,
    mut child: Option<Child>,
    pgid: u32,
    argv: Vec<String>,
    outcome: Outcome,
) {
    let grace = at.config().stop_grace;
    let deadline = Instant::now() + grace;
    sys::signal_group(pgid, libc::SIGTERM);
    let mut how = "SIGTERM sent to the process group".to_owned();
    loop {
        if let Some(child) = child.as_mut() {
            // Reap the wrapper so it does not count as a live member.
            let _ = child.try_wait();
        }
        if !group_alive(pgid).await {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            sys::signal_group(pgid, libc::SIGKILL);
            how = format!("SIGKILL sent to the process group after {grace:?}");
            break;
        }
        sleep(STOP_POLL.min(deadline - now)).await;
    }
    if let Some(child) = child.as_mut() {
        let _ = timeout(REAP_WAIT, child.wait()).await;
    }
    let failure = Failure {
        reason: format!("stopped by the sidecar: {how}"),
        command: argv,
        ..Failure::default()
    };
    at.finish(outcome, Some(failure)).await;
}

/// `Completed` for exit 0, else `Failed` with the tails.
async fn finish_exit(at: Attempt, exit: Exit, argv: Vec<String>) {
    if exit.success() {
        return at.finish(Outcome::Completed, None).await;
    }
    let launch = Arc::clone(&at.launch);
    let command = argv.clone();
    let failure =
        tokio::task::spawn_blocking(move || launch.failure(exit.to_string(), Some(exit), &command))
            .await
            .unwrap_or_else(|e| Failure {
                reason: format!("{exit} (tails unavailable: {e})"),
                exit_code: if let Exit::Code(c) = exit {
                    Some(c)
                } else {
                    None
                },
                signal: if let Exit::Signal(s) = exit {
                    Some(s)
                } else {
                    None
                },
                command: argv,
                ..Failure::default()
            });
    at.finish(Outcome::Failed, Some(failure)).await;
}

async fn fail_to_start(at: Attempt, reason: String, argv: Vec<String>) {
    let failure = Failure {
        reason,
        command: argv,
        ..Failure::default()
    };
    at.finish(Outcome::Failed, Some(failure)).await;
}

async fn exited_without_status(at: Attempt, argv: Vec<String>, reason: String) {
    let launch = Arc::clone(&at.launch);
    let failure = tokio::task::spawn_blocking(move || launch.failure(reason, None, &argv))
        .await
        .unwrap_or_default();
    at.finish(Outcome::AgentExited, Some(failure)).await;
}

async fn read_status(launch: &Arc<Launch>) -> Option<i32> {
    let launch = Arc::clone(launch);
    tokio::task::spawn_blocking(move || launch.recorded_status())
        .await
        .ok()
        .flatten()
}

async fn group_alive(pgid: u32) -> bool {
    tokio::task::spawn_blocking(move || sys::group_alive(pgid))
        .await
        .unwrap_or(true)
}

/// Whether a run we are not the parent of still runs: its leader is alive
/// (and is the same process); or it has ended without a recorded status and
/// either other members of its group live on or it is a zombie whose live
/// parent (its reaper, which records before it reaps) has yet to reap it.
pub(super) async fn still_running(launch: &Arc<Launch>, pid: u32, ticks: Option<u64>) -> bool {
    let launch = Arc::clone(launch);
    tokio::task::spawn_blocking(move || match sys::process_state(pid) {
        sys::ProcState::Alive { start_ticks } => sys::same_start(start_ticks, ticks),
        // A zombie whose live parent (the reaper) has yet to reap it: the
        // reaper records the status first, so wait for it.
        sys::ProcState::Zombie { ppid } => {
            launch.recorded_status().is_none()
                && (sys::parent_will_reap(ppid) || sys::group_alive(pid))
        }
        sys::ProcState::Gone => launch.recorded_status().is_none() && sys::group_alive(pid),
    })
    .await
    .unwrap_or(false)
}
