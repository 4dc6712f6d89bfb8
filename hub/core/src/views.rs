//! Documents the CLI prints, typed, with stable field names; the shell renders
//! them as JSON.
//!
//! Fields are declared in alphabetical order: the JSON has always listed keys
//! that way (it was once built as `serde_json::Value` maps, which sort their
//! keys), and a serialized struct keeps its declaration order. Nested documents
//! follow the same rule, so a wire struct whose fields are in another order
//! (host figures, the self-test) has a view of its own here.

use muster_wire::msg::{Failure, HostFigures, SelfTest};
use muster_wire::work::WorkResult;
use serde::Serialize;
use serde_json::Value;

use super::{AgentRecord, AttemptRecord, Millis, TaskRecord};

/// A task as `tasks --json` and `task show --json` print it.
pub fn task_json(t: &TaskRecord) -> Value {
    serde_json::to_value(TaskView::of(t)).unwrap_or_default()
}

/// A task as `tasks`, `task show`, `submit`, `task cancel` and `task requeue`
/// print it: its record's fields, borrowed, in alphabetical order.
#[derive(Debug, Serialize)]
pub struct TaskView<'a> {
    after: Vec<u64>,
    agent: &'a Option<String>,
    attempts: u32,
    audit: Vec<AuditView<'a>>,
    base: &'a Option<String>,
    capabilities: &'a [String],
    description: &'a str,
    #[serde(serialize_with = "as_object")]
    env: &'a [(String, String)],
    /// Set (`true`) only when a submission named a task made before by its idempotency key.
    #[serde(skip_serializing_if = "Option::is_none")]
    existing: Option<bool>,
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

#[derive(Debug, Serialize)]
struct AuditView<'a> {
    action: &'a str,
    at: Millis,
    who: &'a str,
}

impl<'a> TaskView<'a> {
    /// The view of a task.
    pub fn of(t: &'a TaskRecord) -> Self {
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
            existing: None,
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

    /// The view of the task a repeated idempotency key named (`"existing": true`).
    pub fn of_existing(t: &'a TaskRecord) -> Self {
        TaskView {
            existing: Some(true),
            ..TaskView::of(t)
        }
    }
}

/// An attempt as `task show --json` lists it.
#[derive(Debug, Serialize)]
pub struct AttemptView<'a> {
    accepted_at: Option<Millis>,
    agent: &'a str,
    assigned_at: Millis,
    ended_at: Option<Millis>,
    error: Option<FailureView<'a>>,
    generation: u64,
    outcome: Option<&'static str>,
    pid: Option<u32>,
    session: &'a Option<String>,
    started_at: Option<Millis>,
    usage: Option<crate::usage::UsageView>,
    work: Option<WorkView<'a>>,
}

/// What an attempt left in its git workspace.
#[derive(Debug, Serialize)]
struct WorkView<'a> {
    base_commit: &'a str,
    branch: &'a str,
    checkpoint: &'a Option<String>,
    commits: u32,
    diffstat: &'a str,
    dirty: bool,
    head: &'a str,
    link: &'a Option<String>,
}

impl<'a> WorkView<'a> {
    fn of(w: &'a WorkResult) -> Self {
        WorkView {
            base_commit: &w.base_commit,
            branch: &w.branch,
            checkpoint: &w.checkpoint,
            commits: w.commits,
            diffstat: &w.diffstat,
            dirty: w.dirty,
            head: &w.head,
            link: &w.link,
        }
    }
}

/// What went wrong in an attempt.
#[derive(Debug, Serialize)]
struct FailureView<'a> {
    command: &'a [String],
    exit_code: Option<i32>,
    no_retry: bool,
    reason: &'a str,
    signal: Option<i32>,
    stderr_tail: &'a str,
    stdout_tail: &'a str,
}

impl<'a> AttemptView<'a> {
    /// The view of an attempt.
    pub fn of(a: &'a AttemptRecord) -> Self {
        AttemptView {
            accepted_at: a.accepted_at,
            agent: &a.agent,
            assigned_at: a.assigned_at,
            ended_at: a.ended_at,
            error: a.error.as_ref().map(FailureView::of),
            generation: a.generation.0,
            outcome: a.outcome.map(|o| o.as_str()),
            pid: a.pid,
            session: &a.session,
            started_at: a.started_at,
            usage: a.usage.as_ref().map(crate::usage::UsageView::from),
            work: a.work.as_ref().map(WorkView::of),
        }
    }
}

impl<'a> FailureView<'a> {
    fn of(e: &'a Failure) -> Self {
        FailureView {
            command: &e.command,
            exit_code: e.exit_code,
            no_retry: e.no_retry,
            reason: &e.reason,
            signal: e.signal,
            stderr_tail: &e.stderr_tail,
            stdout_tail: &e.stdout_tail,
        }
    }
}

