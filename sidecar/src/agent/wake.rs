//! Wake mode: the command only wakes an agent that lives elsewhere; the start
//! is then verified and the agent probed while it runs.
//!
//! ```text
//! wake command ──exit 0──► Spawned ──verify──► Started ──probe every interval──► gone: AgentExited
//!      │ non-zero, spawn error, start_timeout         │ start_timeout
//!      ▼                                              ▼
//!  WakeFailed                                    StartTimeout
//! ```
//!
//! With `verify = "agent-ack"` the agent's own `task start` is the
//! verification (handled by the sidecar); a configured `verify_process` or
//! `verify_command` is then only a liveness probe, armed once it first succeeds.
//! Which of these applies is one [`Verify`], checked when sidecar.toml is parsed.

use std::sync::Arc;
use std::time::Duration;

use muster_protocol::msg::{Failure, Outcome};
use tokio::process::Child;
use tokio::time::{Instant, timeout};

use super::launch::{Exit, Launch};
use super::{Attempt, Probe, RunHandle, RunMode, Verify, Wait, sys};

/// How often the start is checked while verifying.
const VERIFY_POLL: Duration = Duration::from_millis(200);
/// Longest one run of `verify_command` may take; a probe that hangs is inconclusive.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest time between probes of a running agent, whatever the interval says.
const PROBE_INTERVAL_MIN: Duration = Duration::from_millis(10);
/// Shortest time the stop command gets, whatever `stop_grace` says.
const STOP_COMMAND_TIMEOUT_MIN: Duration = Duration::from_secs(1);

/// One probe's answer.
enum Seen {
    Alive(Option<u32>),
    Gone(String),
    /// The probe itself failed (could not start, hung): no conclusion.
    Unknown(String),
}

/// Wakes the agent, verifies the start, and probes it until it ends.
pub(super) async fn run(mut at: Attempt) {
    let argv = at.config().command.clone();
    let launch = Arc::clone(&at.launch);
    let spawn_argv = argv.clone();
    let spawned = tokio::task::spawn_blocking(move || spawn(&launch, &spawn_argv)).await;
    let mut child = match spawned {
        Ok(Ok(child)) => child,
        Ok(Err(reason)) => return wake_failed(at, reason, None, argv).await,
        Err(e) => return wake_failed(at, format!("the spawn task failed: {e}"), None, argv).await,
    };
    let pgid = child.id().unwrap_or(0);
    let limit = at.config().start_timeout;
    let status = match at.or_ctl(timeout(limit, child.wait())).await {
        Wait::Done(Ok(Ok(status))) => status,
        Wait::Done(Ok(Err(e))) => {
            let reason = format!("could not wait for the wake command: {e}");
            return wake_failed(at, reason, None, argv).await;
        }
        Wait::Done(Err(_elapsed)) => {
            sys::signal_group(pgid, libc::SIGKILL);
            let _ = timeout(Duration::from_secs(1), child.wait()).await;
            let reason = format!("the wake command did not exit within {limit:?} and was killed");
            return wake_failed(at, reason, None, argv).await;
        }
        Wait::Stop => {
            sys::signal_group(pgid, libc::SIGTERM);
            return stop(at).await;
        }
        Wait::Forget => return,
    };
    let exit = Exit::from_direct(status);
    if !exit.success() {
        return wake_failed(
            at,
            format!("the wake command failed: {exit}"),
            Some(exit),
            argv,
        )
        .await;
    }
    at.spawned(RunHandle {
        pid: None,
        session: None,
        run_dir: at.launch.run_dir().to_owned(),
        mode: RunMode::Wake,
        start_ticks: None,
    })
    .await;

    match at.config().verify.clone() {
        Verify::AgentAck(None) => idle(at).await,
        Verify::AgentAck(Some(probe)) => {
            let limit = at.config().start_timeout;
            match look(&mut at, &probe, limit).await {
                Wait::Done(Ok(_)) => watch(at, probe).await,
                Wait::Done(Err(last)) => {
                    tracing::warn!(
                        task = at.run.task.0,
                        "liveness probe never succeeded ({last}); not probing this run"
                    );
                    idle(at).await;
                }
                Wait::Stop => stop(at).await,
                Wait::Forget => {}
            }
        }
        Verify::Probe(probe) => {
            let limit = at.config().start_timeout;
            match look(&mut at, &probe, limit).await {
                Wait::Done(Ok(pid)) => {
                    at.started(pid).await;
                    watch(at, probe).await;
                }
                Wait::Done(Err(last)) => {
                    let failure = Failure {
                        reason: format!("{} within {limit:?} ({last})", probe.never_seen()),
                        command: probe.argv(),
                        ..Failure::default()
                    };
                    at.finish(Outcome::StartTimeout, Some(failure)).await;
                }
                Wait::Stop => stop(at).await,
                Wait::Forget => {}
            }
        }
    }
}

