//! The git work: a bare mirror per repository, the task's base, worktrees,
//! and checkpoints. Each function is one or a few `git` commands; callers
//! hold the mirror's lock where the doc says so.
//!
//! Refs in a mirror (a bare repository):
//!
//! ```text
//! refs/remotes/origin/*               the repository's branches  ◀─ fetch --prune
//! refs/remotes/origin/HEAD            → its default branch         (remote set-head --auto)
//! refs/tags/*                         its tags                   ◀─ fetch --prune
//! refs/heads/muster/<task>            the branch attempts of a task work on (worktree add -B)
//! refs/muster/checkpoints/<task>/<g>  each attempt's work, uncommitted changes included
//! ```
//!
//! The repository's branches are kept under `refs/remotes/origin/`, not
//! `refs/heads/`: `fetch --prune` deletes what the remote lacks among the
//! refs its refspecs write, so `refs/heads/*` would lose every `muster/<task>`
//! branch, and a `muster/<task>` branch pushed to the remote would overwrite
//! the local one. Only `refs/remotes/origin/*` and `refs/tags/*` are written
//! by fetches, so the branches and checkpoints are never touched by one.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::WorkspaceError;
use super::run::{GitCmd, Keep, Output, RunError, STDOUT_MAX, tail, text};

/// Longest local git command (`worktree add` of a large tree, `add -A` of a
/// dirty one, `gc`): local work on a slow disk, far longer than expected.
pub(super) const LOCAL_TIMEOUT: Duration = Duration::from_secs(300);

/// Most bytes of `git diff --stat` kept in a [`super::WorkResult`]: enough
/// for about 50 files' lines and the summary.
pub const DIFF_STAT_BYTES_MAX: usize = 4096;

/// The remote's name inside each mirror.
const REMOTE: &str = "origin";

/// The refspecs of every fetch (see the module doc for why not `refs/heads/*`).
const REFSPECS: [&str; 2] = [
    "+refs/heads/*:refs/remotes/origin/*",
    "+refs/tags/*:refs/tags/*",
];

/// Appended to each new mirror's config. They hold for agents' own git
/// commands in the worktrees, which share this repository: a plain `git
/// fetch` in a tree updates the same `refs/remotes/origin/*` ours does (and
/// so never a `muster/*` branch); no automatic gc while several trees use it
/// (the sweep runs `gc --auto` under the mirror's lock); and waits on ref
/// locks rather than failing at once when two trees update refs together.
const MIRROR_CONFIG: &str = "[remote \"origin\"]\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n\
                             [gc]\n\tauto = 0\n\tautoDetach = false\n\
                             [maintenance]\n\tauto = false\n\
                             [core]\n\tpackedRefsTimeout = 10000\n\tfilesRefLockTimeout = 2000\n";

/// The identity of checkpoint commits: fixed, so that they are told apart
/// from the agent's commits and never depend on the host's git config.
const CHECKPOINT_IDENTITY: &[(&str, &str)] = &[
    ("GIT_AUTHOR_NAME", "muster"),
    ("GIT_AUTHOR_EMAIL", "muster@localhost"),
    ("GIT_COMMITTER_NAME", "muster"),
    ("GIT_COMMITTER_EMAIL", "muster@localhost"),
];

/// The branch attempts of `task` work on.
pub(super) fn branch_name(task: u64) -> String {
    format!("muster/{task}")
}

/// Where attempt `generation` of `task` keeps its work.
pub(super) fn checkpoint_ref(task: u64, generation: u64) -> String {
    format!("refs/muster/checkpoints/{task}/{generation}")
}

// === Running git ===

/// Runs `cmd` for at most `timeout`; a non-zero exit is an error.
async fn ok(cmd: GitCmd, timeout: Duration, keep: Keep) -> Result<Output, WorkspaceError> {
    let out = exec(&cmd, timeout, keep).await?;
    if out.status.success() {
        return Ok(out);
    }
    Err(failed(&cmd, &out))
}

