//! Per-attempt workspaces: where each attempt of a task works, what it left
//! there, and when that is removed. The runner calls [`Workspaces::prepare`]
//! before an attempt starts and [`Workspaces::finish`] after it ended; the
//! daemon calls [`Workspaces::sweep`] now and then.
//!
//! `[workspace] mode` (see [`WorkspaceConfig`]):
//!
//! - `shared`: every attempt works in the agent's `working_dir` (the
//!   behaviour before workspaces); nothing is made or removed.
//! - `dir`: a fresh empty directory per attempt, `<root>/<task>-<generation>`.
//! - `git`: a git worktree per attempt at the same place, on branch
//!   `muster/<task>`, from a bare mirror of the task's repository kept in
//!   `<data_dir>/mirrors/` (one per repository, shared by every attempt, and
//!   never removed by the sweep; mirrors stay with the sidecar's state even
//!   when `root` points elsewhere). A task without a repository gets an
//!   empty directory, as in `dir` mode.
//!
//! ```text
//!  prepare(task, generation, repo, base)
//!    ├─ [mirror lock] fetch (or create) the mirror ─ resolve base ─ checkpoint and
//!    │                detach an older tree of the task ─ pick the start ─ record ─ worktree add
//!    ├─ copy template_dir entries ─ setup_command (in the new tree, with its timeout)
//!    └─▶ Prepared { dir, branch, base, base_commit, continued_from }
//!  finish(task, generation)
//!    ├─ checkpoint: everything not ignored, as a commit on top of HEAD, at
//!    │              refs/muster/checkpoints/<task>/<generation> ([mirror lock] for the ref)
//!    ├─ commits since base, diff --stat, dirty or not
//!    └─▶ WorkResult; the record says finished (retention counts from here)
//!  sweep(now)   plan_removal(list(), now, retention, max_disk): for each chosen one
//!               [mirror lock] checkpoint again ─ remove the tree ─ drop the branch
//!               if a checkpoint holds it; then gc --auto per mirror
//! ```
//!
//! Guarantees: two attempts never share a tree; the work of an attempt is in
//! its checkpoint ref before its tree is removed or its branch moved, and
//! checkpoint refs are never deleted; fetches never touch `muster/*` branches
//! or checkpoints (see the `git` module for the ref layout). Mirror updates
//! and worktree additions of one repository take turns behind an async lock,
//! so attempts of different tasks may prepare at once on one mirror without
//! meeting git's lock files. Every git command has a timeout, a closed stdin
//! and no way to prompt.
//!
//! Parts: `error` ([`WorkspaceError`]), `git` (the git commands), `run` (running a command with bounds),
//! `files` (records, copies, disk use), `input` (checks of a task's repo and
//! base), [`retention`] (the pure removal plan).

mod error;
mod files;
mod git;
mod input;
pub mod retention;
mod run;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use muster_protocol::{Generation, TaskId};
use serde::Serialize;

pub use crate::config::{RetryFrom, WorkspaceConfig, WorkspaceMode};
pub use error::{Fault, WorkspaceError};
pub use git::DIFF_STAT_BYTES_MAX;
pub use retention::{Usage, plan_removal};

use files::{Record, attempt_name, record_path};
use git::{Mirror, branch_name, checkpoint_ref};

/// What an attempt works in, as [`Workspaces::prepare`] made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Prepared {
    /// The directory the agent works in (`MUSTER_WORKSPACE`).
    pub dir: PathBuf,
    /// git mode: the branch checked out, `muster/<task>` (`MUSTER_BRANCH`).
    pub branch: Option<String>,
    /// git mode: the base as the task gave it, or the default branch's name (`MUSTER_BASE`).
    pub base: Option<String>,
    /// git mode: the full ref the base resolved to in the mirror, e.g.
    /// `refs/remotes/origin/main` (visible in the worktree too); `None` for a commit id.
    pub base_ref: Option<String>,
    /// git mode: the commit the attempt's work is measured from: the base's
    /// commit when the attempt was prepared, or, when it continued a
    /// checkpoint, where the checkpoint's history meets the base.
    pub base_commit: Option<String>,
    /// git mode: the checkpoint ref the tree started from, when it continued an earlier attempt.
    pub continued_from: Option<String>,
}

