//! `muster-bench`: measures a real `muster-hub` over real QUIC with mutual TLS.
//!
//! ```text
//! cargo run --release -p muster-tests --bin muster-bench -- <mode> [options] [--json]
//!   throughput --sidecars K --tasks N --agent instant|exec [--slots S]
//!   latency    [--tasks N] [--agent exec|instant]
//!   scale      --sessions S [--heartbeat-ms MS] [--restart term|kill]
//!   backlog    --finished M [--sample N]
//!   floor      [--ms MS]
//!   workspace  [--files N] [--mib M] [--prepares P]
//!   logs       [--mb 200] [--followers 0,1,10]
//!   dashboard  [--agents 10000] [--tasks 1000000] [--requests 50] [--streams 100]
//!   failover   --pg-url URL [--runs 10] [--lease 5s] [--sidecars 4]
//!   compare    graphile [--tasks 20000] [--sidecars 64] [--slots 16] [--peer-dir DIR]
//!              [--peer-concurrency 8] [--modes batched,default] [--rounds 3]
//! ```
//!
//! `floor` measures what the machine does without muster (durable redb
//! commits, spawning `/bin/true`, a QUIC round trip and handshake on
//! loopback). Every other mode first takes a short floor pass (`--floor-ms`
//! each, 0 to skip, or `--floor FILE` to reuse a `floor --json` output) and
//! prints its figures beside the matching floor and their ratio (`ratios`).
//!
//! `compare graphile` runs `throughput` (a fresh hub per round, its redb floor
//! and a disk probe just before) and graphile-worker's own harness
//! (`peers/graphile/run.sh N W`, as root) back to back, rounds interleaved, and
//! prints both with their ratio: always JSON on stdout, a table on stderr.
//!
//! `workspace` starts no hub: it times the sidecar's workspace layer making
//! git worktrees against a bare `git worktree add` in the same run.
//!
//! Every other mode starts `muster-hub init` + `serve` in a temporary directory on a
//! free port of 127.0.0.1, drives it as an operator with the admin credential,
//! runs sidecars from the sidecar library in this process (real redb files,
//! real enrollment), prints one JSON object (`--json`) or a table, and removes
//! everything it made. Each phase has a deadline; exceeding it fails the run.
//! `failover` starts three hubs on a fresh database of a PostgreSQL server
//! (`--pg-url` or `MUSTER_TEST_PG_URL`) and drops the database after.

#[path = "muster_bench/compare.rs"]
mod compare;
#[path = "muster_bench/dashboard.rs"]
mod dashboard;
#[path = "muster_bench/failover.rs"]
mod failover;
#[path = "muster_bench/fleet.rs"]
mod fleet;
#[path = "muster_bench/floor.rs"]
mod floor;
#[path = "muster_bench/hub.rs"]
mod hub;
#[path = "muster_bench/modes.rs"]
mod modes;
#[path = "muster_bench/scale.rs"]
mod scale;
#[path = "muster_bench/util.rs"]
mod util;
#[path = "muster_bench/workspace.rs"]
mod workspace;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "muster-bench",
    about = "Benchmarks a real muster hub on loopback"
)]
struct Cli {
    /// Print one JSON object instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// The muster-hub binary (default: next to this executable, built first under cargo).
    #[arg(long, global = true)]
    hub_bin: Option<PathBuf>,
    /// Keep the temporary directory (its path is printed to stderr).
    #[arg(long, global = true)]
    keep: bool,
    /// Milliseconds spent on each floor in the pass before a mode runs (0: no floor, no ratios).
    #[arg(long, global = true, default_value_t = 1000)]
    floor_ms: u64,
    /// Reuse the floor of an earlier `muster-bench floor --json` (written to this file) instead.
    #[arg(long, global = true)]
    floor: Option<PathBuf>,
    /// Where the benchmarked hub keeps its state: redb (its data directory) or
    /// postgres (a fresh database on --pg-url per hub, dropped after).
    #[arg(long, global = true, value_enum, default_value = "redb")]
    store: BenchStore,
    /// A PostgreSQL server on this machine, e.g. postgres://postgres@127.0.0.1:5432/postgres;
    /// with it the floor also measures PostgreSQL's single-row durable commits.
    #[arg(long, global = true)]
    pg_url: Option<String>,
    #[command(subcommand)]
    mode: Mode,
}

/// The store `--store` names.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchStore {
    /// hub.redb.
    Redb,
    /// PostgreSQL at --pg-url.
    Postgres,
}

