//! The workspace layer against real git: an origin repository in a
//! temporary directory, mirrors and worktrees beside it. Every test is
//! bounded in time and leaves nothing behind (the directories go with their
//! `TempDir`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use muster_protocol::{Generation, TaskId};

use super::*;

/// The most any one test may take.
const TEST_TIME_MAX: Duration = Duration::from_secs(60);

async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIME_MAX, fut)
        .await
        .expect("the test did not finish within its time bound")
}

/// `git <args>` in `dir`, which must succeed; its stdout, trimmed.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=test", "-c", "user.email=test@example.net"])
        .args(args)
        .env_remove("GIT_DIR")
        .env_remove("GIT_INDEX_FILE")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn write(path: &Path, text: &str) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).expect("mkdir");
    }
    std::fs::write(path, text).expect("write");
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A temporary directory holding an origin repository and the sidecar's data.
struct Fixture {
    tmp: tempfile::TempDir,
    /// The origin: main with three commits (a.txt, b.txt, c.txt, a
    /// .gitignore of *.log), branch `feature` (f.txt), tag `v1` on the first.
    origin: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let origin = tmp.path().join("origin");
        std::fs::create_dir_all(&origin).expect("mkdir");
        git(&origin, &["init", "-q", "-b", "main"]);
        write(&origin.join("a.txt"), "a\n");
        write(&origin.join(".gitignore"), "*.log\n");
        git(&origin, &["add", "-A"]);
        git(&origin, &["commit", "-q", "-m", "one"]);
        git(&origin, &["tag", "v1"]);
        for (file, msg) in [("b.txt", "two"), ("c.txt", "three")] {
            write(&origin.join(file), &format!("{file}\n"));
            git(&origin, &["add", "-A"]);
            git(&origin, &["commit", "-q", "-m", msg]);
        }
        git(&origin, &["checkout", "-q", "-b", "feature"]);
        write(&origin.join("f.txt"), "f\n");
        git(&origin, &["add", "-A"]);
        git(&origin, &["commit", "-q", "-m", "feature"]);
        git(&origin, &["checkout", "-q", "main"]);
        Fixture { tmp, origin }
    }

    fn repo(&self) -> &str {
        self.origin.to_str().expect("utf-8 path")
    }

    fn data(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    fn config(&self, mode: WorkspaceMode) -> WorkspaceConfig {
        WorkspaceConfig {
            mode,
            ..WorkspaceConfig::default()
        }
    }

    fn workspaces(&self, cfg: WorkspaceConfig) -> Workspaces {
        Workspaces::new(cfg, &self.data())
    }

    fn git_mode(&self) -> Workspaces {
        self.workspaces(self.config(WorkspaceMode::Git))
    }

    fn main_head(&self) -> String {
        git(&self.origin, &["rev-parse", "main"])
    }

    fn mirror(&self, ws: &Workspaces) -> PathBuf {
        Mirror::new(ws.mirrors_dir(), self.repo()).dir
    }
}

fn ids(task: u64, generation: u64) -> (TaskId, Generation) {
    (TaskId(task), Generation(generation))
}

async fn prepare(
    ws: &Workspaces,
    task: u64,
    generation: u64,
    repo: Option<&str>,
    base: Option<&str>,
) -> Prepared {
    let (t, g) = ids(task, generation);
    ws.prepare(t, g, repo, base)
        .await
        .unwrap_or_else(|e| panic!("prepare {task}-{generation}: {e}"))
}

async fn finish(ws: &Workspaces, task: u64, generation: u64) -> WorkResult {
    let (t, g) = ids(task, generation);
    ws.finish(t, g)
        .await
        .unwrap_or_else(|e| panic!("finish {task}-{generation}: {e}"))
}

// === git mode: trees, branches, bases ===