/// An agent as `agents --json` and `agent show --json` print it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentView {
    /// Whether it may get work now.
    pub available: bool,
    /// Capabilities from its last hello.
    pub capabilities: Vec<String>,
    /// Drained by an operator.
    pub drained: bool,
    /// First enrollment.
    pub enrolled_at: Millis,
    /// Last heartbeat's host figures.
    pub host: Option<HostView>,
    /// Since its last hello or heartbeat.
    pub last_heartbeat_age_ms: Option<Millis>,
    /// Its name.
    pub name: String,
    /// Revoked by an operator.
    pub revoked: bool,
    /// Last heartbeat's self-test.
    pub self_test: Option<SelfTestView>,
    /// Slots from its last hello.
    pub slots: u32,
    /// `online`, `suspect` or `offline`.
    pub state: &'static str,
    /// Tasks the hub has assigned to it that have not ended.
    pub tasks: usize,
    /// Why it may not get work (empty when available).
    pub unavailable_reason: String,
    /// Sidecar version from its last hello.
    pub version: String,
    /// Why it is in its state (empty when online).
    pub why: String,
    /// The workspaces its last hello offered: `shared`, `dir` or `git`
    /// (only `git` takes tasks with a repository).
    pub workspace: &'static str,
}

impl AgentView {
    /// The view of an agent's record with what the core derives about it.
    pub fn of(
        a: &AgentRecord,
        (state, why): (&'static str, String),
        (available, unavailable_reason): (bool, String),
        tasks: usize,
        now: Millis,
    ) -> Self {
        AgentView {
            available,
            capabilities: a.capabilities.clone(),
            drained: a.drained,
            enrolled_at: a.enrolled_at,
            host: a.host.as_ref().map(HostView::from),
            last_heartbeat_age_ms: a.last_seen.map(|t| now.saturating_sub(t)),
            name: a.name.clone(),
            revoked: a.revoked,
            self_test: a.self_test.as_ref().map(SelfTestView::from),
            slots: a.slots,
            state,
            tasks,
            unavailable_reason,
            version: a.version.clone(),
            why,
            workspace: muster_wire::work::WorkspaceMode::Shared.as_str(),
        }
    }
}

/// [`HostFigures`], in alphabetical order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostView {
    cpus: u32,
    disk_free_bytes: u64,
    load1: f64,
    mem_available_bytes: u64,
    mem_total_bytes: u64,
}

impl From<&HostFigures> for HostView {
    fn from(h: &HostFigures) -> Self {
        // Every field, named: a new one fails to compile here until it is shown.
        let HostFigures {
            load1,
            mem_available_bytes,
            mem_total_bytes,
            disk_free_bytes,
            cpus,
        } = *h;
        HostView {
            cpus,
            disk_free_bytes,
            load1,
            mem_available_bytes,
            mem_total_bytes,
        }
    }
}

/// [`SelfTest`], in alphabetical order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SelfTestView {
    command_ok: bool,
    disk_ok: bool,
    hub_rtt_us: Option<u64>,
    passed: bool,
    problems: Vec<String>,
}

impl From<&SelfTest> for SelfTestView {
    fn from(t: &SelfTest) -> Self {
        // Every field, named: a new one fails to compile here until it is shown.
        let SelfTest {
            passed,
            hub_rtt_us,
            command_ok,
            disk_ok,
            problems,
        } = t;
        SelfTestView {
            command_ok: *command_ok,
            disk_ok: *disk_ok,
            hub_rtt_us: *hub_rtt_us,
            passed: *passed,
            problems: problems.clone(),
        }
    }
}

/// Bytes of listed documents in one operator answer (a frame is at most 1 MiB;
/// the rest of the answer and its framing fit in what is left).
pub const REPLY_BYTES_MAX: usize = 768 * 1024;

/// Takes documents in order while their JSON fits in `budget` bytes; returns them
/// and how many did not fit, so every listing answer fits in one frame.
pub fn fit<T: Serialize>(items: impl IntoIterator<Item = T>, budget: usize) -> (Vec<T>, usize) {
    let mut kept = Vec::new();
    let mut left_out = 0;
    let mut used = 0;
    for v in items {
        let n = json_len(&v) + 1;
        if left_out == 0 && used + n <= budget {
            used += n;
            kept.push(v);
        } else {
            left_out += 1;
        }
    }
    (kept, left_out)
}

/// The length of a document's JSON text, counted without keeping the text.
pub fn json_len<T: Serialize + ?Sized>(v: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    // Only a map with non-string keys fails to serialize; the documents have none.
    let _ = serde_json::to_writer(&mut n, v);
    n.0
}
