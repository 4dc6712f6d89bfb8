//! `muster-hub demo`: a local fleet on loopback running sample tasks end to end.
//!
//! A hub (in this process) and three sidecars (child processes of the
//! `muster-sidecar` binary beside this one, built first when run under cargo)
//! in a temporary directory: real QUIC with mutual TLS, real redb files, real enrollment with
//! join tokens. Sample agents run in both modes; one fails now and then, one
//! needs a capability only one sidecar has. Everything is removed at the end,
//! also on Ctrl-C.
//!
//! With `--keep` the fleet stays up after the sample tasks, with the web
//! dashboard on a loopback port: the demo prints a one-time login URL and runs
//! until Ctrl-C or SIGTERM, then stops the sidecars and the hub cleanly.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use muster_protocol::msg::{OpRequest, Role, SubmitRequest, TimeoutAction};
use muster_protocol::{AgentName, TaskId};
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::cli::{CliError, ConnectArgs, Session};
use crate::config::HubConfig;
use crate::init::init_data_dir;
use crate::server::Hub;

/// How long the demo waits for all tasks before giving up.
const DEMO_DEADLINE: Duration = Duration::from_secs(180);

/// The sidecars: name, capabilities, mode, slots.
const FLEET: [(&str, &[&str], &str, u32); 3] = [
    ("alpha", &["rust"], "exec", 2),
    ("beta", &["rust", "review"], "exec", 2),
    ("gamma", &["gpu", "review"], "wake", 2),
];

/// The coding sidecar: git workspaces on the sample repository; only it takes
/// tasks with `--repo`, each in a worktree of its own on branch `muster/<id>`.
const CODER: (&str, &[&str], &str, u32) = ("delta", &[], "git", 2);

/// Runs the demo with `tasks` sample tasks. Returns an error if any step fails
/// or if not every task reached a terminal state in time.
///
/// # Errors
/// [`CliError`] naming the step that failed.
pub async fn run(tasks: usize, keep: bool) -> Result<(), CliError> {
    let tmp = tempfile::Builder::new()
        .prefix("muster-demo-")
        .tempdir()
        .map_err(|e| CliError::fail(format!("cannot create a temporary directory: {e}")))?;
    let result = if keep {
        // A kept demo is stopped by a signal on purpose: it must reach the clean
        // shutdown below rather than be dropped mid-flight.
        let stop = stop_signal().map_err(fail("listening for Ctrl-C and SIGTERM"))?;
        fleet(tmp.path(), tasks, Some(stop)).await
    } else {
        tokio::select! {
            r = fleet(tmp.path(), tasks, None) => r,
            _ = tokio::signal::ctrl_c() => Err(CliError::fail("interrupted; cleaned up")),
        }
    };
    // Children were started with kill_on_drop; the temporary directory goes with `tmp`.
    drop(tmp);
    result
}

/// Turns true on the first SIGINT (Ctrl-C) or SIGTERM.
fn stop_signal() -> Result<watch::Receiver<bool>, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// Returns once `stop` has fired; never without one.
async fn stopped(stop: &mut Option<watch::Receiver<bool>>) {
    match stop {
        // An error means the signal task is gone: nothing can stop us then but a
        // kill, so treat it as a stop rather than run on unstoppable.
        Some(rx) => drop(rx.wait_for(|s| *s).await),
        None => std::future::pending().await,
    }
}

fn fail(step: &str) -> impl Fn(String) -> CliError + '_ {
    move |e| CliError::fail(format!("demo: {step}: {e}"))
}

