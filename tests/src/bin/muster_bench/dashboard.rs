//! The `dashboard` mode: the web dashboard and `/api/v1` over a big store.
//!
//! ```text
//! seed (hub stopped): 10,000 agents + identities, 1,000,000 tasks (+ attempts)
//!   written with the hub's own Store::commit, large batches
//! serve with [dashboard] listen = 127.0.0.1:<port>
//!   ├─ GET /fleet (session cookie), /tasks (cookie), /api/v1/agents,
//!   │  /api/v1/tasks (plain, ?state=, ?q=, 10th page by cursor)   request → full body
//!   ├─ 100 × GET /api/v1/events (SSE) held open: hub CPU at idle from /proc
//!   └─ POST /api/v1/tasks, one at a time: submit → the event on all 100 streams
//! ```
//!
//! Every HTTP client is blocking `ureq` on its own thread, so the bench's own
//! runtime never sits between a request and its clock.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use muster_hub::core::{
    AgentRecord, AttemptRecord, Audit, Identity, Millis, TaskRecord, TaskState, Write,
};
use muster_hub::store::{DB_FILE, Store};
use muster_protocol::msg::{Failure, HostFigures, OpRequest, Outcome, Role, TimeoutAction, Usage};
use muster_protocol::{Generation, TaskId};
use serde_json::{Value, json};

use crate::hub::HubProc;
use crate::util::{ms, phase, round3};

/// How long the hub may take to restore a big store and answer.
const HUB_READY: Duration = Duration::from_secs(600);
/// Longest a single HTTP request may take before the run fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one event may take to reach every stream before the run fails.
const FANOUT_DEADLINE: Duration = Duration::from_secs(30);
/// Largest body read (the fleet page of 10,000 agents is a few MB).
const BODY_MAX: u64 = 256 * 1024 * 1024;

/// `dashboard` options.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DashboardArgs {
    /// Registered agents (registry records and identities) in the store.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) agents: usize,
    /// Tasks in the store, mixed states (85 % completed, 6 % failed, 4 % cancelled, 4 % queued, 1 % running).
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) tasks: u64,
    /// Tasks per seeding transaction.
    #[arg(long, default_value_t = 50_000)]
    pub(crate) batch: u64,
    /// Timed requests per page or endpoint (after 3 untimed).
    #[arg(long, default_value_t = 50)]
    pub(crate) requests: usize,
    /// Event streams held open.
    #[arg(long, default_value_t = 100)]
    pub(crate) streams: usize,
    /// Events timed to every stream, one after another.
    #[arg(long, default_value_t = 20)]
    pub(crate) events: usize,
    /// Seconds of idle over which hub CPU is read, without and with the streams.
    #[arg(long, default_value_t = 10)]
    pub(crate) idle_s: u64,
}

// === Seeding ===

/// A small deterministic generator, so every run seeds the same store.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
        of[self.below(of.len() as u64) as usize]
    }
}

/// Verbs and objects of task titles.
const VERBS: [&str; 12] = [
    "Fix",
    "Add",
    "Refactor",
    "Document",
    "Speed up",
    "Remove",
    "Test",
    "Port",
    "Review",
    "Upgrade",
    "Investigate",
    "Simplify",
];
const OBJECTS: [&str; 10] = [
    "the flaky retry test in",
    "error messages of",
    "pagination in",
    "the config loader of",
    "logging in",
    "the cache layer of",
    "input checks in",
    "metrics for",
    "the CLI of",
    "docs for",
];
/// 100 module names: a search for one matches about 1 % of titles.
fn module(i: u64) -> String {
    const STEMS: [&str; 20] = [
        "auth",
        "billing",
        "search",
        "ingest",
        "export",
        "scheduler",
        "webhooks",
        "storage",
        "gateway",
        "notify",
        "profile",
        "reports",
        "audit",
        "catalog",
        "checkout",
        "invoice",
        "ledger",
        "mailer",
        "media",
        "sync",
    ];
    const SUFFIX: [&str; 5] = ["core", "api", "worker", "ui", "db"];
    format!(
        "{}-{}",
        STEMS[(i % 20) as usize],
        SUFFIX[((i / 20) % 5) as usize]
    )
}
/// The module searched for by `q=`.
const SEARCHED: &str = "ledger-worker";
/// A search that matches no title: the scan bound's worst case.
const SEARCHED_NONE: &str = "no-such-module";
const CAPABILITY_SETS: [&[&str]; 6] = [
    &["rust"],
    &["rust", "review"],
    &["python"],
    &["python", "review"],
    &["gpu", "python"],
    &["docs"],
];
const TEAMS: [&str; 6] = ["infra", "web", "data", "ml", "platform", "mobile"];
const SUBMITTERS: [&str; 5] = ["alice", "bob", "ci-bot", "carol", "nightly"];

