//! Issue 15: coding-agent workspaces over the real binaries and real git.
//!
//! Each test runs the real `muster-hub` and `muster-sidecar` on 127.0.0.1
//! against a repository made in its temporary directory, and judges by what
//! git itself says: branches, commits, checkpoint refs, files in trees. The
//! examples in `deploy/examples/` run with stand-ins of the same name on
//! `PATH` (`tests/standins/`: claude, codex, aider) and real tmux.
//!
//! Timing: every wait is a poll with a deadline sized for a loaded 2-core
//! machine; nothing sleeps for a fixed time to let something happen.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use muster_tests::tasks::*;
use muster_tests::{Hub, Sidecar, bins, run_bounded, stderr, stdout, wait_for, write_script};
use serde_json::Value;

/// "Eventually" for a short task on a loaded machine.
const EVENTUALLY: Duration = Duration::from_secs(60);
/// How long one git command of the test may run.
const GIT: Duration = Duration::from_secs(30);

// === helpers ===

/// A started hub with 1 s heartbeats and quick retries.
fn hub() -> Hub {
    let mut hub = Hub::init();
    hub.set_policy("heartbeat_interval", "\"1s\"");
    hub.set_policy("backoff_initial", "\"200ms\"");
    hub.set_policy("backoff_max", "\"1s\"");
    hub.start();
    hub
}

/// Runs git with `args` in `dir`; panics with its stderr if it fails.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = run_bounded(
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0"),
        GIT,
    );
    assert!(
        out.status.success(),
        "git {args:?} in {} failed: {}",
        dir.display(),
        stderr(&out)
    );
    stdout(&out).trim().to_string()
}

/// Whether git `args` in `dir` succeeds.
fn git_ok(dir: &Path, args: &[&str]) -> bool {
    run_bounded(Command::new("git").arg("-C").arg(dir).args(args), GIT)
        .status
        .success()
}

/// A repository with two commits on `main` (README.md, src/lib.rs) in `root/origin`.
fn origin(root: &Path) -> PathBuf {
    let dir = root.join("origin");
    std::fs::create_dir_all(dir.join("src")).expect("mkdir");
    git(&dir, &["init", "-q", "-b", "main"]);
    std::fs::write(dir.join("README.md"), "# sample\n").expect("write");
    git(&dir, &["add", "-A"]);
    commit(&dir, "first");
    std::fs::write(dir.join("src/lib.rs"), "pub fn f() {}\n").expect("write");
    git(&dir, &["add", "-A"]);
    commit(&dir, "second");
    dir
}

fn commit(dir: &Path, message: &str) {
    git(
        dir,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.invalid",
            "commit",
            "-q",
            "-m",
            message,
        ],
    );
}

/// An enrolled sidecar in git workspace mode running `script`; not started.
fn git_sidecar(hub: &Hub, name: &str, slots: u32, script: &str) -> Sidecar {
    let sc = Sidecar::enroll_slots(hub, name, slots);
    sc.set_agent("settle", "\"100ms\"");
    sc.set_agent("stop_grace", "\"2s\"");
    sc.set("workspace", "mode", "\"git\"");
    let path = agent_script(&sc, "agent.sh", script);
    use_command(&sc, &path);
    sc
}

/// The one mirror in a sidecar's state directory.
fn mirror(sc: &Sidecar) -> PathBuf {
    let dir = sc.data_dir().join("mirrors");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(found.len(), 1, "one mirror expected: {found:?}");
    found.remove(0)
}

/// An attempt's workspace directory.
fn workspace(sc: &Sidecar, id: u64, generation: u64) -> PathBuf {
    sc.data_dir()
        .join("workspaces")
        .join(format!("{id}-{generation}"))
}

/// `submit` with a repository and `extra` flags; returns the id.
fn submit_repo(hub: &Hub, title: &str, repo: &Path, extra: &[&str]) -> u64 {
    let repo = repo.to_string_lossy().into_owned();
    let mut args = vec!["--repo", repo.as_str()];
    args.extend_from_slice(extra);
    submit(hub, title, &args)
}

