//! Identities: enrollment with join tokens, names, grants, drain and revocation.

use muster_wire::limits::{self};
use muster_wire::msg::{EnrollRefusal, HubMsg, OpErrorCode, Refused, Role};

use crate::model::*;

use crate::answer::{
    Answer, Drained, Grant, IdentityList, IdentityView, JoinTokenList, JoinTokenView, Revoked,
};
use crate::events::{AuditAction, Event};
use crate::ops::{Answered, not_found_agent, op_error};
use crate::tasks::check_capabilities;
use crate::{Core, Write};

/// Hex digits of a join token's hash that `token list` shows as its id.
const TOKEN_ID_LEN: usize = 12;

impl Core {
    /// `identities`: by role, then name; revoked ones only when asked.
    pub(crate) fn identities_list(&self, role: Option<Role>, revoked: bool) -> Answer {
        let mut ids: Vec<&Identity> = self
            .identities
            .values()
            .filter(|i| role.is_none_or(|r| i.role == r) && (revoked || i.revoked_at.is_none()))
            .collect();
        ids.sort_by(|a, b| {
            (a.role.as_str(), &a.name, a.created_at).cmp(&(b.role.as_str(), &b.name, b.created_at))
        });
        let total = ids.len();
        let (identities, left_out) = crate::views::fit(
            ids.into_iter().map(|i| IdentityView {
                capabilities: i.capabilities.clone(),
                created_at: i.created_at,
                fingerprint: i.fingerprint.clone(),
                name: i.name.clone(),
                revoked_at: i.revoked_at,
                role: i.role,
                slots: i.slots,
            }),
            crate::views::REPLY_BYTES_MAX,
        );
        Answer::Identities(IdentityList {
            identities,
            total,
            truncated: left_out > 0,
        })
    }

    /// `token list --kind join`: tokens that can still enroll, soonest to expire first.
    pub(crate) fn join_tokens(&self, now: Millis) -> Answer {
        let mut tokens: Vec<JoinTokenView> = self
            .tokens
            .iter()
            .filter(|(_, t)| t.used_at.is_none() && t.expires_at > now)
            .map(|(hash, t)| JoinTokenView {
                capabilities: t.capabilities.clone(),
                created_at: t.created_at,
                created_by: t.created_by.clone(),
                expires_at: t.expires_at,
                id: hash.chars().take(TOKEN_ID_LEN).collect(),
                name: t.name.clone(),
                role: t.role,
                slots: t.slots,
            })
            .collect();
        tokens.sort_by(|a, b| (a.expires_at, &a.id).cmp(&(b.expires_at, &b.id)));
        Answer::JoinTokens(JoinTokenList { tokens })
    }