/// Re-attaches to a wake run after a sidecar restart: looks for the agent
/// for up to `start_timeout` (it may still have been starting), then probes it.
pub(super) async fn recover(mut at: Attempt) {
    let Some(probe) = at.config().verify.probe().cloned() else {
        return idle(at).await;
    };
    let ack = matches!(at.config().verify, Verify::AgentAck(_));
    let limit = at.config().start_timeout;
    match look(&mut at, &probe, limit).await {
        Wait::Done(Ok(pid)) => {
            if !ack {
                at.started(pid).await;
            }
            watch(at, probe).await;
        }
        Wait::Done(Err(_)) if ack => idle(at).await,
        Wait::Done(Err(last)) => {
            let failure = Failure {
                reason: format!(
                    "after the sidecar restarted, {} within {limit:?} ({last})",
                    probe.never_seen()
                ),
                command: probe.argv(),
                ..Failure::default()
            };
            at.finish(Outcome::AgentExited, Some(failure)).await;
        }
        Wait::Stop => stop(at).await,
        Wait::Forget => {}
    }
}

/// Prepares the run directory and spawns the wake command. Blocking.
fn spawn(launch: &Launch, argv: &[String]) -> Result<Child, String> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| "the wake command is empty".to_owned())?;
    launch.prepare()?;
    let (stdout, stderr) = launch.output()?;
    let mut cmd = launch.command(program);
    // An agent the wake command leaves behind must outlive the sidecar.
    cmd.args(args)
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(false);
    cmd.spawn()
        .map_err(|e| format!("could not start the wake command `{program}`: {e}"))
}

/// Polls `probe` until it sees the agent, for at most `limit`.
/// `Err` carries the last probe's answer.
async fn look(
    at: &mut Attempt,
    probe: &Probe,
    limit: Duration,
) -> Wait<Result<Option<u32>, String>> {
    let launch = Arc::clone(&at.launch);
    let deadline = Instant::now() + limit;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let budget = PROBE_TIMEOUT.min(remaining.max(VERIFY_POLL));
        let last = match at.or_ctl(probe.check(&launch, budget)).await {
            Wait::Done(Seen::Alive(pid)) => return Wait::Done(Ok(pid)),
            Wait::Done(Seen::Gone(last) | Seen::Unknown(last)) => last,
            Wait::Stop => return Wait::Stop,
            Wait::Forget => return Wait::Forget,
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Wait::Done(Err(last));
        }
        match at.pause(VERIFY_POLL.min(remaining)).await {
            Wait::Done(()) => {}
            Wait::Stop => return Wait::Stop,
            Wait::Forget => return Wait::Forget,
        }
    }
}

/// Probes a started agent every `probe_interval` until it is gone.
async fn watch(mut at: Attempt, probe: Probe) {
    let launch = Arc::clone(&at.launch);
    let interval = at.run.probe_interval.max(PROBE_INTERVAL_MIN);
    loop {
        match at.pause(interval).await {
            Wait::Done(()) => {}
            Wait::Stop => return stop(at).await,
            Wait::Forget => return,
        }
        match at.or_ctl(probe.check(&launch, PROBE_TIMEOUT)).await {
            Wait::Done(Seen::Alive(_)) => {}
            Wait::Done(Seen::Unknown(why)) => {
                tracing::warn!(task = at.run.task.0, "liveness probe inconclusive: {why}");
            }
            Wait::Done(Seen::Gone(reason)) => {
                let failure = Failure {
                    reason,
                    command: probe.argv(),
                    ..Failure::default()
                };
                return at.finish(Outcome::AgentExited, Some(failure)).await;
            }
            Wait::Stop => return stop(at).await,
            Wait::Forget => return,
        }
    }
}