#[tokio::test]
async fn each_attempt_gets_a_worktree_on_its_task_branch_from_the_base() {
    bounded(async {
        let f = Fixture::new();
        let ws = f.git_mode();
        let p = prepare(&ws, 7, 1, Some(f.repo()), None).await;
        assert_eq!(p.dir, ws.root().join("7-1"));
        assert_eq!(p.branch.as_deref(), Some("muster/7"));
        assert_eq!(p.base.as_deref(), Some("main"));
        assert_eq!(p.base_ref.as_deref(), Some("refs/remotes/origin/main"));
        assert_eq!(p.base_commit, Some(f.main_head()));
        assert_eq!(p.continued_from, None);
        assert_eq!(read(&p.dir.join("c.txt")), "c.txt\n");
        assert_eq!(
            git(&p.dir, &["rev-parse", "--abbrev-ref", "HEAD"]),
            "muster/7"
        );
        assert_eq!(git(&p.dir, &["rev-parse", "HEAD"]), f.main_head());
        // The base's ref is visible in the tree, for the agent's own diffs.
        assert_eq!(git(&p.dir, &["rev-parse", "origin/main"]), f.main_head());

        let p = prepare(&ws, 8, 1, Some(f.repo()), Some("feature")).await;
        assert!(p.dir.join("f.txt").exists());
        assert_eq!(p.base_ref.as_deref(), Some("refs/remotes/origin/feature"));
        let p = prepare(&ws, 9, 1, Some(f.repo()), Some("v1")).await;
        assert_eq!(p.base_ref.as_deref(), Some("refs/tags/v1"));
        assert!(!p.dir.join("b.txt").exists());
        let first = git(&f.origin, &["rev-parse", "v1"]);
        let p = prepare(&ws, 10, 1, Some(f.repo()), Some(&first[..12])).await;
        assert_eq!((p.base_ref, p.base_commit), (None, Some(first)));
        let file_url = format!("file://{}", f.repo());
        let p = prepare(&ws, 11, 1, Some(&file_url), Some("refs/heads/feature")).await;
        assert!(p.dir.join("f.txt").exists());
        assert_eq!(
            std::fs::read_dir(ws.mirrors_dir())
                .expect("mirrors")
                .count(),
            2
        );
    })
    .await;
}

#[tokio::test]
async fn several_tasks_prepare_at_once_on_one_mirror() {
    bounded(async {
        let f = Fixture::new();
        let ws = f.git_mode();
        // The first use creates the mirror while the others wait for its lock.
        let all = futures::future::join_all(
            (1..=6).map(|task| ws.prepare(TaskId(task), Generation(1), Some(f.repo()), None)),
        )
        .await;
        let mut dirs = Vec::new();
        for (i, p) in all.into_iter().enumerate() {
            let p = p.unwrap_or_else(|e| panic!("task {}: {e}", i + 1));
            assert_eq!(git(&p.dir, &["rev-parse", "HEAD"]), f.main_head());
            dirs.push(p.dir);
        }
        dirs.dedup();
        assert_eq!(dirs.len(), 6);
        let trees = git(&f.mirror(&ws), &["worktree", "list", "--porcelain"]);
        assert_eq!(trees.matches("branch refs/heads/muster/").count(), 6);
    })
    .await;
}

#[tokio::test]
async fn fetches_bring_new_commits_and_leave_task_branches_and_checkpoints_alone() {
    bounded(async {
        let f = Fixture::new();
        let ws = f.git_mode();
        let p = prepare(&ws, 1, 1, Some(f.repo()), None).await;
        write(&p.dir.join("work.txt"), "mine\n");
        git(&p.dir, &["add", "-A"]);
        git(&p.dir, &["commit", "-q", "-m", "work"]);
        let mine = git(&p.dir, &["rev-parse", "HEAD"]);
        finish(&ws, 1, 1).await;
        // The origin gains a commit and a branch of the same name as ours.
        write(&f.origin.join("d.txt"), "d\n");
        git(&f.origin, &["add", "-A"]);
        git(&f.origin, &["commit", "-q", "-m", "four"]);
        git(&f.origin, &["branch", "muster/1", "v1"]);
        let p2 = prepare(&ws, 2, 1, Some(f.repo()), None).await;
        assert_eq!(p2.base_commit, Some(f.main_head()));
        assert!(p2.dir.join("d.txt").exists());
        let mirror = f.mirror(&ws);
        assert_eq!(git(&mirror, &["rev-parse", "refs/heads/muster/1"]), mine);
        assert_eq!(
            git(&mirror, &["rev-parse", "refs/muster/checkpoints/1/1"]),
            mine
        );
        assert_eq!(
            git(&mirror, &["rev-parse", "refs/remotes/origin/muster/1"]),
            git(&f.origin, &["rev-parse", "v1"])
        );
    })
    .await;
}

// === Checkpoints ===

