//! Exec runs through the reaper (`muster-sidecar reaper`), with the real
//! binary and real processes. Every wait is bounded by [`LIMIT`]; outcomes are
//! awaited as events or files, never slept for.

use std::path::{Path, PathBuf};
use std::time::Duration;

use muster_protocol::msg::{Outcome, TaskSpec};
use muster_protocol::{AgentName, Generation, TaskId};
use muster_sidecar::agent::{AgentConfig, Mode, ProcessRunner, RunEvent, RunSpec, Runner};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Upper bound on any one test's wait.
const LIMIT: Duration = Duration::from_secs(20);

fn reaper_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_muster-sidecar"))
}

fn config(command: &[&str]) -> AgentConfig {
    AgentConfig {
        mode: Mode::Exec,
        command: command.iter().map(|s| s.to_string()).collect(),
        settle: Duration::ZERO,
        stop_grace: Duration::from_secs(2),
        ..AgentConfig::default()
    }
}

fn runner(dir: &TempDir, command: &[&str]) -> ProcessRunner {
    ProcessRunner::with_reaper(config(command), dir.path().to_owned(), reaper_exe())
}

fn spec(dir: &TempDir, task: u64) -> RunSpec {
    RunSpec {
        task: TaskId(task),
        generation: Generation(1),
        agent: AgentName::new("build-01").expect("valid name"),
        spec: TaskSpec {
            title: "a title".into(),
            description: "a description".into(),
            capabilities: vec![],
            priority: 0,
            timeout_ms: None,
            ..Default::default()
        },
        run_dir: dir.path().join("runs").join(format!("{task}-1")),
        socket: dir.path().join("muster.sock"),
        token: "0".repeat(64),
        probe_interval: Duration::from_millis(50),
    }
}

/// Events until the run's `Finished` (or the channel closes).
async fn until_finished(rx: &mut mpsc::Receiver<RunEvent>) -> Vec<RunEvent> {
    let mut events = Vec::new();
    timeout(LIMIT, async {
        while let Some(e) = rx.recv().await {
            let done = matches!(e, RunEvent::Finished { .. });
            events.push(e);
            if done {
                break;
            }
        }
    })
    .await
    .expect("the run ends in time");
    events
}

fn ended(events: &[RunEvent]) -> (Outcome, Option<i32>, Option<i32>, String) {
    events
        .iter()
        .find_map(|e| match e {
            RunEvent::Finished { outcome, error, .. } => Some((
                *outcome,
                error.as_ref().and_then(|f| f.exit_code),
                error.as_ref().and_then(|f| f.signal),
                error.as_ref().map(|f| f.reason.clone()).unwrap_or_default(),
            )),
            _ => None,
        })
        .expect("a Finished event")
}

/// The fields of `/proc/<pid>/stat` after the command name: state, ppid, …
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn parent_of(pid: u32) -> u32 {
    stat_fields(pid)
        .and_then(|f| f.get(1)?.parse().ok())
        .expect("a live process with a parent")
}

/// Exists and is not a zombie.
fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s != "Z"))
}

/// Whether `pid` runs `muster-sidecar reaper`.
fn is_reaper(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"reaper".as_slice()))
}

async fn spawned(rx: &mut mpsc::Receiver<RunEvent>) -> muster_sidecar::agent::RunHandle {
    match timeout(LIMIT, rx.recv()).await.expect("spawned in time") {
        Some(RunEvent::Spawned { handle, .. }) => handle,
        other => panic!("Spawned first, got {other:?}"),
    }
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    timeout(LIMIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} within {LIMIT:?}"));
}

/// A shell script that waits for the file `gate`, then exits with `code`.
fn gated(gate: &Path, code: i32) -> String {
    format!(
        "while [ ! -e '{}' ]; do sleep 0.01; done; exit {code}",
        gate.display()
    )
}

