//! The hub's durable store, in memory, with the safety checks that look at what
//! the hub committed: every batch of writes is folded in the way
//! `hub::store::Store::commit` would, and checked as it lands.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use muster_hub::core::{
    AgentRecord, Archive, AttemptRecord, Identity, Restored, TaskRecord, TaskState, Write,
};
use muster_protocol::msg::{HubMsg, Outcome};
use muster_protocol::{Generation, TaskId};

/// What the hub's redb would hold, plus what the checks need to remember.
#[derive(Debug, Default)]
pub(crate) struct HubStore {
    pub(crate) tasks: BTreeMap<TaskId, TaskRecord>,
    pub(crate) attempts: BTreeMap<(TaskId, Generation), AttemptRecord>,
    agents: BTreeMap<String, AgentRecord>,
    identities: BTreeMap<String, Identity>,
    keys: BTreeMap<String, TaskId>,
    next_task_id: u64,
    next_event_seq: u64,
    /// Non-terminal tasks.
    pub(crate) live: BTreeSet<TaskId>,
    /// Per task, the generations of attempts with no outcome yet.
    open: HashMap<TaskId, BTreeSet<Generation>>,
    /// Per task, transitions into `completed`.
    completions: HashMap<TaskId, u32>,
    /// Per task, attempts that ended `completed`.
    completed_attempts: HashMap<TaskId, u32>,
    /// Per task, operator requeues the hub acknowledged.
    pub(crate) requeues: HashMap<TaskId, u32>,
    /// Per task, the generation and agent of the latest `Assign` the hub sent.
    last_assign: HashMap<TaskId, (Generation, String)>,
    /// Per agent, the tasks with a live attempt on it.
    load: HashMap<String, BTreeSet<TaskId>>,
    /// Slots of every agent, for the load check.
    pub(crate) slots: HashMap<String, u32>,
}

impl Archive for HubStore {
    fn task(&self, id: TaskId) -> Option<TaskRecord> {
        self.tasks.get(&id).cloned()
    }
}

impl HubStore {
    /// Commits one batch (one transaction) and checks the records it touched once
    /// the whole batch is in. `requeued`: tasks whose operator requeue this batch
    /// acknowledges; only those may go from a terminal state back to a live one.
    pub(crate) fn commit(
        &mut self,
        writes: &[Write],
        requeued: &BTreeSet<TaskId>,
    ) -> Result<(), String> {
        let mut touched = BTreeSet::new();
        let mut agents = BTreeSet::new();
        for id in requeued {
            *self.requeues.entry(*id).or_default() += 1;
        }
        for w in writes {
            match w {
                Write::Task(t) => {
                    self.put_task(t, requeued)?;
                    touched.insert(t.id);
                    if let Some(a) = &t.agent {
                        agents.insert(a.clone());
                    }
                }
                Write::Attempt(a) => {
                    self.put_attempt(a)?;
                    touched.insert(a.task);
                }
                Write::Agent(a) => {
                    self.agents.insert(a.name.clone(), a.clone());
                }
                Write::Identity(i) => {
                    self.identities.insert(i.fingerprint.clone(), i.clone());
                }
                Write::Token(..) | Write::ApiToken(..) => {}
                Write::Key(k, id) => {
                    if let Some(old) = self.keys.insert(k.clone(), *id)
                        && old != *id
                    {
                        return Err(format!(
                            "idempotency key {k:?} moved from task {old} to task {id}"
                        ));
                    }
                }
                Write::Event { seq, .. } => self.next_event_seq = self.next_event_seq.max(seq + 1),
                Write::NextTaskId(n) => {
                    if *n < self.next_task_id {
                        return Err(format!(
                            "next task id went backwards: {} -> {n}",
                            self.next_task_id
                        ));
                    }
                    self.next_task_id = *n;
                }
            }
        }
        for id in touched {
            self.check_task(id)?;
        }
        // Slots are checked on the whole transaction: within a batch a slot may be
        // reused by a task written before the one that freed it.
        for agent in agents {
            let n = self.load.get(&agent).map_or(0, BTreeSet::len) as u32;
            let slots = self.slots.get(&agent).copied().unwrap_or(0);
            if n > slots {
                return Err(format!(
                    "agent {agent} has {n} live attempts in the store but {slots} slots: {:?}",
                    self.load.get(&agent)
                ));
            }
        }
        Ok(())
    }

    /// Whether the committed registry has `agent`.
    pub(crate) fn knows_agent(&self, agent: &str) -> bool {
        self.agents.contains_key(agent)
    }

