//! Issue 4, the process-level storm: hundreds of tasks across real sidecars on
//! 127.0.0.1 while sidecars are killed with SIGKILL every few seconds (and
//! restarted), one sidecar is frozen (SIGSTOP) until its work is `lost` while
//! its runs finish, and the hub itself is killed with SIGKILL and
//! restarted twice. Then everything is healed, every task must complete, and a
//! checker compares the hub's records (`tasks --json`, every task's attempt
//! history, the whole event stream, `stats --json`) with evidence the hub never
//! sees: a run log that every agent run appends to, outside the sidecars' state.
//!
//! - no acknowledged task lost: every id a `submit --json` printed exists,
//!   and each idempotency key maps to exactly one task (no duplicates);
//! - every task `completed`, with exactly one `completed` attempt (its last),
//!   and one transition to `completed` in the event stream;
//! - every completion matches exactly one logged run of that task, generation
//!   and agent that exited 0 (and the pid the hub recorded, when it has one);
//!   an attempt never runs twice, across sidecar restarts too (a run spawned
//!   just before a kill, before the acceptance was committed, is adopted when
//!   the hub sends the attempt again); every logged run belongs to an attempt
//!   the hub made; every run ended;
//! - no two runs of one task alive at once, except a superseded generation's
//!   run (its attempt ended other than `completed`, a later one exists) still
//!   ending while the next one runs;
//! - every `fail_first` task's attempt 1 did not complete, and its runs exited
//!   non-zero;
//! - at least one attempt `lost` and at least one late report refused (the
//!   frozen sidecar's outbox replays the completions of superseded attempts);
//! - every attempt ended with its outcome recorded, generations strictly
//!   increasing, never more attempts than allowed; the event stream has no
//!   gaps and agrees with the final task states.
//!
//! It prints and asserts its totals. Size and randomness come from the
//! environment (see tests/README.md): `MUSTER_STORM_TASKS` (500),
//! `MUSTER_STORM_SIDECARS` (4), `MUSTER_STORM_SLOTS` (4 per sidecar),
//! `MUSTER_STORM_HUB_KILLS` (2), `MUSTER_STORM_SUBMITTERS` (4 parallel
//! submitting clients), `MUSTER_STORM_SEED` (default [`DEFAULT_SEED`]; always
//! printed with the command that repeats the run).

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use muster_tests::{
    Hub, LoggedRun, Sidecar, bins, read_run_log, run_log_note, run_log_notes, run_log_prelude,
    task_shows, wait_for, write_script,
};
use serde_json::Value;

/// How long a fresh (or restarted) sidecar may take to connect and show up online.
const CONNECT: Duration = Duration::from_secs(30);
/// Lost grace of the storm's hub.
const LOST_GRACE_S: u64 = 5;
/// Longest a submitting client's single `submit` may run before it is retried
/// (same idempotency key, so safe): a call whose hub was killed under it would
/// otherwise wait out the QUIC idle timeout (15 s) and stretch the storm.
const SUBMIT_CALL: Duration = Duration::from_secs(6);
/// Pause between retries of a refused or failed submission (paces the client, waits for nothing).
const SUBMIT_RETRY_PAUSE: Duration = Duration::from_millis(250);
/// The chaos goes on at least this long (while the last tasks run), however fast the submissions.
const MIN_CHAOS: Duration = Duration::from_secs(20);
/// Share of tasks (per thousand) whose first attempt fails on purpose.
const FAIL_FIRST_PER_MILLE: u64 = 50;
/// The seed when `MUSTER_STORM_SEED` is not set: a CI failure can be repeated.
const DEFAULT_SEED: u64 = 4242;
/// Exit code of a `fail_first` task's attempt 1.
const FAIL_FIRST_CODE: i64 = 3;
/// How long the frozen sidecar's return may take to produce a refused late report.
const LATE_REPORT_WAIT: Duration = Duration::from_secs(30);
/// How often the chaos loop asks the hub's `stats` while it waits on the freeze.
const HUB_POLL: Duration = Duration::from_millis(250);
/// How long the checker waits for every logged run to log its end.
const RUNS_END_WAIT: Duration = Duration::from_secs(15);

// === configuration ===

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(e) => panic!("{name}={v:?} is not a number: {e}"),
    }
}

#[derive(Debug, Clone)]
struct StormConfig {
    seed: u64,
    tasks: usize,
    sidecars: usize,
    slots: u64,
    hub_kills: usize,
    submitters: usize,
}

impl StormConfig {
    fn from_env() -> Self {
        let seed = env_u64("MUSTER_STORM_SEED").unwrap_or(DEFAULT_SEED);
        let sidecars = env_u64("MUSTER_STORM_SIDECARS").unwrap_or(4).max(2) as usize;
        StormConfig {
            seed,
            tasks: env_u64("MUSTER_STORM_TASKS").unwrap_or(500).max(1) as usize,
            sidecars,
            slots: env_u64("MUSTER_STORM_SLOTS").unwrap_or(4).clamp(1, 256),
            hub_kills: env_u64("MUSTER_STORM_HUB_KILLS").unwrap_or(2) as usize,
            submitters: env_u64("MUSTER_STORM_SUBMITTERS").unwrap_or(4).max(1) as usize,
        }
    }
}

/// splitmix64: small, seeded, good enough to pick victims and delays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

/// What one task does, fixed by the seed and the task's index.
fn task_plan(seed: u64, i: usize) -> (u64, bool) {
    let mut r = Rng(seed ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    let sleep_ms = r.range(0, 300);
    let fail_first = r.range(0, 999) < FAIL_FIRST_PER_MILLE;
    (sleep_ms, fail_first)
}

// === processes outside the fixtures ===

/// `muster-hub <args> --data-dir D` in a clean environment (for threads that
/// must not hold the fixture while the main thread kills and restarts the hub).
fn hub_cmd(data: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(&bins().hub);
    cmd.args(args)
        .arg("--data-dir")
        .arg(data)
        .env("NO_COLOR", "1")
        .env_remove("MUSTER_HUB")
        .env_remove("MUSTER_CREDENTIAL")
        .env_remove("MUSTER_SOCKET")
        .env_remove("MUSTER_TASK_ID")
        .env_remove("MUSTER_GENERATION");
    cmd
}

/// Runs a command to its end, or kills it after `timeout` (`None` then); never panics.
fn run_quiet(mut cmd: Command, timeout: Duration) -> Option<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().ok(),
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => return None,
        }
    }
}

// === submitting ===

/// One acknowledged submission.
#[derive(Debug, Clone)]
struct Ack {
    index: usize,
    key: String,
    id: u64,
    existing: bool,
}

