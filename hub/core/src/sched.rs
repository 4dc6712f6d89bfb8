//! The ready queue and the scheduler.
//!
//! Order: priority (higher first), then fresh before retried, then submission
//! order. Tasks in backoff wait in `delayed` until their `not_before`. Only
//! live tasks are here, so the cost never grows with the number of finished ones.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use muster_wire::TaskId;
use muster_wire::msg::{Assign, HubMsg};

use super::{AttemptRecord, Core, Millis, TaskRecord, TaskState};

type Key = (Reverse<i32>, bool, TaskId);

/// Queued tasks, ready or waiting out a backoff.
#[derive(Debug, Default)]
pub(super) struct ReadyQueue {
    ready: BTreeSet<Key>,
    delayed: BTreeSet<(Millis, Key)>,
}

impl ReadyQueue {
    pub(super) fn insert(&mut self, rec: &TaskRecord, retried: bool) {
        let key = (Reverse(rec.priority), retried, rec.id);
        match rec.not_before {
            Some(t) => {
                self.delayed.insert((t, key));
            }
            None => {
                self.ready.insert(key);
            }
        }
    }

    pub(super) fn remove(&mut self, rec: &TaskRecord, retried: bool) {
        let key = (Reverse(rec.priority), retried, rec.id);
        if !self.ready.remove(&key)
            && let Some(t) = rec.not_before
        {
            self.delayed.remove(&(t, key));
        }
    }

    /// When the first task waiting out its backoff becomes ready.
    pub(super) fn next_delayed(&self) -> Option<Millis> {
        self.delayed.first().map(|(t, _)| *t)
    }

    /// Whether a queued task is in the queue, ready or waiting out its backoff.
    pub(super) fn holds(&self, rec: &TaskRecord, retried: bool) -> bool {
        let key = (Reverse(rec.priority), retried, rec.id);
        self.ready.contains(&key)
            || rec
                .not_before
                .is_some_and(|t| self.delayed.contains(&(t, key)))
    }

    /// Moves tasks whose backoff has passed into the ready set.
    fn promote(&mut self, now: Millis) {
        while let Some(&(t, key)) = self.delayed.first() {
            if t > now {
                break;
            }
            self.delayed.pop_first();
            self.ready.insert(key);
        }
    }
}

