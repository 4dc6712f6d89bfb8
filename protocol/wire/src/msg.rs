//! Every message that crosses the wire.
//!
//! Streams on a `muster/1` connection start with one [`Open`] frame from the
//! client. A sidecar session ([`OpenBody::Session`]) then carries
//! [`SessionMsg`] from the sidecar and [`HubMsg`] from the hub for the life of
//! the connection. An operator request ([`OpenBody::Request`]) gets one
//! [`OpResponse`] (or, for `watch`, a stream of them) and the stream ends.
//! Enrollment (`muster-enroll/1`) is one [`EnrollRequest`] and one
//! [`EnrollResponse`].
//!
//! Enum variants are append-only: never reorder or reuse one, since bincode
//! encodes the variant's index.

use serde::{Deserialize, Serialize};

use crate::ids::{AgentName, EventSeq, Generation, ReportId, TaskId};
use crate::work::{WorkResult, WorkspaceMode};

/// First frame of every `muster/1` stream. `protocol` comes first so a peer of
/// another version can still read it and be refused by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Open {
    /// The sender's [`crate::PROTOCOL_VERSION`].
    pub protocol: u32,
    /// What the stream is for.
    pub body: OpenBody,
}

/// What a stream is for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpenBody {
    /// A sidecar's long-lived session.
    Session(Hello),
    /// One operator request.
    Request(OpRequest),
}

/// A sidecar introduces itself and lists what it holds, so the hub can reconcile first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The sidecar's build version, for `agents`.
    pub version: String,
    /// The name it enrolled with; must match its certificate.
    pub agent: AgentName,
    /// What tasks it can take.
    pub capabilities: Vec<String>,
    /// How many tasks it runs at once.
    pub slots: u32,
    /// Every task it holds, with generation and phase.
    pub resume: Vec<HeldTask>,
    /// The workspaces it gives runs; only `git` serves tasks with a repository.
    pub workspace: WorkspaceMode,
}

/// A task a sidecar holds, as listed in hellos and heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldTask {
    /// The task.
    pub task: TaskId,
    /// The generation the sidecar works on.
    pub generation: Generation,
    /// How far it got.
    pub phase: Phase,
}

/// Where a task stands on a sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Committed locally and accepted; the agent is not yet woken.
    Accepted,
    /// The wake command or exec spawn is under way.
    Waking,
    /// Woken; waiting for the start to be verified.
    Verifying,
    /// The agent runs.
    Running,
    /// Ended; the report waits for the hub's acknowledgement.
    Finished,
}

/// Hub to sidecar, on the session stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HubMsg {
    /// The session is established; only now does the sidecar count as connected.
    Welcome(Welcome),
    /// The session is refused; the stream ends after this.
    Refused(Refused),
    /// Run this task under this generation.
    Assign(Assign),
    /// The operator cancelled the task: stop the run.
    Cancel {
        /// The task.
        task: TaskId,
        /// The generation to stop.
        generation: Generation,
    },
    /// This generation is superseded or unknown: stop it and forget it.
    Abandon {
        /// The task.
        task: TaskId,
        /// The generation to stop.
        generation: Generation,
        /// Why, for the sidecar's log.
        reason: String,
    },
    /// Every report up to and including this id is durable at the hub.
    Ack {
        /// Highest acknowledged report id.
        upto: ReportId,
    },
}

/// The hub's answer to a good hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The hub's build version.
    pub hub_version: String,
    /// How often to heartbeat, in milliseconds (the sidecar adds ±10 % jitter).
    pub heartbeat_interval_ms: u64,
    /// The hub's limits, so the sidecar can refuse oversize input locally.
    pub limits: WireLimits,
}

/// Limits the hub announces in its welcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireLimits {
    /// Largest frame.
    pub max_frame_bytes: u64,
    /// Largest task result.
    pub max_result_bytes: u64,
}