/// Runs `cmd` and returns its stdout, trimmed.
async fn stdout(cmd: GitCmd, timeout: Duration) -> Result<String, WorkspaceError> {
    let display = cmd.display();
    let out = ok(cmd, timeout, Keep::Head(STDOUT_MAX)).await?;
    if out.stdout_cut {
        return Err(WorkspaceError::Git {
            command: display,
            detail: format!("printed more than {STDOUT_MAX} bytes"),
            timed_out: false,
        });
    }
    Ok(text(&out.stdout))
}

/// Runs a command whose exit 1 means "no" (`rev-parse --verify -q`,
/// `symbolic-ref -q`): its stdout on 0, `None` on 1, an error otherwise.
async fn probe(cmd: GitCmd, timeout: Duration) -> Result<Option<String>, WorkspaceError> {
    let out = exec(&cmd, timeout, Keep::Head(STDOUT_MAX)).await?;
    match out.status.code() {
        Some(0) => Ok(Some(text(&out.stdout))),
        Some(1) => Ok(None),
        _ => Err(failed(&cmd, &out)),
    }
}

async fn exec(cmd: &GitCmd, timeout: Duration, keep: Keep) -> Result<Output, WorkspaceError> {
    cmd.run(timeout, keep).await.map_err(|e| {
        let (detail, timed_out) = match e {
            RunError::Spawn(e) if e.kind() == std::io::ErrorKind::NotFound => (
                "git is not installed or not in PATH; install git 2.24 or newer".to_string(),
                false,
            ),
            RunError::Spawn(e) => (format!("could not start git: {e}"), false),
            RunError::Wait(e) => (format!("waiting for git failed: {e}"), false),
            RunError::TimedOut { after, stderr, .. } => (
                format!(
                    "still running after {}, killed{}",
                    muster_protocol::duration::format_duration(after),
                    said(&stderr)
                ),
                true,
            ),
        };
        WorkspaceError::Git {
            command: cmd.display(),
            detail,
            timed_out,
        }
    })
}

fn failed(cmd: &GitCmd, out: &Output) -> WorkspaceError {
    WorkspaceError::Git {
        command: cmd.display(),
        detail: format!("{}{}", exit_text(out.status), said(&out.stderr)),
        timed_out: false,
    }
}

fn exit_text(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => format!("ended with {status}"),
    }
}

/// `; it said: <stderr tail>` when stderr has anything, its lines joined
/// with " / " so that the error stays one line in logs.
fn said(stderr: &[u8]) -> String {
    let t = tail(stderr);
    let lines: Vec<&str> = t.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if lines.is_empty() {
        String::new()
    } else {
        format!("; it said: {}", lines.join(" / "))
    }
}

/// The time left until `deadline`, or a fetch timeout error naming `what`.
fn left(
    deadline: Instant,
    repo: &str,
    mirror: &Path,
    what: &str,
) -> Result<Duration, WorkspaceError> {
    let now = Instant::now();
    if now >= deadline {
        return Err(WorkspaceError::Fetch {
            repo: repo.into(),
            mirror: mirror.to_owned(),
            command: what.into(),
            detail: "fetch_timeout was used up before it could start".into(),
            timed_out: true,
        });
    }
    Ok(deadline - now)
}

/// A [`WorkspaceError::Git`] of a network command as a [`WorkspaceError::Fetch`].
fn as_fetch(e: WorkspaceError, repo: &str, mirror: &Path) -> WorkspaceError {
    match e {
        WorkspaceError::Git {
            command,
            detail,
            timed_out,
        } => WorkspaceError::Fetch {
            repo: repo.into(),
            mirror: mirror.to_owned(),
            command,
            detail,
            timed_out,
        },
        other => other,
    }
}

// === impl Mirror ===

/// The bare mirror of one repository, `<data_dir>/mirrors/<hash>-<name>.git`.
#[derive(Debug, Clone)]
pub(super) struct Mirror {
    /// The repository as the task gave it.
    pub(super) repo: String,
    pub(super) dir: PathBuf,
}

/// A task's base, resolved in a mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Base {
    /// As the task gave it, or the default branch's name.
    pub(super) name: String,
    /// The full ref it resolved to (`refs/remotes/origin/main`), unless it named a commit.
    pub(super) full: Option<String>,
    pub(super) commit: String,
}