impl Core {
    /// Assigns ready tasks to eligible agents with free slots.
    pub(super) fn schedule(&mut self, now: Millis) {
        self.sched.promote(now);
        if self.sched.ready.is_empty() {
            return;
        }
        /// An agent that may take work now, borrowed for the pass: a task's pick
        /// compares these without a lookup or an allocation per candidate.
        struct Free<'a> {
            name: &'a str,
            capabilities: &'a [String],
            serves_repos: bool,
            free: usize,
            load: usize,
        }
        let mut free: Vec<Free<'_>> = self
            .agents
            .values()
            .filter(|a| a.conn.is_some() && self.availability(now, a).0)
            .filter_map(|a| {
                let slots = a.rec.slots as usize;
                let used = a.tasks.len();
                (slots > used).then_some(Free {
                    name: a.rec.name.as_str(),
                    capabilities: &a.rec.capabilities,
                    serves_repos: a.workspace.serves_repos(),
                    free: slots - used,
                    load: used,
                })
            })
            .collect();
        free.sort_by(|a, b| a.name.cmp(b.name));
        let mut total: usize = free.iter().map(|f| f.free).sum();
        let mut picks: Vec<(TaskId, String)> = Vec::new();
        for &(_, _, id) in &self.sched.ready {
            if total == 0 {
                break;
            }
            let Some(live) = self.tasks.get(&id) else {
                continue;
            };
            let caps = &live.rec.capabilities;
            let needs_git = live.rec.repo.is_some();
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, f)| f.free > 0)
                .filter(|(_, f)| {
                    caps.iter().all(|c| f.capabilities.contains(c))
                        && (!needs_git || f.serves_repos)
                })
                // Prefer an agent that has not failed this task, then the least
                // loaded, then by name (the list is in name order: the first wins).
                .min_by_key(|(_, f)| (live.failed_on.contains(f.name), f.load))
                .map(|(i, _)| i);
            if let Some(i) = best {
                free[i].free -= 1;
                free[i].load += 1;
                total -= 1;
                picks.push((id, free[i].name.to_string()));
            }
        }
        for (id, agent) in picks {
            self.assign(now, id, &agent);
        }
    }

    fn assign(&mut self, now: Millis, id: TaskId, agent_name: &str) {
        let Some(conn) = self.agents.get(agent_name).and_then(|a| a.conn) else {
            return;
        };
        let Some(live) = self.tasks.get_mut(&id) else {
            return;
        };
        // Leave the ready queue under the old key before the record changes.
        self.sched.remove(&live.rec, live.retried);
        live.rec.not_before = None;
        let retried = live.retried;
        if retried {
            self.alerts.note_retry(now);
        }
        live.rec.generation.0 += 1;
        live.rec.attempts += 1;
        live.rec.agent = Some(agent_name.to_string());
        live.seen.clear();
        let generation = live.rec.generation;
        live.attempt = Some(AttemptRecord {
            task: id,
            generation,
            agent: agent_name.to_string(),
            assigned_at: now,
            accepted_at: None,
            started_at: None,
            ended_at: None,
            outcome: None,
            error: None,
            pid: None,
            session: None,
            work: None,
            usage: None,
        });
        let spec = crate::tasks::spec_of(&live.rec);
        // set_state must not touch the ready queue again: mark the state first.
        Core::move_state(&mut self.live_by_state, &mut live.rec, TaskState::Assigned);
        self.counters.assigned += 1;
        if let Some(a) = self.agents.get_mut(agent_name) {
            a.tasks.insert(id);
        }
        self.set_state_assigned(now, id, agent_name);
        self.out.sends.push((
            conn,
            HubMsg::Assign(Assign {
                task: id,
                generation,
                spec,
            }),
        ));
        if retried {
            self.arm_alerts(now);
        }
    }

    fn set_state_assigned(&mut self, now: Millis, id: TaskId, agent: &str) {
        let Some(live) = self.tasks.get_mut(&id) else {
            return;
        };
        live.rec.updated_at = now;
        if let Some(a) = &live.attempt {
            self.out.writes.push(super::Write::Attempt(a.clone()));
        }
        let event =
            super::Event::task(&live.rec, TaskState::Queued, format!("assigned to {agent}"));
        self.touch(id);
        self.push_event(now, event);
    }
}

/// Most agents named in a "none available" reason; the rest are counted.
const REASONS_NAMED_MAX: usize = 3;

impl Core {
    /// Whether `a` could ever run a task needing `caps` (and a repository if
    /// `needs_git`): what it holds, not whether it is free now.
    fn matches(a: &crate::Agent, caps: &[String], needs_git: bool) -> bool {
        !a.rec.revoked
            && caps.iter().all(|c| a.rec.capabilities.contains(c))
            && (!needs_git || a.workspace.serves_repos())
    }

    /// Why no enrolled agent could ever run a task with these needs, if none could.
    fn unmatched(&self, caps: &[String], needs_git: bool) -> Option<String> {
        if self
            .agents
            .values()
            .any(|a| Self::matches(a, caps, needs_git))
        {
            return None;
        }
        let live = || self.agents.values().filter(|a| !a.rec.revoked);
        let missing: Vec<&str> = caps
            .iter()
            .filter(|c| !live().any(|a| a.rec.capabilities.contains(c)))
            .map(String::as_str)
            .collect();
        Some(if live().next().is_none() {
            "no agent is enrolled".into()
        } else if !missing.is_empty() {
            let s = if missing.len() == 1 { "y" } else { "ies" };
            format!("no agent has capabilit{s} {}", missing.join(", "))
        } else if needs_git && !live().any(|a| a.workspace.serves_repos()) {
            "no agent works on repositories (workspace mode \"git\")".into()
        } else if !caps.is_empty() {
            format!(
                "no agent has all of {}{}",
                caps.join(", "),
                if needs_git {
                    " and works on repositories"
                } else {
                    ""
                }
            )
        } else {
            "no agent works on repositories with the capabilities asked for".into()
        })
    }