/// Why a session was refused. Typed, so the sidecar never matches on text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Refused {
    /// The peer speaks another protocol version.
    ProtocolMismatch {
        /// What the hub speaks.
        hub: u32,
        /// What the peer sent.
        peer: u32,
    },
    /// The certificate's identity is revoked.
    Revoked,
    /// The certificate's role may not open this kind of stream.
    Forbidden {
        /// Explanation.
        reason: String,
    },
    /// The hello is malformed or inconsistent with the certificate.
    BadHello {
        /// Explanation.
        reason: String,
    },
    /// This hub is a standby of a cluster: connect to the leader instead.
    NotLeader {
        /// The leader's address (`host:port`), when the standby knows it.
        leader: Option<String>,
    },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::ProtocolMismatch { hub, peer } => write!(
                f,
                "protocol version mismatch: this client speaks version {peer}, the hub speaks version {hub}; upgrade the older side"
            ),
            Refused::Revoked => write!(
                f,
                "this credential has been revoked at the hub; enroll again with a new token"
            ),
            Refused::Forbidden { reason } => write!(f, "forbidden: {reason}"),
            Refused::BadHello { reason } => write!(f, "hello refused: {reason}"),
            Refused::NotLeader { leader: Some(l) } => {
                write!(f, "this hub is a standby; the leader is at {l}")
            }
            Refused::NotLeader { leader: None } => write!(
                f,
                "this hub is a standby and no leader is elected yet; try again in a few seconds"
            ),
        }
    }
}

/// An assignment: the task's spec under a new generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assign {
    /// The task.
    pub task: TaskId,
    /// Its new generation; reports must carry it.
    pub generation: Generation,
    /// What to do.
    pub spec: TaskSpec,
}

/// What an agent needs to know about a task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// One line.
    pub title: String,
    /// Free text, bounded by `limits.max_description_bytes`.
    pub description: String,
    /// Capabilities the agent must have.
    pub capabilities: Vec<String>,
    /// Higher runs first.
    pub priority: i32,
    /// Task timeout in milliseconds, if any.
    pub timeout_ms: Option<u64>,
    /// The repository to work on (a git URL or a path on the agent hosts).
    pub repo: Option<String>,
    /// The ref to branch from; `None` is the repository's default branch.
    pub base: Option<String>,
    /// Extra environment for the agent (see [`crate::work::check_env`]).
    pub env: Vec<(String, String)>,
}

/// Sidecar to hub, on the session stream after the hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SessionMsg {
    /// A report about one task; kept in the sidecar's outbox until acknowledged.
    Report(Report),
    /// Periodic state.
    Heartbeat(Heartbeat),
}

/// A report about one attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The sidecar's report number, for acknowledgement.
    pub id: ReportId,
    /// The task.
    pub task: TaskId,
    /// The generation the report is about.
    pub generation: Generation,
    /// What happened.
    pub body: ReportBody,
}

/// What a report says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReportBody {
    /// Committed locally; the sidecar owns the task now.
    Accepted,
    /// The agent's start was verified.
    Started {
        /// The agent's process id, where known.
        pid: Option<u32>,
        /// The agent's session name (tmux, …), where known.
        session: Option<String>,
    },
    /// The agent said how it is doing.
    Progress {
        /// Bounded by [`crate::limits::NOTE_BYTES_MAX`].
        note: String,
    },
    /// The attempt ended on the sidecar.
    Finished {
        /// How it ended.
        outcome: Outcome,
        /// The agent's result, if it gave one.
        result: Option<String>,
        /// What went wrong, for any outcome but `completed`.
        error: Option<Failure>,
        /// What the attempt left in its git workspace, if it had one (boxed:
        /// it is the largest field of any report).
        work: Option<Box<WorkResult>>,
    },
    /// What the attempt has used so far (cumulative: each report replaces the
    /// last; the hub keeps the latest per attempt). Repeatable, like `Progress`.
    Usage(Usage),
    /// An attempt that started and ended between two of the sidecar's commits:
    /// its `Started` and `Finished` (and its `Accepted`, if that was not sent
    /// either) in one report, so a fast attempt costs one report, not three.
    Ran {
        /// The agent's process id, where known (as in `Started`).
        pid: Option<u32>,
        /// The agent's session name, where known (as in `Started`).
        session: Option<String>,
        /// How it ended (as in `Finished`).
        outcome: Outcome,
        /// The agent's result, if it gave one.
        result: Option<String>,
        /// What went wrong, for any outcome but `completed`.
        error: Option<Failure>,
        /// What the attempt left in its git workspace, if it had one.
        work: Option<Box<WorkResult>>,
    },
}

