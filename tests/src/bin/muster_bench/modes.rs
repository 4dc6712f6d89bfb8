//! The `throughput`, `latency` and `backlog` modes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use muster_protocol::msg::{OpRequest, OpResponse, Open, OpenBody};
use muster_protocol::{PROTOCOL_VERSION, TaskId};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::fleet::{self, Agent, Fleet, Identity};
use crate::hub::{HubProc, Ops, Stop};
use crate::util::{ms, num, phase, round3, submit, submit_batch, summary};

/// How long the hub may take to answer after `serve` starts.
const HUB_READY: Duration = Duration::from_secs(60);

/// Closes the operator connections (and with them any `watch` stream), then
/// makes the hub log one event: a hub-side watch task whose client is gone
/// only notices when it next sends, and until then keeps a SIGTERM shutdown
/// from finishing.
async fn close(ops: Arc<Ops>, hub: &HubProc) {
    match Arc::try_unwrap(ops) {
        Ok(o) => o.close().await,
        Err(shared) => {
            for c in shared.conns() {
                c.close(0u32.into(), b"bye");
            }
        }
    }
    if let Ok(o) = hub.ops(1).await {
        let _ = o
            .call(OpRequest::TokenCreate {
                role: muster_protocol::msg::Role::Agent,
                ttl_s: 1,
                name: None,
                capabilities: None,
                slots: None,
            })
            .await;
        o.close().await;
    }
}

// === throughput ===

/// `throughput` options.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ThroughputArgs {
    /// Sidecars (full daemons in this process, each with its own redb).
    #[arg(long, default_value_t = 64)]
    pub(crate) sidecars: usize,
    /// Tasks to run.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) tasks: usize,
    /// The runner.
    #[arg(long, value_enum, default_value = "instant")]
    pub(crate) agent: Agent,
    /// Slots per sidecar.
    #[arg(long, default_value_t = 16)]
    pub(crate) slots: u32,
    /// Tasks submitted and not yet answered, at most.
    #[arg(long, default_value_t = 1024)]
    pub(crate) window: usize,
    /// Tasks per submit request (`SubmitBatch`); 1 submits each on its own stream.
    #[arg(long, default_value_t = 64)]
    pub(crate) batch: usize,
    /// Operator connections the submissions share (the hub allows 64 streams on each).
    #[arg(long, default_value_t = 16)]
    pub(crate) connections: usize,
}

/// What one pass of tasks measured.
struct Pass {
    tasks: usize,
    elapsed: Duration,
    submit_elapsed: Duration,
    submit_ack_ms: Vec<f64>,
    ids: Vec<u64>,
}

