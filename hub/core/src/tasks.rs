//! The task state machine: admission of submissions, attempts and their ends,
//! retries with backoff, dependencies, cancel and requeue.

use std::collections::{BTreeSet, HashSet};

use muster_wire::limits::{self};
use muster_wire::msg::{
    Failure, HubMsg, OpError, OpErrorCode, Outcome, SubmitRequest, TaskSpec, TimeoutAction,
};
use muster_wire::pace::Backoff;
use muster_wire::work;
use muster_wire::{Generation, TaskId};

use crate::model::*;

use crate::Archive;
use crate::alerts::AlertKind;
use crate::answer::{Answer, BatchAnswer, BatchResult, TaskAnswer};
use crate::events::{AgentChange, AuditAction, Event, push_audit};
use crate::ops::{Answered, op_error};
use crate::timers::Due;
use crate::{Core, Live, Write};

impl Core {
    pub(crate) fn insert_live(&mut self, rec: TaskRecord, attempt: Option<AttemptRecord>) {
        let id = rec.id;
        *self
            .per_submitter
            .entry(submitter(&rec).to_string())
            .or_default() += 1;
        let retried = rec.attempts > 0;
        if rec.state == TaskState::Queued {
            self.sched.insert(&rec, retried);
        }
        if rec.state == TaskState::Blocked {
            for dep in &rec.after {
                self.waiting_on.entry(*dep).or_default().insert(id);
            }
        }
        let checked_generation = rec.generation;
        Core::count_state(&mut self.live_by_state, None, Some(rec.state));
        let replaced = self.tasks.insert(
            id,
            Box::new(Live {
                rec,
                attempt,
                seen: HashSet::new(),
                failed_on: BTreeSet::new(),
                retried,
                checked_generation,
                armed_at: None,
                activity: None,
            }),
        );
        if let Some(old) = replaced {
            Core::count_state(&mut self.live_by_state, Some(old.rec.state), None);
        }
        self.arm_attempt(id);
    }

    pub(crate) fn set_state(&mut self, now: Millis, id: TaskId, to: TaskState, why: &str) {
        let Some(live) = self.tasks.get_mut(&id) else {
            return;
        };
        let from = live.rec.state;
        if from == TaskState::Queued {
            self.sched.remove(&live.rec, live.retried);
        }
        Core::move_state(&mut self.live_by_state, &mut live.rec, to);
        live.rec.updated_at = now;
        if to == TaskState::Queued {
            self.sched.insert(&live.rec, live.retried);
            self.dirty_schedule = true;
        }
        if let Some(a) = &live.attempt {
            self.out.writes.push(Write::Attempt(a.clone()));
        }
        let event = Event::task(&live.rec, from, why.to_string());
        let failed = (to == TaskState::Failed).then(|| {
            format!(
                "task {id} ({}) failed for good: {}",
                live.rec.title,
                live.rec.reason.as_deref().unwrap_or_default()
            )
        });
        self.touch(id);
        self.push_event(now, event);
        if let Some(msg) = failed {
            self.alert_raise(now, AlertKind::TaskFailed, &id.to_string(), msg);
        }
        if to == TaskState::Completed {
            self.alerts.note_completion(now);
        }
        if to == TaskState::Running && from != TaskState::Running {
            let submitted = self.tasks.get(&id).map_or(now, |l| l.rec.submitted_at);
            self.out.dispatch_ms.push(now.saturating_sub(submitted));
        }
        if to.is_terminal() {
            *self.counters.finished_by_state.entry(to).or_default() += 1;
        }
        if to.is_terminal() {
            self.finish_task(now, id);
        }
    }