/// An agent that records where it ran, commits one file named after its task, and exits 0.
const COMMITTING_AGENT: &str = r#"#!/bin/sh
set -e
echo "$MUSTER_TASK_ID $PWD $MUSTER_WORKSPACE $MUSTER_BRANCH $MUSTER_BASE" >> "$LOG"
echo "work of $MUSTER_TASK_ID" > "task-$MUSTER_TASK_ID.txt"
git add -A
git -c user.name=agent -c user.email=agent@example.invalid commit -q -m "task $MUSTER_TASK_ID"
"#;

// === worktree per task ===

#[test]
fn each_task_runs_in_its_own_worktree_on_its_branch_and_two_run_side_by_side() {
    let hub = hub();
    let mut sc = git_sidecar(&hub, "ws-two", 2, "");
    let repo = origin(sc.root());
    let log = sc.root().join("agents.log");
    let barrier = sc.root().join("barrier");
    std::fs::create_dir_all(&barrier).expect("mkdir");
    // Each agent waits (bounded) until both have started, so they provably overlap.
    let script = format!(
        r#"#!/bin/sh
set -e
LOG='{log}'
touch '{barrier}/'"$MUSTER_TASK_ID"
i=0
while [ "$(ls '{barrier}' | wc -l)" -lt 2 ]; do
  i=$((i+1)); [ $i -lt 600 ] || {{ echo "the other task never started" >&2; exit 9; }}
  sleep 0.05
done
{COMMITTING_AGENT}"#,
        log = log.display(),
        barrier = barrier.display(),
        COMMITTING_AGENT = COMMITTING_AGENT.trim_start_matches("#!/bin/sh\nset -e\n"),
    );
    let path = agent_script(&sc, "agent.sh", &script);
    use_command(&sc, &path);
    sc.set_slots(&hub, 2);
    go_online(&hub, &mut sc);

    let a = submit_repo(&hub, "side by side A", &repo, &[]);
    let b = submit_repo(&hub, "side by side B", &repo, &["--base", "main"]);
    let base = git(&repo, &["rev-parse", "main"]);
    let mut dirs = Vec::new();
    for id in [a, b] {
        let t = wait_ended(&hub, id);
        assert_eq!(t["state"], "completed", "{t}");
        let w = &attempts(&t)[0]["work"];
        assert_eq!(w["branch"], format!("muster/{id}"), "{t}");
        assert_eq!(w["base_commit"], base, "{t}");
        assert_eq!(w["commits"], 1, "{t}");
        assert_eq!(w["dirty"], false, "{t}");
        let head = w["head"].as_str().expect("head").to_string();
        // The commit is the agent's, on the task's branch, in the sidecar's mirror.
        let m = mirror(&sc);
        assert_eq!(
            git(&m, &["rev-parse", &format!("refs/heads/muster/{id}")]),
            head
        );
        assert_eq!(
            git(&m, &["show", &format!("{head}:task-{id}.txt")]),
            format!("work of {id}")
        );
        assert!(
            w["diffstat"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("task-{id}.txt")),
            "{t}"
        );
        dirs.push(workspace(&sc, id, 1));
    }
    let lines = std::fs::read_to_string(&log).expect("agent log");
    for (id, dir) in [a, b].iter().zip(&dirs) {
        let line = lines
            .lines()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("task {id} never ran: {lines}"));
        let words: Vec<&str> = line.split(' ').collect();
        let dir = dir.canonicalize().expect("workspace kept after the run");
        assert_eq!(
            Path::new(words[1]).canonicalize().ok(),
            Some(dir.clone()),
            "{line}"
        );
        assert_eq!(Path::new(words[2]).canonicalize().ok(), Some(dir), "{line}");
        assert_eq!(words[3], format!("muster/{id}"), "{line}");
    }
    assert_ne!(dirs[0], dirs[1], "two attempts shared a tree");
    // The human view names the branch too.
    let out = hub.cli(&["task", "show", &a.to_string()]);
    assert!(
        stdout(&out).contains(&format!("branch muster/{a}")),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_failed_attempt_leaves_its_uncommitted_work_in_a_checkpoint_and_the_retry_continues_from_it() {
    let hub = hub();
    let script = r#"#!/bin/sh
if [ "$MUSTER_GENERATION" = 1 ]; then
  echo "half done" > wip.txt
  echo "ran out of time" >&2
  exit 1
fi
# The retry must find the first attempt's work.
[ "$(cat wip.txt 2>/dev/null)" = "half done" ] || { echo "no checkpointed work here" >&2; exit 7; }
echo "finished" >> wip.txt
git add -A
git -c user.name=agent -c user.email=agent@example.invalid commit -q -m "finish the work"
"#;
    let mut sc = git_sidecar(&hub, "ws-ckpt", 1, script);
    let repo = origin(sc.root());
    go_online(&hub, &mut sc);

    let id = submit_repo(&hub, "resumable", &repo, &["--max-attempts", "2"]);
    let t = wait_ended(&hub, id);
    assert_eq!(outcomes(&t), ["failed", "completed"], "{t}");
    let first = &attempts(&t)[0]["work"];
    assert_eq!(first["dirty"], true, "{t}");
    let ckpt = format!("refs/muster/checkpoints/{id}/1");
    assert_eq!(first["checkpoint"], ckpt, "{t}");
    let m = mirror(&sc);
    assert_eq!(git(&m, &["show", &format!("{ckpt}:wip.txt")]), "half done");
    // The retry's branch holds the first attempt's work and its own commit on top.
    let second = &attempts(&t)[1]["work"];
    let head = second["head"].as_str().expect("head");
    assert_eq!(
        git(&m, &["show", &format!("{head}:wip.txt")]),
        "half done\nfinished"
    );
    assert!(
        git_ok(&m, &["merge-base", "--is-ancestor", &ckpt, head]),
        "the retry did not continue from {ckpt}"
    );
}

#[test]
fn retention_removes_old_finished_workspaces_but_keeps_their_checkpoints() {
    let hub = hub();
    let script = r#"#!/bin/sh
echo "scratch $MUSTER_TASK_ID" > scratch.txt
"#;
    let mut sc = git_sidecar(&hub, "ws-keep", 1, script);
    sc.set("workspace", "retention", "\"1s\"");
    let repo = origin(sc.root());
    go_online(&hub, &mut sc);

    let first = submit_repo(&hub, "old work", &repo, &[]);
    let t = wait_ended(&hub, first);
    assert_eq!(t["state"], "completed", "{t}");
    let old = workspace(&sc, first, 1);
    let ckpt = format!("refs/muster/checkpoints/{first}/1");
    // A later attempt's end sweeps the workspaces past their retention.
    wait_for(EVENTUALLY, "the old workspace removed", || {
        let id = submit_repo(&hub, "new work", &repo, &[]);
        let t = wait_ended(&hub, id);
        assert_eq!(t["state"], "completed", "{t}");
        if old.exists() {
            Err(format!("{} still exists", old.display()))
        } else {
            Ok(())
        }
    });
    let m = mirror(&sc);
    assert_eq!(
        git(&m, &["show", &format!("{ckpt}:scratch.txt")]),
        format!("scratch {first}")
    );
    assert!(
        !git(&m, &["worktree", "list"]).contains(&old.to_string_lossy().into_owned()),
        "git still lists the removed worktree"
    );
    // The same listing for people: a summary line, then a table of the same
    // rows. Retention (1 s) may sweep between two looks, so the table is taken
    // between two JSON looks that agree; a look with nothing left runs one
    // more task to have a row to show.
    let data_dir = sc.data_dir().to_string_lossy().into_owned();
    let rows_now = || {
        let listed = sc.cli(&["workspaces", "--json", "--data-dir", &data_dir]);
        assert!(listed.status.success(), "{}", stderr(&listed));
        let v: serde_json::Value =
            serde_json::from_slice(&listed.stdout).expect("workspaces --json");
        v["workspaces"].as_array().map_or(0, Vec::len)
    };
    let (rows, text) = wait_for(EVENTUALLY, "a listing that holds still", || {
        let rows = rows_now();
        let human = sc.cli(&["workspaces", "--data-dir", &data_dir]);
        assert!(human.status.success(), "{}", stderr(&human));
        let text = stdout(&human);
        let after = rows_now();
        if rows > 0 && rows == after {
            return Ok((rows, text));
        }
        if after == 0 {
            let id = submit_repo(&hub, "more work", &repo, &[]);
            let t = wait_ended(&hub, id);
            assert_eq!(t["state"], "completed", "{t}");
        }
        Err(format!("{rows} rows, then {after}: {text}"))
    });
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("mode git"), "{text}");
    assert!(rows > 0, "the second task's workspace is listed: {text}");
    assert_eq!(lines.len(), 2 + rows, "{text}");
    assert!(
        lines[1].starts_with("TASK") && lines[1].ends_with("DIR"),
        "{text}"
    );
    assert_eq!(
        lines[1].find("STATE"),
        lines[2].find("finished").or(lines[2].find("running")),
        "{text}"
    );
}