/// Submits `n` tasks, `batch` per request, with at most `window` tasks in
/// flight, and waits until the hub counts them finished.
async fn run_pass(
    ops: &Arc<Ops>,
    n: usize,
    window: usize,
    batch: usize,
    limit: Duration,
) -> Result<Pass> {
    let base = num(&ops.stats().await?, "finished") as u64;
    let batch = batch.clamp(1, muster_protocol::limits::SUBMIT_BATCH_MAX);
    let sem = Arc::new(tokio::sync::Semaphore::new(window.max(batch)));
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for first in (0..n).step_by(batch) {
        let count = batch.min(n - first);
        let permit = sem.clone().acquire_many_owned(count as u32).await?;
        let ops = ops.clone();
        set.spawn(async move {
            let t = Instant::now();
            let titles: Vec<String> = (first..first + count)
                .map(|i| format!("bench task {i}"))
                .collect();
            // One task goes on its own stream, as `--batch 1` promises.
            let ids = match titles.as_slice() {
                [only] => submit(&ops, only.clone()).await.map(|id| vec![id]),
                _ => submit_batch(&ops, titles).await,
            };
            drop(permit);
            ids.map(|ids| (ids, ms(t.elapsed())))
        });
    }
    let mut ids = Vec::with_capacity(n);
    let mut acks = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        let (batch_ids, ack) = r??;
        // Every task of a batch is answered when the batch is.
        acks.extend(std::iter::repeat_n(ack, batch_ids.len()));
        ids.extend(batch_ids);
    }
    let submit_elapsed = started.elapsed();
    // The end: the hub counts all of them finished. Polled every 5 ms.
    let until = Instant::now() + limit;
    loop {
        let finished = num(&ops.stats().await?, "finished") as u64;
        if finished >= base + n as u64 {
            break;
        }
        if Instant::now() > until {
            bail!(
                "{} of {n} tasks finished within {} s",
                finished - base,
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(Pass {
        tasks: n,
        elapsed: started.elapsed(),
        submit_elapsed,
        submit_ack_ms: acks,
        ids,
    })
}

/// Reads every task's record back: (states by name, submit→running ms, submit→completed ms),
/// from the hub's own timestamps (millisecond resolution).
async fn hub_latencies(
    ops: &Arc<Ops>,
    ids: &[u64],
) -> Result<(HashMap<String, usize>, Vec<f64>, Vec<f64>)> {
    let docs: Vec<Result<Value>> = futures::stream::iter(ids.iter().copied())
        .map(|id| {
            let ops = ops.clone();
            async move { ops.call(OpRequest::TaskShow { id: TaskId(id) }).await }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut states: HashMap<String, usize> = HashMap::new();
    let (mut running, mut completed) = (Vec::new(), Vec::new());
    for d in docs {
        let d = d?;
        *states
            .entry(d["state"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
        let submitted = d["submitted_at"].as_f64().unwrap_or(0.0);
        if let Some(last) = d["attempt_history"].as_array().and_then(|a| a.last()) {
            if let Some(s) = last["started_at"].as_f64() {
                running.push(s - submitted);
            }
            if let Some(e) = last["ended_at"].as_f64() {
                completed.push(e - submitted);
            }
        }
    }
    Ok((states, running, completed))
}

/// CPU seconds (user + system) used so far, by component: the hub process and
/// its core thread, and this process (the bench) with its sidecar daemons
/// (the fleet's own runtime, threads named [`fleet::FLEET_THREAD`]) and its
/// client (the main thread and the bench runtime's threads, named
/// [`crate::CLIENT_THREAD`]).
///
/// The process totals (`/proc/<pid>/stat`) count every thread, exited ones
/// included; the per-thread sums (`/proc/<pid>/task/*/schedstat`, see
/// [`crate::hub::thread_cpu`]) only the threads running when sampled, so a thread that exits during a pass loses its time
/// from them. The hub's and the bench's figures are therefore the process
/// totals, and `hub_other` and `bench_other` are what the totals hold beyond
/// the named threads (the fleet's blocking threads are kept alive for an hour
/// so that they do not exit mid-pass). The process totals move in clock ticks
/// (10 ms), the thread sums in ns: an `*_other` within a tick of 0 may come
/// out slightly negative.
#[derive(Debug, Clone, Copy)]
struct CpuSplit {
    hub: f64,
    hub_core: f64,
    bench: f64,
    sidecars: f64,
    client: f64,
}

/// The name of the hub's core thread (`hub/src/server/mod.rs`).
const HUB_CORE_THREAD: &str = "muster-core";

impl CpuSplit {
    fn take(hub_pid: u32) -> Result<CpuSplit> {
        let me = std::process::id();
        let named = |pid: u32, pick: &dyn Fn(u32, &str) -> bool| -> Result<f64> {
            Ok(crate::hub::thread_cpu(pid)?
                .into_iter()
                .filter(|(tid, name, _)| pick(*tid, name))
                .map(|(_, _, cpu)| cpu)
                .sum())
        };
        Ok(CpuSplit {
            hub: crate::hub::cpu_seconds(hub_pid)?,
            hub_core: named(hub_pid, &|_, name| name == HUB_CORE_THREAD)?,
            bench: crate::hub::cpu_seconds(me)?,
            sidecars: named(me, &|_, name| name == fleet::FLEET_THREAD)?,
            client: named(me, &|tid, name| tid == me || name == crate::CLIENT_THREAD)?,
        })
    }

    /// CPU per task (µs) and in all (s) from `self` to `after`, over `tasks` and `secs`.
    fn delta(&self, after: &CpuSplit, tasks: f64, secs: f64) -> Value {
        let hub = after.hub - self.hub;
        let hub_core = after.hub_core - self.hub_core;
        let bench = after.bench - self.bench;
        let sidecars = after.sidecars - self.sidecars;
        let client = after.client - self.client;
        let parts = [
            ("hub_core", hub_core),
            ("hub_other", hub - hub_core),
            ("hub", hub),
            ("sidecars", sidecars),
            ("client", client),
            ("bench_other", bench - sidecars - client),
            ("bench", bench),
            ("total", hub + bench),
        ];
        let per_task: serde_json::Map<String, Value> = parts
            .iter()
            .map(|(k, s)| (k.to_string(), json!(round3(s * 1e6 / tasks.max(1.0)))))
            .collect();
        let total: serde_json::Map<String, Value> = parts
            .iter()
            .map(|(k, s)| (k.to_string(), json!(round3(*s))))
            .collect();
        json!({
            "cpu_per_task_us": per_task,
            "cpu_s": total,
            "cpu_busy_cores": round3((hub + bench) / secs),
        })
    }
}

/// Hub figures before and after a pass, turned into per-task and per-second rates.
struct Snapshot {
    stats: Value,
    cpu: f64,
    split: CpuSplit,
    /// The queue commits of every sidecar of this process: (flushed, unflushed).
    sidecar_commits: (u64, u64),
    at: Instant,
}

impl Snapshot {
    async fn take(hub: &HubProc, ops: &Ops) -> Result<Snapshot> {
        Ok(Snapshot {
            stats: ops.stats().await?,
            cpu: hub.cpu_seconds()?,
            split: CpuSplit::take(hub.pid()?)?,
            sidecar_commits: muster_sidecar::queue::commits_in_process(),
            at: Instant::now(),
        })
    }

    /// The sidecars' queue commits in the pass: flushed (`fdatasync`) and
    /// unflushed, in all and per task. Every sidecar of the bench runs in this
    /// process, so the process-wide count is theirs.
    fn sidecar_commits(&self, after: &Snapshot) -> Value {
        let tasks = (num(&after.stats, "finished") - num(&self.stats, "finished")).max(1.0);
        let flushed = after.sidecar_commits.0 - self.sidecar_commits.0;
        let unflushed = after.sidecar_commits.1 - self.sidecar_commits.1;
        json!({
            "flushed": flushed,
            "unflushed": unflushed,
            "flushed_per_task": round3(flushed as f64 / tasks),
            "unflushed_per_task": round3(unflushed as f64 / tasks),
        })
    }

    /// CPU per task by component (see [`CpuSplit`]).
    fn cpu(&self, after: &Snapshot) -> Value {
        let tasks = num(&after.stats, "finished") - num(&self.stats, "finished");
        self.split
            .delta(&after.split, tasks, (after.at - self.at).as_secs_f64())
    }

    fn delta(&self, after: &Snapshot) -> Value {
        let d = |k: &str| num(&after.stats, k) - num(&self.stats, k);
        let writes = |s: &Value| num(s, "mean_group_size") * num(s, "commits");
        let finished = d("finished").max(1.0);
        let commits = d("commits");
        let secs = (after.at - self.at).as_secs_f64();
        json!({
            "finished": d("finished"),
            "completed": d("completed"),
            "messages_per_task": round3(d("messages") / finished),
            "bytes_per_task": round3(d("bytes") / finished),
            "commits": commits,
            "commits_per_s": round3(commits / secs),
            "mean_group_size": round3((writes(&after.stats) - writes(&self.stats)) / commits.max(1.0)),
            "hub_mean_commit_ms_cumulative": round3(num(&after.stats, "mean_commit_ms")),
            "hub_cpu_s": round3(after.cpu - self.cpu),
            "hub_cpu_pct_of_one_core": round3((after.cpu - self.cpu) / secs * 100.0),
        })
    }
}

pub(crate) async fn throughput(bin: &Path, root: &Path, a: &ThroughputArgs) -> Result<Value> {
    if a.tasks == 0 || a.sidecars == 0 {
        bail!("--tasks and --sidecars must be at least 1");
    }
    let n = a.tasks;
    let mut hub = HubProc::init(bin, &root.join("hub"), |c| {
        c.limits.max_queued_tasks = c.limits.max_queued_tasks.max(n as u64);
        c.limits.max_tasks_per_submitter = c.limits.max_tasks_per_submitter.max(n as u64);
        // One report per task: a sidecar with many slots of an instant agent
        // sends far more than the default's 2,000 a second, which is there to
        // stop a flooding peer, not a fleet this fast.
        c.limits.messages_per_second = c.limits.messages_per_second.max(1_000_000);
    })
    .await?;
    let ready = phase("hub start", HUB_READY, hub.start(HUB_READY)).await?;
    let ops = Arc::new(hub.ops(a.connections).await?);
    // The daemons on a runtime of their own, to tell their CPU time from the client's.
    let mut fleet = Fleet::on_own_runtime()?;
    let fleet_limit = Duration::from_secs(60) + Duration::from_millis(200) * a.sidecars as u32;
    let t = Instant::now();
    phase("enroll and start sidecars", fleet_limit, async {
        fleet::start_fleet(
            &ops,
            &mut fleet,
            &hub.addr,
            &root.join("sidecars"),
            a.sidecars,
            a.slots,
            a.agent,
        )
        .await?;
        fleet::wait_available(&ops, &fleet, a.sidecars, fleet_limit).await
    })
    .await?;
    let fleet_ready = t.elapsed();
    let before = Snapshot::take(&hub, &ops).await?;
    // At least 200 tasks/s, or fail.
    let limit = Duration::from_secs(60) + Duration::from_millis(5) * n as u32;
    let pass = phase(
        "run tasks",
        limit,
        run_pass(&ops, n, a.window, a.batch, limit),
    )
    .await?;
    let after = Snapshot::take(&hub, &ops).await?;
    let peak_rss = hub.mem_kib("VmHWM")?;
    let rss = hub.mem_kib("VmRSS")?;
    let (states, running, completed) = phase(
        "read task records",
        Duration::from_secs(60) + Duration::from_millis(5) * n as u32,
        hub_latencies(&ops, &pass.ids),
    )
    .await?;
    fleet.shutdown().await?;
    close(ops, &hub).await;
    hub.stop(Stop::Term).await?;
    let done = states.get("completed").copied().unwrap_or(0);
    if done != n {
        bail!("only {done} of {n} tasks completed: {states:?}");
    }
    let cpu = before.cpu(&after);
    Ok(json!({
        "sidecar_commits": before.sidecar_commits(&after),
        "cpu_per_task_us": cpu["cpu_per_task_us"],
        "cpu_s": cpu["cpu_s"],
        "cpu_busy_cores": cpu["cpu_busy_cores"],
        "cpu_source": "hub and bench: process utime+stime (/proc/<pid>/stat); named threads: /proc/<pid>/task/*/schedstat; hub_core the hub's muster-core thread, sidecars the fleet runtime's muster-fleet threads, client the bench's main thread and muster-client threads; *_other = process total − named threads",
        "mode": "throughput",
        "agent": a.agent.as_str(),
        "sidecars": a.sidecars,
        "slots": a.slots,
        "tasks": pass.tasks,
        "batch": a.batch,
        "completed": done,
        "task_states": states,
        "elapsed_s": round3(pass.elapsed.as_secs_f64()),
        "tasks_per_s": round3(n as f64 / pass.elapsed.as_secs_f64()),
        "submit_elapsed_s": round3(pass.submit_elapsed.as_secs_f64()),
        "submit_ack": summary(pass.submit_ack_ms),
        "submit_to_running": summary(running),
        "submit_to_completed": summary(completed),
        "latency_source": "hub task records (submitted_at, attempt started_at/ended_at), 1 ms resolution",
        "hub": before.delta(&after),
        "hub_peak_rss_kib": peak_rss,
        "hub_rss_kib": rss,
        "hub_ready_s": round3(ready.as_secs_f64()),
        "fleet_ready_s": round3(fleet_ready.as_secs_f64()),
    }))
}

// === latency ===

/// `latency` options.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct LatencyArgs {
    /// Tasks, one at a time.
    #[arg(long, default_value_t = 200)]
    pub(crate) tasks: usize,
    /// Untimed tasks first.
    #[arg(long, default_value_t = 10)]
    pub(crate) warmup: usize,
    /// The runner.
    #[arg(long, value_enum, default_value = "exec")]
    pub(crate) agent: Agent,
    /// Also break submit → running down into its steps, from latency points the
    /// hub and the sidecar log (`muster::latency` at debug level) with wall-clock
    /// microseconds; the points cost a little time themselves.
    #[arg(long)]
    pub(crate) breakdown: bool,
}

/// A `watch` stream: (task id, state, when seen) for every task event.
async fn watch(ops: &Ops) -> Result<mpsc::UnboundedReceiver<(u64, String, Instant)>> {
    let (send, recv) = ops.conn().open_bi().await?;
    let (mut wr, mut rd) =
        muster_protocol::framed(send, recv, muster_protocol::limits::FRAME_BYTES_MAX);
    let open = Open {
        protocol: PROTOCOL_VERSION,
        body: OpenBody::Request(OpRequest::Watch { from: None }),
    };
    wr.send(&open).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _wr = wr;
        while let Ok(Some(resp)) = rd.recv::<OpResponse>().await {
            let at = Instant::now();
            if let OpResponse::Event { json, .. } = resp {
                let Ok(v) = serde_json::from_str::<Value>(&json) else {
                    continue;
                };
                if v["kind"] == "task"
                    && let (Some(id), Some(state)) = (v["id"].as_u64(), v["state"].as_str())
                    && tx.send((id, state.to_string(), at)).is_err()
                {
                    return;
                }
            }
        }
    });
    Ok(rx)
}

/// Client-side latencies of tasks run one at a time: submit sent → `running`
/// and → `completed` events seen on `watch`, and the submit reply.
struct Sequential {
    ack: Vec<f64>,
    running: Vec<f64>,
    completed: Vec<f64>,
    first_id: u64,
    /// Per timed task: wall-clock µs of the submit sent and of `running` seen.
    wall: Vec<(u64, u64, u64)>,
}

async fn sequential(ops: &Ops, n: usize, warmup: usize) -> Result<Sequential> {
    let mut events = watch(ops).await?;
    // Let the watch register before the first submit.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut seen: HashMap<u64, (Option<Instant>, Option<Instant>)> = HashMap::new();
    let mut out = Sequential {
        ack: Vec::new(),
        running: Vec::new(),
        completed: Vec::new(),
        first_id: 0,
        wall: Vec::new(),
    };
    for i in 0..warmup + n {
        let t0 = Instant::now();
        let t0_us = muster_protocol::wall_us();
        let id = submit(ops, format!("latency task {i}")).await?;
        let ack = t0.elapsed();
        if i == warmup {
            out.first_id = id;
        }
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((r, Some(c))) = seen.get(&id).copied() {
                if i >= warmup {
                    out.ack.push(ms(ack));
                    // An instant run may go running → completed in one commit: same instant.
                    out.running.push(ms(r.unwrap_or(c) - t0));
                    out.completed.push(ms(c - t0));
                    let seen_us = t0_us + (r.unwrap_or(c) - t0).as_micros() as u64;
                    out.wall.push((id, t0_us, seen_us));
                }
                seen.remove(&id);
                break;
            }
            let ev = tokio::time::timeout_at(until, events.recv())
                .await
                .map_err(|_| anyhow!("task {id} did not complete within 30 s"))?
                .ok_or_else(|| anyhow!("the watch stream ended"))?;
            let (eid, state, at) = ev;
            let e = seen.entry(eid).or_default();
            match state.as_str() {
                "running" => e.0 = Some(at),
                "completed" => e.1 = Some(at),
                "failed" | "cancelled" => bail!("task {eid} ended {state}"),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// One hub, one sidecar; returns (hub, ops, fleet, identity, sidecar dir).
async fn single(
    bin: &Path,
    root: &Path,
    agent: Agent,
    tweak: impl FnOnce(&mut muster_hub::config::HubConfig),
) -> Result<(HubProc, Arc<Ops>, Fleet, Identity, PathBuf)> {
    let hub = HubProc::init(bin, &root.join("hub"), tweak).await?;
    start_single(hub, root, agent).await
}

/// Starts `hub` and one sidecar beside it (see [`single`]).
async fn start_single(
    mut hub: HubProc,
    root: &Path,
    agent: Agent,
) -> Result<(HubProc, Arc<Ops>, Fleet, Identity, PathBuf)> {
    phase("hub start", HUB_READY, hub.start(HUB_READY)).await?;
    let ops = Arc::new(hub.ops(1).await?);
    let id = fleet::enroll(&ops, "bench-0").await?;
    let dir = root.join("sidecar");
    let mut fleet = Fleet::new();
    fleet.spawn(&id, &hub.addr, dir.clone(), 1, agent)?;
    phase(
        "sidecar online",
        Duration::from_secs(60),
        fleet::wait_available(&ops, &fleet, 1, Duration::from_secs(60)),
    )
    .await?;
    Ok((hub, ops, fleet, id, dir))
}

pub(crate) async fn latency(bin: &Path, root: &Path, a: &LatencyArgs) -> Result<Value> {
    let points = root.join("latency-points.jsonl");
    if a.breakdown {
        trace_latency_to(&points)?;
    }
    let (mut hub, ops, fleet, _, _) = if a.breakdown {
        single_traced(bin, root, a.agent).await?
    } else {
        single(bin, root, a.agent, |_| {}).await?
    };
    let before = Snapshot::take(&hub, &ops).await?;
    let limit = Duration::from_secs(60) + Duration::from_millis(100) * (a.tasks + a.warmup) as u32;
    let s = phase("run tasks", limit, sequential(&ops, a.tasks, a.warmup)).await?;
    let after = Snapshot::take(&hub, &ops).await?;
    fleet.shutdown().await?;
    close(ops, &hub).await;
    hub.stop(Stop::Term).await?;
    let breakdown = if a.breakdown {
        breakdown(&[hub.log_path(), &points], &s.wall)?
    } else {
        Value::Null
    };
    Ok(json!({
        "breakdown": breakdown,
        "mode": "latency",
        "agent": a.agent.as_str(),
        "tasks": a.tasks,
        "completed": s.completed.len(),
        "warmup": a.warmup,
        "submit_ack": summary(s.ack),
        "submit_to_running": summary(s.running),
        "submit_to_completed": summary(s.completed),
        "latency_source": "client: submit sent -> event seen on a watch stream",
        "hub": before.delta(&after),
    }))
}

/// [`single`] with the hub logging its latency points.
async fn single_traced(
    bin: &Path,
    root: &Path,
    agent: Agent,
) -> Result<(HubProc, Arc<Ops>, Fleet, Identity, PathBuf)> {
    let mut hub = HubProc::init(bin, &root.join("hub"), |_| {}).await?;
    hub.trace_latency = true;
    start_single(hub, root, agent).await
}

/// Writes this process's latency points (the in-process sidecars') as JSON lines to `path`.
fn trace_latency_to(path: &Path) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| path.display().to_string())?;
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
            "off,{}=debug",
            muster_protocol::LATENCY_TARGET
        )))
        .with_writer(std::sync::Mutex::new(file))
        .try_init()
        .map_err(|e| anyhow!("cannot install the latency trace: {e}"))
}

/// The steps of submit → running, each from one latency point to the next, in order.
const STEPS: [(&str, &str, &str); 8] = [
    (
        "client to the hub's commit of the submission",
        "client_submit",
        "hub_commit:first",
    ),
    (
        "hub: commit to Assign released",
        "hub_commit:first",
        "hub_assign_out",
    ),
    (
        "Assign: hub to the sidecar's loop",
        "hub_assign_out",
        "sc_assign_in",
    ),
    (
        "sidecar: assignment to run spawned",
        "sc_assign_in",
        "sc_spawned",
    ),
    (
        "sidecar: spawned to Started sent (its commit)",
        "sc_spawned",
        "sc_report_out:Started",
    ),
    (
        "Started: sidecar to the hub's loop",
        "sc_report_out:Started",
        "hub_report_in:Started",
    ),
    (
        "hub: Started to its commit",
        "hub_report_in:Started",
        "hub_commit:started",
    ),
    (
        "hub commit to the client's watch event",
        "hub_commit:started",
        "client_running",
    ),
];

/// Reads the latency points from the JSON-lines `logs` and the client's own times,
/// and returns the median (and p99) of each step in [`STEPS`] over the timed tasks.
fn breakdown(logs: &[&Path], client: &[(u64, u64, u64)]) -> Result<Value> {
    let mut at: HashMap<(u64, String), u64> = HashMap::new();
    let mut commits: HashMap<u64, Vec<u64>> = HashMap::new();
    for log in logs {
        let text = std::fs::read_to_string(log).with_context(|| log.display().to_string())?;
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if v["target"] != muster_protocol::LATENCY_TARGET {
                continue;
            }
            let f = &v["fields"];
            let (Some(task), Some(point), Some(us)) =
                (f["task"].as_u64(), f["point"].as_str(), f["at_us"].as_u64())
            else {
                continue;
            };
            let key = match (f["kind"].as_str(), f["state"].as_str()) {
                (Some(k), _) => format!("{point}:{k}"),
                (_, Some(s)) => format!("{point}:{s}"),
                _ => point.to_string(),
            };
            // The first commit of a task is its submission's (written once, in its final state).
            if point == "hub_commit" {
                at.entry((task, "hub_commit:first".into())).or_insert(us);
                commits.entry(task).or_default().push(us);
            }
            at.entry((task, key)).or_insert(us);
        }
    }
    for (id, sent, seen) in client {
        at.insert((*id, "client_submit".into()), *sent);
        at.insert((*id, "client_running".into()), *seen);
        // The commit that made it running: the first after Started arrived (an instant
        // run may be written once, already completed, in that commit).
        let started = at.get(&(*id, "hub_report_in:Started".to_string())).copied();
        if let (Some(s), Some(c)) = (started, commits.get(id))
            && let Some(first) = c.iter().filter(|t| **t >= s).min()
        {
            at.insert((*id, "hub_commit:started".into()), *first);
        }
    }
    let mut steps = Vec::new();
    let mut total_p50 = 0.0;
    let mut total_mean = 0.0;
    for (label, from, to) in STEPS {
        let ms: Vec<f64> = client
            .iter()
            .filter_map(|(id, _, _)| {
                let a = at.get(&(*id, from.to_string()))?;
                let b = at.get(&(*id, to.to_string()))?;
                Some(b.saturating_sub(*a) as f64 / 1000.0)
            })
            .collect();
        let s = summary(ms);
        total_p50 += s["p50_ms"].as_f64().unwrap_or(0.0);
        total_mean += s["mean_ms"].as_f64().unwrap_or(0.0);
        steps.push(json!({ "step": label, "from": from, "to": to, "ms": s }));
    }
    Ok(json!({
        "steps": steps,
        "sum_of_p50_ms": round3(total_p50),
        // Means add up to the mean end to end; medians of the steps need not.
        "sum_of_means_ms": round3(total_mean),
        "source": "wall-clock µs latency points (hub log, in-process sidecar trace) and the client's own times; one machine, one clock",
    }))
}

