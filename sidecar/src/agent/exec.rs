//! Exec mode: the command is the run.
//!
//! The agent runs under a fixed `/bin/sh` wrapper, in its own process group,
//! so it outlives a sidecar restart and still leaves its exit status behind:
//!
//! ```text
//! /bin/sh -c 'WRAPPER' muster-run <run_dir>/status <agent argv…>
//! ```
//!
//! The agent's argv are positional parameters: the shell expands `"$@"` and
//! never parses them, so no task or config text is ever interpreted. The
//! wrapper costs one extra exec per run (measured: about 1 ms of CPU per run
//! with dash on the benchmark VM), the price of surviving a restart with the
//! status intact. With `exec_status = "waited"` the agent is spawned directly
//! (same process group, environment and files) and its status comes from
//! `wait` alone.

use std::sync::Arc;
use std::time::Duration;

use muster_protocol::msg::{Failure, Outcome};
use tokio::process::Child;
use tokio::time::{Instant, sleep, timeout};

use super::launch::{Exit, Launch, resolve};
use super::{Attempt, ExecStatus, RunHandle, RunMode, Wait, sys};

/// The only shell the runner uses, with the only script it runs.
const SHELL: &str = "/bin/sh";
/// Runs `"$@"`, records its status in the file named by `$1`, exits with it.
/// `1<>` opens the record without truncating it, so its block is reused (see
/// `Launch::clear_status`).
const WRAPPER: &str = r#"s=$1; shift; "$@"; rc=$?; printf '%-3s\n' "$rc" 1<>"$s"; exit "$rc""#;
/// `$0` of the wrapper, which is what `ps` shows for it.
const WRAPPER_NAME: &str = "muster-run";

/// How often a stop checks whether the process group is gone.
const STOP_POLL: Duration = Duration::from_millis(50);
/// How often a recovered run (not our child any more) is checked.
const RECOVER_POLL: Duration = Duration::from_millis(200);
/// How long to wait for the killed wrapper to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(5);

/// A spawned wrapper.
struct Spawned {
    child: Child,
    pid: u32,
    handle: RunHandle,
}

/// Starts an exec run and watches it to the end.
pub(super) async fn run(mut at: Attempt) {
    let argv = at.config().command.clone();
    let launch = Arc::clone(&at.launch);
    let spawn_argv = argv.clone();
    // Preparing the run directory and spawning block for a fraction of a
    // millisecond; keep that off the async workers.
    let status = at.config().exec_status;
    let spawned = tokio::task::spawn_blocking(move || spawn(&launch, &spawn_argv, status)).await;
    let Spawned {
        mut child,
        pid,
        handle,
    } = match spawned {
        Ok(Ok(spawned)) => spawned,
        Ok(Err(reason)) => return fail_to_start(at, reason, argv).await,
        Err(e) => return fail_to_start(at, format!("the spawn task failed: {e}"), argv).await,
    };
    let settle = at.config().settle;
    let early = if settle.is_zero() {
        // Spawned counts as started: one event pair, usually one commit.
        at.spawned_and_started(handle, Some(pid)).await;
        None
    } else {
        at.spawned(handle).await;
        match at.or_ctl(timeout(settle, child.wait())).await {
            Wait::Done(Ok(status)) => Some(status),
            Wait::Done(Err(_elapsed)) => {
                at.started(Some(pid)).await;
                None
            }
            Wait::Stop => return stop(at, Some(child), pid, argv).await,
            Wait::Forget => return,
        }
    };
    let exited_early = early.is_some();
    let exited = match early {
        Some(exited) => exited,
        None => match at.or_ctl(child.wait()).await {
            Wait::Done(status) => status,
            Wait::Stop => return stop(at, Some(child), pid, argv).await,
            Wait::Forget => return,
        },
    };
    let exit = match exited {
        Ok(exited) if at.config().exec_status == ExecStatus::Waited => Exit::from_direct(exited),
        Ok(exited) => Exit::from_wrapper(exited),
        Err(e) => {
            // Only possible if something else reaped our child; the wrapper
            // still wrote the status file.
            tracing::warn!(pid, "could not wait for the agent: {e}");
            match read_status(&at.launch).await {
                Some(code) => Exit::from_shell_code(code),
                None => {
                    return exited_without_status(
                        at,
                        argv,
                        format!("could not wait for the agent process {pid}: {e}"),
                    )
                    .await;
                }
            }
        }
    };
    if exited_early && exit.success() {
        at.started(Some(pid)).await;
    }
    finish_exit(at, exit, argv).await;
}

