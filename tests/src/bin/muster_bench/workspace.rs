//! The `workspace` mode: how long the sidecar's workspace layer takes to make
//! a git worktree for an attempt, against a bare `git worktree add` of the
//! same repository measured in the same run.
//!
//! It generates a repository (`--files` files, `--mib` MiB in all, text from
//! a fixed-seed generator, one commit) in the run's temporary directory,
//! warms a mirror with one `prepare` (the clone), then times `--prepares`
//! calls of `Workspaces::prepare` for new task ids (call to ready tree:
//! fetch, base, checkpoint lookup, record, `worktree add -B`) in turn with
//! as many `git worktree add --no-track -B` of the same commit from the same
//! mirror, once as git does by default and once with the parallel checkout
//! prepare uses (`checkout.workers=0`), and as many bare `git fetch` of the
//! warm mirror (the part of prepare a bare add does not do). Before each sample `sync` runs, untimed,
//! so that no sample pays for the writeback of the one before.
//!
//! Trees are kept until the end and removed then, not between samples: on
//! ext4, creating thousands of files right after deleting thousands makes the
//! inode allocator scan for inodes that were not just freed
//! (`recently_deleted`), which on the benchmark VM (mounted with `discard`)
//! made each checkout take 2 to 9 s of kernel time instead of 0.6 s, for git
//! and for prepare alike. That is the filesystem's cost of churn, not the
//! workspace layer's; it is left out so the two can be compared.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use muster_protocol::{Generation, TaskId};
use muster_sidecar::workspace::{WorkspaceConfig, WorkspaceMode, Workspaces};
use serde_json::{Value, json};

use crate::util::{ms, phase, round3, summary};

/// `workspace` options.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct WorkspaceArgs {
    /// Files in the generated repository.
    #[arg(long, default_value_t = 5000)]
    pub(crate) files: usize,
    /// Their total size, MiB.
    #[arg(long, default_value_t = 100)]
    pub(crate) mib: u64,
    /// Timed prepares (and as many bare worktree adds and fetches).
    #[arg(long, default_value_t = 20)]
    pub(crate) prepares: usize,
}

/// Files per directory of the generated tree.
const FILES_PER_DIR: usize = 100;
/// Seed of the content generator: the same repository in every run.
const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

/// Runs the mode in `root`.
pub(crate) async fn workspace(root: &Path, a: &WorkspaceArgs) -> Result<Value> {
    if a.files == 0 || a.prepares == 0 {
        bail!("--files and --prepares must be at least 1");
    }
    let origin = root.join("origin");
    let (files, bytes) = (a.files, a.mib << 20);
    let o = origin.clone();
    let started = Instant::now();
    let written = phase(
        "generate the repository",
        Duration::from_secs(600),
        async move {
            tokio::task::spawn_blocking(move || generate(&o, files, bytes))
                .await
                .context("generator task")?
        },
    )
    .await?;
    let generate_s = started.elapsed().as_secs_f64();
    // Write back the generated files now, so that writeback does not land in the samples.
    std::process::Command::new("sync")
        .status()
        .context("sync")?;

    let repo = origin
        .to_str()
        .context("the temporary path is not UTF-8")?
        .to_string();
    let cfg = WorkspaceConfig {
        mode: WorkspaceMode::Git,
        ..WorkspaceConfig::default()
    };
    let ws = Workspaces::new(cfg, &root.join("data"));
    let t = Instant::now();
    let first = phase(
        "first prepare (clone into the mirror)",
        Duration::from_secs(600),
        async {
            Ok(ws
                .prepare(TaskId(1_000_000), Generation(1), Some(&repo), None)
                .await?)
        },
    )
    .await?;
    let first_ms = ms(t.elapsed());
    let mirror = mirror_of(&first.dir)?;
    let commit = first.base_commit.clone().context("no base commit")?;
    let bare_root = root.join("bare");
    std::fs::create_dir_all(&bare_root)?;

    let limit = Duration::from_secs(60) + Duration::from_secs(60) * a.prepares as u32;
    let (prep, bare, par, fetch) = phase("timed prepares", limit, async {
        let (mut prep, mut bare, mut par, mut fetch) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..a.prepares {
            let task = TaskId(i as u64 + 1);
            // Rotate which goes first, so none always follows the same one.
            for k in 0..3 {
                settle().await?;
                let t = Instant::now();
                match (i + k) % 3 {
                    0 => {
                        ws.prepare(task, Generation(1), Some(&repo), None).await?;
                        prep.push(ms(t.elapsed()));
                    }
                    1 => {
                        bare_add(&mirror, &bare_root, &format!("bare/{i}"), &commit, "1").await?;
                        bare.push(ms(t.elapsed()));
                    }
                    _ => {
                        bare_add(&mirror, &bare_root, &format!("par/{i}"), &commit, "0").await?;
                        par.push(ms(t.elapsed()));
                    }
                }
            }
            settle().await?;
            let t = Instant::now();
            git(
                &mirror,
                &[
                    "fetch",
                    "--quiet",
                    "--prune",
                    "--no-tags",
                    "origin",
                    "+refs/heads/*:refs/remotes/origin/*",
                    "+refs/tags/*:refs/tags/*",
                ],
            )
            .await?;
            fetch.push(ms(t.elapsed()));
        }
        anyhow::Ok((prep, bare, par, fetch))
    })
    .await?;
    let ratio = |a: &Value, b: &Value| match (a["p50_ms"].as_f64(), b["p50_ms"].as_f64()) {
        (Some(x), Some(y)) if y > 0.0 => json!(round3(x / y)),
        _ => Value::Null,
    };
    let (prep, bare, par, fetch) = (
        with_p95(prep),
        with_p95(bare),
        with_p95(par),
        with_p95(fetch),
    );
    let prep_over_bare = ratio(&prep, &bare);
    let prep_over_par = ratio(&prep, &par);
    Ok(json!({
        "mode": "workspace",
        "repository": {
            "files": files,
            "bytes": written,
            "generate_and_commit_s": round3(generate_s),
        },
        "first_prepare_ms": round3(first_ms),
        "prepare": prep,
        "bare_worktree_add": bare,
        "bare_worktree_add_parallel_checkout": par,
        "fetch_warm_mirror": fetch,
        "prepare_p50_over_bare_p50": prep_over_bare,
        "prepare_p50_over_parallel_bare_p50": prep_over_par,
        "goal": "prepare p50 ≤ 300 ms and ≤ 1.5 × bare worktree add p50",
    }))
}