#[tokio::test]
async fn finish_checkpoints_uncommitted_work_without_moving_the_branch() {
    bounded(async {
        let f = Fixture::new();
        let ws = f.git_mode();
        let p = prepare(&ws, 3, 1, Some(f.repo()), None).await;
        write(&p.dir.join("done.txt"), "committed\n");
        git(&p.dir, &["add", "done.txt"]);
        git(&p.dir, &["commit", "-q", "-m", "agent work"]);
        let head = git(&p.dir, &["rev-parse", "HEAD"]);
        write(&p.dir.join("new/untracked.txt"), "not yet added\n");
        write(&p.dir.join("a.txt"), "changed\n");
        write(&p.dir.join("build.log"), "ignored\n");
        let r = finish(&ws, 3, 1).await;
        assert!(r.dirty);
        assert_eq!(r.commits, Some(1));
        assert_eq!(r.head.as_deref(), Some(head.as_str()));
        assert_eq!(r.branch.as_deref(), Some("muster/3"));
        assert_eq!(r.checkpoint.as_deref(), Some("refs/muster/checkpoints/3/1"));
        let stat = r.diff_stat.clone().expect("diff stat");
        assert!(
            stat.contains("untracked.txt") && stat.contains("a.txt"),
            "{stat}"
        );
        assert!(stat.contains("3 files changed"), "{stat}");
        assert!(!r.diff_stat_cut);
        let ck = "refs/muster/checkpoints/3/1";
        assert_eq!(
            git(&p.dir, &["show", &format!("{ck}:new/untracked.txt")]),
            "not yet added"
        );
        assert_eq!(git(&p.dir, &["show", &format!("{ck}:a.txt")]), "changed");
        assert_eq!(git(&p.dir, &["rev-parse", &format!("{ck}^")]), head);
        let has_log = Command::new("git")
            .arg("-C")
            .arg(&p.dir)
            .args(["cat-file", "-e", &format!("{ck}:build.log")])
            .stderr(std::process::Stdio::null())
            .status()
            .expect("git");
        assert!(!has_log.success(), "an ignored file was checkpointed");
        assert_eq!(
            git(&p.dir, &["log", "-1", "--format=%an <%ae>", ck]),
            "muster <muster@localhost>"
        );
        // The branch, the index and the files are as the agent left them.
        assert_eq!(git(&p.dir, &["rev-parse", "HEAD"]), head);
        assert_eq!(
            git(&p.dir, &["rev-parse", "--abbrev-ref", "HEAD"]),
            "muster/3"
        );
        assert!(git(&p.dir, &["status", "--porcelain"]).contains("?? new/"));
        assert_eq!(read(&p.dir.join("a.txt")), "changed\n");
        // Finishing again makes no twin commit, and keeps the finish time.
        let again = finish(&ws, 3, 1).await;
        assert_eq!(again.checkpoint_commit, r.checkpoint_commit);
        let list = ws.list();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].state, WorkspaceState::Finished);
        assert!(list[0].bytes > 0);
    })
    .await;
}

#[tokio::test]
async fn a_clean_tree_is_checkpointed_at_its_head() {
    bounded(async {
        let f = Fixture::new();
        let ws = f.git_mode();
        let p = prepare(&ws, 4, 2, Some(f.repo()), None).await;
        assert_eq!(ws.list()[0].state, WorkspaceState::Running);
        let r = finish(&ws, 4, 2).await;
        assert!(!r.dirty);
        assert_eq!(r.commits, Some(0));
        assert_eq!(r.diff_stat.as_deref(), Some(""));
        assert_eq!(r.checkpoint_commit, Some(f.main_head()));
        assert_eq!(
            git(&p.dir, &["rev-parse", "refs/muster/checkpoints/4/2"]),
            f.main_head()
        );
    })
    .await;
}