/// One worktree of a mirror, from `git worktree list --porcelain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Worktree {
    pub(super) path: PathBuf,
    pub(super) head: Option<String>,
    /// The full ref checked out (`refs/heads/muster/17`); `None` when detached.
    pub(super) branch: Option<String>,
}

impl Mirror {
    /// The mirror of `repo` under `mirrors`: a directory named by a hash of the
    /// repository text (so two spellings of one repository get two mirrors,
    /// and no two repositories share one) and its last path part, for people.
    pub(super) fn new(mirrors: &Path, repo: &str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, repo.as_bytes());
        let hash: String = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let last = repo
            .trim_end_matches('/')
            .rsplit(['/', ':'])
            .next()
            .unwrap_or_default();
        let last = last.strip_suffix(".git").unwrap_or(last);
        let mut name: String = last
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        if name.is_empty() || name.starts_with('.') {
            name.insert_str(0, "repo");
        }
        Mirror {
            repo: repo.to_owned(),
            dir: mirrors.join(format!("{hash}-{name}.git")),
        }
    }

    fn git<I, S>(&self, args: I) -> GitCmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        GitCmd::new(&self.dir, args)
    }

    /// Makes the mirror up to date with the repository: created on first
    /// use, fetched otherwise, all before `deadline`. Hold the mirror's lock.
    pub(super) async fn refresh(&self, deadline: Instant) -> Result<(), WorkspaceError> {
        if self.dir.join("HEAD").exists() {
            return self.fetch(&self.dir, deadline).await;
        }
        self.create(deadline).await
    }

    /// `git init --bare` in a temporary directory, its config, the first
    /// fetch, then one rename: a mirror that exists is complete.
    async fn create(&self, deadline: Instant) -> Result<(), WorkspaceError> {
        let parent = self.dir.parent().unwrap_or(Path::new("."));
        let name = self.dir.file_name().unwrap_or_default().to_string_lossy();
        let tmp = parent.join(format!(".new-{}-{name}", std::process::id()));
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| WorkspaceError::Io {
                action,
                path,
                source,
            }
        };
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(io("create the mirrors directory", parent))?;
        let _ = super::blocking(files_remove(tmp.clone())).await;
        let made = async {
            let init = GitCmd::new(
                parent,
                [
                    OsStr::new("init"),
                    OsStr::new("--bare"),
                    OsStr::new("--quiet"),
                    tmp.as_os_str(),
                ],
            );
            ok(init, LOCAL_TIMEOUT, Keep::Tail(0)).await?;
            let config = tmp.join("config");
            let mut text = tokio::fs::read_to_string(&config)
                .await
                .map_err(io("read", &config))?;
            text.push_str(MIRROR_CONFIG);
            tokio::fs::write(&config, text)
                .await
                .map_err(io("write", &config))?;
            let url = GitCmd::new(&tmp, ["config", "remote.origin.url", self.repo.as_str()]);
            ok(url, LOCAL_TIMEOUT, Keep::Tail(0)).await?;
            self.fetch(&tmp, deadline).await?;
            tokio::fs::rename(&tmp, &self.dir)
                .await
                .map_err(io("move the new mirror into place at", &self.dir))
        }
        .await;
        if made.is_err() {
            let _ = super::blocking(files_remove(tmp)).await;
        }
        made
    }

    /// `git fetch --prune` of the repository's branches and tags into `dir`.
    async fn fetch(&self, dir: &Path, deadline: Instant) -> Result<(), WorkspaceError> {
        let mut args = vec!["fetch", "--quiet", "--prune", "--no-tags", REMOTE];
        args.extend(REFSPECS);
        let cmd = GitCmd::new(dir, args);
        let time = left(deadline, &self.repo, &self.dir, &cmd.display())?;
        ok(cmd, time, Keep::Tail(0))
            .await
            .map(drop)
            .map_err(|e| as_fetch(e, &self.repo, &self.dir))
    }

    /// The commit and names of `base`, or of the default branch when `None`.
    /// Hold the mirror's lock (the default branch may be asked of the remote).
    pub(super) async fn resolve_base(
        &self,
        base: Option<&str>,
        deadline: Instant,
    ) -> Result<Base, WorkspaceError> {
        let Some(base) = base else {
            return self.default_branch(deadline).await;
        };
        let branch = base.strip_prefix("refs/heads/").unwrap_or(base);
        let tag = base.strip_prefix("refs/tags/").unwrap_or(base);
        for full in [
            format!("refs/remotes/{REMOTE}/{branch}"),
            format!("refs/tags/{tag}"),
        ] {
            if let Some(commit) = self.commit_of(&full).await? {
                return Ok(Base {
                    name: base.into(),
                    full: Some(full),
                    commit,
                });
            }
        }
        match self.commit_of(base).await? {
            Some(commit) => Ok(Base {
                name: base.into(),
                full: None,
                commit,
            }),
            None => Err(WorkspaceError::BadBase {
                repo: self.repo.clone(),
                base: base.into(),
                reason: "names no branch, tag or commit of the repository (after a fetch); check the task's base".into(),
            }),
        }
    }

    /// `refs/remotes/origin/HEAD`, asked of the remote (`remote set-head
    /// --auto`) when it is missing or names a branch that is gone.
    async fn default_branch(&self, deadline: Instant) -> Result<Base, WorkspaceError> {
        let head = format!("refs/remotes/{REMOTE}/HEAD");
        for ask in [false, true] {
            if ask {
                let cmd = self.git(["remote", "set-head", REMOTE, "--auto"]);
                let time = left(deadline, &self.repo, &self.dir, &cmd.display())?;
                // A repository without a HEAD makes this fail; say so below.
                if let Err(e) = ok(cmd, time, Keep::Tail(0)).await {
                    if e.timed_out() {
                        return Err(as_fetch(e, &self.repo, &self.dir));
                    }
                    break;
                }
            }
            let target = probe(
                self.git(["symbolic-ref", "-q", head.as_str()]),
                LOCAL_TIMEOUT,
            )
            .await?;
            if let Some(full) = target
                && let Some(commit) = self.commit_of(&full).await?
            {
                let prefix = format!("refs/remotes/{REMOTE}/");
                return Ok(Base {
                    name: full.strip_prefix(&prefix).unwrap_or(&full).to_string(),
                    full: Some(full),
                    commit,
                });
            }
        }
        Err(WorkspaceError::BadBase {
            repo: self.repo.clone(),
            base: String::new(),
            reason: "the repository has no default branch (an empty repository, or HEAD names no branch); give the task a base".into(),
        })
    }

    /// The commit `rev` names in the mirror, if any.
    pub(super) async fn commit_of(&self, rev: &str) -> Result<Option<String>, WorkspaceError> {
        let peeled = format!("{rev}^{{commit}}");
        let cmd = self.git([
            "rev-parse",
            "--verify",
            "-q",
            "--end-of-options",
            peeled.as_str(),
        ]);
        probe(cmd, LOCAL_TIMEOUT).await
    }

    /// Where the histories of `a` and `b` meet (`git merge-base`), if they do.
    pub(super) async fn merge_base(
        &self,
        a: &str,
        b: &str,
    ) -> Result<Option<String>, WorkspaceError> {
        probe(self.git(["merge-base", a, b]), LOCAL_TIMEOUT).await
    }

    /// The newest checkpoint of `task` (highest generation): its ref and commit.
    pub(super) async fn latest_checkpoint(
        &self,
        task: u64,
    ) -> Result<Option<(String, String)>, WorkspaceError> {
        let prefix = format!("refs/muster/checkpoints/{task}/");
        let list = stdout(
            self.git([
                "for-each-ref",
                "--format=%(refname) %(objectname)",
                prefix.as_str(),
            ]),
            LOCAL_TIMEOUT,
        )
        .await?;
        Ok(list
            .lines()
            .filter_map(|line| {
                let (name, commit) = line.split_once(' ')?;
                let generation: u64 = name.strip_prefix(&prefix)?.parse().ok()?;
                Some((generation, name.to_string(), commit.to_string()))
            })
            .max_by_key(|(g, _, _)| *g)
            .map(|(_, name, commit)| (name, commit)))
    }

    /// Forgets worktrees whose directories are gone, then lists the rest.
    pub(super) async fn worktrees(&self) -> Result<Vec<Worktree>, WorkspaceError> {
        ok(
            self.git(["worktree", "prune"]),
            LOCAL_TIMEOUT,
            Keep::Tail(0),
        )
        .await?;
        let list = stdout(self.git(["worktree", "list", "--porcelain"]), LOCAL_TIMEOUT).await?;
        Ok(parse_worktrees(&list))
    }

    /// `git worktree add -B <branch> <dir> <start>`, checking files out with
    /// one worker per CPU (`checkout.workers=0`; about 15% faster than one on
    /// the 2-CPU benchmark VM for 5,000 files, and ignored by git before 2.32).
    /// Hold the mirror's lock.
    pub(super) async fn add_worktree(
        &self,
        dir: &Path,
        branch: &str,
        start: &str,
    ) -> Result<(), WorkspaceError> {
        let cmd = self.git([
            OsStr::new("-c"),
            OsStr::new("checkout.workers=0"),
            OsStr::new("worktree"),
            OsStr::new("add"),
            OsStr::new("--quiet"),
            OsStr::new("--no-track"),
            OsStr::new("-B"),
            OsStr::new(branch),
            dir.as_os_str(),
            OsStr::new(start),
        ]);
        ok(cmd, LOCAL_TIMEOUT, Keep::Tail(0)).await.map(drop)
    }

    /// Points `name` at `commit`. Hold the mirror's lock.
    pub(super) async fn set_ref(&self, name: &str, commit: &str) -> Result<(), WorkspaceError> {
        let cmd = self.git(["update-ref", "-m", "muster checkpoint", name, commit]);
        ok(cmd, LOCAL_TIMEOUT, Keep::Tail(0)).await.map(drop)
    }

    /// Deletes branch `muster/<task>` if no worktree has it checked out and a
    /// checkpoint of the task contains its head; whether it did. Hold the
    /// mirror's lock.
    pub(super) async fn drop_branch_if_kept(&self, task: u64) -> Result<bool, WorkspaceError> {
        let full = format!("refs/heads/{}", branch_name(task));
        if self
            .worktrees()
            .await?
            .iter()
            .any(|w| w.branch.as_deref() == Some(full.as_str()))
        {
            return Ok(false);
        }
        let Some(head) = self.commit_of(&full).await? else {
            return Ok(false);
        };
        let prefix = format!("refs/muster/checkpoints/{task}/");
        let holders = stdout(
            self.git([
                "for-each-ref",
                "--format=%(refname)",
                "--contains",
                head.as_str(),
                prefix.as_str(),
            ]),
            LOCAL_TIMEOUT,
        )
        .await?;
        if holders.is_empty() {
            return Ok(false);
        }
        // Deleted only if it still points where it was checked (an agent may commit meanwhile).
        let cmd = self.git(["update-ref", "-d", full.as_str(), head.as_str()]);
        ok(cmd, LOCAL_TIMEOUT, Keep::Tail(0)).await?;
        Ok(true)
    }

    /// `git gc --auto` in the foreground. Hold the mirror's lock.
    pub(super) async fn gc(&self) -> Result<(), WorkspaceError> {
        let cmd = self.git([
            "-c",
            "gc.auto=6700",
            "-c",
            "gc.autoDetach=false",
            "gc",
            "--auto",
            "--quiet",
        ]);
        ok(cmd, LOCAL_TIMEOUT, Keep::Tail(0)).await.map(drop)
    }
}