/// Now, and never less than a year after the epoch, so the generated times
/// (up to 30 days back) cannot go below zero on a machine with a wrong clock.
fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
        .max(365 * 86_400_000)
}

fn agent_name(i: usize) -> String {
    format!("agent-{i:05}")
}

/// A registry record and an enrolled identity for agent `i`.
fn agent(i: usize, now: Millis, rng: &mut Rng) -> (AgentRecord, Identity) {
    let name = agent_name(i);
    let caps: Vec<String> = CAPABILITY_SETS[i % CAPABILITY_SETS.len()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let slots = 1 + (i % 8) as u32;
    let enrolled_at = now - 30 * 86_400_000 + rng.below(20 * 86_400_000);
    let revoked = i.is_multiple_of(200);
    let rec = AgentRecord {
        name: name.clone(),
        version: "0.1.0".into(),
        capabilities: caps.clone(),
        slots,
        enrolled_at,
        last_seen: Some(now - rng.below(3_600_000)),
        host: Some(HostFigures {
            load1: rng.below(400) as f64 / 100.0,
            mem_available_bytes: (1 + rng.below(60)) << 30,
            mem_total_bytes: 64 << 30,
            disk_free_bytes: (10 + rng.below(500)) << 30,
            cpus: 4 << (i % 4),
        }),
        self_test: None,
        drained: i.is_multiple_of(50),
        revoked,
    };
    let identity = Identity {
        name,
        role: Role::Agent,
        fingerprint: format!("{:064x}", 0xbe00_0000_u64 + i as u64),
        key_fingerprint: format!("{:064x}", 0xce00_0000_u64 + i as u64),
        created_at: enrolled_at,
        revoked_at: revoked.then_some(now - 86_400_000),
        capabilities: caps,
        slots,
    };
    (rec, identity)
}

/// Task `id` and, if it was ever assigned, its one attempt. States: 85 %
/// completed, 6 % failed, 4 % cancelled, 4 % queued, 1 % running. Finished
/// tasks ended within the last week, so retention prunes nothing during the
/// run, and running ones started in the last half hour, so none times out.
fn task(id: u64, agents: usize, now: Millis, rng: &mut Rng) -> (TaskRecord, Option<AttemptRecord>) {
    let r = rng.below(100);
    let state = match r {
        0..85 => TaskState::Completed,
        85..91 => TaskState::Failed,
        91..95 => TaskState::Cancelled,
        95..99 => TaskState::Queued,
        _ => TaskState::Running,
    };
    // Running tasks started within their hour's timeout, so none times out
    // during the run; the rest within the last week.
    let submitted_at = if state == TaskState::Running {
        now - 60_000 - rng.below(1_800_000)
    } else {
        now - 7 * 86_400_000 + rng.below(7 * 86_400_000 - 3_600_000)
    };
    let updated_at = submitted_at + 1_000 + rng.below(3_000_000);
    let m = rng.below(100);
    let title = format!(
        "{} {} {} (#{})",
        rng.pick(&VERBS),
        rng.pick(&OBJECTS),
        module(m),
        10_000 + rng.below(90_000)
    );
    let caps: Vec<String> = CAPABILITY_SETS[rng.below(CAPABILITY_SETS.len() as u64) as usize]
        .iter()
        .take(1)
        .map(|s| s.to_string())
        .collect();
    let submitter = rng.pick(&SUBMITTERS);
    // Queued tasks never ran; half the cancelled ones were cancelled before.
    let never_ran = match state {
        TaskState::Queued => true,
        TaskState::Cancelled => rng.below(2) == 0,
        _ => false,
    };
    let assigned = !never_ran;
    let agent = assigned.then(|| agent_name(rng.below(agents as u64) as usize));
    let generation = u64::from(assigned);
    let mut audit = vec![Audit {
        at: submitted_at,
        who: submitter.to_string(),
        action: "submit".into(),
    }];
    if state == TaskState::Cancelled {
        audit.push(Audit {
            at: updated_at,
            who: "alice".into(),
            action: "cancel".into(),
        });
    }
    let t = TaskRecord {
        id: TaskId(id),
        title,
        description: format!(
            "Generated by muster-bench dashboard for task {id}. Keep the change small and add a test."
        ),
        capabilities: caps,
        priority: (rng.below(3) as i32) - 1,
        max_attempts: 3,
        timeout_ms: Some(3_600_000),
        timeout_action: TimeoutAction::Fail,
        after: Vec::new(),
        key: None,
        state,
        generation: Generation(generation),
        attempts: generation as u32,
        not_before: None,
        agent: agent.clone(),
        submitted_at,
        updated_at: if state.is_terminal() {
            updated_at
        } else {
            submitted_at
        },
        progress_at: (state == TaskState::Running).then_some(now - rng.below(600_000)),
        progress_note: (state == TaskState::Running).then(|| "running the tests".into()),
        result: (state == TaskState::Completed).then(|| "done: 3 files changed".into()),
        reason: match state {
            TaskState::Failed => Some("the agent exited with status 1".into()),
            TaskState::Cancelled => Some("cancelled by alice".into()),
            _ => None,
        },
        audit,
        repo: m
            .is_multiple_of(3)
            .then(|| format!("git@example.com:acme/{}.git", module(m))),
        base: None,
        env: Vec::new(),
        labels: vec![
            ("team".into(), TEAMS[(m % 6) as usize].into()),
            ("submitter".into(), submitter.into()),
        ],
    };
    let attempt = agent.map(|agent| {
        let (outcome, error) = match state {
            TaskState::Completed => (Some(Outcome::Completed), None),
            TaskState::Failed => (
                Some(Outcome::Failed),
                Some(Failure {
                    reason: "the agent exited with status 1".into(),
                    exit_code: Some(1),
                    command: vec!["/usr/local/bin/agent".into(), "--task".into()],
                    stderr_tail: "error: 2 tests failed\n".into(),
                    ..Failure::default()
                }),
            ),
            TaskState::Cancelled => (Some(Outcome::Cancelled), None),
            _ => (None, None),
        };
        let ended = state.is_terminal().then_some(updated_at);
        AttemptRecord {
            task: TaskId(id),
            generation: Generation(1),
            agent,
            assigned_at: submitted_at + 50,
            accepted_at: Some(submitted_at + 60),
            started_at: Some(submitted_at + 200),
            ended_at: ended,
            outcome,
            error,
            pid: Some(1000 + (id % 30_000) as u32),
            session: None,
            work: None,
            usage: Some(Usage {
                model: Some("model-x".into()),
                input_tokens: 10_000 + rng.below(200_000),
                output_tokens: 1_000 + rng.below(20_000),
                cache_read_tokens: rng.below(100_000),
                cache_write_tokens: 0,
                cost_micro_usd: Some(rng.below(2_000_000)),
            }),
        }
    });
    (t, attempt)
}

/// What seeding took.
struct Seeded {
    first: u64,
    last: u64,
    agents_s: f64,
    tasks_s: f64,
    commits: usize,
}

/// Writes the agents and tasks into the stopped hub's store through its own
/// `Store::commit` (one durable transaction per batch).
fn seed(hub_dir: &Path, a: &DashboardArgs) -> Result<Seeded> {
    let store = Store::open(&hub_dir.join(DB_FILE))?;
    let now = now_ms();
    let first = store.restore(now)?.next_task_id;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut commits = 0;
    let t = Instant::now();
    for chunk in (0..a.agents).collect::<Vec<_>>().chunks(5_000) {
        let mut writes = Vec::with_capacity(chunk.len() * 2);
        for &i in chunk {
            let (rec, id) = agent(i, now, &mut rng);
            writes.push(Write::Agent(rec));
            writes.push(Write::Identity(id));
        }
        store.commit(&writes, u64::MAX)?;
        commits += 1;
    }
    let agents_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let end = first + a.tasks;
    let mut id = first;
    while id < end {
        let stop = (id + a.batch.max(1)).min(end);
        let mut writes = Vec::with_capacity(((stop - id) * 2 + 1) as usize);
        for i in id..stop {
            let (task, attempt) = task(i, a.agents.max(1), now, &mut rng);
            writes.push(Write::Task(task));
            if let Some(at) = attempt {
                writes.push(Write::Attempt(at));
            }
        }
        writes.push(Write::NextTaskId(stop));
        store.commit(&writes, u64::MAX)?;
        commits += 1;
        id = stop;
    }
    Ok(Seeded {
        first,
        last: end.saturating_sub(1),
        agents_s,
        tasks_s: t.elapsed().as_secs_f64(),
        commits,
    })
}

// === HTTP ===

/// A blocking client that reports every status (no redirects followed, no
/// status turned into an error).
fn client(timeout: Option<Duration>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .max_redirects(0)
        .http_status_as_error(false)
        .timeout_global(timeout)
        .build()
        .into()
}

/// Credentials of the run.
#[derive(Clone)]
struct Creds {
    base: String,
    /// An operator API token (reads).
    read: String,
    /// An admin API token (submissions).
    write: String,
    /// `muster_session=…` of a signed-in operator session.
    cookie: String,
}

/// How a request is authenticated.
#[derive(Clone, Copy)]
enum Auth {
    Bearer,
    Cookie,
}

/// One GET: status, body bytes and the time from sending it to its full body.
fn get(agent: &ureq::Agent, c: &Creds, path: &str, auth: Auth) -> Result<(u16, String, f64)> {
    let url = format!("{}{path}", c.base);
    let req = agent.get(&url);
    let req = match auth {
        Auth::Bearer => req.header("Authorization", &format!("Bearer {}", c.read)),
        Auth::Cookie => req.header("Cookie", &c.cookie),
    };
    let t = Instant::now();
    let mut res = req.call().with_context(|| format!("GET {url}"))?;
    let body = res
        .body_mut()
        .with_config()
        .limit(BODY_MAX)
        .read_to_string()
        .with_context(|| format!("reading GET {url}"))?;
    Ok((res.status().as_u16(), body, ms(t.elapsed())))
}

/// POSTs the login link's secret to `/login`: the session cookie it sets.
fn sign_in(agent: &ureq::Agent, base: &str, login_url: &str) -> Result<String> {
    let token = login_url
        .split_once("token=")
        .map(|(_, t)| t.to_string())
        .ok_or_else(|| anyhow!("not a login URL: {login_url}"))?;
    let res = agent
        .post(&format!("{base}/login"))
        .send_form([("token", token.as_str())])
        .context("POST /login")?;
    if res.status().as_u16() != 303 {
        bail!("POST /login answered {} (want 303)", res.status());
    }
    let cookie = res
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .ok_or_else(|| anyhow!("POST /login set no cookie"))?;
    Ok(cookie.to_string())
}

/// p50, p95, max and mean of `v` in ms.
fn percentiles(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return json!({});
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    json!({
        "n": v.len(),
        "p50_ms": round3(at(0.5)),
        "p95_ms": round3(at(0.95)),
        "max_ms": round3(at(1.0)),
        "mean_ms": round3(v.iter().sum::<f64>() / v.len() as f64),
    })
}

/// One page or endpoint timed `n` times after 3 untimed requests.
fn timed(agent: &ureq::Agent, c: &Creds, path: &str, auth: Auth, n: usize) -> Result<Value> {
    let mut times = Vec::with_capacity(n);
    let mut bytes = 0;
    let mut rows = Value::Null;
    for i in 0..n + 3 {
        let (status, body, took) = get(agent, c, path, auth)?;
        if status != 200 {
            let start = body.len().saturating_sub(400);
            let start = (start..body.len())
                .find(|i| body.is_char_boundary(*i))
                .unwrap_or(0);
            bail!("GET {path} answered {status}: {}", &body[start..]);
        }
        bytes = body.len();
        if i == 0 {
            rows = rows_of(&body);
        }
        if i >= 3 {
            times.push(took);
        }
    }
    let mut v = percentiles(times);
    v["path"] = path.into();
    v["body_bytes"] = bytes.into();
    v["rows"] = rows;
    Ok(v)
}

/// How many rows a JSON page or an HTML table answered, for the record.
fn rows_of(body: &str) -> Value {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        for k in ["agents", "tasks"] {
            if let Some(a) = v[k].as_array() {
                return a.len().into();
            }
        }
        return Value::Null;
    }
    (body.matches("<tr").count().saturating_sub(1)).into()
}