    /// `token revoke --kind join ID`: the token expires now, so enrolling with it
    /// is refused; its record stays as the audit of what existed.
    pub(crate) fn join_token_revoke(&mut self, now: Millis, id: &str, who: &str) -> Answered {
        let id = id.to_ascii_lowercase();
        if id.len() < 8 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(op_error(
                OpErrorCode::Invalid,
                "give the token's id as `token list` shows it (at least 8 hex digits)",
            ));
        }
        let mut hits = self
            .tokens
            .iter()
            .filter(|(h, t)| h.starts_with(&id) && t.used_at.is_none() && t.expires_at > now)
            .map(|(h, _)| h.clone());
        let hash = match (hits.next(), hits.next()) {
            (Some(h), None) => h,
            (None, _) => {
                return Err(op_error(
                    OpErrorCode::NotFound,
                    &format!(
                        "no unused join token has id {id}; `muster-hub token list` lists them"
                    ),
                ));
            }
            (Some(_), Some(_)) => {
                return Err(op_error(
                    OpErrorCode::Invalid,
                    &format!("{id} matches several tokens; give more digits"),
                ));
            }
        };
        let Some(t) = self.tokens.get_mut(&hash) else {
            return Err(op_error(OpErrorCode::NotFound, "the token went away"));
        };
        t.expires_at = now;
        let rec = t.clone();
        self.out
            .writes
            .push(Write::Token(hash.clone(), rec.clone()));
        self.audit_event(
            now,
            who,
            AuditAction::JoinTokenRevoke,
            &hash[..TOKEN_ID_LEN.min(hash.len())],
        );
        Ok(Answer::Revoked(Revoked {
            fingerprint: None,
            name: hash[..TOKEN_ID_LEN.min(hash.len())].to_string(),
            revoked: true,
            role: rec.role,
        }))
    }

    /// `agent revoke NAME`: the live agent identity of that name (never an operator's).
    pub(crate) fn revoke(&mut self, now: Millis, name: &str, who: &str) -> Answered {
        let fp = self
            .live_identity(Role::Agent, name)
            .map(|i| i.fingerprint.clone());
        if fp.is_none() && !self.agents.contains_key(name) {
            return Err(not_found_agent(name));
        }
        if let Some(fp) = fp {
            self.revoke_identity(now, &fp);
        } else if let Some(agent) = self.agents.get_mut(name) {
            // Registered but with no live identity: mark the registry entry all the same.
            agent.rec.revoked = true;
            self.out.writes.push(Write::Agent(agent.rec.clone()));
        }
        self.audit_event(now, who, AuditAction::AgentRevoke, name);
        Ok(Answer::Revoked(Revoked {
            fingerprint: None,
            name: name.into(),
            revoked: true,
            role: Role::Agent,
        }))
    }

    /// `identity revoke`: one identity by role and name, or by fingerprint.
    pub(crate) fn revoke_target(
        &mut self,
        now: Millis,
        target: muster_wire::msg::IdentityTarget,
        who: &str,
    ) -> Answered {
        use muster_wire::msg::IdentityTarget;
        let found = match &target {
            IdentityTarget::Named { role, name } => self
                .identities
                .values()
                .find(|i| i.role == *role && i.name == *name && i.revoked_at.is_none())
                .cloned()
                .ok_or_else(|| {
                    format!(
                        "no live {role} identity named {name}; `muster-hub identities` lists them"
                    )
                }),
            IdentityTarget::Fingerprint(prefix) => {
                let prefix = prefix.to_ascii_lowercase();
                if prefix.len() < 8 {
                    return Err(op_error(
                        OpErrorCode::Invalid,
                        "give at least 8 hex digits of the fingerprint",
                    ));
                }
                let mut hits = self
                    .identities
                    .values()
                    .filter(|i| i.fingerprint.starts_with(&prefix));
                match (hits.next(), hits.next()) {
                    (Some(i), None) => Ok(i.clone()),
                    (None, _) => Err(format!("no identity has a fingerprint starting {prefix}")),
                    (Some(_), Some(_)) => {
                        return Err(op_error(
                            OpErrorCode::Invalid,
                            &format!("{prefix} matches several fingerprints; give more digits"),
                        ));
                    }
                }
            }
        };
        let id = match found {
            Ok(i) => i,
            Err(msg) => return Err(op_error(OpErrorCode::NotFound, &msg)),
        };
        if id.revoked_at.is_some() {
            return Err(op_error(
                OpErrorCode::Conflict,
                &format!("{} {} is already revoked", id.role, id.name),
            ));
        }
        if id.role == Role::Admin {
            let admins = self
                .identities
                .values()
                .filter(|i| i.role == Role::Admin && i.revoked_at.is_none())
                .count();
            if admins <= 1 {
                return Err(op_error(
                    OpErrorCode::Conflict,
                    &format!(
                        "{} is the last admin identity; enroll another admin (`muster-hub token create --role admin`, then `login`) before revoking this one",
                        id.name
                    ),
                ));
            }
        }
        self.revoke_identity(now, &id.fingerprint);
        self.audit_event(
            now,
            who,
            AuditAction::IdentityRevoke,
            &format!(
                "{} {} {}",
                id.role,
                id.name,
                &id.fingerprint[..16.min(id.fingerprint.len())]
            ),
        );
        Ok(Answer::Revoked(Revoked {
            fingerprint: Some(id.fingerprint),
            name: id.name,
            revoked: true,
            role: id.role,
        }))
    }

    /// The live identity holding `name` in `role`'s namespace.
    pub(crate) fn live_identity(&self, role: Role, name: &str) -> Option<&Identity> {
        self.identities
            .values()
            .find(|i| i.name == name && i.same_namespace(role) && i.revoked_at.is_none())
    }

    /// Revokes one identity and cuts what it holds: an agent's session at once, and
    /// (through `Output::revoked`) every connection and stream of that certificate.
    pub(crate) fn revoke_identity(&mut self, now: Millis, fingerprint: &str) {
        let Some(i) = self.identities.get_mut(fingerprint) else {
            return;
        };
        i.revoked_at = Some(now);
        let id = i.clone();
        self.out.writes.push(Write::Identity(id.clone()));
        self.out.revoked.push(id.fingerprint.clone());
        if id.role != Role::Agent {
            return;
        }
        if let Some(agent) = self.agents.get_mut(id.name.as_str()) {
            agent.rec.revoked = true;
            self.out.writes.push(Write::Agent(agent.rec.clone()));
            if let Some(conn) = agent.conn.take() {
                self.conns.remove(&conn);
                agent.offline_since = Some(now);
                self.out
                    .sends
                    .push((conn, HubMsg::Refused(Refused::Revoked)));
                self.out.closes.push(conn);
            }
        }
        self.arm_offline(&id.name);
        self.dirty_schedule = true;
    }

    /// `agent set`: changes an agent's grant; its live session keeps only what the
    /// new grant allows, at once.
    pub(crate) fn agent_set(
        &mut self,
        now: Millis,
        name: &str,
        capabilities: Option<Vec<String>>,
        slots: Option<u32>,
        who: &str,
    ) -> Answered {
        if let Err(msg) = check_token_grant(Role::Agent, None, capabilities.as_deref(), slots) {
            return Err(op_error(OpErrorCode::Invalid, &msg));
        }
        if capabilities.is_none() && slots.is_none() {
            return Err(op_error(
                OpErrorCode::Invalid,
                "nothing to change; give --capability C (repeatable), --no-capabilities or --slots N",
            ));
        }
        let Some(fp) = self
            .live_identity(Role::Agent, name)
            .map(|i| i.fingerprint.clone())
        else {
            return Err(not_found_agent(name));
        };
        let Some(id) = self.identities.get_mut(&fp) else {
            return Err(not_found_agent(name));
        };
        if let Some(c) = capabilities {
            id.capabilities = c;
        }
        if let Some(s) = slots {
            id.slots = s;
        }
        let id = id.clone();
        self.out.writes.push(Write::Identity(id.clone()));
        if let Some(agent) = self.agents.get_mut(name) {
            agent
                .rec
                .capabilities
                .retain(|c| id.capabilities.contains(c));
            agent.rec.slots = agent.rec.slots.min(id.slots);
            self.out.writes.push(Write::Agent(agent.rec.clone()));
        }
        self.audit_event(now, who, AuditAction::AgentSet, name);
        self.dirty_schedule = true;
        Ok(Answer::Grant(Grant {
            capabilities: id.capabilities,
            name: name.into(),
            slots: id.slots,
        }))
    }

    pub(crate) fn drain(&mut self, now: Millis, name: &str, drained: bool, who: &str) -> Answered {
        let Some(agent) = self.agents.get_mut(name) else {
            return Err(not_found_agent(name));
        };
        agent.rec.drained = drained;
        self.out.writes.push(Write::Agent(agent.rec.clone()));
        self.audit_event(
            now,
            who,
            if drained {
                AuditAction::AgentDrain
            } else {
                AuditAction::AgentUndrain
            },
            name,
        );
        self.dirty_schedule = true;
        Ok(Answer::Drained(Drained {
            drained,
            name: name.into(),
        }))
    }

    /// Whether an enrollment may go ahead (token, role, name, key, grant) and
    /// what it grants. The shell asks this before it signs the CSR, so a
    /// request without a good token costs no signature; `on_enroll` asks again
    /// when it commits, since the token may have been used in between.
    pub fn check_enroll(
        &self,
        now: Millis,
        secret_hash: &str,
        role: Role,
        name: &str,
        key_fingerprint: &str,
        (asked_caps, asked_slots): (Vec<String>, u32),
    ) -> Result<EnrollGrant, EnrollRefusal> {
        let Some(token) = self.tokens.get(secret_hash) else {
            return Err(EnrollRefusal::UnknownToken);
        };
        if let Some(at) = token.used_at {
            return Err(EnrollRefusal::AlreadyUsed { at_unix: at / 1000 });
        }
        if now >= token.expires_at {
            return Err(EnrollRefusal::Expired {
                at_unix: token.expires_at / 1000,
            });
        }
        if token.role != role {
            return Err(EnrollRefusal::WrongRole {
                token: token.role,
                requested: role,
            });
        }
        // Names are checked again here: the core must not trust its shell's decoding.
        if let Err(e) = muster_wire::AgentName::new(name) {
            return Err(EnrollRefusal::BadRequest {
                reason: format!("name: {e}"),
            });
        }
        if name == RESERVED_NAME {
            return Err(EnrollRefusal::NameRefused {
                reason: format!(
                    "{RESERVED_NAME:?} is reserved for the hub's own admin credential; pick another --name"
                ),
            });
        }
        if let Some(bound) = token.name.as_deref().filter(|b| *b != name) {
            return Err(EnrollRefusal::NameRefused {
                reason: format!(
                    "this token is for the name {bound}, not {name}; enroll with --name {bound}"
                ),
            });
        }
        let replaces = token.name.is_some();
        let holder = self.live_identity(role, name).cloned();
        if let Some(h) = &holder
            && !replaces
        {
            return Err(EnrollRefusal::NameTaken {
                name: name.into(),
                holder: h.fingerprint.chars().take(16).collect(),
                enrolled_at_unix: h.created_at / 1000,
            });
        }
        let revoked_key = self
            .identities
            .values()
            .any(|i| i.key_fingerprint == key_fingerprint && i.revoked_at.is_some());
        if revoked_key {
            return Err(EnrollRefusal::RevokedKey);
        }
        let (capabilities, slots) = if role == Role::Agent {
            grant_for(token, asked_caps, asked_slots)
                .map_err(|reason| EnrollRefusal::NotGranted { reason })?
        } else {
            (Vec::new(), 0)
        };
        Ok(EnrollGrant {
            capabilities,
            slots,
            replaces: holder,
        })
    }

    pub(crate) fn on_enroll(
        &mut self,
        now: Millis,
        secret_hash: &str,
        role: Role,
        name: &str,
        (cert_pem, fingerprint, key_fingerprint): (String, String, String),
        grant: (Vec<String>, u32),
    ) -> muster_wire::msg::EnrollResponse {
        use muster_wire::msg::EnrollResponse;
        let EnrollGrant {
            capabilities,
            slots,
            replaces: holder,
        } = match self.check_enroll(now, secret_hash, role, name, &key_fingerprint, grant) {
            Ok(g) => g,
            Err(why) => return EnrollResponse::Refused(why),
        };
        let Some(token) = self.tokens.get(secret_hash) else {
            return EnrollResponse::Refused(EnrollRefusal::UnknownToken);
        };
        let mut token = token.clone();
        token.used_at = Some(now);
        self.tokens.insert(secret_hash.into(), token.clone());
        self.out
            .writes
            .push(Write::Token(secret_hash.into(), token));
        // Replacing a host: the old identity goes in the same commit as the new one.
        if let Some(h) = holder {
            self.revoke_identity(now, &h.fingerprint);
            self.push_event(
                now,
                Event::IdentityReplaced {
                    who: name.into(),
                    role,
                    old_fingerprint: h.fingerprint,
                },
            );
        }
        let id = Identity {
            name: name.into(),
            role,
            fingerprint: fingerprint.clone(),
            key_fingerprint,
            created_at: now,
            revoked_at: None,
            capabilities,
            slots,
        };
        self.identities.insert(fingerprint, id.clone());
        self.out.writes.push(Write::Identity(id));
        if role == Role::Agent
            && let Some(agent) = self.agents.get_mut(name)
        {
            // Re-enrolled under a fresh key: no longer revoked.
            agent.rec.revoked = false;
            self.out.writes.push(Write::Agent(agent.rec.clone()));
        }
        self.push_event(
            now,
            Event::Enrolled {
                who: name.into(),
                role,
            },
        );
        EnrollResponse::Enrolled {
            cert_pem,
            ca_pem: String::new(),
        }
    }

    // === Events ===
}

