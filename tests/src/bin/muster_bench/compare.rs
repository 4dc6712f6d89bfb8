//! The `compare` mode: muster's `throughput` beside a peer's own harness, in
//! one invocation, with the same number of tasks, rounds interleaved.
//!
//! The peer is graphile-worker (a PostgreSQL job queue for Node), measured by
//! its harness in `peers/graphile` (`run.sh N W`: a private PostgreSQL cluster
//! with durable settings, an fsync probe, one worker process with concurrency
//! W, N no-op jobs; one JSON line on stdout). It runs as a subprocess in each
//! of its modes: `batched` (`GW_LOCAL_QUEUE=500 GW_COMPLETE_DELAY=0`: jobs
//! locked and completed in batches) and `default` (one lock commit and one
//! completion commit per job).
//!
//! Each round runs muster and every peer mode once, muster first in odd
//! rounds and last in even ones, so that a drift of the machine (this disk's
//! fsync latency moves over minutes) does not always land on the same side.
//! muster's side is a fresh hub, its redb floor (durable single-row commits)
//! and the peer's disk probe (128-byte append + `fdatasync`, 200 times, as
//! `peers/fsync_probe.py` does) taken just before the pass, then `throughput`
//! with the instant runner. Every figure is printed with the disk probe of
//! its own run; the summary has min / median / max over the rounds.
//!
//! `--floor-ms` is the time of each round's redb floor (0: none); `--floor`
//! does not apply. The peer's stderr goes to `round-R-graphile-MODE.log` in the
//! run's temporary directory (`--keep` keeps it); its tail is in any error.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt as _;

use crate::fleet::Agent;
use crate::modes::{self, ThroughputArgs};
use crate::util::{ms, round3};

/// The peer to compare with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Peer {
    /// graphile-worker, by `peers/graphile/run.sh`.
    Graphile,
}

/// A configuration of the peer's harness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum PeerMode {
    /// `GW_LOCAL_QUEUE=500 GW_COMPLETE_DELAY=0`: batch fetching and batch completion.
    Batched,
    /// The harness's defaults: one lock and one completion commit per job.
    Default,
}

impl PeerMode {
    fn as_str(self) -> &'static str {
        match self {
            PeerMode::Batched => "batched",
            PeerMode::Default => "default",
        }
    }

    /// The environment `run.sh` gets on top of ours.
    fn env(self) -> &'static [(&'static str, &'static str)] {
        match self {
            PeerMode::Batched => &[("GW_LOCAL_QUEUE", "500"), ("GW_COMPLETE_DELAY", "0")],
            PeerMode::Default => &[],
        }
    }
}

/// `compare` options.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct CompareArgs {
    /// The peer.
    #[arg(value_enum)]
    pub(crate) peer: Peer,
    /// Tasks (jobs) per run, the same on both sides.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) tasks: usize,
    /// muster's sidecars (full daemons in this process, each with its own redb).
    #[arg(long, default_value_t = 64)]
    pub(crate) sidecars: usize,
    /// Slots per muster sidecar.
    #[arg(long, default_value_t = 16)]
    pub(crate) slots: u32,
    /// The peer's harness directory (with run.sh and setup.sh); default
    /// `../shared/peers/graphile` from the current directory.
    #[arg(long, env = "MUSTER_PEER_GRAPHILE")]
    pub(crate) peer_dir: Option<PathBuf>,
    /// The peer's job slots (graphile-worker concurrency, `run.sh N W`).
    #[arg(long, default_value_t = 8)]
    pub(crate) peer_concurrency: usize,
    /// The peer's configurations, each run once per round.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["batched", "default"])]
    pub(crate) modes: Vec<PeerMode>,
    /// Rounds; muster goes first in odd rounds, the peer in even ones.
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// Seconds one run of the peer's harness may take before it is stopped (SIGTERM: it cleans up).
    #[arg(long, default_value_t = 600)]
    pub(crate) peer_timeout_s: u64,
}

/// Samples of the disk probe, as `peers/fsync_probe.py` takes them.
const PROBE_COUNT: usize = 200;