/// [`summary`] with the 95th percentile added.
fn with_p95(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    let p95 =
        (!v.is_empty()).then(|| v[((0.95 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]);
    let mut s = summary(v);
    s["p95_ms"] = json!(p95.map(round3));
    s
}

/// The mirror a worktree belongs to, from its `.git` file (`gitdir: <mirror>/worktrees/<name>`).
fn mirror_of(tree: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string(tree.join(".git"))?;
    let gitdir = text
        .trim()
        .strip_prefix("gitdir: ")
        .context("no gitdir line")?;
    let admin = Path::new(gitdir);
    admin
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("the gitdir has no mirror above it")
}

/// `git worktree add --no-track -B <branch>` of `commit` under `root`, with
/// `checkout.workers` set to `workers` (prepare uses "0": one per CPU).
async fn bare_add(
    mirror: &Path,
    root: &Path,
    branch: &str,
    commit: &str,
    workers: &str,
) -> Result<()> {
    let dir = root.join(branch.replace('/', "-"));
    let workers = format!("checkout.workers={workers}");
    git(
        mirror,
        &[
            "-c",
            &workers,
            "worktree",
            "add",
            "--quiet",
            "--no-track",
            "-B",
            branch,
            dir.to_str().context("path")?,
            commit,
        ],
    )
    .await
}

/// Waits until the disk is quiet: `sync`, at most a minute.
async fn settle() -> Result<()> {
    let mut sync = tokio::process::Command::new("sync");
    sync.kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), sync.status())
        .await
        .context("sync took over a minute")??;
    Ok(())
}

/// `git -C <dir> <args>`, which must succeed within two minutes.
async fn git(dir: &Path, args: &[&str]) -> Result<()> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("-C").arg(dir).args(args).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .context("git took over two minutes")??;
    if !out.status.success() {
        bail!(
            "git {args:?} in {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Writes `files` text files of `bytes` in all under `dir` (100 per
/// directory, sizes from half to one and a half times the mean) and commits
/// them once. Returns the bytes written.
fn generate(dir: &Path, files: usize, bytes: u64) -> Result<u64> {
    const ALPHABET: &[u8; 64] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _";
    std::fs::create_dir_all(dir)?;
    let mut state = SEED;
    let mut next = move || {
        // xorshift64*: fast, and the same stream on every machine.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mean = bytes / files as u64;
    let mut total = 0u64;
    let mut buf = Vec::new();
    for i in 0..files {
        let sub = dir.join(format!("d{:03}", i / FILES_PER_DIR));
        if i % FILES_PER_DIR == 0 {
            std::fs::create_dir_all(&sub)?;
        }
        let size = mean / 2 + next() % mean.max(1);
        buf.clear();
        while (buf.len() as u64) < size {
            let r = next();
            for k in 0..8 {
                // One line break every 80 characters keeps diffs and tools sane.
                if buf.len() % 80 == 79 {
                    buf.push(b'\n');
                } else {
                    buf.push(ALPHABET[((r >> (k * 8)) & 63) as usize]);
                }
            }
        }
        buf.truncate(size as usize);
        std::fs::write(sub.join(format!("f{i:05}.txt")), &buf)?;
        total += size;
    }
    let run = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=bench", "-c", "user.email=bench@localhost"])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "git {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    run(&["init", "-q", "-b", "main"])?;
    run(&["add", "-A"])?;
    run(&["commit", "-q", "-m", "generated"])?;
    Ok(total)
}