#[test]
fn an_agent_reporting_completion_with_a_link_gets_it_recorded_with_what_git_says_it_did() {
    let hub = hub();
    let script = format!(
        r#"#!/bin/sh
set -e
echo "patched" > patch.txt
git add -A
git -c user.name=agent -c user.email=agent@example.invalid commit -q -m "the patch"
echo "left uncommitted" > notes.txt
{sc} task complete --result "opened a pull request" --link "https://git.example.invalid/org/app/pull/7"
"#,
        sc = sidecar_bin()
    );
    let mut sc = git_sidecar(&hub, "ws-link", 1, &script);
    let repo = origin(sc.root());
    go_online(&hub, &mut sc);

    let id = submit_repo(&hub, "with a link", &repo, &[]);
    let t = wait_ended(&hub, id);
    assert_eq!(t["state"], "completed", "{t}");
    assert_eq!(t["result"], "opened a pull request", "{t}");
    let w = &attempts(&t)[0]["work"];
    assert_eq!(
        w["link"], "https://git.example.invalid/org/app/pull/7",
        "{t}"
    );
    assert_eq!(w["commits"], 1, "{t}");
    // The agent's word is only the link: the rest is read from git, uncommitted notes included.
    assert_eq!(w["dirty"], true, "{t}");
    let m = mirror(&sc);
    let ckpt = w["checkpoint"].as_str().expect("checkpoint");
    assert_eq!(
        git(&m, &["show", &format!("{ckpt}:notes.txt")]),
        "left uncommitted"
    );
    let head = w["head"].as_str().expect("head");
    assert_eq!(git(&m, &["show", &format!("{head}:patch.txt")]), "patched");
    let out = hub.cli(&["task", "show", &id.to_string()]);
    assert!(
        stdout(&out).contains("link https://git.example.invalid/org/app/pull/7"),
        "{}",
        stdout(&out)
    );
}

