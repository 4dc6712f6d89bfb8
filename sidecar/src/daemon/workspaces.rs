//! The daemon's part of the workspace layer: an agent's `complete` or `fail`
//! finishes its attempt's workspace before the core hears of it, and finished
//! workspaces are swept after attempts end and now and then.
//!
//! ```text
//! socket: task complete ─authenticate─▶ spawn: workspaces.finish (git, bounded)
//!                                            └─▶ Ev::Finalized ─▶ core.handle_agent_work ─▶ answer
//! ```
//!
//! The work result is what git says the attempt left, never the agent's word;
//! the finish runs off the loop, so a large tree being checkpointed holds up
//! nothing else.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use muster_protocol::{Generation, TaskId};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{Daemon, Reply};
use crate::config::WorkspaceMode;
use crate::core::{AgentCmd, Core};
use crate::local::{Answer, Request};

/// Finished workspaces are swept at least this often.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// …and at most this often, however many attempts end.
const SWEEP_GAP_MIN: Duration = Duration::from_secs(2);

/// An agent's report that ends its attempt, with what its workspace holds.
pub(super) struct Finalize {
    task: TaskId,
    generation: Generation,
    cmd: AgentCmd,
    work: Option<muster_protocol::work::WorkResult>,
    reply: oneshot::Sender<Answer>,
}

/// When finished workspaces were last swept, and whether a sweep is due or running.
#[derive(Debug, Default)]
pub(super) struct Sweep {
    /// An attempt ended since the last sweep.
    pub(super) due: bool,
    last: Option<Instant>,
    running: Arc<AtomicBool>,
}

impl Daemon {
    /// A local request: answered in this batch, or, for an agent's `complete`
    /// or `fail` on an attempt with a workspace, after that workspace is
    /// finished (then `None`: the answer comes with [`Daemon::finalized`]).
    pub(super) fn local(
        &mut self,
        core: &mut Core,
        req: Request,
        reply: oneshot::Sender<Answer>,
    ) -> Option<Reply> {
        let Request::Agent(agent) = req else {
            return Some((self.answer(core, req), reply));
        };
        let ends = matches!(agent.cmd, AgentCmd::Complete { .. } | AgentCmd::Fail { .. });
        if !ends || self.workspaces.config().mode == WorkspaceMode::Shared {
            return Some((self.agent(core, agent), reply));
        }
        let (task, generation) = match self.authenticate(&agent) {
            Ok(attempt) => attempt,
            Err(refused) => return Some((refused, reply)),
        };
        let held = core
            .attempt(task, generation)
            .is_ok_and(|t| t.phase != muster_protocol::msg::Phase::Finished);
        if !held {
            // The core says why (stale, not held, already ended).
            return Some((self.agent(core, agent), reply));
        }
        let ws = Arc::clone(&self.workspaces);
        let back = self.finalize_tx.clone();
        let cmd = agent.cmd;
        tokio::spawn(async move {
            let work = match ws.finish(task, generation).await {
                Ok(r) => crate::agent::wire_work(r),
                Err(e) => {
                    warn!(%task, %generation, "could not finish the workspace: {e}");
                    None
                }
            };
            let f = Finalize {
                task,
                generation,
                cmd,
                work,
                reply,
            };
            // A closed loop is a sidecar shutting down: the agent's call fails
            // and it reports again after the restart.
            let _ = back.send(f).await;
        });
        None
    }

    /// The agent's report, now with its workspace's result, goes to the core.
    pub(super) fn finalized(&mut self, core: &mut Core, f: Finalize) -> Reply {
        let answer = match core.handle_agent_work(self.now(), f.task, f.generation, f.cmd, f.work) {
            Ok(m) => Answer::ok(m, serde_json::Value::Null),
            Err(m) => Answer::err(&m),
        };
        (answer, f.reply)
    }