    /// Whether the committed registry has `agent` drained.
    pub(crate) fn drained(&self, agent: &str) -> bool {
        self.agents.get(agent).is_some_and(|a| a.drained)
    }

    fn put_task(&mut self, t: &TaskRecord, requeued: &BTreeSet<TaskId>) -> Result<(), String> {
        let id = t.id;
        if let Some(old) = self.tasks.get(&id) {
            if t.generation < old.generation {
                return Err(format!(
                    "task {id}: generation went backwards in the store: {} -> {}",
                    old.generation, t.generation
                ));
            }
            let revived = !t.state.is_terminal() || old.state != t.state;
            if old.state.is_terminal() && revived && !requeued.contains(&id) {
                return Err(format!(
                    "task {id}: ended {} and then became {} without an acknowledged requeue",
                    old.state.as_str(),
                    t.state.as_str()
                ));
            }
            if t.state == TaskState::Completed && old.state != TaskState::Completed {
                *self.completions.entry(id).or_default() += 1;
            }
            if old.state.has_live_attempt()
                && let Some(a) = &old.agent
                && let Some(set) = self.load.get_mut(a)
            {
                set.remove(&id);
            }
        } else if t.state == TaskState::Completed {
            *self.completions.entry(id).or_default() += 1;
        }
        if t.state.has_live_attempt() {
            let Some(agent) = &t.agent else {
                return Err(format!("task {id} is {} with no agent", t.state.as_str()));
            };
            self.load.entry(agent.clone()).or_default().insert(id);
        }
        if t.state.is_terminal() {
            self.live.remove(&id);
        } else {
            self.live.insert(id);
        }
        self.tasks.insert(id, t.clone());
        Ok(())
    }

    fn put_attempt(&mut self, a: &AttemptRecord) -> Result<(), String> {
        let key = (a.task, a.generation);
        let old_outcome = self.attempts.get(&key).and_then(|o| o.outcome);
        if let Some(o) = old_outcome
            && a.outcome != Some(o)
        {
            return Err(format!(
                "attempt {}/{} ended {} and then changed to {:?}",
                a.task,
                a.generation,
                o.as_str(),
                a.outcome.map(Outcome::as_str)
            ));
        }
        if a.outcome == Some(Outcome::Completed) && old_outcome != Some(Outcome::Completed) {
            *self.completed_attempts.entry(a.task).or_default() += 1;
        }
        let open = self.open.entry(a.task).or_default();
        if a.outcome.is_none() {
            open.insert(a.generation);
        } else {
            open.remove(&a.generation);
        }
        self.attempts.insert(key, a.clone());
        Ok(())
    }

    /// The per-task safety properties, on the committed record.
    fn check_task(&self, id: TaskId) -> Result<(), String> {
        let Some(t) = self.tasks.get(&id) else {
            return Err(format!(
                "an attempt of task {id} was written without the task"
            ));
        };
        let open = self.open.get(&id).cloned().unwrap_or_default();
        if open.len() > 1 {
            return Err(format!(
                "task {id} has {} live attempts in the store: generations {open:?}",
                open.len()
            ));
        }
        if t.state.has_live_attempt() {
            if open.iter().next() != Some(&t.generation) {
                return Err(format!(
                    "task {id} is {} at generation {} but its open attempts are {open:?}",
                    t.state.as_str(),
                    t.generation
                ));
            }
            let agent = self.attempts.get(&(id, t.generation)).map(|a| &a.agent);
            if agent != t.agent.as_ref() {
                return Err(format!(
                    "task {id}: the task names agent {:?} but its live attempt is on {agent:?}",
                    t.agent
                ));
            }
        } else if !open.is_empty() {
            return Err(format!(
                "task {id} is {} but attempts {open:?} have no outcome",
                t.state.as_str()
            ));
        }
        let cycles = self.requeues.get(&id).copied().unwrap_or(0) + 1;
        let done = self.completions.get(&id).copied().unwrap_or(0);
        let done_attempts = self.completed_attempts.get(&id).copied().unwrap_or(0);
        if done > cycles || done_attempts > cycles {
            return Err(format!(
                "task {id} completed {done} times ({done_attempts} completed attempts) in {cycles} submission/requeue cycles"
            ));
        }
        if t.state == TaskState::Completed
            && self
                .attempts
                .get(&(id, t.generation))
                .and_then(|a| a.outcome)
                != Some(Outcome::Completed)
        {
            return Err(format!(
                "task {id} is completed but its attempt {} did not complete",
                t.generation
            ));
        }
        Ok(())
    }

