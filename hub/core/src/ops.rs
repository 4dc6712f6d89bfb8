//! Operator requests: dispatch, and the agent views and stats they answer with.

use std::collections::BTreeMap;

use muster_wire::limits::{self};
use muster_wire::msg::{OpError, OpErrorCode, OpRequest, Role};

use crate::model::*;

use crate::alerts::AlertState;
use crate::answer::{AgentList, AgentPage, AlertList, Answer, TokenIssued};
use crate::identity::check_token_grant;
use crate::views::{self, AgentView};
use crate::{Agent, Archive, Core, Event, Reply, Stats, Write};
use muster_wire::AgentName;

/// Who made an operator request: an identity's or an API token's name, and its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The identity's name, or `api:<token name>`.
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// What an operator request that the core serves comes to: an answer, or why not.
pub(crate) type Answered = Result<Answer, OpError>;

impl Core {
    pub(crate) fn on_op(
        &mut self,
        now: Millis,
        fingerprint: &str,
        request: OpRequest,
        token_secret: Option<(String, String)>,
        archive: &dyn Archive,
    ) -> Reply {
        let who = match self.authorize(fingerprint, &request) {
            Ok(who) => who,
            Err(e) => return Reply::Error(e),
        };
        if matches!(request, OpRequest::Stats) {
            return Reply::Stats(Box::new(self.stats()));
        }
        match self.answer(now, request, (fingerprint, &who), token_secret, archive) {
            Ok(answer) => Reply::Answer(answer),
            Err(e) => Reply::Error(e),
        }
    }

    fn answer(
        &mut self,
        now: Millis,
        request: OpRequest,
        (fingerprint, who): (&str, &Caller),
        token_secret: Option<(String, String)>,
        archive: &dyn Archive,
    ) -> Answered {
        match request {
            OpRequest::Agents => Ok(Answer::Agents(self.agents_reply(now))),
            OpRequest::AgentShow { name } => match self.agent_view(now, &name) {
                Some(v) => Ok(Answer::Agent(Box::new(v))),
                None => Err(not_found_agent(&name)),
            },
            OpRequest::AgentRevoke { name } => self.revoke(now, &name, &who.name),
            OpRequest::AgentDrain { name } => self.drain(now, &name, true, &who.name),
            OpRequest::AgentUndrain { name } => self.drain(now, &name, false, &who.name),
            OpRequest::TokenCreate {
                role,
                ttl_s,
                name,
                capabilities,
                slots,
            } => {
                if let Err(msg) =
                    check_token_grant(role, name.as_ref(), capabilities.as_deref(), slots)
                {
                    return Err(op_error(OpErrorCode::Invalid, &msg));
                }
                let Some((secret, hash)) = token_secret else {
                    return Err(op_error(
                        OpErrorCode::Internal,
                        "the hub could not draw a random secret (system RNG failed); see its log and try again",
                    ));
                };
                let rec = TokenRecord {
                    role,
                    created_by: who.name.clone(),
                    created_at: now,
                    expires_at: now.saturating_add(ttl_s.saturating_mul(1000)),
                    used_at: None,
                    name: name.map(String::from),
                    capabilities,
                    slots,
                };
                self.tokens.insert(hash.clone(), rec.clone());
                self.out.writes.push(Write::Token(hash, rec.clone()));
                self.push_event(
                    now,
                    Event::TokenCreated {
                        who: who.name.clone(),
                        role,
                        ttl_s,
                        name: rec.name.clone(),
                    },
                );
                Ok(Answer::Token(TokenIssued {
                    capabilities: rec.capabilities,
                    expires_at: rec.expires_at,
                    name: rec.name,
                    role,
                    slots: rec.slots,
                    token: format!("{}{secret}", self.token_prefix),
                    warning: self.token_warning.clone(),
                }))
            }
            OpRequest::Submit(req) => self.submit(now, req, &who.name, archive),
            OpRequest::SubmitBatch(reqs) => self.submit_batch(now, reqs, &who.name, archive),
            OpRequest::TaskCancel { id } => self.cancel(now, id, &who.name),
            OpRequest::TaskRequeue { id } => self.requeue(now, id, &who.name, archive),
            OpRequest::Alerts => {
                let all = self.alerts.list();
                let total = all.len();
                // The recent changes share the answer's byte budget: they go first
                // (half of it at most), the open alerts fill the rest.
                let (recent, _) = views::fit(self.alerts.recent(), views::REPLY_BYTES_MAX / 2);
                let budget = views::REPLY_BYTES_MAX.saturating_sub(views::json_len(&recent));
                let (alerts, left_out) =
                    views::fit(all.iter().map(|a| a.note(AlertState::Open)), budget);
                Ok(Answer::Alerts(AlertList {
                    alerts,
                    recent,
                    total,
                    truncated: left_out > 0,
                }))
            }
            OpRequest::IdentityRevoke(target) => self.revoke_target(now, target, &who.name),
            OpRequest::AgentSet {
                name,
                capabilities,
                slots,
            } => self.agent_set(now, &name, capabilities, slots, &who.name),
            OpRequest::ApiTokenCreate { role, ttl_s, name } => self.api_token_create(
                now,
                (role, ttl_s, name),
                (&who.name, who.role),
                token_secret,
            ),
            OpRequest::ApiTokens => self.api_tokens(now),
            OpRequest::ApiTokenRevoke { name } => self.api_token_revoke(now, &name, &who.name),
            OpRequest::DashboardLogin { role } => self.dashboard_login(
                now,
                role.unwrap_or(who.role),
                (fingerprint, who.role),
                token_secret,
            ),
            OpRequest::Identities { role, revoked } => Ok(self.identities_list(role, revoked)),
            OpRequest::JoinTokens => Ok(self.join_tokens(now)),
            OpRequest::JoinTokenRevoke { id } => self.join_token_revoke(now, &id, &who.name),
            OpRequest::Stats
            | OpRequest::Ping
            | OpRequest::Tasks { .. }
            | OpRequest::TaskShow { .. }
            | OpRequest::TaskLogs(_)
            | OpRequest::Watch { .. } => {
                Err(op_error(OpErrorCode::Internal, "served by the shell"))
            }
        }
    }