    /// After a restart: workspaces still marked running whose attempts this
    /// sidecar no longer holds (they ended, or were given up, while it was
    /// down) are finished, so their work is checkpointed and the sweep may
    /// remove them in time; the held ones are finished by their runs.
    pub(super) fn finish_abandoned_workspaces(&self, core: &Core) {
        if self.workspaces.config().mode == WorkspaceMode::Shared {
            return;
        }
        let held: std::collections::HashSet<(TaskId, Generation)> = core
            .held()
            .into_iter()
            .map(|h| (h.task, h.generation))
            .collect();
        let ws = Arc::clone(&self.workspaces);
        tokio::spawn(async move {
            let list = {
                let ws = Arc::clone(&ws);
                tokio::task::spawn_blocking(move || ws.list())
                    .await
                    .unwrap_or_default()
            };
            for w in list {
                let key = (w.task, w.generation);
                if w.state != crate::workspace::WorkspaceState::Running || held.contains(&key) {
                    continue;
                }
                match ws.finish(w.task, w.generation).await {
                    Ok(_) => {
                        info!(task = %w.task, generation = %w.generation, "finished the workspace of an attempt that ended while the sidecar was down")
                    }
                    Err(e) => {
                        warn!(task = %w.task, generation = %w.generation, "could not finish a left-over workspace: {e}")
                    }
                }
            }
        });
    }

    /// Starts a sweep of finished workspaces when one is due (an attempt
    /// ended, or [`SWEEP_EVERY`] passed) and none is running. Off the loop:
    /// a sweep walks trees and runs git.
    pub(super) fn maybe_sweep(&mut self) {
        self.maybe_sweep_logs();
        if self.workspaces.config().mode == WorkspaceMode::Shared {
            return;
        }
        let now = Instant::now();
        let since = self.sweep.last.map(|t| now.duration_since(t));
        let wanted = since.is_none_or(|s| s >= SWEEP_EVERY)
            || (self.sweep.due && since.is_none_or(|s| s >= SWEEP_GAP_MIN));
        if !wanted || self.sweep.running.swap(true, Ordering::AcqRel) {
            return;
        }
        self.sweep.due = false;
        self.sweep.last = Some(now);
        let ws = Arc::clone(&self.workspaces);
        let running = Arc::clone(&self.sweep.running);
        tokio::spawn(async move {
            let report = ws.sweep(wall_ms()).await;
            if !report.removed.is_empty() || !report.failed.is_empty() {
                info!(
                    removed = report.removed.len(),
                    freed_bytes = report.freed_bytes,
                    remaining_bytes = report.remaining_bytes,
                    failed = report.failed.len(),
                    "swept finished workspaces"
                );
            }
            running.store(false, Ordering::Release);
        });
    }
}

/// When ended logs were last swept against retention and quota.
#[derive(Debug, Default)]
pub(super) struct LogSweep {
    swept: Option<Instant>,
    running: Arc<AtomicBool>,
}

/// Caps running attempts' output for as long as the daemon runs: one pass
/// ([`crate::logs::Logs::cap_pass`]) off the async workers, then a wait as
/// long as the pass asked for (50 ms to 1 s, by the fastest-growing file).
/// On its own task, so neither the daemon loop's tick nor a long sweep of
/// kept logs delays it: the time between passes is the bound on how far a
/// running file passes its cap.
pub(super) async fn cap_running(logs: Arc<crate::logs::Logs>) {
    loop {
        let l = Arc::clone(&logs);
        let wait = tokio::task::spawn_blocking(move || l.cap_pass())
            .await
            .unwrap_or(crate::logs::CAP_PASS_MAX);
        tokio::time::sleep(wait).await;
    }
}

impl Daemon {
    /// Sweeps ended logs (every minute, or every half retention when that is
    /// shorter, at least a second apart). Off the loop.
    fn maybe_sweep_logs(&mut self) {
        let now = Instant::now();
        let sweep_every =
            (self.logs.config().retention / 2).clamp(Duration::from_secs(1), SWEEP_EVERY);
        let due = self
            .log_sweep
            .swept
            .is_none_or(|t| now.duration_since(t) >= sweep_every);
        if !due || self.log_sweep.running.swap(true, Ordering::AcqRel) {
            return;
        }
        self.log_sweep.swept = Some(now);
        let logs = Arc::clone(&self.logs);
        let running = Arc::clone(&self.log_sweep.running);
        tokio::task::spawn_blocking(move || {
            let report = logs.sweep(wall_ms());
            if report.removed > 0 {
                info!(
                    removed = report.removed,
                    freed_bytes = report.freed_bytes,
                    "swept kept logs"
                );
            }
            running.store(false, Ordering::Release);
        });
    }
}

/// Wall-clock milliseconds, as the workspace records keep finish times.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