async fn fleet(
    dir: &Path,
    tasks: usize,
    mut stop: Option<watch::Receiver<bool>>,
) -> Result<(), CliError> {
    let keep = stop.is_some();
    let exe = sidecar_binary().map_err(fail("finding muster-sidecar"))?;
    let hub_dir = dir.join("hub");
    let port = free_udp_port().map_err(fail("finding a free port"))?;
    let mut config = HubConfig {
        data_dir: hub_dir.clone(),
        listen: ([127, 0, 0, 1], port).into(),
        ..HubConfig::default()
    };
    // Quicker than production so the demo's retries and heartbeats show in seconds.
    config.policy.heartbeat_interval = Duration::from_secs(2);
    config.policy.backoff_initial = Duration::from_secs(1);
    config.policy.lost_grace = Duration::from_secs(10);
    if keep {
        // Port 0: the kernel picks a free one; the hub reports what it bound.
        config.dashboard.listen = Some(([127, 0, 0, 1], 0).into());
    }
    let sans = ["localhost".to_string(), "127.0.0.1".into()];
    let fp = init_data_dir(&hub_dir, &config, &sans).map_err(fail("initialising the hub"))?;
    // The coding part needs git; without it the demo says so and runs the rest.
    let repo = sample_repo(&dir.join("sample-repo")).await;
    let mut fleet: Vec<_> = FLEET.to_vec();
    if repo.is_ok() {
        fleet.push(CODER);
    }
    println!(
        "muster demo: a hub and {} sidecars on 127.0.0.1:{port} in {}",
        fleet.len(),
        dir.display()
    );
    let repo = match repo {
        Ok(repo) => Some(repo),
        Err(e) => {
            println!("  (no git workspaces in this run: {e})");
            None
        }
    };
    println!("  hub CA fingerprint {}…", &fp[..16]);
    let hub = Hub {
        config: config.clone(),
        data_dir: hub_dir.clone(),
    };
    let running = hub
        .start()
        .await
        .map_err(|e| fail("starting the hub")(e.to_string()))?;
    let connect = ConnectArgs {
        data_dir: Some(hub_dir.clone()),
        ..ConnectArgs::default()
    };
    let session = connect.connect().await?;
    let agents_dir = dir.join("agents");
    write_agents(&agents_dir, &exe).map_err(fail("writing the sample agents"))?;
    let mut children = Vec::new();
    for &(name, caps, mode, slots) in &fleet {
        let child =
            start_sidecar(&exe, &session, dir, &agents_dir, name, caps, mode, slots).await?;
        children.push(child);
    }
    wait_online(&session, fleet.len()).await?;
    println!("  fleet online: alpha (exec), beta (exec), gamma (wake, the only one with `gpu`)");
    if let Some(repo) = &repo {
        println!(
            "  and delta (git workspaces): tasks with --repo {} run there, each in its own worktree\n",
            repo.display()
        );
    } else {
        println!();
    }
    let (outcome, interrupted) = tokio::select! {
        r = run_tasks(&session, tasks, repo.as_deref()) => (r, false),
        () = stopped(&mut stop) => (Err(CliError::fail("interrupted; cleaned up")), true),
    };
    if keep && !interrupted {
        match dashboard_login(&session, &running, &hub_dir).await {
            Ok(()) => stopped(&mut stop).await,
            Err(e) => println!("{}", e.message),
        }
        println!("\nstopping the fleet");
    }
    let stats = session.call(OpRequest::Stats).await;
    for c in &mut children {
        if let Some(pid) = c.id() {
            // SIGTERM: the sidecars drain and exit 0.
            let _ = Command::new("kill").arg(pid.to_string()).status().await;
        }
    }
    for c in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
    }
    session.close().await;
    let _ = running.shutdown().await;
    let stats = match stats {
        Ok(s) => s,
        // A kept demo's operator connection may have sat idle for hours: its
        // stats are a nicety, the clean stop is what counts.
        Err(e) if keep => {
            println!("\n(no stats: {})", e.message);
            return outcome;
        }
        Err(e) => return Err(e),
    };
    println!("\nstats");
    for key in [
        "finished",
        "completed",
        "messages_per_finished_task",
        "bytes_per_finished_task",
        "commits",
        "mean_group_size",
        "mean_commit_ms",
    ] {
        let v = &stats[key];
        let shown = v
            .as_f64()
            .filter(|_| v.is_f64())
            .map_or(v.to_string(), |f| format!("{f:.2}"));
        println!("  {key:<28} {shown}");
    }
    println!(
        "  (messages include the sample agents' two progress reports per exec task and the\n   retried attempts; a task whose agent reports nothing costs 5: Assign, Accepted,\n   Started, Finished, Ack)"
    );
    outcome
}