    /// The `agents` answer: counts by state for the whole fleet, and the agents
    /// themselves up to a byte budget, so a fleet of any size fits in one frame.
    ///
    /// Every agent is counted, but views are built (and measured) only for the
    /// leading agents in name order that fit the budget: with 10,000 agents about
    /// 1,800 fit, and building the other views only to drop them was most of the
    /// answer's time.
    pub(crate) fn agents_reply(&self, now: Millis) -> AgentList {
        let total = self.agents.len();
        let mut by_state: BTreeMap<&'static str, u64> = BTreeMap::new();
        for a in self.agents.values() {
            *by_state
                .entry(self.agent_state_kind(now, a).as_str())
                .or_default() += 1;
        }
        let mut names: Vec<&AgentName> = self.agents.keys().collect();
        names.sort_unstable();
        let mut agents = Vec::new();
        let mut bytes = 0;
        for name in names {
            let Some(v) = self.agent_view(now, name.as_str()) else {
                continue;
            };
            let n = views::json_len(&v);
            // A prefix in name order: the listing reads as "the first N agents".
            if bytes + n > AGENTS_REPLY_BYTES_MAX {
                break;
            }
            bytes += n;
            agents.push(v);
        }
        let truncated = agents.len() < total;
        AgentList {
            agents,
            by_state,
            total,
            truncated,
        }
    }

    /// A page of agents by name, after `after`, at most `limit` (clamped to
    /// [`AGENTS_PAGE_MAX`]), with counts by state for the whole fleet: the
    /// dashboard's fleet view, which must stay small and fast at 10,000 agents
    /// where the `agents` answer would be cut by its byte budget.
    pub fn agents_page(&self, now: Millis, after: Option<&str>, limit: usize) -> AgentPage {
        let limit = limit.clamp(1, AGENTS_PAGE_MAX);
        let mut names: Vec<&AgentName> = self.agents.keys().collect();
        names.sort();
        let mut by_state: BTreeMap<&'static str, u64> = BTreeMap::new();
        // Counting needs every agent's state, but only the page's agents get a full view.
        for a in self.agents.values() {
            *by_state
                .entry(self.agent_state_kind(now, a).as_str())
                .or_default() += 1;
        }
        let start = after.map_or(0, |a| names.partition_point(|n| n.as_str() <= a));
        let agents: Vec<AgentView> = names[start..]
            .iter()
            .take(limit)
            .filter_map(|n| self.agent_view(now, n.as_str()))
            .collect();
        let next_after = (start + agents.len() < names.len())
            .then(|| agents.last().map(|v| v.name.clone()))
            .flatten();
        AgentPage {
            agents,
            by_state,
            next_after,
            total: names.len(),
        }
    }

    /// Who may make `request` (see [`crate::web::role_allows`]): an enrolled
    /// identity, or an API token (`fingerprint` is then `api:<hash of its secret>`).
    /// The one role check for requests answered in the core and in the shell.
    pub fn authorize(&self, fingerprint: &str, request: &OpRequest) -> Result<Caller, OpError> {
        let who = match fingerprint.strip_prefix(crate::web::API_CALLER_PREFIX) {
            Some(hash) => self.api_caller(hash).map(|t| Caller {
                name: format!("api:{}", t.name),
                role: t.role,
            }),
            None => self.identity(fingerprint).map(|i| Caller {
                name: i.name.clone(),
                role: i.role,
            }),
        };
        let Some(who) = who else {
            return Err(op_error(
                OpErrorCode::Forbidden,
                "this credential is not enrolled at this hub, has expired or has been revoked",
            ));
        };
        if crate::web::role_allows(who.role, request) {
            return Ok(who);
        }
        let what = if request.is_task_write() {
            "submit, cancel or requeue tasks (role submitter or admin needed)"
        } else if request.is_write() {
            "change state or see credentials (role admin needed)"
        } else {
            "read (role operator, submitter or admin needed)"
        };
        Err(op_error(
            OpErrorCode::Forbidden,
            &format!("{} has role {} and may not {what}", who.name, who.role),
        ))
    }

