//! Durability shown from outside the process (issue 13): the hub and the sidecar
//! flush their store (`fdatasync`, which redb's `Durability::Immediate` commit
//! calls) before the acknowledgement that commit guards leaves the process.
//!
//! Every daemon under test runs under `strace -f`, which records the flushes of
//! its database file (`-P`) with their times. In the delayed runs strace also
//! holds every one of those flushes for [`FLUSH_DELAY`] before it runs
//! (`inject=…:delay_enter`); the guarded answer must then arrive at least that
//! long after the request the commit is for. The control runs the same path
//! under strace without the delay and must be faster than [`FLUSH_DELAY`]: a
//! daemon that did not flush, or flushed only after answering, would answer
//! fast in both runs and fail. The paths:
//!
//! | path | flushed by | guarded send | measured |
//! |---|---|---|---|
//! | submit | hub | the answer to the operator | `submit` latency vs a read-only `stats` |
//! | accept | sidecar | `Accepted` | hub's `accepted_at − assigned_at` |
//! | report | sidecar | `Finished` | hub's `ended_at` − when the agent was told to exit |
//! | ack | hub | `Ack` of the `Finished` report | sidecar's outbox empty − hub's `ended_at` |
//!
//! Not shown here: that the disk honours `fdatasync` (a power cut is not
//! simulated), or what each commit contains (the unit tests of
//! `hub::store::commit_kind` and `sidecar::queue::commit_kind` say which batches
//! are flushed; here the sidecar's forget-only batch after the `Ack` is seen not
//! to flush).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use muster_tests::tasks::submit;
use muster_tests::{Hub, Sidecar, tool_available, wait_for, write_script};
use serde_json::Value;

/// How long strace holds each flush of the store in the delayed runs: far above
/// an operator round trip on a loaded 2-core machine (about 0.1–0.5 s), so the
/// delayed and the control runs cannot be confused.
const FLUSH_DELAY: Duration = Duration::from_millis(1500);
/// How long any one step here may take (the delayed hub needs one
/// [`FLUSH_DELAY`] per commit, and it commits every heartbeat).
const STEP: Duration = Duration::from_secs(60);

// === strace ===

/// Whether strace can trace and delay flushes here (in CI, `CI=true`, its
/// absence fails the test).
fn strace_works() -> bool {
    tool_available(
        Command::new("strace").args([
            "-f",
            "--seccomp-bpf",
            "-e",
            "trace=fdatasync",
            "-e",
            "inject=fdatasync:delay_enter=1",
            "-o",
            "/dev/null",
            "--",
            "true",
        ]),
        "strace (with seccomp-bpf and delay injection) shows the store's flushes from outside",
    )
}

/// `strace` recording every flush of `db` by the daemon and its threads into
/// `trace` with epoch timestamps, each held `delay` first if given.
fn strace(db: &Path, trace: &Path, delay: Option<Duration>) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "strace",
        "-f",
        "--seccomp-bpf",
        "-ttt",
        "-e",
        "trace=fdatasync,fsync",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    if let Some(d) = delay {
        args.push("-e".into());
        args.push(format!("inject=fdatasync,fsync:delay_enter={}", d.as_micros()).into());
    }
    args.extend([
        "-P".into(),
        db.into(),
        "-o".into(),
        trace.into(),
        "--".into(),
    ]);
    args
}

/// Entry times (ms since the epoch) of the flushes of the store in `trace`.
fn flushes(trace: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(trace).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("fdatasync(") || l.contains("fsync("))
        .filter_map(|l| {
            // "<pid> <secs>.<micros> fdatasync(9) = 0 (DELAYED)"
            let secs: f64 = l.split_whitespace().nth(1)?.parse().ok()?;
            Some((secs * 1000.0) as u64)
        })
        .collect()
}

