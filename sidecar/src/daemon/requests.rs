//! Answers the local socket: the agent's commands about its own attempt
//! (checked against its task token), `status` and `whoami`.

use tracing::warn;

use super::Daemon;
use crate::core::Core;
use crate::local::{self, Answer, Request};

impl Daemon {
    pub(super) fn answer(&mut self, core: &mut Core, req: Request) -> Answer {
        match req {
            Request::Agent(req) => self.agent(core, req),
            Request::Query { cmd } if cmd == "status" => Answer::ok("status", self.status(core)),
            Request::Query { cmd } if cmd == "whoami" => Answer::ok(
                self.cfg.name.to_string(),
                serde_json::json!({ "name": self.cfg.name.as_str(), "hub": self.cfg.hub, "capabilities": self.cfg.capabilities }),
            ),
            Request::Query { cmd } => Answer::err(&format!("unknown request {cmd:?}")),
        }
    }

    /// An agent request: only for the attempt whose token it carries.
    pub(super) fn agent(&mut self, core: &mut Core, req: local::AgentRequest) -> Answer {
        let (task, generation) = match self.authenticate(&req) {
            Ok(attempt) => attempt,
            Err(refused) => return refused,
        };
        if matches!(req.cmd, crate::core::AgentCmd::Current) {
            return match core.attempt(task, generation) {
                Ok(t) => Answer::ok(
                    format!("task {task} generation {generation}"),
                    serde_json::json!({ "id": t.task.0, "generation": t.generation.0, "phase": t.phase, "title": t.spec.title, "pid": t.handle.as_ref().and_then(|h| h.pid) }),
                ),
                Err(m) => Answer::err(&m),
            };
        }
        match core.handle_agent(self.now(), task, generation, req.cmd) {
            Ok(m) => Answer::ok(m, serde_json::Value::Null),
            Err(m) => Answer::err(&m),
        }
    }

    /// The attempt an agent request is about, if it carries that attempt's token.
    pub(super) fn authenticate(
        &self,
        req: &local::AgentRequest,
    ) -> Result<(muster_protocol::TaskId, muster_protocol::Generation), Answer> {
        use muster_protocol::{Generation, TaskId};
        let (Some(task), Some(generation)) = (req.task, req.generation) else {
            warn!(
                task = req.task,
                generation = req.generation,
                "local socket: refused an agent request that names no attempt"
            );
            return Err(Answer::err(
                "this request does not say which attempt it is about: run it from the agent's environment, where MUSTER_TASK_ID, MUSTER_GENERATION and MUSTER_TASK_TOKEN are set",
            ));
        };
        let (task, generation) = (TaskId(task), Generation(generation));
        let Some(token) = &req.token else {
            warn!(%task, %generation, "local socket: refused an agent request without a task token");
            return Err(Answer::err(&format!(
                "this request carries no task token for task {task} generation {generation}: run it from the agent's environment, where MUSTER_TASK_TOKEN is set (the agent may only report on its own attempt)"
            )));
        };
        if !self.token_key.verify(task, generation, token) {
            warn!(%task, %generation, "local socket: refused an agent request whose task token does not match");
            return Err(Answer::err(&format!(
                "this request's task token does not match task {task} generation {generation}; the agent may only report on its own attempt"
            )));
        }
        Ok((task, generation))
    }

    pub(super) fn status(&self, core: &Core) -> serde_json::Value {
        let tasks: Vec<_> = core
            .tasks()
            .map(|t| serde_json::json!({ "id": t.task.0, "generation": t.generation.0, "phase": t.phase, "title": t.spec.title, "pid": t.handle.as_ref().and_then(|h| h.pid) }))
            .collect();
        serde_json::json!({
            "name": self.cfg.name.as_str(),
            "hub": self.cfg.hub,
            "connected": self.tx.is_some(),
            "state": if self.draining { "draining" } else { "ready" },
            "slots": self.cfg.slots,
            "free_slots": self.cfg.slots.saturating_sub(core.busy() as u32),
            "tasks": tasks,
            "outbox": core.outbox().count(),
            "heartbeat_interval_ms": core.heartbeat_interval().as_millis() as u64,
            "self_test": self.last_self_test,
        })
    }
}
