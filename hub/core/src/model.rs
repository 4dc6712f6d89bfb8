//! Records the hub keeps, in memory and in redb. Timestamps are wall-clock
//! milliseconds since the Unix epoch ([`Millis`]), since they must mean the
//! same after a restart; the shell never lets `now` go backwards.

use muster_wire::msg::{Failure, HostFigures, Outcome, Role, SelfTest, TimeoutAction, Usage};
use muster_wire::work::WorkResult;
use muster_wire::{Generation, TaskId};
use serde::{Deserialize, Serialize};

/// Wall-clock milliseconds since the Unix epoch.
pub type Millis = u64;

/// A task's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting on `after` dependencies.
    Blocked,
    /// Ready (possibly with a `not_before` from backoff).
    Queued,
    /// Sent to an agent, not yet accepted.
    Assigned,
    /// Durable on the agent's sidecar; the agent is being started.
    Accepted,
    /// The agent's start was verified.
    Running,
    /// Done.
    Completed,
    /// Failed for good.
    Failed,
    /// Cancelled by an operator or a failed dependency.
    Cancelled,
}

impl TaskState {
    /// Every state, for metrics and listings.
    pub const ALL: [TaskState; 8] = [
        TaskState::Blocked,
        TaskState::Queued,
        TaskState::Assigned,
        TaskState::Accepted,
        TaskState::Running,
        TaskState::Completed,
        TaskState::Failed,
        TaskState::Cancelled,
    ];

    /// Its position in [`TaskState::ALL`], for counting into an array.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether the task has ended.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Completed | TaskState::Failed | TaskState::Cancelled
        )
    }

    /// Whether an attempt is live (the task is with an agent).
    pub fn has_live_attempt(self) -> bool {
        matches!(
            self,
            TaskState::Assigned | TaskState::Accepted | TaskState::Running
        )
    }

    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Blocked => "blocked",
            TaskState::Queued => "queued",
            TaskState::Assigned => "assigned",
            TaskState::Accepted => "accepted",
            TaskState::Running => "running",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// Parses a stable name.
    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// How an agent stands, as `agents` and `/metrics` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AgentState {
    /// Heard from within two heartbeat intervals.
    Online,
    /// Missed heartbeats, not yet given up on.
    Suspect,
    /// No session, revoked, or silent too long.
    Offline,
    /// Online with its circuit breaker open (only in `/metrics`' counts).
    Degraded,
    /// Online and drained by an operator (only in `/metrics`' counts).
    Draining,
}

impl AgentState {
    /// Every state, in the order `/metrics` lists them.
    pub const ALL: [AgentState; 5] = [
        AgentState::Online,
        AgentState::Suspect,
        AgentState::Offline,
        AgentState::Degraded,
        AgentState::Draining,
    ];

    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Online => "online",
            AgentState::Suspect => "suspect",
            AgentState::Offline => "offline",
            AgentState::Degraded => "degraded",
            AgentState::Draining => "draining",
        }
    }
}

/// One entry of a task's audit trail: who changed it and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    /// When.
    pub at: Millis,
    /// The identity that acted.
    pub who: String,
    /// What it did: `submit`, `cancel`, `requeue`.
    pub action: String,
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Its id.
    pub id: TaskId,
    /// One line.
    pub title: String,
    /// Free text.
    pub description: String,
    /// Capabilities required.
    pub capabilities: Vec<String>,
    /// Higher first.
    pub priority: i32,
    /// Attempts allowed in all.
    pub max_attempts: u32,
    /// Task timeout.
    pub timeout_ms: Option<u64>,
    /// What the timeout does.
    pub timeout_action: TimeoutAction,
    /// Dependencies.
    pub after: Vec<TaskId>,
    /// Idempotency key.
    pub key: Option<String>,
    /// Current state.
    pub state: TaskState,
    /// Generation of the latest attempt (0 before the first).
    pub generation: Generation,
    /// Attempts made since submission or the last requeue.
    pub attempts: u32,
    /// Not to be assigned before this time (retry backoff).
    pub not_before: Option<Millis>,
    /// The agent of the latest attempt.
    pub agent: Option<String>,
    /// Submission time.
    pub submitted_at: Millis,
    /// Last change.
    pub updated_at: Millis,
    /// Last progress report (or start), for stall alerts.
    pub progress_at: Option<Millis>,
    /// Last progress note.
    pub progress_note: Option<String>,
    /// The agent's result.
    pub result: Option<String>,
    /// Why it ended, for anything but completed.
    pub reason: Option<String>,
    /// Who did what to it.
    pub audit: Vec<Audit>,
    /// The repository to work on, if any.
    pub repo: Option<String>,
    /// The ref to branch from; `None` is the repository's default branch.
    pub base: Option<String>,
    /// Extra environment for the agent.
    pub env: Vec<(String, String)>,
    /// Labels, for filtering.
    pub labels: Vec<(String, String)>,
}

