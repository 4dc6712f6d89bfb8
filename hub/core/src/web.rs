//! Web access: API tokens for the HTTP API and one-time dashboard logins.
//!
//! An API token is a credential of its own (not a certificate): its secret's
//! SHA-256 is kept, never the secret, and a request made with it is
//! authorized as the caller `api:<hash>` with the token's role. A dashboard
//! login is a one-time secret bound to the identity that asked for it, kept
//! in memory only: it lives minutes, and a hub restart just means asking again.

use std::collections::HashMap;

use muster_wire::msg::{OpErrorCode, OpRequest, Role};
use serde::{Deserialize, Serialize};

use crate::answer::{Answer, ApiTokenIssued, ApiTokenList, ApiTokenView, LoginIssued, Revoked};
use crate::events::AuditAction;
use crate::model::Millis;
use crate::ops::{Answered, op_error};
use crate::{Core, Write};

/// Prefix of the caller fingerprint a request made with an API token carries.
pub const API_CALLER_PREFIX: &str = "api:";
/// Prefix of an API token's text, so a leaked one is recognisable (and greppable).
pub const API_TOKEN_PREFIX: &str = "muster_api_";
/// Most live API tokens: each is a small record, but a bound keeps a script
/// that creates one per run from growing the store without limit.
pub const API_TOKENS_MAX: usize = 1000;
/// Most dashboard logins outstanding at once.
pub const LOGINS_MAX: usize = 256;
/// Longest name of an API token.
pub const API_TOKEN_NAME_MAX: usize = 64;

/// An API token, keyed in the store by the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    /// Its name, unique among live tokens.
    pub name: String,
    /// The role requests made with it have.
    pub role: Role,
    /// Who created it.
    pub created_by: String,
    /// When.
    pub created_at: Millis,
    /// Until when it is valid.
    pub expires_at: Millis,
    /// When it was revoked.
    pub revoked_at: Option<Millis>,
}

impl ApiToken {
    fn live(&self, now: Millis) -> bool {
        self.revoked_at.is_none() && now < self.expires_at
    }
}

/// A dashboard login not yet redeemed.
#[derive(Debug, Clone)]
struct LoginGrant {
    fingerprint: String,
    role: Role,
    expires_at: Millis,
}

/// A redeemed dashboard login: whose session the browser gets, and its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    /// The identity (or `api:` caller) the session acts as.
    pub fingerprint: String,
    /// The session's role (at most the identity's).
    pub role: Role,
    /// The identity's name, for the page and the audit trail.
    pub name: String,
}

/// The web-facing state the core keeps.
#[derive(Debug, Default)]
pub(crate) struct Web {
    pub(crate) api_tokens: HashMap<String, ApiToken>,
    logins: HashMap<String, LoginGrant>,
    /// The dashboard's base URL (`None`: the dashboard is off) and login lifetime.
    dashboard: Option<(String, Millis)>,
}

impl Web {
    pub(crate) fn new(api_tokens: Vec<(String, ApiToken)>) -> Web {
        Web {
            api_tokens: api_tokens.into_iter().collect(),
            ..Web::default()
        }
    }
}

/// Whether a request of this kind is within `role`: admins anything,
/// submitters reads and task writes (submit, cancel, requeue), operators reads,
/// agents nothing. The one rule for identities, API tokens and dashboard
/// sessions alike.
pub fn role_allows(role: Role, request: &OpRequest) -> bool {
    match role {
        Role::Admin => true,
        Role::Submitter => !request.is_write() || request.is_task_write(),
        Role::Operator => !request.is_write(),
        Role::Agent => false,
    }
}

/// Whether `role` is no more than `of`.
fn within(role: Role, of: Role) -> bool {
    let rank = |r: Role| match r {
        Role::Agent => 0,
        Role::Operator => 1,
        Role::Submitter => 2,
        Role::Admin => 3,
    };
    rank(role) <= rank(of)
}

impl Core {
    /// Turns the dashboard on: logins point at `base_url` and live `login_ttl`.
    pub fn set_dashboard(&mut self, base_url: Option<String>, login_ttl: Millis) {
        self.web.dashboard = base_url.map(|u| (u.trim_end_matches('/').to_string(), login_ttl));
    }

    /// The live API token whose secret hashes to `hash`, with its name and role.
    pub(crate) fn api_caller(&self, hash: &str) -> Option<&ApiToken> {
        self.web
            .api_tokens
            .get(hash)
            .filter(|t| t.live(self.last_now))
    }

