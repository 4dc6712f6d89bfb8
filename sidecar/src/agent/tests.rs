//! Runner tests with real processes. Every wait is bounded by [`LIMIT`];
//! outcomes are awaited as events, never slept for.

use std::os::unix::fs::PermissionsExt;
use std::time::{SystemTime, UNIX_EPOCH};

use tempfile::TempDir;
use tokio::time::timeout;

use super::launch::{Exit, tail_text};
use super::*;

/// Upper bound on any one test's wait.
const LIMIT: Duration = Duration::from_secs(20);

fn config(mode: Mode, command: &[&str]) -> AgentConfig {
    AgentConfig {
        mode,
        command: command.iter().map(|s| s.to_string()).collect(),
        settle: Duration::from_millis(50),
        stop_grace: Duration::from_secs(2),
        start_timeout: Duration::from_secs(2),
        ..AgentConfig::default()
    }
}

fn runner(config: AgentConfig) -> (TempDir, ProcessRunner) {
    let dir = tempfile::tempdir().expect("temp dir");
    let runner = ProcessRunner::new(config, dir.path().to_owned());
    (dir, runner)
}

fn spec(dir: &TempDir, task: u64) -> RunSpec {
    RunSpec {
        task: TaskId(task),
        generation: Generation(7),
        agent: AgentName::new("build-01").expect("valid name"),
        spec: TaskSpec {
            title: "a title".into(),
            description: "a description".into(),
            capabilities: vec!["rust".into()],
            priority: 3,
            timeout_ms: None,
            ..Default::default()
        },
        run_dir: dir.path().join("runs").join(format!("{task}-7")),
        socket: dir.path().join("muster.sock"),
        token: "0".repeat(64),
        probe_interval: Duration::from_millis(50),
    }
}

/// All events until the runner drops its sender (so nothing can follow).
async fn collect(mut rx: mpsc::Receiver<RunEvent>) -> Vec<RunEvent> {
    let mut events = Vec::new();
    timeout(LIMIT, async {
        while let Some(event) = rx.recv().await {
            events.push(event);
        }
    })
    .await
    .expect("the run ends in time");
    events
}

async fn next(rx: &mut mpsc::Receiver<RunEvent>) -> RunEvent {
    timeout(LIMIT, rx.recv())
        .await
        .expect("an event in time")
        .expect("the channel is open")
}

fn finished(events: &[RunEvent]) -> (Outcome, Option<Failure>) {
    let ends: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::Finished { outcome, error, .. } => Some((*outcome, error.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(ends.len(), 1, "exactly one Finished in {events:?}");
    ends.into_iter().next().expect("one")
}

fn kinds(events: &[RunEvent]) -> Vec<&'static str> {
    events
        .iter()
        .map(|e| match e {
            RunEvent::Preparing { .. } => "preparing",
            RunEvent::Prepared { .. } => "prepared",
            RunEvent::Spawned { .. } => "spawned",
            RunEvent::Started { .. } => "started",
            RunEvent::Finished { .. } => "finished",
        })
        .collect()
}

fn unique() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .subsec_nanos();
    u64::from(nanos) ^ u64::from(std::process::id()) << 20
}

// === exec ===

#[tokio::test]
async fn exec_true_spawns_then_completes() {
    let (dir, runner) = runner(config(Mode::Exec, &["/bin/true"]));
    let run = spec(&dir, 1);
    let run_dir = run.run_dir.clone();
    let (tx, rx) = mpsc::channel(8);
    runner.start(run, tx);
    let events = collect(rx).await;
    // When an exec run counts as started is the core's call (its settle time).
    assert_eq!(kinds(&events), ["spawned", "finished"]);
    assert_eq!(finished(&events), (Outcome::Completed, None));
    let RunEvent::Spawned { handle, .. } = &events[0] else {
        panic!("spawned first")
    };
    assert_eq!(handle.mode, RunMode::Exec);
    assert_eq!(handle.run_dir, run_dir);
    assert!(handle.pid.is_some());
    assert_eq!(
        std::fs::read_to_string(run_dir.join("status"))
            .expect("status")
            .trim(),
        "0"
    );
    let mode = std::fs::metadata(run_dir.join("task.json"))
        .expect("task.json")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(dir.path().join("work").is_dir());
    assert_eq!(runner.active(), 0);
}