#[derive(Debug, Default)]
struct SubmitLog {
    acks: Vec<Ack>,
    /// Calls that failed (hub down, timeout, refusal) and were retried.
    retries: usize,
    /// The last few failure messages, for the summary.
    last_errors: Vec<String>,
}

/// Submits task `i` until the hub acknowledges it (same idempotency key every
/// time, so a retry after a lost answer cannot make a second task), or until
/// `deadline`.
fn submit_one(data: &Path, seed: u64, i: usize, deadline: Instant, log: &Mutex<SubmitLog>) {
    let (sleep_ms, fail_first) = task_plan(seed, i);
    let key = format!("storm-{seed}-{i}");
    let title = format!("storm {i}");
    let description = format!(
        "sleep_ms={sleep_ms}{}",
        if fail_first { " fail_first" } else { "" }
    );
    loop {
        let cmd = hub_cmd(
            data,
            &[
                "submit",
                "--title",
                &title,
                "--description",
                &description,
                "--key",
                &key,
                "--json",
            ],
        );
        let failure = match run_quiet(cmd, SUBMIT_CALL) {
            Some(out) if out.status.success() => {
                match serde_json::from_slice::<Value>(&out.stdout) {
                    Ok(v) if v["id"].as_u64().is_some() => {
                        let ack = Ack {
                            index: i,
                            key: key.clone(),
                            id: v["id"].as_u64().unwrap_or_default(),
                            existing: v["existing"] == true,
                        };
                        log.lock().unwrap_or_else(|p| p.into_inner()).acks.push(ack);
                        return;
                    }
                    _ => format!(
                        "submit succeeded but printed no id: {}",
                        String::from_utf8_lossy(&out.stdout)
                    ),
                }
            }
            Some(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
            None => format!("submit ran past {} s", SUBMIT_CALL.as_secs()),
        };
        {
            let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
            l.retries += 1;
            if l.last_errors.len() >= 8 {
                l.last_errors.remove(0);
            }
            l.last_errors.push(failure);
        }
        if Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(SUBMIT_RETRY_PAUSE);
    }
}

// === reading the hub ===

/// Every task the hub lists, all pages (`tasks --json --limit 1000 --cursor …`).
fn all_tasks(hub: &Hub) -> BTreeMap<u64, Value> {
    let mut out = BTreeMap::new();
    let mut cursor: Option<u64> = None;
    loop {
        let c = cursor.map(|c| c.to_string());
        let mut args = vec!["tasks", "--limit", "1000"];
        if let Some(c) = &c {
            args.extend(["--cursor", c]);
        }
        let v = hub.json(&args);
        let page = v["tasks"].as_array().cloned().unwrap_or_default();
        for t in &page {
            if let Some(id) = t["id"].as_u64() {
                assert!(
                    out.insert(id, t.clone()).is_none(),
                    "task {id} listed on two pages"
                );
            }
        }
        match v["next_cursor"].as_u64() {
            Some(c) if !page.is_empty() => cursor = Some(c),
            _ => break,
        }
    }
    out
}

/// The event stream from sequence 1 up to a marker event made now (an `agent
/// undrain` of an agent that is not drained, which only writes an audit event):
/// once the marker arrives, the stream has caught up with everything before it.
fn events_until_marker(hub: &Hub, agent: &str, timeout: Duration) -> Vec<Value> {
    let out = hub.cli(&["agent", "undrain", agent, "--json"]);
    assert!(
        out.status.success(),
        "agent undrain {agent} (the marker event) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = hub_cmd(hub.data_dir(), &["watch", "--json", "--from", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run muster-hub watch: {e}"));
    let stdout = child.stdout.take().expect("watch's stdout is piped");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut events = Vec::new();
    let mut found = false;
    while !found && start.elapsed() < timeout {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(250)) else {
            if let Ok(Some(s)) = child.try_wait() {
                panic!(
                    "watch exited ({s}) after {} events, before the marker",
                    events.len()
                );
            }
            continue;
        };
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!("watch --json printed a line that is not JSON ({e}): {line}")
        });
        found = v["kind"] == "audit" && v["action"] == "agent_undrain" && v["subject"] == agent;
        events.push(v);
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    assert!(
        found,
        "the event stream did not reach the marker within {} s ({} events read, last: {})",
        timeout.as_secs(),
        events.len(),
        events.last().map(Value::to_string).unwrap_or_default()
    );
    events
}

// === the invariant checker ===

#[derive(Debug, Default)]
struct Verdict {
    violations: Vec<String>,
    attempts: usize,
    outcomes: BTreeMap<String, usize>,
    states: BTreeMap<String, usize>,
    events: usize,
    max_attempts_seen: usize,
    /// Runs in the run log, and how they ended (exit code, or `none`).
    runs: usize,
    run_ends: BTreeMap<String, usize>,
    /// Runs that exited 0 for an attempt the hub did not complete (superseded).
    superseded_successes: usize,
    /// Pairs of runs of one task alive at once (a superseded one still ending).
    superseded_overlaps: usize,
    /// Runs of an attempt the hub had already superseded that started after
    /// the newer attempt's run, on another sidecar (a stale assignment acted on
    /// by a sidecar that was stopped or restarted; see the check).
    late_superseded_starts: usize,
    /// `fail_first` tasks, and those whose attempt 1 ran and failed by its exit code.
    fail_first: usize,
    fail_first_failed: usize,
}

impl Verdict {
    fn violation(&mut self, v: String) {
        if self.violations.len() < 50 {
            self.violations.push(v);
        } else if self.violations.len() == 50 {
            self.violations.push("… (more violations not shown)".into());
        }
    }
}

const TERMINAL: [&str; 3] = ["completed", "failed", "cancelled"];

/// A sidecar restart, from the run log's `note restart AGENT MS` line.
#[derive(Debug, Clone)]
struct Restart {
    /// Its line in the run log (runs before it were started by the killed sidecar).
    line: usize,
    agent: String,
    /// Wall-clock milliseconds, comparable with the hub's attempt times.
    at_ms: u64,
}

/// The sidecar restarts noted in a run log.
fn restarts_in(log: &Path) -> Vec<Restart> {
    run_log_notes(log)
        .into_iter()
        .filter_map(|(line, note)| {
            let mut f = note.strip_prefix("restart ")?.split(' ');
            let agent = f.next()?.to_owned();
            let at_ms = f.next()?.parse().ok()?;
            Some(Restart { line, agent, at_ms })
        })
        .collect()
}