fn status_record(run_dir: &Path) -> String {
    std::fs::read_to_string(run_dir.join("status"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[tokio::test]
async fn runs_through_the_reaper_are_one_exec_and_keep_their_status() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gate = dir.path().join("go");
    let runner = runner(&dir, &["/bin/sh", "-c", &gated(&gate, 3)]);
    let run = spec(&dir, 1);
    let run_dir = run.run_dir.clone();
    let (tx, mut rx) = mpsc::channel(8);
    runner.start(run, tx);
    let handle = spawned(&mut rx).await;
    let pid = handle.pid.expect("a pid");
    // The recorded pid is the agent itself, and its parent is the reaper: no wrapper.
    let reaper = parent_of(pid);
    assert!(is_reaper(reaper), "the run's parent {reaper} is the reaper");
    assert_eq!(
        parent_of(reaper),
        std::process::id(),
        "we started the reaper"
    );
    let on_disk: muster_sidecar::agent::RunHandle = serde_json::from_slice(
        &std::fs::read(run_dir.join(muster_sidecar::agent::HANDLE_FILE)).expect("a handle file"),
    )
    .expect("a valid handle");
    assert_eq!(
        on_disk, handle,
        "the reaper wrote the handle before answering"
    );

    std::fs::write(&gate, b"").expect("open the gate");
    let events = until_finished(&mut rx).await;
    // When the run counts as started is the core's call: the runner reports its end.
    assert!(
        events
            .iter()
            .all(|e| matches!(e, RunEvent::Finished { .. })),
        "{events:?}"
    );
    let (outcome, code, signal, _) = ended(&events);
    assert_eq!((outcome, code, signal), (Outcome::Failed, Some(3), None));
    assert_eq!(
        status_record(&run_dir),
        "3",
        "the reaper recorded the status"
    );

    // The next run has the same parent.
    let (tx, mut rx) = mpsc::channel(8);
    runner.start(spec(&dir, 2), tx);
    let second = spawned(&mut rx).await.pid.expect("a pid");
    let parent = stat_fields(second).and_then(|f| f.get(1)?.parse::<u32>().ok());
    let events = until_finished(&mut rx).await;
    assert_eq!(ended(&events).1, Some(3));
    // The run may already be reaped when we look; then its parent is unknown.
    assert!(
        parent.is_none_or(|p| p == reaper),
        "one reaper: {parent:?} vs {reaper}"
    );
}

#[tokio::test]
async fn a_signal_is_recorded_as_a_signal() {
    let dir = tempfile::tempdir().expect("temp dir");
    let runner = runner(&dir, &["/bin/sh", "-c", "kill -KILL $$"]);
    let (tx, mut rx) = mpsc::channel(8);
    let run = spec(&dir, 1);
    let run_dir = run.run_dir.clone();
    runner.start(run, tx);
    let events = until_finished(&mut rx).await;
    let (outcome, code, signal, _) = ended(&events);
    assert_eq!((outcome, code, signal), (Outcome::Failed, None, Some(9)));
    assert_eq!(status_record(&run_dir), "137");
}

#[tokio::test]
async fn a_run_that_ends_after_its_sidecar_is_gone_keeps_its_status() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gate = dir.path().join("go");
    let script = gated(&gate, 7);
    let command = ["/bin/sh", "-c", script.as_str()];
    let run = spec(&dir, 1);
    let run_dir = run.run_dir.clone();
    let handle = {
        let first = runner(&dir, &command);
        let (tx, mut rx) = mpsc::channel(8);
        first.start(run.clone(), tx);
        let handle = spawned(&mut rx).await;
        // Stop watching and let the runner go, and with it our end of the
        // reaper's socket, as when the sidecar process dies.
        first.forget(run.task, run.generation);
        eventually("the run task lets go", || first.active() == 0).await;
        handle
    };
    let pid = handle.pid.expect("a pid");
    let reaper = parent_of(pid);
    assert!(alive(pid), "the run outlives its sidecar");
    assert!(alive(reaper), "the reaper stays while it has a run");
    std::fs::write(&gate, b"").expect("open the gate");
    // The reaper, now without a sidecar, still records the end…
    eventually("the status is recorded", || status_record(&run_dir) == "7").await;
    // …and then exits, having nothing left to wait for.
    eventually("the orphaned reaper exits", || !alive(reaper)).await;
    // A restarted sidecar re-attaches through the files and reports the real status.
    let second = runner(&dir, &command);
    let (tx, mut rx) = mpsc::channel(8);
    second.recover(run, handle, tx);
    let events = until_finished(&mut rx).await;
    let (outcome, code, _, _) = ended(&events);
    assert_eq!((outcome, code), (Outcome::Failed, Some(7)));
}

#[tokio::test]
async fn a_killed_reaper_is_replaced_and_its_runs_still_end() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gate = dir.path().join("go");
    let runner = runner(&dir, &["/bin/sh", "-c", &gated(&gate, 0)]);
    let (tx, mut rx) = mpsc::channel(8);
    runner.start(spec(&dir, 1), tx);
    let pid = spawned(&mut rx).await.pid.expect("a pid");
    let reaper = parent_of(pid);
    assert!(is_reaper(reaper));
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &reaper.to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    eventually("the reaper is gone", || !alive(reaper)).await;
    // The run lost its parent and its status: it still ends, as agent_exited.
    std::fs::write(&gate, b"").expect("open the gate");
    let events = until_finished(&mut rx).await;
    let (outcome, _, _, reason) = ended(&events);
    assert_eq!(outcome, Outcome::AgentExited, "{reason}");
    assert!(reason.contains("no exit status"), "{reason}");
    // The next run gets a new reaper, and its status again.
    let (tx, mut rx) = mpsc::channel(8);
    runner.start(spec(&dir, 2), tx);
    let next = spawned(&mut rx).await.pid.expect("a pid");
    let parent = stat_fields(next).and_then(|f| f.get(1)?.parse::<u32>().ok());
    let events = until_finished(&mut rx).await;
    assert_eq!(ended(&events).0, Outcome::Completed);
    assert!(parent.is_none_or(|p| p != reaper), "not the dead reaper");
}

