//! Task and agent helpers shared by the black-box suites: agent scripts, the
//! agent command, submissions and the `task show` documents they are judged by.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::{Hub, Sidecar, bins, wait_for, write_script};

/// How long a fresh sidecar may take to connect and show up online.
pub const ONLINE: Duration = Duration::from_secs(30);

/// An enrolled sidecar in exec mode with a short settle time and stop grace; not started.
pub fn sidecar(hub: &Hub, name: &str, caps: &[&str]) -> Sidecar {
    let sc = Sidecar::enroll(hub, name, caps);
    sc.set_agent("settle", "\"100ms\"");
    sc.set_agent("stop_grace", "\"2s\"");
    sc
}

/// Starts `sc` and waits until the hub lists it online.
pub fn go_online(hub: &Hub, sc: &mut Sidecar) {
    sc.start_connected(ONLINE);
    hub.wait_agent_state(sc.name(), "online", ONLINE);
}

/// A TOML argv array of plain strings.
pub fn argv(items: &[&str]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| Value::String((*s).to_string()).to_string())
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// Writes `body` as an executable script in the sidecar's temporary directory.
pub fn agent_script(sc: &Sidecar, name: &str, body: &str) -> PathBuf {
    let path = sc.root().join(name);
    write_script(&path, body);
    path
}

/// Makes `script` the sidecar's agent command.
pub fn use_command(sc: &Sidecar, script: &Path) {
    sc.set_agent("command", &argv(&[&script.to_string_lossy()]));
}

/// The sidecar binary, single-quoted for a shell script.
pub fn sidecar_bin() -> String {
    format!("'{}'", bins().sidecar.display())
}

/// `submit --title T <extra> --json` with the admin credential; returns the id.
///
/// # Panics
/// When the submission fails or prints no id.
pub fn submit(hub: &Hub, title: &str, extra: &[&str]) -> u64 {
    let mut args = vec!["submit", "--title", title];
    args.extend_from_slice(extra);
    let v = hub.json(&args);
    v["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("submit printed no id: {v}"))
}

/// `task show ID --json`.
pub fn show(hub: &Hub, id: u64) -> Value {
    hub.json(&["task", "show", &id.to_string()])
}

/// The attempt history of a `task show` document.
pub fn attempts(t: &Value) -> Vec<Value> {
    t["attempt_history"].as_array().cloned().unwrap_or_default()
}

/// Outcomes of a task's attempts, in generation order.
pub fn outcomes(t: &Value) -> Vec<String> {
    attempts(t)
        .iter()
        .map(|a| a["outcome"].as_str().unwrap_or("-").to_string())
        .collect()
}

/// Waits until task `id` is in one of `states`; returns its `task show`.
///
/// # Panics
/// When it is not within `timeout`.
pub fn wait_state(hub: &Hub, id: u64, states: &[&str], timeout: Duration) -> Value {
    wait_for(timeout, &format!("task {id} in {states:?}"), || {
        let t = show(hub, id);
        if states.iter().any(|s| t["state"] == *s) {
            Ok(t)
        } else {
            Err(t.to_string())
        }
    })
}

/// How long a short task may take to end on a loaded 2-core machine.
pub const ENDED: Duration = Duration::from_secs(60);

/// Waits until task `id` is terminal and every attempt has an outcome; returns its `task show`.
///
/// # Panics
/// When it is not within [`ENDED`].
pub fn wait_ended(hub: &Hub, id: u64) -> Value {
    wait_for(ENDED, &format!("task {id} ended"), || {
        let t = show(hub, id);
        let terminal = ["completed", "failed", "cancelled"]
            .iter()
            .any(|s| t["state"] == *s);
        if terminal && attempts(&t).iter().all(|a| a["outcome"].is_string()) {
            Ok(t)
        } else {
            Err(t.to_string())
        }
    })
}

/// Milliseconds since the epoch (the hub's clock is the same machine's).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // "pid (comm) S …": the state follows the last ')'.
            let state = stat
                .rfind(')')
                .and_then(|i| stat.get(i + 1..))
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or("?");
            state != "Z" && state != "X"
        }
    }
}

/// Reads a pid an agent script wrote.
pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}
