//! Issue 4, the "looks alive" cases (agent-scheduler-pitfalls.md, pitfall 7):
//! a sidecar can be connected while the agent behind it is useless. Each case
//! runs against the real binaries on 127.0.0.1 and asserts its outcome and that
//! the outcome arrived within the policy time plus some slack, printing the
//! measured time:
//!
//! | case | outcome | when |
//! |---|---|---|
//! | wake command fails | attempt `wake_failed` | at once |
//! | wake ok, agent-ack never sent | `start_timeout` | hub `start_timeout` after acceptance |
//! | wake ok, verified process never appears | `start_timeout` | sidecar `[agent] start_timeout` |
//! | verified agent vanishes without a report | `agent_exited` | about one probe (heartbeat) interval |
//! | agent hangs: alive, no progress | `stalled` alert, task still running | `stall_alert` after the start |
//! | sidecar dies (kill -9, stays dead) | `lost`, re-queued to another sidecar | idle timeout + `lost_grace` |
//! | hub restarts (kill -9, start) | nothing: the same attempt completes | sidecar back within the grace |
//!
//! Times are taken from the hub's own attempt timestamps (milliseconds since
//! the epoch, same machine) where it records them, so polling latency does not
//! count against the hub.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use muster_tests::tasks::*;
use muster_tests::{Hub, Sidecar, noise_hex, wait_for, wait_until, write_script};
use serde_json::Value;

/// Slack on top of a policy time: hub ticks (250 ms), probe polls (200 ms),
/// a report's trip, and a 2-core CI machine that other test binaries load
/// (the figure each test prints is what to compare with the policy).
const SLACK_MS: u64 = 6000;
/// Heartbeat interval of every hub here (also the wake-mode probe interval).
const HEARTBEAT_MS: u64 = 1000;

// === helpers ===

/// A hub (heartbeat 1 s, quick retries) with `policy` edits, started.
fn hub_with(policy: &[(&str, &str)]) -> Hub {
    let mut hub = Hub::init();
    hub.set_policy("heartbeat_interval", &format!("\"{HEARTBEAT_MS}ms\""));
    hub.set_policy("backoff_initial", "\"200ms\"");
    for (k, v) in policy {
        hub.set_policy(k, v);
    }
    hub.start();
    hub
}

/// An enrolled sidecar running `script` (exec mode unless changed); not started.
fn sidecar(hub: &Hub, name: &str, script_body: &str) -> Sidecar {
    let sc = Sidecar::enroll(hub, name, &[]);
    let path = sc.root().join("agent.sh");
    write_script(&path, script_body);
    sc.set_agent("command", &argv(&[&path.to_string_lossy()]));
    sc.set_agent("settle", "\"100ms\"");
    sc.set_agent("stop_grace", "\"2s\"");
    sc
}

/// Switches a sidecar to wake mode with `verify` and the sidecar's own start timeout.
fn wake_mode(sc: &Sidecar, verify: &str, start_timeout: &str) {
    sc.set_agent("mode", "\"wake\"");
    sc.set_agent("verify", &format!("\"{verify}\""));
    sc.set_agent("start_timeout", &format!("\"{start_timeout}\""));
}

/// Waits until attempt `n` (0-based) of task `id` has ended; returns the task.
fn wait_attempt_ended(hub: &Hub, id: u64, n: usize, timeout: Duration) -> Value {
    wait_for(
        timeout,
        &format!("attempt {} of task {id} ended", n + 1),
        || {
            let t = show(hub, id);
            match attempts(&t).get(n) {
                Some(a) if a["outcome"].is_string() => Ok(t),
                _ => Err(t.to_string()),
            }
        },
    )
}

/// Waits until task `id` is running (its start verified); returns the task.
fn wait_running(hub: &Hub, id: u64, timeout: Duration) -> Value {
    wait_for(timeout, &format!("task {id} running"), || {
        let t = show(hub, id);
        if t["state"] == "running" {
            Ok(t)
        } else {
            Err(t.to_string())
        }
    })
}