/// The cursor of page `n` (1-based) of `/api/v1/tasks?limit=50`.
fn cursor_of_page(agent: &ureq::Agent, c: &Creds, n: usize) -> Result<u64> {
    let mut cursor: Option<u64> = None;
    for _ in 1..n {
        let path = match cursor {
            Some(k) => format!("/api/v1/tasks?limit=50&cursor={k}"),
            None => "/api/v1/tasks?limit=50".into(),
        };
        let (status, body, _) = get(agent, c, &path, Auth::Bearer)?;
        if status != 200 {
            bail!("GET {path} answered {status}: {body}");
        }
        let v: Value = serde_json::from_str(&body)?;
        cursor = Some(
            v["next_cursor"]
                .as_u64()
                .ok_or_else(|| anyhow!("page without next_cursor: {path}"))?,
        );
    }
    cursor.ok_or_else(|| anyhow!("page {n} has no cursor"))
}

/// The pages and endpoints, each timed (run on a blocking thread).
fn measure_pages(c: &Creds, n: usize) -> Result<Value> {
    let agent = client(Some(REQUEST_TIMEOUT));
    let mut out = serde_json::Map::new();
    out.insert(
        "fleet_page".into(),
        timed(&agent, c, "/fleet", Auth::Cookie, n)?,
    );
    // The tasks page may not be served by this build yet: then say so.
    let (status, _, _) = get(&agent, c, "/tasks", Auth::Cookie)?;
    let tasks_page = if status == 404 {
        json!({ "path": "/tasks", "absent": "this build serves no /tasks page (404)" })
    } else {
        timed(&agent, c, "/tasks", Auth::Cookie, n)?
    };
    out.insert("tasks_page".into(), tasks_page);
    out.insert(
        "api_agents".into(),
        timed(&agent, c, "/api/v1/agents", Auth::Bearer, n)?,
    );
    out.insert(
        "api_tasks".into(),
        timed(&agent, c, "/api/v1/tasks?limit=50", Auth::Bearer, n)?,
    );
    out.insert(
        "api_tasks_state_queued".into(),
        timed(
            &agent,
            c,
            "/api/v1/tasks?limit=50&state=queued",
            Auth::Bearer,
            n,
        )?,
    );
    out.insert(
        "api_tasks_state_failed".into(),
        timed(
            &agent,
            c,
            "/api/v1/tasks?limit=50&state=failed",
            Auth::Bearer,
            n,
        )?,
    );
    out.insert(
        "api_tasks_search".into(),
        timed(
            &agent,
            c,
            &format!("/api/v1/tasks?limit=50&q={SEARCHED}"),
            Auth::Bearer,
            n,
        )?,
    );
    out.insert(
        "api_tasks_search_no_match".into(),
        timed(
            &agent,
            c,
            &format!("/api/v1/tasks?limit=50&q={SEARCHED_NONE}"),
            Auth::Bearer,
            n,
        )?,
    );
    let cursor = cursor_of_page(&agent, c, 10)?;
    out.insert(
        "api_tasks_page_10".into(),
        timed(
            &agent,
            c,
            &format!("/api/v1/tasks?limit=50&cursor={cursor}"),
            Auth::Bearer,
            n,
        )?,
    );
    Ok(Value::Object(out))
}

