//! Answers to operator requests, typed: the core decides what an answer says,
//! the shell renders it as the JSON text of `OpResponse::Ok`.
//!
//! As in [`crate::views`], fields are declared in alphabetical order, the order
//! the JSON has always listed its keys in.

use std::collections::BTreeMap;

use muster_wire::TaskId;
use muster_wire::msg::{OpErrorCode, Role};
use serde::{Serialize, Serializer};

use crate::alerts::AlertNote;
use crate::model::{Millis, TaskRecord, TaskState};
use crate::views::{AgentView, TaskView};

/// What an operator request answers with (`stats` aside: see [`crate::Reply::Stats`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Answer {
    /// `agents`.
    Agents(AgentList),
    /// `agent show`.
    Agent(Box<AgentView>),
    /// `submit`, `task cancel`, `task requeue`.
    Task(Box<TaskAnswer>),
    /// `submit --batch`.
    Batch(BatchAnswer),
    /// `token create`.
    Token(TokenIssued),
    /// `agent revoke`, `identity revoke`.
    Revoked(Revoked),
    /// `agent drain`, `agent undrain`.
    Drained(Drained),
    /// `agent set`.
    Grant(Grant),
    /// `alerts`.
    Alerts(AlertList),
    /// `token create --kind api`.
    ApiToken(ApiTokenIssued),
    /// `token list --kind api`.
    ApiTokens(ApiTokenList),
    /// `dashboard`: a one-time login URL.
    Login(LoginIssued),
    /// `identities`.
    Identities(IdentityList),
    /// `token list --kind join`.
    JoinTokens(JoinTokenList),
}

/// One identity as `identities` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdentityView {
    /// Agents: the capabilities it may claim.
    pub capabilities: Vec<String>,
    /// When it enrolled.
    pub created_at: Millis,
    /// Its certificate's SHA-256 (what `identity revoke --fingerprint` takes).
    pub fingerprint: String,
    /// Its name.
    pub name: String,
    /// When it was revoked.
    pub revoked_at: Option<Millis>,
    /// Its role.
    pub role: Role,
    /// Agents: the slots it may claim.
    pub slots: u32,
}

/// The `identities` answer, by role then name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdentityList {
    /// The identities listed.
    pub identities: Vec<IdentityView>,
    /// Identities matching, in all.
    pub total: usize,
    /// Whether some were left out (the answer's size bound).
    pub truncated: bool,
}

/// One join token not yet used or expired, without its secret.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JoinTokenView {
    /// Agents: the most capabilities it grants.
    pub capabilities: Option<Vec<String>>,
    /// When it was made.
    pub created_at: Millis,
    /// Who made it.
    pub created_by: String,
    /// Until when it is valid.
    pub expires_at: Millis,
    /// Its id: the start of its secret's hash, for `token revoke --kind join`.
    pub id: String,
    /// The only name that may enroll with it.
    pub name: Option<String>,
    /// The role it grants.
    pub role: Role,
    /// Agents: the most slots it grants.
    pub slots: Option<u32>,
}

/// The `token list --kind join` answer, soonest to expire first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JoinTokenList {
    /// The tokens.
    pub tokens: Vec<JoinTokenView>,
}

/// A new API token: the only time its secret is shown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiTokenIssued {
    /// Until when it is valid.
    pub expires_at: Millis,
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The token, to send as `Authorization: Bearer`.
    pub token: String,
}

/// One live API token, without its secret.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiTokenView {
    /// When it was made.
    pub created_at: Millis,
    /// Who made it.
    pub created_by: String,
    /// Until when it is valid.
    pub expires_at: Millis,
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// The live API tokens, by name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiTokenList {
    /// The tokens.
    pub tokens: Vec<ApiTokenView>,
}

/// A one-time dashboard login.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoginIssued {
    /// Until when it can be used.
    pub expires_at: Millis,
    /// The role the browser session gets.
    pub role: Role,
    /// The URL to open.
    pub url: String,
}

/// The `agents` answer: counts by state for the whole fleet, and the agents
/// themselves up to a byte budget.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentList {
    /// The agents listed, by name.
    pub agents: Vec<AgentView>,
    /// Every agent, counted by state.
    pub by_state: BTreeMap<&'static str, u64>,
    /// Agents in all.
    pub total: usize,
    /// Whether some were left out of `agents`.
    pub truncated: bool,
}

/// A page of agents by name (the dashboard's fleet view): counts by state for
/// the whole fleet, and where the next page starts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentPage {
    /// The agents on this page, by name.
    pub agents: Vec<AgentView>,
    /// Every agent, counted by state.
    pub by_state: BTreeMap<&'static str, u64>,
    /// The name to pass as `after` for the next page (`None`: this is the last).
    pub next_after: Option<String>,
    /// Agents in all.
    pub total: usize,
}

/// A task, as [`TaskView`] shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskAnswer {
    /// The task.
    pub task: TaskRecord,
    /// A submission's idempotency key named this task, made before.
    pub existing: bool,
}

impl Serialize for TaskAnswer {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.existing {
            TaskView::of_existing(&self.task).serialize(s)
        } else {
            TaskView::of(&self.task).serialize(s)
        }
    }
}

/// The `submit --batch` answer: each submission accepted or refused, in order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchAnswer {
    /// Submissions accepted (new tasks and ones a key named).
    pub accepted: usize,
    /// Submissions refused.
    pub refused: usize,
    /// One per submission, in order.
    pub results: Vec<BatchResult>,
}

/// What became of one submission of a batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum BatchResult {
    /// A task: new, or the one its idempotency key named.
    Accepted {
        /// The key named a task made before.
        #[serde(skip_serializing_if = "is_false")]
        existing: bool,
        /// The task.
        id: TaskId,
        /// Its state.
        state: TaskState,
    },
    /// Refused, and why.
    Refused {
        /// The kind of refusal.
        code: OpErrorCode,
        /// Why.
        error: String,
    },
}

fn is_false(b: &bool) -> bool {
    !b
}

/// The `token create` answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenIssued {
    /// The most capabilities it grants (`None`: what the host asks for).
    pub capabilities: Option<Vec<String>>,
    /// Until when it is valid.
    pub expires_at: Millis,
    /// The only name that may enroll with it.
    pub name: Option<String>,
    /// The role it grants.
    pub role: Role,
    /// The most slots it grants (`None`: what the host asks for).
    pub slots: Option<u32>,
    /// The token itself: the hub's prefix and the secret.
    pub token: String,
    /// Why the address in the token may not work from other machines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// The `agent revoke` and `identity revoke` answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Revoked {
    /// The identity's certificate fingerprint (`identity revoke` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Its name.
    pub name: String,
    /// Always `true`.
    pub revoked: bool,
    /// Its role.
    pub role: Role,
}

/// The `agent drain` and `agent undrain` answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Drained {
    /// Whether the agent is now drained.
    pub drained: bool,
    /// The agent.
    pub name: String,
}

/// The `agent set` answer: the agent's grant now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Grant {
    /// The capabilities it may claim.
    pub capabilities: Vec<String>,
    /// The agent.
    pub name: String,
    /// The slots it may claim.
    pub slots: u32,
}

/// The `alerts` answer: open alerts, oldest first, up to a byte budget.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertList {
    /// The alerts listed.
    pub alerts: Vec<AlertNote>,
    /// The latest raises and clears, newest first (at most [`crate::alerts::RECENT_MAX`]).
    pub recent: Vec<crate::alerts::AlertChange>,
    /// Open alerts in all.
    pub total: usize,
    /// Whether some were left out of `alerts`.
    pub truncated: bool,
}
