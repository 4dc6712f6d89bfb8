//! Wake mode: the command only wakes an agent that lives elsewhere; the start
//! is then verified and the agent probed while it runs.
//!
//! ```text
//! wake command ──exit 0──► Spawned ──verify──► Started ──probe every interval──► gone: AgentExited
//!      │ non-zero, spawn error, time_out              │ time_out
//!      ▼                                              ▼
//!  WakeFailed                                    StartTimeout
//! ```
//!
//! The deadlines are the core's: `time_out` arrives when one passes, with the
//! outcome to end the run with.
//!
//! With `verify = "agent-ack"` the agent's own `task start` is the
//! verification (handled by the sidecar); a configured `verify_process` or
//! `verify_command` is then only a liveness probe, armed once it first succeeds.
//! Which of these applies is one [`Verify`], checked when sidecar.toml is parsed.
//! Commands and patterns may hold the attempt's placeholders (`{task_id}` …),
//! so with several slots each run's probe finds its own agent.
//!
//! Every end the sidecar decides (cancel, abandon, a deadline) stops the
//! agent: with `stop_command` when one is set, else by signalling the wake
//! command's process group and that of the process the probe found.

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
/// How often a stop checks whether the signalled groups are gone.
const STOP_POLL: Duration = Duration::from_millis(50);
/// Shortest time the stop command gets, whatever `stop_grace` says.
const STOP_COMMAND_TIMEOUT_MIN: Duration = Duration::from_secs(1);

/// One probe's answer.
enum Seen {
    Alive(Option<u32>),
    Gone(String),
    /// The probe itself failed (could not start, hung): no conclusion.
    Unknown(String),
}

/// What a stop without `stop_command` may signal: the wake command's process
/// group (what it left behind) and the group of the process the probe found.
#[derive(Debug, Clone, Copy, Default)]
struct Targets {
    /// The wake command's pid (its group id) and start time.
    wake: Option<(u32, Option<u64>)>,
    /// The agent process the probe last saw.
    agent: Option<u32>,
}

impl Targets {
    /// The live groups a stop may signal, never the sidecar's own. Blocking.
    fn groups(self) -> Vec<u32> {
        let mut out = Vec::new();
        if let Some(group) = self.agent.and_then(sys::foreign_group) {
            out.push(group);
        }
        if let Some((pgid, ticks)) = self.wake
            && !out.contains(&pgid)
            && !sys::pid_reused(pgid, ticks)
            && pgid != sys::own_group()
            && sys::group_alive(pgid)
        {
            out.push(pgid);
        }
        out
    }

    fn saw(&mut self, pid: Option<u32>) {
        if pid.is_some() {
            self.agent = pid;
        }
    }
}