// === copy and setup_command ===

#[test]
fn copy_and_setup_command_prepare_each_workspace_and_a_failing_setup_ends_setup_failed() {
    let hub = hub();
    let script = r#"#!/bin/sh
[ "$(cat .env)" = "SECRET=from-template" ] || { echo "no .env" >&2; exit 3; }
[ -f config/local/app.toml ] || { echo "no config/local" >&2; exit 4; }
[ -f setup-ran ] || { echo "setup did not run" >&2; exit 5; }
"#;
    let mut sc = git_sidecar(&hub, "ws-setup", 1, script);
    let template = sc.root().join("template");
    std::fs::create_dir_all(template.join("config/local")).expect("mkdir");
    std::fs::write(template.join(".env"), "SECRET=from-template").expect("write");
    std::fs::write(template.join("config/local/app.toml"), "x = 1\n").expect("write");
    sc.set(
        "workspace",
        "template_dir",
        &format!("{:?}", template.display().to_string()),
    );
    sc.set("workspace", "copy", &argv(&[".env", "config/local"]));
    // Setup fails for tasks whose title says so, after writing to both streams.
    let setup = sc.root().join("setup.sh");
    write_script(
        &setup,
        r#"#!/bin/sh
if grep -q "broken setup" "$MUSTER_PROMPT_FILE" 2>/dev/null || [ -f .broken ]; then
  echo "installing dependencies"; echo "npm ERR! missing package.json" >&2; exit 42
fi
touch setup-ran
"#,
    );
    sc.set(
        "workspace",
        "setup_command",
        &argv(&[&setup.to_string_lossy()]),
    );
    let repo = origin(sc.root());
    go_online(&hub, &mut sc);

    let ok = submit_repo(&hub, "with template", &repo, &[]);
    let t = wait_ended(&hub, ok);
    assert_eq!(t["state"], "completed", "{t}");

    // A repo whose tree marks setup as broken.
    std::fs::write(repo.join(".broken"), "").expect("write");
    git(&repo, &["add", "-A"]);
    commit(&repo, "break setup");
    let bad = submit_repo(&hub, "broken setup", &repo, &["--max-attempts", "1"]);
    let t = wait_ended(&hub, bad);
    assert_eq!(outcomes(&t), ["setup_failed"], "{t}");
    let e = &attempts(&t)[0]["error"];
    assert_eq!(e["exit_code"], 42, "{t}");
    assert!(
        e["stderr_tail"].as_str().unwrap_or("").contains("npm ERR!"),
        "{t}"
    );
    assert!(
        e["stdout_tail"]
            .as_str()
            .unwrap_or("")
            .contains("installing"),
        "{t}"
    );
}