// === backlog ===

/// `backlog` options.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BacklogArgs {
    /// Finished tasks to put in the store.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) finished: u64,
    /// Tasks timed, one at a time, on the empty and on the full store.
    #[arg(long, default_value_t = 200)]
    pub(crate) sample: usize,
    /// Untimed tasks before each sample.
    #[arg(long, default_value_t = 10)]
    pub(crate) warmup: usize,
    /// The runner for the timed tasks.
    #[arg(long, value_enum, default_value = "instant")]
    pub(crate) agent: Agent,
}

/// Writes `m` finished tasks straight into the stopped hub's redb, each a copy
/// (new id, new title) of the newest completed task with its attempts, through
/// the hub's own `Store::commit`, 20,000 tasks per transaction.
fn fill_store(hub_dir: &Path, m: u64) -> Result<(u64, u64)> {
    use muster_hub::core::{TaskState, Write};
    use muster_hub::store::{DB_FILE, Store};
    let store = Store::open(&hub_dir.join(DB_FILE))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let next = store.restore(now)?.next_task_id;
    let (template, attempts) = {
        let reader = store.reader()?;
        let page = reader.tasks(Some(TaskState::Completed), None, None, 1, None)?;
        let t = page
            .tasks
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no completed task to copy"))?;
        let a = reader.attempts(t.id)?;
        (t, a)
    };
    let mut id = next;
    let end = next + m;
    while id < end {
        let stop = (id + 20_000).min(end);
        let mut writes = Vec::with_capacity(((stop - id) * 2 + 1) as usize);
        for i in id..stop {
            let mut t = template.clone();
            t.id = TaskId(i);
            t.title = format!("backlog task {i}");
            writes.push(Write::Task(t));
            for a in &attempts {
                let mut a = a.clone();
                a.task = TaskId(i);
                writes.push(Write::Attempt(a));
            }
        }
        writes.push(Write::NextTaskId(stop));
        store.commit(&writes, u64::MAX)?;
        id = stop;
    }
    Ok((next, end - 1))
}