#[tokio::test]
async fn a_retry_continues_from_the_last_checkpoint_when_asked() {
    bounded(async {
        let f = Fixture::new();
        let ws = f.git_mode();
        let p1 = prepare(&ws, 5, 1, Some(f.repo()), None).await;
        write(&p1.dir.join("progress.txt"), "half done\n");
        finish(&ws, 5, 1).await;
        // The first tree is still there (not swept) and holds the branch.
        let p2 = prepare(&ws, 5, 2, Some(f.repo()), None).await;
        assert_eq!(
            p2.continued_from.as_deref(),
            Some("refs/muster/checkpoints/5/1")
        );
        assert_eq!(read(&p2.dir.join("progress.txt")), "half done\n");
        assert_eq!(p2.base_commit, Some(f.main_head()));
        assert_eq!(
            git(&p2.dir, &["rev-parse", "--abbrev-ref", "HEAD"]),
            "muster/5"
        );
        // The first tree was detached, its files untouched.
        assert_eq!(git(&p1.dir, &["rev-parse", "--abbrev-ref", "HEAD"]), "HEAD");
        assert_eq!(read(&p1.dir.join("progress.txt")), "half done\n");

        // A third attempt whose predecessor never finished: its work is
        // checkpointed before the branch moves, and continued from.
        write(&p2.dir.join("more.txt"), "more\n");
        let p3 = prepare(&ws, 5, 3, Some(f.repo()), None).await;
        assert_eq!(
            p3.continued_from.as_deref(),
            Some("refs/muster/checkpoints/5/2")
        );
        assert_eq!(read(&p3.dir.join("more.txt")), "more\n");
        assert_eq!(read(&p3.dir.join("progress.txt")), "half done\n");
    })
    .await;
}

#[tokio::test]
async fn without_continue_a_retry_starts_from_the_base() {
    bounded(async {
        let f = Fixture::new();
        let ws = f.workspaces(WorkspaceConfig {
            retry_from: RetryFrom::Base,
            ..f.config(WorkspaceMode::Git)
        });
        let p1 = prepare(&ws, 6, 1, Some(f.repo()), None).await;
        write(&p1.dir.join("progress.txt"), "half done\n");
        git(&p1.dir, &["add", "-A"]);
        git(&p1.dir, &["commit", "-q", "-m", "wip"]);
        finish(&ws, 6, 1).await;
        let p2 = prepare(&ws, 6, 2, Some(f.repo()), None).await;
        assert_eq!(p2.continued_from, None);
        assert!(!p2.dir.join("progress.txt").exists());
        assert_eq!(git(&p2.dir, &["rev-parse", "HEAD"]), f.main_head());
        // The earlier work is still kept in its checkpoint.
        assert_eq!(
            git(
                &p2.dir,
                &["show", "refs/muster/checkpoints/6/1:progress.txt"]
            ),
            "half done"
        );
    })
    .await;
}

#[tokio::test]
async fn a_leftover_tree_of_the_same_attempt_is_saved_and_replaced() {
    bounded(async {
        let f = Fixture::new();
        let ws = f.git_mode();
        let p = prepare(&ws, 12, 1, Some(f.repo()), None).await;
        write(&p.dir.join("left.txt"), "left\n");
        let again = prepare(&ws, 12, 1, Some(f.repo()), None).await;
        assert_eq!(again.dir, p.dir);
        assert_eq!(
            again.continued_from.as_deref(),
            Some("refs/muster/checkpoints/12/1")
        );
        assert_eq!(read(&again.dir.join("left.txt")), "left\n");
        assert_eq!(ws.list().len(), 1);
    })
    .await;
}

// === Failures ===

#[tokio::test]
async fn an_unreachable_repository_fails_the_fetch_promptly() {
    bounded(async {
        let f = Fixture::new();
        let ws = f.git_mode();
        let missing = f.tmp.path().join("no-such-repo");
        let missing_url = "file:///nonexistent/muster-test-repo.git".to_string();
        for (task, repo) in [
            (1, missing.to_string_lossy().into_owned()),
            (2, missing_url),
        ] {
            let started = Instant::now();
            let e = ws
                .prepare(TaskId(task), Generation(1), Some(&repo), None)
                .await
                .expect_err("unreachable");
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "took {:?}",
                started.elapsed()
            );
            assert!(
                matches!(
                    e,
                    WorkspaceError::Fetch {
                        timed_out: false,
                        ..
                    }
                ),
                "{e:?}"
            );
            assert_eq!(e.fault(), Fault::Host);
            let msg = e.to_string();
            assert!(msg.contains("cannot fetch") && msg.contains(&repo), "{msg}");
            assert!(
                msg.contains("does not exist") || msg.contains("not appear to be a git repository"),
                "{msg}"
            );
        }
        // Nothing half made is left: no mirror, no tree, no record.
        let mirrors: Vec<_> = std::fs::read_dir(ws.mirrors_dir())
            .expect("mirrors")
            .collect();
        assert!(mirrors.is_empty(), "{mirrors:?}");
        assert!(ws.list().is_empty());
    })
    .await;
}