#[tokio::test]
async fn exec_failure_has_exit_code_and_tails() {
    let argv = ["sh", "-c", "echo out; echo err >&2; exit 3"];
    let (dir, runner) = runner(config(Mode::Exec, &argv));
    let (tx, rx) = mpsc::channel(8);
    runner.start(spec(&dir, 2), tx);
    let events = collect(rx).await;
    assert_eq!(kinds(&events), ["spawned", "finished"]);
    let (outcome, error) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    let error = error.expect("a failure");
    assert_eq!(error.reason, "exit status 3");
    assert_eq!(error.exit_code, Some(3));
    assert_eq!(error.signal, None);
    assert_eq!(error.command, argv);
    assert_eq!(error.stdout_tail, "out\n");
    assert_eq!(error.stderr_tail, "err\n");
}

#[tokio::test]
async fn exec_killed_by_signal_records_the_signal() {
    let (dir, runner) = runner(config(Mode::Exec, &["sh", "-c", "kill -9 $$"]));
    let (tx, rx) = mpsc::channel(8);
    runner.start(spec(&dir, 3), tx);
    let (outcome, error) = finished(&collect(rx).await);
    assert_eq!(outcome, Outcome::Failed);
    let error = error.expect("a failure");
    assert_eq!(error.reason, "killed by signal 9 (SIGKILL)");
    assert_eq!((error.exit_code, error.signal), (None, Some(9)));
}

/// `exec_status = "waited"`: no wrapper, so the run's pid is the agent itself, no
/// status file is written, and exit codes and signals come from `wait` directly.
#[tokio::test]
async fn exec_waited_spawns_the_agent_itself_and_maps_its_status() {
    let waited = |argv: &[&str]| AgentConfig {
        exec_status: ExecStatus::Waited,
        ..config(Mode::Exec, argv)
    };
    let (dir, r) = runner(waited(&["/bin/sh", "-c", "echo $$ > pid; exit 0"]));
    let run = spec(&dir, 21);
    let work = dir.path().join("work");
    let run_dir = run.run_dir.clone();
    // As if the directory were reused from an earlier run that recorded status 3.
    std::fs::create_dir_all(&run_dir).expect("run dir");
    std::fs::write(run_dir.join("status"), "3  \n").expect("old status");
    let (tx, rx) = mpsc::channel(8);
    r.start(run, tx);
    let events = collect(rx).await;
    assert_eq!(finished(&events), (Outcome::Completed, None));
    let RunEvent::Spawned { handle, .. } = &events[0] else {
        panic!("spawned first: {events:?}")
    };
    let own_pid: u32 = std::fs::read_to_string(work.join("pid"))
        .expect("the agent wrote its pid")
        .trim()
        .parse()
        .expect("a pid");
    assert_eq!(
        handle.pid,
        Some(own_pid),
        "the recorded pid is the agent's own"
    );
    assert_eq!(
        std::fs::read_to_string(run_dir.join("status")).expect("status record"),
        "   \n",
        "the earlier run's status is blanked and no wrapper writes a new one"
    );

    let (dir, r) = runner(waited(&["sh", "-c", "exit 129"]));
    let (tx, rx) = mpsc::channel(8);
    r.start(spec(&dir, 22), tx);
    let error = finished(&collect(rx).await).1.expect("a failure");
    assert_eq!(
        (error.exit_code, error.signal),
        (Some(129), None),
        "a plain exit code, not read as a signal the way a shell's 128+N is"
    );

    let (dir, r) = runner(waited(&["sh", "-c", "kill -9 $$"]));
    let (tx, rx) = mpsc::channel(8);
    r.start(spec(&dir, 23), tx);
    let error = finished(&collect(rx).await).1.expect("a failure");
    assert_eq!((error.exit_code, error.signal), (None, Some(9)));
}

