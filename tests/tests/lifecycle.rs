//! Issue 3, the task lifecycle end to end, against the real binaries on
//! 127.0.0.1: submit → schedule → run (exec and wake with each verifier) →
//! report, failures and their captured errors, routing and ordering, cancel
//! and requeue, fencing of old generations, crashes of either daemon, the
//! coordination cost, roles, and hostile task text.
//!
//! Every agent is a small shell script written into its sidecar's temporary
//! directory; every script ends on its own within a minute at most (the
//! fixtures also kill the agent process groups when a test ends).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use muster_tests::tasks::*;
use muster_tests::{
    Hub, Sidecar, bins, noise_hex, read_run_log, run_bounded, run_log_prelude, stderr, stdout,
    task_shows, wait_for, wait_until,
};
use serde_json::Value;

/// How long a fresh sidecar may take to connect and show up online.
const CONNECT: Duration = Duration::from_secs(20);
/// How long a short task may take from submission to its end.
const TASK_END: Duration = Duration::from_secs(20);
/// How long a CLI call made outside the fixtures may run.
const CLI: Duration = Duration::from_secs(30);

// === helpers ===

/// A started hub (heartbeat 1 s, quick retries) after `policy` edits.
fn hub_with(policy: &[(&str, &str)]) -> Hub {
    let mut hub = Hub::init();
    hub.set_policy("heartbeat_interval", "\"1s\"");
    hub.set_policy("backoff_initial", "\"200ms\"");
    for (k, v) in policy {
        hub.set_policy(k, v);
    }
    hub.start();
    hub
}

/// A TOML argv array of plain strings.
fn argv(items: &[&str]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| serde_json::Value::String((*s).to_string()).to_string())
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// Waits until task `id` has completed; returns its `task show`.
fn wait_completed(hub: &Hub, id: u64) -> Value {
    let t = wait_state(hub, id, &["completed", "failed", "cancelled"], TASK_END);
    assert_eq!(t["state"], "completed", "task {id}: {t}");
    t
}

/// How many attempts of `t` completed.
fn completed_attempts(t: &Value) -> usize {
    attempts(t)
        .iter()
        .filter(|a| a["outcome"] == "completed")
        .count()
}

/// Waits until the hub has counted `n` more heartbeats. A sidecar sends its
/// reports and heartbeats on one ordered stream, so whatever it sent before
/// has reached the hub by then: the event to await before a "nothing else
/// arrived" check, instead of a fixed sleep.
fn await_heartbeats(hub: &Hub, n: u64) {
    let beats = |s: &Value| s["heartbeats"].as_u64().unwrap_or(0);
    let before = beats(&hub.json(&["stats"]));
    wait_for(TASK_END, &format!("{n} more heartbeats"), || {
        let s = hub.json(&["stats"]);
        if beats(&s) >= before + n {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
}

/// `muster-hub <args>` without the fixture's `--data-dir`, in a clean environment.
fn hub_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(&bins().hub);
    cmd.args(args)
        .env("NO_COLOR", "1")
        .env_remove("MUSTER_HUB")
        .env_remove("MUSTER_CREDENTIAL")
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", "/nonexistent-muster-home");
    cmd
}

/// Runs a command to its end or kills it after `timeout`; `None` then. Never panics
/// (for threads that must keep going while a hub is down).
fn run_quiet(mut cmd: Command, timeout: Duration) -> Option<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().ok(),
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return None,
        }
    }
}

/// Every task the hub lists (all pages), by id.
fn all_tasks(hub: &Hub) -> BTreeMap<u64, Value> {
    let mut out = BTreeMap::new();
    let mut cursor: Option<u64> = None;
    for _ in 0..100 {
        let c = cursor.map(|c| c.to_string());
        let mut args = vec!["tasks", "--limit", "1000"];
        if let Some(c) = &c {
            args.extend(["--cursor", c]);
        }
        let v = hub.json(&args);
        for t in v["tasks"].as_array().into_iter().flatten() {
            if let Some(id) = t["id"].as_u64() {
                out.insert(id, t.clone());
            }
        }
        match v["next_cursor"].as_u64() {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    out
}

// === submit → completed ===

#[test]
fn exec_task_completes_and_requeue_runs_a_new_generation() {
    let hub = hub_with(&[]);
    let mut sc = sidecar(&hub, "exec1", &[]);
    let runs = sc.root().join("runs");
    let script = agent_script(
        &sc,
        "agent.sh",
        &format!(
            "#!/bin/sh\necho \"$MUSTER_TASK_ID $MUSTER_GENERATION $MUSTER_AGENT\" >> '{}'\nexit 0\n",
            runs.display()
        ),
    );
    use_command(&sc, &script);
    go_online(&hub, &mut sc);

    let out = hub.cli(&["submit", "--title", "plain exec", "--wait", "--json"]);
    assert!(
        out.status.success(),
        "submit --wait of a task that completes exited {}: {}{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    let waited: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "submit --wait --json printed no JSON ({e}): {}",
            stdout(&out)
        )
    });
    let id = waited["id"].as_u64().expect("an id");
    let t = show(&hub, id);
    assert_eq!(t["state"], "completed", "{t}");
    assert_eq!(t["generation"], 1, "{t}");
    assert_eq!(t["agent"], "exec1", "{t}");
    let a = attempts(&t);
    assert_eq!(a.len(), 1, "{t}");
    assert_eq!(a[0]["outcome"], "completed", "{t}");
    assert_eq!(a[0]["generation"], 1, "{t}");
    assert_eq!(a[0]["agent"], "exec1", "{t}");
    for k in ["assigned_at", "accepted_at", "started_at", "ended_at"] {
        assert!(a[0][k].as_u64().is_some(), "attempt without {k}: {t}");
    }
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap_or_default(),
        format!("{id} 1 exec1\n"),
        "the agent ran once with the MUSTER_* variables"
    );

    // Requeue the finished task: a new generation runs.
    let out = hub.cli(&["task", "requeue", &id.to_string()]);
    assert!(out.status.success(), "requeue: {}", stderr(&out));
    let t = wait_for(TASK_END, "generation 2 completed", || {
        let t = show(&hub, id);
        if t["state"] == "completed" && t["generation"] == 2 {
            Ok(t)
        } else {
            Err(t.to_string())
        }
    });
    let a = attempts(&t);
    assert_eq!(a.len(), 2, "{t}");
    assert_eq!(a[0]["generation"], 1, "{t}");
    assert_eq!(a[1]["generation"], 2, "{t}");
    assert_eq!(outcomes(&t), ["completed", "completed"], "{t}");
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap_or_default(),
        format!("{id} 1 exec1\n{id} 2 exec1\n"),
    );
    let actions: Vec<&str> = t["audit"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(actions, ["submit", "requeue"], "{t}");

    // Once the hub has acknowledged the end, the sidecar forgets the attempts and
    // their run directories go too (into the small pool `.free/` for reuse):
    // nothing piles up between restarts.
    let run_dirs = sc.data_dir().join("runs");
    wait_for(TASK_END, "run directories released", || {
        let left: Vec<String> = std::fs::read_dir(&run_dirs)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("still in {}: {left:?}", run_dirs.display()))
        }
    });
}

