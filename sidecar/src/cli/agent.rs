//! The commands that talk to the running sidecar over its local socket: the
//! agent's `task …` commands, `status` and `whoami`.

use std::path::{Path, PathBuf};

use super::{DEFAULT_DATA_DIR, Failure, TaskCommand, fail};
use crate::core::AgentCmd;
use crate::local::{self, AgentRequest, Request};

/// `status`: what the running sidecar says about itself.
pub(super) async fn status(json: bool, data_dir: &Path) -> Result<(), Failure> {
    let a = local::call(
        &socket(Some(data_dir)),
        &Request::Query {
            cmd: "status".into(),
        },
    )
    .await
    .map_err(fail)?;
    if json {
        println!("{}", a.data);
    } else {
        print!("{}", status_text(&a.data));
    }
    Ok(())
}

/// The `status` answer for people: the sidecar in one row, then its tasks.
fn status_text(d: &serde_json::Value) -> String {
    use muster_protocol::human::table;
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let connection = if d["connected"] == true {
        "connected"
    } else {
        "disconnected"
    };
    let mut out = table(
        &[
            "AGENT",
            "HUB",
            "CONNECTION",
            "STATE",
            "FREE SLOTS",
            "OUTBOX",
        ],
        &[[
            text(&d["name"]),
            text(&d["hub"]),
            connection.to_string(),
            text(&d["state"]),
            format!("{} of {}", text(&d["free_slots"]), text(&d["slots"])),
            text(&d["outbox"]),
        ]],
    );
    let rows: Vec<[String; 5]> = d["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            [
                text(&t["id"]),
                text(&t["generation"]),
                text(&t["phase"]),
                text(&t["pid"]),
                text(&t["title"]),
            ]
        })
        .collect();
    out.push('\n');
    if rows.is_empty() {
        out.push_str("no tasks\n");
    } else {
        out.push_str(&table(&["TASK", "GEN", "PHASE", "PID", "TITLE"], &rows));
    }
    out
}

/// `whoami`: this agent's name and hub, and the task variables in the environment.
pub(super) async fn whoami(json: bool) -> Result<(), Failure> {
    let a = local::call(
        &socket(None),
        &Request::Query {
            cmd: "whoami".into(),
        },
    )
    .await
    .map_err(fail)?;
    let vars = [
        "MUSTER_TASK_ID",
        "MUSTER_GENERATION",
        "MUSTER_TASK_FILE",
        "MUSTER_PROMPT_FILE",
        "MUSTER_WORKSPACE",
        "MUSTER_BRANCH",
        "MUSTER_BASE",
    ];
    let env: serde_json::Map<String, serde_json::Value> = vars
        .iter()
        .filter_map(|var| std::env::var(var).ok().map(|v| (var.to_string(), v.into())))
        .collect();
    if json {
        let doc = serde_json::json!({"agent": a.data["name"], "hub": a.data["hub"], "env": env});
        println!("{doc}");
        return Ok(());
    }
    println!(
        "agent {}  hub {}",
        a.data["name"].as_str().unwrap_or("?"),
        a.data["hub"].as_str().unwrap_or("?")
    );
    for (var, v) in &env {
        println!("{var}={}", v.as_str().unwrap_or_default());
    }
    Ok(())
}