/// Most audit entries kept per task (older ones stay in the event log).
pub const AUDIT_LEN_MAX: usize = 32;

/// One attempt as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The task.
    pub task: TaskId,
    /// Its generation.
    pub generation: Generation,
    /// The agent it went to.
    pub agent: String,
    /// When it was assigned.
    pub assigned_at: Millis,
    /// When the sidecar accepted.
    pub accepted_at: Option<Millis>,
    /// When the start was verified.
    pub started_at: Option<Millis>,
    /// When it ended.
    pub ended_at: Option<Millis>,
    /// How it ended.
    pub outcome: Option<Outcome>,
    /// What went wrong.
    pub error: Option<Failure>,
    /// The agent's pid, if reported.
    pub pid: Option<u32>,
    /// The agent's session, if reported.
    pub session: Option<String>,
    /// What the attempt left in its git workspace.
    pub work: Option<WorkResult>,
    /// Tokens and cost, as its latest usage report said (cumulative).
    pub usage: Option<Usage>,
}

/// An enrolled identity, keyed by certificate fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Name (certificate CN).
    pub name: String,
    /// Role.
    pub role: Role,
    /// SHA-256 of the certificate.
    pub fingerprint: String,
    /// SHA-256 of the public key, to refuse re-enrollment with a revoked key.
    pub key_fingerprint: String,
    /// When it enrolled.
    pub created_at: Millis,
    /// When it was revoked.
    pub revoked_at: Option<Millis>,
    /// Agents: the capabilities it may claim (granted at enrollment or by `agent set`).
    pub capabilities: Vec<String>,
    /// Agents: the slots it may claim.
    pub slots: u32,
}

impl Identity {
    /// Agents and operators have separate namespaces: a name is unique within one.
    pub fn same_namespace(&self, role: Role) -> bool {
        (self.role == Role::Agent) == (role == Role::Agent)
    }
}

/// A join token, keyed by the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The role it grants.
    pub role: Role,
    /// Who created it.
    pub created_by: String,
    /// When.
    pub created_at: Millis,
    /// Until when it is valid.
    pub expires_at: Millis,
    /// When it was used, if it was.
    pub used_at: Option<Millis>,
    /// Only this name may enroll with it, replacing that name's live identity.
    pub name: Option<String>,
    /// Agents: the most capabilities it grants (`None`: what the host asks for).
    pub capabilities: Option<Vec<String>>,
    /// Agents: the most slots it grants (`None`: what the host asks for).
    pub slots: Option<u32>,
}

/// An agent as stored in the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Its name.
    pub name: String,
    /// Sidecar version from its last hello.
    pub version: String,
    /// Capabilities from its last hello.
    pub capabilities: Vec<String>,
    /// Slots from its last hello.
    pub slots: u32,
    /// First enrollment.
    pub enrolled_at: Millis,
    /// Last hello or heartbeat.
    pub last_seen: Option<Millis>,
    /// Last heartbeat's host figures.
    pub host: Option<HostFigures>,
    /// Last heartbeat's self-test.
    pub self_test: Option<SelfTest>,
    /// Drained by an operator.
    pub drained: bool,
    /// Revoked by an operator.
    pub revoked: bool,
}

/// What an event is about; the shell logs task transitions at debug and the rest at info.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A task changed state.
    Task,
    /// An agent came, went, or was refused.
    Agent,
    /// An alert was raised or cleared.
    Alert,
    /// An operator or enrollment action.
    Audit,
}

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Sequence number.
    pub seq: u64,
    /// When.
    pub at: Millis,
    /// The event as a JSON object (what `watch --json` prints).
    pub json: String,
}