/// What an attempt left in its workspace, from [`Workspaces::finish`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WorkResult {
    /// The workspace's directory.
    pub dir: PathBuf,
    /// git mode: the attempt's branch.
    pub branch: Option<String>,
    /// git mode: the commit the tree's HEAD was at.
    pub head: Option<String>,
    /// git mode: the base's commit the attempt started from.
    pub base_commit: Option<String>,
    /// git mode: commits from the base to HEAD (`rev-list --count base..HEAD`).
    pub commits: Option<u64>,
    /// git mode: `git diff --stat` from the base to the checkpoint (so
    /// uncommitted work counts), at most [`DIFF_STAT_BYTES_MAX`] bytes.
    pub diff_stat: Option<String>,
    /// Whether `diff_stat` was cut short.
    pub diff_stat_cut: bool,
    /// git mode: whether the tree held uncommitted changes (untracked files that are not ignored included).
    pub dirty: bool,
    /// git mode: the ref holding the attempt's work, `refs/muster/checkpoints/<task>/<generation>`.
    pub checkpoint: Option<String>,
    /// git mode: the commit that ref points at: HEAD when clean, a commit on top of HEAD when dirty.
    pub checkpoint_commit: Option<String>,
}

/// What an attempt's workspace is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceKind {
    /// A plain directory (`dir` mode, or `git` mode for a task without a repository).
    Dir,
    /// A git worktree of a mirror.
    Git,
}

/// Whether an attempt still uses its workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceState {
    /// Prepared and not yet finished: never removed.
    Running,
    /// Finished; removed by the sweep after `retention`, or sooner over `max_disk`.
    Finished,
}

/// One workspace on disk, from [`Workspaces::list`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkspaceInfo {
    /// The task whose attempt it is.
    pub task: TaskId,
    /// The attempt's generation.
    pub generation: Generation,
    /// Its directory.
    pub dir: PathBuf,
    /// A directory or a git worktree.
    pub kind: WorkspaceKind,
    /// git mode: the repository.
    pub repo: Option<String>,
    /// git mode: the branch.
    pub branch: Option<String>,
    /// Running or finished.
    pub state: WorkspaceState,
    /// When the attempt finished (Unix ms); for a tree without a record (the
    /// leftover of a crash), when it was last modified.
    pub finished_at_ms: Option<u64>,
    /// Disk it uses, in bytes (allocated blocks; objects in the mirror not included).
    pub bytes: u64,
}

/// Disk used by the workspace layer, from [`Workspaces::disk_use`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DiskUse {
    /// Every attempt's tree, running and finished: what `max_disk` limits.
    pub workspaces: u64,
    /// Number of attempt trees.
    pub count: usize,
    /// The repository mirrors (not limited by `max_disk`; never removed by the sweep).
    pub mirrors: u64,
}

/// What one [`Workspaces::sweep`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// The attempts whose workspaces were removed.
    pub removed: Vec<(TaskId, Generation)>,
    /// Disk freed, in bytes.
    pub freed_bytes: u64,
    /// Disk all workspaces use after the sweep, in bytes.
    pub remaining_bytes: u64,
    /// Workspaces the plan chose but that were kept because saving or removing them failed, with why.
    pub failed: Vec<String>,
}

// === impl Workspaces ===

/// The workspace layer of one sidecar: makes, finishes, lists and removes
/// attempt workspaces. Share it behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct Workspaces {
    cfg: WorkspaceConfig,
    /// `cfg.root`, or `<data_dir>/workspaces`.
    root: PathBuf,
    /// `<data_dir>/mirrors`.
    mirrors: PathBuf,
    /// The directory of shared mode.
    shared: PathBuf,
    /// One async lock per mirror: fetches, worktree additions and ref updates
    /// of one repository take turns. The map grows by one small entry per
    /// repository this sidecar has worked on since it started.
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<MirrorState>>>>,
}