    pub(crate) fn api_token_create(
        &mut self,
        now: Millis,
        (role, ttl_s, name): (Role, u64, String),
        caller: (&str, Role),
        secret: Option<(String, String)>,
    ) -> Answered {
        let (who, caller_role) = caller;
        check_api_token_name(&name).map_err(|m| op_error(OpErrorCode::Invalid, &m))?;
        if role == Role::Agent || !within(role, caller_role) {
            return Err(op_error(
                OpErrorCode::Invalid,
                &format!(
                    "an API token's role is operator, submitter or admin, at most the creator's ({caller_role}); give --role operator, submitter or admin"
                ),
            ));
        }
        if ttl_s == 0 {
            return Err(op_error(
                OpErrorCode::Invalid,
                "--ttl must be longer than 0 s, e.g. --ttl 30d",
            ));
        }
        let live: Vec<&ApiToken> = self
            .web
            .api_tokens
            .values()
            .filter(|t| t.live(now))
            .collect();
        if live.iter().any(|t| t.name == name) {
            return Err(op_error(
                OpErrorCode::Conflict,
                &format!(
                    "a live API token is already named {name}; revoke it first (`muster-hub token revoke {name}`) or pick another name"
                ),
            ));
        }
        if live.len() >= API_TOKENS_MAX {
            return Err(op_error(
                OpErrorCode::Busy,
                &format!("{API_TOKENS_MAX} API tokens are live already; revoke unused ones"),
            ));
        }
        let Some((secret, hash)) = secret else {
            return Err(op_error(
                OpErrorCode::Internal,
                "the hub could not draw a random secret (system RNG failed); see its log and try again",
            ));
        };
        // Expired and revoked tokens go from memory when a new one is made; their
        // records stay in the store as the audit of what existed.
        self.web.api_tokens.retain(|_, t| t.live(now));
        let token = ApiToken {
            name: name.clone(),
            role,
            created_by: who.to_string(),
            created_at: now,
            expires_at: now.saturating_add(ttl_s.saturating_mul(1000)),
            revoked_at: None,
        };
        self.web.api_tokens.insert(hash.clone(), token.clone());
        self.out.writes.push(Write::ApiToken(hash, token.clone()));
        self.audit_event(
            now,
            who,
            AuditAction::ApiTokenCreate,
            &format!("{name} {role}"),
        );
        Ok(Answer::ApiToken(ApiTokenIssued {
            expires_at: token.expires_at,
            name,
            role,
            token: format!("{API_TOKEN_PREFIX}{secret}"),
        }))
    }