/// Milliseconds since the epoch (the hub's attempt times are on the same clock).
fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The attempt history of a task, by generation.
fn attempts_of(show: &Value) -> BTreeMap<u64, &Value> {
    show["attempt_history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| Some((a["generation"].as_u64()?, a)))
        .collect()
}

/// Compares the hub's attempt histories with the run log (see the module docs);
/// `restarts` are the sidecar restarts noted in the run log.
fn check_runs(
    v: &mut Verdict,
    shows: &BTreeMap<u64, Value>,
    runs: &[LoggedRun],
    restarts: &[Restart],
    fail_first: &BTreeSet<u64>,
) {
    v.runs = runs.len();
    let mut by_task: BTreeMap<u64, Vec<&LoggedRun>> = BTreeMap::new();
    for r in runs {
        by_task.entry(r.task).or_default().push(r);
        let end = r.ended.map_or("none".to_string(), |(_, c)| c.to_string());
        *v.run_ends.entry(end).or_default() += 1;
        if r.ended.is_none() {
            v.violation(format!("run never logged its end: {r:?}"));
        }
    }
    let none = Vec::new();
    for (id, show) in shows {
        let attempts = attempts_of(show);
        let task_runs = by_task.get(id).unwrap_or(&none);
        let last_gen = attempts.keys().next_back().copied().unwrap_or(0);
        if show["attempts_not_shown"].as_u64().unwrap_or(0) > 0 {
            v.violation(format!("task {id}: task show left attempts out: {show}"));
        }
        // Every run belongs to an attempt the hub made, on that agent.
        for r in task_runs {
            match attempts.get(&r.generation) {
                Some(a) if a["agent"] == r.agent.as_str() => {}
                Some(a) => v.violation(format!(
                    "run {r:?} ran on {} but the hub gave generation {} to {}",
                    r.agent, r.generation, a["agent"]
                )),
                None => v.violation(format!(
                    "run {r:?} has no attempt at the hub (generations {:?})",
                    attempts.keys().collect::<Vec<_>>()
                )),
            }
        }
        // Every completion: exactly one run of it, and that run exited 0.
        for (generation, a) in &attempts {
            let runs_g: Vec<&&LoggedRun> = task_runs
                .iter()
                .filter(|r| r.generation == *generation)
                .collect();
            let ok = runs_g
                .iter()
                .filter(|r| r.ended.is_some_and(|(_, c)| c == 0))
                .count();
            if a["outcome"] != "completed" {
                v.superseded_successes += ok;
                if ok > 0 && *generation == last_gen {
                    v.violation(format!(
                        "task {id}: its last attempt {a} did not complete, yet a run of it exited 0: {runs_g:?}"
                    ));
                }
                continue;
            }
            let Some(last) = runs_g.last() else {
                v.violation(format!(
                    "task {id}: generation {generation} completed at the hub but never ran"
                ));
                continue;
            };
            if last.ended.map(|(_, c)| c) != Some(0)
                || a["agent"] != last.agent.as_str()
                || a["pid"].as_u64().is_some_and(|p| p != last.pid)
            {
                v.violation(format!(
                    "task {id}: the completed attempt {a} is not its last run, which exited 0: {last:?}"
                ));
            }
            // An attempt runs once, across sidecar restarts too: a run spawned just
            // before a crash is adopted when the hub sends the attempt again.
            for pair in runs_g.windows(2) {
                let (r1, r2) = (pair[0], pair[1]);
                let between = restarts
                    .iter()
                    .find(|x| x.agent == r1.agent && r1.started < x.line && x.line < r2.started);
                v.violation(format!(
                    "task {id}: generation {generation} ran twice ({}): {r1:?} then {r2:?}",
                    match between {
                        Some(x) => format!("its sidecar restarted at {} ms between", x.at_ms),
                        None => "no restart between".to_string(),
                    }
                ));
            }
        }
        // No two runs alive at once, unless the earlier one's attempt was superseded.
        for (i, r1) in task_runs.iter().enumerate() {
            let end1 = r1.ended.map_or(usize::MAX, |(n, _)| n);
            for r2 in &task_runs[i + 1..] {
                if r2.started > end1 {
                    continue;
                }
                let in_order = r1.generation < r2.generation;
                let (older, newer) = if in_order { (r1, r2) } else { (r2, r1) };
                let superseded = older.generation < newer.generation
                    && attempts
                        .get(&older.generation)
                        .is_some_and(|a| a["outcome"].is_string() && a["outcome"] != "completed");
                if superseded && in_order {
                    v.superseded_overlaps += 1;
                } else if superseded && older.agent != newer.agent {
                    // Known limit (not a lost or doubled completion): a sidecar stopped
                    // (SIGSTOP) or restarted with an assignment it had not yet started
                    // starts it when it runs again, before its session tells it the hub
                    // has moved the task on. The hub refuses its reports and the attempt
                    // that counts is the newer one (checked above); the sidecar stops
                    // the run when it hears. Counted, so a rise shows.
                    v.late_superseded_starts += 1;
                } else {
                    v.violation(format!(
                        "task {id}: two runs alive at once: {r1:?} and {r2:?}"
                    ));
                }
            }
        }
        // A fail_first task's attempt 1 failed, and no run of it exited 0.
        if fail_first.contains(id) {
            v.fail_first += 1;
            let runs1: Vec<&&LoggedRun> = task_runs.iter().filter(|r| r.generation == 1).collect();
            match attempts.get(&1) {
                Some(a) if a["outcome"] == "completed" => {
                    v.violation(format!("task {id} (fail_first): attempt 1 completed: {a}"))
                }
                Some(a) if a["outcome"] == "failed" => {
                    if runs1
                        .iter()
                        .any(|r| r.ended.is_some_and(|(_, c)| c == FAIL_FIRST_CODE))
                    {
                        v.fail_first_failed += 1;
                    } else {
                        v.violation(format!(
                            "task {id} (fail_first): attempt 1 failed at the hub but no run of it exited {FAIL_FIRST_CODE}: {runs1:?}"
                        ));
                    }
                }
                Some(_) => {}
                None => v.violation(format!("task {id} (fail_first) has no attempt 1")),
            }
            if runs1.iter().any(|r| r.ended.is_some_and(|(_, c)| c == 0)) {
                v.violation(format!(
                    "task {id} (fail_first): a run of attempt 1 exited 0: {runs1:?}"
                ));
            }
        }
    }
    for id in by_task.keys() {
        if !shows.contains_key(id) {
            v.violation(format!(
                "the run log has runs of task {id}, which the hub does not list"
            ));
        }
    }
}

fn check_invariants(
    acks: &[Ack],
    tasks: &BTreeMap<u64, Value>,
    shows: &BTreeMap<u64, Value>,
    events: &[Value],
) -> Verdict {
    let mut v = Verdict::default();

    // No acknowledged task lost; one task per idempotency key.
    let mut by_key: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for a in acks {
        by_key.entry(&a.key).or_default().insert(a.id);
        if !tasks.contains_key(&a.id) {
            v.violation(format!(
                "acknowledged task {} (index {}, key {}) is missing from tasks --json",
                a.id, a.index, a.key
            ));
        }
    }
    for (key, ids) in &by_key {
        if ids.len() > 1 {
            v.violation(format!(
                "key {key} was acknowledged as several tasks: {ids:?}"
            ));
        }
    }
    let acked: BTreeSet<u64> = acks.iter().map(|a| a.id).collect();
    for (id, t) in tasks {
        if !acked.contains(id) {
            v.violation(format!(
                "task {id} exists but no submit acknowledged it (a duplicate?): key {} title {}",
                t["key"], t["title"]
            ));
        }
    }

    // Every task terminal; attempts all ended, at most one completed.
    for (id, t) in tasks {
        let state = t["state"].as_str().unwrap_or("?").to_string();
        *v.states.entry(state.clone()).or_default() += 1;
        if state != "completed" {
            v.violation(format!("task {id} did not complete: {state}"));
        }
        let Some(show) = shows.get(id) else {
            v.violation(format!("task {id}: no task show"));
            continue;
        };
        if show["state"] != t["state"] {
            v.violation(format!(
                "task {id}: tasks says {state}, task show says {}",
                show["state"]
            ));
        }
        let history = show["attempt_history"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        v.attempts += history.len();
        v.max_attempts_seen = v.max_attempts_seen.max(history.len());
        let mut completed = 0;
        let mut last_gen = 0;
        for a in &history {
            let outcome = a["outcome"].as_str();
            *v.outcomes
                .entry(outcome.unwrap_or("(none)").to_string())
                .or_default() += 1;
            match outcome {
                None => v.violation(format!(
                    "task {id} ({state}): attempt generation {} has no outcome: {a}",
                    a["generation"]
                )),
                Some("completed") => completed += 1,
                Some(_) => {}
            }
            if a["ended_at"].as_u64().is_none() {
                v.violation(format!(
                    "task {id} ({state}): attempt generation {} has no end time: {a}",
                    a["generation"]
                ));
            }
            let g = a["generation"].as_u64().unwrap_or(0);
            if g <= last_gen {
                v.violation(format!(
                    "task {id}: attempt generations do not increase: {last_gen} then {g}"
                ));
            }
            last_gen = g;
        }
        if completed > 1 {
            v.violation(format!(
                "task {id} has {completed} completed attempts: {}",
                show["attempt_history"]
            ));
        }
        if state == "completed" && completed != 1 {
            v.violation(format!(
                "task {id} is completed but {completed} of its attempts completed"
            ));
        }
        if state == "completed" && history.last().is_some_and(|a| a["outcome"] != "completed") {
            v.violation(format!(
                "task {id} is completed but its last attempt is not: {}",
                show["attempt_history"]
            ));
        }
        let allowed = t["max_attempts"].as_u64().unwrap_or(u64::MAX) as usize;
        if history.len() > allowed {
            v.violation(format!(
                "task {id} has {} attempts, more than its max_attempts {allowed}",
                history.len()
            ));
        }
        if t["attempts"].as_u64() != Some(history.len() as u64) {
            v.violation(format!(
                "task {id}: attempts = {} but the history lists {}",
                t["attempts"],
                history.len()
            ));
        }
    }

    // The event stream: gapless, one completion per task, agrees with the end states.
    v.events = events.len();
    let mut expected_seq: Option<u64> = None;
    let mut last_state: BTreeMap<u64, String> = BTreeMap::new();
    let mut completions: BTreeMap<u64, usize> = BTreeMap::new();
    let mut submitted: BTreeSet<u64> = BTreeSet::new();
    for e in events {
        let seq = e["seq"].as_u64().unwrap_or(0);
        if e["kind"] == "pruned" {
            v.violation(format!("the event stream was pruned: {e}"));
            continue;
        }
        match expected_seq {
            None if seq != 1 => v.violation(format!("the event stream starts at {seq}, not 1")),
            Some(want) if seq != want => {
                v.violation(format!(
                    "event sequence gap or repeat: {want} expected, got {seq}"
                ));
            }
            _ => {}
        }
        expected_seq = Some(seq + 1);
        if e["kind"] != "task" {
            continue;
        }
        let Some(id) = e["id"].as_u64() else { continue };
        let state = e["state"].as_str().unwrap_or("?").to_string();
        if e["why"]
            .as_str()
            .is_some_and(|w| w.starts_with("submitted"))
        {
            submitted.insert(id);
        }
        if state == "completed" && e["from"] != "completed" {
            *completions.entry(id).or_default() += 1;
        }
        last_state.insert(id, state);
    }
    for (id, n) in &completions {
        if *n > 1 {
            v.violation(format!(
                "the event stream shows task {id} completed {n} times"
            ));
        }
    }
    for id in &acked {
        if !submitted.contains(id) {
            v.violation(format!("the event stream has no submission of task {id}"));
        }
    }
    for (id, t) in tasks {
        let end = t["state"].as_str().unwrap_or("?");
        match last_state.get(id) {
            Some(s) if s == end => {}
            Some(s) => v.violation(format!(
                "task {id}: the event stream ends in {s}, the task is {end}"
            )),
            None => v.violation(format!("task {id}: no event in the stream")),
        }
    }
    v
}

// === the agent and its run log ===

/// The exec agent every sidecar runs: logs its start to `log`, sleeps the
/// task's `sleep_ms` (a `fail_first` task's generation 1 fails instead), logs
/// its end with the exit code, and exits with it (see [`run_log_prelude`]).
fn agent_script(dir: &Path, log: &Path) -> PathBuf {
    let path = dir.join("storm-agent.sh");
    write_script(
        &path,
        &format!(
            r#"#!/bin/sh
{prelude}
f="$MUSTER_TASK_FILE"
ms=$(grep -o 'sleep_ms=[0-9]*' "$f" | head -n 1 | cut -d= -f2)
[ -n "$ms" ] || ms=0
if [ "$g" = 1 ] && grep -q 'fail_first' "$f"; then
  sleep 0.15
  echo "task $t: attempt 1 fails on purpose" >&2
  fin {code}
fi
sleep "$(printf '0.%03d' "$ms")"
fin 0
"#,
            prelude = run_log_prelude(log),
            code = FAIL_FIRST_CODE,
        ),
    );
    path
}

// === the storm ===

#[derive(Debug, Default)]
struct Chaos {
    sidecar_kills: usize,
    freezes: usize,
    hub_kills: usize,
    hub_restart_s: Vec<f64>,
    /// How long the sidecar stayed frozen.
    freeze_s: f64,
    /// Late reports refused, summed over the hub's lives (its counters restart with it).
    stale_reports: u64,
}

/// Sends `sig` to `pid` with kill(1) (the workspace forbids `unsafe`).
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), "--", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A sidecar stopped with SIGSTOP; continued when dropped, so a failing test
/// never leaves a frozen process (whose `status` would hang) to the fixtures.
struct Frozen {
    pid: u32,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.pid, "CONT");
    }
}