impl ReportBody {
    /// The kind, for de-duplicating repeats of (task, generation, kind).
    pub fn kind(&self) -> ReportKind {
        match self {
            ReportBody::Accepted => ReportKind::Accepted,
            ReportBody::Started { .. } => ReportKind::Started,
            ReportBody::Progress { .. } => ReportKind::Progress,
            // It ends the attempt: a repeat of it is a repeat of `Finished`.
            ReportBody::Finished { .. } | ReportBody::Ran { .. } => ReportKind::Finished,
            ReportBody::Usage(_) => ReportKind::Usage,
        }
    }
}

/// The kind of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportKind {
    /// See [`ReportBody::Accepted`].
    Accepted,
    /// See [`ReportBody::Started`].
    Started,
    /// See [`ReportBody::Progress`].
    Progress,
    /// See [`ReportBody::Finished`].
    Finished,
    /// See [`ReportBody::Usage`].
    Usage,
}

/// Tokens and cost an attempt used, as its transcript or its agent
/// (`muster-sidecar task usage`) says. Cumulative for the attempt. Integers
/// throughout, so sums over attempts, agents and labels are exact.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// The model, when known (at most [`crate::limits::MODEL_BYTES_MAX`] bytes).
    pub model: Option<String>,
    /// Input tokens not read from a cache.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Input tokens read from the prompt cache.
    pub cache_read_tokens: u64,
    /// Input tokens written to the prompt cache.
    pub cache_write_tokens: u64,
    /// Cost in millionths of a US dollar, when known.
    pub cost_micro_usd: Option<u64>,
}

impl Usage {
    /// Adds `other`'s figures (saturating); the model is kept if `other` has none.
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cache_read_tokens = self
            .cache_read_tokens
            .saturating_add(other.cache_read_tokens);
        self.cache_write_tokens = self
            .cache_write_tokens
            .saturating_add(other.cache_write_tokens);
        self.cost_micro_usd = match (self.cost_micro_usd, other.cost_micro_usd) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
        };
        if other.model.is_some() {
            self.model.clone_from(&other.model);
        }
    }

    /// What `self` adds to `before` (a later cumulative report of the same
    /// attempt): each figure's growth, never below zero.
    pub fn growth_since(&self, before: &Usage) -> Usage {
        Usage {
            model: self.model.clone(),
            input_tokens: self.input_tokens.saturating_sub(before.input_tokens),
            output_tokens: self.output_tokens.saturating_sub(before.output_tokens),
            cache_read_tokens: self
                .cache_read_tokens
                .saturating_sub(before.cache_read_tokens),
            cache_write_tokens: self
                .cache_write_tokens
                .saturating_sub(before.cache_write_tokens),
            cost_micro_usd: self
                .cost_micro_usd
                .map(|c| c.saturating_sub(before.cost_micro_usd.unwrap_or(0))),
        }
    }
}

/// What a running attempt is doing, as its sidecar measures it for a
/// heartbeat. Ages, not times: the sidecar's clock is not the hub's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    /// The task.
    pub task: TaskId,
    /// The attempt.
    pub generation: Generation,
    /// CPU time (user + system, with reaped children) of the run's process
    /// group, in milliseconds; `None` when the group is not known.
    pub cpu_ms: Option<u64>,
    /// Bytes the run has written to its stdout and stderr files.
    pub output_bytes: u64,
    /// Since the run last wrote output, in milliseconds; `None` when unknown.
    pub output_age_ms: Option<u64>,
    /// Since the attempt's workspace last changed (its top directory or git
    /// index), in milliseconds; `None` without a workspace of its own.
    pub workspace_age_ms: Option<u64>,
    /// The last lines of output, sent only once output has been quiet for a
    /// heartbeat (at most [`crate::limits::OUTPUT_TAIL_BYTES_MAX`] bytes).
    pub output_tail: String,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The agent finished the work.
    Completed,
    /// The agent (or its exit status) said it failed.
    Failed,
    /// The wake command exited non-zero or could not run.
    WakeFailed,
    /// The sidecar did not accept in time.
    AcceptTimeout,
    /// The agent's start was not verified in time.
    StartTimeout,
    /// The agent's sidecar was gone past its grace.
    Lost,
    /// The agent's process or session disappeared without a report.
    AgentExited,
    /// The task ran past its timeout.
    TimedOut,
    /// An operator cancelled it.
    Cancelled,
    /// The hub superseded it.
    Abandoned,
    /// The workspace could not be made (repository unreachable, bad base, disk).
    WorkspaceFailed,
    /// The workspace's `setup_command` failed.
    SetupFailed,
}