/// Waits until task `id` is in a terminal state; returns the task.
fn wait_terminal(hub: &Hub, id: u64, timeout: Duration) -> Value {
    wait_for(timeout, &format!("task {id} terminal"), || {
        let t = show(hub, id);
        if ["completed", "failed", "cancelled"]
            .iter()
            .any(|s| t["state"] == *s)
        {
            Ok(t)
        } else {
            Err(t.to_string())
        }
    })
}

/// A millisecond field of an attempt.
fn ms(a: &Value, field: &str) -> u64 {
    a[field]
        .as_u64()
        .unwrap_or_else(|| panic!("the attempt has no {field}: {a}"))
}

/// Asserts `measured` is within `[expected - early, expected + SLACK_MS]` and prints it.
fn assert_timely(case: &str, measured: u64, expected: u64, early: u64) {
    eprintln!("{case}: {measured} ms (policy {expected} ms, slack {SLACK_MS} ms)");
    assert!(
        measured + early >= expected,
        "{case}: after {measured} ms, before the policy's {expected} ms"
    );
    assert!(
        measured <= expected + SLACK_MS,
        "{case}: after {measured} ms, later than the policy's {expected} ms + {SLACK_MS} ms slack"
    );
}

/// SIGKILL to a process group (agent runs live in their own).
fn kill_group(pgid: u64) {
    if pgid > 1 {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// SIGKILL to one process.
fn kill_pid(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// An exec agent that writes its pid, then waits (at most `max_s` seconds) for
/// `<dir>/go`; with `progress`, it reports progress once `<dir>/nudge` appears.
/// It looks twice a second: a `sleep` forked ten times a second costs about
/// the 2 % of a core (`CPU_BUSY_PERMILLE`) that counts as busy on a loaded
/// machine, which would put off its stall by seconds.
fn waiting_agent(dir: &Path, max_s: u32, progress: bool) -> String {
    let nudge = if progress {
        format!(
            "  if [ -e '{d}/nudge' ] && [ ! -e '{d}/nudged' ]; then\n    {sc} task progress 'moving again' > '{d}/progress.out' 2>&1; echo $? > '{d}/nudged'\n  fi\n",
            d = dir.display(),
            sc = sidecar_bin()
        )
    } else {
        String::new()
    };
    format!(
        "#!/bin/sh\necho $$ > '{d}/agent.pid'\ni=0\nwhile [ ! -e '{d}/go' ] && [ $i -lt {n} ]; do\n{nudge}  sleep 0.5\n  i=$((i+1))\ndone\nexit 0\n",
        d = dir.display(),
        n = max_s * 2,
    )
}

// === wake command fails ===

#[test]
fn wake_command_that_fails_ends_the_attempt_wake_failed_at_once() {
    let hub = hub_with(&[]);
    let mut sc = sidecar(
        &hub,
        "wakefail",
        "#!/bin/sh\necho 'openclaw: wake endpoint returned 500' >&2\nexit 7\n",
    );
    wake_mode(&sc, "agent-ack", "30s");
    go_online(&hub, &mut sc);

    let id = submit(&hub, "wake me", &["--max-attempts", "1"]);
    let t = wait_attempt_ended(&hub, id, 0, Duration::from_secs(15));
    let a = &attempts(&t)[0];
    assert_eq!(a["outcome"], "wake_failed", "{t}");
    assert_eq!(
        a["error"]["exit_code"], 7,
        "the wake command's exit code: {t}"
    );
    assert!(
        a["error"]["stderr_tail"]
            .as_str()
            .unwrap_or_default()
            .contains("returned 500"),
        "the wake command's stderr: {t}"
    );
    assert!(a["started_at"].is_null(), "never started: {t}");
    assert_timely(
        "wake_failed after assignment",
        ms(a, "ended_at") - ms(a, "assigned_at"),
        0,
        0,
    );
    let t = wait_terminal(&hub, id, Duration::from_secs(10));
    assert_eq!(t["state"], "failed", "one attempt allowed: {t}");
}

// === wake succeeds, the agent never starts ===

#[test]
fn agent_ack_that_never_comes_is_start_timeout_after_the_hubs_start_timeout() {
    const START_MS: u64 = 3000;
    let hub = hub_with(&[("start_timeout", &format!("\"{START_MS}ms\""))]);
    // The wake "succeeds" but nobody ever runs `muster-sidecar task start`.
    let mut sc = sidecar(&hub, "noack", "#!/bin/sh\nexit 0\n");
    wake_mode(&sc, "agent-ack", "60s");
    go_online(&hub, &mut sc);

    let id = submit(&hub, "never acknowledged", &["--max-attempts", "1"]);
    let t = wait_attempt_ended(&hub, id, 0, Duration::from_secs(20));
    let a = &attempts(&t)[0];
    assert_eq!(a["outcome"], "start_timeout", "{t}");
    assert!(a["started_at"].is_null(), "never started: {t}");
    let accepted = ms(a, "accepted_at");
    assert_timely(
        "start_timeout (agent-ack) after acceptance",
        ms(a, "ended_at") - accepted,
        START_MS,
        100,
    );
    let t = wait_terminal(&hub, id, Duration::from_secs(10));
    assert_eq!(t["state"], "failed", "{t}");
}

#[test]
fn verified_process_that_never_appears_is_start_timeout_after_the_sidecars_start_timeout() {
    const SIDECAR_START_MS: u64 = 2000;
    // The hub would wait far longer: the sidecar's own verification decides.
    let hub = hub_with(&[("start_timeout", "\"30s\"")]);
    let mut sc = sidecar(&hub, "noproc", "#!/bin/sh\nexit 0\n");
    let pattern = format!("never-seen-{}", noise_hex(6));
    wake_mode(&sc, "process", &format!("{SIDECAR_START_MS}ms"));
    sc.set_agent("verify_process", &format!("\"{pattern}\""));
    go_online(&hub, &mut sc);

    let id = submit(&hub, "never appears", &["--max-attempts", "1"]);
    let t = wait_attempt_ended(&hub, id, 0, Duration::from_secs(20));
    let a = &attempts(&t)[0];
    assert_eq!(a["outcome"], "start_timeout", "{t}");
    let reason = a["error"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&pattern),
        "the reason names the pattern: {t}"
    );
    assert_timely(
        "start_timeout (verify = process) after acceptance",
        ms(a, "ended_at") - ms(a, "accepted_at"),
        SIDECAR_START_MS,
        100,
    );
}

// === the agent dies mid-task without reporting ===

#[test]
fn verified_agent_that_vanishes_is_agent_exited_within_a_probe_interval() {
    let hub = hub_with(&[]);
    let probe_name = format!("mprobe-{}", noise_hex(4));
    let mut sc = sidecar(&hub, "vanish", "#!/bin/sh\nexit 0\n");
    let dir = sc.root().to_path_buf();
    let probe = dir.join(&probe_name);
    std::fs::copy("/bin/sleep", &probe).expect("copy /bin/sleep");
    // The wake command leaves the agent (a uniquely named `sleep`) behind and exits 0.
    write_script(
        &dir.join("agent.sh"),
        &format!(
            "#!/bin/sh\n'{probe}' 60 >/dev/null 2>&1 &\necho $! > '{d}/probe.pid'\nexit 0\n",
            probe = probe.display(),
            d = dir.display()
        ),
    );
    wake_mode(&sc, "process", "10s");
    sc.set_agent("verify_process", &format!("\"{probe_name}\""));
    go_online(&hub, &mut sc);

    let id = submit(&hub, "dies quietly", &["--max-attempts", "1"]);
    let t = wait_running(&hub, id, Duration::from_secs(20));
    let pid = read_pid(&dir.join("probe.pid")).expect("the agent's pid");
    assert_eq!(
        attempts(&t)[0]["pid"].as_u64(),
        Some(u64::from(pid)),
        "the verified process is the agent: {t}"
    );
    let killed = now_ms();
    kill_pid(pid);
    let t = wait_attempt_ended(&hub, id, 0, Duration::from_secs(20));
    let a = &attempts(&t)[0];
    assert_eq!(a["outcome"], "agent_exited", "{t}");
    assert!(
        a["error"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains(&probe_name),
        "the reason names the process: {t}"
    );
    assert_timely(
        "agent_exited after the agent was killed",
        ms(a, "ended_at").saturating_sub(killed),
        HEARTBEAT_MS,
        HEARTBEAT_MS,
    );
    let t = wait_terminal(&hub, id, Duration::from_secs(10));
    assert_eq!(t["state"], "failed", "{t}");
}

// === the agent hangs: alive, no progress ===

#[test]
fn hung_agent_raises_a_stall_alert_and_is_not_failed() {
    const STALL_MS: u64 = 3000;
    let hub = hub_with(&[("stall_alert", &format!("\"{STALL_MS}ms\""))]);
    let mut sc = sidecar(&hub, "hung", "#!/bin/sh\nexit 0\n");
    let dir = sc.root().to_path_buf();
    write_script(&dir.join("agent.sh"), &waiting_agent(&dir, 60, true));
    go_online(&hub, &mut sc);

    let id = submit(&hub, "hangs", &[]);
    let t = wait_running(&hub, id, Duration::from_secs(20));
    let started = ms(&attempts(&t)[0], "started_at");
    let subject = id.to_string();
    let stalled = |hub: &Hub| -> Option<Value> {
        let v = hub.json(&["alerts"]);
        v["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["alert"] == "stalled" && a["subject"].as_str() == Some(subject.as_str()))
            .cloned()
    };
    let alert = wait_until(
        Duration::from_millis(STALL_MS + 15_000),
        "a stalled alert",
        || stalled(&hub),
    );
    let seen = now_ms();
    eprintln!("stall alert: {alert}");
    let since = alert["since"].as_u64().expect("the alert's since");
    assert_timely(
        "stalled alert after the start",
        since.saturating_sub(started),
        STALL_MS,
        100,
    );
    eprintln!(
        "stalled alert observed by alerts --json {} ms after the start",
        seen.saturating_sub(started)
    );
    // Not a failure: the task still runs, its one attempt still open.
    let t = show(&hub, id);
    assert_eq!(t["state"], "running", "a stalled task is not failed: {t}");
    let history = attempts(&t);
    assert_eq!(history.len(), 1, "{t}");
    assert!(history[0]["outcome"].is_null(), "{t}");
    let pid = read_pid(&dir.join("agent.pid")).expect("the agent's pid");
    assert!(pid_alive(pid), "the agent is still alive");

    // Progress clears the alert; then the agent finishes normally.
    std::fs::write(dir.join("nudge"), b"").expect("write the nudge file");
    wait_until(
        Duration::from_secs(10),
        "the stalled alert cleared by progress",
        || stalled(&hub).is_none().then_some(()),
    );
    let nudged = std::fs::read_to_string(dir.join("nudged")).unwrap_or_default();
    assert_eq!(
        nudged.trim(),
        "0",
        "task progress: {}",
        std::fs::read_to_string(dir.join("progress.out")).unwrap_or_default()
    );
    std::fs::write(dir.join("go"), b"").expect("write the go file");
    let t = wait_terminal(&hub, id, Duration::from_secs(15));
    assert_eq!(t["state"], "completed", "{t}");
    assert_eq!(attempts(&t).len(), 1, "{t}");
}

// === the sidecar dies ===

#[test]
fn dead_sidecars_work_is_lost_after_the_grace_and_runs_on_another() {
    const GRACE_MS: u64 = 4000;
    let hub = hub_with(&[("lost_grace", &format!("\"{GRACE_MS}ms\""))]);
    let mut doomed = sidecar(&hub, "doomed", "#!/bin/sh\nexit 0\n");
    let dir = doomed.root().to_path_buf();
    write_script(&dir.join("agent.sh"), &waiting_agent(&dir, 60, false));
    let mut spare = sidecar(&hub, "spare", "#!/bin/sh\nsleep 0.2\nexit 0\n");
    go_online(&hub, &mut doomed);

    let id = submit(&hub, "outlives its sidecar", &[]);
    let t = wait_running(&hub, id, Duration::from_secs(20));
    assert_eq!(t["agent"], "doomed", "{t}");
    let pgid = attempts(&t)[0]["pid"].as_u64().unwrap_or(0);
    go_online(&hub, &mut spare);

    doomed.kill9();
    let killed = now_ms();
    let t = wait_attempt_ended(&hub, id, 0, Duration::from_secs(40));
    let first = &attempts(&t)[0];
    // The agent run outlived its sidecar (own process group); stop it now.
    kill_group(pgid);
    assert_eq!(first["outcome"], "lost", "{t}");
    assert_eq!(first["agent"], "doomed", "{t}");
    // The hub notices the dead connection after the QUIC idle timeout, then
    // gives the agent its lost grace.
    let idle = muster_protocol::tls::IDLE_TIMEOUT.as_millis() as u64;
    assert_timely(
        "lost after the sidecar was killed (idle timeout + lost_grace)",
        ms(first, "ended_at").saturating_sub(killed),
        idle + GRACE_MS,
        idle,
    );
    let t = wait_terminal(&hub, id, Duration::from_secs(20));
    assert_eq!(t["state"], "completed", "{t}");
    let history = attempts(&t);
    assert_eq!(history.len(), 2, "{t}");
    assert_eq!(
        history[1]["agent"], "spare",
        "re-queued to the other sidecar: {t}"
    );
    assert_eq!(history[1]["outcome"], "completed", "{t}");
    eprintln!(
        "re-run on spare completed {} ms after the loss",
        ms(&history[1], "ended_at").saturating_sub(ms(first, "ended_at"))
    );
}

// === the hub restarts ===

#[test]
fn hub_restart_leaves_running_work_alone_and_the_same_attempt_completes() {
    // Long enough for a sidecar to notice the dead hub and reconnect.
    const GRACE_MS: u64 = 30_000;
    let mut hub = hub_with(&[("lost_grace", &format!("\"{GRACE_MS}ms\""))]);
    let mut sc = sidecar(&hub, "steady", "#!/bin/sh\nexit 0\n");
    let dir: PathBuf = sc.root().to_path_buf();
    write_script(&dir.join("agent.sh"), &waiting_agent(&dir, 90, false));
    go_online(&hub, &mut sc);

    let id = submit(&hub, "survives a hub restart", &[]);
    let before = wait_running(&hub, id, Duration::from_secs(20));
    let generation = before["generation"].clone();

    hub.kill9();
    let killed = Instant::now();
    hub.start();
    let restarted = killed.elapsed();
    hub.wait_agent_state("steady", "online", Duration::from_millis(GRACE_MS));
    let back = killed.elapsed();
    eprintln!(
        "hub restart: answering {} ms after the kill, sidecar online again after {} ms (grace {GRACE_MS} ms)",
        restarted.as_millis(),
        back.as_millis()
    );
    assert!(
        back < Duration::from_millis(GRACE_MS),
        "the sidecar took longer than the grace to come back"
    );
    // Still the same attempt, still running: nothing re-queued.
    let t = show(&hub, id);
    assert_eq!(t["state"], "running", "{t}");
    assert_eq!(t["generation"], generation, "{t}");
    assert_eq!(attempts(&t).len(), 1, "{t}");

    std::fs::write(dir.join("go"), b"").expect("write the go file");
    let go = now_ms();
    let t = wait_terminal(&hub, id, Duration::from_secs(20));
    assert_eq!(t["state"], "completed", "{t}");
    let history = attempts(&t);
    assert_eq!(history.len(), 1, "the same attempt completed: {t}");
    assert_eq!(history[0]["outcome"], "completed", "{t}");
    assert_eq!(history[0]["generation"], generation, "{t}");
    eprintln!(
        "completed {} ms after the agent was released",
        ms(&history[0], "ended_at").saturating_sub(go)
    );
    assert_eq!(
        hub.agent_state("steady").as_deref(),
        Some("online"),
        "the sidecar stays online"
    );
}
