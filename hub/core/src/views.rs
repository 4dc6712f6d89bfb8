//! JSON documents the CLI prints, with stable field names.

use serde::Serialize;
use serde_json::{Value, json};

use super::{AgentRecord, AttemptRecord, Millis, TaskRecord, TaskState};

/// A task as `tasks --json` and `task show --json` print it.
pub fn task_json(t: &TaskRecord) -> Value {
    serde_json::to_value(TaskView::of(t)).unwrap_or_default()
}

/// [`task_json`] as text, without building the `Value` first (the submit answer).
pub fn task_json_string(t: &TaskRecord) -> String {
    serde_json::to_string(&TaskView::of(t)).unwrap_or_default()
}

/// The fields of [`task_json`], borrowed; keys in alphabetical order, as `json!` printed them.
#[derive(Serialize)]
struct TaskView<'a> {
    after: Vec<u64>,
    agent: &'a Option<String>,
    attempts: u32,
    audit: Vec<AuditView<'a>>,
    base: &'a Option<String>,
    capabilities: &'a [String],
    description: &'a str,
    #[serde(serialize_with = "as_object")]
    env: &'a [(String, String)],
    generation: u64,
    id: u64,
    key: &'a Option<String>,
    #[serde(serialize_with = "as_object")]
    labels: &'a [(String, String)],
    max_attempts: u32,
    not_before: Option<Millis>,
    priority: i32,
    progress_at: Option<Millis>,
    progress_note: &'a Option<String>,
    reason: &'a Option<String>,
    repo: &'a Option<String>,
    result: &'a Option<String>,
    state: &'static str,
    submitted_at: Millis,
    timeout_ms: Option<u64>,
    title: &'a str,
    updated_at: Millis,
}

/// Key-value pairs as a JSON object, in their given order.
fn as_object<S: serde::Serializer>(pairs: &&[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

#[derive(Serialize)]
struct AuditView<'a> {
    action: &'a str,
    at: Millis,
    who: &'a str,
}

impl<'a> TaskView<'a> {
    fn of(t: &'a TaskRecord) -> Self {
        TaskView {
            after: t.after.iter().map(|d| d.0).collect(),
            agent: &t.agent,
            attempts: t.attempts,
            audit: t
                .audit
                .iter()
                .map(|a| AuditView {
                    action: &a.action,
                    at: a.at,
                    who: &a.who,
                })
                .collect(),
            base: &t.base,
            capabilities: &t.capabilities,
            description: &t.description,
            env: &t.env,
            generation: t.generation.0,
            id: t.id.0,
            key: &t.key,
            labels: &t.labels,
            max_attempts: t.max_attempts,
            not_before: t.not_before,
            priority: t.priority,
            progress_at: t.progress_at,
            progress_note: &t.progress_note,
            reason: &t.reason,
            repo: &t.repo,
            result: &t.result,
            state: t.state.as_str(),
            submitted_at: t.submitted_at,
            timeout_ms: t.timeout_ms,
            title: &t.title,
            updated_at: t.updated_at,
        }
    }
}

/// An attempt as `task show --json` prints it.
pub fn attempt_json(a: &AttemptRecord) -> Value {
    json!({
        "generation": a.generation.0,
        "agent": a.agent,
        "assigned_at": a.assigned_at,
        "accepted_at": a.accepted_at,
        "started_at": a.started_at,
        "ended_at": a.ended_at,
        "outcome": a.outcome.map(|o| o.as_str()),
        "pid": a.pid,
        "session": a.session,
        "work": a.work,
        "error": a.error.as_ref().map(|e| json!({
            "reason": e.reason,
            "exit_code": e.exit_code,
            "signal": e.signal,
            "command": e.command,
            "stdout_tail": e.stdout_tail,
            "stderr_tail": e.stderr_tail,
            "no_retry": e.no_retry,
        })),
    })
}

/// A task state change for the event log and `watch`.
///
/// Written once per transition on the core thread, so it is serialized straight
/// from borrowed fields (no intermediate `Value` map); keys stay in the
/// alphabetical order `json!` printed before.
pub fn task_event_json(t: &TaskRecord, from: TaskState, why: &str) -> String {
    #[derive(Serialize)]
    struct TaskEvent<'a> {
        agent: Option<&'a str>,
        from: &'static str,
        generation: u64,
        id: u64,
        kind: &'static str,
        state: &'static str,
        title: &'a str,
        why: &'a str,
    }
    serde_json::to_string(&TaskEvent {
        agent: t.agent.as_deref(),
        from: from.as_str(),
        generation: t.generation.0,
        id: t.id.0,
        kind: "task",
        state: t.state.as_str(),
        title: &t.title,
        why,
    })
    .unwrap_or_default()
}

/// An agent as `agents --json` and `agent show --json` print it.
#[allow(clippy::too_many_arguments)]
pub fn agent_json(
    a: &AgentRecord,
    state: &str,
    why: &str,
    available: bool,
    unavailable_reason: &str,
    running: usize,
    now: Millis,
) -> Value {
    json!({
        "name": a.name,
        "state": state,
        "why": why,
        "available": available,
        "unavailable_reason": unavailable_reason,
        "version": a.version,
        "capabilities": a.capabilities,
        "slots": a.slots,
        "tasks": running,
        "drained": a.drained,
        "revoked": a.revoked,
        "last_heartbeat_age_ms": a.last_seen.map(|t| now.saturating_sub(t)),
        "host": a.host,
        "self_test": a.self_test,
        "enrolled_at": a.enrolled_at,
    })
}

/// The list of agents.
pub fn agents_json(agents: Vec<Value>) -> Value {
    json!({ "agents": agents })
}

/// Bytes of listed documents in one operator answer (a frame is at most 1 MiB;
/// the rest of the answer and its framing fit in what is left).
pub const REPLY_BYTES_MAX: usize = 768 * 1024;

/// Takes documents in order while their JSON fits in `budget` bytes; returns them
/// and how many did not fit, so every listing answer fits in one frame.
pub fn fit(
    items: impl IntoIterator<Item = serde_json::Value>,
    budget: usize,
) -> (Vec<serde_json::Value>, usize) {
    let mut kept = Vec::new();
    let mut left_out = 0;
    let mut used = 0;
    for v in items {
        let n = v.to_string().len() + 1;
        if left_out == 0 && used + n <= budget {
            used += n;
            kept.push(v);
        } else {
            left_out += 1;
        }
    }
    (kept, left_out)
}