#[tokio::test]
async fn a_command_that_cannot_start_fails_with_the_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = dir.path().join("agent");
    std::fs::write(&bin, b"#!/no/such/interpreter\n").expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = bin.to_string_lossy().into_owned();
    let runner = runner(&dir, &[&path]);
    let (tx, mut rx) = mpsc::channel(8);
    runner.start(spec(&dir, 1), tx);
    let events = until_finished(&mut rx).await;
    let (outcome, _, _, reason) = ended(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert!(reason.contains("could not start"), "{reason}");
    assert!(
        !events.iter().any(|e| matches!(e, RunEvent::Spawned { .. })),
        "nothing was spawned: {events:?}"
    );
}

/// With no usable reaper the runner falls back to the `/bin/sh` wrapper, whose
/// parent is the sidecar, and the status is still recorded.
async fn falls_back_to_the_wrapper(exe: PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let gate = dir.path().join("go");
    let runner = ProcessRunner::with_reaper(
        config(&["/bin/sh", "-c", &gated(&gate, 5)]),
        dir.path().to_owned(),
        exe,
    );
    let run = spec(&dir, 1);
    let run_dir = run.run_dir.clone();
    let (tx, mut rx) = mpsc::channel(8);
    runner.start(run, tx);
    let pid = spawned(&mut rx).await.pid.expect("a pid");
    assert_eq!(
        parent_of(pid),
        std::process::id(),
        "the wrapper is our own child"
    );
    assert!(!is_reaper(pid));
    std::fs::write(&gate, b"").expect("open the gate");
    let events = until_finished(&mut rx).await;
    let (outcome, code, _, _) = ended(&events);
    assert_eq!((outcome, code), (Outcome::Failed, Some(5)));
    assert_eq!(
        status_record(&run_dir),
        "5",
        "the wrapper recorded the status"
    );
}

#[tokio::test]
async fn a_reaper_that_cannot_start_leaves_runs_to_the_wrapper() {
    falls_back_to_the_wrapper(PathBuf::from("/nonexistent/muster-sidecar")).await;
}

#[tokio::test]
async fn a_reaper_of_another_protocol_is_not_used() {
    let bin = tempfile::tempdir().expect("temp dir");
    let fake = bin.path().join("old-sidecar");
    // Says hello in another protocol version, then waits for its stdin to close.
    std::fs::write(
        &fake,
        "#!/bin/sh\necho '{\"Hello\":{\"protocol\":999}}'\nexec cat >/dev/null\n",
    )
    .expect("write the fake reaper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    falls_back_to_the_wrapper(fake).await;
}