// === an unreachable repository ===

#[test]
fn an_unreachable_repo_is_workspace_failed_and_the_task_runs_on_another_sidecar() {
    let hub = hub();
    // Sidecar "far" cannot reach the repository: its git rewrites the URL to
    // a path that does not exist (as an unreachable remote would fail).
    let mut far = git_sidecar(&hub, "ws-far", 1, COMMITTING_AGENT);
    let repo = origin(far.root());
    let gitconfig = far.root().join("gitconfig");
    std::fs::write(
        &gitconfig,
        format!(
            "[url \"{}/nowhere\"]\n\tinsteadOf = {}\n",
            far.root().display(),
            repo.display()
        ),
    )
    .expect("write");
    far.set_env("GIT_CONFIG_GLOBAL", &gitconfig);
    far.set_env("LOG", far.root().join("far.log"));
    go_online(&hub, &mut far);

    let id = submit_repo(&hub, "must move", &repo, &["--max-attempts", "3"]);
    let first = wait_for(EVENTUALLY, "the first attempt ended", || {
        let t = show(&hub, id);
        match attempts(&t).first() {
            Some(a) if a["outcome"].is_string() => Ok(a.clone()),
            _ => Err(t.to_string()),
        }
    });
    assert_eq!(first["outcome"], "workspace_failed", "{first}");
    assert_eq!(first["agent"], "ws-far");
    let reason = first["error"]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("fetch") || reason.contains("clone"),
        "{first}"
    );

    // A sidecar that can reach it takes the retry.
    let mut near = git_sidecar(&hub, "ws-near", 1, COMMITTING_AGENT);
    near.set_env("LOG", near.root().join("near.log"));
    go_online(&hub, &mut near);
    let t = wait_ended(&hub, id);
    assert_eq!(t["state"], "completed", "{t}");
    assert_eq!(t["agent"], "ws-near", "{t}");
    assert!(
        outcomes(&t)
            .iter()
            .all(|o| o == "workspace_failed" || o == "completed"),
        "{t}"
    );
}

#[test]
fn a_task_with_a_repo_never_goes_to_a_sidecar_without_git_workspaces() {
    let hub = hub();
    let mut shared = sidecar(&hub, "ws-shared", &[]);
    go_online(&hub, &mut shared);
    let repo = origin(shared.root());
    let id = submit_repo(&hub, "needs git", &repo, &[]);
    // A plain task submitted after it runs there; the repo task stays queued.
    let plain = submit(&hub, "plain", &[]);
    let t = wait_ended(&hub, plain);
    assert_eq!(t["agent"], "ws-shared", "{t}");
    let t = show(&hub, id);
    assert_eq!(t["state"], "queued", "{t}");
    assert_eq!(t["generation"], 0, "{t}");
}

// === the examples, with stand-ins ===

