//! The local socket: an agent may only report on its own attempt, and
//! connections that send nothing cannot hold the socket.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use muster_tests::tasks::{submit, wait_state};
use muster_tests::{Hub, Sidecar, bins, run_bounded, stderr, stdout, wait_until, write_script};

/// How long a fresh sidecar may take to connect and show up online.
const CONNECT: Duration = Duration::from_secs(20);
/// How long a task may take to reach a state.
const TASK_STATE: Duration = Duration::from_secs(20);
/// How long a CLI call may run.
const CLI: Duration = Duration::from_secs(30);
/// The sidecar's read deadline for a request line (`local::REQUEST_DEADLINE`).
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// A started hub with a 1 s heartbeat.
fn hub() -> Hub {
    let mut hub = Hub::init();
    hub.set_policy("heartbeat_interval", "\"1s\"");
    hub.start();
    hub
}

/// An exec agent that records its `MUSTER_*` environment in
/// `env-<task>` and then waits (at most 60 s) for `stop-<task>` before it exits 0.
fn waiting_agent(sc: &Sidecar) {
    let d = sc.root().display().to_string();
    let script = sc.root().join("agent.sh");
    write_script(
        &script,
        &format!(
            "#!/bin/sh\nenv | grep '^MUSTER_' > '{d}/env-tmp-'\"$MUSTER_TASK_ID\"\nmv '{d}/env-tmp-'\"$MUSTER_TASK_ID\" '{d}/env-'\"$MUSTER_TASK_ID\"\ni=0\nwhile [ ! -e '{d}/stop-'\"$MUSTER_TASK_ID\" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\nexit 0\n"
        ),
    );
    let argv = serde_json::Value::from(vec![script.to_string_lossy().into_owned()]);
    sc.set_agent("command", &argv.to_string());
    sc.set_agent("settle", "\"100ms\"");
    sc.set_agent("stop_grace", "\"2s\"");
}