/// The peer's disk probe in `dir`: latency of a 128-byte append + `fdatasync`,
/// `count` times, p50 and p99 by nearest rank (a port of `peers/fsync_probe.py`).
fn fsync_probe(dir: &Path, count: usize) -> Result<Value> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .with_context(|| path.display().to_string())?;
    let mut lat = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        f.write_all(&[b'x'; 128])?;
        let t = Instant::now();
        f.sync_data()?;
        lat.push(ms(t.elapsed()));
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    lat.sort_by(f64::total_cmp);
    let n = lat.len();
    let pct = |q: f64| round3(lat[((q * n as f64).ceil() as usize).max(1) - 1]);
    Ok(json!({
        "fsync_probe_ms_p50": pct(0.5),
        "fsync_probe_ms_p99": pct(0.99),
        "fsync_probe_count": n,
    }))
}

/// The harness directory: `--peer-dir`, `MUSTER_PEER_GRAPHILE`, or `../shared/peers/graphile`.
fn peer_dir(a: &CompareArgs) -> Result<PathBuf> {
    let dir = match &a.peer_dir {
        Some(d) => d.clone(),
        None => std::env::current_dir()?.join("../shared/peers/graphile"),
    };
    if !dir.join("run.sh").is_file() {
        bail!(
            "no graphile-worker harness at {}: pass --peer-dir DIR (or set MUSTER_PEER_GRAPHILE) \
             to the directory holding run.sh and setup.sh",
            dir.display()
        );
    }
    Ok(std::fs::canonicalize(&dir).unwrap_or(dir))
}

/// What `run.sh` needs, checked before anything runs, each with what to do.
async fn preflight(dir: &Path) -> Result<()> {
    let uid = tokio::process::Command::new("id")
        .arg("-u")
        .stdin(Stdio::null())
        .output()
        .await
        .context("running id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!(
            "the graphile-worker harness must run as root (it runs a private PostgreSQL \
             cluster as user postgres): run muster-bench compare as root"
        );
    }
    let node_dir = std::env::var_os("PEERS_NODE_DIR")
        .map_or_else(|| PathBuf::from("/tmp/peers-node"), PathBuf::from);
    if !node_dir.join("node_modules/graphile-worker").is_dir() {
        bail!(
            "no graphile-worker in {}: run `bash {}` first (it installs the pinned \
             versions with npm ci; PEERS_NODE_DIR moves them)",
            node_dir.display(),
            dir.join("setup.sh").display()
        );
    }
    let node = tokio::process::Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await;
    if !node.is_ok_and(|o| o.status.success()) {
        bail!("the graphile-worker harness needs node on PATH (Node 20 is what it was pinned for)");
    }
    Ok(())
}

/// One run of the peer's harness: its JSON line.
async fn peer_run(dir: &Path, mode: PeerMode, a: &CompareArgs, log: &Path) -> Result<Value> {
    let stderr = std::fs::File::create(log).with_context(|| log.display().to_string())?;
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg(dir.join("run.sh"))
        .arg(a.tasks.to_string())
        .arg(a.peer_concurrency.to_string())
        .env_remove("GW_LOCAL_QUEUE")
        .env_remove("GW_COMPLETE_DELAY")
        .envs(mode.env().iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running bash {}/run.sh", dir.display()))?;
    let mut stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    // One JSON line is expected: keep at most PEER_STDOUT_MAX bytes, and drain
    // the rest so the harness never blocks on a full pipe.
    let reader = tokio::spawn(async move {
        let mut out = String::new();
        let _ = (&mut stdout)
            .take(PEER_STDOUT_MAX)
            .read_to_string(&mut out)
            .await;
        let _ = tokio::io::copy(&mut stdout, &mut tokio::io::sink()).await;
        out
    });
    let limit = Duration::from_secs(a.peer_timeout_s);
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(s) => s?,
        Err(_) => {
            // SIGTERM: run.sh's trap stops its cluster and removes its directory.
            if let Some(pid) = child.id() {
                let _ = tokio::process::Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status()
                    .await;
            }
            if tokio::time::timeout(Duration::from_secs(60), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
            bail!(
                "the graphile-worker harness ({}) did not finish within {} s (--peer-timeout-s); log: {}",
                mode.as_str(),
                limit.as_secs(),
                tail(log)
            );
        }
    };
    let out = reader.await.unwrap_or_default();
    if !status.success() {
        let hint = if status.code() == Some(2) {
            " (exit 2: a prerequisite is missing: root, setup.sh's node modules, PostgreSQL in PG_BIN, node, python3)"
        } else {
            ""
        };
        bail!(
            "the graphile-worker harness ({}) failed ({status}){hint}; log: {}",
            mode.as_str(),
            tail(log)
        );
    }
    out.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find(|v| v["tasks_per_s"].is_number())
        .ok_or_else(|| {
            anyhow!(
                "the graphile-worker harness ({}) printed no JSON line with tasks_per_s: {out:?}; log: {}",
                mode.as_str(),
                tail(log)
            )
        })
}

/// Bytes of the peer harness's stdout kept (it prints one JSON line).
const PEER_STDOUT_MAX: u64 = 1 << 20;

/// The last lines of a log, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "{}:\n{}",
        path.display(),
        lines[lines.len().saturating_sub(20)..].join("\n")
    )
}