/// The `[agent]` and `[workspace]` tables of `deploy/examples/<file>`, written
/// into the sidecar's own sidecar.toml (which holds its name, hub and state).
fn use_example(sc: &Sidecar, file: &str) {
    let example = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(file);
    let text = std::fs::read_to_string(&example).expect("example");
    let ex: toml::Table = text.parse().expect("example parses");
    let path = sc.config_path();
    let mut own: toml::Table = std::fs::read_to_string(&path)
        .expect("sidecar.toml")
        .parse()
        .expect("sidecar.toml parses");
    for table in ["agent", "workspace"] {
        let mut t = ex[table].as_table().cloned().expect("table");
        // Host-local paths of the example point into the test's directory.
        if t.contains_key("template_dir") {
            let dir = sc.root().join("template");
            std::fs::create_dir_all(&dir).expect("mkdir");
            for entry in t["copy"].as_array().cloned().unwrap_or_default() {
                let p = dir.join(entry.as_str().expect("copy entry"));
                std::fs::write(&p, "from the template\n").expect("write");
            }
            t.insert("template_dir".into(), dir.display().to_string().into());
        }
        t.remove("setup_command");
        own.insert(table.into(), t.into());
    }
    own.insert("slots".into(), ex["slots"].clone());
    std::fs::write(&path, toml::to_string(&own).expect("render")).expect("write");
}