pub(crate) async fn backlog(bin: &Path, root: &Path, a: &BacklogArgs) -> Result<Value> {
    let (mut hub, ops, fleet, id, dir) = single(bin, root, a.agent, |_| {}).await?;
    let limit = Duration::from_secs(60) + Duration::from_millis(100) * (a.sample + a.warmup) as u32;
    let empty = phase(
        "sample on the empty store",
        limit,
        sequential(&ops, a.sample, a.warmup),
    )
    .await?;
    fleet.shutdown().await?;
    close(ops, &hub).await;
    hub.stop(Stop::Term).await?;
    let ready_empty = phase("hub restart (empty)", HUB_READY, hub.start(HUB_READY)).await?;
    hub.stop(Stop::Term).await?;
    let t = Instant::now();
    let hub_dir = hub.dir.clone();
    let m = a.finished;
    let fill_limit = Duration::from_secs(120) + Duration::from_millis(1) * m as u32;
    let (first, last) = phase("fill the store", fill_limit, async move {
        tokio::task::spawn_blocking(move || fill_store(&hub_dir, m))
            .await
            .context("fill task")?
    })
    .await?;
    let fill = t.elapsed();
    let db_bytes = std::fs::metadata(hub.dir.join(muster_hub::store::DB_FILE))?.len();
    let ready_full = phase("hub restart (full)", HUB_READY, hub.start(HUB_READY)).await?;
    let ops = Arc::new(hub.ops(1).await?);
    let mut fleet = Fleet::new();
    fleet.spawn(&id, &hub.addr, dir, 1, a.agent)?;
    phase(
        "sidecar online again",
        Duration::from_secs(60),
        fleet::wait_available(&ops, &fleet, 1, Duration::from_secs(60)),
    )
    .await?;
    let full = phase(
        "sample on the full store",
        limit,
        sequential(&ops, a.sample, a.warmup),
    )
    .await?;
    if full.first_id <= last {
        bail!(
            "the hub handed out task id {} after the fill up to {last}: the fill was not seen",
            full.first_id
        );
    }
    let ratio = |f: &Value, e: &Value, k: &str| {
        round3(f[k].as_f64().unwrap_or(0.0) / e[k].as_f64().unwrap_or(1.0).max(1e-9))
    };
    let (e_run, f_run) = (summary(empty.running), summary(full.running));
    let completed = empty.completed.len() + full.completed.len();
    let (e_done, f_done) = (summary(empty.completed), summary(full.completed));
    fleet.shutdown().await?;
    close(ops, &hub).await;
    hub.stop(Stop::Term).await?;
    Ok(json!({
        "mode": "backlog",
        "agent": a.agent.as_str(),
        "finished": m,
        "filled_ids": [first, last],
        "fill_method": "direct: copies of a real completed task and its attempts written with the hub's Store::commit while the hub is stopped, 20,000 per transaction",
        "fill_s": round3(fill.as_secs_f64()),
        "db_bytes": db_bytes,
        "sample": a.sample,
        "completed": completed,
        "empty": { "submit_to_running": e_run, "submit_to_completed": e_done, "ready_s": round3(ready_empty.as_secs_f64()) },
        "full": { "submit_to_running": f_run, "submit_to_completed": f_done, "ready_s": round3(ready_full.as_secs_f64()) },
        "ratio_running_p50": ratio(&f_run, &e_run, "p50_ms"),
        "ratio_running_p99": ratio(&f_run, &e_run, "p99_ms"),
        "ratio_completed_p50": ratio(&f_done, &e_done, "p50_ms"),
    }))
}