impl Outcome {
    /// Every outcome, for metrics and tests.
    pub const ALL: [Outcome; 12] = [
        Outcome::Completed,
        Outcome::Failed,
        Outcome::WakeFailed,
        Outcome::AcceptTimeout,
        Outcome::StartTimeout,
        Outcome::Lost,
        Outcome::AgentExited,
        Outcome::TimedOut,
        Outcome::Cancelled,
        Outcome::Abandoned,
        Outcome::WorkspaceFailed,
        Outcome::SetupFailed,
    ];

    /// The stable name used in JSON, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::WakeFailed => "wake_failed",
            Outcome::AcceptTimeout => "accept_timeout",
            Outcome::StartTimeout => "start_timeout",
            Outcome::Lost => "lost",
            Outcome::AgentExited => "agent_exited",
            Outcome::TimedOut => "timed_out",
            Outcome::Cancelled => "cancelled",
            Outcome::Abandoned => "abandoned",
            Outcome::WorkspaceFailed => "workspace_failed",
            Outcome::SetupFailed => "setup_failed",
        }
    }

    /// Failures of the machine rather than of the work; they trip the circuit breaker.
    pub fn is_infrastructure(self) -> bool {
        matches!(
            self,
            Outcome::WakeFailed
                | Outcome::AcceptTimeout
                | Outcome::StartTimeout
                | Outcome::Lost
                | Outcome::AgentExited
                | Outcome::WorkspaceFailed
        )
    }
}

/// What went wrong, captured so nobody ever sees `Subprocess failed: None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// One line saying what happened.
    pub reason: String,
    /// The process exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// The argv that ran.
    pub command: Vec<String>,
    /// Last bytes of stdout (at most [`crate::limits::TAIL_BYTES_MAX`]).
    pub stdout_tail: String,
    /// Last bytes of stderr (at most [`crate::limits::TAIL_BYTES_MAX`]).
    pub stderr_tail: String,
    /// The agent asked that the task not be retried.
    pub no_retry: bool,
}

/// Periodic sidecar state: what runs, the self-test and host figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Increments by one per heartbeat of a sidecar process.
    pub seq: u64,
    /// The sidecar's own state.
    pub state: SidecarState,
    /// Every task the sidecar holds.
    pub tasks: Vec<HeldTask>,
    /// Slots free for new work.
    pub free_slots: u32,
    /// The last self-test.
    pub self_test: SelfTest,
    /// Host figures from sysinfo.
    pub host: HostFigures,
    /// What each running attempt is doing (at most
    /// [`crate::limits::HELD_TASKS_MAX`]).
    pub activity: Vec<Activity>,
}

/// The sidecar's own state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SidecarState {
    /// Taking work.
    Ready,
    /// Shutting down: finishing, not taking work.
    Draining,
}

/// The sidecar's check that it can really do work.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SelfTest {
    /// All checks passed.
    pub passed: bool,
    /// Measured round trip to the hub, in microseconds.
    pub hub_rtt_us: Option<u64>,
    /// The wake/exec command exists and is executable.
    pub command_ok: bool,
    /// Free disk space in the state directory is above the floor.
    pub disk_ok: bool,
    /// One line per failed check.
    pub problems: Vec<String>,
}

/// Host figures from sysinfo.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostFigures {
    /// One-minute load average.
    pub load1: f64,
    /// Memory available, bytes.
    pub mem_available_bytes: u64,
    /// Memory in all, bytes.
    pub mem_total_bytes: u64,
    /// Free space on the state directory's disk, bytes.
    pub disk_free_bytes: u64,
    /// Number of CPUs.
    pub cpus: u32,
}

/// Roles a credential may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A sidecar: reports on its own assignments only.
    Agent,
    /// Reads.
    Operator,
    /// Reads and writes.
    Admin,
    /// Reads, and submits, cancels and requeues tasks: no credentials, no
    /// agent control. Last, so the roles before it keep their encoding.
    Submitter,
}