    pub(crate) fn api_tokens(&self, now: Millis) -> Answered {
        let mut tokens: Vec<ApiTokenView> = self
            .web
            .api_tokens
            .values()
            .filter(|t| t.live(now))
            .map(|t| ApiTokenView {
                created_at: t.created_at,
                created_by: t.created_by.clone(),
                expires_at: t.expires_at,
                name: t.name.clone(),
                role: t.role,
            })
            .collect();
        tokens.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Answer::ApiTokens(ApiTokenList { tokens }))
    }

    pub(crate) fn api_token_revoke(&mut self, now: Millis, name: &str, who: &str) -> Answered {
        let Some((hash, token)) = self
            .web
            .api_tokens
            .iter_mut()
            .find(|(_, t)| t.name == name && t.live(now))
        else {
            return Err(op_error(
                OpErrorCode::NotFound,
                &format!("no live API token named {name}; `muster-hub token list` lists them"),
            ));
        };
        token.revoked_at = Some(now);
        let (hash, token) = (hash.clone(), token.clone());
        self.out
            .writes
            .push(Write::ApiToken(hash.clone(), token.clone()));
        // Its open event streams end with the batch, as a certificate's do.
        self.out.revoked.push(format!("{API_CALLER_PREFIX}{hash}"));
        self.audit_event(now, who, AuditAction::ApiTokenRevoke, name);
        Ok(Answer::Revoked(Revoked {
            fingerprint: None,
            name: token.name,
            revoked: true,
            role: token.role,
        }))
    }

    pub(crate) fn dashboard_login(
        &mut self,
        now: Millis,
        role: Role,
        caller: (&str, Role),
        secret: Option<(String, String)>,
    ) -> Answered {
        let (fingerprint, caller_role) = caller;
        let Some((base, ttl)) = self.web.dashboard.clone() else {
            return Err(op_error(
                OpErrorCode::Conflict,
                "the dashboard is off; set listen under [dashboard] in hub.toml (e.g. \"127.0.0.1:7442\") and restart the hub",
            ));
        };
        if role == Role::Agent || !within(role, caller_role) {
            return Err(op_error(
                OpErrorCode::Forbidden,
                &format!(
                    "you have role {caller_role}; a dashboard session may have that role or less (--role operator)"
                ),
            ));
        }
        self.web.logins.retain(|_, g| g.expires_at > now);
        if self.web.logins.len() >= LOGINS_MAX {
            return Err(op_error(
                OpErrorCode::Busy,
                &format!(
                    "{LOGINS_MAX} login URLs are outstanding; wait for them to expire ({} s at most)",
                    ttl / 1000
                ),
            ));
        }
        let Some((secret, hash)) = secret else {
            return Err(op_error(
                OpErrorCode::Internal,
                "the hub could not draw a random secret (system RNG failed); see its log and try again",
            ));
        };
        let expires_at = now.saturating_add(ttl);
        self.web.logins.insert(
            hash,
            LoginGrant {
                fingerprint: fingerprint.to_string(),
                role,
                expires_at,
            },
        );
        Ok(Answer::Login(LoginIssued {
            expires_at,
            role,
            url: format!("{base}/login?token={secret}"),
        }))
    }

    /// Redeems a dashboard login by its secret's hash: once only, before it
    /// expires, and only while the identity it is bound to is live.
    ///
    /// # Errors
    /// Why the login is refused, in words for the browser.
    pub fn redeem_login(&mut self, now: Millis, hash: &str) -> Result<Login, &'static str> {
        let Some(grant) = self.web.logins.remove(hash) else {
            return Err(
                "this login link is unknown or was already used; run `muster-hub dashboard` for a new one",
            );
        };
        if grant.expires_at <= now {
            return Err("this login link has expired; run `muster-hub dashboard` for a new one");
        }
        let Some(name) = self.caller_name(&grant.fingerprint) else {
            return Err("the identity this login link was made for has been revoked");
        };
        Ok(Login {
            fingerprint: grant.fingerprint,
            role: grant.role,
            name,
        })
    }

    /// The name of a live caller (identity or API token), if it is live.
    fn caller_name(&self, fingerprint: &str) -> Option<String> {
        match fingerprint.strip_prefix(API_CALLER_PREFIX) {
            Some(hash) => self.api_caller(hash).map(|t| format!("api:{}", t.name)),
            None => self.identity(fingerprint).map(|i| i.name.clone()),
        }
    }
}

/// An API token's name: 1 to 64 of letters, digits, `-`, `_` and `.`.
fn check_api_token_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= API_TOKEN_NAME_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "API token name {name:?} must be 1 to {API_TOKEN_NAME_MAX} letters, digits, '-', '_' or '.', e.g. --name ci-bot"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_nest() {
        let submit = OpRequest::Submit(Default::default());
        assert!(role_allows(Role::Admin, &submit));
        assert!(!role_allows(Role::Operator, &submit));
        assert!(role_allows(Role::Operator, &OpRequest::Agents));
        assert!(!role_allows(Role::Operator, &OpRequest::ApiTokens));
        assert!(!role_allows(Role::Agent, &OpRequest::Agents));
        assert!(role_allows(Role::Submitter, &submit));
        assert!(role_allows(
            Role::Submitter,
            &OpRequest::TaskCancel {
                id: muster_wire::TaskId(1)
            }
        ));
        assert!(!role_allows(
            Role::Submitter,
            &OpRequest::AgentDrain { name: "a".into() }
        ));
        assert!(!role_allows(Role::Submitter, &OpRequest::ApiTokens));
        assert!(within(Role::Operator, Role::Submitter));
        assert!(within(Role::Submitter, Role::Admin));
        assert!(within(Role::Operator, Role::Admin));
        assert!(!within(Role::Admin, Role::Operator));
    }

    #[test]
    fn token_names_are_checked() {
        assert!(check_api_token_name("ci-bot.1_x").is_ok());
        assert!(check_api_token_name("").is_err());
        assert!(check_api_token_name("a b").is_err());
        assert!(check_api_token_name(&"x".repeat(65)).is_err());
    }
}
