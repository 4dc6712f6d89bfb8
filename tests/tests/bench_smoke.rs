//! Smoke runs of every `muster-bench` mode at a tiny size: the JSON has every
//! field and every task completed (or every session came back), and the
//! ratios to the machine's floor (a short floor pass of 200 ms each). Speed is
//! not checked here; BENCHMARKS.md has the figures.

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// One bench at a time: each starts a hub and sidecars on a small machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
/// A smoke run taking longer than this has hung.
const RUN_LIMIT: Duration = Duration::from_secs(300);

fn bench(args: &[&str]) -> Value {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut child = Command::new(env!("CARGO_BIN_EXE_muster-bench"))
        .args(args)
        .args(["--json", "--floor-ms", "200"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("muster-bench starts");
    let started = Instant::now();
    while child
        .try_wait()
        .expect("waiting for muster-bench")
        .is_none()
    {
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let out = child.wait_with_output().expect("muster-bench output");
            panic!(
                "muster-bench {args:?} ran longer than {} s; stderr:\n{}",
                RUN_LIMIT.as_secs(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("muster-bench output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "muster-bench {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "muster-bench {args:?} must print one JSON object, printed:\n{stdout}"
    );
    serde_json::from_str(lines[0])
        .unwrap_or_else(|e| panic!("muster-bench {args:?} printed no JSON ({e}):\n{stdout}"))
}

/// The value at a dotted path; fails unless it is present and not null.
fn field<'a>(v: &'a Value, path: &str) -> &'a Value {
    let x = path.split('.').fold(v, |x, k| &x[k]);
    assert!(!x.is_null(), "field {path} is missing from {v:#}");
    x
}

fn has_all(v: &Value, paths: &[&str]) {
    for p in paths {
        field(v, p);
    }
}

fn latencies(prefix: &str) -> Vec<String> {
    ["p50_ms", "p99_ms", "max_ms"]
        .iter()
        .map(|k| format!("{prefix}.{k}"))
        .collect()
}

fn has_latencies(v: &Value, prefixes: &[&str]) {
    for p in prefixes {
        for path in latencies(p) {
            field(v, &path);
        }
    }
}

/// Every ratio to the floor that a mode reports has its figure, floor and quotient.
fn has_ratios(v: &Value, names: &[&str]) {
    let ratios = field(v, "ratios")
        .as_object()
        .unwrap_or_else(|| panic!("ratios is not an object in {v:#}"));
    for name in names {
        let r = ratios
            .get(*name)
            .unwrap_or_else(|| panic!("no ratio {name:?} in {v:#}"));
        for k in ["value", "floor_value", "ratio"] {
            assert!(
                r[k].as_f64().is_some_and(|x| x > 0.0),
                "ratio {name:?} has no positive {k}: {r:#}"
            );
        }
    }
    has_all(
        v,
        &[
            "floor.redb.commits_per_s",
            "floor.spawn.per_s",
            "floor.quic.rtt.p50_us",
        ],
    );
}

fn uint(v: &Value, path: &str) -> u64 {
    field(v, path)
        .as_u64()
        .unwrap_or_else(|| panic!("{path} is not an unsigned integer in {v:#}"))
}

#[test]
fn throughput_instant_smoke() {
    let v = bench(&[
        "throughput",
        "--sidecars",
        "3",
        "--tasks",
        "60",
        "--agent",
        "instant",
        "--slots",
        "4",
    ]);
    check_throughput(&v, 60);
}

#[test]
fn throughput_exec_smoke() {
    let v = bench(&[
        "throughput",
        "--sidecars",
        "2",
        "--tasks",
        "20",
        "--agent",
        "exec",
        "--slots",
        "2",
    ]);
    check_throughput(&v, 20);
}

fn check_throughput(v: &Value, tasks: u64) {
    assert_eq!(field(v, "mode"), "throughput");
    has_all(
        v,
        &[
            "tasks_per_s",
            "batch",
            "elapsed_s",
            "hub.messages_per_task",
            "hub.bytes_per_task",
            "hub.hub_cpu_s",
            "hub.commits_per_s",
            "hub.mean_group_size",
            "hub_peak_rss_kib",
            "machine.cpus",
        ],
    );
    has_latencies(v, &["submit_to_running", "submit_to_completed"]);
    assert_eq!(uint(v, "tasks"), tasks);
    assert_eq!(uint(v, "completed"), tasks, "every task completes: {v:#}");
    has_ratios(
        v,
        &["tasks/s ÷ redb commits/s", "hub commits/s ÷ redb commits/s"],
    );
    assert_eq!(uint(v, "submit_to_completed.n"), tasks);
    // CPU per task by component, and the sidecars' queue commits (issue 20).
    has_all(
        v,
        &[
            "cpu_per_task_us.hub",
            "cpu_per_task_us.hub_core",
            "cpu_per_task_us.sidecars",
            "cpu_per_task_us.client",
            "cpu_per_task_us.total",
            "sidecar_commits.flushed_per_task",
        ],
    );
    assert!(
        uint(v, "sidecar_commits.flushed") > 0,
        "the sidecars committed what they accepted: {v:#}"
    );
}

#[test]
fn compare_names_what_is_missing_without_the_peer_harness() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_muster-bench"))
        .args(["compare", "graphile", "--tasks", "10", "--peer-dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("muster-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "no harness, yet it succeeded: {stderr}"
    );
    assert!(
        stderr.contains("run.sh") && stderr.contains("--peer-dir"),
        "the error names the missing harness and the option: {stderr}"
    );
}

#[test]
fn latency_smoke() {
    let v = bench(&["latency", "--tasks", "10", "--warmup", "2"]);
    assert_eq!(field(&v, "mode"), "latency");
    has_latencies(
        &v,
        &["submit_to_running", "submit_to_completed", "submit_ack"],
    );
    assert_eq!(field(&v, "agent"), "exec");
    assert_eq!(uint(&v, "completed"), 10, "every task completes: {v:#}");
    assert_eq!(uint(&v, "submit_to_running.n"), 10);
    has_ratios(
        &v,
        &[
            "submit → running p50 ÷ the path's floor",
            "submit → running p50 ÷ QUIC RTT p50",
            "submit → running p50 ÷ redb commit p50",
            "submit → running p50 ÷ spawn p50",
        ],
    );
}

#[test]
fn floor_smoke() {
    let v = bench(&["floor", "--ms", "300"]);
    assert_eq!(field(&v, "mode"), "floor");
    has_all(
        &v,
        &[
            "floor.redb.commit.p50_us",
            "floor.spawn.spawn_and_wait.p50_us",
            "floor.quic.handshake.p50_us",
            "machine.cpus",
        ],
    );
    for path in [
        "floor.redb.commits",
        "floor.spawn.spawns",
        "floor.quic.round_trips",
        "floor.quic.handshakes",
    ] {
        assert!(uint(&v, path) > 0, "{path} is 0: {v:#}");
    }
}

#[test]
fn scale_smoke() {
    let v = bench(&[
        "scale",
        "--sessions",
        "20",
        "--heartbeat-ms",
        "500",
        "--restart",
        "kill",
    ]);
    assert_eq!(field(&v, "mode"), "scale");
    has_all(
        &v,
        &[
            "hub_cpu_pct_of_one_core",
            "rss_per_session_kib",
            "enroll_s",
            "connect_s",
            "heartbeats_per_s",
            "restart.all_online_s",
            "restart.ready_after_start_s",
        ],
    );
    assert_eq!(uint(&v, "sessions"), 20);
    assert_eq!(uint(&v, "hub_online_after_connect"), 20);
    assert_eq!(
        uint(&v, "restart.online_again"),
        20,
        "every session is back: {v:#}"
    );
    assert_eq!(uint(&v, "restart.failed"), 0);
    // The restart's timeline: every session lost its connection once and was
    // welcomed again, and noticed the loss before it was welcomed.
    assert_eq!(uint(&v, "restart.noticed_after_stop.n"), 20, "{v:#}");
    assert_eq!(uint(&v, "restart.welcomed_after_stop.n"), 20, "{v:#}");
    let ms = |path: &str| field(&v, path).as_f64().unwrap_or(f64::NAN);
    assert!(
        ms("restart.noticed_after_stop.max_ms") <= ms("restart.welcomed_after_stop.max_ms"),
        "{v:#}"
    );
    has_ratios(
        &v,
        &["first connect, wall time per session ÷ QUIC handshake p50"],
    );
}

#[test]
fn backlog_smoke() {
    let v = bench(&[
        "backlog",
        "--finished",
        "500",
        "--sample",
        "10",
        "--warmup",
        "2",
    ]);
    assert_eq!(field(&v, "mode"), "backlog");
    has_latencies(
        &v,
        &[
            "empty.submit_to_running",
            "full.submit_to_running",
            "empty.submit_to_completed",
            "full.submit_to_completed",
        ],
    );
    has_all(
        &v,
        &[
            "empty.ready_s",
            "full.ready_s",
            "ratio_running_p50",
            "ratio_running_p99",
            "fill_s",
            "fill_method",
        ],
    );
    assert_eq!(uint(&v, "finished"), 500);
    assert_eq!(
        uint(&v, "completed"),
        20,
        "every sampled task completes: {v:#}"
    );
    has_ratios(&v, &["full store: submit → running p50 ÷ the path's floor"]);
}