/// One muster run in `dir`: the redb floor, the disk probe, then `throughput` on a fresh hub.
async fn muster_run(bin: &Path, dir: &Path, a: &CompareArgs, floor_ms: u64) -> Result<Value> {
    std::fs::create_dir_all(dir)?;
    // Write back what is dirty (the previous run's files) before the floor, as `floor` does.
    tokio::task::spawn_blocking(|| std::process::Command::new("sync").status())
        .await?
        .context("running sync")?;
    let redb = if floor_ms == 0 {
        Value::Null
    } else {
        let d = dir.join("floor");
        std::fs::create_dir_all(&d)?;
        let per = Duration::from_millis(floor_ms);
        tokio::task::spawn_blocking(move || crate::floor::redb_floor(&d, per)).await??
    };
    let d = dir.to_path_buf();
    let probe = tokio::task::spawn_blocking(move || fsync_probe(&d, PROBE_COUNT)).await??;
    let t = ThroughputArgs {
        sidecars: a.sidecars,
        tasks: a.tasks,
        agent: Agent::Instant,
        slots: a.slots,
        window: 1024,
        batch: 64,
        connections: 16,
    };
    let v = modes::throughput(bin, dir, &t).await?;
    Ok(json!({
        "tasks_per_s": v["tasks_per_s"],
        "elapsed_s": v["elapsed_s"],
        "submit_elapsed_s": v["submit_elapsed_s"],
        "submit_to_completed_ms_p50": v["submit_to_completed"]["p50_ms"],
        "submit_to_completed_ms_p99": v["submit_to_completed"]["p99_ms"],
        // The hub groups commits: thousands of writes per commit at this rate.
        "hub_commits": v["hub"]["commits"],
        "hub_commits_per_1000_tasks": round3(
            v["hub"]["commits"].as_f64().unwrap_or(0.0) * 1000.0 / a.tasks as f64
        ),
        "sidecar_commits_per_task": {
            "flushed": v["sidecar_commits"]["flushed_per_task"],
            "unflushed": v["sidecar_commits"]["unflushed_per_task"],
        },
        "cpu_per_task_us": v["cpu_per_task_us"],
        "cpu_busy_cores": v["cpu_busy_cores"],
        "fsync_probe_ms_p50": probe["fsync_probe_ms_p50"],
        "fsync_probe_ms_p99": probe["fsync_probe_ms_p99"],
        "fsync_probe_count": probe["fsync_probe_count"],
        "redb_commits_per_s": redb["commits_per_s"],
        "redb_commit_us_p50": redb["commit"]["p50_us"],
    }))
}

/// min / median / max of some figures.
fn spread(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return json!({ "n": 0, "min": null, "median": null, "max": null });
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    json!({ "n": n, "min": round3(v[0]), "median": round3(median), "max": round3(v[n - 1]) })
}