#[tokio::test]
async fn exec_missing_command_names_it() {
    for program in ["/nonexistent/muster-agent", "muster-no-such-agent"] {
        let (dir, runner) = runner(config(Mode::Exec, &[program, "arg"]));
        let (tx, rx) = mpsc::channel(8);
        runner.start(spec(&dir, 4), tx);
        let events = collect(rx).await;
        assert_eq!(kinds(&events), ["finished"]);
        let (outcome, error) = finished(&events);
        assert_eq!(outcome, Outcome::Failed);
        let reason = error.expect("a failure").reason;
        assert!(reason.contains(program), "{reason}");
        assert!(reason.contains("No such file or directory"), "{reason}");
    }
}

#[tokio::test]
async fn exec_stop_ends_the_process_group_once() {
    let (dir, runner) = runner(config(Mode::Exec, &["sleep", "30"]));
    let (tx, mut rx) = mpsc::channel(8);
    runner.start(spec(&dir, 5), tx);
    let RunEvent::Spawned { handle, .. } = next(&mut rx).await else {
        panic!("spawned")
    };
    let pid = handle.pid.expect("a pid");
    runner.stop(TaskId(5), Generation(7));
    runner.stop(TaskId(5), Generation(7));
    let events = collect(rx).await;
    let (outcome, error) = finished(&events);
    assert_eq!(outcome, Outcome::Cancelled);
    assert!(error.expect("how").reason.contains("SIGTERM"));
    assert!(!sys::group_alive(pid), "the process group is gone");
    // A stop after the end is ignored.
    runner.stop(TaskId(5), Generation(7));
    assert_eq!(runner.active(), 0);
}

#[tokio::test]
async fn exec_forget_stops_watching_without_finished() {
    let (dir, runner) = runner(config(Mode::Exec, &["sleep", "30"]));
    let (tx, mut rx) = mpsc::channel(8);
    runner.start(spec(&dir, 6), tx);
    let RunEvent::Spawned { handle, .. } = next(&mut rx).await else {
        panic!("spawned")
    };
    let pid = handle.pid.expect("a pid");
    runner.forget(TaskId(6), Generation(7));
    assert!(collect(rx).await.is_empty(), "no Finished after forget");
    assert!(sys::group_alive(pid), "forget kills nothing");
    sys::signal_group(pid, libc::SIGKILL);
}

#[tokio::test]
async fn exec_task_text_is_never_interpreted() {
    let (dir, _) = runner(AgentConfig::default());
    let pwned = dir.path().join("pwned");
    let title = format!("\"; rm -rf / # '; touch {} #", pwned.display());
    let description = format!(
        "$(touch {p}) `touch {p}` ${{HOME}} \\\" \n\t ✓ \u{0}",
        p = pwned.display()
    );
    let script = r#"cat "$MUSTER_TASK_FILE"; printf '%s|%s|%s|%s' "$MUSTER_TASK_ID" "$MUSTER_GENERATION" "$MUSTER_AGENT" "$MUSTER_SOCKET" >&2"#;
    let runner = ProcessRunner::new(
        config(Mode::Exec, &["/bin/sh", "-c", script]),
        dir.path().to_owned(),
    );
    let mut run = spec(&dir, 8);
    run.spec.title = title.clone();
    run.spec.description = description.clone();
    let run_dir = run.run_dir.clone();
    let socket = run.socket.clone();
    let (tx, rx) = mpsc::channel(8);
    runner.start(run, tx);
    assert_eq!(finished(&collect(rx).await).0, Outcome::Completed);

    let file = std::fs::read(run_dir.join("task.json")).expect("task.json");
    let json: serde_json::Value = serde_json::from_slice(&file).expect("json");
    assert_eq!(json["id"], 8);
    assert_eq!(json["generation"], 7);
    assert_eq!(json["title"].as_str(), Some(title.as_str()));
    assert_eq!(json["description"].as_str(), Some(description.as_str()));
    assert_eq!(json["capabilities"], serde_json::json!(["rust"]));
    assert_eq!(json["priority"], 3);
    assert_eq!(
        std::fs::read(run_dir.join("stdout")).expect("stdout"),
        file,
        "the agent read it"
    );
    let env = std::fs::read_to_string(run_dir.join("stderr")).expect("stderr");
    assert_eq!(env, format!("8|7|build-01|{}", socket.display()));
    assert!(!pwned.exists(), "nothing from the task text ran");
}