#[derive(Subcommand)]
enum Mode {
    /// Many tasks through K sidecars: tasks/s, latencies, messages and bytes per task, CPU per task by component (hub core, rest of the hub, sidecars, client), hub memory, commits.
    Throughput(modes::ThroughputArgs),
    /// One task at a time through one sidecar: submit → running and → completed.
    Latency(modes::LatencyArgs),
    /// Many idle sessions: hub CPU and memory per session, then a restart and the time until all are back.
    Scale(scale::ScaleArgs),
    /// Submit → running with M finished tasks in the store against an empty store, and restart time.
    Backlog(modes::BacklogArgs),
    /// One agent writing --mb MB as fast as it can, followed by 0, 1 and 10 `task logs --follow`: follower MB/s, the agent's slowdown, hub memory.
    Logs(modes::LogsArgs),
    /// The web dashboard and /api/v1 over 10,000 agents and 1,000,000 tasks: page and endpoint times, idle CPU and event fan-out with 100 SSE streams.
    Dashboard(dashboard::DashboardArgs),
    /// Three hubs on PostgreSQL, the leader killed -9 `--runs` times: time until a standby leads, a task completes, all sidecars are back.
    Failover(failover::FailoverArgs),
    /// muster's throughput and a peer's (graphile-worker, by its harness, as root) back to back, rounds interleaved: both tasks/s, their ratio, a disk probe beside each.
    Compare(compare::CompareArgs),
    /// This machine without muster: durable redb commits/s, spawns of /bin/true per second, QUIC round trip and handshake on loopback.
    Floor(floor::FloorArgs),
    /// The sidecar's workspace layer: prepare() of a git worktree (5,000 files, 100 MiB) against a bare `git worktree add`.
    Workspace(workspace::WorkspaceArgs),
}

/// The name of the bench runtime's threads (the client side of a run; the
/// sidecars of `throughput` run on their own runtime, see `fleet.rs`).
pub(crate) const CLIENT_THREAD: &str = "muster-client";

fn main() -> ExitCode {
    // The exec sidecars start this binary as their reaper (see `fleet.rs`).
    if std::env::args_os().nth(1).as_deref()
        == Some(muster_sidecar::agent::REAPER_SUBCOMMAND.as_ref())
    {
        return muster_sidecar::agent::reaper_main();
    }
    let cli = Cli::parse();
    if cli.store == BenchStore::Postgres {
        let Some(url) = &cli.pg_url else {
            eprintln!(
                "muster-bench: --store postgres needs --pg-url postgres://user@127.0.0.1:PORT/db"
            );
            return ExitCode::from(2);
        };
        let _ = hub::PG_URL.set(url.clone());
    }
    if let Some(url) = &cli.pg_url {
        let _ = floor::PG_FLOOR_URL.set(url.clone());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .thread_name(CLIENT_THREAD)
        // Idle blocking threads stay: an exiting thread takes its CPU time out of the per-thread sums.
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("muster-bench: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(&cli));
    // Sessions and daemons still running are cancelled with the runtime.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(v) => {
            // `compare` prints its table on stderr: JSON here.
            util::print(&v, cli.json || matches!(cli.mode, Mode::Compare(_)));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("muster-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: &Cli) -> anyhow::Result<serde_json::Value> {
    let tmp = tempfile::Builder::new().prefix("muster-bench-").tempdir()?;
    let root = tmp.path().to_path_buf();
    if cli.keep {
        eprintln!("muster-bench: working in {}", root.display());
    }
    let result = tokio::select! {
        r = async {
            if let Mode::Floor(a) = &cli.mode {
                let floor = floor::measure(&root.join("floor"), Duration::from_millis(a.ms)).await?;
                return Ok(serde_json::json!({ "mode": "floor", "floor": floor }));
            }
            let bin = match &cli.mode {
                Mode::Workspace(_) => PathBuf::new(),
                _ => hub::hub_binary(cli.hub_bin.clone())?,
            };
            // The floor first, on a machine with nothing of ours running yet
            // (`compare` takes its own before each of its runs).
            let floor = match (&cli.floor, cli.floor_ms, &cli.mode) {
                (_, _, Mode::Compare(_)) => None,
                (Some(path), _, _) => Some(floor::load(path)?),
                (None, 0, _) => None,
                (None, ms, _) => Some(floor::measure(&root.join("floor"), Duration::from_millis(ms)).await?),
            };
            let mut v = match &cli.mode {
                Mode::Throughput(a) => modes::throughput(&bin, &root, a).await,
                Mode::Latency(a) => modes::latency(&bin, &root, a).await,
                Mode::Scale(a) => scale::scale(&bin, &root, a).await,
                Mode::Backlog(a) => modes::backlog(&bin, &root, a).await,
                Mode::Workspace(a) => workspace::workspace(&root, a).await,
                Mode::Logs(a) => modes::logs(&bin, &root, a).await,
                Mode::Dashboard(a) => dashboard::dashboard(&bin, &root, a).await,
                Mode::Failover(a) => failover::failover(&bin, &root, a).await,
                Mode::Compare(a) => compare::compare(&bin, &root, a, cli.floor_ms).await,
                Mode::Floor(_) => unreachable!("handled above"),
            }?;
            if let Some(f) = floor {
                v["ratios"] = floor::ratios(&v, &f);
                v["floor"] = f;
            }
            anyhow::Ok(v)
        } => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    // The hub child is killed on drop (kill_on_drop); the directory goes with `tmp`.
    if cli.keep {
        let _ = tmp.keep();
    }
    let mut v = result?;
    v["machine"] = machine();
    v["store"] = serde_json::json!(match cli.store {
        BenchStore::Redb => "redb",
        BenchStore::Postgres => "postgres",
    });
    Ok(v)
}

/// The machine the figures come from.
fn machine() -> serde_json::Value {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    serde_json::json!({ "cpus": cpus, "cpu_model": model })
}