pub(crate) async fn compare(
    bin: &Path,
    root: &Path,
    a: &CompareArgs,
    floor_ms: u64,
) -> Result<Value> {
    let Peer::Graphile = a.peer;
    if a.tasks == 0 || a.sidecars == 0 || a.rounds == 0 || a.peer_concurrency == 0 {
        bail!("--tasks, --sidecars, --rounds and --peer-concurrency must be at least 1");
    }
    let mut modes_run: Vec<PeerMode> = Vec::new();
    for m in &a.modes {
        if !modes_run.contains(m) {
            modes_run.push(*m);
        }
    }
    let dir = peer_dir(a)?;
    preflight(&dir).await?;
    let mut rounds = Vec::new();
    for r in 1..=a.rounds {
        let muster_first = r % 2 == 1;
        let mut order: Vec<&str> = modes_run.iter().map(|m| m.as_str()).collect();
        if muster_first {
            order.insert(0, "muster");
        } else {
            order.push("muster");
        }
        let mut muster = Value::Null;
        let mut peer = serde_json::Map::new();
        for side in &order {
            let t = Instant::now();
            if *side == "muster" {
                eprintln!(
                    "muster-bench: round {r}/{}: muster, {} tasks",
                    a.rounds, a.tasks
                );
                let d = root.join(format!("round-{r}-muster"));
                muster = muster_run(bin, &d, a, floor_ms)
                    .await
                    .with_context(|| format!("round {r}: muster"))?;
                // 64 sidecars' redb files: gone before the next run writes.
                let _ = std::fs::remove_dir_all(&d);
                eprintln!(
                    "muster-bench: round {r}: muster {} tasks/s (fsync probe p50 {} ms) in {:.0} s",
                    muster["tasks_per_s"],
                    muster["fsync_probe_ms_p50"],
                    t.elapsed().as_secs_f64()
                );
            } else {
                let mode = *modes_run
                    .iter()
                    .find(|m| m.as_str() == *side)
                    .ok_or_else(|| anyhow!("no mode {side}"))?;
                eprintln!(
                    "muster-bench: round {r}/{}: graphile-worker {side}, run.sh {} {}",
                    a.rounds, a.tasks, a.peer_concurrency
                );
                let log = root.join(format!("round-{r}-graphile-{side}.log"));
                let v = peer_run(&dir, mode, a, &log)
                    .await
                    .with_context(|| format!("round {r}: graphile-worker {side}"))?;
                eprintln!(
                    "muster-bench: round {r}: graphile-worker {side} {} jobs/s (fsync probe p50 {} ms) in {:.0} s",
                    v["tasks_per_s"],
                    v["fsync_probe_ms_p50"],
                    t.elapsed().as_secs_f64()
                );
                peer.insert(side.to_string(), v);
            }
        }
        let m = muster["tasks_per_s"].as_f64().unwrap_or(0.0);
        let mut ratio = serde_json::Map::new();
        for (side, v) in &peer {
            let p = v["tasks_per_s"].as_f64().unwrap_or(0.0);
            ratio.insert(
                format!("muster_over_{side}"),
                if p > 0.0 {
                    json!(round3(m / p))
                } else {
                    Value::Null
                },
            );
        }
        rounds.push(json!({
            "round": r,
            "order": order,
            "muster": muster,
            "peer": peer,
            "ratio": ratio,
        }));
    }
    // The summary over the rounds.
    let col = |f: &dyn Fn(&Value) -> Option<f64>| -> Value {
        spread(rounds.iter().filter_map(f).collect())
    };
    let mut summary = serde_json::Map::new();
    summary.insert(
        "muster_tasks_per_s".into(),
        col(&|r| r["muster"]["tasks_per_s"].as_f64()),
    );
    summary.insert(
        "muster_fsync_probe_ms_p50".into(),
        col(&|r| r["muster"]["fsync_probe_ms_p50"].as_f64()),
    );
    summary.insert(
        "muster_redb_commits_per_s".into(),
        col(&|r| r["muster"]["redb_commits_per_s"].as_f64()),
    );
    for m in &modes_run {
        let s = m.as_str();
        summary.insert(
            format!("peer_{s}_tasks_per_s"),
            col(&|r| r["peer"][s]["tasks_per_s"].as_f64()),
        );
        summary.insert(
            format!("peer_{s}_fsync_probe_ms_p50"),
            col(&|r| r["peer"][s]["fsync_probe_ms_p50"].as_f64()),
        );
        summary.insert(
            format!("muster_over_{s}"),
            col(&|r| r["ratio"][format!("muster_over_{s}")].as_f64()),
        );
    }
    let peer_version = rounds
        .iter()
        .find_map(|r| {
            r["peer"]
                .as_object()
                .and_then(|p| p.values().find_map(|v| v["version"].as_str()))
        })
        .unwrap_or("?")
        .to_string();
    print_table(a, &rounds, &summary);
    Ok(json!({
        "mode": "compare",
        "peer": "graphile-worker",
        "peer_version": peer_version,
        "peer_dir": dir.display().to_string(),
        "tasks": a.tasks,
        "rounds_n": a.rounds,
        "muster_config": {
            "sidecars": a.sidecars,
            "slots": a.slots,
            "slots_total": a.sidecars as u64 * u64::from(a.slots),
            "agent": "instant",
            "window": 1024,
            "batch": 64,
            "connections": 16,
        },
        "peer_config": {
            "concurrency": a.peer_concurrency,
            "modes": modes_run.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
            "batched_env": "GW_LOCAL_QUEUE=500 GW_COMPLETE_DELAY=0",
            "default_env": "",
            "command": format!("bash {}/run.sh {} {}", dir.display(), a.tasks, a.peer_concurrency),
        },
        "disk_probe": "fsync_probe_ms_*: 128-byte append + fdatasync, 200 times, just before each run (peers/fsync_probe.py on the peer's side, its port on muster's); redb_commits_per_s: muster's floor, durable single-row redb commits",
        "rounds": rounds,
        "summary": summary,
    }))
}