#[tokio::test]
async fn recover_reads_the_status_of_a_finished_run() {
    let argv = ["sh", "-c", "echo bye; exit 4"];
    let (dir, first) = runner(config(Mode::Exec, &argv));
    let (tx, rx) = mpsc::channel(8);
    first.start(spec(&dir, 9), tx);
    let events = collect(rx).await;
    let RunEvent::Spawned { handle, .. } = events[0].clone() else {
        panic!("spawned")
    };

    let second = ProcessRunner::new(config(Mode::Exec, &argv), dir.path().to_owned());
    let (tx, rx) = mpsc::channel(8);
    second.recover(spec(&dir, 9), handle.clone(), tx);
    let events = collect(rx).await;
    assert_eq!(kinds(&events), ["finished"]);
    let (outcome, error) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    let error = error.expect("a failure");
    assert_eq!(error.exit_code, Some(4));
    assert_eq!(error.stdout_tail, "bye\n");

    std::fs::write(handle.run_dir.join("status"), "0\n").expect("status");
    let (tx, rx) = mpsc::channel(8);
    second.recover(spec(&dir, 9), handle, tx);
    assert_eq!(finished(&collect(rx).await), (Outcome::Completed, None));
}

#[tokio::test]
async fn recover_without_status_and_dead_pid_is_agent_exited() {
    let (dir, runner) = runner(config(Mode::Exec, &["/bin/true"]));
    let mut child = std::process::Command::new("true").spawn().expect("spawn");
    let pid = child.id();
    child.wait().expect("reaped");
    let run = spec(&dir, 10);
    std::fs::create_dir_all(&run.run_dir).expect("run dir");
    let handle = RunHandle {
        pid: Some(pid),
        session: None,
        run_dir: run.run_dir.clone(),
        mode: RunMode::Exec,
        start_ticks: None,
    };
    let (tx, rx) = mpsc::channel(8);
    runner.recover(run, handle, tx);
    let (outcome, error) = finished(&collect(rx).await);
    assert_eq!(outcome, Outcome::AgentExited);
    assert!(error.expect("why").reason.contains("left no exit status"));
}

#[tokio::test]
async fn recover_watches_a_live_run_to_its_end() {
    let argv = ["sh", "-c", "sleep 0.4; exit 5"];
    let (dir, first) = runner(config(Mode::Exec, &argv));
    let (tx, mut rx) = mpsc::channel(8);
    first.start(spec(&dir, 11), tx);
    let RunEvent::Spawned { handle, .. } = next(&mut rx).await else {
        panic!("spawned")
    };
    // The old sidecar goes away without killing the run.
    first.forget(TaskId(11), Generation(7));
    assert!(
        collect(rx)
            .await
            .iter()
            .all(|e| !matches!(e, RunEvent::Finished { .. }))
    );

    let second = ProcessRunner::new(config(Mode::Exec, &argv), dir.path().to_owned());
    let (tx, rx) = mpsc::channel(8);
    second.recover(spec(&dir, 11), handle.clone(), tx);
    let events = collect(rx).await;
    assert_eq!(kinds(&events), ["started", "finished"]);
    let (outcome, error) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(error.expect("a failure").exit_code, Some(5));
}

// === wake ===