/// `PATH` with the stand-ins and the sidecar binary's directory first.
fn standin_path() -> String {
    let standins = Path::new(env!("CARGO_MANIFEST_DIR")).join("standins");
    let bin_dir = bins().sidecar.parent().expect("bin dir").to_path_buf();
    format!(
        "{}:{}:{}",
        standins.display(),
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn example_completes(file: &str, marker: &str) -> Value {
    let hub = hub();
    let mut sc = Sidecar::enroll_slots(&hub, &format!("ex-{}", &file[..4]), 2);
    use_example(&sc, file);
    sc.set_env("PATH", standin_path());
    let repo = origin(sc.root());
    go_online(&hub, &mut sc);
    let id = submit_repo(
        &hub,
        "add a greeting",
        &repo,
        &["--description", "Say hello."],
    );
    let t = wait_ended(&hub, id);
    assert_eq!(t["state"], "completed", "{file}: {t}");
    let w = &attempts(&t)[0]["work"];
    assert_eq!(w["commits"], 1, "{file}: {t}");
    let head = w["head"].as_str().expect("head");
    let m = mirror(&sc);
    // The stand-in read the prompt (title, blank line, description) and committed it.
    assert_eq!(
        git(&m, &["show", &format!("{head}:{marker}")]),
        "add a greeting\n\nSay hello."
    );
    t
}

#[test]
fn the_claude_code_example_runs_claude_p_with_the_prompt_on_stdin() {
    let t = example_completes("claude-code.toml", "CLAUDE_WAS_HERE.md");
    // Its transcript's result line gave the tokens and the cost.
    let u = &t["usage"];
    assert_eq!(
        (&u["input_tokens"], &u["output_tokens"]),
        (&10.into(), &5.into()),
        "{t}"
    );
    assert_eq!(u["cost_micro_usd"], 10_000, "{t}");
    assert_eq!(u["model"], "claude-stand-in", "{t}");
}

#[test]
fn the_codex_example_runs_codex_exec_with_the_prompt_on_stdin() {
    let t = example_completes("codex.toml", "CODEX_WAS_HERE.md");
    assert_eq!(t["usage"]["output_tokens"], 5, "{t}");
}

#[test]
fn the_aider_example_runs_aider_with_the_prompt_file() {
    example_completes("aider.toml", "AIDER_WAS_HERE.md");
}

// === tmux wake runs ===

/// tmux for a test: a private server (socket in `dir`), killed when dropped.
struct Tmux {
    dir: PathBuf,
}

impl Tmux {
    fn command(&self) -> Command {
        let mut c = Command::new("tmux");
        c.env("TMUX_TMPDIR", &self.dir).env_remove("TMUX");
        c
    }

    fn has_session(&self, name: &str) -> bool {
        run_bounded(
            self.command()
                .args(["has-session", "-t", &format!("={name}")]),
            GIT,
        )
        .status
        .success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = run_bounded(self.command().arg("kill-server"), GIT);
    }
}

#[test]
fn a_cancelled_tmux_wake_run_leaves_no_session_and_no_process() {
    if !muster_tests::tool_available(Command::new("tmux").arg("-V"), "tmux runs the wake example") {
        return;
    }
    let hub = hub();
    let mut sc = Sidecar::enroll_slots(&hub, "ex-tmux", 2);
    use_example(&sc, "tmux-claude.toml");
    // The stand-in claude here never finishes: it is the agent to cancel.
    let slow = sc.root().join("slow-bin");
    std::fs::create_dir_all(&slow).expect("mkdir");
    write_script(
        &slow.join("claude"),
        "#!/bin/sh\necho $$ > \"$PIDS/claude-$(basename \"$PWD\").pid\"\nexec sleep 600\n",
    );
    let tmux = Tmux {
        dir: sc.root().join("tmux"),
    };
    std::fs::create_dir_all(&tmux.dir).expect("mkdir");
    sc.set_env("TMUX_TMPDIR", &tmux.dir);
    let pids = sc.root().to_path_buf();
    sc.set_env("PIDS", pids);
    sc.set_env("PATH", format!("{}:{}", slow.display(), standin_path()));
    let repo = origin(sc.root());
    go_online(&hub, &mut sc);

    let id = submit_repo(&hub, "long think", &repo, &[]);
    let t = wait_state(&hub, id, &["running"], EVENTUALLY);
    let session = format!("muster-{id}");
    assert_eq!(attempts(&t)[0]["session"], session, "{t}");
    assert!(tmux.has_session(&session));
    let pid_file = sc.root().join(format!("claude-{id}-1.pid"));
    let pid = wait_for(EVENTUALLY, "the agent's pid", || {
        read_pid(&pid_file).ok_or_else(|| "not yet".to_string())
    });
    assert!(pid_alive(pid));

    hub.cli(&["task", "cancel", &id.to_string()]);
    let t = wait_ended(&hub, id);
    assert_eq!(outcomes(&t), ["cancelled"], "{t}");
    assert!(
        !tmux.has_session(&session),
        "the session outlived the cancel"
    );
    wait_for(EVENTUALLY, "the agent process gone", || {
        if pid_alive(pid) {
            Err(format!("pid {pid} alive"))
        } else {
            Ok(())
        }
    });
}

#[test]
fn two_wake_runs_on_one_host_are_told_apart_when_one_dies() {
    let hub = hub();
    let mut sc = Sidecar::enroll_slots(&hub, "ws-wake2", 2);
    sc.set_slots(&hub, 2);
    let dir = sc.root().to_path_buf();
    // Each wake starts a background shell whose command line names its task
    // ($0 of `sh -c`), and records its pid.
    let script = agent_script(
        &sc,
        "wake.sh",
        &format!(
            "#!/bin/sh\nsh -c 'while :; do sleep 1; done' \"muster-agent-$MUSTER_TASK_ID\" >/dev/null 2>&1 &\necho $! > \"{d}/agent-$MUSTER_TASK_ID.pid\"\nexit 0\n",
            d = dir.display()
        ),
    );
    use_command(&sc, &script);
    sc.set_agent("mode", "\"wake\"");
    sc.set_agent("verify", "\"process\"");
    sc.set_agent("verify_process", "\"muster-agent-{task_id}\"");
    sc.set_agent("start_timeout", "\"20s\"");
    go_online(&hub, &mut sc);

    let a = submit(&hub, "wake A", &["--max-attempts", "1"]);
    let b = submit(&hub, "wake B", &[]);
    let pids: Vec<u32> = [a, b]
        .iter()
        .map(|id| {
            let t = wait_state(&hub, *id, &["running"], EVENTUALLY);
            let pid = attempts(&t)[0]["pid"].as_u64().expect("pid") as u32;
            assert_eq!(
                read_pid(&dir.join(format!("agent-{id}.pid"))),
                Some(pid),
                "{t}"
            );
            pid
        })
        .collect();
    assert_ne!(pids[0], pids[1]);
    // A's agent dies; B's lives on.
    let _ = Command::new("kill")
        .args(["-KILL", &pids[0].to_string()])
        .status();
    let t = wait_ended(&hub, a);
    assert_eq!(outcomes(&t)[0], "agent_exited", "{t}");
    assert!(pid_alive(pids[1]));
    let t = show(&hub, b);
    assert_eq!(t["state"], "running", "{t}");
    assert_eq!(outcomes(&t), ["-"], "{t}");
    hub.cli(&["task", "cancel", &b.to_string()]);
    let t = wait_ended(&hub, b);
    assert_eq!(outcomes(&t), ["cancelled"], "{t}");
    wait_for(EVENTUALLY, "B's agent stopped by the cancel", || {
        if pid_alive(pids[1]) {
            Err("alive".into())
        } else {
            Ok(())
        }
    });
}