/// The rounds and the summary as a table, on stderr.
fn print_table(a: &CompareArgs, rounds: &[Value], summary: &serde_json::Map<String, Value>) {
    let f = |v: &Value| {
        v.as_f64()
            .map_or_else(|| "-".to_string(), |x| format!("{x:.1}"))
    };
    let f3 = |v: &Value| {
        v.as_f64()
            .map_or_else(|| "-".to_string(), |x| format!("{x:.3}"))
    };
    let mut out = String::new();
    out.push_str(&format!(
        "\ncompare graphile: {} tasks; muster {} sidecars x {} slots (instant runner); graphile-worker concurrency {}\n",
        a.tasks, a.sidecars, a.slots, a.peer_concurrency
    ));
    out.push_str(&format!(
        "{:<6} {:<18} {:>10} {:>14} {:>15} {:>10}\n",
        "round", "side", "tasks/s", "fsync p50 ms", "redb commits/s", "muster ÷"
    ));
    for round in rounds {
        let r = round["round"].as_u64().unwrap_or(0);
        let (muster, ratio) = (&round["muster"], &round["ratio"]);
        let peer = round["peer"].as_object().cloned().unwrap_or_default();
        out.push_str(&format!(
            "{:<6} {:<18} {:>10} {:>14} {:>15} {:>10}\n",
            r,
            "muster",
            f(&muster["tasks_per_s"]),
            f3(&muster["fsync_probe_ms_p50"]),
            f(&muster["redb_commits_per_s"]),
            ""
        ));
        for (side, v) in &peer {
            out.push_str(&format!(
                "{:<6} {:<18} {:>10} {:>14} {:>15} {:>10}\n",
                r,
                format!("graphile {side}"),
                f(&v["tasks_per_s"]),
                f3(&v["fsync_probe_ms_p50"]),
                "",
                f3(ratio
                    .get(format!("muster_over_{side}"))
                    .unwrap_or(&Value::Null))
            ));
        }
    }
    out.push_str("summary (min / median / max over the rounds)\n");
    for (k, v) in summary {
        out.push_str(&format!(
            "  {:<34} {} / {} / {}\n",
            k,
            f3(&v["min"]),
            f3(&v["median"]),
            f3(&v["max"])
        ));
    }
    eprint!("{out}");
}