/// Wakes the agent, verifies the start, and probes it until it ends. How long
/// the wake command and the verification may take is the core's deadline: it
/// arrives as `time_out`. Every end but the agent's own (cancel, abandon, a
/// deadline) stops the agent, so a run the hub gave up on never keeps running.
pub(super) async fn run(at: Attempt) {
    let Some(mut at) = at.prepare_workspace().await else {
        return;
    };
    let argv = at.launch.argv(&at.config().command);
    let launch = Arc::clone(&at.launch);
    let spawn_argv = argv.clone();
    let spawned = tokio::task::spawn_blocking(move || spawn(&launch, &spawn_argv)).await;
    let mut child = match spawned {
        Ok(Ok(child)) => child,
        Ok(Err(reason)) => return wake_failed(at, Outcome::WakeFailed, reason, None, argv).await,
        Err(e) => {
            let reason = format!("the spawn task failed: {e}");
            return wake_failed(at, Outcome::WakeFailed, reason, None, argv).await;
        }
    };
    let pgid = child.id().unwrap_or(0);
    let mut targets = Targets {
        wake: Some((pgid, sys::start_ticks(pgid))),
        agent: None,
    };
    let status = match at.or_ctl(child.wait()).await {
        Wait::Done(Ok(status)) => status,
        Wait::Done(Err(e)) => {
            let reason = format!("could not wait for the wake command: {e}");
            return wake_failed(at, Outcome::WakeFailed, reason, None, argv).await;
        }
        Wait::TimedOut(outcome) => {
            sys::signal_group(pgid, libc::SIGKILL);
            let _ = timeout(Duration::from_secs(1), child.wait()).await;
            let limit = at.config().start_timeout;
            let reason = format!("the wake command did not exit within {limit:?} and was killed");
            return wake_failed(at, outcome, reason, None, argv).await;
        }
        Wait::Stop => {
            sys::signal_group(pgid, libc::SIGTERM);
            return stop(at, targets, Outcome::Cancelled, None).await;
        }
        Wait::Forget => return,
    };
    let exit = Exit::from_direct(status);
    if !exit.success() {
        let reason = format!("the wake command failed: {exit}");
        return wake_failed(at, Outcome::WakeFailed, reason, Some(exit), argv).await;
    }
    at.spawned(RunHandle {
        pid: Some(pgid),
        session: None,
        run_dir: at.launch.run_dir().to_owned(),
        mode: RunMode::Wake,
        start_ticks: targets.wake.and_then(|w| w.1),
    })
    .await;

    let limit = at.config().start_timeout;
    match expanded(&at.config().verify, &at.launch) {
        Verify::AgentAck(None) => idle(at, targets).await,
        Verify::AgentAck(Some(probe)) => {
            // Only the liveness probe's arming window: the agent's own `task
            // start` is the verification, and the hub bounds it.
            match look(&mut at, &probe, Some(limit)).await {
                Look::Seen(pid) => {
                    targets.saw(pid);
                    watch(at, probe, targets).await;
                }
                Look::NotSeen(last) => {
                    tracing::warn!(
                        task = at.run.task.0,
                        "liveness probe never succeeded ({last}); not probing this run"
                    );
                    idle(at, targets).await;
                }
                Look::TimedOut(outcome, last) => {
                    let reason = format!("the start was not verified in time ({last})");
                    stop(at, targets, outcome, Some(probe.failure(reason))).await;
                }
                Look::Stop => stop(at, targets, Outcome::Cancelled, None).await,
                Look::Forget => {}
            }
        }
        Verify::Probe(probe) => match look(&mut at, &probe, None).await {
            Look::Seen(pid) => {
                targets.saw(pid);
                at.started_as(pid, session(&at, targets).await).await;
                watch(at, probe, targets).await;
            }
            // Without a window the look ends only by the core's deadline.
            Look::TimedOut(outcome, last) => {
                let reason = format!("{} within {limit:?} ({last})", probe.never_seen());
                stop(at, targets, outcome, Some(probe.failure(reason))).await;
            }
            Look::NotSeen(last) => {
                let reason = format!("{} ({last})", probe.never_seen());
                let failure = Some(probe.failure(reason));
                stop(at, targets, Outcome::StartTimeout, failure).await;
            }
            Look::Stop => stop(at, targets, Outcome::Cancelled, None).await,
            Look::Forget => {}
        },
    }
}

/// Re-attaches to a wake run after a sidecar restart: looks for the agent (it
/// may still have been starting) until the core's deadline, then probes it.
/// With agent-ack the look is only the liveness probe's arming window.
pub(super) async fn recover(mut at: Attempt, handle: RunHandle) {
    let mut targets = Targets {
        wake: handle.pid.map(|pid| (pid, handle.start_ticks)),
        agent: None,
    };
    let Some(probe) = expanded(&at.config().verify, &at.launch).probe().cloned() else {
        return idle(at, targets).await;
    };
    let ack = matches!(at.config().verify, Verify::AgentAck(_));
    let limit = at.config().start_timeout;
    match look(&mut at, &probe, ack.then_some(limit)).await {
        Look::Seen(pid) => {
            targets.saw(pid);
            if !ack {
                at.started_as(pid, session(&at, targets).await).await;
            }
            watch(at, probe, targets).await;
        }
        Look::NotSeen(_) => idle(at, targets).await,
        Look::TimedOut(outcome, last) => {
            let reason = format!(
                "after the sidecar restarted, {} within {limit:?} ({last})",
                probe.never_seen()
            );
            stop(at, targets, outcome, Some(probe.failure(reason))).await;
        }
        Look::Stop => stop(at, targets, Outcome::Cancelled, None).await,
        Look::Forget => {}
    }
}