    /// Ends the current attempt of a live task and decides what comes next.
    pub(crate) fn end_attempt(
        &mut self,
        now: Millis,
        id: TaskId,
        outcome: Outcome,
        error: Option<Failure>,
        no_retry: bool,
    ) {
        let Some(live) = self.tasks.get_mut(&id) else {
            return;
        };
        let Some(attempt) = live.attempt.as_mut().filter(|a| a.outcome.is_none()) else {
            return;
        };
        attempt.ended_at = Some(now);
        attempt.outcome = Some(outcome);
        attempt.error = error.clone();
        let agent_name = attempt.agent.clone();
        let generation = attempt.generation;
        *self.counters.outcomes.entry(outcome).or_default() += 1;
        if outcome != Outcome::Completed {
            live.failed_on.insert(agent_name.clone());
            live.retried = true;
        }
        let reason = error.as_ref().map(|e| e.reason.clone());
        let attempts = live.rec.attempts;
        let max = live.rec.max_attempts;
        let timeout_retry =
            outcome == Outcome::TimedOut && live.rec.timeout_action == TimeoutAction::Retry;
        let retryable = match outcome {
            Outcome::Completed | Outcome::Cancelled => false,
            Outcome::TimedOut => timeout_retry,
            Outcome::Failed => !no_retry,
            _ => true,
        };
        let superseded = !matches!(outcome, Outcome::Completed | Outcome::Failed);
        // The agent's bookkeeping: slot, breaker, and stopping a superseded run.
        let mut tripped = None;
        if let Some(agent) = self.agents.get_mut(agent_name.as_str()) {
            agent.tasks.remove(&id);
            if outcome.is_infrastructure() {
                agent.infra_failures += 1;
                if agent.infra_failures >= self.policy.breaker_failures
                    && agent.breaker_until.is_none()
                {
                    let factor = 1u32 << agent.breaker_trips.min(16);
                    let cooldown = self
                        .policy
                        .breaker_cooldown
                        .saturating_mul(factor)
                        .min(self.policy.breaker_cooldown_max);
                    agent.breaker_until = Some(now + cooldown.as_millis() as u64);
                    agent.breaker_trips += 1;
                    tripped = Some(format!(
                        "{} consecutive infrastructure failures",
                        agent.infra_failures
                    ));
                }
            } else if outcome == Outcome::Completed || outcome == Outcome::Failed {
                agent.infra_failures = 0;
            }
            if superseded && let Some(conn) = agent.conn {
                let msg = if outcome == Outcome::Cancelled {
                    HubMsg::Cancel {
                        task: id,
                        generation,
                    }
                } else {
                    HubMsg::Abandon {
                        task: id,
                        generation,
                        reason: format!("attempt ended at the hub: {}", outcome.as_str()),
                    }
                };
                self.out.sends.push((conn, msg));
            }
        }
        if let Some(why) = tripped {
            self.arm_alerts_now(now);
            self.agent_event(now, &agent_name, AgentChange::Degraded, &why);
        }
        self.dirty_schedule = true;
        let why = format!("attempt {generation} ended {}", outcome.as_str());
        if outcome == Outcome::Completed {
            self.set_state(now, id, TaskState::Completed, &why);
        } else if outcome == Outcome::Cancelled {
            if let Some(l) = self.tasks.get_mut(&id) {
                l.rec.reason = reason.or(Some("cancelled".into()));
            }
            self.set_state(now, id, TaskState::Cancelled, &why);
        } else if retryable && attempts < max {
            let delay = self.backoff(attempts);
            if let Some(l) = self.tasks.get_mut(&id) {
                l.rec.not_before = Some(now + delay);
                l.rec.reason = reason;
            }
            self.set_state(now, id, TaskState::Queued, &why);
        } else {
            if let Some(l) = self.tasks.get_mut(&id) {
                let r = reason.unwrap_or_else(|| outcome.as_str().into());
                l.rec.reason = Some(if retryable {
                    format!("{r} (attempt {attempts} of {max}; no attempts left)")
                } else {
                    r
                });
            }
            self.set_state(now, id, TaskState::Failed, &why);
        }
    }

    /// Retry backoff: `backoff_initial × factor^(n-1)`, capped, ±20 % jitter.
    pub(crate) fn backoff(&mut self, attempts: u32) -> Millis {
        let unit = self.rng.unit();
        Backoff::new(self.policy.backoff_initial, self.policy.backoff_max)
            .factor(self.policy.backoff_factor)
            .jitter(0.8, 1.2)
            .delay(attempts, unit)
            .as_millis() as u64
    }