/// Submits a task; returns its id.
/// The `MUSTER_*` environment the agent of task `id` was given.
fn agent_env(dir: &Path, id: u64) -> BTreeMap<String, String> {
    let path = dir.join(format!("env-{id}"));
    let text = wait_until(
        TASK_STATE,
        &format!("the agent of task {id} starts"),
        || std::fs::read_to_string(&path).ok(),
    );
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// `muster-sidecar task <args>` run with exactly `env` as its `MUSTER_*` variables, as an agent would.
fn agent_cli(env: &BTreeMap<String, String>, args: &[&str]) -> Output {
    let mut cmd = Command::new(&bins().sidecar);
    for var in [
        "MUSTER_TASK_ID",
        "MUSTER_GENERATION",
        "MUSTER_TASK_TOKEN",
        "MUSTER_SOCKET",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env).env("NO_COLOR", "1").arg("task").args(args);
    run_bounded(&mut cmd, CLI)
}

/// `env` with `key` replaced (or removed, for `None`).
fn with(
    env: &BTreeMap<String, String>,
    key: &str,
    value: Option<&str>,
) -> BTreeMap<String, String> {
    let mut e = env.clone();
    match value {
        Some(v) => e.insert(key.into(), v.into()),
        None => e.remove(key),
    };
    e
}

/// Asserts the command was refused (exit non-zero) with `phrase` in its message.
fn refused(what: &str, out: &Output, phrase: &str) {
    assert!(
        !out.status.success(),
        "{what}: accepted, but must be refused: {}",
        stdout(out)
    );
    assert!(
        stderr(out).contains(phrase),
        "{what}: refused without saying {phrase:?}: {}",
        stderr(out)
    );
}

#[test]
fn an_agent_cannot_report_on_another_attempt() {
    let hub = hub();
    let mut sc = Sidecar::enroll_slots(&hub, "twoslots", 2);
    waiting_agent(&sc);
    sc.start_connected(CONNECT);
    hub.wait_agent_state(sc.name(), "online", CONNECT);
    let dir = sc.root().to_path_buf();

    let a = submit(&hub, "task A", &[]);
    let b = submit(&hub, "task B", &[]);
    let env_a = agent_env(&dir, a);
    let env_b = agent_env(&dir, b);
    wait_state(&hub, b, &["running"], TASK_STATE);
    let token_a = env_a
        .get("MUSTER_TASK_TOKEN")
        .expect("agent A has MUSTER_TASK_TOKEN")
        .clone();
    let token_b = env_b
        .get("MUSTER_TASK_TOKEN")
        .expect("agent B has MUSTER_TASK_TOKEN")
        .clone();
    assert_eq!(token_a.len(), 64, "32 bytes, hex: {token_a}");
    assert_ne!(token_a, token_b, "each attempt has its own token");
    let (b_id, b_gen) = (b.to_string(), env_b["MUSTER_GENERATION"].clone());

    // Agent A claims to be B, with its own token.
    let as_b = with(
        &with(&env_a, "MUSTER_TASK_ID", Some(&b_id)),
        "MUSTER_GENERATION",
        Some(&b_gen),
    );
    let out = agent_cli(&as_b, &["complete", "--result", "stolen"]);
    refused(
        "agent A completing task B",
        &out,
        &format!("does not match task {b} generation {b_gen}"),
    );
    refused(
        "agent A asking for task B",
        &agent_cli(&as_b, &["current"]),
        "does not match",
    );
    // B's attempt with a wrong token, and with none.
    let wrong = with(&env_b, "MUSTER_TASK_TOKEN", Some(&"0".repeat(64)));
    refused(
        "a wrong token",
        &agent_cli(&wrong, &["fail", "--reason", "x"]),
        "does not match",
    );
    let none = with(&env_b, "MUSTER_TASK_TOKEN", None);
    refused(
        "no token",
        &agent_cli(&none, &["complete"]),
        "no task token",
    );
    // B's own token on another generation of B (stale or not yet made).
    let g: u64 = b_gen.parse().expect("a generation");
    for other in [g + 1, g.saturating_sub(1)] {
        let stale = with(&env_b, "MUSTER_GENERATION", Some(&other.to_string()));
        refused(
            "another generation",
            &agent_cli(&stale, &["complete"]),
            "does not match",
        );
    }

    // Nothing of that reached the hub: B still runs.
    let t = hub.json(&["task", "show", &b_id]);
    assert_eq!(t["state"], "running", "task B after the attempts: {t}");
    // The refusals are logged with the attempt, never with a token.
    let log = sc.log();
    assert!(
        log.contains("task token does not match"),
        "no warning logged: {log}"
    );
    assert!(
        !log.contains(&token_a) && !log.contains(&token_b),
        "a token reached the log"
    );
    // Status needs no token and shows none.
    let status = sc.status_json().expect("status answers").to_string();
    assert!(
        !status.contains(&token_a) && !status.contains(&token_b),
        "status leaks a token: {status}"
    );

    // The honest reports still work.
    let out = agent_cli(&env_a, &["progress", "half way"]);
    assert!(
        out.status.success(),
        "agent A's own progress: {}",
        stderr(&out)
    );
    let out = agent_cli(&env_b, &["current"]);
    assert!(
        out.status.success() && stdout(&out).contains(&format!("\"id\":{b}")),
        "agent B's current: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let out = agent_cli(&env_b, &["complete", "--result", "honest"]);
    assert!(
        out.status.success(),
        "agent B's own complete: {}",
        stderr(&out)
    );
    let t = wait_state(&hub, b, &["completed"], TASK_STATE);
    assert_eq!(t["result"], "honest", "{t}");
    for id in [a, b] {
        std::fs::write(dir.join(format!("stop-{id}")), b"").expect("stop file");
    }
    wait_state(&hub, a, &["completed"], TASK_STATE);
}

#[test]
fn silent_connections_are_closed_and_the_agent_is_still_heard() {
    let hub = hub();
    let mut sc = Sidecar::enroll(&hub, "flooded", &[]);
    waiting_agent(&sc);
    sc.start_connected(CONNECT);
    hub.wait_agent_state(sc.name(), "online", CONNECT);
    let dir = sc.root().to_path_buf();
    let id = submit(&hub, "under siege", &[]);
    let env = agent_env(&dir, id);
    let socket = PathBuf::from(&env["MUSTER_SOCKET"]);

    // 200 connections that never send a byte: more than the sidecar serves at once.
    let flood: Vec<UnixStream> = (0..200)
        .map(|i| UnixStream::connect(&socket).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    let started = Instant::now();
    let limit = REQUEST_DEADLINE + Duration::from_secs(5);
    let mut busy = 0;
    for (i, mut s) in flood.into_iter().enumerate() {
        // Each must end within the deadline: the sidecar answers (busy or
        // "no request") and closes, so the read returns.
        let left = limit
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(10));
        s.set_read_timeout(Some(left)).expect("read timeout");
        let mut got = Vec::new();
        match s.read_to_end(&mut got) {
            Ok(_) => {}
            Err(e) => panic!(
                "connection {i} still open after {:?}: {e}",
                started.elapsed()
            ),
        }
        if String::from_utf8_lossy(&got).contains("busy") {
            busy += 1;
        }
    }
    assert!(
        busy >= 100,
        "connections beyond the limit get an immediate busy answer ({busy} did)"
    );

    // The agent is still heard, and its report reaches the hub.
    let out = agent_cli(&env, &["progress", "still here"]);
    assert!(
        out.status.success(),
        "progress after the flood: {}",
        stderr(&out)
    );
    assert!(sc.status_json().is_some(), "status still answers");
    std::fs::write(dir.join(format!("stop-{id}")), b"").expect("stop file");
    wait_state(&hub, id, &["completed"], TASK_STATE);
}