/// Lock files in `mirror` older than `killed_at`, left by a git command of
/// ours that was killed at its deadline: refs and packed refs, HEAD, config
/// and shallow. Lock files made since are another live command's and stay.
/// Worktrees' own locks (`worktrees/*/index.lock`) are the agents' and stay.
pub(super) async fn clear_stale_locks(mirror: &Path, killed_at: SystemTime) {
    let mirror = mirror.to_owned();
    let removed = super::blocking(move || {
        let mut removed = Vec::new();
        let mut stack = vec![mirror.join("refs")];
        let mut candidates: Vec<PathBuf> = [
            "packed-refs.lock",
            "HEAD.lock",
            "config.lock",
            "shallow.lock",
        ]
        .iter()
        .map(|n| mirror.join(n))
        .collect();
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(path);
                } else if path.extension().is_some_and(|x| x == "lock") {
                    candidates.push(path);
                }
            }
        }
        for path in candidates {
            let stale = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t <= killed_at);
            if stale && std::fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
        Ok(removed)
    })
    .await
    .unwrap_or_default();
    for path in removed {
        tracing::warn!(
            "removed {}, left by a git command killed at its deadline",
            path.display()
        );
    }
}

fn files_remove(path: PathBuf) -> impl FnOnce() -> std::io::Result<()> + Send + 'static {
    move || super::files::remove_all(&path)
}