impl Role {
    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Submitter => "submitter",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "agent" => Ok(Role::Agent),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            "submitter" => Ok(Role::Submitter),
            other => Err(format!(
                "unknown role {other:?}; use agent, operator (reads), submitter (reads; submits, cancels and requeues tasks) or admin (everything)"
            )),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// === Enrollment ===

/// The one request on a `muster-enroll/1` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The sender's [`crate::PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The secret part of the join token.
    pub secret: String,
    /// The role the enrolling side expects the token to grant.
    pub role: Role,
    /// The name to enroll under.
    pub name: AgentName,
    /// A PEM certificate signing request for the locally generated key.
    pub csr_pem: String,
    /// Capabilities asked for (agents); the hub grants them only within the token's grant.
    pub capabilities: Vec<String>,
    /// Slots asked for (agents); the hub grants them only within the token's grant.
    pub slots: u32,
}

/// The hub's answer to an enrollment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EnrollResponse {
    /// Enrolled: the signed certificate and the CA that signed it.
    Enrolled {
        /// PEM client certificate.
        cert_pem: String,
        /// PEM CA certificate, to verify the hub from now on.
        ca_pem: String,
    },
    /// Refused, with the reason.
    Refused(EnrollRefusal),
}

/// Why an enrollment was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EnrollRefusal {
    /// No token with this secret exists (forged or mistyped).
    UnknownToken,
    /// The token's TTL ran out.
    Expired {
        /// When it expired, Unix seconds.
        at_unix: u64,
    },
    /// The token was already used.
    AlreadyUsed {
        /// When it was used, Unix seconds.
        at_unix: u64,
    },
    /// The token grants another role than the one asked for.
    WrongRole {
        /// What the token grants.
        token: Role,
        /// What was asked for.
        requested: Role,
    },
    /// Too many enrollment attempts; try again later.
    RateLimited {
        /// Seconds to wait.
        retry_after_s: u64,
    },
    /// The key was revoked; generate a new one.
    RevokedKey,
    /// The request is malformed.
    BadRequest {
        /// Explanation.
        reason: String,
    },
    /// Protocol version mismatch.
    ProtocolMismatch {
        /// What the hub speaks.
        hub: u32,
        /// What the peer sent.
        peer: u32,
    },
    /// Another live identity holds this name.
    NameTaken {
        /// The name.
        name: String,
        /// The holder's certificate fingerprint (first 16 hex digits).
        holder: String,
        /// When the holder enrolled, Unix seconds.
        enrolled_at_unix: u64,
    },
    /// The name is reserved (`admin`) or the token is bound to another name.
    NameRefused {
        /// Explanation.
        reason: String,
    },
    /// The request asks for more than the token grants.
    NotGranted {
        /// Explanation.
        reason: String,
    },
}

impl std::fmt::Display for EnrollRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnrollRefusal::UnknownToken => write!(
                f,
                "the hub does not know this token (mistyped or forged); create one with `muster-hub token create`"
            ),
            EnrollRefusal::Expired { at_unix } => write!(
                f,
                "this token expired at {at_unix} (Unix time); create a new one with `muster-hub token create`"
            ),
            EnrollRefusal::AlreadyUsed { at_unix } => write!(
                f,
                "this token was already used at {at_unix} (Unix time); tokens are single-use, create a new one"
            ),
            EnrollRefusal::WrongRole { token, requested } => write!(
                f,
                "this token is for role {token}, but {requested} enrollment was attempted; create a token with `--role {requested}`"
            ),
            EnrollRefusal::RateLimited { retry_after_s } => write!(
                f,
                "too many enrollment attempts; try again in {retry_after_s} s"
            ),
            EnrollRefusal::RevokedKey => write!(
                f,
                "this key was revoked; remove the old key and enroll again to generate a new one"
            ),
            EnrollRefusal::BadRequest { reason } => write!(f, "bad enrollment request: {reason}"),
            EnrollRefusal::ProtocolMismatch { hub, peer } => write!(
                f,
                "protocol version mismatch: this client speaks version {peer}, the hub speaks version {hub}"
            ),
            EnrollRefusal::NameTaken {
                name,
                holder,
                enrolled_at_unix,
            } => write!(
                f,
                "the name {name} is held by another identity (certificate {holder}…, enrolled at {enrolled_at_unix} Unix time); pick another --name, or replace that host with a token from `muster-hub token create --name {name}`"
            ),
            EnrollRefusal::NameRefused { reason } => write!(f, "name refused: {reason}"),
            EnrollRefusal::NotGranted { reason } => write!(
                f,
                "not granted: {reason}; ask for less, or create a token that grants it (`muster-hub token create --capability C --slots N`)"
            ),
        }
    }
}

