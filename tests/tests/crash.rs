//! Issue 13, item 5: crash paths of the sidecar that could run a task twice.
//!
//! The sidecar starts a run before it commits what it knows about it ("Launch
//! before commit" in `sidecar/src/daemon/mod.rs`). When the spawn takes longer than
//! the batch waits for it, the acceptance commits without a run handle and the
//! handle follows in a later commit; a sidecar killed between the two leaves an
//! accepted task, a handle file in its run directory, and no handle in its
//! queue. The restart must re-attach to that run, not start the task again.
//!
//! The window is held open by the sidecar's `test-hooks` feature (the harness
//! builds the binaries with it): while the hold file exists in the state
//! directory, the acceptance commits without waiting for the spawn and the
//! handle's commit waits. The agent logs its runs to a file outside the
//! sidecar's state ([`run_log_prelude`]), which says how often it really ran.
//!
//! The neighbouring window, a sidecar killed after the spawn and before the
//! acceptance's commit, runs the attempt a second time when the first run had
//! already ended: its test states what should happen and is ignored until the
//! sidecar does it (found by the storm's run log, issue 13).

use std::path::Path;
use std::time::Duration;

use muster_sidecar::test_hooks::{
    HOLD_ACCEPT_FILE, HOLD_ACCEPT_REACHED_FILE, HOLD_HANDLE_FILE, HOLD_REACHED_FILE,
};
use muster_tests::tasks::*;
use muster_tests::{
    Hub, Sidecar, read_run_log, run_log_prelude, wait_for, wait_until, write_script,
};

/// How long a fresh sidecar may take to connect and show up online.
const CONNECT: Duration = Duration::from_secs(30);
/// How long a step of a short task may take (assignment, spawn, completion).
const STEP: Duration = Duration::from_secs(30);

/// An exec agent that logs its run to `log`, waits (at most 60 s) until `go`
/// exists, and exits 0.
fn waiting_agent(path: &Path, log: &Path, go: &Path) {
    write_script(
        path,
        &format!(
            "#!/bin/sh\n{prelude}\nn=0\nwhile [ ! -e '{go}' ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done\n\
             [ -e '{go}' ] || fin 9\nfin 0\n",
            prelude = run_log_prelude(log),
            go = go.display()
        ),
    );
}

#[test]
fn sidecar_killed_between_spawn_and_handle_commit_reattaches_instead_of_running_again() {
    let mut hub = Hub::init();
    hub.set_policy("heartbeat_interval", "\"1s\"");
    hub.start();
    let mut sc = Sidecar::enroll(&hub, "window", &[]);
    sc.set_agent("settle", "\"100ms\"");
    sc.set_agent("stop_grace", "\"2s\"");
    let evidence = tempfile::Builder::new()
        .prefix("muster-crash-evidence-")
        .tempdir()
        .expect("a temporary directory");
    let (log, go) = (evidence.path().join("runs.log"), evidence.path().join("go"));
    let script = evidence.path().join("agent.sh");
    waiting_agent(&script, &log, &go);
    let command = serde_json::json!([script.to_string_lossy()]).to_string();
    sc.set_agent("command", &command);
    sc.start_connected(CONNECT);
    hub.wait_agent_state(sc.name(), "online", CONNECT);

    // Hold the window open, then give the sidecar a task.
    let hold = sc.data_dir().join(HOLD_HANDLE_FILE);
    let reached = sc.data_dir().join(HOLD_REACHED_FILE);
    std::fs::write(&hold, b"").expect("write the hold file");
    let v = hub.json(&["submit", "--title", "once"]);
    let id = v["id"].as_u64().expect("submit printed an id");
    let held = wait_until(
        STEP,
        "the sidecar to hold the commit of the run's handle \
         (is muster-sidecar built with --features muster-sidecar/test-hooks?)",
        || {
            std::fs::read_to_string(&reached)
                .ok()
                .filter(|s| s.ends_with('\n'))
        },
    );
    assert_eq!(
        held.trim(),
        format!("{id}-1"),
        "the held commit is not this attempt's"
    );

    // The state the restart must handle: accepted at the hub (the acceptance
    // committed and was sent), the run alive with its handle file written.
    let t = wait_for(STEP, "the hub to hear the acceptance", || {
        let t = show(&hub, id);
        if t["state"] == "accepted" {
            Ok(t)
        } else {
            Err(t.to_string())
        }
    });
    assert_eq!(t["generation"], 1, "{t}");
    let handle_file = sc
        .data_dir()
        .join("runs")
        .join(format!("{id}-1"))
        .join("handle");
    assert!(
        handle_file.is_file(),
        "the run wrote no handle file at {}",
        handle_file.display()
    );
    let runs = read_run_log(&log).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(runs.len(), 1, "one run before the crash: {runs:?}");
    assert!(runs[0].ended.is_none(), "the run is still going: {runs:?}");

    sc.kill9();
    std::fs::remove_file(&hold).expect("remove the hold file");
    sc.start_connected(CONNECT);
    // Re-attached: the hub hears the start of the same attempt from the restarted sidecar.
    let t = wait_for(STEP, "the re-attached run reported running", || {
        let t = show(&hub, id);
        if t["state"] == "running" {
            Ok(t)
        } else {
            Err(t.to_string())
        }
    });
    assert_eq!(t["generation"], 1, "{t}");
    std::fs::write(&go, b"").expect("write the go file");
    let t = wait_for(STEP, "the task to end", || {
        let t = show(&hub, id);
        if ["completed", "failed", "cancelled"]
            .iter()
            .any(|s| t["state"] == *s)
        {
            Ok(t)
        } else {
            Err(t.to_string())
        }
    });
    assert_eq!(t["state"], "completed", "{t}");
    let history = t["attempt_history"].as_array().cloned().unwrap_or_default();
    assert_eq!(history.len(), 1, "one attempt: {t}");
    assert_eq!(history[0]["outcome"], "completed", "{t}");

    // The independent evidence: the agent ran exactly once, and that run completed.
    let runs = read_run_log(&log).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(runs.len(), 1, "the agent ran more than once: {runs:?}");
    let run = &runs[0];
    assert_eq!((run.task, run.generation), (id, 1), "{run:?}");
    assert_eq!(run.ended.map(|(_, code)| code), Some(0), "{run:?}");
    assert_eq!(history[0]["pid"].as_u64(), Some(run.pid), "{t} vs {run:?}");
    let log_text = sc.log();
    assert!(
        !log_text.contains("started just before a crash"),
        "the restart swept the run instead of re-attaching:\n{log_text}"
    );
}