/// The verification with this attempt's placeholders filled in, so each run's
/// probe looks for its own agent.
fn expanded(verify: &Verify, launch: &Launch) -> Verify {
    let probe = |p: &Probe| match p {
        Probe::Process(pattern) => Probe::Process(launch.expand(pattern)),
        Probe::Command(argv) => Probe::Command(launch.argv(argv)),
    };
    match verify {
        Verify::AgentAck(p) => Verify::AgentAck(p.as_ref().map(probe)),
        Verify::Probe(p) => Verify::Probe(probe(p)),
    }
}

/// What `Started.session` says: the configured session name, else the process
/// group a stop would signal.
async fn session(at: &Attempt, targets: Targets) -> Option<String> {
    let named = &at.config().session;
    if !named.is_empty() {
        return Some(at.launch.expand(named));
    }
    let groups = tokio::task::spawn_blocking(move || targets.groups())
        .await
        .unwrap_or_default();
    groups.first().map(|g| format!("pgid:{g}"))
}

/// Prepares the run directory and spawns the wake command. Blocking.
fn spawn(launch: &Launch, argv: &[String]) -> Result<Child, String> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| "the wake command is empty".to_owned())?;
    launch.prepare()?;
    let (stdout, stderr) = launch.output()?;
    let stdin = launch.agent_stdin()?;
    let mut cmd = launch.command(program);
    // An agent the wake command leaves behind must outlive the sidecar.
    cmd.args(args)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(false);
    cmd.spawn()
        .map_err(|e| format!("could not start the wake command `{program}`: {e}"))
}

/// How a look for the agent ended.
enum Look {
    /// Found (with its pid, when the probe names one).
    Seen(Option<u32>),
    /// Not found within the window; carries the last probe's answer.
    NotSeen(String),
    /// The core's deadline passed first; carries the outcome and the last answer.
    TimedOut(Outcome, String),
    /// `stop` was called.
    Stop,
    /// `forget` was called.
    Forget,
}

/// Polls `probe` until it sees the agent: within `window` if one is given,
/// else until `stop`, `forget` or `time_out`.
async fn look(at: &mut Attempt, probe: &Probe, window: Option<Duration>) -> Look {
    let launch = Arc::clone(&at.launch);
    let deadline = window.map(|w| Instant::now() + w);
    let mut last = "not probed yet".to_owned();
    loop {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let budget = remaining.map_or(PROBE_TIMEOUT, |r| PROBE_TIMEOUT.min(r.max(VERIFY_POLL)));
        match at.or_ctl(probe.check(&launch, budget)).await {
            Wait::Done(Seen::Alive(pid)) => return Look::Seen(pid),
            Wait::Done(Seen::Gone(answer) | Seen::Unknown(answer)) => last = answer,
            Wait::TimedOut(outcome) => return Look::TimedOut(outcome, last),
            Wait::Stop => return Look::Stop,
            Wait::Forget => return Look::Forget,
        }
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if remaining.is_some_and(|r| r.is_zero()) {
            return Look::NotSeen(last);
        }
        match at
            .pause(remaining.map_or(VERIFY_POLL, |r| VERIFY_POLL.min(r)))
            .await
        {
            Wait::Done(()) => {}
            Wait::TimedOut(outcome) => return Look::TimedOut(outcome, last),
            Wait::Stop => return Look::Stop,
            Wait::Forget => return Look::Forget,
        }
    }
}

/// Probes a started agent every `probe_interval` until it is gone.
async fn watch(mut at: Attempt, probe: Probe, mut targets: Targets) {
    let launch = Arc::clone(&at.launch);
    let interval = at.run.probe_interval.max(PROBE_INTERVAL_MIN);
    loop {
        match at.pause(interval).await {
            Wait::Done(()) => {}
            Wait::Stop => return stop(at, targets, Outcome::Cancelled, None).await,
            Wait::TimedOut(outcome) => return late(at, targets, outcome).await,
            Wait::Forget => return,
        }
        match at.or_ctl(probe.check(&launch, PROBE_TIMEOUT)).await {
            Wait::Done(Seen::Alive(pid)) => targets.saw(pid),
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
            Wait::Stop => return stop(at, targets, Outcome::Cancelled, None).await,
            Wait::TimedOut(outcome) => return late(at, targets, outcome).await,
            Wait::Forget => return,
        }
    }
}