#[tokio::test]
async fn a_fetch_past_fetch_timeout_is_killed() {
    bounded(async {
        let f = Fixture::new();
        // A "repository" whose upload-pack never answers: git runs it from the path.
        let stall = f.tmp.path().join("stall.sh");
        write(&stall, "#!/bin/sh\nsleep 30\n");
        let exec = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
        std::fs::set_permissions(&stall, exec).expect("chmod");
        let ws = f.workspaces(WorkspaceConfig {
            fetch_timeout: Duration::from_millis(500),
            ..f.config(WorkspaceMode::Git)
        });
        let mirror = Mirror::new(ws.mirrors_dir(), f.repo());
        // Make the mirror once, then point its remote at the stalling program.
        prepare(&ws, 1, 1, Some(f.repo()), None).await;
        git(
            &mirror.dir,
            &[
                "config",
                "remote.origin.uploadpack",
                stall.to_str().expect("utf-8"),
            ],
        );
        let started = Instant::now();
        let e = ws
            .prepare(TaskId(2), Generation(1), Some(f.repo()), None)
            .await
            .expect_err("stalled");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        assert!(
            matches!(
                e,
                WorkspaceError::Fetch {
                    timed_out: true,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("fetch_timeout"), "{e}");
    })
    .await;
}

#[tokio::test]
async fn bad_repos_and_bases_are_the_tasks_fault() {
    bounded(async {
        let f = Fixture::new();
        let ws = f.git_mode();
        for repo in [
            "relative/path",
            "-upload-pack=evil",
            "ext::sh -c touch% /tmp/x",
            "",
        ] {
            let e = ws
                .prepare(TaskId(1), Generation(1), Some(repo), None)
                .await
                .expect_err(repo);
            assert!(matches!(e, WorkspaceError::BadRepo { .. }), "{repo}: {e:?}");
            assert_eq!(e.fault(), Fault::Task);
        }
        for base in ["no-such-branch", "--output=/tmp/x", "main..feature", "a b"] {
            let e = ws
                .prepare(TaskId(1), Generation(1), Some(f.repo()), Some(base))
                .await
                .expect_err(base);
            assert!(matches!(e, WorkspaceError::BadBase { .. }), "{base}: {e:?}");
            assert_eq!(e.fault(), Fault::Task);
        }
        assert!(ws.list().is_empty());
        // Other modes refuse a repository rather than ignore it.
        let dir = f.workspaces(f.config(WorkspaceMode::Dir));
        let e = dir
            .prepare(TaskId(1), Generation(1), Some(f.repo()), None)
            .await
            .expect_err("dir mode");
        assert!(
            matches!(e, WorkspaceError::RepoNotSupported { mode: "dir", .. }),
            "{e:?}"
        );
    })
    .await;
}

// === Other modes, copies, setup ===

#[tokio::test]
async fn dir_and_shared_modes() {
    bounded(async {
        let f = Fixture::new();
        let ws = f.workspaces(f.config(WorkspaceMode::Dir));
        let p = prepare(&ws, 1, 1, None, None).await;
        assert_eq!(p.dir, ws.root().join("1-1"));
        assert_eq!(std::fs::read_dir(&p.dir).expect("dir").count(), 0);
        assert_eq!(p.branch, None);
        write(&p.dir.join("x"), "x");
        let p2 = prepare(&ws, 1, 2, None, None).await;
        assert_eq!(std::fs::read_dir(&p2.dir).expect("dir").count(), 0);
        let r = finish(&ws, 1, 1).await;
        assert_eq!((r.dir, r.checkpoint), (p.dir.clone(), None));
        // git mode without a repository: an empty directory as well.
        let g = f.git_mode();
        let p = prepare(&g, 2, 1, None, None).await;
        assert_eq!(std::fs::read_dir(&p.dir).expect("dir").count(), 0);
        finish(&g, 2, 1).await;

        let shared = Workspaces::with_shared_dir(
            f.config(WorkspaceMode::Shared),
            &f.data(),
            "/srv/agent".into(),
        );
        let p = prepare(&shared, 99, 1, None, None).await;
        assert_eq!(p.dir, PathBuf::from("/srv/agent"));
        assert_eq!(
            finish(&shared, 99, 1).await.dir,
            PathBuf::from("/srv/agent")
        );
        let (t, g) = ids(9, 9);
        assert!(matches!(
            ws.finish(t, g).await,
            Err(WorkspaceError::Unknown { .. })
        ));
    })
    .await;
}

#[tokio::test]
async fn copy_entries_are_copied_and_a_missing_one_is_named() {
    bounded(async {
        let f = Fixture::new();
        let template = f.tmp.path().join("template");
        write(&template.join(".env"), "TOKEN=1\n");
        write(&template.join("config/local/settings.toml"), "x = 1\n");
        write(&template.join("config/local/deep/more.txt"), "more\n");
        std::os::unix::fs::symlink("settings.toml", template.join("config/local/link"))
            .expect("symlink");
        let cfg = WorkspaceConfig {
            template_dir: Some(template.clone()),
            copy: vec![".env".into(), "config/local".into()],
            ..f.config(WorkspaceMode::Git)
        };
        let ws = f.workspaces(cfg.clone());
        let p = prepare(&ws, 1, 1, Some(f.repo()), None).await;
        assert_eq!(read(&p.dir.join(".env")), "TOKEN=1\n");
        assert_eq!(read(&p.dir.join("config/local/settings.toml")), "x = 1\n");
        assert_eq!(read(&p.dir.join("config/local/deep/more.txt")), "more\n");
        assert_eq!(
            std::fs::read_link(p.dir.join("config/local/link")).expect("link"),
            PathBuf::from("settings.toml")
        );
        let d = f.workspaces(WorkspaceConfig {
            mode: WorkspaceMode::Dir,
            ..cfg.clone()
        });
        let p = prepare(&d, 2, 1, None, None).await;
        assert_eq!(read(&p.dir.join(".env")), "TOKEN=1\n");

        let ws = f.workspaces(WorkspaceConfig {
            copy: vec![".env".into(), "secrets/key.pem".into()],
            ..cfg
        });
        let e = ws
            .prepare(TaskId(3), Generation(1), Some(f.repo()), None)
            .await
            .expect_err("missing source");
        match &e {
            WorkspaceError::CopyMissing { entry, source_path } => {
                assert_eq!(entry, Path::new("secrets/key.pem"));
                assert_eq!(source_path, &template.join("secrets/key.pem"));
            }
            other => panic!("expected CopyMissing, got {other:?}"),
        }
        assert!(e.to_string().contains("secrets/key.pem"), "{e}");
        // The failed tree is kept for a look, recorded finished so the sweep takes it.
        let failed = ws
            .list()
            .into_iter()
            .find(|w| w.task == TaskId(3))
            .expect("listed");
        assert_eq!(failed.state, WorkspaceState::Finished);
    })
    .await;
}

#[tokio::test]
async fn setup_command_runs_in_the_workspace_and_its_failure_is_reported() {
    bounded(async {
        let f = Fixture::new();
        let script = "echo \"$MUSTER_TASK_ID/$MUSTER_GENERATION $MUSTER_BRANCH $MUSTER_BASE\" > setup.out; test \"$MUSTER_WORKSPACE\" = \"$PWD\"";
        let ws = f.workspaces(WorkspaceConfig {
            setup_command: vec!["sh".into(), "-c".into(), script.into()],
            ..f.config(WorkspaceMode::Git)
        });
        let p = prepare(&ws, 4, 2, Some(f.repo()), None).await;
        assert_eq!(read(&p.dir.join("setup.out")), "4/2 muster/4 main\n");

        let ws = f.workspaces(WorkspaceConfig {
            setup_command: vec!["sh".into(), "-c".into(), "echo working; echo boom >&2; exit 3".into()],
            ..f.config(WorkspaceMode::Dir)
        });
        let e = ws.prepare(TaskId(5), Generation(1), None, None).await.expect_err("fails");
        match &e {
            WorkspaceError::Setup {
                command,
                exit_code,
                signal,
                timed_out,
                stdout_tail,
                stderr_tail,
            } => {
                assert_eq!(command[0], "sh");
                assert_eq!((*exit_code, *signal, *timed_out), (Some(3), None, false));
                assert_eq!(stdout_tail.trim(), "working");
                assert_eq!(stderr_tail.trim(), "boom");
            }
            other => panic!("expected Setup, got {other:?}"),
        }
        assert!(e.to_string().contains("exited with code 3; its stderr ends: boom"), "{e}");
        assert_eq!(e.fault(), Fault::Host);

        let ws = f.workspaces(WorkspaceConfig {
            setup_command: vec!["sleep".into(), "30".into()],
            setup_timeout: Duration::from_millis(300),
            ..f.config(WorkspaceMode::Dir)
        });
        let started = Instant::now();
        let e = ws.prepare(TaskId(6), Generation(1), None, None).await.expect_err("times out");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(e.timed_out(), "{e:?}");
        assert!(e.to_string().contains("setup_timeout"), "{e}");

        let ws = f.workspaces(WorkspaceConfig {
            setup_command: vec!["/nonexistent/setup".into()],
            ..f.config(WorkspaceMode::Dir)
        });
        let e = ws.prepare(TaskId(7), Generation(1), None, None).await.expect_err("cannot start");
        assert!(e.to_string().contains("could not be started"), "{e}");
    })
    .await;
}

// === Retention ===

#[tokio::test]
async fn the_sweep_removes_old_finished_workspaces_and_keeps_checkpoints() {
    bounded(async {
        let f = Fixture::new();
        let ws = f.git_mode();
        let p1 = prepare(&ws, 1, 1, Some(f.repo()), None).await;
        write(&p1.dir.join("wip.txt"), "wip\n");
        finish(&ws, 1, 1).await;
        // Written after finish: the sweep must save it before removing the tree.
        write(&p1.dir.join("late.txt"), "late\n");
        let p2 = prepare(&ws, 2, 1, Some(f.repo()), None).await;
        let now = wall_ms();
        // Nothing is old yet and the disk limit is far.
        let r = ws.sweep(now).await;
        assert!(r.removed.is_empty() && r.failed.is_empty(), "{r:?}");

        let week = 7 * 86_400_000;
        let r = ws.sweep(now + week + 1).await;
        assert_eq!(r.removed, vec![ids(1, 1)], "{r:?}");
        assert!(r.failed.is_empty(), "{r:?}");
        assert!(r.freed_bytes > 0);
        assert!(!p1.dir.exists());
        assert!(!record_path(&p1.dir).exists());
        assert!(p2.dir.exists(), "a running workspace is never removed");
        let mirror = f.mirror(&ws);
        let ck = "refs/muster/checkpoints/1/1";
        assert_eq!(git(&mirror, &["show", &format!("{ck}:wip.txt")]), "wip");
        assert_eq!(git(&mirror, &["show", &format!("{ck}:late.txt")]), "late");
        // Its branch went with its last tree: a checkpoint holds its head.
        let branches = git(
            &mirror,
            &["for-each-ref", "--format=%(refname)", "refs/heads/"],
        );
        assert_eq!(branches, "refs/heads/muster/2");
        // A retry after the sweep still continues from the checkpoint.
        let p3 = prepare(&ws, 1, 2, Some(f.repo()), None).await;
        assert_eq!(read(&p3.dir.join("late.txt")), "late\n");
    })
    .await;
}

#[tokio::test]
async fn the_sweep_keeps_disk_under_max_disk_oldest_first() {
    bounded(async {
        let f = Fixture::new();
        let ws = f.workspaces(f.config(WorkspaceMode::Dir));
        for task in 1..=3 {
            let p = prepare(&ws, task, 1, None, None).await;
            write(&p.dir.join("blob"), &"x".repeat(64 * 1024));
            finish(&ws, task, 1).await;
        }
        let each = ws.list()[0].bytes;
        assert!(each >= 64 * 1024);
        // Finish times are in order 1, 2, 3; room for two.
        let ws = f.workspaces(WorkspaceConfig {
            max_disk: 2 * each + each / 2,
            ..f.config(WorkspaceMode::Dir)
        });
        let r = ws.sweep(wall_ms()).await;
        assert_eq!(r.removed, vec![ids(1, 1)], "{r:?}");
        let left: Vec<_> = ws.list().iter().map(|w| w.task).collect();
        assert_eq!(left, vec![TaskId(2), TaskId(3)]);
        assert_eq!(ws.disk_use().workspaces, r.remaining_bytes);
    })
    .await;
}

#[test]
fn the_futures_can_be_spawned() {
    fn send<T: Send + 'static>(_: &T) {}
    let ws = std::sync::Arc::new(Workspaces::new(
        WorkspaceConfig::default(),
        Path::new("/nonexistent"),
    ));
    let w = ws.clone();
    let prepare = async move { w.prepare(TaskId(1), Generation(1), None, None).await };
    send(&prepare);
    let w = ws.clone();
    send(&async move { w.finish(TaskId(1), Generation(1)).await });
    send(&async move { ws.sweep(0).await });
}