/// Prints how to open the kept demo's dashboard: a one-time login URL, how to
/// get another and an API token, and how to stop.
async fn dashboard_login(
    session: &Session,
    running: &crate::server::Running,
    hub_dir: &Path,
) -> Result<(), CliError> {
    let Some((_, base)) = &running.dashboard else {
        return Err(CliError::fail("demo: the dashboard did not start"));
    };
    let v = session
        .call(OpRequest::DashboardLogin { role: None })
        .await?;
    let url = v["url"].as_str().unwrap_or_default();
    let minutes = v["expires_at"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(crate::server::wall_ms())
        / 60_000;
    let dir = hub_dir.display();
    println!("\nthe fleet keeps running; the dashboard is at {base}");
    println!("  sign in (the link works once, for {minutes} min): {url}");
    println!("  another login URL:  muster-hub dashboard --data-dir {dir}");
    println!(
        "  an API token:       muster-hub token create --kind api --name me --role operator --data-dir {dir}"
    );
    println!(
        "                      then curl -H \"Authorization: Bearer <token>\" {base}/api/v1/agents"
    );
    println!("Ctrl-C or SIGTERM stops the fleet and removes everything");
    Ok(())
}

fn free_udp_port() -> Result<u16, String> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    s.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// Writes the sample agents: shell scripts that use only the `MUSTER_*`
/// variables and the task file, never task text on a command line.
fn write_agents(dir: &Path, exe: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let cli = format!("'{}'", exe.display());
    // exec mode: the script is the run. Tasks titled "flaky" fail their first attempt.
    let exec = format!(
        r#"#!/bin/sh
# Sample exec-mode agent: the command is the run; exit 0 = completed.
{cli} task progress "reading $MUSTER_TASK_FILE" >/dev/null
case "$(cat "$MUSTER_TASK_FILE")" in
  *flaky*) if [ "$MUSTER_GENERATION" = 1 ]; then echo "flaky: the first attempt always fails" >&2; exit 3; fi ;;
esac
sleep 0.$(( ($$ % 7) + 2 ))
{cli} task progress "done thinking" >/dev/null
exit 0
"#
    );
    // git workspace mode: the run's directory is a worktree of the task's
    // repository on branch muster/<task>; the agent edits it and commits.
    let code = format!(
        r#"#!/bin/sh
# Sample coding agent: reads its prompt, edits the worktree, commits on its branch.
set -e
# A task without a repository gets an empty directory: nothing to commit.
[ -n "${{MUSTER_BRANCH:-}}" ] || exit 0
{cli} task progress "working on $MUSTER_BRANCH in $MUSTER_WORKSPACE" >/dev/null
title=$(head -n 1 "$MUSTER_PROMPT_FILE")
printf -- '- %s (task %s)\n' "$title" "$MUSTER_TASK_ID" >> CHANGES.md
git add CHANGES.md
git -c user.name=demo-agent -c user.email=demo@example.invalid commit -q -m "$title"
"#
    );
    // wake mode: the command only wakes a worker that lives on, which acknowledges
    // its start and reports completion itself.
    let wake = format!(
        r#"#!/bin/sh
# Sample wake-mode agent: start a worker in the background and return at once.
nohup sh -c '{cli} task start >/dev/null; sleep 0.4; {cli} task progress "half way" >/dev/null; sleep 0.4; {cli} task complete --result "ok from $MUSTER_AGENT" >/dev/null' >/dev/null 2>&1 &
exit 0
"#
    );
    for (name, text) in [
        ("exec-agent.sh", exec),
        ("wake-agent.sh", wake),
        ("code-agent.sh", code),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn start_sidecar(
    exe: &Path,
    session: &Session,
    dir: &Path,
    agents: &Path,
    name: &str,
    caps: &[&str],
    mode: &str,
    slots: u32,
) -> Result<Child, CliError> {
    let token = session
        .call(OpRequest::TokenCreate {
            role: Role::Agent,
            ttl_s: 600,
            name: AgentName::new(name).ok(),
            capabilities: Some(caps.iter().map(|c| c.to_string()).collect()),
            slots: Some(slots),
        })
        .await?;
    let token = token["token"].as_str().unwrap_or_default().to_string();
    let data = dir.join(name);
    let mut enroll = Command::new(exe);
    enroll
        .arg("enroll")
        .arg("--token")
        .arg(&token)
        .arg("--data-dir")
        .arg(&data)
        .arg("--name")
        .arg(name);
    for c in caps {
        enroll.arg("--capability").arg(c);
    }
    let out = enroll
        .output()
        .await
        .map_err(|e| fail("enrolling")(e.to_string()))?;
    if !out.status.success() {
        return Err(fail("enrolling")(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let path = data.join(SIDECAR_CONFIG);
    let command = agents.join(match mode {
        "wake" => "wake-agent.sh",
        "git" => "code-agent.sh",
        _ => "exec-agent.sh",
    });
    edit_sidecar_config(&path, slots, mode, &command).map_err(fail("editing sidecar.toml"))?;
    let log = std::fs::File::create(data.join("sidecar.log"))
        .map_err(|e| fail("creating a log")(e.to_string()))?;
    Command::new(exe)
        .arg("run")
        .arg("--data-dir")
        .arg(&data)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail("starting a sidecar")(e.to_string()))
}

/// The sidecar's config file in its data directory (written by `enroll`).
const SIDECAR_CONFIG: &str = "sidecar.toml";

/// Sets the demo's keys in the `sidecar.toml` that `enroll` wrote: slots, no
/// disk floor, and the sample agent in its mode. The file is edited as TOML,
/// so the demo needs nothing of the sidecar's code but its binary.
fn edit_sidecar_config(path: &Path, slots: u32, mode: &str, command: &Path) -> Result<(), String> {
    use toml::Value;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut doc: toml::Table = text
        .parse()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    doc.insert("slots".into(), Value::Integer(slots.into()));
    doc.insert("disk_floor_mb".into(), Value::Integer(0));
    doc.entry("agent")
        .or_insert_with(|| Value::Table(toml::Table::new()));
    let (mode, workspace) = match mode {
        "git" => ("exec", "git"),
        other => (other, "shared"),
    };
    let mut ws = toml::Table::new();
    ws.insert("mode".into(), Value::String(workspace.into()));
    doc.insert("workspace".into(), Value::Table(ws));
    let Some(Value::Table(agent)) = doc.get_mut("agent") else {
        return Err(format!("{}: [agent] is not a table", path.display()));
    };
    agent.insert("mode".into(), Value::String(mode.into()));
    agent.insert(
        "command".into(),
        Value::Array(vec![Value::String(command.display().to_string())]),
    );
    if mode == "wake" {
        agent.insert("verify".into(), Value::String("agent-ack".into()));
        agent.insert("start_timeout".into(), Value::String("20s".into()));
    } else {
        agent.insert("settle".into(), Value::String("100ms".into()));
    }
    let text = toml::to_string(&doc).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The `muster-sidecar` binary beside this executable. Under `cargo run` it is
/// built first (a no-op when up to date), so the demo's sidecars match the source.
fn sidecar_binary() -> Result<std::path::PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe
        .parent()
        .ok_or_else(|| format!("{} has no directory", exe.display()))?;
    let sidecar = dir.join("muster-sidecar");
    // Only under `cargo run -p muster-hub`: a test harness that runs this binary
    // has built its own sidecar (with its own features) and must keep it.
    let under_cargo_run = std::env::var("CARGO_PKG_NAME").is_ok_and(|p| p == "muster-hub");
    if let (Some(cargo), Ok(manifest), true) = (
        std::env::var_os("CARGO"),
        std::env::var("CARGO_MANIFEST_DIR"),
        under_cargo_run,
    ) {
        let mut build = std::process::Command::new(cargo);
        build
            .args(["build", "--quiet", "--manifest-path"])
            .arg(Path::new(&manifest).join("Cargo.toml"))
            .args(["-p", "muster-sidecar", "--bin", "muster-sidecar"]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        println!("muster demo: building muster-sidecar (cargo build -p muster-sidecar)");
        let status = build.status().map_err(|e| format!("running cargo: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build -p muster-sidecar failed ({status})"));
        }
    }
    if sidecar.is_file() {
        Ok(sidecar)
    } else {
        Err(format!(
            "{} does not exist; build it with `cargo build --release -p muster-sidecar` (the demo runs its sidecars from it)",
            sidecar.display()
        ))
    }
}

async fn wait_online(session: &Session, n: usize) -> Result<(), CliError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = session.call(OpRequest::Agents).await?;
        let online = v["agents"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|a| a["available"] == true).count());
        if online == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(CliError::fail(format!(
                "demo: only {online} of {n} sidecars came online within 30 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The coding tasks the demo submits when git is there.
const CODE_TASKS: [&str; 2] = ["document the sample API", "add a changelog entry"];

/// A small git repository with one commit, for the coding sidecar.
async fn sample_repo(dir: &Path) -> Result<std::path::PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::write(
        dir.join("README.md"),
        "# sample\n\nA repository the muster demo made.\n",
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(dir.join("CHANGES.md"), "# Changes\n\n").map_err(|e| e.to_string())?;
    let git = |args: &'static [&'static str]| {
        let mut c = Command::new("git");
        c.arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        c
    };
    let steps: [&'static [&'static str]; 3] = [
        &["init", "-q", "-b", "main"],
        &["add", "-A"],
        &[
            "-c",
            "user.name=muster demo",
            "-c",
            "user.email=demo@example.invalid",
            "commit",
            "-q",
            "-m",
            "the sample repository",
        ],
    ];
    for args in steps {
        let out = tokio::time::timeout(Duration::from_secs(30), git(args).output())
            .await
            .map_err(|_| format!("git {} took over 30 s", args.join(" ")))?
            .map_err(|e| format!("git is not available ({e})"))?;
        if !out.status.success() {
            return Err(format!(
                "git {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(dir.to_path_buf())
}

fn sample(i: usize) -> SubmitRequest {
    let kinds: [(&str, &[&str], i32); 6] = [
        ("refactor the parser", &["rust"], 0),
        ("review pull request", &["review"], 5),
        ("train the ranking model", &["gpu"], 1),
        ("flaky integration test", &["rust"], 2),
        ("write release notes", &[], -1),
        ("fix CI: \"; rm -rf / # $(reboot) `id`", &[], 3),
    ];
    let (title, caps, priority) = kinds[i % kinds.len()];
    SubmitRequest {
        title: format!("{title} #{i}"),
        description: format!(
            "Sample task {i}. Shell metacharacters stay data: $(whoami) `id` \"; exit 1"
        ),
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
        priority,
        max_attempts: Some(3),
        timeout_ms: Some(60_000),
        timeout_action: TimeoutAction::Retry,
        after: Vec::new(),
        key: None,
        ..Default::default()
    }
}

async fn run_tasks(session: &Session, n: usize, repo: Option<&Path>) -> Result<(), CliError> {
    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..n {
        let v = session.call(OpRequest::Submit(sample(i))).await?;
        ids.push(TaskId(v["id"].as_u64().unwrap_or_default()));
    }
    let coding = repo.map_or(0, |_| CODE_TASKS.len());
    if let Some(repo) = repo {
        for title in CODE_TASKS {
            let req = SubmitRequest {
                title: title.into(),
                description: "A sample coding task: add a line to CHANGES.md and commit it.".into(),
                max_attempts: Some(3),
                timeout_ms: Some(60_000),
                repo: Some(repo.display().to_string()),
                labels: vec![("kind".into(), "code".into())],
                ..Default::default()
            };
            let v = session.call(OpRequest::Submit(req)).await?;
            ids.push(TaskId(v["id"].as_u64().unwrap_or_default()));
        }
    }
    println!(
        "submitted {} tasks with mixed priorities and capabilities ({coding} of them on the sample repository)\n",
        n + coding
    );
    let mut last: BTreeMap<u64, String> = BTreeMap::new();
    let mut finished: BTreeMap<u64, Value> = BTreeMap::new();
    while finished.len() < ids.len() {
        if started.elapsed() > DEMO_DEADLINE {
            return Err(CliError::fail(format!(
                "demo: only {} of {} tasks ended within {} s",
                finished.len(),
                ids.len(),
                DEMO_DEADLINE.as_secs()
            )));
        }
        for id in &ids {
            if finished.contains_key(&id.0) {
                continue;
            }
            let v = session.call(OpRequest::TaskShow { id: *id }).await?;
            let state = v["state"].as_str().unwrap_or("?").to_string();
            let agent = v["agent"].as_str().unwrap_or("-").to_string();
            let key = format!("{state}/{agent}/{}", v["generation"]);
            if last.get(&id.0) != Some(&key) {
                println!(
                    "{:>7.2}s  task {:>2}  {:<9} {:<6} gen {}  {}",
                    started.elapsed().as_secs_f64(),
                    id.0,
                    state,
                    agent,
                    v["generation"],
                    v["title"].as_str().unwrap_or("")
                );
                last.insert(id.0, key);
            }
            if matches!(state.as_str(), "completed" | "failed" | "cancelled") {
                finished.insert(id.0, v);
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    summary(&finished);
    let bad = finished
        .values()
        .filter(|v| v["state"] != "completed")
        .count();
    if bad > 0 {
        return Err(CliError::fail(format!(
            "demo: {bad} tasks did not complete"
        )));
    }
    Ok(())
}

fn summary(tasks: &BTreeMap<u64, Value>) {
    println!(
        "\n{:>4}  {:<48} {:<6} {:>8} {:<10} {:>7}  BRANCH @ HEAD",
        "TASK", "TITLE", "AGENT", "ATTEMPTS", "OUTCOME", "TIME"
    );
    for (id, v) in tasks {
        let secs = v["updated_at"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(v["submitted_at"].as_u64().unwrap_or(0)) as f64
            / 1000.0;
        let title: String = v["title"].as_str().unwrap_or("").chars().take(48).collect();
        // The last attempt's work, for tasks on a repository.
        let work = v["attempt_history"]
            .as_array()
            .and_then(|a| a.last())
            .map(|a| &a["work"])
            .filter(|w| w.is_object())
            .map(|w| {
                let head: String = w["head"].as_str().unwrap_or("").chars().take(12).collect();
                format!("{} @ {head}", w["branch"].as_str().unwrap_or("?"))
            })
            .unwrap_or_default();
        println!(
            "{id:>4}  {title:<48} {:<6} {:>8} {:<10} {secs:>6.2}s  {work}",
            v["agent"].as_str().unwrap_or("-"),
            v["attempts"],
            v["state"].as_str().unwrap_or("?"),
        );
    }
}