    pub(crate) fn agent_view(&self, now: Millis, name: &str) -> Option<AgentView> {
        let a = self.agents.get(name)?;
        let (state, why) = self.agent_state(now, a);
        let mut view = AgentView::of(
            &a.rec,
            (state.as_str(), why),
            self.availability(now, a),
            a.tasks.len(),
            now,
        );
        view.workspace = a.workspace.as_str();
        Some(view)
    }

    /// online / suspect (missed 2 heartbeats) / offline, with the reason.
    pub(crate) fn agent_state(&self, now: Millis, a: &Agent) -> (AgentState, String) {
        let state = self.agent_state_kind(now, a);
        let age = now.saturating_sub(a.rec.last_seen.unwrap_or(0));
        let why = match state {
            AgentState::Online => String::new(),
            _ if a.rec.revoked => "revoked".into(),
            _ if a.conn.is_none() => "no session".into(),
            AgentState::Suspect => format!("missed heartbeats: last one {} s ago", age / 1000),
            _ => format!("no heartbeat for {} s", age / 1000),
        };
        (state, why)
    }

    /// online / suspect / offline without the reason: counting a whole fleet
    /// by state then allocates nothing per agent.
    pub(crate) fn agent_state_kind(&self, now: Millis, a: &Agent) -> AgentState {
        if a.rec.revoked || a.conn.is_none() {
            return AgentState::Offline;
        }
        let interval = self.policy.heartbeat_interval.as_millis() as u64;
        let age = now.saturating_sub(a.rec.last_seen.unwrap_or(0));
        let offline_after = (3 * interval).max(limits::IDLE_TIMEOUT.as_millis() as u64);
        if age > offline_after {
            AgentState::Offline
        } else if age > 2 * interval {
            AgentState::Suspect
        } else {
            AgentState::Online
        }
    }

    /// Whether the agent may get work now, and why not.
    pub(crate) fn availability(&self, now: Millis, a: &Agent) -> (bool, String) {
        let (state, why) = self.agent_state(now, a);
        if state != AgentState::Online {
            return (false, format!("{}: {why}", state.as_str()));
        }
        if a.rec.drained {
            return (false, "draining".into());
        }
        if a.stopping {
            return (false, "the sidecar is shutting down".into());
        }
        if let Some(until) = a.breaker_until {
            // Only a healthy heartbeat after the cooldown closes the circuit (see on_heartbeat).
            let when = if now < until {
                "until its cooldown ends at"
            } else {
                "until a healthy heartbeat; cooldown ended at"
            };
            return (false, format!("degraded: circuit open {when} {until}"));
        }
        if !a.self_test_passed {
            let problems = a
                .rec
                .self_test
                .as_ref()
                .map(|s| s.problems.join("; "))
                .unwrap_or_default();
            return (false, format!("self-test failed: {problems}"));
        }
        (true, String::new())
    }

    pub(crate) fn stats(&self) -> Stats {
        let c = &self.counters;
        let counts = self.live_counts();
        let live_by_state: BTreeMap<&'static str, u64> = TaskState::ALL
            .into_iter()
            .filter(|s| counts[s.index()] > 0)
            .map(|s| (s.as_str(), counts[s.index()]))
            .collect();
        Stats {
            finished: c.finished,
            completed: c.completed,
            assigned: c.assigned,
            heartbeats: c.heartbeats,
            stale_reports: c.stale_reports,
            duplicate_reports: c.duplicate_reports,
            outcomes: c.outcomes.iter().map(|(o, n)| (o.as_str(), *n)).collect(),
            live_by_state,
            agents: self.agents.len(),
            usage: crate::usage::UsageStats::from(&c.usage),
        }
    }

    // === Enrollment ===
}

/// Bytes of agent documents in one `agents` answer; the rest is counted, not listed
/// (a frame is at most 1 MiB; `agent show NAME` gives any one agent).
pub(crate) const AGENTS_REPLY_BYTES_MAX: usize = 768 * 1024;
/// Most agents on one page of [`Core::agents_page`]: a page's views are about
/// 600 bytes each, so a page stays well under the answer's byte budget.
pub const AGENTS_PAGE_MAX: usize = 500;

/// "42 s" or "31 min", for alert messages.
pub(crate) fn format_age(ms: Millis) -> String {
    if ms < 120_000 {
        format!("{} s", ms / 1000)
    } else {
        format!("{} min", ms / 60_000)
    }
}

pub(crate) fn op_error(code: OpErrorCode, message: &str) -> OpError {
    OpError {
        code,
        message: message.into(),
    }
}

pub(crate) fn not_found_agent(name: &str) -> OpError {
    op_error(
        OpErrorCode::NotFound,
        &format!("no agent named {name:?}; `muster-hub agents` lists them"),
    )
}