/// Nothing to watch: wait for `stop`, `forget` or `time_out`.
async fn idle(mut at: Attempt, targets: Targets) {
    match Wait::<()>::from(at.ctl_changed().await) {
        Wait::Stop => stop(at, targets, Outcome::Cancelled, None).await,
        Wait::TimedOut(outcome) => late(at, targets, outcome).await,
        Wait::Done(()) | Wait::Forget => {}
    }
}

/// The core's deadline passed as the start was being established (its
/// `Started` crossed the decision): the decision stands, and the agent stops.
async fn late(at: Attempt, targets: Targets, outcome: Outcome) {
    let limit = at.config().start_timeout;
    let failure = Failure {
        reason: format!("the start was not established within {limit:?}"),
        ..Failure::default()
    };
    stop(at, targets, outcome, Some(failure)).await;
}

/// Stops the agent, then ends the run as `outcome`: `stop_command` (bounded by
/// `stop_grace`) when one is set, else SIGTERM to the [`Targets`] groups and
/// SIGKILL to those left after `stop_grace`. What was done is added to
/// `failure`'s reason (or makes one).
async fn stop(at: Attempt, targets: Targets, outcome: Outcome, failure: Option<Failure>) {
    let argv = at.launch.argv(&at.config().stop_command);
    let limit = at.config().stop_grace.max(STOP_COMMAND_TIMEOUT_MIN);
    let how = match argv.split_first() {
        None => stop_groups(at.config().stop_grace, targets).await,
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
    let failure = match failure {
        Some(mut f) => {
            f.reason = format!("{}; {how}", f.reason);
            f
        }
        None => Failure {
            reason: how,
            command: argv,
            ..Failure::default()
        },
    };
    at.finish(outcome, Some(failure)).await;
}

/// SIGTERM to each live group of `targets`, SIGKILL to any left after
/// `grace`; says what was done.
async fn stop_groups(grace: Duration, targets: Targets) -> String {
    let groups = tokio::task::spawn_blocking(move || targets.groups())
        .await
        .unwrap_or_default();
    if groups.is_empty() {
        return "stopped; no stop_command is configured and no process of the agent was left to signal".to_owned();
    }
    let list = groups
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    for &g in &groups {
        sys::signal_group(g, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    loop {
        let left = groups.clone();
        let alive = tokio::task::spawn_blocking(move || {
            left.into_iter()
                .filter(|&g| sys::group_alive(g))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        if alive.is_empty() {
            return format!("stopped: SIGTERM to process group {list}");
        }
        if Instant::now() >= deadline {
            for &g in &alive {
                sys::signal_group(g, libc::SIGKILL);
            }
            return format!("stopped: SIGTERM to process group {list}, SIGKILL after {grace:?}");
        }
        tokio::time::sleep(STOP_POLL).await;
    }
}

/// Ends the run as `outcome` with the wake command's tails.
async fn wake_failed(
    at: Attempt,
    outcome: Outcome,
    reason: String,
    exit: Option<Exit>,
    argv: Vec<String>,
) {
    let launch = Arc::clone(&at.launch);
    let failure = tokio::task::spawn_blocking(move || launch.failure(reason, exit, &argv))
        .await
        .unwrap_or_default();
    at.finish(outcome, Some(failure)).await;
}

// === impl Probe ===

impl Probe {
    fn argv(&self) -> Vec<String> {
        match self {
            Probe::Process(_) => Vec::new(),
            Probe::Command(argv) => argv.clone(),
        }
    }

    /// A failure with this probe's command.
    fn failure(&self, reason: String) -> Failure {
        Failure {
            reason,
            command: self.argv(),
            ..Failure::default()
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
