//! What the sidecar core knows of an agent run: the handle it persists and
//! the events the runner sends back.

use std::path::PathBuf;

use muster_wire::msg::{Failure, Outcome};
use muster_wire::work::WorkResult;
use muster_wire::{Generation, TaskId};
use serde::{Deserialize, Serialize};

/// What a restarted sidecar needs to re-attach to a run; persisted on
/// [`RunEvent::Spawned`], before the run can report anything else.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RunHandle {
    /// Exec: the process group leader (the wrapper shell; its pid is the group id).
    pub pid: Option<u32>,
    /// A session name for wake-mode agents that have one; the process runner records none.
    pub session: Option<String>,
    /// The attempt's run directory (holds the exit status an exec run leaves behind).
    pub run_dir: PathBuf,
    /// The mode the run was started in.
    pub mode: RunMode,
    /// Linux: the leader's start time in clock ticks since boot, so a reused pid is not
    /// mistaken for the run after a restart.
    #[serde(default)]
    pub start_ticks: Option<u64>,
}

/// The agent mode as persisted in a [`RunHandle`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RunMode {
    /// The command is the run.
    Exec,
    /// The command woke an agent that lives elsewhere.
    Wake,
}

/// What the runner tells the sidecar about one attempt, in this order:
/// `Preparing` (any number of times) and `Prepared` while it makes the
/// attempt's workspace, then `Spawned`, then `Started`, then `Finished`; any
/// prefix may be skipped (a spawn error goes straight to `Finished`), and
/// `Finished` comes at most once.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    /// The attempt's workspace is being made (fetch, worktree, copies,
    /// setup_command): its own time limits bound it, so the start deadlines
    /// wait, and the hub hears that the attempt is alive.
    Preparing {
        /// The task.
        task: TaskId,
        /// The attempt.
        generation: Generation,
        /// What is being done, for the hub's progress note.
        note: String,
    },
    /// The workspace is ready; the start deadlines count from now.
    Prepared {
        /// The task.
        task: TaskId,
        /// The attempt.
        generation: Generation,
        /// Where the attempt works, for the hub's progress note.
        note: String,
    },
    /// The process is spawned (exec) or the wake command succeeded (wake):
    /// persist the handle before anything else.
    Spawned {
        /// The task.
        task: TaskId,
        /// The attempt.
        generation: Generation,
        /// What the runner's recover needs after a restart.
        handle: RunHandle,
    },
    /// The start is verified: exec alive after `settle` (or exited 0 before it);
    /// wake verified by process or command. Not sent for `verify = agent-ack`.
    /// the runner's recover sends it again once it sees the run alive: treat it as idempotent.
    Started {
        /// The task.
        task: TaskId,
        /// The attempt.
        generation: Generation,
        /// Exec: the group leader; wake with `verify = process`: the matching process.
        pid: Option<u32>,
        /// A session name, when known.
        session: Option<String>,
    },
    /// The attempt ended on this machine.
    Finished {
        /// The task.
        task: TaskId,
        /// The attempt.
        generation: Generation,
        /// How it ended.
        outcome: Outcome,
        /// A result, when the runner has one (the process runner never does: results come over the socket).
        result: Option<String>,
        /// What went wrong (or, for `Cancelled`, how it was stopped).
        error: Option<Failure>,
        /// What the attempt left in its git workspace.
        work: Option<Box<WorkResult>>,
    },
}

impl RunEvent {
    /// The attempt the event is about.
    pub fn attempt(&self) -> (TaskId, Generation) {
        match self {
            RunEvent::Preparing {
                task, generation, ..
            }
            | RunEvent::Prepared {
                task, generation, ..
            }
            | RunEvent::Spawned {
                task, generation, ..
            }
            | RunEvent::Started {
                task, generation, ..
            }
            | RunEvent::Finished {
                task, generation, ..
            } => (*task, *generation),
        }
    }
}