// === Operator requests ===

/// One operator request; reads need role operator or admin, writes need admin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpRequest {
    /// List agents.
    Agents,
    /// One agent.
    AgentShow {
        /// Its name.
        name: String,
    },
    /// Revoke the live agent identity of this name and cut its session.
    AgentRevoke {
        /// Its name.
        name: String,
    },
    /// Stop giving an agent new work.
    AgentDrain {
        /// Its name.
        name: String,
    },
    /// Give a drained agent work again.
    AgentUndrain {
        /// Its name.
        name: String,
    },
    /// Create a join token.
    TokenCreate {
        /// The role it grants.
        role: Role,
        /// Its lifetime in seconds.
        ttl_s: u64,
        /// Only this name may enroll with it; it replaces that name's live
        /// identity, which is revoked in the same commit.
        name: Option<AgentName>,
        /// Agents: the capabilities it grants at most (`None`: what the host asks for).
        capabilities: Option<Vec<String>>,
        /// Agents: the slots it grants at most (`None`: what the host asks for).
        slots: Option<u32>,
    },
    /// Submit a task.
    Submit(SubmitRequest),
    /// List tasks, newest first.
    Tasks {
        /// Only this state.
        state: Option<String>,
        /// Only tasks whose latest attempt ran on this agent.
        agent: Option<String>,
        /// Only tasks carrying this label (key and value).
        label: Option<(String, String)>,
        /// Page length.
        limit: u32,
        /// Continue below this task id.
        cursor: Option<u64>,
    },
    /// One task with its attempts and audit trail.
    TaskShow {
        /// The task.
        id: TaskId,
    },
    /// Cancel a task.
    TaskCancel {
        /// The task.
        id: TaskId,
    },
    /// Run a terminal task again.
    TaskRequeue {
        /// The task.
        id: TaskId,
    },
    /// Coordination figures.
    Stats,
    /// Open alerts.
    Alerts,
    /// Stream events from a sequence number.
    Watch {
        /// First sequence wanted; `None` is "from now".
        from: Option<EventSeq>,
    },
    /// Submit several tasks in one request (at most
    /// [`crate::limits::SUBMIT_BATCH_MAX`]); each is accepted or refused on its
    /// own, in order, and all accepted ones share one commit. Last, so the
    /// variants before it keep their encoding.
    SubmitBatch(Vec<SubmitRequest>),
    /// Revoke one identity, agent or operator. The last admin cannot be revoked.
    IdentityRevoke(IdentityTarget),
    /// Change what an agent is granted; its session is checked against it at once.
    AgentSet {
        /// The agent.
        name: String,
        /// The capabilities it may claim, if changed.
        capabilities: Option<Vec<String>>,
        /// The slots it may claim, if changed.
        slots: Option<u32>,
    },
    /// An attempt's output, streamed from the sidecar that holds it (answered
    /// with [`OpResponse::LogChunk`]s, then `Ok` or `Error`). A read.
    TaskLogs(LogQuery),
    /// Create an API token for the HTTP API (`token create --kind api`). Admins only.
    ApiTokenCreate {
        /// The role it carries (at most the creator's).
        role: Role,
        /// Its lifetime in seconds.
        ttl_s: u64,
        /// A name to list and revoke it by; unique among live API tokens.
        name: String,
    },
    /// List API tokens (never their secrets). Admins only.
    ApiTokens,
    /// Revoke an API token by name. Admins only.
    ApiTokenRevoke {
        /// Its name.
        name: String,
    },
    /// A one-time dashboard login URL bound to the asking identity, with a role
    /// no higher than its own.
    DashboardLogin {
        /// The role the browser session gets; `None` is the caller's own.
        role: Option<Role>,
    },
    /// List identities (operators, submitters, admins and agents). A read.
    Identities {
        /// Only this role.
        role: Option<Role>,
        /// Also revoked ones.
        revoked: bool,
    },
    /// List join tokens not yet used or expired (never their secrets). Admins only.
    JoinTokens,
    /// Revoke an unused join token by its id (as `token list` shows it). Admins only.
    JoinTokenRevoke {
        /// The id, or a unique prefix of at least 8 hex digits.
        id: String,
    },
    /// Answered `{}` by the leader, refused by a standby: how a client finds
    /// the leader of a cluster before its first real request. Any role.
    Ping,
}