/// What an enrollment that passed [`Core::check_enroll`] grants.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrollGrant {
    /// The capabilities the identity gets.
    pub capabilities: Vec<String>,
    /// Its task slots (agents only).
    pub slots: u32,
    /// The live identity of the same name that this one replaces (a name-bound token).
    pub replaces: Option<Identity>,
}

/// The name of the hub's own admin credential; nobody may enroll under it.
pub(crate) const RESERVED_NAME: &str = "admin";

/// Checks what a token (or `agent set`) grants.
pub(crate) fn check_token_grant(
    role: Role,
    name: Option<&muster_wire::AgentName>,
    caps: Option<&[String]>,
    slots: Option<u32>,
) -> Result<(), String> {
    if name.is_some_and(|n| n.as_str() == RESERVED_NAME) {
        return Err(format!(
            "{RESERVED_NAME:?} is reserved for the hub's own admin credential; pick another name"
        ));
    }
    if role != Role::Agent && (caps.is_some() || slots.is_some()) {
        return Err(format!(
            "capabilities and slots are granted to agents only, not to role {role}"
        ));
    }
    if let Some(c) = caps {
        check_capabilities(c)?;
    }
    if let Some(s) = slots
        && !(1..=limits::SLOTS_MAX).contains(&s)
    {
        return Err(format!("--slots {s}: use 1 to {}", limits::SLOTS_MAX));
    }
    Ok(())
}