/// The hub's `stale_reports` (since its last start).
fn stale_reports(hub: &Hub) -> u64 {
    hub.json(&["stats"])["stale_reports"]
        .as_u64()
        .unwrap_or_default()
}

/// Whether the hub lists a task running on `agent`.
fn hub_shows_running(hub: &Hub, agent: &str) -> bool {
    hub.json(&[
        "tasks", "--agent", agent, "--state", "running", "--limit", "1",
    ])["tasks"]
        .as_array()
        .is_some_and(|t| !t.is_empty())
}

/// The hub's count of attempts ended `lost` (since its last start).
fn lost_attempts(hub: &Hub) -> u64 {
    hub.json(&["stats"])["outcomes"]["lost"]
        .as_u64()
        .unwrap_or_default()
}

/// Whether the sidecar holds an attempt whose run is under way and reported
/// started (a run still in its settle time would end `start_timeout` at the
/// hub, not `lost`).
fn holds_a_run(sc: &Sidecar) -> bool {
    sc.status_json().is_some_and(|v| {
        v["tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["pid"].is_u64() && t["phase"] == "running")
    })
}

#[test]
fn storm_of_tasks_under_sidecar_and_hub_kills_keeps_every_invariant() {
    let cfg = StormConfig::from_env();
    let repeat = format!(
        "MUSTER_STORM_SEED={} MUSTER_STORM_TASKS={} MUSTER_STORM_SIDECARS={} MUSTER_STORM_SLOTS={} MUSTER_STORM_HUB_KILLS={} MUSTER_STORM_SUBMITTERS={} cargo test -p muster-tests --test storm -- --nocapture",
        cfg.seed, cfg.tasks, cfg.sidecars, cfg.slots, cfg.hub_kills, cfg.submitters
    );
    eprintln!(
        "storm: seed {} ({} tasks, {} sidecars × {} slots, {} hub kills, {} submitters); repeat with:\n  {repeat}",
        cfg.seed, cfg.tasks, cfg.sidecars, cfg.slots, cfg.hub_kills, cfg.submitters
    );
    let built = Instant::now();
    bins();
    let build_s = built.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut rng = Rng(cfg.seed);

    let mut hub = Hub::init();
    for (k, val) in [
        ("heartbeat_interval", "\"1s\""),
        ("lost_grace", &format!("\"{LOST_GRACE_S}s\"")),
        ("accept_timeout", "\"4s\""),
        ("start_timeout", "\"5s\""),
        ("backoff_initial", "\"200ms\""),
        ("backoff_max", "\"2s\""),
        ("max_attempts", "6"),
        ("breaker_cooldown", "\"1s\""),
        ("breaker_cooldown_max", "\"2s\""),
        ("events_max", &(100_000 + cfg.tasks as u64 * 40).to_string()),
    ] {
        hub.set_policy(k, val);
    }
    hub.set_limit("max_queued_tasks", &(cfg.tasks as u64 + 1000).to_string());
    hub.set_limit(
        "max_tasks_per_submitter",
        &(cfg.tasks as u64 + 1000).to_string(),
    );
    hub.start();

    // The evidence outside every daemon's state: the run log.
    let evidence = tempfile::Builder::new()
        .prefix("muster-storm-evidence-")
        .tempdir()
        .expect("a temporary directory");
    let run_log = evidence.path().join("runs.log");
    let script = agent_script(evidence.path(), &run_log);
    let script_toml = serde_json::Value::String(script.to_string_lossy().into_owned()).to_string();
    let mut sidecars: Vec<Sidecar> = (0..cfg.sidecars)
        .map(|n| {
            let sc = Sidecar::enroll(&hub, &format!("storm-{n}"), &[]);
            sc.set_slots(&hub, cfg.slots as u32);
            sc.set_agent("command", &format!("[{script_toml}]"));
            sc.set_agent("settle", "\"100ms\"");
            sc.set_agent("stop_grace", "\"1s\"");
            sc
        })
        .collect();
    for sc in &mut sidecars {
        sc.start();
    }
    for sc in &mut sidecars {
        sc.wait_connected(true, CONNECT);
        hub.wait_agent_state(sc.name(), "online", CONNECT);
    }
    let setup_s = t0.elapsed().as_secs_f64();

    // --- storm: submitters on threads, chaos on this one ---
    let storm_start = Instant::now();
    let submit_deadline = storm_start + Duration::from_secs(180 + cfg.tasks as u64 / 2);
    let log = Mutex::new(SubmitLog::default());
    let next_index = AtomicUsize::new(0);
    let submitters_done = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let data = hub.data_dir().to_path_buf();
    let idle = muster_protocol::tls::IDLE_TIMEOUT;
    // The freeze ends once the hub has ended the victim's attempts `lost` (after
    // idle timeout + lost grace), or at the latest after this long.
    let freeze_max = idle + Duration::from_secs(LOST_GRACE_S + 30);
    let mut chaos = Chaos::default();

    let (total_tasks, seed) = (cfg.tasks, cfg.seed);
    std::thread::scope(|scope| {
        for _ in 0..cfg.submitters {
            let (data, log, next_index, done, stop) =
                (&data, &log, &next_index, &submitters_done, &stop);
            scope.spawn(move || {
                loop {
                    let i = next_index.fetch_add(1, Ordering::SeqCst);
                    if i >= total_tasks || stop.load(Ordering::SeqCst) {
                        break;
                    }
                    submit_one(data, seed, i, submit_deadline, log);
                }
                done.fetch_add(1, Ordering::SeqCst);
            });
        }

        // The chaos loop: restarts due sidecars; kills one every 1.5–4 s, except
        // that the first fault freezes a sidecar that holds a started run
        // (SIGSTOP) until the hub has ended its attempts `lost` while its runs
        // finished, then continues it, so its outbox replays their completions,
        // which the hub must refuse (no hub kill until it has: the hub's counters
        // restart with it); kills the hub when a third, then two thirds, of the
        // tasks are acknowledged.
        let mut down_until: Vec<Option<Instant>> = vec![None; cfg.sidecars];
        let mut frozen: Option<(usize, Frozen)> = None;
        // After the continue: the hub's stale count then, and how long to wait for more.
        let mut awaiting_late: Option<(u64, Instant)> = None;
        let mut late_done = false;
        // Whether the hub has ended the frozen sidecar's attempts `lost` (after idle
        // timeout + lost grace, or lost grace after a hub restart: a restarted hub
        // counts the grace from its own start).
        let mut lost_seen = false;
        let mut frozen_at: Option<Instant> = None;
        let mut next_poll = Instant::now();
        let mut next_kill = Instant::now() + rng.millis(1500, 3000);
        let max_down = (cfg.sidecars / 2).max(1);
        let acked = || log.lock().unwrap_or_else(|p| p.into_inner()).acks.len();
        loop {
            let now = Instant::now();
            for (n, until) in down_until.iter_mut().enumerate() {
                let is_frozen = frozen.as_ref().is_some_and(|(v, _)| *v == n);
                if until.is_some_and(|u| now >= u) || (is_frozen && lost_seen) {
                    if is_frozen {
                        frozen = None; // continues it
                        chaos.freeze_s = frozen_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
                        awaiting_late = Some((stale_reports(&hub), now + LATE_REPORT_WAIT));
                        eprintln!(
                            "storm: {:5.1} s  sidecar {} continued (SIGCONT)",
                            storm_start.elapsed().as_secs_f64(),
                            sidecars[n].name()
                        );
                    } else {
                        run_log_note(
                            &run_log,
                            &format!("restart {} {}", sidecars[n].name(), epoch_ms()),
                        );
                        sidecars[n].start();
                    }
                    *until = None;
                }
            }
            let poll = now >= next_poll;
            if poll {
                next_poll = now + HUB_POLL;
            }
            if poll && frozen.is_some() && !lost_seen {
                lost_seen = lost_attempts(&hub) > 0;
                if lost_seen {
                    eprintln!(
                        "storm: {:5.1} s  the frozen sidecar's attempts ended lost",
                        storm_start.elapsed().as_secs_f64()
                    );
                }
            }
            if let Some((before, until)) = awaiting_late.filter(|_| poll) {
                let stale = stale_reports(&hub);
                if stale > before || now >= until {
                    eprintln!(
                        "storm: {:5.1} s  {} late report(s) refused since the continue",
                        storm_start.elapsed().as_secs_f64(),
                        stale.saturating_sub(before)
                    );
                    awaiting_late = None;
                    late_done = true;
                }
            }
            let all_submitted = submitters_done.load(Ordering::SeqCst) == cfg.submitters;
            if chaos.hub_kills < cfg.hub_kills && awaiting_late.is_none() {
                let threshold = cfg.tasks * (chaos.hub_kills + 1) / (cfg.hub_kills + 1);
                if acked() >= threshold || all_submitted {
                    // Its counters restart with it: keep what it counted so far.
                    chaos.stale_reports += stale_reports(&hub);
                    hub.kill9();
                    run_log_note(&run_log, "kill hub");
                    let pause = rng.millis(200, 1500);
                    std::thread::sleep(pause); // the hub stays down a moment (fault pacing)
                    let restart = Instant::now();
                    hub.start();
                    chaos.hub_kills += 1;
                    chaos
                        .hub_restart_s
                        .push(restart.elapsed().as_secs_f64() + pause.as_secs_f64());
                    eprintln!(
                        "storm: {:5.1} s  hub killed (-9) and restarted ({} acknowledged)",
                        storm_start.elapsed().as_secs_f64(),
                        acked()
                    );
                    continue;
                }
            }
            if all_submitted
                && chaos.hub_kills >= cfg.hub_kills
                && storm_start.elapsed() >= MIN_CHAOS
                && late_done
            {
                break;
            }
            if Instant::now() >= submit_deadline + Duration::from_secs(30) {
                stop.store(true, Ordering::SeqCst);
                break;
            }
            let down = down_until.iter().filter(|d| d.is_some()).count();
            if now >= next_kill && down < max_down {
                let up: Vec<usize> = (0..cfg.sidecars)
                    .filter(|n| down_until[*n].is_none())
                    .collect();
                if chaos.freezes == 0 {
                    // The first fault waits for a sidecar with a run under way.
                    if let Some(&victim) = up.iter().find(|n| holds_a_run(&sidecars[**n])) {
                        let pid = sidecars[victim].pid().expect("an up sidecar has a pid");
                        signal(pid, "STOP");
                        let guard = Frozen { pid };
                        // Its run may have ended between the look and the stop: then try again.
                        if !hub_shows_running(&hub, sidecars[victim].name()) {
                            drop(guard);
                            std::thread::sleep(Duration::from_millis(50)); // paces the retries
                            continue;
                        }
                        frozen = Some((victim, guard));
                        down_until[victim] = Some(Instant::now() + freeze_max);
                        chaos.freezes += 1;
                        eprintln!(
                            "storm: {:5.1} s  sidecar {} frozen (SIGSTOP) until its attempts are lost (at most {:.0} s; {} acknowledged)",
                            storm_start.elapsed().as_secs_f64(),
                            sidecars[victim].name(),
                            freeze_max.as_secs_f64(),
                            acked()
                        );
                        frozen_at = Some(Instant::now());
                        next_kill = Instant::now() + rng.millis(1500, 4000);
                    }
                } else {
                    let victim = up[rng.range(0, up.len() as u64 - 1) as usize];
                    let downtime = rng.millis(300, 3000);
                    sidecars[victim].kill9();
                    run_log_note(&run_log, &format!("kill {}", sidecars[victim].name()));
                    down_until[victim] = Some(Instant::now() + downtime);
                    chaos.sidecar_kills += 1;
                    eprintln!(
                        "storm: {:5.1} s  sidecar {} killed (-9), back in {:.1} s ({} acknowledged)",
                        storm_start.elapsed().as_secs_f64(),
                        sidecars[victim].name(),
                        downtime.as_secs_f64(),
                        acked()
                    );
                    next_kill = Instant::now() + rng.millis(1500, 4000);
                }
            }
            std::thread::sleep(Duration::from_millis(50)); // paces the chaos loop
        }
        // Heal: every sidecar back (the submitters may still be retrying).
        drop(frozen);
        for (n, until) in down_until.iter_mut().enumerate() {
            if until.take().is_some() && sidecars[n].pid().is_none() {
                run_log_note(
                    &run_log,
                    &format!("restart {} {}", sidecars[n].name(), epoch_ms()),
                );
                sidecars[n].start();
            }
        }
    });
    let storm_s = storm_start.elapsed().as_secs_f64();
    let log = log.into_inner().unwrap_or_else(|p| p.into_inner());
    eprintln!(
        "storm: submissions done after {storm_s:.1} s: {} acknowledged of {}, {} retried calls; last errors: {:?}",
        log.acks.len(),
        cfg.tasks,
        log.retries,
        log.last_errors
    );
    let acked_indices: BTreeSet<usize> = log.acks.iter().map(|a| a.index).collect();
    assert_eq!(
        acked_indices.len(),
        cfg.tasks,
        "not every task was acknowledged before the deadline; last errors: {:?}",
        log.last_errors
    );

    // --- heal and drain: every sidecar online, every task terminal ---
    let heal = Instant::now();
    for sc in &mut sidecars {
        sc.wait_connected(true, CONNECT);
        hub.wait_agent_state(sc.name(), "online", CONNECT);
    }
    let drain_limit = Duration::from_secs(120 + cfg.tasks as u64 / 5);
    let mut last_counts = String::new();
    wait_for(drain_limit, "every storm task terminal", || {
        let tasks = all_tasks(&hub);
        let open: Vec<(&u64, &Value)> = tasks
            .iter()
            .filter(|(_, t)| !TERMINAL.iter().any(|s| t["state"] == *s))
            .collect();
        let counts = format!("{} tasks, {} not terminal", tasks.len(), open.len());
        if counts != last_counts {
            eprintln!(
                "storm: {:5.1} s  {counts}",
                storm_start.elapsed().as_secs_f64()
            );
            last_counts = counts.clone();
        }
        if open.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{counts}; e.g. {}",
                open.iter()
                    .take(3)
                    .map(|(_, t)| t.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
        }
    });
    let drain_s = heal.elapsed().as_secs_f64();

    // --- the checker ---
    let check = Instant::now();
    let tasks = all_tasks(&hub);
    let ids: Vec<u64> = tasks.keys().copied().collect();
    let shows = task_shows(&hub, &ids);
    let events = events_until_marker(&hub, sidecars[0].name(), Duration::from_secs(120));
    chaos.stale_reports += stale_reports(&hub);
    // Every run logs its end by itself (a stopped one on SIGTERM); wait for the last ones.
    let runs = wait_for(RUNS_END_WAIT, "every logged run ended", || {
        let runs = read_run_log(&run_log).unwrap_or_else(|e| panic!("{e}"));
        match runs.iter().find(|r| r.ended.is_none()) {
            None => Ok(runs),
            Some(r) => Err(format!("{r:?} has not ended")),
        }
    });
    let by_index: BTreeMap<usize, u64> = log.acks.iter().map(|a| (a.index, a.id)).collect();
    let fail_first: BTreeSet<u64> = by_index
        .iter()
        .filter(|(i, _)| task_plan(cfg.seed, **i).1)
        .map(|(_, id)| *id)
        .collect();
    let mut verdict = check_invariants(&log.acks, &tasks, &shows, &events);
    let restarts = restarts_in(&run_log);
    check_runs(&mut verdict, &shows, &runs, &restarts, &fail_first);
    let check_s = check.elapsed().as_secs_f64();

    // Every process survived (the sidecars that were not killed last, the hub).
    assert!(hub.pid().is_some(), "the hub is not running");
    for sc in &mut sidecars {
        assert!(
            sc.exited().is_none(),
            "sidecar {} exited by itself:\n{}",
            sc.name(),
            sc.log()
        );
    }
    let hub_log = hub.log();
    assert!(!hub_log.contains("panicked"), "the hub panicked");
    for sc in &sidecars {
        assert!(
            !sc.log().contains("panicked"),
            "sidecar {} panicked",
            sc.name()
        );
    }

    let existing = log.acks.iter().filter(|a| a.existing).count();
    let completed = verdict.states.get("completed").copied().unwrap_or(0);
    let lost = verdict.outcomes.get("lost").copied().unwrap_or(0);
    let completed_attempts = verdict.outcomes.get("completed").copied().unwrap_or(0);
    let exited_0 = verdict.run_ends.get("0").copied().unwrap_or(0);
    eprintln!(
        "storm summary: seed {seed}, {sc} sidecars × {slots} slots\n  \
         submitted {submitted}, acknowledged {acked}, completed {completed}; final states: {states:?}\n  \
         attempts: {attempts} (at most {maxa} for one task), by outcome: {outcomes:?}\n  \
         runs logged: {runs}, by exit code: {run_ends:?}; {superseded} exited 0 for a superseded attempt, \
         {overlaps} overlapped the next attempt, {late} superseded started after the next\n  \
         fail_first: {ff} tasks, attempt 1 failed by its exit code in {fff}\n  \
         lost attempts: {lost}, late reports refused: {stale}\n  \
         chaos: {kills} sidecar kills, {freezes} freeze of {freeze_s:.1} s, {hub_kills} hub kills (down/restart {restarts:?} s)\n  \
         events read: {events}\n  \
         submissions: {retries} retried calls, {existing} answered by an existing key\n  \
         time: build {build_s:.1} s, setup {setup_s:.1} s, storm {storm_s:.1} s, heal and drain {drain_s:.1} s, check {check_s:.1} s, total {total:.1} s\n  \
         invariants: {verdict_text}",
        seed = cfg.seed,
        sc = cfg.sidecars,
        slots = cfg.slots,
        submitted = cfg.tasks,
        acked = acked_indices.len(),
        states = verdict.states,
        attempts = verdict.attempts,
        maxa = verdict.max_attempts_seen,
        outcomes = verdict.outcomes,
        runs = verdict.runs,
        run_ends = verdict.run_ends,
        superseded = verdict.superseded_successes,
        overlaps = verdict.superseded_overlaps,
        late = verdict.late_superseded_starts,
        ff = verdict.fail_first,
        fff = verdict.fail_first_failed,
        stale = chaos.stale_reports,
        events = verdict.events,
        kills = chaos.sidecar_kills,
        freezes = chaos.freezes,
        freeze_s = chaos.freeze_s,
        hub_kills = chaos.hub_kills,
        restarts = chaos
            .hub_restart_s
            .iter()
            .map(|s| (s * 10.0).round() / 10.0)
            .collect::<Vec<_>>(),
        retries = log.retries,
        total = t0.elapsed().as_secs_f64(),
        verdict_text = if verdict.violations.is_empty() {
            "all hold".to_string()
        } else {
            format!("{} VIOLATED", verdict.violations.len())
        },
    );
    assert!(
        verdict.violations.is_empty(),
        "storm seed {} broke invariants (repeat with: {repeat}):\n{}",
        cfg.seed,
        verdict.violations.join("\n")
    );
    // The totals, so a storm that did little cannot pass.
    let why = format!("(repeat with: {repeat})");
    assert_eq!(completed, cfg.tasks, "tasks completed {why}");
    assert_eq!(completed_attempts, cfg.tasks, "completed attempts {why}");
    assert_eq!(
        verdict.outcomes.values().sum::<usize>(),
        verdict.attempts,
        "attempts by outcome add up {why}"
    );
    assert_eq!(
        exited_0,
        cfg.tasks + verdict.superseded_successes,
        "runs that exited 0: one per task, plus those of superseded attempts {why}"
    );
    assert!(verdict.runs >= cfg.tasks, "runs logged {why}");
    assert!(lost >= 1, "no attempt ended lost {why}");
    assert!(chaos.stale_reports >= 1, "no late report was refused {why}");
    assert_eq!(chaos.freezes, 1, "the sidecar freeze did not happen {why}");
    assert!(chaos.sidecar_kills >= 1, "no sidecar was killed {why}");
    assert_eq!(
        chaos.hub_kills, cfg.hub_kills,
        "the storm did not kill the hub as often as asked {why}"
    );
    if verdict.fail_first > 0 {
        assert!(
            verdict.fail_first_failed >= 1,
            "no fail_first task's attempt 1 failed by its exit code {why}"
        );
    }
}

/// The run-log checker is not vacuous: each contradiction between the hub's
/// histories and the run log that it exists to catch is reported.
#[test]
fn run_log_checker_reports_runs_that_contradict_the_hub() {
    fn run(
        task: u64,
        generation: u64,
        agent: &str,
        started: usize,
        end: Option<(usize, i64)>,
    ) -> LoggedRun {
        LoggedRun {
            task,
            generation,
            agent: agent.into(),
            pid: 100 + started as u64,
            started,
            ended: end,
        }
    }
    fn show(attempts: Value) -> Value {
        serde_json::json!({ "state": "completed", "attempt_history": attempts, "attempts_not_shown": 0 })
    }
    let completed_once = |pid: u64| {
        show(
            serde_json::json!([{ "generation": 1, "agent": "a", "outcome": "completed", "pid": pid }]),
        )
    };
    let check = |shows: &[(u64, Value)], runs: &[LoggedRun], restarts: &[Restart], ff: &[u64]| {
        let mut v = Verdict::default();
        let shows: BTreeMap<u64, Value> = shows.iter().cloned().collect();
        check_runs(
            &mut v,
            &shows,
            runs,
            restarts,
            &ff.iter().copied().collect(),
        );
        v
    };
    // The honest case holds.
    let v = check(
        &[(1, completed_once(100))],
        &[run(1, 1, "a", 0, Some((1, 0)))],
        &[],
        &[],
    );
    assert!(v.violations.is_empty(), "{:?}", v.violations);
    // Cases that must be reported, each with what it breaks.
    /// What is wrong, the histories, the runs, the restarts, the `fail_first` tasks.
    type Case = (
        &'static str,
        Vec<(u64, Value)>,
        Vec<LoggedRun>,
        Vec<Restart>,
        Vec<u64>,
    );
    let cases: Vec<Case> = vec![
        (
            "a completion with no run",
            vec![(1, completed_once(100))],
            vec![],
            vec![],
            vec![],
        ),
        (
            "a completion whose run failed",
            vec![(1, completed_once(100))],
            vec![run(1, 1, "a", 0, Some((1, 1)))],
            vec![],
            vec![],
        ),
        (
            "one attempt run twice with no restart between",
            vec![(1, completed_once(102))],
            vec![
                run(1, 1, "a", 0, Some((1, 0))),
                run(1, 1, "a", 2, Some((3, 0))),
            ],
            vec![],
            vec![],
        ),
        (
            "two runs of one attempt alive at once",
            vec![(1, completed_once(101))],
            vec![
                run(1, 1, "a", 0, Some((2, 143))),
                run(1, 1, "a", 1, Some((3, 0))),
            ],
            vec![],
            vec![],
        ),
        (
            "a run the hub never assigned",
            vec![(1, completed_once(100))],
            vec![
                run(1, 1, "a", 0, Some((1, 0))),
                run(1, 2, "a", 2, Some((3, 0))),
            ],
            vec![],
            vec![],
        ),
        (
            "a run that never ended",
            vec![(1, completed_once(100))],
            vec![run(1, 1, "a", 0, Some((1, 0))), run(2, 1, "a", 2, None)],
            vec![],
            vec![],
        ),
        (
            "a fail_first task whose attempt 1 completed",
            vec![(1, completed_once(100))],
            vec![run(1, 1, "a", 0, Some((1, 0)))],
            vec![],
            vec![1],
        ),
        (
            "the completion is another run than the one that exited 0 (pid)",
            vec![(1, completed_once(7))],
            vec![run(1, 1, "a", 0, Some((1, 0)))],
            vec![],
            vec![],
        ),
    ];
    for (what, shows, runs, restarts, ff) in cases {
        let v = check(&shows, &runs, &restarts, &ff);
        assert!(!v.violations.is_empty(), "not reported: {what}");
    }
    // One attempt run again across a restart of its sidecar is a violation,
    // whenever the hub heard its acceptance.
    let restart = Restart {
        line: 2,
        agent: "a".into(),
        at_ms: 5_000,
    };
    let rerun = [
        run(1, 1, "a", 0, Some((1, 0))),
        run(1, 1, "a", 3, Some((4, 0))),
    ];
    let accepted = |at: u64| {
        show(
            serde_json::json!([{ "generation": 1, "agent": "a", "outcome": "completed", "pid": 103, "accepted_at": at }]),
        )
    };
    let v = check(
        &[(1, accepted(6_000))],
        &rerun,
        std::slice::from_ref(&restart),
        &[],
    );
    assert!(
        !v.violations.is_empty(),
        "not reported: an attempt run again after a restart"
    );
    let v = check(&[(1, accepted(4_000))], &rerun, &[restart], &[]);
    assert!(
        !v.violations.is_empty(),
        "not reported: an accepted attempt run again"
    );
}