// === logs ===

/// `logs` options.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct LogsArgs {
    /// Megabytes (10^6 bytes) the agent writes to its stdout as fast as it can.
    #[arg(long, default_value_t = 200)]
    pub(crate) mb: u64,
    /// The follower counts to run, one attempt each, in this order (0 is the baseline).
    #[arg(long, value_delimiter = ',', default_value = "0,1,10")]
    pub(crate) followers: Vec<usize>,
    /// Attempts per follower count; the agent's time is their median.
    #[arg(long, default_value_t = 3)]
    pub(crate) repeat: usize,
}

/// A task reading the hub's RSS (KiB) every 50 ms until `stop` is set.
struct RssSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<f64>>,
}

fn rss_sampler(pid: u32) -> RssSampler {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let until = Arc::clone(&stop);
    let task = tokio::spawn(async move {
        let mut v = Vec::new();
        // Bounded: one sample per 50 ms of a run that phases bound to 10 minutes.
        while !until.load(std::sync::atomic::Ordering::Relaxed) && v.len() < 20_000 {
            match crate::hub::mem_kib(pid, "VmRSS") {
                Ok(k) => v.push(k as f64),
                Err(_) => break,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        v
    });
    RssSampler { stop, task }
}

/// The largest sample in each tenth of `samples` (fewer when there are fewer):
/// memory over the course of one run, to show whether it grows.
fn deciles_max(samples: &[f64]) -> Vec<f64> {
    let parts = samples.len().min(10);
    (0..parts)
        .map(|i| {
            let (a, b) = (i * samples.len() / parts, (i + 1) * samples.len() / parts);
            samples[a..b].iter().copied().fold(0.0, f64::max)
        })
        .collect()
}

/// One follower: `task logs --follow` on its own operator connection; the
/// bytes it received and when the last arrived.
async fn follow(ops: Arc<Ops>, i: usize, task: u64) -> Result<(u64, Instant)> {
    use muster_protocol::msg::{LogQuery, LogStream};
    let conn = ops
        .conns()
        .nth(i % ops.conns().count())
        .context("a connection")?;
    let (send, recv) = conn.open_bi().await?;
    let (mut wr, mut rd) =
        muster_protocol::framed(send, recv, muster_protocol::limits::FRAME_BYTES_MAX);
    let open = Open {
        protocol: PROTOCOL_VERSION,
        body: OpenBody::Request(OpRequest::TaskLogs(LogQuery {
            task: TaskId(task),
            generation: None,
            stream: LogStream::Stdout,
            tail: None,
            follow: true,
        })),
    };
    wr.send(&open).await?;
    let mut bytes = 0u64;
    loop {
        match rd.recv::<OpResponse>().await? {
            Some(OpResponse::LogChunk { data }) => bytes += data.len() as u64,
            Some(OpResponse::Ok { .. }) => return Ok((bytes, Instant::now())),
            Some(OpResponse::Error(e)) => bail!("follower {i}: {}", e.message),
            Some(OpResponse::Event { .. }) => {}
            None => bail!("follower {i}: the stream ended without its end"),
        }
    }
}

/// The agent writes `mb` MB to stdout with `dd` and records its own wall time
/// (in ns) in `<times>/<task>`.
fn writer_script(path: &Path, times: &Path, mb: u64) -> Result<()> {
    let body = format!(
        "#!/bin/sh\ns=$(date +%s%N)\ndd if=/dev/zero bs=1000000 count={mb} status=none\ne=$(date +%s%N)\necho $((e - s)) > '{}'/\"$MUSTER_TASK_ID\"\n",
        times.display()
    );
    std::fs::write(path, body)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The same write without muster: `dd` to a file in the same directory tree.
fn direct_write_s(dir: &Path, mb: u64) -> Result<f64> {
    let out = dir.join("direct.out");
    let started = Instant::now();
    let status = std::process::Command::new("dd")
        .args([
            "if=/dev/zero",
            "bs=1000000",
            &format!("count={mb}"),
            "status=none",
        ])
        .arg(format!("of={}", out.display()))
        .status()?;
    let s = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&out);
    if !status.success() {
        bail!("dd failed: {status}");
    }
    Ok(s)
}

pub(crate) async fn logs(bin: &Path, root: &Path, a: &LogsArgs) -> Result<Value> {
    let times = root.join("agent-times");
    std::fs::create_dir_all(&times)?;
    let script = root.join("writer.sh");
    writer_script(&script, &times, a.mb)?;
    let mut hub = HubProc::init(bin, &root.join("hub"), |_| {}).await?;
    phase("hub start", HUB_READY, hub.start(HUB_READY)).await?;
    let most = a.followers.iter().copied().max().unwrap_or(0);
    let ops = Arc::new(hub.ops(most.max(1)).await?);
    let id = fleet::enroll(&ops, "bench-0").await?;
    let dir = root.join("sidecar");
    let mut fleet = Fleet::new();
    let command = vec![script.to_string_lossy().into_owned()];
    fleet.spawn_with(&id, &hub.addr, dir.clone(), 1, Agent::Exec, |c| {
        c.agent.command = command;
        // All of it kept: the followers read every byte.
        c.logs.max_bytes_per_attempt = 1 << 40;
        c.logs.max_disk = 1 << 40;
    })?;
    phase(
        "sidecar online",
        Duration::from_secs(60),
        fleet::wait_available(&ops, &fleet, 1, Duration::from_secs(60)),
    )
    .await?;
    let direct_s = direct_write_s(root, a.mb)?;
    let total = a.mb * 1_000_000;
    let mut runs = serde_json::Map::new();
    let rss_idle = hub.mem_kib("VmRSS")?;
    for &n in &a.followers {
        let mut agent_runs = Vec::new();
        let mut rates = Vec::new();
        let mut rss = Vec::new();
        let mut rss_series = Vec::new();
        for _ in 0..a.repeat.max(1) {
            let task = submit(&ops, format!("write {} MB, {n} followers", a.mb)).await?;
            // Followers attach once the attempt exists (its generation is known).
            phase("attempt assigned", Duration::from_secs(60), async {
                loop {
                    let v = ops.call(OpRequest::TaskShow { id: TaskId(task) }).await?;
                    if v["generation"].as_u64().unwrap_or(0) > 0 {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await?;
            let started = Instant::now();
            // Hub memory, sampled every 50 ms from the start of the attempt until
            // the last follower read its last byte (the relay outlasts the write).
            let sampler = rss_sampler(hub.pid()?);
            let followers: Vec<_> = (0..n)
                .map(|i| tokio::spawn(follow(Arc::clone(&ops), i, task)))
                .collect();
            phase("attempt completes", Duration::from_secs(600), async {
                loop {
                    let v = ops.call(OpRequest::TaskShow { id: TaskId(task) }).await?;
                    match v["state"].as_str() {
                        Some("completed") => return Ok(()),
                        Some("failed" | "cancelled") => {
                            bail!("the writer task ended {}", v["state"])
                        }
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
            .await?;
            for f in followers {
                let (bytes, done) = phase("followers end", Duration::from_secs(600), async {
                    f.await.map_err(|e| anyhow!("a follower panicked: {e}"))?
                })
                .await?;
                if bytes != total {
                    bail!("a follower received {bytes} bytes of {total}");
                }
                rates.push(bytes as f64 / 1e6 / done.duration_since(started).as_secs_f64());
            }
            sampler
                .stop
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let samples = sampler
                .task
                .await
                .map_err(|e| anyhow!("the RSS sampler panicked: {e}"))?;
            if samples.is_empty() {
                bail!("no hub RSS sample");
            }
            rss_series.push(deciles_max(&samples));
            rss.extend(samples);
            rss.push(hub.mem_kib("VmRSS")? as f64);
            let agent_ns: f64 = std::fs::read_to_string(times.join(task.to_string()))
                .context("the writer's own time")?
                .trim()
                .parse()?;
            agent_runs.push(agent_ns / 1e9);
        }
        agent_runs.sort_by(f64::total_cmp);
        let agent_s = agent_runs[agent_runs.len() / 2];
        let rss_max = rss.iter().copied().fold(0.0, f64::max);
        runs.insert(
            format!("followers_{n}"),
            json!({
                "followers": n,
                "agent_s": round3(agent_s),
                "agent_s_each": agent_runs.iter().map(|s| round3(*s)).collect::<Vec<_>>(),
                "agent_mb_per_s": round3(a.mb as f64 / agent_s),
                "follower_mb_per_s": if rates.is_empty() { Value::Null } else { summary(rates) },
                "hub_rss_kib": summary(rss),
                "hub_rss_growth_kib": rss_max - rss_idle as f64,
                "hub_rss_kib_by_tenth_of_each_run": rss_series,
            }),
        );
    }
    fleet.shutdown().await?;
    close(ops, &hub).await;
    hub.stop(Stop::Term).await?;
    let base = runs.get("followers_0").and_then(|r| r["agent_s"].as_f64());
    for r in runs.values_mut() {
        if let (Some(b), Some(s)) = (base, r["agent_s"].as_f64()) {
            r["agent_slowdown_pct"] = round3((s / b - 1.0) * 100.0).into();
        }
    }
    Ok(json!({
        "mode": "logs",
        "mb": a.mb,
        "direct_write_s": round3(direct_s),
        "hub_rss_idle_kib": rss_idle,
        "runs": runs,
        "agent_source": "the agent's own wall time around `dd if=/dev/zero bs=1000000 count=MB` to its stdout file",
        "follower_source": "bytes received ÷ time from the followers' start to their end frame",
    }))
}