/// What the holder of a mirror's lock must know about earlier holders.
#[derive(Debug, Default)]
struct MirrorState {
    /// When a git command of ours on this mirror was killed at its deadline:
    /// lock files it left are removed before the next command (see `git::clear_stale_locks`).
    killed_at: Option<SystemTime>,
}

impl Workspaces {
    /// The layer for `cfg`, keeping mirrors and (unless `root` is set)
    /// workspaces under `data_dir`; shared mode uses `<data_dir>/work`.
    pub fn new(cfg: WorkspaceConfig, data_dir: &Path) -> Self {
        let shared = data_dir.join("work");
        Self::with_shared_dir(cfg, data_dir, shared)
    }

    /// As [`Workspaces::new`], with shared mode using `shared` (the agent's `working_dir`).
    pub fn with_shared_dir(cfg: WorkspaceConfig, data_dir: &Path, shared: PathBuf) -> Self {
        let root = cfg
            .root
            .clone()
            .unwrap_or_else(|| data_dir.join("workspaces"));
        Workspaces {
            cfg,
            root,
            mirrors: data_dir.join("mirrors"),
            shared,
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// The layer a whole sidecar configuration describes.
    pub fn from_config(cfg: &crate::config::SidecarConfig) -> Self {
        let shared = cfg
            .agent
            .working_dir
            .clone()
            .unwrap_or_else(|| cfg.data_dir.join("work"));
        Self::with_shared_dir(cfg.workspace.clone(), &cfg.data_dir, shared)
    }

    /// The configuration in use.
    pub fn config(&self) -> &WorkspaceConfig {
        &self.cfg
    }

    /// Where attempt workspaces live.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory every attempt works in, in shared mode.
    pub fn shared_dir(&self) -> &Path {
        &self.shared
    }

    /// Where repository mirrors live.
    pub fn mirrors_dir(&self) -> &Path {
        &self.mirrors
    }

    /// Where the workspace of an attempt is (or would be) in `dir` and `git` mode.
    pub fn path(&self, task: TaskId, generation: Generation) -> PathBuf {
        self.root.join(attempt_name(task, generation))
    }

    /// Makes the workspace of a new attempt and returns where it is; see the
    /// module doc for each mode. `repo` is a URL (`https://…`, `ssh://…`,
    /// `git@host:path`, `file:///…`) or an absolute path; `base` a branch,
    /// tag or commit (default: the repository's default branch). A
    /// leftover tree of this very attempt (an interrupted prepare) is
    /// checkpointed and replaced.
    ///
    /// # Errors
    /// [`WorkspaceError::BadRepo`], [`WorkspaceError::BadBase`] (the task's
    /// fault), [`WorkspaceError::RepoNotSupported`], and the host's failures:
    /// [`WorkspaceError::Fetch`], [`WorkspaceError::Git`],
    /// [`WorkspaceError::Io`], [`WorkspaceError::CopyMissing`],
    /// [`WorkspaceError::Setup`]. After a copy or setup failure the tree is
    /// kept, recorded as finished, for a look until the sweep removes it.
    pub async fn prepare(
        &self,
        task: TaskId,
        generation: Generation,
        repo: Option<&str>,
        base: Option<&str>,
    ) -> Result<Prepared, WorkspaceError> {
        let mode = self.cfg.mode;
        match (mode, repo) {
            (WorkspaceMode::Shared, None) => {
                return Ok(Prepared {
                    dir: self.shared.clone(),
                    ..Prepared::empty()
                });
            }
            (WorkspaceMode::Shared | WorkspaceMode::Dir, Some(repo)) => {
                return Err(WorkspaceError::RepoNotSupported {
                    repo: repo.into(),
                    mode: mode.as_str(),
                });
            }
            _ => {}
        }
        let dir = self.path(task, generation);
        let record = record_path(&dir);
        create_dir(&self.root, "create the workspaces directory").await?;
        let prepared = match repo {
            Some(repo) => {
                self.prepare_tree(task, generation, repo, base, &dir)
                    .await?
            }
            None => self.prepare_dir(task, generation, &dir).await?,
        };
        if let Err(e) = self.provision(task, generation, &prepared).await {
            self.mark_failed(&record, &e).await;
            return Err(e);
        }
        Ok(prepared)
    }

    /// Ends an attempt's use of its workspace: in git mode saves everything
    /// in it at `refs/muster/checkpoints/<task>/<generation>` and reports what
    /// the attempt did; in every mode records it finished, from when
    /// retention counts. Calling it again checkpoints again and keeps the
    /// first finish time. Shared mode has nothing to do. Call it for every
    /// prepared attempt, also after a restart for attempts that ended while
    /// the sidecar was down: an unfinished workspace is never removed.
    ///
    /// # Errors
    /// [`WorkspaceError::Unknown`] if the attempt has no record; git and IO
    /// failures of the checkpoint (the workspace is still recorded finished,
    /// and the sweep checkpoints again before it removes anything).
    pub async fn finish(
        &self,
        task: TaskId,
        generation: Generation,
    ) -> Result<WorkResult, WorkspaceError> {
        let dir = self.path(task, generation);
        let path = record_path(&dir);
        let Some(mut record) = read_record(&path).await else {
            if self.cfg.mode == WorkspaceMode::Shared {
                return Ok(WorkResult {
                    dir: self.shared.clone(),
                    ..WorkResult::default()
                });
            }
            return Err(WorkspaceError::Unknown {
                task,
                generation,
                root: self.root.clone(),
            });
        };
        let result = match record.mirror.clone() {
            Some(mirror) if record.kind == WorkspaceKind::Git => {
                self.inspect(&record, &dir, mirror).await
            }
            _ => Ok(WorkResult {
                dir: dir.clone(),
                ..WorkResult::default()
            }),
        };
        if let Ok(r) = &result {
            record.head.clone_from(&r.head);
            record.checkpoint.clone_from(&r.checkpoint_commit);
        }
        record.finished_at_ms.get_or_insert_with(wall_ms);
        write_record(&path, &record).await?;
        result
    }

    /// Every workspace on disk with its state and size. Blocking: walks every
    /// tree to size it (fine for a listing, not for each heartbeat).
    pub fn list(&self) -> Vec<WorkspaceInfo> {
        files::scan(&self.root)
    }

    /// Disk used by workspaces and mirrors. Blocking: walks every tree.
    pub fn disk_use(&self) -> DiskUse {
        let list = self.list();
        DiskUse {
            workspaces: list.iter().map(|w| w.bytes).sum(),
            count: list.len(),
            mirrors: files::disk_bytes(&self.mirrors),
        }
    }

    /// Removes what [`plan_removal`] chooses at `now_ms` (finished workspaces
    /// past `retention`, then the oldest finished ones while all exceed
    /// `max_disk`), each checkpointed again first; a workspace that cannot be
    /// saved is kept. Branch `muster/<task>` is deleted with the task's last
    /// tree when a checkpoint holds its head; checkpoint refs are always kept.
    /// Then `git gc --auto` runs in every mirror.
    pub async fn sweep(&self, now_ms: u64) -> SweepReport {
        let root = self.root.clone();
        let list = blocking(move || Ok(files::scan(&root)))
            .await
            .unwrap_or_default();
        let usage: Vec<Usage<usize>> = list
            .iter()
            .enumerate()
            .map(|(i, w)| Usage {
                id: i,
                finished_at_ms: (w.state == WorkspaceState::Finished)
                    .then_some(w.finished_at_ms.unwrap_or(0)),
                bytes: w.bytes,
            })
            .collect();
        let plan = plan_removal(&usage, now_ms, self.cfg.retention, self.cfg.max_disk);
        let mut report = SweepReport {
            remaining_bytes: list.iter().map(|w| w.bytes).sum(),
            ..SweepReport::default()
        };
        for i in plan {
            let w = &list[i];
            match self.remove(w).await {
                Ok(()) => {
                    report.removed.push((w.task, w.generation));
                    report.freed_bytes += w.bytes;
                    report.remaining_bytes = report.remaining_bytes.saturating_sub(w.bytes);
                }
                Err(e) => {
                    tracing::warn!(task = %w.task, generation = %w.generation, "workspace kept: {e}");
                    report.failed.push(format!("{}: {e}", w.dir.display()));
                }
            }
        }
        self.gc_mirrors(&mut report).await;
        report
    }

    // === prepare, by mode ===

    /// dir mode, or git mode without a repository: an empty directory.
    async fn prepare_dir(
        &self,
        task: TaskId,
        generation: Generation,
        dir: &Path,
    ) -> Result<Prepared, WorkspaceError> {
        let record = Record::new(task, generation, WorkspaceKind::Dir);
        remove(dir).await?;
        write_record(&record_path(dir), &record).await?;
        create_dir(dir, "create the workspace").await?;
        Ok(Prepared {
            dir: dir.to_owned(),
            ..Prepared::empty()
        })
    }

    /// git mode: a worktree of the repository's mirror.
    async fn prepare_tree(
        &self,
        task: TaskId,
        generation: Generation,
        repo: &str,
        base: Option<&str>,
        dir: &Path,
    ) -> Result<Prepared, WorkspaceError> {
        input::check_repo(repo)?;
        if let Some(b) = base {
            input::check_base(repo, b)?;
        }
        let mirror = Mirror::new(&self.mirrors, repo);
        let lock = self.lock_of(&mirror.dir);
        let mut state = lock.lock().await;
        if let Some(at) = state.killed_at.take() {
            git::clear_stale_locks(&mirror.dir, at).await;
        }
        let r = self.add_tree(&mirror, task, generation, base, dir).await;
        if r.as_ref().is_err_and(WorkspaceError::timed_out) {
            state.killed_at = Some(SystemTime::now());
        }
        r
    }

    /// The steps of [`Self::prepare_tree`] under the mirror's lock.
    async fn add_tree(
        &self,
        mirror: &Mirror,
        task: TaskId,
        generation: Generation,
        base: Option<&str>,
        dir: &Path,
    ) -> Result<Prepared, WorkspaceError> {
        let deadline = tokio::time::Instant::now() + self.cfg.fetch_timeout;
        mirror.refresh(deadline).await?;
        let base = mirror.resolve_base(base, deadline).await?;
        let branch = branch_name(task.0);
        if tokio::fs::try_exists(dir).await.unwrap_or(true) {
            self.retire(mirror, dir, task.0, generation.0).await?;
        }
        self.release_branch(mirror, &branch).await?;
        let from = match self.cfg.retry_from {
            RetryFrom::Checkpoint => mirror.latest_checkpoint(task.0).await?,
            RetryFrom::Base => None,
        };
        let start = from.as_ref().map_or(&base.commit, |(_, commit)| commit);
        // Work continued from a checkpoint made on an older base commit is
        // measured from where the two histories meet, not from the newer base.
        let measured_from = match &from {
            Some((_, ck)) => mirror
                .merge_base(&base.commit, ck)
                .await?
                .unwrap_or_else(|| base.commit.clone()),
            None => base.commit.clone(),
        };
        let base = git::Base {
            commit: measured_from,
            ..base
        };
        let record = Record {
            repo: Some(mirror.repo.clone()),
            mirror: Some(mirror.dir.clone()),
            branch: Some(branch.clone()),
            base: Some(base.name.clone()),
            base_ref: base.full.clone(),
            base_commit: Some(base.commit.clone()),
            continued_from: from.as_ref().map(|(name, _)| name.clone()),
            ..Record::new(task, generation, WorkspaceKind::Git)
        };
        let path = record_path(dir);
        write_record(&path, &record).await?;
        if let Err(e) = mirror.add_worktree(dir, &branch, start).await {
            let _ = remove(dir).await;
            let _ = remove(&path).await;
            return Err(e);
        }
        Ok(Prepared {
            dir: dir.to_owned(),
            branch: Some(branch),
            base: Some(base.name),
            base_ref: base.full,
            base_commit: Some(base.commit),
            continued_from: from.map(|(name, _)| name),
        })
    }

    /// Makes `branch` free for a new worktree: a tree of an earlier attempt
    /// that still has it checked out is checkpointed, then detached (its
    /// files and index stay as they are). Holds the mirror's lock.
    async fn release_branch(&self, mirror: &Mirror, branch: &str) -> Result<(), WorkspaceError> {
        let full = format!("refs/heads/{branch}");
        for w in mirror.worktrees().await? {
            if w.branch.as_deref() != Some(full.as_str()) {
                continue;
            }
            let name = w.path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if let Some((task, generation)) = files::parse_attempt(name) {
                self.save(mirror, &w.path, task, generation).await?;
            }
            if let Some(head) = &w.head {
                git::detach(&w.path, head).await?;
            }
        }
        Ok(())
    }

    /// Checkpoints the tree at `dir` of attempt (`task`, `generation`) into
    /// its ref. Holds the mirror's lock.
    async fn save(
        &self,
        mirror: &Mirror,
        dir: &Path,
        task: u64,
        generation: u64,
    ) -> Result<git::Snapshot, WorkspaceError> {
        let name = checkpoint_ref(task, generation);
        let snap = git::snapshot(dir, &checkpoint_message(task, generation), Some(&name)).await?;
        mirror.set_ref(&name, &snap.commit).await?;
        Ok(snap)
    }

    /// Replaces a leftover tree at `dir`: saved first if it is a worktree. Holds the mirror's lock.
    async fn retire(
        &self,
        mirror: &Mirror,
        dir: &Path,
        task: u64,
        generation: u64,
    ) -> Result<(), WorkspaceError> {
        if tokio::fs::try_exists(dir.join(".git"))
            .await
            .unwrap_or(false)
        {
            self.save(mirror, dir, task, generation).await?;
        }
        remove(dir).await?;
        mirror.worktrees().await.map(drop)
    }

    /// Copies the `copy` entries and runs `setup_command` in a new workspace.
    async fn provision(
        &self,
        task: TaskId,
        generation: Generation,
        p: &Prepared,
    ) -> Result<(), WorkspaceError> {
        if let Some(template) = &self.cfg.template_dir {
            for entry in &self.cfg.copy {
                let (t, e, d) = (template.clone(), entry.clone(), p.dir.clone());
                let copied = tokio::task::spawn_blocking(move || files::copy_entry(&t, &e, &d))
                    .await
                    .unwrap_or_else(|e| {
                        Err(files::CopyError::Io(
                            PathBuf::new(),
                            std::io::Error::other(e),
                        ))
                    });
                match copied {
                    Ok(()) => {}
                    Err(files::CopyError::Missing(source_path)) => {
                        return Err(WorkspaceError::CopyMissing {
                            entry: entry.clone(),
                            source_path,
                        });
                    }
                    Err(files::CopyError::Io(path, source)) => {
                        return Err(WorkspaceError::Io {
                            action: "copy a [workspace] copy entry to",
                            path,
                            source,
                        });
                    }
                }
            }
        }
        if self.cfg.setup_command.is_empty() {
            return Ok(());
        }
        self.setup(task, generation, p).await
    }

    /// Runs `setup_command` in the workspace, with `setup_timeout`.
    async fn setup(
        &self,
        task: TaskId,
        generation: Generation,
        p: &Prepared,
    ) -> Result<(), WorkspaceError> {
        use std::os::unix::process::ExitStatusExt;
        let argv = &self.cfg.setup_command;
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .current_dir(&p.dir)
            .env("MUSTER_WORKSPACE", &p.dir)
            .env("MUSTER_TASK_ID", task.to_string())
            .env("MUSTER_GENERATION", generation.to_string())
            .env("GIT_TERMINAL_PROMPT", "0");
        if let Some(b) = &p.branch {
            cmd.env("MUSTER_BRANCH", b);
        }
        if let Some(b) = &p.base {
            cmd.env("MUSTER_BASE", b);
        }
        let fail =
            |exit_code, signal, timed_out, stdout: &[u8], stderr: &[u8]| WorkspaceError::Setup {
                command: argv.clone(),
                exit_code,
                signal,
                timed_out,
                stdout_tail: run::tail(stdout),
                stderr_tail: run::tail(stderr),
            };
        let tail_max = muster_protocol::limits::TAIL_BYTES_MAX;
        match run::run(cmd, self.cfg.setup_timeout, run::Keep::Tail(tail_max)).await {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(fail(
                out.status.code(),
                out.status.signal(),
                false,
                &out.stdout,
                &out.stderr,
            )),
            Err(run::RunError::TimedOut { stdout, stderr, .. }) => {
                Err(fail(None, Some(libc::SIGKILL), true, &stdout, &stderr))
            }
            Err(run::RunError::Spawn(e) | run::RunError::Wait(e)) => {
                Err(fail(None, None, false, &[], e.to_string().as_bytes()))
            }
        }
    }

    /// Records a failed prepare as finished, so that the sweep removes it in time.
    async fn mark_failed(&self, path: &Path, e: &WorkspaceError) {
        if let Some(mut record) = read_record(path).await {
            record.failed = Some(e.to_string());
            record.finished_at_ms = Some(wall_ms());
            if let Err(w) = write_record(path, &record).await {
                tracing::warn!("{w}");
            }
        }
    }

    // === finish ===

    /// Checkpoints a finished git attempt and reads what it did.
    async fn inspect(
        &self,
        record: &Record,
        dir: &Path,
        mirror_dir: PathBuf,
    ) -> Result<WorkResult, WorkspaceError> {
        let (task, generation) = (record.task, record.generation);
        let name = checkpoint_ref(task, generation);
        let message = checkpoint_message(task, generation);
        let mirror = Mirror {
            repo: record.repo.clone().unwrap_or_default(),
            dir: mirror_dir,
        };
        // Objects need no lock; the ref is written under it.
        let snap = git::snapshot(dir, &message, Some(&name)).await?;
        {
            let lock = self.lock_of(&mirror.dir);
            let _held = lock.lock().await;
            mirror.set_ref(&name, &snap.commit).await?;
        }
        let mut result = WorkResult {
            dir: dir.to_owned(),
            branch: record.branch.clone(),
            head: snap.head.clone(),
            base_commit: record.base_commit.clone(),
            dirty: snap.dirty,
            checkpoint: Some(name),
            checkpoint_commit: Some(snap.commit.clone()),
            ..WorkResult::default()
        };
        if let Some(base) = &record.base_commit {
            if let Some(head) = &snap.head {
                result.commits = Some(git::count_commits(dir, base, head).await?);
            }
            let (stat, cut) = git::diff_stat(dir, base, &snap.commit).await?;
            result.diff_stat = Some(stat);
            result.diff_stat_cut = cut;
        }
        Ok(result)
    }

    // === sweep ===

    /// Removes one workspace: a git tree is checkpointed first (kept if that
    /// fails), then removed and its branch dropped if a checkpoint holds it.
    async fn remove(&self, w: &WorkspaceInfo) -> Result<(), WorkspaceError> {
        let path = record_path(&w.dir);
        let record = read_record(&path).await;
        let mirror = record
            .as_ref()
            .filter(|r| r.kind == WorkspaceKind::Git)
            .and_then(|r| Some((r.repo.clone().unwrap_or_default(), r.mirror.clone()?)));
        if let Some((repo, dir)) = mirror {
            let mirror = Mirror { repo, dir };
            let lock = self.lock_of(&mirror.dir);
            let _held = lock.lock().await;
            let is_tree = tokio::fs::try_exists(w.dir.join(".git"))
                .await
                .unwrap_or(false);
            if is_tree && tokio::fs::try_exists(&mirror.dir).await.unwrap_or(false) {
                self.save(&mirror, &w.dir, w.task.0, w.generation.0).await?;
            }
            remove(&w.dir).await?;
            if tokio::fs::try_exists(&mirror.dir).await.unwrap_or(false) {
                mirror.drop_branch_if_kept(w.task.0).await?;
            }
        } else {
            remove(&w.dir).await?;
        }
        remove(&path).await
    }

    /// `git gc --auto` in every mirror, each under its lock.
    async fn gc_mirrors(&self, report: &mut SweepReport) {
        let Ok(mut entries) = tokio::fs::read_dir(&self.mirrors).await else {
            return;
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || !name.ends_with(".git") {
                continue;
            }
            let mirror = Mirror {
                repo: String::new(),
                dir: entry.path(),
            };
            let lock = self.lock_of(&mirror.dir);
            let _held = lock.lock().await;
            if let Err(e) = mirror.gc().await {
                report.failed.push(format!("gc of {name}: {e}"));
            }
        }
    }

    fn lock_of(&self, mirror: &Path) -> Arc<tokio::sync::Mutex<MirrorState>> {
        // A poisoned map still holds valid entries: each insert is one call.
        let mut map = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(mirror.to_owned()).or_default().clone()
    }
}

impl Prepared {
    fn empty() -> Self {
        Prepared {
            dir: PathBuf::new(),
            branch: None,
            base: None,
            base_ref: None,
            base_commit: None,
            continued_from: None,
        }
    }
}

impl Record {
    fn new(task: TaskId, generation: Generation, kind: WorkspaceKind) -> Self {
        Record {
            task: task.0,
            generation: generation.0,
            kind,
            repo: None,
            mirror: None,
            branch: None,
            base: None,
            base_ref: None,
            base_commit: None,
            continued_from: None,
            prepared_at_ms: wall_ms(),
            finished_at_ms: None,
            head: None,
            checkpoint: None,
            failed: None,
        }
    }
}

/// The installed git's version line, e.g. "git version 2.47.3", for `doctor`.
///
/// # Errors
/// git is missing or does not answer within a few seconds.
pub async fn git_version() -> Result<String, WorkspaceError> {
    let cmd = run::GitCmd::new(Path::new("/"), ["--version"]);
    let display = cmd.display();
    match cmd
        .run(std::time::Duration::from_secs(10), run::Keep::Head(256))
        .await
    {
        Ok(out) if out.status.success() => Ok(run::text(&out.stdout)),
        Ok(out) => Err(WorkspaceError::Git {
            command: display,
            detail: run::text(&out.stderr),
            timed_out: false,
        }),
        Err(e) => Err(WorkspaceError::Git {
            command: display,
            detail: match e {
                run::RunError::Spawn(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    "git is not installed or not in PATH; install git 2.24 or newer".into()
                }
                other => format!("{other:?}"),
            },
            timed_out: false,
        }),
    }
}

// === Helpers ===

fn checkpoint_message(task: u64, generation: u64) -> String {
    format!(
        "muster checkpoint: task {task}, generation {generation}\n\nUncommitted work of the attempt, saved by the sidecar."
    )
}

/// Now as Unix milliseconds (records are kept across restarts, so wall-clock time).
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

async fn create_dir(dir: &Path, action: &'static str) -> Result<(), WorkspaceError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|source| WorkspaceError::Io {
            action,
            path: dir.to_owned(),
            source,
        })
}

async fn remove(path: &Path) -> Result<(), WorkspaceError> {
    let p = path.to_owned();
    blocking(move || files::remove_all(&p))
        .await
        .map_err(|source| WorkspaceError::Io {
            action: "remove",
            path: path.to_owned(),
            source,
        })
}

async fn read_record(path: &Path) -> Option<Record> {
    let p = path.to_owned();
    blocking(move || Ok(files::read_record(&p)))
        .await
        .ok()
        .flatten()
}

async fn write_record(path: &Path, record: &Record) -> Result<(), WorkspaceError> {
    let (p, r) = (path.to_owned(), record.clone());
    blocking(move || files::write_record(&p, &r))
        .await
        .map_err(|source| WorkspaceError::Io {
            action: "write the workspace record",
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests;