#[test]
fn wake_agent_ack_completes() {
    let hub = hub_with(&[]);
    let mut sc = sidecar(&hub, "wack", &[]);
    let dir = sc.root().to_path_buf();
    // The wake command returns at once; a worker it leaves behind acknowledges
    // the start, then completes.
    let wake = agent_script(
        &sc,
        "wake.sh",
        &format!(
            "#!/bin/sh\n(\n  sleep 0.3\n  {sc} task start > '{d}/start.out' 2>&1; echo $? > '{d}/start.rc'\n  sleep 0.3\n  {sc} task complete --result 'all good' > '{d}/complete.out' 2>&1; echo $? > '{d}/complete.rc'\n) >/dev/null 2>&1 &\nexit 0\n",
            sc = sidecar_bin(),
            d = dir.display()
        ),
    );
    use_command(&sc, &wake);
    sc.set_agent("mode", "\"wake\"");
    sc.set_agent("verify", "\"agent-ack\"");
    sc.set_agent("start_timeout", "\"10s\"");
    go_online(&hub, &mut sc);

    let out = hub.cli(&["submit", "--title", "wake me", "--wait", "--json"]);
    assert!(
        out.status.success(),
        "submit --wait: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let id: u64 = serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v["id"].as_u64())
        .expect("an id");
    let t = show(&hub, id);
    assert_eq!(t["state"], "completed", "{t}");
    assert_eq!(t["result"], "all good", "{t}");
    assert_eq!(outcomes(&t), ["completed"], "{t}");
    let a = &attempts(&t)[0];
    assert!(a["started_at"].as_u64().is_some(), "{t}");
    let rc = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    wait_until(Duration::from_secs(5), "the worker's exit codes", || {
        (!rc("complete.rc").is_empty()).then_some(())
    });
    assert_eq!(
        rc("start.rc").trim(),
        "0",
        "task start: {}",
        rc("start.out")
    );
    assert_eq!(
        rc("complete.rc").trim(),
        "0",
        "task complete: {}",
        rc("complete.out")
    );
}

#[test]
fn wake_process_verifier_records_the_pid_and_notices_a_vanished_agent() {
    let hub = hub_with(&[]);
    let mut sc = sidecar(&hub, "wproc", &[]);
    let dir = sc.root().to_path_buf();
    // A copy of `sleep` under a name no other process has.
    let probe_name = format!("mprobe-{}", noise_hex(4));
    let probe = dir.join(&probe_name);
    std::fs::copy("/bin/sleep", &probe).expect("copy /bin/sleep");
    // "keep": the agent reports completion itself, then goes away.
    // "vanish": the agent goes away without a report.
    let wake = agent_script(
        &sc,
        "wake.sh",
        &format!(
            r#"#!/bin/sh
d='{d}'
'{probe}' 30 >/dev/null 2>&1 &
p=$!
echo $p > "$d/probe-$MUSTER_TASK_ID.pid"
if grep -q '"title": "keep' "$MUSTER_TASK_FILE"; then
  ( sleep 1.5; {sc} task complete > "$d/complete.out" 2>&1; echo $? > "$d/complete.rc"; kill $p ) >/dev/null 2>&1 &
else
  ( sleep 1.5; kill $p ) >/dev/null 2>&1 &
fi
exit 0
"#,
            d = dir.display(),
            probe = probe.display(),
            sc = sidecar_bin()
        ),
    );
    use_command(&sc, &wake);
    sc.set_agent("mode", "\"wake\"");
    sc.set_agent("verify", "\"process\"");
    sc.set_agent("verify_process", &format!("\"{probe_name}\""));
    sc.set_agent("start_timeout", "\"10s\"");
    go_online(&hub, &mut sc);

    let keep = submit(&hub, "keep going", &[]);
    let t = wait_completed(&hub, keep);
    assert_eq!(outcomes(&t), ["completed"], "{t}");
    let pid = read_pid(&dir.join(format!("probe-{keep}.pid"))).expect("the probe's pid");
    assert_eq!(
        attempts(&t)[0]["pid"].as_u64(),
        Some(u64::from(pid)),
        "the verified process's pid is recorded: {t}"
    );
    let rc = std::fs::read_to_string(dir.join("complete.rc")).unwrap_or_default();
    assert_eq!(rc.trim(), "0");
    wait_until(Duration::from_secs(5), "the first probe gone", || {
        (!pid_alive(pid)).then_some(())
    });

    let vanish = submit(&hub, "vanish quietly", &["--max-attempts", "1"]);
    let t = wait_state(
        &hub,
        vanish,
        &["completed", "failed", "cancelled"],
        TASK_END,
    );
    assert_eq!(t["state"], "failed", "{t}");
    assert_eq!(
        outcomes(&t),
        ["agent_exited"],
        "a verified agent that disappears without a report: {t}"
    );
    let a = &attempts(&t)[0];
    assert!(
        a["started_at"].as_u64().is_some(),
        "it was verified first: {t}"
    );
    let reason = a["error"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(&probe_name), "reason: {t}");
}

#[test]
fn wake_command_verifier_completes() {
    let hub = hub_with(&[]);
    let mut sc = sidecar(&hub, "wcmd", &[]);
    let dir = sc.root().to_path_buf();
    let verify = agent_script(
        &sc,
        "alive.sh",
        &format!(
            "#!/bin/sh\nexec test -f '{}/marker-'\"$MUSTER_TASK_ID\"\n",
            dir.display()
        ),
    );
    let wake = agent_script(
        &sc,
        "wake.sh",
        &format!(
            r#"#!/bin/sh
d='{d}'
(
  sleep 0.5
  touch "$d/marker-$MUSTER_TASK_ID"
  sleep 1.5
  {sc} task complete > "$d/complete.out" 2>&1; echo $? > "$d/complete.rc"
  rm -f "$d/marker-$MUSTER_TASK_ID"
) >/dev/null 2>&1 &
exit 0
"#,
            d = dir.display(),
            sc = sidecar_bin()
        ),
    );
    use_command(&sc, &wake);
    sc.set_agent("mode", "\"wake\"");
    sc.set_agent("verify", "\"command\"");
    sc.set_agent("verify_command", &argv(&[&verify.to_string_lossy()]));
    sc.set_agent("start_timeout", "\"10s\"");
    go_online(&hub, &mut sc);

    let out = hub.cli(&["submit", "--title", "probe me", "--wait", "--json"]);
    assert!(
        out.status.success(),
        "submit --wait: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let id: u64 = serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v["id"].as_u64())
        .expect("an id");
    let t = show(&hub, id);
    assert_eq!(outcomes(&t), ["completed"], "{t}");
    let a = &attempts(&t)[0];
    let (assigned, started) = (
        a["assigned_at"].as_u64().unwrap_or(0),
        a["started_at"].as_u64().unwrap_or(0),
    );
    // The start was verified only once the marker existed (0.5 s after the wake).
    assert!(
        started >= assigned + 400,
        "started {started} too soon after assigned {assigned}: {t}"
    );
    let rc = std::fs::read_to_string(dir.join("complete.rc")).unwrap_or_default();
    assert_eq!(rc.trim(), "0");
}

// === failures ===

#[test]
fn failing_agent_shows_outcome_exit_code_and_stderr() {
    let hub = hub_with(&[]);
    let mut sc = sidecar(&hub, "failer", &[]);
    let script = agent_script(
        &sc,
        "agent.sh",
        "#!/bin/sh\necho 'some output'\necho 'boom: the widget is broken' >&2\nexit 3\n",
    );
    use_command(&sc, &script);
    go_online(&hub, &mut sc);

    let out = hub.cli(&[
        "submit",
        "--title",
        "doomed",
        "--max-attempts",
        "1",
        "--wait",
        "--json",
    ]);
    assert!(
        !out.status.success(),
        "submit --wait of a failing task exited 0: {}",
        stdout(&out)
    );
    let id: u64 = serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v["id"].as_u64())
        .or_else(|| {
            let v = hub.json(&["tasks"]);
            v["tasks"][0]["id"].as_u64()
        })
        .expect("the task's id");
    let t = show(&hub, id);
    assert_eq!(t["state"], "failed", "{t}");
    let a = attempts(&t);
    assert_eq!(a.len(), 1, "{t}");
    assert_eq!(a[0]["outcome"], "failed", "{t}");
    let e = &a[0]["error"];
    assert_eq!(e["exit_code"], 3, "{t}");
    assert!(
        e["stderr_tail"]
            .as_str()
            .unwrap_or_default()
            .contains("boom: the widget is broken"),
        "{t}"
    );
    assert!(
        e["stdout_tail"]
            .as_str()
            .unwrap_or_default()
            .contains("some output"),
        "{t}"
    );
    assert!(
        e["command"].as_array().is_some_and(|c| c
            .iter()
            .any(|x| x.as_str().is_some_and(|s| s.ends_with("agent.sh")))),
        "the command is recorded: {t}"
    );
}

// === scheduling ===

#[test]
fn capability_routing_sends_tasks_only_where_the_capability_is() {
    let hub = hub_with(&[]);
    let mut gpu = sidecar(&hub, "has-gpu", &["gpu", "rust"]);
    let mut plain = sidecar(&hub, "plain", &["rust"]);
    for sc in [&gpu, &plain] {
        sc.set_slots(&hub, 2);
    }
    go_online(&hub, &mut gpu);
    go_online(&hub, &mut plain);

    let gpu_tasks: Vec<u64> = (0..4)
        .map(|i| submit(&hub, &format!("needs gpu {i}"), &["--capability", "gpu"]))
        .collect();
    let both = submit(
        &hub,
        "needs gpu and rust",
        &["--capability", "gpu", "--capability", "rust"],
    );
    let nowhere = submit(&hub, "needs tpu", &["--capability", "tpu"]);
    for id in gpu_tasks.iter().chain([&both]) {
        let t = wait_completed(&hub, *id);
        for a in attempts(&t) {
            assert_eq!(a["agent"], "has-gpu", "task {id} ran elsewhere: {t}");
        }
    }
    // No agent has `tpu`: the task waits.
    let t = show(&hub, nowhere);
    assert_eq!(t["state"], "queued", "{t}");
    assert!(attempts(&t).is_empty(), "{t}");
}

#[test]
fn priority_order_high_then_mid_then_low() {
    let hub = hub_with(&[]);
    let mut sc = sidecar(&hub, "single", &[]);
    go_online(&hub, &mut sc);
    let out = hub.cli(&["agent", "drain", "single"]);
    assert!(out.status.success(), "drain: {}", stderr(&out));
    let low = submit(&hub, "low", &["--priority", "1"]);
    let high = submit(&hub, "high", &["--priority", "9"]);
    let mid = submit(&hub, "mid", &["--priority", "5"]);
    // Nothing runs on a drained agent: scheduling ran at each submission and runs
    // at every tick; two heartbeats (several ticks) later the tasks are still queued.
    await_heartbeats(&hub, 2);
    for id in [low, high, mid] {
        let t = show(&hub, id);
        assert_eq!(t["state"], "queued", "a drained agent got work: {t}");
    }
    let out = hub.cli(&["agent", "undrain", "single"]);
    assert!(out.status.success(), "undrain: {}", stderr(&out));
    let assigned: Vec<(u64, &str)> = [(high, "high"), (mid, "mid"), (low, "low")]
        .iter()
        .map(|(id, name)| {
            let t = wait_completed(&hub, *id);
            (attempts(&t)[0]["assigned_at"].as_u64().unwrap_or(0), *name)
        })
        .collect();
    let mut sorted = assigned.clone();
    sorted.sort();
    let order: Vec<&str> = sorted.iter().map(|(_, n)| *n).collect();
    assert_eq!(order, ["high", "mid", "low"], "assigned at: {assigned:?}");
    assert!(
        sorted.windows(2).all(|w| w[0].0 < w[1].0),
        "one slot: assignments are strictly sequential: {assigned:?}"
    );
}

#[test]
fn fresh_task_runs_before_a_retried_one_of_equal_priority() {
    let hub = hub_with(&[("backoff_initial", "\"1s\"")]);
    let mut sc = sidecar(&hub, "single", &[]);
    let dir = sc.root().to_path_buf();
    // "flaky": the first attempt runs two seconds and fails; later attempts succeed.
    let script = agent_script(
        &sc,
        "agent.sh",
        &format!(
            r#"#!/bin/sh
m='{d}/failed-'"$MUSTER_TASK_ID"
if grep -q '"title": "flaky' "$MUSTER_TASK_FILE" && [ ! -e "$m" ]; then
  touch "$m"; sleep 2; echo 'first attempt fails' >&2; exit 1
fi
exit 0
"#,
            d = dir.display()
        ),
    );
    use_command(&sc, &script);
    go_online(&hub, &mut sc);

    let flaky = submit(&hub, "flaky", &[]);
    wait_state(&hub, flaky, &["running"], TASK_END);
    // Hold new work back while the first attempt fails and its backoff runs.
    let out = hub.cli(&["agent", "drain", "single"]);
    assert!(out.status.success(), "drain: {}", stderr(&out));
    let t = wait_for(TASK_END, "the flaky task back in the queue", || {
        let t = show(&hub, flaky);
        if t["state"] == "queued" && attempts(&t).len() == 1 {
            Ok(t)
        } else {
            Err(t.to_string())
        }
    });
    assert_eq!(outcomes(&t), ["failed"], "{t}");
    let fresh = submit(&hub, "fresh", &[]);
    // Both are ready once the retry's backoff has passed.
    let not_before = t["not_before"].as_u64().unwrap_or(0);
    wait_until(Duration::from_secs(10), "the backoff passed", || {
        (now_ms() > not_before + 300).then_some(())
    });
    let out = hub.cli(&["agent", "undrain", "single"]);
    assert!(out.status.success(), "undrain: {}", stderr(&out));
    let f = wait_completed(&hub, fresh);
    let r = wait_completed(&hub, flaky);
    let fresh_at = attempts(&f)[0]["assigned_at"].as_u64().unwrap_or(0);
    let retry_at = attempts(&r)[1]["assigned_at"].as_u64().unwrap_or(0);
    assert!(
        fresh_at < retry_at,
        "the fresh task (assigned {fresh_at}) should run before the retry (assigned {retry_at})"
    );
}

// === cancel, requeue, audit ===

#[test]
fn cancel_stops_the_agent_and_the_audit_names_who_did_what() {
    let hub = hub_with(&[]);
    let mut sc = sidecar(&hub, "victim", &[]);
    let dir = sc.root().to_path_buf();
    // Generation 1 sleeps a minute; a requeued generation ends at once.
    let script = agent_script(
        &sc,
        "agent.sh",
        &format!(
            "#!/bin/sh\nif [ \"$MUSTER_GENERATION\" = 1 ]; then\n  echo $$ > '{}/agent.pid'\n  exec sleep 60\nfi\nexit 0\n",
            dir.display()
        ),
    );
    use_command(&sc, &script);
    go_online(&hub, &mut sc);

    // A second admin, enrolled like an operator's machine, does the cancel.
    let cred = hub.root().join("boss.toml");
    let token = hub.token("admin");
    let out = run_bounded(
        &mut hub_cmd(&[
            "login",
            "--token",
            &token,
            "--role",
            "admin",
            "--name",
            "boss",
            "--save-to",
            &cred.to_string_lossy(),
        ]),
        CLI,
    );
    assert!(out.status.success(), "login: {}", stderr(&out));

    let id = submit(&hub, "long haul", &[]);
    wait_state(&hub, id, &["running"], TASK_END);
    let pid = wait_until(Duration::from_secs(5), "the agent's pid file", || {
        read_pid(&dir.join("agent.pid"))
    });
    assert!(pid_alive(pid), "the agent runs");

    let out = run_bounded(
        &mut hub_cmd(&[
            "task",
            "cancel",
            &id.to_string(),
            "--credential",
            &cred.to_string_lossy(),
        ]),
        CLI,
    );
    assert!(out.status.success(), "cancel: {}", stderr(&out));
    let stopped = Instant::now();
    wait_until(Duration::from_secs(10), "the agent process gone", || {
        (!pid_alive(pid)).then_some(())
    });
    eprintln!("agent gone {:?} after the cancel", stopped.elapsed());
    let t = wait_state(&hub, id, &["cancelled"], TASK_END);
    let a = wait_for(TASK_END, "attempt 1 ended cancelled", || {
        let t = show(&hub, id);
        match attempts(&t).first() {
            Some(a) if a["outcome"] == "cancelled" => Ok(t),
            _ => Err(t.to_string()),
        }
    });
    assert_eq!(attempts(&a).len(), 1, "{a}");
    assert_eq!(t["state"], "cancelled", "{t}");

    // Requeue the cancelled task (by the data directory's admin): generation 2 runs.
    let out = hub.cli(&["task", "requeue", &id.to_string()]);
    assert!(out.status.success(), "requeue: {}", stderr(&out));
    let t = wait_for(TASK_END, "generation 2 completed", || {
        let t = show(&hub, id);
        if t["state"] == "completed" && t["generation"] == 2 {
            Ok(t)
        } else {
            Err(t.to_string())
        }
    });
    assert_eq!(outcomes(&t), ["cancelled", "completed"], "{t}");

    let audit: Vec<(String, String)> = t["audit"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            assert!(e["at"].as_u64().is_some(), "audit entry without time: {e}");
            (
                e["action"].as_str().unwrap_or_default().to_string(),
                e["who"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let pairs: Vec<(&str, &str)> = audit
        .iter()
        .map(|(a, w)| (a.as_str(), w.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("submit", "admin"),
            ("cancel", "boss"),
            ("requeue", "admin")
        ],
        "{t}"
    );
    // The human-readable `task show` names them too.
    let text = stdout(&hub.cli(&["task", "show", &id.to_string()]));
    assert!(
        text.contains("boss") && text.contains("cancel"),
        "task show:\n{text}"
    );
}

// === fencing ===

#[test]
fn completion_of_an_old_generation_is_refused() {
    // The hub gives an attempt 2 s to start; generation 1's agent takes 4 s.
    let hub = hub_with(&[("start_timeout", "\"2s\"")]);
    let mut sc = sidecar(&hub, "slowpoke", &[]);
    let dir = sc.root().to_path_buf();
    let wake = agent_script(
        &sc,
        "wake.sh",
        &format!(
            r#"#!/bin/sh
d='{d}'
g=$MUSTER_GENERATION
(
  if [ "$g" = 1 ]; then sleep 4; fi
  {sc} task start > "$d/start-$g.out" 2>&1; echo $? > "$d/start-$g.rc"
  {sc} task complete > "$d/complete-$g.out" 2>&1; echo $? > "$d/complete-$g.rc"
  echo "$g" >> "$d/completions"
) >/dev/null 2>&1 &
exit 0
"#,
            d = dir.display(),
            sc = sidecar_bin()
        ),
    );
    use_command(&sc, &wake);
    sc.set_agent("mode", "\"wake\"");
    sc.set_agent("verify", "\"agent-ack\"");
    sc.set_agent("start_timeout", "\"20s\"");
    // A stop command that stops nothing: generation 1's agent lives on past
    // the hub's decision, as one the sidecar cannot reach would, and reports late.
    sc.set_agent("stop_command", &argv(&["/bin/true"]));
    go_online(&hub, &mut sc);

    let id = submit(&hub, "fenced", &[]);
    let t = wait_completed(&hub, id);
    assert_eq!(t["generation"], 2, "{t}");
    // Generation 1's agent wakes up late and reports; both are refused.
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    wait_until(
        Duration::from_secs(15),
        "generation 1's late reports",
        || (!read("complete-1.rc").is_empty()).then_some(()),
    );
    for what in ["start", "complete"] {
        let rc = read(&format!("{what}-1.rc"));
        let said = read(&format!("{what}-1.out"));
        assert_ne!(
            rc.trim(),
            "0",
            "a late `task {what}` of generation 1 was accepted: {said}"
        );
        assert!(
            said.contains("stale") || said.contains("not held"),
            "`task {what}` of generation 1 should say it is stale: {said}"
        );
    }
    assert_eq!(read("start-2.rc").trim(), "0", "{}", read("start-2.out"));
    assert_eq!(
        read("complete-2.rc").trim(),
        "0",
        "{}",
        read("complete-2.out")
    );
    // Any stray report was sent before the next heartbeats: await them, then look again.
    await_heartbeats(&hub, 2);
    let t = show(&hub, id);
    assert_eq!(t["state"], "completed", "{t}");
    assert_eq!(t["generation"], 2, "{t}");
    assert_eq!(outcomes(&t), ["start_timeout", "completed"], "{t}");
    assert_eq!(completed_attempts(&t), 1, "completed twice: {t}");
    let stats = hub.json(&["stats"]);
    eprintln!(
        "stale_reports = {}, duplicate_reports = {}",
        stats["stale_reports"], stats["duplicate_reports"]
    );
    // The sidecar no longer holds generation 1.
    let st = sc.status_json().expect("status");
    for task in st["tasks"].as_array().into_iter().flatten() {
        assert!(
            !(task["id"] == id && task["generation"] == 1),
            "the sidecar still holds generation 1: {st}"
        );
    }
}

// === crashes ===

/// Sends `sig` to `pid` with kill(1) (the workspace forbids `unsafe`).
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), "--", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A process stopped with SIGSTOP, continued when dropped (also when a test fails).
struct Frozen(u32);

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

/// The runs of task `id` in a run log, as (generation, agent, exit code).
fn logged_runs(log: &Path, id: u64) -> Vec<(u64, String, Option<i64>)> {
    read_run_log(log)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .filter(|r| r.task == id)
        .map(|r| (r.generation, r.agent, r.ended.map(|(_, c)| c)))
        .collect()
}

/// Waits until the sidecar holds no task and its outbox is empty: the hub has
/// acknowledged every report it sent (so any late report has been answered).
fn wait_settled(sc: &Sidecar) -> Value {
    wait_for(
        TASK_END,
        &format!("sidecar {} holding nothing, outbox empty", sc.name()),
        || {
            let st = sc.status_json().ok_or("no status")?;
            let idle = st["outbox"] == 0 && st["tasks"].as_array().is_some_and(Vec::is_empty);
            if idle { Ok(st) } else { Err(st.to_string()) }
        },
    )
}

/// The hub's side of fencing: a sidecar frozen (SIGSTOP) past idle timeout and
/// lost grace while its run completes comes back with that completion of
/// generation 1 in its outbox while generation 2 runs elsewhere. The hub must
/// refuse the replayed completion (counted as a stale report, answered with
/// Abandon) and let only generation 2 complete the task.
#[test]
fn hub_refuses_a_replayed_completion_of_a_superseded_generation() {
    let hub = hub_with(&[("lost_grace", "\"3s\"")]);
    let mut first = sidecar(&hub, "first", &[]);
    let mut second = sidecar(&hub, "second", &[]);
    let log = hub.root().join("runs.log");
    for (sc, secs) in [(&first, 1), (&second, 4)] {
        let script = agent_script(
            sc,
            "agent.sh",
            &format!(
                "#!/bin/sh\n{}\nsleep {secs}\nfin 0\n",
                run_log_prelude(&log)
            ),
        );
        use_command(sc, &script);
    }
    go_online(&hub, &mut first);
    go_online(&hub, &mut second);
    let out = hub.cli(&["agent", "drain", "second"]);
    assert!(out.status.success(), "drain: {}", stderr(&out));

    let id = submit(&hub, "fenced at the hub", &[]);
    let t = wait_state(&hub, id, &["running"], TASK_END);
    assert_eq!(t["agent"], "first", "{t}");
    // The sidecar freezes; its agent run goes on and completes meanwhile.
    let frozen = Frozen(first.pid().expect("first is running"));
    signal(frozen.0, "STOP");
    let out = hub.cli(&["agent", "undrain", "second"]);
    assert!(out.status.success(), "undrain: {}", stderr(&out));
    wait_until(TASK_END, "generation 1's run completed", || {
        (logged_runs(&log, id) == [(1, "first".to_string(), Some(0))]).then_some(())
    });
    // Past idle timeout and lost grace, generation 2 runs on the other sidecar.
    let t = wait_for(
        Duration::from_secs(40),
        "generation 2 running on second",
        || {
            let t = show(&hub, id);
            if t["generation"] == 2 && t["state"] == "running" {
                Ok(t)
            } else {
                Err(t.to_string())
            }
        },
    );
    assert_eq!(t["agent"], "second", "{t}");
    assert_eq!(hub.json(&["stats"])["stale_reports"], 0);
    // Continued, the sidecar handles its run's end (the completion goes into its
    // outbox) before it notices the dead session, reconnects and replays it.
    drop(frozen);
    wait_for(TASK_END, "the replayed completion refused", || {
        let stats = hub.json(&["stats"]);
        if stats["stale_reports"].as_u64() >= Some(1) {
            Ok(stats)
        } else {
            Err(stats.to_string())
        }
    });
    let t = wait_completed(&hub, id);
    // Both sidecars settled: every report sent and answered.
    wait_settled(&first);
    wait_settled(&second);
    let t2 = show(&hub, id);
    assert_eq!(t["generation"], 2, "{t}");
    assert_eq!(t2["generation"], 2, "{t2}");
    assert_eq!(t2["agent"], "second", "{t2}");
    assert_eq!(outcomes(&t2), ["lost", "completed"], "{t2}");
    assert_eq!(completed_attempts(&t2), 1, "{t2}");
    let stats = hub.json(&["stats"]);
    eprintln!(
        "stale_reports = {}, duplicate_reports = {}, completed = {}",
        stats["stale_reports"], stats["duplicate_reports"], stats["completed"]
    );
    assert_eq!(stats["completed"], 1, "{stats}");
    assert!(stats["stale_reports"].as_u64() >= Some(1), "{stats}");
    // Each generation ran once and exited 0; only generation 2's counted.
    assert_eq!(
        logged_runs(&log, id),
        [
            (1, "first".to_string(), Some(0)),
            (2, "second".to_string(), Some(0))
        ]
    );
}

/// A sidecar killed (SIGKILL) while its agent runs, and restarted: the restarted
/// sidecar re-attaches to the same run, and that one attempt completes the task.
/// The run log shows the agent ran exactly once.
#[test]
fn sidecar_killed_mid_run_finishes_the_attempt_exactly_once() {
    let hub = hub_with(&[]);
    let mut sc = sidecar(&hub, "phoenix", &[]);
    let log = hub.root().join("runs.log");
    let script = agent_script(
        &sc,
        "agent.sh",
        &format!("#!/bin/sh\n{}\nsleep 3\nfin 0\n", run_log_prelude(&log)),
    );
    use_command(&sc, &script);
    go_online(&hub, &mut sc);

    let id = submit(&hub, "survive", &[]);
    wait_state(&hub, id, &["running"], TASK_END);
    sc.kill9();
    assert_eq!(
        logged_runs(&log, id),
        [(1, "phoenix".to_string(), None)],
        "the run is under way when its sidecar dies"
    );
    sc.start_connected(CONNECT);
    let t = wait_state(
        &hub,
        id,
        &["completed", "failed", "cancelled"],
        Duration::from_secs(40),
    );
    // Every report sent and answered before the final look.
    wait_settled(&sc);
    let t2 = show(&hub, id);
    assert_eq!(t["state"], t2["state"], "{t} then {t2}");
    let t = t2;
    assert_eq!(t["state"], "completed", "{t}");
    assert_eq!(
        outcomes(&t),
        ["completed"],
        "the one attempt completes: {t}"
    );
    assert_eq!(t["generation"], 1, "{t}");
    assert_eq!(
        logged_runs(&log, id),
        [(1, "phoenix".to_string(), Some(0))],
        "the same agent run continued and ended"
    );
    let stats = hub.json(&["stats"]);
    assert_eq!(stats["completed"], 1, "{stats}");
}

/// A run that ends while its sidecar is down: with the default
/// `exec_status = "recorded"` the wrapper's status file tells the restarted
/// sidecar that it completed; with `"waited"` nobody kept the status, so the
/// attempt ends `agent_exited` and the task is retried. Returns the outcomes.
fn run_that_ends_while_the_sidecar_is_down(exec_status: &str) -> (Value, Vec<String>) {
    let hub = hub_with(&[]);
    let mut sc = sidecar(&hub, &format!("down-{exec_status}"), &[]);
    sc.set_agent("exec_status", &format!("\"{exec_status}\""));
    let dir = sc.root().to_path_buf();
    let script = agent_script(
        &sc,
        "agent.sh",
        &format!(
            "#!/bin/sh\nsleep 1\necho \"$MUSTER_GENERATION\" >> '{}/done'\nexit 0\n",
            dir.display()
        ),
    );
    use_command(&sc, &script);
    go_online(&hub, &mut sc);

    let id = submit(&hub, "outlives its sidecar", &[]);
    wait_state(&hub, id, &["running"], TASK_END);
    sc.kill9();
    // The agent is in its own process group: it finishes without the sidecar.
    wait_until(
        TASK_END,
        "the agent finished while the sidecar was down",
        || {
            std::fs::read_to_string(dir.join("done"))
                .ok()
                .filter(|d| d == "1\n")
        },
    );
    sc.start_connected(CONNECT);
    let t = wait_state(&hub, id, &["completed"], Duration::from_secs(40));
    let o = outcomes(&t);
    (t, o)
}

#[test]
fn recorded_exit_status_survives_a_sidecar_restart() {
    let (t, o) = run_that_ends_while_the_sidecar_is_down("recorded");
    assert_eq!(o, ["completed"], "{t}");
    assert_eq!(t["generation"], 1, "{t}");
}

#[test]
fn waited_exit_status_is_lost_with_the_sidecar_and_the_task_is_retried() {
    let (t, o) = run_that_ends_while_the_sidecar_is_down("waited");
    assert_eq!(o.first().map(String::as_str), Some("agent_exited"), "{t}");
    assert_eq!(o.last().map(String::as_str), Some("completed"), "{t}");
    let first = &attempts(&t)[0];
    let reason = first["error"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("left no exit status"), "{first}");
}

/// What a sidecar that dies between spawning a run and committing it leaves
/// behind ("Launch before commit" in sidecar/src/daemon/mod.rs): a run directory
/// holding the run's handle, and a queue that never heard of the task. The hub
/// never heard `Accepted` and resends the same attempt; the restarted sidecar
/// must adopt that run (never start the agent a second time), and stopping the
/// task stops the adopted run.
#[test]
fn a_run_its_sidecar_died_before_recording_is_adopted_when_the_hub_resends_it() {
    let hub = hub_with(&[]);
    let mut sc = sidecar(&hub, "crash-window", &[]);
    let root = sc.root().to_path_buf();
    let script = agent_script(
        &sc,
        "agent.sh",
        &format!(
            "#!/bin/sh\necho \"$MUSTER_GENERATION\" >> '{}/done'\nexit 0\n",
            root.display()
        ),
    );
    use_command(&sc, &script);
    go_online(&hub, &mut sc);
    sc.kill9();
    // No close reached the hub, so it still counts the session and assigns to it.
    let id = submit(&hub, "spawned, never recorded", &[]);
    wait_state(&hub, id, &["assigned"], TASK_END);

    let run_dir = sc.data_dir().join("runs").join(format!("{id}-1"));
    std::fs::create_dir_all(&run_dir).expect("run dir");
    use std::os::unix::process::CommandExt;
    let mut orphan = Command::new("sleep")
        .arg("60")
        .process_group(0)
        .spawn()
        .expect("spawn the orphan");
    let handle = serde_json::json!({
        "pid": orphan.id(),
        "session": null,
        "run_dir": run_dir,
        "mode": "exec",
    });
    std::fs::write(run_dir.join("handle"), handle.to_string()).expect("write the handle");

    sc.start_connected(CONNECT);
    // The resent attempt adopts the orphan: running, generation 1, the orphan's pid.
    let t = wait_state(&hub, id, &["running"], TASK_END);
    assert_eq!(
        t["generation"], 1,
        "the hub resent the same assignment: {t}"
    );
    assert_eq!(
        attempts(&t)[0]["pid"],
        orphan.id(),
        "the running attempt is not the orphan: {t}"
    );
    assert!(
        orphan.try_wait().expect("try_wait").is_none(),
        "the adopted run was ended"
    );
    // Cancelling stops the adopted run; the agent never ran a second time.
    let out = hub.cli(&["task", "cancel", &id.to_string()]);
    assert!(out.status.success(), "cancel: {}", stderr(&out));
    let ended = wait_until(TASK_END, "the adopted run is stopped", || {
        orphan.try_wait().expect("try_wait")
    });
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(ended.signal(), Some(libc::SIGTERM), "{ended:?}");
    let t = wait_state(&hub, id, &["cancelled"], TASK_END);
    assert_eq!(outcomes(&t), ["cancelled"], "{t}");
    assert!(
        !root.join("done").exists(),
        "the agent ran although its attempt's run was adopted"
    );
}

#[test]
fn hub_killed_during_200_submissions_loses_no_acknowledged_task() {
    const TASKS: usize = 200;
    let mut hub = hub_with(&[]);
    let mut fleet = Vec::new();
    for name in ["busy-a", "busy-b", "busy-c"] {
        let mut sc = sidecar(&hub, name, &[]);
        sc.set_slots(&hub, 4);
        go_online(&hub, &mut sc);
        fleet.push(sc);
    }
    let data = hub.data_dir().to_path_buf();
    let acked: Arc<Mutex<Vec<(usize, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(AtomicUsize::new(0));
    let submitter = {
        let acked = Arc::clone(&acked);
        let failures = Arc::clone(&failures);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            for i in 0..TASKS {
                // Each submission is retried (same idempotency key) until acknowledged.
                while Instant::now() < deadline {
                    let key = format!("crash-{i}");
                    let title = format!("crash test {i}");
                    let mut cmd = hub_cmd(&[
                        "submit",
                        "--title",
                        &title,
                        "--key",
                        &key,
                        "--json",
                        "--data-dir",
                        &data.to_string_lossy(),
                    ]);
                    cmd.env("RUST_LOG", "error");
                    let out = run_quiet(cmd, Duration::from_secs(15));
                    let id = out
                        .filter(|o| o.status.success())
                        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
                        .and_then(|v| v["id"].as_u64());
                    match id {
                        Some(id) => {
                            acked
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push((i, id));
                            break;
                        }
                        None => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            }
        })
    };
    let count = || acked.lock().unwrap_or_else(|p| p.into_inner()).len();
    wait_until(
        Duration::from_secs(60),
        "70 acknowledged submissions",
        || (count() >= 70).then_some(()),
    );
    hub.kill9();
    let killed_at = count();
    std::thread::sleep(Duration::from_millis(500));
    hub.start();
    let restarted = Instant::now();
    submitter.join().expect("the submitting thread");
    let acked = acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
    eprintln!(
        "killed after {killed_at} acknowledged; {} acknowledged in all, {} failed tries",
        acked.len(),
        failures.load(Ordering::Relaxed)
    );
    assert_eq!(
        acked.len(),
        TASKS,
        "every submission was acknowledged in the end"
    );
    let ids: BTreeSet<u64> = acked.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids.len(), TASKS, "two keys got the same task id");

    let tasks = wait_for(Duration::from_secs(60), "every task completed", || {
        let all = all_tasks(&hub);
        let missing: Vec<u64> = ids
            .iter()
            .filter(|id| !all.contains_key(id))
            .copied()
            .collect();
        if !missing.is_empty() {
            panic!("acknowledged tasks missing after the restart: {missing:?}");
        }
        let open: Vec<String> = ids
            .iter()
            .filter_map(|id| {
                let s = all[id]["state"].as_str().unwrap_or("?");
                (s != "completed").then(|| format!("{id}:{s}"))
            })
            .collect();
        if open.is_empty() {
            Ok(all)
        } else {
            Err(format!(
                "{} not completed: {:?}",
                open.len(),
                &open[..open.len().min(10)]
            ))
        }
    });
    eprintln!("all completed {:?} after the restart", restarted.elapsed());
    // Idempotency keys held across the crash: no duplicate tasks.
    assert_eq!(
        tasks.len(),
        TASKS,
        "the hub holds {} tasks for {TASKS} keys",
        tasks.len()
    );
    for id in &ids {
        let t = &tasks[id];
        assert_eq!(t["state"], "completed", "{t}");
    }
    // No task completed twice: every task's history holds exactly one completed attempt.
    let ids: Vec<u64> = ids.into_iter().collect();
    let shows = task_shows(&hub, &ids);
    assert_eq!(shows.len(), TASKS, "task show answered for every task");
    for t in shows.values() {
        assert_eq!(completed_attempts(t), 1, "{t}");
        assert_eq!(t["attempts_not_shown"], 0, "{t}");
    }
    drop(fleet);
}

// === coordination cost ===

/// `stats --json` once `finished` has reached `n` and the last delayed Ack is out.
fn stats_when_finished(hub: &Hub, n: usize) -> Value {
    // Acks may be held back up to a second to be shared: two heartbeats (1 s
    // apart here) later, the hub's ticks have sent the last one.
    await_heartbeats(hub, 2);
    wait_for(TASK_END, &format!("{n} tasks counted finished"), || {
        let s = hub.json(&["stats"]);
        if s["finished"].as_u64() == Some(n as u64) {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
}

/// Happy path: Assign, Accepted, Started, Finished and one Ack per task (the
/// hub counts task messages only, not the session's hello and welcome). Phase 1
/// is a queue of work (acknowledgements of concurrent tasks may share an Ack) and
/// checks the hub's own figure; phase 2 runs tasks one by one and checks the
/// marginal cost of a task.
#[test]
fn happy_path_costs_at_most_five_messages_per_task() {
    const BURST: usize = 20;
    const ONE_BY_ONE: usize = 10;
    let hub = hub_with(&[]);
    let mut sc = sidecar(&hub, "frugal", &[]);
    sc.set_slots(&hub, 2);
    go_online(&hub, &mut sc);

    // Phase 1: a queue of work.
    let out = hub.cli(&["agent", "drain", "frugal"]);
    assert!(out.status.success(), "drain: {}", stderr(&out));
    let ids: Vec<u64> = (0..BURST)
        .map(|i| submit(&hub, &format!("queued {i}"), &[]))
        .collect();
    let out = hub.cli(&["agent", "undrain", "frugal"]);
    assert!(out.status.success(), "undrain: {}", stderr(&out));
    for id in &ids {
        wait_completed(&hub, *id);
    }
    let stats = stats_when_finished(&hub, BURST);
    let per = stats["messages_per_finished_task"]
        .as_f64()
        .expect("messages_per_finished_task");
    eprintln!(
        "queue of {BURST}: messages_per_finished_task = {per} ({} messages, {} bytes per task)",
        stats["messages"], stats["bytes_per_finished_task"]
    );
    assert!(per <= 5.0, "{per} messages per finished task: {stats}");
    assert!(per >= 3.0, "implausibly few messages counted: {stats}");

    // Phase 2: one task at a time.
    let before = stats["messages"].as_u64().expect("messages");
    for i in 0..ONE_BY_ONE {
        let id = submit(&hub, &format!("alone {i}"), &[]);
        wait_completed(&hub, id);
    }
    let stats = stats_when_finished(&hub, BURST + ONE_BY_ONE);
    let after = stats["messages"].as_u64().expect("messages");
    let marginal = (after - before) as f64 / ONE_BY_ONE as f64;
    eprintln!(
        "one by one: {marginal} messages per task; overall messages_per_finished_task = {}",
        stats["messages_per_finished_task"]
    );
    assert!(
        marginal <= 5.0,
        "a task run alone cost {marginal} messages: {stats}"
    );
}

// === roles ===

#[test]
fn operator_reads_only_and_an_agent_credential_does_neither() {
    let hub = hub_with(&[]);
    let sc = sidecar(&hub, "agent1", &[]);
    let id = submit(&hub, "existing", &[]);
    let before = all_tasks(&hub).len();

    // The operator's machine logs in.
    let ops = hub.root().join("ops.toml");
    let token = hub.token("operator");
    let out = run_bounded(
        &mut hub_cmd(&[
            "login",
            "--token",
            &token,
            "--save-to",
            &ops.to_string_lossy(),
            "--name",
            "ops1",
            "--role",
            "operator",
        ]),
        CLI,
    );
    assert!(out.status.success(), "login: {}", stderr(&out));

    // A credential file made of the sidecar's own certificate and key.
    let agent = hub.root().join("agent.toml");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let read = |f: &str| {
            std::fs::read_to_string(sc.data_dir().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"))
        };
        let text = format!(
            "hub = \"{}\"\nca = '''\n{}'''\ncert = '''\n{}'''\nkey = '''\n{}'''\n",
            hub.addr(),
            read("ca.crt"),
            read("sidecar.crt"),
            read("sidecar.key")
        );
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&agent)
            .expect("create agent.toml");
        std::io::Write::write_all(&mut f, text.as_bytes()).expect("write agent.toml");
    }

    let as_cred = |cred: &Path, args: &[&str]| {
        let mut all = args.to_vec();
        let c = cred.to_string_lossy().into_owned();
        all.extend(["--credential", &c]);
        run_bounded(&mut hub_cmd(&all), CLI)
    };
    let ids = id.to_string();

    // Operator: reads work.
    for args in [
        &["tasks", "--json"][..],
        &["task", "show", &ids, "--json"],
        &["agents", "--json"],
        &["stats", "--json"],
    ] {
        let out = as_cred(&ops, args);
        assert!(out.status.success(), "operator {args:?}: {}", stderr(&out));
        let _: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("operator {args:?} printed no JSON ({e})"));
    }
    // Operator: writes are refused, naming the role.
    for args in [
        &["submit", "--title", "not allowed"][..],
        &["task", "cancel", &ids],
        &["task", "requeue", &ids],
    ] {
        let out = as_cred(&ops, args);
        assert!(!out.status.success(), "operator {args:?} succeeded");
        let err = stderr(&out);
        assert!(
            err.contains("ops1") && err.contains("role operator"),
            "operator {args:?}: {err}"
        );
    }
    // Agent: neither reads nor writes.
    for args in [
        &["tasks", "--json"][..],
        &["task", "show", &ids, "--json"],
        &["submit", "--title", "not allowed either"],
        &["task", "cancel", &ids],
    ] {
        let out = as_cred(&agent, args);
        assert!(
            !out.status.success(),
            "agent {args:?} succeeded: {}",
            stdout(&out)
        );
        let err = stderr(&out);
        assert!(
            err.contains("role agent"),
            "agent {args:?} should be refused for its role: {err}"
        );
    }
    // Nothing was submitted or cancelled by them.
    assert_eq!(all_tasks(&hub).len(), before);
    let t = show(&hub, id);
    assert_eq!(t["state"], "queued", "{t}");
    assert_eq!(t["audit"].as_array().map(Vec::len), Some(1), "{t}");
}

// === hostile task text ===

#[test]
fn shell_metacharacters_reach_the_agent_byte_for_byte_and_never_run() {
    let hub = hub_with(&[]);
    let mut sc = sidecar(&hub, "literal", &[]);
    let dir = sc.root().to_path_buf();
    let canary = std::env::temp_dir().join(format!("muster-canary-{}", noise_hex(6)));
    let canary2 = std::env::temp_dir().join(format!("muster-canary-{}", noise_hex(6)));
    let script = agent_script(
        &sc,
        "agent.sh",
        &format!(
            "#!/bin/sh\ncp \"$MUSTER_TASK_FILE\" '{}/got-'\"$MUSTER_TASK_ID\".json\n",
            dir.display()
        ),
    );
    use_command(&sc, &script);
    go_online(&hub, &mut sc);

    let title = format!(
        "\"; rm -rf / # $(touch {}) `touch {}` ' \\ ${{IFS}} | & ; > < * ?",
        canary.display(),
        canary2.display()
    );
    let description = format!(
        "line one\n\"; touch {c} #\n$(touch {c})\n`touch {c2}`\n'$HOME' && || ;; \\n \\\\ \t tab\r\nünïcödé ✓ $((1+1)) !! ~ %s %n\n\n",
        c = canary.display(),
        c2 = canary2.display()
    );
    let titles_with_newline = format!("two\nlines $(touch {})", canary.display());
    let cases = [
        (title.clone(), description.clone()),
        (titles_with_newline, "`id`; $(id)".to_string()),
    ];
    for (title, description) in &cases {
        let id = submit(&hub, title, &["--description", description]);
        let t = wait_completed(&hub, id);
        assert_eq!(t["title"].as_str(), Some(title.as_str()), "{t}");
        assert_eq!(t["description"].as_str(), Some(description.as_str()), "{t}");
        let got = dir.join(format!("got-{id}.json"));
        let text = std::fs::read(&got).unwrap_or_else(|e| panic!("{}: {e}", got.display()));
        let v: Value = serde_json::from_slice(&text).expect("task.json is JSON");
        assert_eq!(v["title"].as_str(), Some(title.as_str()), "{v}");
        assert_eq!(v["description"].as_str(), Some(description.as_str()), "{v}");
        assert_eq!(v["id"], id, "{v}");
    }
    // Also from a file, where nothing passes through an argv at all.
    let file = dir.join("desc.txt");
    std::fs::write(&file, &description).expect("write desc.txt");
    let id = submit(
        &hub,
        &title,
        &["--description-file", &file.to_string_lossy()],
    );
    wait_completed(&hub, id);
    let v: Value = serde_json::from_slice(
        &std::fs::read(dir.join(format!("got-{id}.json"))).expect("the agent's copy"),
    )
    .expect("JSON");
    assert_eq!(v["description"].as_str(), Some(description.as_str()));
    for c in [&canary, &canary2] {
        assert!(
            !c.exists(),
            "{} was created: task text was executed",
            c.display()
        );
    }
}

// === idempotency and pagination ===

#[test]
fn idempotency_key_and_pagination_without_repeats_or_gaps() {
    let hub = hub_with(&[]);
    let mut sc = sidecar(&hub, "pager", &[]);
    sc.set_slots(&hub, 3);
    go_online(&hub, &mut sc);

    let a = submit(&hub, "keyed", &["--key", "K-1"]);
    let b = submit(&hub, "keyed again", &["--key", "K-1"]);
    assert_eq!(a, b, "the same key returned another task");
    let c = submit(&hub, "other key", &["--key", "K-2"]);
    assert_ne!(a, c);
    let mut ids = vec![a, c];
    for i in 0..5 {
        ids.push(submit(&hub, &format!("page me {i}"), &[]));
    }
    // One task that is not completed, which the state filter must leave out.
    let stuck = submit(&hub, "stuck", &["--capability", "nobody-has-this"]);
    for id in &ids {
        wait_completed(&hub, *id);
    }
    assert_eq!(
        all_tasks(&hub).len(),
        ids.len() + 1,
        "the repeat made a task"
    );
    let t = show(&hub, a);
    assert_eq!(t["title"], "keyed", "the first submission stands: {t}");

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut args = vec!["tasks", "--state", "completed", "--limit", "2"];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c.as_str()]);
        }
        let v = hub.json(&args);
        let page: Vec<u64> = v["tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                assert_eq!(t["state"], "completed", "{t}");
                t["id"].as_u64().expect("an id")
            })
            .collect();
        assert!(page.len() <= 2, "page longer than --limit: {v}");
        seen.extend(page);
        pages += 1;
        assert!(pages <= 10, "pagination does not end: {seen:?}");
        match v["next_cursor"].as_u64() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let unique: BTreeSet<u64> = seen.iter().copied().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "a task repeated across pages: {seen:?}"
    );
    let want: BTreeSet<u64> = ids.iter().copied().collect();
    assert_eq!(unique, want, "pages: {seen:?}");
    assert!(!unique.contains(&stuck));
    // Newest first.
    let mut sorted = seen.clone();
    sorted.sort_unstable_by(|x, y| y.cmp(x));
    assert_eq!(seen, sorted, "not newest first: {seen:?}");
}