#[tokio::test]
async fn wake_command_failure_is_wake_failed() {
    let (dir, runner) = runner(config(Mode::Wake, &["sh", "-c", "echo no >&2; false"]));
    let (tx, rx) = mpsc::channel(8);
    runner.start(spec(&dir, 20), tx);
    let events = collect(rx).await;
    assert_eq!(kinds(&events), ["finished"]);
    let (outcome, error) = finished(&events);
    assert_eq!(outcome, Outcome::WakeFailed);
    let error = error.expect("a failure");
    assert_eq!(error.exit_code, Some(1));
    assert_eq!(error.stderr_tail, "no\n");
    assert!(error.reason.contains("exit status 1"), "{}", error.reason);
}

#[tokio::test]
async fn wake_verify_command_starts_and_stop_runs_the_stop_command() {
    let (dir, _) = runner(AgentConfig::default());
    let marker = dir.path().join("stopped");
    let mut cfg = config(Mode::Wake, &["true"]);
    cfg.verify = Verify::Probe(Probe::Command(vec!["true".into()]));
    cfg.stop_command = ["sh", "-c", r#"echo "$MUSTER_TASK_ID" > "$1""#, "stop"]
        .iter()
        .map(|s| s.to_string())
        .chain([marker.display().to_string()])
        .collect();
    let runner = ProcessRunner::new(cfg, dir.path().to_owned());
    let (tx, mut rx) = mpsc::channel(8);
    runner.start(spec(&dir, 21), tx);
    let RunEvent::Spawned { handle, .. } = next(&mut rx).await else {
        panic!("spawned")
    };
    assert_eq!(handle.mode, RunMode::Wake);
    assert!(matches!(
        next(&mut rx).await,
        RunEvent::Started { pid: None, .. }
    ));
    runner.stop(TaskId(21), Generation(7));
    let (outcome, error) = finished(&collect(rx).await);
    assert_eq!(outcome, Outcome::Cancelled);
    assert_eq!(error.expect("how").reason, "stopped by the stop command");
    assert_eq!(std::fs::read_to_string(&marker).expect("marker"), "21\n");
}

#[tokio::test]
async fn wake_verify_process_never_seen_ends_as_the_core_times_it_out() {
    let pattern = format!("muster-never-{}", unique());
    let mut cfg = config(Mode::Wake, &["true"]);
    cfg.verify = Verify::Probe(Probe::Process(pattern.clone()));
    let (dir, runner) = runner(cfg);
    let (tx, mut rx) = mpsc::channel(8);
    runner.start(spec(&dir, 22), tx);
    assert!(matches!(next(&mut rx).await, RunEvent::Spawned { .. }));
    // The runner looks until the core's deadline says otherwise.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.try_recv().is_err(), "still looking");
    runner.time_out(TaskId(22), Generation(7), Outcome::StartTimeout);
    let events = collect(rx).await;
    assert_eq!(kinds(&events), ["finished"]);
    let (outcome, error) = finished(&events);
    assert_eq!(outcome, Outcome::StartTimeout);
    let reason = error.expect("why").reason;
    assert!(reason.contains(&pattern), "{reason}");
    assert!(
        reason.contains("is gone") || reason.contains("not probed"),
        "the last answer: {reason}"
    );
    assert_eq!(runner.active(), 0);
}

#[tokio::test]
async fn a_wake_command_the_core_times_out_is_killed_and_wake_failed_with_its_tails() {
    let mut cfg = config(Mode::Wake, &["sh", "-c", "echo waking >&2; exec sleep 30"]);
    cfg.verify = Verify::Probe(Probe::Command(vec!["true".into()]));
    let (dir, runner) = runner(cfg);
    let (tx, rx) = mpsc::channel(8);
    runner.start(spec(&dir, 23), tx);
    tokio::time::sleep(Duration::from_millis(300)).await;
    runner.time_out(TaskId(23), Generation(7), Outcome::WakeFailed);
    let events = collect(rx).await;
    assert_eq!(kinds(&events), ["finished"]);
    let (outcome, error) = finished(&events);
    assert_eq!(outcome, Outcome::WakeFailed);
    let error = error.expect("why");
    assert!(error.reason.contains("did not exit"), "{}", error.reason);
    assert!(error.stderr_tail.contains("waking"), "{error:?}");
}

#[tokio::test]
async fn wake_probe_notices_the_agent_is_gone() {
    // A background sleep with a unique duration plays the agent.
    let seconds = format!("0.6{:05}", unique() % 100_000);
    let pattern = format!("sleep {seconds}");
    let script = format!("{pattern} </dev/null >/dev/null 2>&1 &");
    let mut cfg = config(Mode::Wake, &["sh", "-c", &script]);
    cfg.verify = Verify::Probe(Probe::Process(pattern.clone()));
    let (dir, runner) = runner(cfg);
    let (tx, rx) = mpsc::channel(8);
    runner.start(spec(&dir, 23), tx);
    let events = collect(rx).await;
    assert_eq!(kinds(&events), ["spawned", "started", "finished"]);
    assert!(matches!(events[1], RunEvent::Started { pid: Some(_), .. }));
    let (outcome, error) = finished(&events);
    assert_eq!(outcome, Outcome::AgentExited);
    let reason = error.expect("why").reason;
    assert_eq!(
        reason,
        format!("the agent process matching `{pattern}` is gone")
    );
}

#[tokio::test]
async fn wake_agent_ack_waits_for_stop_or_forget() {
    let (dir, runner) = runner(config(Mode::Wake, &["true"]));
    let (tx, mut rx) = mpsc::channel(8);
    runner.start(spec(&dir, 24), tx);
    assert!(matches!(next(&mut rx).await, RunEvent::Spawned { .. }));
    runner.forget(TaskId(24), Generation(7));
    assert!(collect(rx).await.is_empty());
    assert_eq!(runner.active(), 0);
}

// === helpers ===

#[test]
fn tails_keep_the_end_at_a_char_boundary() {
    let mut bytes = "é"
        .repeat(muster_protocol::limits::TAIL_BYTES_MAX)
        .into_bytes();
    bytes.extend_from_slice(b"end");
    let text = tail_text(&bytes, true);
    assert!(text.len() <= muster_protocol::limits::TAIL_BYTES_MAX);
    assert!(text.ends_with("éend"));
    assert!(!text.contains('\u{FFFD}'));
    let junk = vec![0xFFu8; 2 * muster_protocol::limits::TAIL_BYTES_MAX];
    assert!(tail_text(&junk, true).len() <= muster_protocol::limits::TAIL_BYTES_MAX);
}

#[test]
fn shell_codes_above_128_are_signals() {
    assert_eq!(Exit::from_shell_code(137), Exit::Signal(9));
    assert_eq!(Exit::from_shell_code(128), Exit::Code(128));
    assert_eq!(Exit::from_shell_code(3), Exit::Code(3));
    assert_eq!(
        Exit::Signal(15).to_string(),
        "killed by signal 15 (SIGTERM)"
    );
}

#[test]
fn check_command_names_the_problem() {
    assert_eq!(check_command(&config(Mode::Exec, &["sh"])), Ok(()));
    assert_eq!(
        check_command(&config(Mode::Exec, &["/bin/sh", "-c", "x"])),
        Ok(())
    );
    let missing = check_command(&config(Mode::Exec, &["/nonexistent/agent"])).expect_err("missing");
    assert!(missing.contains("/nonexistent/agent"), "{missing}");
    assert!(check_command(&config(Mode::Exec, &[])).is_err());
    let dir = tempfile::tempdir().expect("temp dir");
    let plain = dir.path().join("agent");
    std::fs::write(&plain, "#!/bin/sh\n").expect("write");
    let plain = plain.display().to_string();
    let denied = check_command(&config(Mode::Exec, &[&plain])).expect_err("not executable");
    assert!(denied.contains("Permission denied"), "{denied}");
}

#[tokio::test]
async fn health_command_is_bounded_and_explained() {
    let mut cfg = AgentConfig::default();
    assert_eq!(run_health(&cfg).await, Ok(()));
    cfg.health_command = vec!["sh".into(), "-c".into(), "echo broken >&2; exit 2".into()];
    let err = run_health(&cfg).await.expect_err("fails");
    assert_eq!(err, "the health command `sh` failed: exit status 2: broken");
    cfg.health_command = vec!["sleep".into(), "5".into()];
    let err = launch::run_health(&cfg, Duration::from_millis(100))
        .await
        .expect_err("times out");
    assert!(err.contains("did not finish"), "{err}");
}

#[test]
fn handle_round_trips_through_json() {
    let handle = RunHandle {
        pid: Some(42),
        session: None,
        run_dir: "/var/lib/muster/runs/1-2".into(),
        mode: RunMode::Wake,
        start_ticks: Some(99),
    };
    let json = serde_json::to_string(&handle).expect("encode");
    assert_eq!(
        serde_json::from_str::<RunHandle>(&json).expect("decode"),
        handle
    );
}

/// Throughput of exec runs of `/bin/true`, against bare spawns for scale.
/// `cargo test -p muster-sidecar --lib agent::tests::exec_throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn exec_throughput() {
    const RUNS: u64 = 2000;
    const IN_FLIGHT: u64 = 8;
    let mut cfg = config(Mode::Exec, &["/bin/true"]);
    cfg.settle = Duration::from_millis(500);
    let (dir, runner) = runner(cfg);
    let runner = Arc::new(runner);
    let begin = std::time::Instant::now();
    let (tx, mut rx) = mpsc::channel(64);
    let mut next_task = 0;
    let mut done = 0;
    while next_task < IN_FLIGHT {
        runner.start(spec(&dir, next_task), tx.clone());
        next_task += 1;
    }
    while done < RUNS {
        if let RunEvent::Finished { outcome, .. } = next(&mut rx).await {
            assert_eq!(outcome, Outcome::Completed);
            done += 1;
            if next_task < RUNS {
                runner.start(spec(&dir, next_task), tx.clone());
                next_task += 1;
            }
        }
    }
    let runs = begin.elapsed();
    let begin = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        set.spawn(async {
            for _ in 0..RUNS / IN_FLIGHT {
                let status = tokio::process::Command::new("/bin/true").status().await;
                assert!(status.expect("spawn").success());
            }
        });
    }
    while set.join_next().await.is_some() {}
    let bare = begin.elapsed();
    let begin = std::time::Instant::now();
    for i in 0..IN_FLIGHT {
        let status = dir.path().join(format!("status-{i}"));
        set.spawn(async move {
            for _ in 0..RUNS / IN_FLIGHT {
                let status = tokio::process::Command::new("/bin/sh")
                    .args([
                        "-c",
                        r#"s=$1; shift; "$@"; rc=$?; echo "$rc" >"$s"; exit "$rc""#,
                        "w",
                    ])
                    .arg(&status)
                    .arg("/bin/true")
                    .status()
                    .await;
                assert!(status.expect("spawn").success());
            }
        });
    }
    while set.join_next().await.is_some() {}
    let wrapped = begin.elapsed();
    println!(
        "exec runs: {:.0}/s; bare spawns: {:.0}/s; bare wrapper spawns: {:.0}/s",
        RUNS as f64 / runs.as_secs_f64(),
        RUNS as f64 / bare.as_secs_f64(),
        RUNS as f64 / wrapped.as_secs_f64()
    );
}