    /// A task reached a terminal state: drop it from memory, release dependants.
    pub(crate) fn finish_task(&mut self, now: Millis, id: TaskId) {
        let Some(live) = self.tasks.remove(&id) else {
            return;
        };
        Core::count_state(&mut self.live_by_state, Some(live.rec.state), None);
        if let Some(at) = live.armed_at {
            self.deadlines.disarm(at, &Due::Attempt(id));
        }
        if let Some(n) = self.per_submitter.get_mut(submitter(&live.rec)) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_submitter.remove(submitter(&live.rec));
            }
        }
        self.counters.finished += 1;
        let state = live.rec.state;
        if state == TaskState::Completed {
            self.counters.completed += 1;
        }
        self.recent.insert(id, live.rec);
        let Some(dependants) = self.waiting_on.remove(&id) else {
            return;
        };
        for dep in dependants {
            if state == TaskState::Completed {
                self.maybe_unblock(now, dep);
            } else if let Some(l) = self.tasks.get_mut(&dep)
                && l.rec.state == TaskState::Blocked
            {
                l.rec.reason = Some(format!("dependency {id} ended {}", state.as_str()));
                self.set_state(
                    now,
                    dep,
                    TaskState::Cancelled,
                    "a dependency did not complete",
                );
            }
        }
    }

    pub(crate) fn maybe_unblock(&mut self, now: Millis, id: TaskId) {
        let Some(live) = self.tasks.get(&id) else {
            return;
        };
        if live.rec.state != TaskState::Blocked {
            return;
        }
        let pending = live.rec.after.iter().any(|d| self.tasks.contains_key(d));
        if !pending {
            self.set_state(now, id, TaskState::Queued, "dependencies completed");
        }
    }

    // === Ticks: deadlines ===

    /// One submission: the task's view, or why it was refused.
    pub(crate) fn submit(
        &mut self,
        now: Millis,
        req: SubmitRequest,
        who: &str,
        archive: &dyn Archive,
    ) -> Answered {
        match self.admit(now, req, who, archive)? {
            Admitted::New(id) => match self.tasks.get(&id) {
                Some(live) => Ok(task_answer(live.rec.clone(), false)),
                None => Err(op_error(OpErrorCode::Internal, "the new task vanished")),
            },
            Admitted::Existing(rec) => Ok(task_answer(*rec, true)),
        }
    }

    /// Several submissions, each accepted or refused on its own, in order:
    /// `{"results": [{"id", "state"[, "existing"]} | {"error", "code"}], "accepted", "refused"}`.
    pub(crate) fn submit_batch(
        &mut self,
        now: Millis,
        reqs: Vec<SubmitRequest>,
        who: &str,
        archive: &dyn Archive,
    ) -> Answered {
        use muster_wire::limits::SUBMIT_BATCH_MAX;
        if reqs.len() > SUBMIT_BATCH_MAX {
            return Err(op_error(
                OpErrorCode::Invalid,
                &format!(
                    "a batch of {} tasks; the limit is {SUBMIT_BATCH_MAX} per request, so split it",
                    reqs.len()
                ),
            ));
        }
        let mut results = Vec::with_capacity(reqs.len());
        let mut refused = 0;
        for req in reqs {
            results.push(match self.admit(now, req, who, archive) {
                Ok(Admitted::New(id)) => BatchResult::Accepted {
                    existing: false,
                    id,
                    state: self
                        .tasks
                        .get(&id)
                        .map_or(TaskState::Queued, |l| l.rec.state),
                },
                Ok(Admitted::Existing(rec)) => BatchResult::Accepted {
                    existing: true,
                    id: rec.id,
                    state: rec.state,
                },
                Err(e) => {
                    refused += 1;
                    BatchResult::Refused {
                        code: e.code,
                        error: e.message,
                    }
                }
            });
        }
        Ok(Answer::Batch(BatchAnswer {
            accepted: results.len() - refused,
            refused,
            results,
        }))
    }

    /// Checks a submission against the limits and records the new task; a
    /// repeated idempotency key names the task it made before.
    pub(crate) fn admit(
        &mut self,
        now: Millis,
        req: SubmitRequest,
        who: &str,
        archive: &dyn Archive,
    ) -> Result<Admitted, OpError> {
        let refuse = |code: OpErrorCode, message: &str| OpError {
            code,
            message: message.into(),
        };
        if let Some(key) = &req.key
            && let Some(id) = self.keys.get(key)
        {
            let rec = self
                .tasks
                .get(id)
                .map(|l| l.rec.clone())
                .or_else(|| self.recent.get(id).cloned())
                .or_else(|| archive.task(*id));
            if let Some(rec) = rec {
                return Ok(Admitted::Existing(Box::new(rec)));
            }
        }
        if let Err(msg) = self.validate_submit(&req) {
            return Err(refuse(OpErrorCode::Invalid, &msg));
        }
        if self.tasks.len() as u64 >= self.limits.max_queued_tasks {
            return Err(refuse(
                OpErrorCode::Busy,
                &format!(
                    "the hub holds {} unfinished tasks, the limit (limits.max_queued_tasks); wait for some to finish or raise the limit",
                    self.limits.max_queued_tasks
                ),
            ));
        }
        let mine = self.per_submitter.get(who).copied().unwrap_or(0);
        if mine >= self.limits.max_tasks_per_submitter {
            return Err(refuse(
                OpErrorCode::Busy,
                &format!(
                    "{who} has {mine} unfinished tasks, the limit per submitter (limits.max_tasks_per_submitter); wait for some to finish"
                ),
            ));
        }
        // Dependencies: each must exist; a failed or cancelled one refuses at once.
        let mut blocked = false;
        for dep in &req.after {
            let state = self
                .tasks
                .get(dep)
                .map(|l| l.rec.state)
                .or_else(|| self.recent.get(dep).map(|r| r.state))
                .or_else(|| archive.task(*dep).map(|r| r.state));
            match state {
                None => {
                    return Err(refuse(
                        OpErrorCode::Invalid,
                        &format!("--after {dep}: no such task"),
                    ));
                }
                Some(TaskState::Completed) => {}
                Some(s) if s.is_terminal() => {
                    return Err(refuse(
                        OpErrorCode::Conflict,
                        &format!(
                            "--after {dep}: that task already ended {}, so this one could never run",
                            s.as_str()
                        ),
                    ));
                }
                Some(_) => blocked = true,
            }
        }
        let id = TaskId(self.next_task_id);
        self.next_task_id += 1;
        self.out.writes.push(Write::NextTaskId(self.next_task_id));
        let rec = TaskRecord {
            id,
            title: req.title,
            description: req.description,
            capabilities: req.capabilities,
            priority: req.priority,
            max_attempts: req.max_attempts.unwrap_or(self.policy.max_attempts),
            timeout_ms: req.timeout_ms,
            timeout_action: req.timeout_action,
            after: req.after,
            key: req.key.clone(),
            state: if blocked {
                TaskState::Blocked
            } else {
                TaskState::Queued
            },
            generation: Generation(0),
            attempts: 0,
            not_before: None,
            agent: None,
            submitted_at: now,
            updated_at: now,
            progress_at: None,
            progress_note: None,
            result: None,
            reason: None,
            audit: vec![Audit {
                at: now,
                who: who.into(),
                action: "submit".into(),
            }],
            repo: req.repo,
            base: req.base,
            env: req.env,
            labels: req.labels,
        };
        if let Some(key) = req.key {
            self.keys.insert(key.clone(), id);
            self.out.writes.push(Write::Key(key, id));
        }
        self.push_event(
            now,
            Event::task(&rec, rec.state, format!("submitted by {who}")),
        );
        self.insert_live(rec, None);
        self.touch(id);
        self.dirty_schedule = true;
        Ok(Admitted::New(id))
    }

    pub(crate) fn validate_submit(&self, req: &SubmitRequest) -> Result<(), String> {
        use muster_wire::limits::TITLE_BYTES_MAX;
        if req.title.trim().is_empty() {
            return Err("--title is empty; give the task a one-line title".into());
        }
        if req.title.len() > TITLE_BYTES_MAX {
            return Err(format!(
                "--title is {} bytes; the limit is {TITLE_BYTES_MAX}",
                req.title.len()
            ));
        }
        let max_desc = self.limits.max_description_bytes as usize;
        if req.description.len() > max_desc {
            return Err(format!(
                "the description is {} bytes; the limit is {max_desc} (limits.max_description_bytes)",
                req.description.len()
            ));
        }
        check_capabilities(&req.capabilities).map_err(|e| format!("--capability: {e}"))?;
        if req.max_attempts == Some(0) {
            return Err("--max-attempts 0 would never run the task; use 1 or more".into());
        }
        if let Some(n) = req.max_attempts
            && n > limits::ATTEMPTS_MAX
        {
            return Err(format!(
                "--max-attempts {n}: the limit is {}",
                limits::ATTEMPTS_MAX
            ));
        }
        if let Some(t) = req.timeout_ms
            && !(1..=limits::TIMEOUT_MS_MAX).contains(&t)
        {
            return Err(format!(
                "--timeout of {t} ms: use 1 ms to {} days",
                limits::TIMEOUT_MS_MAX / 86_400_000
            ));
        }
        if req.after.len() > 64 {
            return Err("more than 64 --after dependencies".into());
        }
        if let Some(k) = &req.key
            && (k.is_empty() || k.len() > 256)
        {
            return Err("--key must be 1 to 256 bytes".into());
        }
        if let Some(repo) = &req.repo {
            work::check_repo(repo)?;
        }
        if let Some(base) = &req.base {
            if req.repo.is_none() {
                return Err("--base needs --repo: a base is a ref of the task's repository".into());
            }
            work::check_base(base)?;
        }
        work::check_env(&req.env)?;
        work::check_labels(&req.labels)?;
        Ok(())
    }

    pub(crate) fn cancel(&mut self, now: Millis, id: TaskId, who: &str) -> Answered {
        let Some(live) = self.tasks.get_mut(&id) else {
            return Err(if self.recent.contains_key(&id) {
                op_error(
                    OpErrorCode::Conflict,
                    &format!("task {id} has already ended"),
                )
            } else {
                op_error(
                    OpErrorCode::Conflict,
                    &format!(
                        "task {id} is not live (unknown or already ended); see `muster-hub task show {id}`"
                    ),
                )
            });
        };
        push_audit(&mut live.rec, now, who, "cancel");
        let reason = format!("cancelled by {who}");
        if live.rec.state.has_live_attempt() {
            self.end_attempt(now, id, Outcome::Cancelled, Some(failure(&reason)), true);
        } else {
            live.rec.reason = Some(reason);
            self.set_state(now, id, TaskState::Cancelled, "cancelled by an operator");
        }
        self.audit_event(now, who, AuditAction::TaskCancel, &id.to_string());
        // Cancelled, the task has ended in this batch; were it still live, its record shows why not.
        let rec = self
            .recent
            .get(&id)
            .or_else(|| self.tasks.get(&id).map(|l| &l.rec));
        match rec {
            Some(rec) => Ok(task_answer(rec.clone(), false)),
            None => Err(op_error(
                OpErrorCode::Internal,
                "the cancelled task vanished",
            )),
        }
    }

    pub(crate) fn requeue(
        &mut self,
        now: Millis,
        id: TaskId,
        who: &str,
        archive: &dyn Archive,
    ) -> Answered {
        if self.tasks.contains_key(&id) {
            return Err(op_error(
                OpErrorCode::Conflict,
                &format!(
                    "task {id} has not ended; only a completed, failed or cancelled task can be requeued"
                ),
            ));
        }
        let Some(mut rec) = self.recent.remove(&id).or_else(|| archive.task(id)) else {
            return Err(op_error(OpErrorCode::NotFound, &format!("no task {id}")));
        };
        if self.tasks.len() as u64 >= self.limits.max_queued_tasks {
            return Err(op_error(
                OpErrorCode::Busy,
                "the queue is full (limits.max_queued_tasks)",
            ));
        }
        rec.attempts = 0;
        rec.not_before = None;
        rec.reason = None;
        rec.result = None;
        rec.state = TaskState::Queued;
        rec.updated_at = now;
        push_audit(&mut rec, now, who, "requeue");
        self.alert_clear(AlertKind::TaskFailed, &id.to_string());
        self.push_event(
            now,
            Event::task(&rec, rec.state, format!("requeued by {who}")),
        );
        self.audit_event(now, who, AuditAction::TaskRequeue, &id.to_string());
        let answer = task_answer(rec.clone(), false);
        self.insert_live(rec, None);
        self.touch(id);
        // Tasks still blocked on it must hear when it ends again.
        let dependants: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|l| l.rec.state == TaskState::Blocked && l.rec.after.contains(&id))
            .map(|l| l.rec.id)
            .collect();
        if !dependants.is_empty() {
            self.waiting_on.entry(id).or_default().extend(dependants);
        }
        self.dirty_schedule = true;
        Ok(answer)
    }
}