/// Nothing to watch: wait for `stop` or `forget`.
async fn idle(mut at: Attempt) {
    if at.ctl_changed().await.stop {
        stop(at).await;
    }
}

/// Runs `stop_command` (bounded by `stop_grace`), then `Cancelled`.
async fn stop(at: Attempt) {
    let argv = at.config().stop_command.clone();
    let limit = at.config().stop_grace.max(STOP_COMMAND_TIMEOUT_MIN);
    let reason = match argv.split_first() {
        None => "stopped; no stop_command is configured, so the agent was left as it is".to_owned(),
        Some((program, args)) => {
            let mut cmd = at.launch.command(program);
            cmd.args(args).kill_on_drop(true);
            match cmd.spawn() {
                Err(e) => format!("stopped; the stop command `{program}` could not start: {e}"),
                Ok(mut child) => match timeout(limit, child.wait()).await {
                    Ok(Ok(status)) => match Exit::from_direct(status) {
                        exit if exit.success() => "stopped by the stop command".to_owned(),
                        exit => format!("stopped; the stop command failed: {exit}"),
                    },
                    Ok(Err(e)) => format!("stopped; could not wait for the stop command: {e}"),
                    Err(_) => {
                        sys::signal_group(child.id().unwrap_or(0), libc::SIGKILL);
                        format!(
                            "stopped; the stop command did not exit within {limit:?} and was killed"
                        )
                    }
                },
            }
        }
    };
    let failure = Failure {
        reason,
        command: argv,
        ..Failure::default()
    };
    at.finish(Outcome::Cancelled, Some(failure)).await;
}

async fn wake_failed(at: Attempt, reason: String, exit: Option<Exit>, argv: Vec<String>) {
    let launch = Arc::clone(&at.launch);
    let failure = tokio::task::spawn_blocking(move || launch.failure(reason, exit, &argv))
        .await
        .unwrap_or_default();
    at.finish(Outcome::WakeFailed, Some(failure)).await;
}

// === impl Probe ===

impl Probe {
    fn argv(&self) -> Vec<String> {
        match self {
            Probe::Process(_) => Vec::new(),
            Probe::Command(argv) => argv.clone(),
        }
    }

    fn never_seen(&self) -> String {
        match self {
            Probe::Process(pattern) => format!("no process matching `{pattern}` appeared"),
            Probe::Command(_) => "the verify command did not exit 0".to_owned(),
        }
    }

    async fn check(&self, launch: &Launch, limit: Duration) -> Seen {
        match self {
            Probe::Process(pattern) => {
                let search = pattern.clone();
                match tokio::task::spawn_blocking(move || sys::find_process(&search)).await {
                    Ok(Ok(Some(pid))) => Seen::Alive(Some(pid)),
                    Ok(Ok(None)) => {
                        Seen::Gone(format!("the agent process matching `{pattern}` is gone"))
                    }
                    Ok(Err(e)) => Seen::Unknown(e),
                    Err(e) => Seen::Unknown(format!("the process search failed: {e}")),
                }
            }
            Probe::Command(argv) => {
                let Some((program, args)) = argv.split_first() else {
                    return Seen::Unknown("the verify command is empty".into());
                };
                let mut cmd = launch.command(program);
                cmd.args(args).kill_on_drop(true);
                let mut child = match cmd.spawn() {
                    Ok(child) => child,
                    Err(e) => {
                        return Seen::Unknown(format!(
                            "the verify command `{program}` could not start: {e}"
                        ));
                    }
                };
                match timeout(limit, child.wait()).await {
                    Ok(Ok(status)) => match Exit::from_direct(status) {
                        exit if exit.success() => Seen::Alive(None),
                        Exit::Code(code) => Seen::Gone(format!("verify command exited {code}")),
                        exit => Seen::Gone(format!("verify command {exit}")),
                    },
                    Ok(Err(e)) => {
                        Seen::Unknown(format!("could not wait for the verify command: {e}"))
                    }
                    Err(_) => {
                        sys::signal_group(child.id().unwrap_or(0), libc::SIGKILL);
                        Seen::Unknown(format!(
                            "the verify command `{program}` did not exit within {limit:?}"
                        ))
                    }
                }
            }
        }
    }
}