/// The flushes in `trace` that entered within `[from, to]` (ms since the epoch).
fn flushes_within(trace: &Path, from: u64, to: u64) -> Vec<u64> {
    flushes(trace)
        .into_iter()
        .filter(|t| (from..=to).contains(t))
        .collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as u64
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

// === helpers ===

/// Runs `hub <args>` and returns how long it took; asserts success.
fn timed(hub: &Hub, args: &[&str]) -> Duration {
    let start = Instant::now();
    let out = hub.cli(args);
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "muster-hub {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// A hub whose `serve` runs under strace (`delay` per flush if given).
fn traced_hub(delay: Option<Duration>) -> (Hub, PathBuf) {
    let mut hub = Hub::init();
    hub.set_policy("heartbeat_interval", "\"1s\"");
    let trace = hub.root().join("hub.strace");
    hub.wrap(&strace(&hub.data_dir().join("hub.redb"), &trace, delay));
    hub.start();
    (hub, trace)
}

/// A sidecar whose exec agent waits (at most a minute) for the file `go` in the
/// sidecar's directory, then exits 0.
fn waiting_sidecar(hub: &Hub, name: &str) -> (Sidecar, PathBuf) {
    let sc = Sidecar::enroll(hub, name, &[]);
    let go = sc.root().join("go");
    let agent = sc.root().join("agent.sh");
    write_script(
        &agent,
        &format!(
            "#!/bin/sh\ni=0\nwhile [ ! -e '{}' ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done\nexit 0\n",
            go.display()
        ),
    );
    sc.set_agent("command", &format!("[\"{}\"]", agent.display()));
    (sc, go)
}

/// The task's only attempt once `field` is set on it.
fn wait_attempt(hub: &Hub, id: u64, field: &str) -> Value {
    wait_for(STEP, &format!("task {id}: {field} recorded"), || {
        let t = hub.json(&["task", "show", &id.to_string()]);
        let a = t["attempt_history"]
            .as_array()
            .and_then(|h| h.last())
            .cloned()
            .ok_or_else(|| t.to_string())?;
        if a[field].is_u64() {
            Ok(a)
        } else {
            Err(t.to_string())
        }
    })
}

fn at(a: &Value, field: &str) -> u64 {
    a[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field}: {a}"))
}

/// The sidecar's outbox length per `status --json`.
fn outbox(sc: &Sidecar) -> Option<u64> {
    sc.status_json().and_then(|v| v["outbox"].as_u64())
}

// === submit (hub) ===

/// Submit latency and the flushes seen meanwhile, with `stats` as the baseline.
struct SubmitRun {
    stats: Duration,
    submit: Duration,
    flushes: usize,
}

fn submit_run(delay: Option<Duration>) -> SubmitRun {
    let (hub, trace) = traced_hub(delay);
    // The fastest of three read-only round trips: nothing to commit, so no flush.
    let stats = (0..3)
        .map(|_| timed(&hub, &["stats", "--json"]))
        .min()
        .expect("three runs");
    let from = now_ms();
    let submit = timed(&hub, &["submit", "--title", "durable"]);
    let to = now_ms();
    let flushes = flushes_within(&trace, from, to).len();
    let tasks = hub.json(&["tasks"]);
    assert_eq!(
        tasks["tasks"].as_array().map(Vec::len),
        Some(1),
        "the submitted task is listed: {tasks}"
    );
    SubmitRun {
        stats,
        submit,
        flushes,
    }
}

#[test]
fn hub_answers_a_submit_only_after_flushing_its_store() {
    if !strace_works() {
        return;
    }
    let delayed = submit_run(Some(FLUSH_DELAY));
    let control = submit_run(None);
    eprintln!(
        "submit: flush held {} ms: stats {} ms, submit {} ms ({} flushes); no hold: stats {} ms, submit {} ms ({} flushes)",
        ms(FLUSH_DELAY),
        ms(delayed.stats),
        ms(delayed.submit),
        delayed.flushes,
        ms(control.stats),
        ms(control.submit),
        control.flushes
    );
    assert!(
        delayed.flushes >= 1 && control.flushes >= 1,
        "the hub did not flush its store while answering a submit"
    );
    assert!(
        delayed.stats < FLUSH_DELAY,
        "a read-only request waited for a flush ({} ms)",
        ms(delayed.stats)
    );
    assert!(
        delayed.submit >= FLUSH_DELAY,
        "the answer to a submit left before the held flush ended ({} ms < {} ms)",
        ms(delayed.submit),
        ms(FLUSH_DELAY)
    );
    assert!(
        control.submit < FLUSH_DELAY,
        "without the hold a submit takes {} ms: the delayed run proves nothing",
        ms(control.submit)
    );
}

// === accept and report (sidecar) ===

/// Times of one attempt on a traced sidecar, in ms.
struct SidecarRun {
    /// Hub's `accepted_at − assigned_at`.
    accept: u64,
    /// Sidecar flushes between the assignment and the acceptance at the hub.
    accept_flushes: usize,
    /// Hub's `ended_at` − when the agent was told to exit.
    report: u64,
    /// Sidecar flushes between that moment and the end at the hub.
    report_flushes: usize,
    /// Sidecar flushes from the end at the hub until the acknowledgement was
    /// applied (the outbox empty and the task forgotten).
    ack_flushes: usize,
}

fn sidecar_run(delay: Option<Duration>) -> SidecarRun {
    let mut hub = Hub::init();
    hub.set_policy("heartbeat_interval", "\"10s\"");
    hub.start();
    let (mut sc, go) = waiting_sidecar(&hub, "flusher");
    let trace = sc.root().join("sidecar.strace");
    sc.wrap(&strace(&sc.data_dir().join("sidecar.redb"), &trace, delay));
    sc.start_connected(STEP);
    hub.wait_agent_state("flusher", "online", STEP);

    let id = submit(&hub, "accept me", &[]);
    let a = wait_attempt(&hub, id, "started_at");
    let (assigned, accepted) = (at(&a, "assigned_at"), at(&a, "accepted_at"));
    let accept_flushes = flushes_within(&trace, assigned, accepted).len();

    let told = now_ms();
    std::fs::write(&go, b"").expect("write the go file");
    let a = wait_attempt(&hub, id, "ended_at");
    assert_eq!(a["outcome"], "completed", "{a}");
    let ended = at(&a, "ended_at");
    let report_flushes = flushes_within(&trace, told, ended).len();

    wait_for(
        STEP,
        "the sidecar applied the acknowledgement",
        || match sc.status_json() {
            Some(v) if v["outbox"] == 0 && v["tasks"].as_array().is_some_and(Vec::is_empty) => {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        },
    );
    let applied = now_ms();
    // One more status round trip: the daemon loop has finished whatever
    // iteration was under way at `applied`, so a release commit counted below
    // has also released the run directory by now.
    sc.status_json();
    let run_dir = sc.data_dir().join("runs").join(format!("{id}-1"));
    let released = !run_dir.exists();
    let flushes = flushes_within(&trace, ended, applied).len();
    // An idle sidecar makes one flushed commit at a heartbeat so that forgotten
    // tasks' run directories can go (see the daemon's `releases`); that one is
    // not the acknowledgement's doing. The hub's heartbeat interval is long
    // here, so the strict case (nothing flushed) is the one usually checked.
    let ack_flushes = flushes.saturating_sub(usize::from(released));
    SidecarRun {
        accept: accepted.saturating_sub(assigned),
        accept_flushes,
        report: ended.saturating_sub(told),
        report_flushes,
        ack_flushes,
    }
}

#[test]
fn sidecar_reports_accepted_and_finished_only_after_flushing_its_queue() {
    if !strace_works() {
        return;
    }
    let delayed = sidecar_run(Some(FLUSH_DELAY));
    let control = sidecar_run(None);
    eprintln!(
        "sidecar, flush held {} ms: assigned → accepted {} ms ({} flushes), exit → finished {} ms ({} flushes), ack {} flushes; \
         no hold: {} ms ({} flushes), {} ms ({} flushes), ack {} flushes",
        ms(FLUSH_DELAY),
        delayed.accept,
        delayed.accept_flushes,
        delayed.report,
        delayed.report_flushes,
        delayed.ack_flushes,
        control.accept,
        control.accept_flushes,
        control.report,
        control.report_flushes,
        control.ack_flushes
    );
    for (what, run) in [("held", &delayed), ("control", &control)] {
        assert!(
            run.accept_flushes >= 1 && run.report_flushes >= 1,
            "{what}: the sidecar did not flush its queue before Accepted or Finished reached the hub"
        );
        assert_eq!(
            run.ack_flushes, 0,
            "{what}: forgetting the acknowledged reports and the ended task flushed the queue"
        );
    }
    assert!(
        delayed.accept >= ms(FLUSH_DELAY),
        "Accepted reached the hub {} ms after the assignment, before the held flush ended",
        delayed.accept
    );
    assert!(
        delayed.report >= ms(FLUSH_DELAY),
        "Finished reached the hub {} ms after the agent was told to exit, before the held flush ended",
        delayed.report
    );
    assert!(
        control.accept < ms(FLUSH_DELAY) && control.report < ms(FLUSH_DELAY),
        "without the hold the sidecar still takes {} ms / {} ms: the delayed run proves nothing",
        control.accept,
        control.report
    );
}

// === ack (hub) ===

/// How long the sidecar held its `Finished` report after the hub recorded it.
struct AckRun {
    /// From the hub's `ended_at` until a `status` that shows the outbox empty
    /// had been answered (an upper bound on when the `Ack` arrived).
    held: u64,
    /// Hub flushes from `ended_at` until then.
    flushes: usize,
}

fn ack_run(delay: Option<Duration>) -> AckRun {
    let (hub, trace) = traced_hub(delay);
    let (mut sc, go) = waiting_sidecar(&hub, "acked");
    sc.start_connected(STEP);
    hub.wait_agent_state("acked", "online", STEP);
    let id = submit(&hub, "ack me", &[]);
    wait_attempt(&hub, id, "started_at");
    // Accepted and Started are acknowledged first, so the outbox holds only Finished.
    wait_for(STEP, "Accepted and Started acknowledged", || {
        match outbox(&sc) {
            Some(0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    std::fs::write(&go, b"").expect("write the go file");
    // The final Ack also makes the sidecar forget the ended task: polled as fast
    // as the CLI allows, the first answer showing both is just after it arrived.
    let emptied = wait_for(STEP, "the Finished report acknowledged", || {
        match sc.status_json() {
            Some(v) if v["outbox"] == 0 && v["tasks"].as_array().is_some_and(Vec::is_empty) => {
                Ok(now_ms())
            }
            other => Err(format!("{other:?}")),
        }
    });
    let a = wait_attempt(&hub, id, "ended_at");
    let ended = at(&a, "ended_at");
    AckRun {
        held: emptied.saturating_sub(ended),
        flushes: flushes_within(&trace, ended, emptied).len(),
    }
}

#[test]
fn hub_acknowledges_a_report_only_after_flushing_its_store() {
    if !strace_works() {
        return;
    }
    let delayed = ack_run(Some(FLUSH_DELAY));
    let control = ack_run(None);
    eprintln!(
        "ack: flush held {} ms: report held by the sidecar {} ms after the hub recorded it ({} hub flushes); no hold: {} ms ({} flushes)",
        ms(FLUSH_DELAY),
        delayed.held,
        delayed.flushes,
        control.held,
        control.flushes
    );
    assert!(
        delayed.flushes >= 1 && control.flushes >= 1,
        "the hub did not flush its store between recording the report and acknowledging it"
    );
    assert!(
        delayed.held >= ms(FLUSH_DELAY),
        "the Ack arrived {} ms after the hub recorded the report, before the held flush ended",
        delayed.held
    );
    assert!(
        control.held < ms(FLUSH_DELAY),
        "without the hold the Ack takes {} ms: the delayed run proves nothing",
        control.held
    );
}