// === Event streams ===

/// An event seen on a stream: which stream, the data line, when.
type Seen = (usize, String, Instant);

/// Opens `n` event streams, each on its own thread reading lines; returns once
/// every stream has its response headers. A stream ends when the hub closes it.
fn open_streams(
    c: &Creds,
    n: usize,
    seen: std_mpsc::Sender<Seen>,
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let open = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        // One credential may have 32 requests in flight (the hub's per-caller
        // bound): open the streams 16 at a time, as separate clients would.
        while i.saturating_sub(open.load(Ordering::SeqCst) + failed.load(Ordering::SeqCst)) >= 16 {
            if t0.elapsed() > REQUEST_TIMEOUT {
                bail!(
                    "event streams did not open within {} s",
                    REQUEST_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let (c, seen, open, failed) = (c.clone(), seen.clone(), open.clone(), failed.clone());
        threads.push(std::thread::spawn(move || {
            let agent = client(None);
            let res = agent
                .get(&format!("{}/api/v1/events", c.base))
                .header("Authorization", &format!("Bearer {}", c.read))
                .header("Accept", "text/event-stream")
                .call();
            let res = match res {
                Ok(r) if r.status().as_u16() == 200 => r,
                _ => {
                    failed.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            };
            open.fetch_add(1, Ordering::SeqCst);
            let reader = BufReader::new(res.into_body().into_reader());
            for line in reader.lines() {
                let Ok(line) = line else { return };
                if let Some(data) = line.strip_prefix("data:") {
                    let at = Instant::now();
                    if seen.send((i, data.to_string(), at)).is_err() {
                        return;
                    }
                }
            }
        }));
    }
    let t = Instant::now();
    while open.load(Ordering::SeqCst) + failed.load(Ordering::SeqCst) < n {
        if t.elapsed() > REQUEST_TIMEOUT {
            bail!(
                "only {} of {n} event streams opened within {} s",
                open.load(Ordering::SeqCst),
                REQUEST_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if failed.load(Ordering::SeqCst) > 0 {
        bail!(
            "{} of {n} event streams were refused",
            failed.load(Ordering::SeqCst)
        );
    }
    Ok(threads)
}

/// Submits `events` tasks one at a time and times each one's event to every
/// stream: the slowest stream's time (all reached) and the median stream's.
fn fan_out(
    c: &Creds,
    streams: usize,
    events: usize,
    seen: &std_mpsc::Receiver<Seen>,
) -> Result<Value> {
    let agent = client(Some(REQUEST_TIMEOUT));
    let nonce = now_ms();
    let mut all = Vec::with_capacity(events);
    let mut median = Vec::with_capacity(events);
    let mut ack = Vec::with_capacity(events);
    // Whatever the streams saw before (the replay of recent events) is not timed.
    while seen.try_recv().is_ok() {}
    for k in 0..events {
        let title = format!("dash-bench-event-{nonce}-{k}");
        let t = Instant::now();
        let res = agent
            .post(&format!("{}/api/v1/tasks", c.base))
            .header("Authorization", &format!("Bearer {}", c.write))
            .send_json(json!({ "title": title }))
            .context("POST /api/v1/tasks")?;
        ack.push(ms(t.elapsed()));
        if res.status().as_u16() != 201 {
            bail!("POST /api/v1/tasks answered {}", res.status());
        }
        let mut got = vec![None::<Instant>; streams];
        let mut left = streams;
        let deadline = t + FANOUT_DEADLINE;
        while left > 0 {
            let wait = deadline.saturating_duration_since(Instant::now());
            let (i, data, at) = seen.recv_timeout(wait).map_err(|_| {
                anyhow!(
                    "event {k} reached {} of {streams} streams within {} s",
                    streams - left,
                    FANOUT_DEADLINE.as_secs()
                )
            })?;
            if data.contains(&title) && got[i].is_none() {
                got[i] = Some(at);
                left -= 1;
            }
        }
        let mut each: Vec<f64> = got.iter().flatten().map(|at| ms(*at - t)).collect();
        each.sort_by(f64::total_cmp);
        all.push(each.last().copied().unwrap_or(0.0));
        median.push(each.get(each.len() / 2).copied().unwrap_or(0.0));
    }
    Ok(json!({
        "events": events,
        "streams": streams,
        "to_all_streams": percentiles(all),
        "to_median_stream": percentiles(median),
        "submit_answered": percentiles(ack),
    }))
}

/// Hub CPU over `secs` seconds of idle, in % of one core.
async fn idle_cpu(hub: &HubProc, secs: u64) -> Result<f64> {
    let c0 = hub.cpu_seconds()?;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let c1 = hub.cpu_seconds()?;
    Ok(round3(100.0 * (c1 - c0) / t.elapsed().as_secs_f64()))
}

/// A free TCP port on 127.0.0.1.
fn free_tcp_port() -> Result<u16> {
    let s = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(s.local_addr()?.port())
}

/// Runs a blocking closure on its own thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("bench thread")?
}

pub(crate) async fn dashboard(bin: &Path, root: &Path, a: &DashboardArgs) -> Result<Value> {
    let dir = root.join("hub");
    let port = free_tcp_port()?;
    let mut hub = HubProc::init(bin, &dir, |cfg| {
        cfg.dashboard.listen = Some(([127, 0, 0, 1], port).into());
        // The registered agents have no sessions: without these, their lost
        // grace (the running tasks re-queued) and down alerts (one per agent)
        // would fire in the middle of the run.
        cfg.policy.lost_grace = Duration::from_secs(24 * 3600);
        cfg.policy.agent_down_alert = Duration::from_secs(24 * 3600);
    })
    .await?;
    let t = Instant::now();
    let (args, hub_dir) = (a.clone(), dir.clone());
    let seeded = phase(
        "seed the store",
        Duration::from_secs(3600),
        blocking(move || seed(&hub_dir, &args)),
    )
    .await?;
    let seed_s = t.elapsed().as_secs_f64();
    let db_bytes = std::fs::metadata(dir.join(DB_FILE))?.len();
    let ready = phase(
        "hub start on the seeded store",
        HUB_READY,
        hub.start(HUB_READY),
    )
    .await?;
    let ops = hub.ops(1).await?;
    let token = |v: Value| -> Result<String> {
        v["token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no token in {v}"))
    };
    let read = token(
        ops.call(OpRequest::ApiTokenCreate {
            role: Role::Operator,
            ttl_s: 3600,
            name: "bench-read".into(),
        })
        .await?,
    )?;
    let write = token(
        ops.call(OpRequest::ApiTokenCreate {
            role: Role::Admin,
            ttl_s: 3600,
            name: "bench-write".into(),
        })
        .await?,
    )?;
    let login = ops
        .call(OpRequest::DashboardLogin {
            role: Some(Role::Operator),
        })
        .await?;
    let login_url = login["url"]
        .as_str()
        .ok_or_else(|| anyhow!("no url in {login}"))?
        .to_string();
    ops.close().await;
    let base = format!("http://127.0.0.1:{port}");
    let b = base.clone();
    let cookie = blocking(move || sign_in(&client(Some(REQUEST_TIMEOUT)), &b, &login_url)).await?;
    let creds = Creds {
        base,
        read,
        write,
        cookie,
    };
    let rss_before = hub.mem_kib("VmRSS")?;
    let (c, n) = (creds.clone(), a.requests);
    let pages = phase(
        "pages and endpoints",
        Duration::from_secs(1800),
        blocking(move || measure_pages(&c, n)),
    )
    .await?;
    let idle_no_streams = idle_cpu(&hub, a.idle_s).await?;
    let (tx, rx) = std_mpsc::channel();
    let (c, n) = (creds.clone(), a.streams);
    let threads = phase(
        "open the event streams",
        Duration::from_secs(120),
        blocking(move || open_streams(&c, n, tx)),
    )
    .await?;
    // Let the streams' replay of the log and their first keep-alives pass.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_streams = idle_cpu(&hub, a.idle_s).await?;
    let rss_streams = hub.mem_kib("VmRSS")?;
    let (c, streams, events) = (creds.clone(), a.streams, a.events);
    let fan = phase(
        "events to every stream",
        FANOUT_DEADLINE * (a.events as u32 + 1),
        blocking(move || fan_out(&c, streams, events, &rx)),
    )
    .await?;
    hub.stop(crate::hub::Stop::Term).await?;
    // The hub closed every stream; their threads end at the end of the body.
    for t in threads {
        let _ = t.join();
    }
    let goal = |v: &Value, limit: f64| v["p95_ms"].as_f64().map(|p| p <= limit);
    let mut goals = serde_json::Map::new();
    for (k, v) in pages.as_object().into_iter().flatten() {
        goals.insert(format!("{k} p95 ≤ 200 ms"), json!(goal(v, 200.0)));
    }
    goals.insert(
        "idle CPU with streams ≤ 5 %".into(),
        json!(idle_streams <= 5.0),
    );
    goals.insert(
        "event to all streams p50 ≤ 500 ms".into(),
        json!(fan["to_all_streams"]["p50_ms"].as_f64().map(|p| p <= 500.0)),
    );
    Ok(json!({
        "mode": "dashboard",
        "agents": a.agents,
        "tasks": a.tasks,
        "seed": {
            "method": "direct: generated agents, identities, tasks and attempts written with the hub's Store::commit while the hub is stopped",
            "task_ids": [seeded.first, seeded.last],
            "commits": seeded.commits,
            "batch": a.batch,
            "agents_s": round3(seeded.agents_s),
            "tasks_s": round3(seeded.tasks_s),
            "total_s": round3(seed_s),
            "db_bytes": db_bytes,
        },
        "hub_ready_s": round3(ready.as_secs_f64()),
        "requests_each": a.requests,
        "pages": pages,
        "idle_cpu_pct": { "no_streams": idle_no_streams, "streams": idle_streams, "over_s": a.idle_s },
        "rss_kib": { "before_streams": rss_before, "with_streams": rss_streams },
        "fan_out": fan,
        "goals_met": goals,
        "log": hub.log_path().display().to_string(),
    }))
}