fn task_answer(task: TaskRecord, existing: bool) -> Answer {
    Answer::Task(Box::new(TaskAnswer { task, existing }))
}

/// What [`Core::admit`] did with a submission.
pub(crate) enum Admitted {
    /// A new task.
    New(TaskId),
    /// The task an earlier submission with the same idempotency key made.
    Existing(Box<TaskRecord>),
}

/// Who submitted a task: the first entry of its audit trail.
pub(crate) fn submitter(rec: &TaskRecord) -> &str {
    rec.audit.first().map_or("", |a| a.who.as_str())
}

pub(crate) fn spec_of(rec: &TaskRecord) -> TaskSpec {
    TaskSpec {
        title: rec.title.clone(),
        description: rec.description.clone(),
        capabilities: rec.capabilities.clone(),
        priority: rec.priority,
        timeout_ms: rec.timeout_ms,
        repo: rec.repo.clone(),
        base: rec.base.clone(),
        env: rec.env.clone(),
    }
}

pub(crate) fn failure(reason: &str) -> Failure {
    Failure {
        reason: reason.into(),
        ..Failure::default()
    }
}

/// Checks capability names: at most [`limits::CAPABILITIES_MAX`], each a valid name.
pub(crate) fn check_capabilities(caps: &[String]) -> Result<(), String> {
    if caps.len() > limits::CAPABILITIES_MAX {
        return Err(format!(
            "{} capabilities; the limit is {}",
            caps.len(),
            limits::CAPABILITIES_MAX
        ));
    }
    for c in caps {
        if let Err(e) = muster_wire::AgentName::new(c.as_str()) {
            let shown: String = c.chars().take(64).collect();
            return Err(format!("capability {shown:?}: {e}"));
        }
    }
    Ok(())
}
