//! JSON documents the CLI prints, with stable field names.

use serde_json::{Value, json};

use super::{AgentRecord, AttemptRecord, Millis, TaskRecord, TaskState};

/// A task as `tasks --json` and `task show --json` print it.
pub fn task_json(t: &TaskRecord) -> Value {
    json!({
        "id": t.id.0,
        "title": t.title,
        "description": t.description,
        "state": t.state.as_str(),
        "priority": t.priority,
        "capabilities": t.capabilities,
        "generation": t.generation.0,
        "attempts": t.attempts,
        "max_attempts": t.max_attempts,
        "agent": t.agent,
        "after": t.after.iter().map(|d| d.0).collect::<Vec<_>>(),
        "key": t.key,
        "timeout_ms": t.timeout_ms,
        "not_before": t.not_before,
        "submitted_at": t.submitted_at,
        "updated_at": t.updated_at,
        "progress_at": t.progress_at,
        "progress_note": t.progress_note,
        "result": t.result,
        "reason": t.reason,
        "audit": t.audit.iter().map(|a| json!({"at": a.at, "who": a.who, "action": a.action})).collect::<Vec<_>>(),
    })
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
pub fn task_event_json(t: &TaskRecord, from: TaskState, why: &str) -> String {
    json!({
        "kind": "task",
        "id": t.id.0,
        "title": t.title,
        "from": from.as_str(),
        "state": t.state.as_str(),
        "generation": t.generation.0,
        "agent": t.agent,
        "why": why,
    })
    .to_string()
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