/// A sidecar killed after its run's spawn and before it commits the acceptance,
/// where the run completes before the restart: the hub never heard `Accepted`,
/// so it sends the same attempt again. The restarted sidecar kept the run (an
/// orphan) and adopts it for that assignment: the task completes from the
/// recorded exit status of the first run, without a second run.
#[test]
fn sidecar_killed_before_committing_the_acceptance_does_not_run_a_finished_attempt_again() {
    let mut hub = Hub::init();
    hub.set_policy("heartbeat_interval", "\"1s\"");
    hub.start();
    let mut sc = Sidecar::enroll(&hub, "orphan", &[]);
    sc.set_agent("settle", "\"100ms\"");
    let evidence = tempfile::Builder::new()
        .prefix("muster-crash-evidence-")
        .tempdir()
        .expect("a temporary directory");
    let log = evidence.path().join("runs.log");
    let script = evidence.path().join("agent.sh");
    write_script(
        &script,
        &format!("#!/bin/sh\n{}\nfin 0\n", run_log_prelude(&log)),
    );
    let command = serde_json::json!([script.to_string_lossy()]).to_string();
    sc.set_agent("command", &command);
    sc.start_connected(CONNECT);
    hub.wait_agent_state(sc.name(), "online", CONNECT);

    let hold = sc.data_dir().join(HOLD_ACCEPT_FILE);
    let reached = sc.data_dir().join(HOLD_ACCEPT_REACHED_FILE);
    std::fs::write(&hold, b"").expect("write the hold file");
    let v = hub.json(&["submit", "--title", "once"]);
    let id = v["id"].as_u64().expect("submit printed an id");
    wait_until(
        STEP,
        "the sidecar to hold the commit of the acceptance \
         (is muster-sidecar built with --features muster-sidecar/test-hooks?)",
        || {
            std::fs::read_to_string(&reached)
                .ok()
                .filter(|s| s.ends_with('\n'))
        },
    );
    // The run ends while the acceptance is not yet committed.
    wait_until(STEP, "the first run to end", || {
        let runs = read_run_log(&log).unwrap_or_else(|e| panic!("{e}"));
        (runs.len() == 1 && runs[0].ended == Some((1, 0))).then_some(())
    });
    assert_eq!(
        show(&hub, id)["state"],
        "assigned",
        "the hub never heard Accepted"
    );
    sc.kill9();
    std::fs::remove_file(&hold).expect("remove the hold file");
    sc.start_connected(CONNECT);
    let t = wait_for(STEP, "the task to end", || {
        let t = show(&hub, id);
        if ["completed", "failed", "cancelled"]
            .iter()
            .any(|s| t["state"] == *s)
        {
            Ok(t)
        } else {
            Err(t.to_string())
        }
    });
    assert_eq!(t["state"], "completed", "{t}");
    let runs = read_run_log(&log).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(runs.len(), 1, "the agent ran more than once: {runs:?}");
}