// === runs the sidecar never recorded ===

#[tokio::test]
async fn an_exec_run_records_its_handle_in_its_directory_before_it_reports() {
    let (dir, runner) = runner(config(Mode::Exec, &["/bin/true"]));
    let run = spec(&dir, 31);
    let run_dir = run.run_dir.clone();
    let (tx, mut rx) = mpsc::channel(8);
    runner.start(run, tx);
    let RunEvent::Spawned { handle, .. } = next(&mut rx).await else {
        panic!("spawned first")
    };
    assert_eq!(recorded_handle(&run_dir), Some(handle.clone()));

    // Renamed into another attempt's place (the pool), the record is not that attempt's.
    let other = dir.path().join("runs").join("32-7");
    std::fs::rename(&run_dir, &other).expect("rename");
    assert_eq!(recorded_handle(&other), None);
    // Nor is a damaged one.
    std::fs::write(other.join(HANDLE_FILE), b"{\"pid\":").expect("write");
    assert_eq!(recorded_handle(&other), None);
}

/// A process group led by `sh -c script`, and its handle as a run would record it.
fn orphan(dir: &std::path::Path, script: &str) -> (std::process::Child, RunHandle) {
    use std::os::unix::process::CommandExt;
    let child = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("spawn");
    let handle = RunHandle {
        pid: Some(child.id()),
        session: None,
        run_dir: dir.to_owned(),
        mode: RunMode::Exec,
        start_ticks: sys::start_ticks(child.id()),
    };
    (child, handle)
}