    /// Why a live task is not running yet, in words (`task show`, `tasks`):
    /// what it waits for, or why nothing can run it; `None` once it is assigned.
    pub fn waiting_reason(&self, id: TaskId, now: Millis) -> Option<String> {
        let live = self.tasks.get(&id)?;
        let rec = &live.rec;
        match rec.state {
            TaskState::Blocked => {
                let waits: Vec<String> = rec
                    .after
                    .iter()
                    .filter(|d| self.tasks.contains_key(d))
                    .map(|d| d.to_string())
                    .collect();
                let s = if waits.len() == 1 { "" } else { "s" };
                return Some(format!("blocked by task{s} {}", waits.join(", ")));
            }
            TaskState::Queued => {}
            _ => return None,
        }
        let needs_git = rec.repo.is_some();
        if let Some(why) = self.unmatched(&rec.capabilities, needs_git) {
            return Some(why);
        }
        if let Some(t) = rec.not_before.filter(|t| *t > now) {
            return Some(format!(
                "backing off after a failed attempt; eligible again in {} s",
                (t - now).div_ceil(1000)
            ));
        }
        let matching: Vec<&crate::Agent> = {
            let mut m: Vec<&crate::Agent> = self
                .agents
                .values()
                .filter(|a| Self::matches(a, &rec.capabilities, needs_git))
                .collect();
            m.sort_by(|a, b| a.rec.name.cmp(&b.rec.name));
            m
        };
        let n = matching.len();
        let agents = if n == 1 { "agent" } else { "agents" };
        let unavailable: Vec<String> = matching
            .iter()
            .filter_map(|a| {
                let (ok, why) = if a.conn.is_some() {
                    self.availability(now, a)
                } else {
                    (false, "offline".into())
                };
                (!ok).then(|| format!("{} {why}", a.rec.name))
            })
            .collect();
        if unavailable.len() == n {
            let named: Vec<&str> = unavailable
                .iter()
                .take(REASONS_NAMED_MAX)
                .map(String::as_str)
                .collect();
            let more = n.saturating_sub(REASONS_NAMED_MAX);
            return Some(format!(
                "{n} matching {agents}, none available ({}{})",
                named.join("; "),
                if more > 0 {
                    format!("; {more} more")
                } else {
                    String::new()
                }
            ));
        }
        let busy = matching
            .iter()
            .filter(|a| a.tasks.len() >= a.rec.slots as usize)
            .count();
        if busy + unavailable.len() >= n {
            return Some(format!(
                "all {n} matching {agents} busy or unavailable ({busy} busy)"
            ));
        }
        let ahead = self
            .sched
            .ready
            .iter()
            .take_while(|(_, _, other)| *other != id)
            .count();
        Some(if ahead > 0 {
            format!("queued behind {ahead} tasks that go first")
        } else {
            "next to be assigned".into()
        })
    }

    /// The `unschedulable` alerts: queued tasks no enrolled agent could ever
    /// run, at most [`crate::alerts::FAILED_ALERTS_MAX`]. Needs are grouped, so
    /// the pass costs one scan of the agents per distinct set of needs.
    pub(crate) fn unschedulable(&self) -> Vec<(String, String)> {
        let mut verdicts: std::collections::HashMap<(&[String], bool), Option<String>> =
            std::collections::HashMap::new();
        let mut out = Vec::new();
        let mut queued: Vec<&crate::Live> = self
            .tasks
            .values()
            .filter(|l| l.rec.state == TaskState::Queued)
            .map(|l| &**l)
            .collect();
        queued.sort_by_key(|l| l.rec.id);
        for l in queued {
            let key = (l.rec.capabilities.as_slice(), l.rec.repo.is_some());
            let why = verdicts
                .entry(key)
                .or_insert_with(|| self.unmatched(key.0, key.1));
            if let Some(why) = why {
                out.push((
                    l.rec.id.to_string(),
                    format!("task {} ({}) cannot run: {why}", l.rec.id, l.rec.title),
                ));
                if out.len() >= crate::alerts::FAILED_ALERTS_MAX {
                    break;
                }
            }
        }
        out
    }
}