    /// Checks a message the hub sends to `agent` against what it has committed.
    /// `stopped_later`: the same batch also sends this attempt's Abandon or Cancel.
    pub(crate) fn check_send(
        &mut self,
        agent: &str,
        msg: &HubMsg,
        stopped_later: bool,
    ) -> Result<(), String> {
        match msg {
            HubMsg::Assign(a) => {
                let Some(t) = self.tasks.get(&a.task) else {
                    return Err(format!(
                        "Assign of task {} that is not in the store",
                        a.task
                    ));
                };
                let ended_in_batch = stopped_later
                    && self
                        .attempts
                        .get(&(a.task, a.generation))
                        .is_some_and(|r| r.agent == agent && r.outcome.is_some());
                if !ended_in_batch && t.state != TaskState::Assigned
                    || t.generation != a.generation
                    || t.agent.as_deref() != Some(agent)
                {
                    return Err(format!(
                        "Assign {}/{} to {agent} but the store has it {} at generation {} on {:?}",
                        a.task,
                        a.generation,
                        t.state.as_str(),
                        t.generation,
                        t.agent
                    ));
                }
                if let Some((g, prev)) = self.last_assign.get(&a.task)
                    && (a.generation < *g || (a.generation == *g && prev != agent))
                {
                    return Err(format!(
                        "Assign {}/{} to {agent} after Assign {}/{g} to {prev}: generations must grow",
                        a.task, a.generation, a.task
                    ));
                }
                self.last_assign
                    .insert(a.task, (a.generation, agent.to_string()));
            }
            HubMsg::Abandon {
                task, generation, ..
            }
            | HubMsg::Cancel { task, generation } => {
                let current = self.tasks.get(task).is_some_and(|t| {
                    t.state.has_live_attempt()
                        && t.generation == *generation
                        && t.agent.as_deref() == Some(agent)
                });
                if current {
                    return Err(format!(
                        "the hub told {agent} to stop {task}/{generation}, which it still holds as the live attempt"
                    ));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// What a restarted hub loads (as `hub::store::Store::restore`).
    pub(crate) fn restored(&self) -> Restored {
        let live = self
            .live
            .iter()
            .filter_map(|id| self.tasks.get(id))
            .map(|t| {
                let attempt = (t.generation.0 > 0)
                    .then(|| self.attempts.get(&(t.id, t.generation)).cloned())
                    .flatten();
                (t.clone(), attempt)
            })
            .collect();
        Restored {
            live,
            agents: self.agents.values().cloned().collect(),
            identities: self.identities.values().cloned().collect(),
            tokens: Vec::new(),
            api_tokens: Vec::new(),
            keys: self.keys.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            next_task_id: self.next_task_id,
            next_event_seq: self.next_event_seq,
        }
    }

    /// Every attempt of every task has its outcome recorded (checked at the end).
    pub(crate) fn check_attempts_recorded(&self) -> Result<(), String> {
        for t in self.tasks.values() {
            for g in 1..=t.generation.0 {
                match self.attempts.get(&(t.id, Generation(g))) {
                    None => {
                        return Err(format!("task {}: attempt {g} was never recorded", t.id));
                    }
                    Some(a) if a.outcome.is_none() || a.ended_at.is_none() => {
                        return Err(format!(
                            "task {} ({}): attempt {g} on {} has no outcome",
                            t.id,
                            t.state.as_str(),
                            a.agent
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// One line about a task, for failure reports.
    pub(crate) fn describe(&self, id: TaskId) -> String {
        let Some(t) = self.tasks.get(&id) else {
            return format!("task {id}: not in the store");
        };
        let a = self.attempts.get(&(id, t.generation));
        format!(
            "task {id}: {} gen {} attempts {}/{} agent {:?} caps {:?} after {:?} not_before {:?} timeout {:?} reason {:?} attempt {:?}",
            t.state.as_str(),
            t.generation,
            t.attempts,
            t.max_attempts,
            t.agent,
            t.capabilities,
            t.after,
            t.not_before,
            t.timeout_ms,
            t.reason,
            a.map(|a| (a.assigned_at, a.accepted_at, a.started_at, a.outcome))
        )
    }

    /// A digest of the committed tasks, to compare two runs of one seed.
    pub(crate) fn digest(&self) -> u64 {
        let mut h: u64 = 0xCBF2_9CE4_8422_2325;
        let mut mix = |v: u64| {
            h ^= v;
            h = h.wrapping_mul(0x0100_0000_01B3);
        };
        for t in self.tasks.values() {
            mix(t.id.0);
            mix(t.generation.0);
            mix(t.state as u64);
            mix(t.updated_at);
        }
        h
    }
}