/// A sidecar stopped with SIGTERM after its work was acknowledged leaves an
/// empty queue: the forgetting it held for its next flushed commit (an
/// acknowledgement commits nothing on its own) is flushed by the drain, so the
/// next start replays nothing the hub already has.
#[test]
fn a_drained_sidecar_leaves_nothing_acknowledged_in_its_queue() {
    let hub = hub_with(&[]);
    let mut sc = sidecar(&hub, "drained1", &[]);
    let script = agent_script(&sc, "agent.sh", "#!/bin/sh\nexit 0\n");
    use_command(&sc, &script);
    go_online(&hub, &mut sc);
    for i in 0..3 {
        let out = hub.cli(&["submit", "--title", &format!("drained {i}"), "--wait"]);
        assert!(out.status.success(), "submit --wait: {}", stderr(&out));
    }
    let status = sc.stop();
    assert!(status.success(), "SIGTERM: {status}");
    let queue =
        muster_sidecar::queue::Queue::open(&sc.data_dir().join(muster_sidecar::queue::DB_FILE))
            .expect("the queue opens after the sidecar stopped");
    let left = queue.load().expect("the queue reads");
    assert!(
        left.tasks.is_empty(),
        "tasks left after a drain: {:?}",
        left.tasks
    );
    assert!(
        left.outbox.is_empty(),
        "reports left after a drain: {:?}",
        left.outbox
    );
}