/// The local socket: `$MUSTER_SOCKET` (set for agents), else the state directory's.
fn socket(data_dir: Option<&Path>) -> PathBuf {
    match (std::env::var_os("MUSTER_SOCKET"), data_dir) {
        (_, Some(d)) => d.join(local::SOCKET_FILE),
        (Some(s), None) => PathBuf::from(s),
        (None, None) => Path::new(DEFAULT_DATA_DIR).join(local::SOCKET_FILE),
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The attempt as `task.json` records it (the file is the sidecar's, 0600).
#[derive(serde::Deserialize)]
struct TaskFile {
    id: u64,
    generation: u64,
    token: String,
    socket: Option<PathBuf>,
}

/// Largest task.json read back: the task text is in it.
const TASK_FILE_BYTES_MAX: u64 = 1 << 20;

fn read_task_file(path: &Path) -> Result<TaskFile, Failure> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(TASK_FILE_BYTES_MAX).read_to_string(&mut text))
        .map_err(|e| fail(format!("--task-file {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| {
        fail(format!(
            "--task-file {}: not a muster task.json ({e}); give the {{task_file}} of the attempt",
            path.display()
        ))
    })
}

/// `task …`: one agent command about its own attempt, which the environment
/// (or `--task-file`) names.
pub(super) async fn task(command: TaskCommand, task_file: Option<&Path>) -> Result<(), Failure> {
    let cmd = match command {
        TaskCommand::Current => AgentCmd::Current,
        TaskCommand::Start => AgentCmd::Start,
        TaskCommand::Progress { message } => AgentCmd::Progress { message },
        TaskCommand::Complete { result, link } => AgentCmd::Complete { result, link },
        TaskCommand::Fail { reason, no_retry } => AgentCmd::Fail { reason, no_retry },
        TaskCommand::Usage {
            input_tokens,
            output_tokens,
            cache_read_tokens,
            cache_write_tokens,
            cost_usd,
            model,
        } => AgentCmd::Usage(muster_protocol::msg::Usage {
            model,
            input_tokens,
            output_tokens,
            cache_read_tokens,
            cache_write_tokens,
            cost_micro_usd: match cost_usd {
                Some(text) => Some(crate::transcript::micro_usd(&text).ok_or_else(|| {
                    fail(format!(
                        "--cost-usd {text:?} is not an amount of dollars; give e.g. 0.0421"
                    ))
                })?),
                None => None,
            },
        }),
    };
    let current = matches!(cmd, AgentCmd::Current);
    // The attempt and its secret come from the environment the sidecar gave
    // the agent, never from the command line, where `ps` would show the token.
    let (req, socket) = match task_file {
        Some(path) => {
            let f = read_task_file(path)?;
            let socket = f.socket.unwrap_or_else(|| socket(None));
            let req = AgentRequest {
                task: Some(f.id),
                generation: Some(f.generation),
                token: Some(f.token),
                cmd,
            };
            (req, socket)
        }
        None => {
            let req = AgentRequest {
                task: env_u64("MUSTER_TASK_ID"),
                generation: env_u64("MUSTER_GENERATION"),
                token: std::env::var("MUSTER_TASK_TOKEN").ok(),
                cmd,
            };
            (req, socket(None))
        }
    };
    let a = local::call(&socket, &Request::Agent(req))
        .await
        .map_err(fail)?;
    if !a.ok {
        return Err(fail(a.message));
    }
    // A confirmation goes to stderr: an agent's stdout is its captured output,
    // which a progress note must not land in.
    if current {
        println!("{}", a.data);
    } else {
        eprintln!("{}", a.message);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_two_tables_with_titles_escaped() {
        let d = serde_json::json!({
            "name": "build-01", "hub": "hub.example.net:7440", "connected": true,
            "state": "ready", "slots": 2, "free_slots": 1, "outbox": 0,
            "tasks": [{"id": 7, "generation": 2, "phase": "running", "pid": 4321,
                       "title": "fix\u{1b}[2J the build"}],
        });
        let t = status_text(&d);
        assert!(!t.contains('\u{1b}'), "{t}");
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("AGENT"), "{t}");
        assert!(
            lines[1].contains("connected") && lines[1].contains("1 of 2"),
            "{t}"
        );
        assert!(lines[3].starts_with("TASK"), "{t}");
        assert!(
            lines[4].starts_with('7') && lines[4].contains("running"),
            "{t}"
        );
        assert_eq!(lines[3].find("PHASE"), lines[4].find("running"), "{t}");
        let idle = status_text(&serde_json::json!({"connected": false, "tasks": []}));
        assert!(
            idle.contains("disconnected") && idle.contains("no tasks"),
            "{idle}"
        );
    }
}