/// What an agent enrollment is granted: the token's grant where it sets one, else
/// what the host asked for; asking beyond the token's grant is refused.
pub(crate) fn grant_for(
    token: &TokenRecord,
    asked_caps: Vec<String>,
    asked_slots: u32,
) -> Result<(Vec<String>, u32), String> {
    check_capabilities(&asked_caps)?;
    let asked_slots = asked_slots.max(1);
    if asked_slots > limits::SLOTS_MAX {
        return Err(format!(
            "{asked_slots} slots asked; the limit is {}",
            limits::SLOTS_MAX
        ));
    }
    let caps = match &token.capabilities {
        Some(granted) => {
            let extra: Vec<&str> = asked_caps
                .iter()
                .filter(|c| !granted.contains(c))
                .map(String::as_str)
                .collect();
            if !extra.is_empty() {
                return Err(format!(
                    "capabilities {} asked, but the token grants only [{}]",
                    extra.join(", "),
                    granted.join(", ")
                ));
            }
            granted.clone()
        }
        None => asked_caps,
    };
    let slots = match token.slots {
        Some(granted) if asked_slots > granted => {
            return Err(format!(
                "{asked_slots} slots asked, but the token grants {granted}"
            ));
        }
        Some(granted) => granted,
        None => asked_slots,
    };
    Ok((caps, slots))
}