#[test]
fn orphans_get_sigterm_then_sigkill_after_the_grace() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut polite, polite_handle) = orphan(dir.path(), "exec sleep 30");
    let (mut stubborn, stubborn_handle) = orphan(
        dir.path(),
        "trap '' TERM; echo trapped; while :; do sleep 1; done",
    );
    // Once it says so, the trap is set and SIGTERM cannot arrive before it.
    let mut line = String::new();
    let out = stubborn.stdout.take().expect("piped");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).expect("read");
    assert_eq!(line, "trapped\n");
    // A handle whose pid now names another process (start time differs) is left alone.
    let (mut bystander, mut reused) = orphan(dir.path(), "exec sleep 30");
    reused.start_ticks = reused.start_ticks.map(|t| t + 1);

    let ended = end_orphans(
        &[polite_handle, stubborn_handle, reused],
        Duration::from_millis(300),
    );
    assert_eq!(ended, 2);
    let polite = polite.wait().expect("reaped");
    let stubborn = stubborn.wait().expect("reaped");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(polite.signal(), Some(libc::SIGTERM));
    assert_eq!(stubborn.signal(), Some(libc::SIGKILL));
    assert_eq!(
        bystander.try_wait().expect("try_wait"),
        None,
        "still running"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
}

#[tokio::test]
async fn an_ended_run_not_yet_reaped_by_a_live_parent_counts_as_running_until_its_status_is_recorded()
 {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = spec(&dir, 1);
    let work = Workdir {
        dir: dir.path().join("work"),
        ..Workdir::default()
    };
    let launch = Arc::new(launch::Launch::new(&run, &work, crate::config::Stdin::Null));
    launch
        .prepare_exec(&["/bin/true".to_owned()])
        .expect("prepared");
    // Our own child, left unreaped: a zombie whose parent (this test) lives,
    // as a run is between its end and its reaper's wait.
    let mut child = std::process::Command::new("/bin/true")
        .spawn()
        .expect("spawn true");
    let pid = child.id();
    let ticks = sys::start_ticks(pid);
    let deadline = std::time::Instant::now() + LIMIT;
    while !matches!(sys::process_state(pid), sys::ProcState::Zombie { .. }) {
        assert!(std::time::Instant::now() < deadline, "true never ended");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        exec::still_running(&launch, pid, ticks).await,
        "no status yet, and its parent will reap it"
    );
    std::fs::write(run.run_dir.join("status"), launch::status_record(0)).expect("record");
    assert!(
        !exec::still_running(&launch, pid, ticks).await,
        "with its status recorded it has ended"
    );
    child.wait().expect("reap");
    std::fs::write(run.run_dir.join("status"), b"   \n").expect("blank");
    assert!(
        !exec::still_running(&launch, pid, ticks).await,
        "reaped, no status, no group: ended without a status"
    );
}