/// The blocks of `git worktree list --porcelain`.
fn parse_worktrees(text: &str) -> Vec<Worktree> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut w = Worktree {
            path: PathBuf::new(),
            head: None,
            branch: None,
        };
        for line in block.lines() {
            if let Some(p) = line.strip_prefix("worktree ") {
                w.path = PathBuf::from(p);
            } else if let Some(h) = line.strip_prefix("HEAD ") {
                w.head = Some(h.to_string());
            } else if let Some(b) = line.strip_prefix("branch ") {
                w.branch = Some(b.to_string());
            }
        }
        if !w.path.as_os_str().is_empty() {
            out.push(w);
        }
    }
    out
}

// === Checkpoints ===

/// A tree's state as one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Snapshot {
    /// The tree's HEAD commit; `None` if it has none (an orphan branch with no commit yet).
    pub(super) head: Option<String>,
    /// HEAD when the tree holds nothing uncommitted, else a new commit on top of HEAD with all of it.
    pub(super) commit: String,
    /// Whether there were uncommitted changes (untracked files that are not ignored included).
    pub(super) dirty: bool,
}

/// Commits everything in the worktree at `dir` that is not ignored, without
/// touching its branch, index or files: `git add -A` into a copy of its
/// index (so only changed files are read again), `write-tree`, and
/// `commit-tree` on top of HEAD. `previous` is the checkpoint ref already
/// written for this attempt: when it holds the same tree on the same HEAD it
/// is reused rather than a twin commit made. Needs no lock: it only adds
/// objects, which git writes atomically.
pub(super) async fn snapshot(
    dir: &Path,
    message: &str,
    previous: Option<&str>,
) -> Result<Snapshot, WorkspaceError> {
    let git = |args: &[&str]| GitCmd::new(dir, args);
    let heads = stdout(git(&["rev-parse", "--git-path", "index"]), LOCAL_TIMEOUT).await?;
    let index = dir.join(heads.trim());
    let head = probe(
        git(&["rev-parse", "--verify", "-q", "HEAD^{commit}"]),
        LOCAL_TIMEOUT,
    )
    .await?;
    let head_tree = match &head {
        Some(_) => Some(stdout(git(&["rev-parse", "HEAD^{tree}"]), LOCAL_TIMEOUT).await?),
        None => None,
    };
    let temp = index.with_file_name("muster-checkpoint.index");
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| WorkspaceError::Io {
            action,
            path,
            source,
        }
    };
    match tokio::fs::copy(&index, &temp).await {
        Ok(_) => {}
        // A tree whose index is gone is read whole.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let _ = tokio::fs::remove_file(&temp).await;
        }
        Err(e) => return Err(io("copy the index", &index)(e)),
    }
    let tree = async {
        let add = GitCmd::new(dir, ["add", "-A", "--", "."]).env("GIT_INDEX_FILE", &temp);
        ok(add, LOCAL_TIMEOUT, Keep::Tail(0)).await?;
        stdout(
            GitCmd::new(dir, ["write-tree"]).env("GIT_INDEX_FILE", &temp),
            LOCAL_TIMEOUT,
        )
        .await
    }
    .await;
    let _ = tokio::fs::remove_file(&temp).await;
    let tree = tree?;
    if let (Some(head), Some(head_tree)) = (&head, &head_tree)
        && *head_tree == tree
    {
        return Ok(Snapshot {
            head: Some(head.clone()),
            commit: head.clone(),
            dirty: false,
        });
    }
    if let Some(prev) = previous {
        let same = stdout(
            git(&["log", "-1", "--format=%T %P", "--end-of-options", prev]),
            LOCAL_TIMEOUT,
        )
        .await
        .ok();
        let wanted = format!("{tree} {}", head.as_deref().unwrap_or(""));
        if same.as_deref().map(str::trim_end) == Some(wanted.trim_end()) {
            let commit = stdout(git(&["rev-parse", prev]), LOCAL_TIMEOUT).await?;
            return Ok(Snapshot {
                head,
                commit,
                dirty: true,
            });
        }
    }
    let mut args = vec!["commit-tree", tree.as_str(), "-m", message];
    if let Some(h) = &head {
        args.extend(["-p", h.as_str()]);
    }
    let mut cmd = git(&args);
    for (k, v) in CHECKPOINT_IDENTITY {
        cmd = cmd.env(k, v);
    }
    let commit = stdout(cmd, LOCAL_TIMEOUT).await?;
    Ok(Snapshot {
        head,
        commit,
        dirty: true,
    })
}

