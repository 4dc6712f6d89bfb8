//! [`WorkspaceError`]: why a workspace could not be prepared, finished or
//! removed, each variant saying what failed and what to do, and whose
//! [`Fault`] it is.

use std::path::PathBuf;

use muster_protocol::{Generation, TaskId};

use super::run;

/// Whose fault a [`WorkspaceError`] is, for the runner's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The task asked for something that cannot be done anywhere (a bad repo or base).
    Task,
    /// This host or its configuration failed (network, disk, git, setup): another host may succeed.
    Host,
}

/// Why a workspace could not be prepared, finished or removed.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// The task's repository text cannot be used.
    #[error("repo {repo:?} {reason}")]
    BadRepo {
        /// As the task gave it.
        repo: String,
        /// What is wrong and what to give instead.
        reason: String,
    },
    /// The task's base cannot be a ref, or names nothing in the repository.
    #[error("base {base:?} of {repo}: {reason}")]
    BadBase {
        /// The repository.
        repo: String,
        /// As the task gave it; empty for the default branch.
        base: String,
        /// What is wrong and what to give instead.
        reason: String,
    },
    /// The task names a repository but this sidecar does not work in git mode.
    #[error(
        "the task names repo {repo:?} but this sidecar's [workspace] mode is {mode:?}; set mode = \"git\" in sidecar.toml to work on repositories"
    )]
    RepoNotSupported {
        /// As the task gave it.
        repo: String,
        /// The configured mode.
        mode: &'static str,
    },
    /// Cloning or fetching the repository failed or took longer than `fetch_timeout`.
    #[error(
        "cannot fetch {repo} into the mirror {}: {detail} (command: {command}); check that this host reaches the repository and that its credentials work without a prompt (ssh key, credential helper){}",
        mirror.display(),
        if *timed_out { ", or raise [workspace] fetch_timeout" } else { "" }
    )]
    Fetch {
        /// The repository.
        repo: String,
        /// The mirror it was fetched into.
        mirror: PathBuf,
        /// The git command.
        command: String,
        /// How it ended and the end of what it said.
        detail: String,
        /// Whether it was killed at its deadline.
        timed_out: bool,
    },
    /// A local git command on a mirror or worktree failed.
    #[error("{command}: {detail}")]
    Git {
        /// The git command.
        command: String,
        /// How it ended and the end of what it said.
        detail: String,
        /// Whether it was killed at its deadline.
        timed_out: bool,
    },
    /// A file or directory could not be made, read, written or removed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// To what.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A `copy` entry is not in `template_dir`.
    #[error(
        "[workspace] copy entry {:?} is missing: {} does not exist; create it or remove the entry from copy",
        entry.display(),
        source_path.display()
    )]
    CopyMissing {
        /// The entry as configured.
        entry: PathBuf,
        /// Where it was looked for.
        source_path: PathBuf,
    },
    /// `setup_command` could not start, failed, or ran past `setup_timeout`.
    #[error(
        "[workspace] setup_command {} {}{}",
        run::display_argv(command),
        setup_outcome(*exit_code, *signal, *timed_out),
        if stderr_tail.trim().is_empty() { String::new() } else { format!("; its stderr ends: {}", stderr_tail.trim()) }
    )]
    Setup {
        /// The argv.
        command: Vec<String>,
        /// Its exit code, when it exited.
        exit_code: Option<i32>,
        /// The signal that ended it, when one did (SIGKILL at `setup_timeout`).
        signal: Option<i32>,
        /// Whether it was killed at `setup_timeout`.
        timed_out: bool,
        /// The last bytes of its stdout (at most `TAIL_BYTES_MAX`).
        stdout_tail: String,
        /// The last bytes of its stderr (at most `TAIL_BYTES_MAX`); why it could not start, if it could not.
        stderr_tail: String,
    },
    /// No workspace is recorded for this attempt.
    #[error(
        "no workspace is recorded for task {task} generation {generation} under {}; was it prepared with this configuration?",
        root.display()
    )]
    Unknown {
        /// The task.
        task: TaskId,
        /// The generation.
        generation: Generation,
        /// Where it was looked for.
        root: PathBuf,
    },
}

impl WorkspaceError {
    /// Whose fault it is: the task's (bad repo or base) or this host's.
    pub fn fault(&self) -> Fault {
        match self {
            WorkspaceError::BadRepo { .. } | WorkspaceError::BadBase { .. } => Fault::Task,
            _ => Fault::Host,
        }
    }

    /// Whether a command was killed at its deadline.
    pub fn timed_out(&self) -> bool {
        match self {
            WorkspaceError::Fetch { timed_out, .. }
            | WorkspaceError::Git { timed_out, .. }
            | WorkspaceError::Setup { timed_out, .. } => *timed_out,
            _ => false,
        }
    }
}

/// How a setup command ended, for [`WorkspaceError::Setup`]'s message.
fn setup_outcome(exit_code: Option<i32>, signal: Option<i32>, timed_out: bool) -> String {
    match (exit_code, signal) {
        _ if timed_out => "ran past [workspace] setup_timeout and was killed".into(),
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        (None, None) => "could not be started".into(),
    }
}