/// Which identity an [`OpRequest::IdentityRevoke`] means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum IdentityTarget {
    /// The identity with this certificate fingerprint (or a unique prefix of at least 8 hex digits).
    Fingerprint(String),
    /// The live identity of this role and name.
    Named {
        /// Its role (agents and operators have separate namespaces).
        role: Role,
        /// Its name.
        name: String,
    },
}

impl OpRequest {
    /// Whether the request is about tasks only: submit, cancel, requeue (role
    /// submitter may).
    pub fn is_task_write(&self) -> bool {
        matches!(
            self,
            OpRequest::Submit(_)
                | OpRequest::SubmitBatch(_)
                | OpRequest::TaskCancel { .. }
                | OpRequest::TaskRequeue { .. }
        )
    }

    /// Whether the request changes state or lists credentials (API tokens);
    /// reads are the rest.
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            OpRequest::AgentRevoke { .. }
                | OpRequest::AgentDrain { .. }
                | OpRequest::AgentUndrain { .. }
                | OpRequest::TokenCreate { .. }
                | OpRequest::Submit(_)
                | OpRequest::SubmitBatch(_)
                | OpRequest::TaskCancel { .. }
                | OpRequest::TaskRequeue { .. }
                | OpRequest::IdentityRevoke(_)
                | OpRequest::AgentSet { .. }
                | OpRequest::ApiTokenCreate { .. }
                | OpRequest::ApiTokens
                | OpRequest::ApiTokenRevoke { .. }
                | OpRequest::JoinTokens
                | OpRequest::JoinTokenRevoke { .. }
        )
    }
}

/// A task submission.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SubmitRequest {
    /// One line.
    pub title: String,
    /// Free text.
    pub description: String,
    /// Required capabilities.
    pub capabilities: Vec<String>,
    /// Higher first.
    pub priority: i32,
    /// Attempts in all; `None` takes the hub's default.
    pub max_attempts: Option<u32>,
    /// Task timeout in milliseconds.
    pub timeout_ms: Option<u64>,
    /// What to do on timeout.
    pub timeout_action: TimeoutAction,
    /// Tasks that must complete first.
    pub after: Vec<TaskId>,
    /// Idempotency key: a second submit with it returns the first task.
    pub key: Option<String>,
    /// The repository to work on; only sidecars in `git` workspace mode take it.
    pub repo: Option<String>,
    /// The ref to branch from; `None` is the repository's default branch.
    pub base: Option<String>,
    /// Extra, non-secret environment for the agent.
    pub env: Vec<(String, String)>,
    /// Labels to filter by (`tasks --label K=V`).
    pub labels: Vec<(String, String)>,
}

/// What a task timeout does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutAction {
    /// End the task `failed`.
    #[default]
    Fail,
    /// Retry it if attempts remain.
    Retry,
}

/// The hub's answer to an operator request. Bodies are JSON documents so the
/// CLI can print them with stable field names and the wire stays compact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpResponse {
    /// Success, with a JSON document.
    Ok {
        /// The document.
        json: String,
    },
    /// Failure.
    Error(OpError),
    /// One `watch` event as a JSON document.
    Event {
        /// Its sequence number.
        seq: EventSeq,
        /// The document.
        json: String,
    },
    /// The next bytes of a `task logs` stream, in order; at most
    /// [`crate::limits::LOG_CHUNK_BYTES_MAX`].
    LogChunk {
        /// The bytes, as the agent wrote them (not necessarily UTF-8).
        #[serde(with = "raw_bytes")]
        data: Vec<u8>,
    },
}

/// Why an operator request failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpError {
    /// Machine-readable kind.
    pub code: OpErrorCode,
    /// A sentence that says what was wrong and what to do.
    pub message: String,
}