/// Re-attaches to an exec run after a sidecar restart.
pub(super) async fn recover(mut at: Attempt, handle: RunHandle) {
    let argv = at.config().command.clone();
    let Some(pid) = handle.pid else {
        return exited_without_status(at, argv, "the run has no recorded pid".into()).await;
    };
    let ticks = handle.start_ticks;
    if still_running(&at.launch, pid, ticks).await {
        at.started(Some(pid)).await;
        loop {
            match at.pause(RECOVER_POLL).await {
                Wait::Done(()) if still_running(&at.launch, pid, ticks).await => {}
                Wait::Done(()) => break,
                Wait::Stop => return stop(at, None, pid, argv).await,
                Wait::Forget => return,
            }
        }
        return match read_status(&at.launch).await {
            Some(code) => finish_exit(at, Exit::from_shell_code(code), argv).await,
            None => {
                let reason = format!("the agent process {pid} exited and left no exit status");
                exited_without_status(at, argv, reason).await
            }
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

/// Prepares the run directory and spawns the wrapper. Blocking.
fn spawn(launch: &Launch, argv: &[String], status: ExecStatus) -> Result<Spawned, String> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| "the agent command is empty".to_owned())?;
    launch.prepare()?;
    let resolved = resolve(program).map_err(|e| format!("could not start `{program}`: {e}"))?;
    // Also in "waited" mode: a reused run directory may hold an earlier run's record.
    launch.clear_status()?;
    let status_path = launch.status_path();
    let (stdout, stderr) = launch.output()?;
    let (mut cmd, through) = match status {
        ExecStatus::Recorded => {
            let mut cmd = launch.command(SHELL);
            cmd.arg("-c")
                .arg(WRAPPER)
                .arg(WRAPPER_NAME)
                .arg(&status_path)
                .arg(resolved);
            (cmd, format!(" through {SHELL}"))
        }
        ExecStatus::Waited => (launch.command(resolved), String::new()),
    };
    cmd.args(args)
        .stdout(stdout)
        .stderr(stderr)
        // The run must outlive the sidecar.
        .kill_on_drop(false);
    let child = cmd
        .spawn()
        .map_err(|e| format!("could not start `{program}`{through}: {e}"))?;
    let pid = child
        .id()
        .ok_or_else(|| format!("`{program}` was spawned but has no pid"))?;
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
    Ok(Spawned { child, pid, handle })
}

/// SIGTERM to the group, SIGKILL after `stop_grace`, then `Cancelled`.
async fn stop(at: Attempt, mut child: Option<Child>, pgid: u32, argv: Vec<String>) {
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
    at.finish(Outcome::Cancelled, Some(failure)).await;
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
/// (and is the same process), or the leader is gone without a recorded
/// status while other members of its group live on.
async fn still_running(launch: &Arc<Launch>, pid: u32, ticks: Option<u64>) -> bool {
    let launch = Arc::clone(launch);
    tokio::task::spawn_blocking(move || match sys::process_state(pid) {
        sys::ProcState::Alive { start_ticks } => sys::same_start(start_ticks, ticks),
        sys::ProcState::Zombie | sys::ProcState::Gone => {
            launch.recorded_status().is_none() && sys::group_alive(pid)
        }
    })
    .await
    .unwrap_or(false)
}