/// Detaches the worktree at `dir` from its branch, leaving its files and
/// index as they are, so that another worktree can take the branch.
pub(super) async fn detach(dir: &Path, head: &str) -> Result<(), WorkspaceError> {
    let cmd = GitCmd::new(
        dir,
        [
            "update-ref",
            "--no-deref",
            "-m",
            "muster: branch taken by a newer attempt",
            "HEAD",
            head,
        ],
    );
    ok(cmd, LOCAL_TIMEOUT, Keep::Tail(0)).await.map(drop)
}

/// `git rev-list --count <from>..<to>` in the worktree at `dir`.
pub(super) async fn count_commits(dir: &Path, from: &str, to: &str) -> Result<u64, WorkspaceError> {
    let range = format!("{from}..{to}");
    let cmd = GitCmd::new(dir, ["rev-list", "--count", range.as_str()]);
    let display = cmd.display();
    let n = stdout(cmd, LOCAL_TIMEOUT).await?;
    n.parse().map_err(|_| WorkspaceError::Git {
        command: display,
        detail: format!("printed {n:?}, not a count"),
        timed_out: false,
    })
}

/// `git diff --stat <from> <to>`, at most [`DIFF_STAT_BYTES_MAX`] bytes, and whether it was cut.
pub(super) async fn diff_stat(
    dir: &Path,
    from: &str,
    to: &str,
) -> Result<(String, bool), WorkspaceError> {
    let cmd = GitCmd::new(
        dir,
        ["diff", "--stat", "--no-color", "--no-ext-diff", from, to],
    );
    let out = ok(cmd, LOCAL_TIMEOUT, Keep::Head(DIFF_STAT_BYTES_MAX)).await?;
    let mut stat = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.stdout_cut {
        // Cut at a line's end, so no half line is shown.
        if let Some(end) = stat.rfind('\n') {
            stat.truncate(end + 1);
        }
    }
    Ok((stat.trim_end().to_string(), out.stdout_cut))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_names_are_hashed_and_readable() {
        let m = |repo: &str| {
            Mirror::new(Path::new("/d/mirrors"), repo)
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let a = m("https://github.com/acme/widgets.git");
        assert!(a.ends_with("-widgets.git"), "{a}");
        assert_eq!(a.len(), 16 + "-widgets.git".len());
        assert_ne!(a, m("https://github.com/other/widgets.git"));
        assert_eq!(a, m("https://github.com/acme/widgets.git"));
        assert!(m("git@host:team/my repo!.git").ends_with("-my_repo_.git"));
        assert!(m("/srv/git/proj/").ends_with("-proj.git"));
        assert!(m("/").ends_with("-repo.git"));
        assert!(m("/x/..").ends_with("-repo...git"));
    }

    #[test]
    fn worktree_lists_are_parsed() {
        let text = "worktree /m\nbare\n\nworktree /w/1-1\nHEAD abc\nbranch refs/heads/muster/1\n\nworktree /w/1-2\nHEAD def\ndetached\n";
        let w = parse_worktrees(text);
        assert_eq!(w.len(), 3);
        assert_eq!(w[1].branch.as_deref(), Some("refs/heads/muster/1"));
        assert_eq!(w[2].head.as_deref(), Some("def"));
        assert_eq!(w[2].branch, None);
    }
}