/// Kinds of operator errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpErrorCode {
    /// The credential's role may not do this.
    Forbidden,
    /// No such task or agent.
    NotFound,
    /// The request is malformed or out of bounds.
    Invalid,
    /// A limit was hit (queue full, too many requests).
    Busy,
    /// The request makes no sense in the current state.
    Conflict,
    /// Protocol version mismatch.
    ProtocolMismatch,
    /// The hub failed internally; see its log.
    Internal,
}

// === Logs ===

/// Which attempt's output to read, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogQuery {
    /// The task.
    pub task: TaskId,
    /// The attempt; `None` is the task's latest.
    pub generation: Option<Generation>,
    /// Which of the two files.
    pub stream: LogStream,
    /// Only the last this many lines (and at most
    /// [`crate::limits::LOG_TAIL_BYTES_MAX`] bytes of them); `None` is all.
    pub tail: Option<u64>,
    /// Keep sending new output until the attempt ends.
    pub follow: bool,
}

/// One of an attempt's two output files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    /// The agent's standard output.
    Stdout,
    /// The agent's standard error.
    Stderr,
}

impl LogStream {
    /// The file's name in the run and log directories.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

/// First frame of a stream the hub opens on a sidecar's connection: read this
/// attempt's output. The sidecar answers with [`LogFrame`]s and ends the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogOpen {
    /// The hub's [`crate::PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The task.
    pub task: TaskId,
    /// The attempt (the hub resolved "latest").
    pub generation: Generation,
    /// Which file.
    pub stream: LogStream,
    /// Only the last this many lines (see [`LogQuery::tail`]).
    pub tail: Option<u64>,
    /// Keep sending until the attempt ends.
    pub follow: bool,
}

/// Sidecar to hub on a log stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogFrame {
    /// The next bytes; at most [`crate::limits::LOG_CHUNK_BYTES_MAX`].
    Chunk {
        /// The bytes.
        #[serde(with = "raw_bytes")]
        data: Vec<u8>,
    },
    /// All sent; the stream ends.
    End(LogEnd),
    /// The log cannot be read; the stream ends.
    Error(LogError),
}

/// What a finished log stream sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEnd {
    /// Bytes sent (markers included).
    pub bytes: u64,
    /// Bytes of output the per-attempt cap cut out of the middle.
    pub cut_bytes: u64,
    /// Whether the attempt had ended (its log moved to the log directory).
    pub ended: bool,
}

/// Why a sidecar cannot send a log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogError {
    /// This host has no output of the attempt (it never ran here, or never started).
    NotFound,
    /// Retention removed it.
    Removed {
        /// Why, with the setting (`[logs] retention` or `max_disk`).
        reason: String,
        /// When, Unix milliseconds.
        at_ms: u64,
    },
    /// Too many log streams at once on this sidecar.
    Busy,
    /// The hub speaks another protocol version.
    ProtocolMismatch {
        /// What the sidecar speaks.
        sidecar: u32,
        /// What the hub sent.
        hub: u32,
    },
    /// Reading failed.
    Failed {
        /// The error.
        reason: String,
    },
}

impl LogError {
    /// A sentence for an operator about task `task` attempt `generation` on `agent`.
    pub fn describe(&self, task: TaskId, generation: Generation, agent: &str) -> String {
        match self {
            LogError::NotFound => format!(
                "agent {agent} has no output of task {task} attempt {generation} (it never started there, or its output was not kept)"
            ),
            LogError::Removed { reason, at_ms } => format!(
                "the log of task {task} attempt {generation} on agent {agent} is gone: {reason} (at {} Unix time)",
                at_ms / 1000
            ),
            LogError::Busy => format!(
                "agent {agent} is serving as many log streams as it may at once; try again shortly"
            ),
            LogError::ProtocolMismatch { sidecar, hub } => format!(
                "agent {agent} speaks protocol version {sidecar}, the hub {hub}; upgrade the older side to read its logs"
            ),
            LogError::Failed { reason } => format!(
                "agent {agent} could not read the log of task {task} attempt {generation}: {reason}"
            ),
        }
    }
}

/// Bytes as one length-prefixed run (serde's `bytes`), not a sequence of
/// numbers: the same bincode encoding as `Vec<u8>`, without a call per byte.
mod raw_bytes {
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}
