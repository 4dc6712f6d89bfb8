//! Issue 6 (metrics and health) and issue 4 item 7 (`watch`), against the real
//! binaries on 127.0.0.1: `/metrics` parses as Prometheus text and its counters
//! move when tasks run, `/healthz` turns 503 when the data directory is not
//! writable, the sidecar's own endpoint answers, and `watch --json` streams
//! state changes, resumes `--from SEQ` without gaps or repeats, and reports a
//! pruned sequence with a fresh snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use muster_tests::tasks::*;
use muster_tests::{Hub, Sidecar, bins, set_toml_key, tail, wait_for};
use serde_json::Value;

/// How long a fresh sidecar may take to connect and show up online.
const CONNECT: Duration = Duration::from_secs(20);
/// How long a few short tasks may take from submission to their end.
const TASK_END: Duration = Duration::from_secs(30);
/// How long one HTTP request may take.
const HTTP: Duration = Duration::from_secs(10);
/// How long a `watch` line may take to show up after its cause.
const EVENT: Duration = Duration::from_secs(10);

// === HTTP ===

/// A free TCP port on 127.0.0.1 (bound, read, released).
fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a TCP socket on 127.0.0.1")
}

/// `GET path` over HTTP/1.1 with `Connection: close`; returns (status, body).
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, HTTP).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(HTTP)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(HTTP)).map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8(raw).map_err(|e| format!("not UTF-8: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers: {text:?}"))?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line: {head:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// Decodes a chunked HTTP/1.1 body.
fn dechunk(mut s: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").ok_or("a chunk without a size line")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("chunk size {size:?}: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or("a truncated chunk")?;
        out.push_str(chunk);
        s = rest.get(size + 2..).ok_or("a chunk without its CRLF")?;
    }
}

/// `GET path`, asserting the request went through; returns (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

// === Prometheus text ===

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: samples and `# TYPE` declarations.
#[derive(Debug, Default)]
struct Exposition {
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
}

impl Exposition {
    /// The value of `name` with exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// The value of `name` with `labels`, treating a missing sample as 0.
    fn value_or_0(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// The label values of `label` over the samples of `name`.
    fn label_values(&self, name: &str, label: &str) -> BTreeSet<String> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.labels.get(label).cloned())
            .collect()
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn valid_name(s: &str) -> bool {
    let mut cs = s.chars();
    cs.next().is_some_and(is_name_start) && cs.all(is_name_char)
}

/// Parses `{a="x",b="y"}` (escapes `\\`, `\"`, `\n`); returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("no '{'")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("a label without '='")?;
        let key = &rest[..eq];
        if !valid_name(key) {
            return Err(format!("bad label name {key:?}"));
        }
        let mut chars = rest[eq + 1..].char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err(format!("label {key} value is not quoted"));
        }
        let mut value = String::new();
        let mut end = None;
        let mut escaped = false;
        for (i, c) in chars {
            if escaped {
                value.push(match c {
                    'n' => '\n',
                    other => other,
                });
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                end = Some(eq + 1 + i + 1);
                break;
            } else {
                value.push(c);
            }
        }
        let end = end.ok_or_else(|| format!("label {key}: unterminated value"))?;
        if labels.insert(key.to_string(), value).is_some() {
            return Err(format!("label {key} twice"));
        }
        rest = &rest[end..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err(format!("expected ',' or '}}' at {rest:?}"));
        }
    }
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse::<f64>().map_err(|e| format!("value {s:?}: {e}")),
    }
}

/// Parses Prometheus/OpenMetrics text strictly: comments are `# HELP`, `# TYPE`,
/// `# UNIT` or the final `# EOF`; every other line is `name{labels} value` or
/// `name value` with a float value; every name starts with `prefix`.
fn parse_exposition(text: &str, prefix: &str) -> Result<Exposition, String> {
    let mut exp = Exposition::default();
    let lines: Vec<&str> = text.lines().collect();
    let last = lines
        .iter()
        .rposition(|l| !l.trim().is_empty())
        .ok_or("empty exposition")?;
    // The Prometheus text format (0.0.4) has no `# EOF`; OpenMetrics ends with one.
    let _ = last;
    for (n, line) in lines.iter().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let mut parts = c.trim_start().splitn(3, ' ');
            match parts.next() {
                Some("EOF") if n == last => {}
                Some("EOF") => return Err(at("# EOF before the end".into())),
                Some("HELP" | "UNIT") => {
                    let name = parts.next().unwrap_or("");
                    if !(name.starts_with(prefix) || name.starts_with("process_"))
                        || !valid_name(name)
                    {
                        return Err(at(format!("metric name not under {prefix}")));
                    }
                }
                Some("TYPE") => {
                    let name = parts.next().unwrap_or("");
                    let ty = parts.next().unwrap_or("").trim();
                    if !(name.starts_with(prefix) || name.starts_with("process_"))
                        || !valid_name(name)
                    {
                        return Err(at(format!("metric name not under {prefix}")));
                    }
                    let known = [
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "unknown",
                        "info",
                        "stateset",
                        "gaugehistogram",
                    ];
                    if !known.contains(&ty) {
                        return Err(at(format!("unknown type {ty:?}")));
                    }
                    exp.types.insert(name.to_string(), ty.to_string());
                    // A counter is typed under its `_total` name in the text format:
                    // look it up by its family name too.
                    if ty == "counter"
                        && let Some(base) = name.strip_suffix("_total")
                    {
                        exp.types.insert(base.to_string(), ty.to_string());
                    }
                }
                _ => return Err(at("an unexpected comment".into())),
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        if !name.starts_with(prefix) && !name.starts_with("process_") {
            return Err(at(format!("metric name not under {prefix}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let value = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("no space before the value".into()))?;
        if value.contains(' ') {
            return Err(at("more than a value after the name".into()));
        }
        let value = parse_value(value).map_err(at)?;
        exp.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(exp)
}

/// `GET /metrics` (200) parsed with [`parse_exposition`].
fn scrape(addr: SocketAddr, prefix: &str) -> Exposition {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    parse_exposition(&body, prefix)
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}\n{body}"))
}

// === fleet ===

/// An initialised hub with a 1 s heartbeat and `http_listen` on a free port; not started.
fn hub_with_http() -> (Hub, SocketAddr) {
    let hub = Hub::init();
    hub.set_policy("heartbeat_interval", "\"1s\"");
    let http: SocketAddr = ([127, 0, 0, 1], free_tcp_port()).into();
    set_toml_key(
        &hub.config_path(),
        "",
        "http_listen",
        &format!("\"{http}\""),
    );
    (hub, http)
}

/// An enrolled, started sidecar (agent `/bin/true`) that the hub lists online.
fn online_sidecar(hub: &Hub, name: &str, http: Option<SocketAddr>) -> Sidecar {
    let mut sc = Sidecar::enroll(hub, name, &[]);
    sc.set_agent("settle", "\"100ms\"");
    if let Some(a) = http {
        sc.set("", "http_listen", &format!("\"{a}\""));
    }
    sc.start_connected(CONNECT);
    hub.wait_agent_state(name, "online", CONNECT);
    sc
}

/// Waits until every task in `ids` has completed.
fn wait_all_completed(hub: &Hub, ids: &[u64]) {
    wait_for(TASK_END, &format!("tasks {ids:?} completed"), || {
        for id in ids {
            let t = hub.json(&["task", "show", &id.to_string()]);
            if t["state"] != "completed" {
                return Err(t.to_string());
            }
        }
        Ok(())
    });
}

// === /metrics and /healthz ===

#[test]
fn metrics_parse_as_prometheus_text_and_counters_move_when_tasks_run() {
    let (mut hub, http) = hub_with_http();
    hub.start();
    let before = scrape(http, "muster_");

    // Every family issue 6 names is declared from the start, totals as counters
    // (at 0 for every known outcome and terminal state before anything ended).
    let families = [
        ("muster_tasks", "gauge"),
        ("muster_agents", "gauge"),
        ("muster_dispatch_latency_seconds", "histogram"),
        ("muster_heartbeats_received", "counter"),
        ("muster_attempts_ended", "counter"),
        ("muster_tasks_finished", "counter"),
        ("muster_protocol_messages", "counter"),
        ("muster_protocol_bytes", "counter"),
        ("muster_build_info", "gauge"),
        ("muster_sessions_opened", "counter"),
        ("muster_sessions_refused", "counter"),
        ("muster_enrollments", "counter"),
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
        ("muster_commit_latency_seconds", "histogram"),
        ("muster_commit_group_size", "histogram"),
        ("muster_commits", "counter"),
        ("muster_alerts_open", "gauge"),
    ];
    // The standard process families have no prefix of ours.
    let everything = scrape(http, "");
    for (name, ty) in families {
        assert_eq!(
            everything.types.get(name).map(String::as_str),
            Some(ty),
            "no `# TYPE {name} {ty}`; types: {:?}",
            everything.types
        );
    }
    // Tasks by every live state, agents by every derived state, alerts by every kind.
    let states = before.label_values("muster_tasks", "state");
    for s in ["queued", "running"] {
        assert!(
            states.contains(s),
            "muster_tasks has no state {s}: {states:?}"
        );
    }
    let agents = before.label_values("muster_agents", "state");
    for s in ["online", "offline"] {
        assert!(
            agents.contains(s),
            "muster_agents has no state {s}: {agents:?}"
        );
    }
    let kinds = before.label_values("muster_alerts_open", "kind");
    for k in [
        "agent_down",
        "task_failed",
        "stalled",
        "circuit_open",
        "retry_storm",
    ] {
        assert!(
            kinds.contains(k),
            "muster_alerts_open has no kind {k}: {kinds:?}"
        );
    }
    for h in [
        "muster_dispatch_latency_seconds",
        "muster_commit_latency_seconds",
        "muster_commit_group_size",
    ] {
        assert!(
            before.value(&format!("{h}_count"), &[]).is_some()
                && before.value(&format!("{h}_sum"), &[]).is_some()
                && before
                    .value(&format!("{h}_bucket"), &[("le", "+Inf")])
                    .is_some(),
            "histogram {h} lacks _count, _sum or the +Inf bucket"
        );
    }

    // Run a few tasks through a sidecar with its own endpoint.
    let sc_http: SocketAddr = ([127, 0, 0, 1], free_tcp_port()).into();
    let _sc = online_sidecar(&hub, "metered", Some(sc_http));
    let sc_before = scrape(sc_http, "muster_sidecar_");
    let ids: Vec<u64> = (0..3)
        .map(|i| submit(&hub, &format!("counted {i}"), &[]))
        .collect();
    wait_all_completed(&hub, &ids);

    let completed =
        |e: &Exposition| e.value_or_0("muster_attempts_ended_total", &[("outcome", "completed")]);
    let after = wait_for(
        Duration::from_secs(10),
        "the metrics to show 3 completed attempts",
        || {
            let e = scrape(http, "muster_");
            if completed(&e) >= completed(&before) + 3.0 {
                Ok(e)
            } else {
                Err(format!("{} completed", completed(&e)))
            }
        },
    );
    let rose = |name: &str, labels: &[(&str, &str)], by: f64| {
        let (b, a) = (
            before.value_or_0(name, labels),
            after.value_or_0(name, labels),
        );
        assert!(
            a >= b + by,
            "{name}{labels:?} went from {b} to {a}; expected a rise of at least {by}"
        );
    };
    assert_eq!(
        before.value("muster_attempts_ended_total", &[("outcome", "failed")]),
        Some(0.0),
        "an outcome that never happened is exported as 0"
    );
    for (name, ty) in [
        ("muster_attempts_ended", "counter"),
        ("muster_tasks_finished", "counter"),
    ] {
        assert_eq!(
            after.types.get(name).map(String::as_str),
            Some(ty),
            "no `# TYPE {name} {ty}` after tasks ran; types: {:?}",
            after.types
        );
    }
    rose("muster_dispatch_latency_seconds_count", &[], 3.0);
    rose("muster_commits_total", &[], 1.0);
    rose("muster_commit_latency_seconds_count", &[], 1.0);
    rose("muster_commit_group_size_count", &[], 1.0);
    rose("muster_heartbeats_received_total", &[], 1.0);
    rose(
        "muster_tasks_finished_total",
        &[("state", "completed")],
        3.0,
    );
    assert_eq!(
        after.value("muster_agents", &[("state", "online")]),
        Some(1.0),
        "one agent online"
    );
    // Ratios are left to PromQL: messages per finished task from the two counters.
    let finished: f64 = ["completed", "failed", "cancelled"]
        .iter()
        .map(|s| after.value_or_0("muster_tasks_finished_total", &[("state", s)]))
        .sum();
    let per_task = after.value_or_0("muster_protocol_messages_total", &[]) / finished;
    assert!(
        per_task > 0.0 && per_task.is_finite(),
        "messages per finished task = {per_task}"
    );
    assert!(
        after.value_or_0("muster_sessions_opened_total", &[]) >= 1.0,
        "the sidecar's session was counted"
    );
    // The dispatch histogram is cumulative: buckets never decrease, +Inf = count.
    let mut buckets: Vec<(f64, f64)> = after
        .samples
        .iter()
        .filter(|s| s.name == "muster_dispatch_latency_seconds_bucket")
        .filter_map(|s| Some((parse_value(s.labels.get("le")?).ok()?, s.value)))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "dispatch buckets are not cumulative: {buckets:?}"
    );
    assert_eq!(
        buckets.last().map(|b| b.1),
        after.value("muster_dispatch_latency_seconds_count", &[]),
        "the +Inf bucket is not the count"
    );

    // The sidecar's endpoint: queue depth, outbox depth, wake latency, probe failures.
    let sc_after = scrape(sc_http, "muster_sidecar_");
    for (name, ty) in [
        ("muster_sidecar_queue_depth", "gauge"),
        ("muster_sidecar_outbox_depth", "gauge"),
        ("muster_sidecar_wake_latency_seconds", "histogram"),
        ("muster_sidecar_probe_failures", "counter"),
    ] {
        assert_eq!(
            sc_after.types.get(name).map(String::as_str),
            Some(ty),
            "sidecar: no `# TYPE {name} {ty}`; types: {:?}",
            sc_after.types
        );
    }
    for name in [
        "muster_sidecar_queue_depth",
        "muster_sidecar_outbox_depth",
        "muster_sidecar_probe_failures_total",
        "muster_sidecar_wake_latency_seconds_count",
    ] {
        assert!(
            sc_after.value(name, &[]).is_some(),
            "sidecar: no sample {name}"
        );
    }
    let runs = |e: &Exposition| e.value_or_0("muster_sidecar_runs_started_total", &[]);
    assert!(
        runs(&sc_after) >= runs(&sc_before) + 3.0,
        "muster_sidecar_runs_started_total went from {} to {}",
        runs(&sc_before),
        runs(&sc_after)
    );
    let wakes = |e: &Exposition| e.value_or_0("muster_sidecar_wake_latency_seconds_count", &[]);
    assert!(
        wakes(&sc_after) >= wakes(&sc_before) + 3.0,
        "muster_sidecar_wake_latency_seconds_count went from {} to {}",
        wakes(&sc_before),
        wakes(&sc_after)
    );
    let (status, body) = get(sc_http, "/healthz");
    assert_eq!(status, 200, "sidecar /healthz: {body}");
    let (status, _) = get(sc_http, "/nope");
    assert_eq!(status, 404, "sidecar: an unknown path");
}

#[test]
fn healthz_turns_503_with_a_reason_when_the_data_dir_is_not_writable() {
    let (mut hub, http) = hub_with_http();
    hub.start();
    let (status, body) = get(http, "/healthz");
    assert_eq!(status, 200, "healthy hub: {body}");

    // The probe file's path taken by a directory: the data directory is "not writable".
    let probe = hub.data_dir().join(".healthz");
    if probe.is_file() {
        std::fs::remove_file(&probe).expect("remove the probe file");
    }
    std::fs::create_dir(&probe).expect("create a directory at the probe path");
    // The verdict is probed at most once per 5 s, so it turns within that.
    let body = wait_for(
        Duration::from_secs(15),
        "/readyz to turn 503",
        || match get(http, "/readyz") {
            (503, body) => Ok(body),
            (s, body) => Err(format!("{s}: {body}")),
        },
    );
    let (status, healthz) = get(http, "/healthz");
    assert_eq!(status, 503, "/healthz is /readyz: {healthz}");
    let (status, live) = get(http, "/livez");
    assert_eq!(status, 200, "/livez does no IO and stays up: {live}");
    assert!(
        body.contains("not writable") && body.contains(".healthz"),
        "503 without a reason naming the probe: {body:?}"
    );
    // /metrics still answers while unhealthy.
    let (status, _) = get(http, "/metrics");
    assert_eq!(status, 200, "/metrics while unhealthy");

    std::fs::remove_dir(&probe).expect("remove the directory");
    wait_for(
        Duration::from_secs(15),
        "/readyz to turn 200 again",
        || match get(http, "/readyz") {
            (200, body) => Ok(body),
            (s, body) => Err(format!("{s}: {body}")),
        },
    );
    let (status, _) = get(http, "/nope");
    assert_eq!(status, 404, "an unknown path");
}

// === watch ===

/// A `muster-hub watch --json` process; its stdout lines arrive on a channel.
struct Watch {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every event received so far, in order.
    seen: Vec<Value>,
    err_log: std::path::PathBuf,
}

impl Watch {
    fn start(hub: &Hub, from: Option<u64>, tag: &str) -> Watch {
        let err_log = hub.root().join(format!("watch-{tag}.err"));
        let err = std::fs::File::create(&err_log).expect("create the watch stderr file");
        let mut cmd = Command::new(&bins().hub);
        cmd.args(["watch", "--json", "--data-dir"])
            .arg(hub.data_dir())
            .env("NO_COLOR", "1")
            .env_remove("MUSTER_HUB")
            .env_remove("MUSTER_CREDENTIAL");
        if let Some(f) = from {
            cmd.args(["--from", &f.to_string()]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        let out = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Watch {
            child,
            lines: rx,
            seen: Vec::new(),
            err_log,
        }
    }

    /// The next event, or `None` once `deadline` passes or the stream ends.
    fn next_until(&mut self, deadline: Instant) -> Option<Value> {
        let left = deadline.checked_duration_since(Instant::now())?;
        let line = self.lines.recv_timeout(left).ok()?;
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!("watch --json printed a line that is not JSON ({e}): {line}")
        });
        assert!(v.is_object(), "not one JSON object per line: {line}");
        assert!(v["seq"].as_u64().is_some(), "a line without seq: {line}");
        self.seen.push(v.clone());
        Some(v)
    }

    /// Reads events until `done(all seen)` holds; panics after `timeout`.
    fn read_until(&mut self, what: &str, timeout: Duration, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(&self.seen) {
            if self.next_until(deadline).is_none() {
                panic!(
                    "watch: no {what} within {} s; seen {} events:\n{}\nstderr: {}",
                    timeout.as_secs(),
                    self.seen.len(),
                    self.seen
                        .iter()
                        .map(Value::to_string)
                        .collect::<Vec<_>>()
                        .join("\n"),
                    tail(
                        &std::fs::read_to_string(&self.err_log).unwrap_or_default(),
                        2000
                    )
                );
            }
        }
    }

    /// Sequence numbers of the events seen (pruning notes and snapshots, seq 0, left out).
    fn seqs(&self) -> Vec<u64> {
        self.seen
            .iter()
            .filter_map(|v| v["seq"].as_u64())
            .filter(|s| *s > 0)
            .collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates join tokens (each an audit event) until `w` shows a line: the watch is
/// registered with the hub from then on.
fn wait_watching(hub: &Hub, w: &mut Watch) {
    for _ in 0..20 {
        hub.token("agent");
        if w.next_until(Instant::now() + Duration::from_secs(1))
            .is_some()
        {
            return;
        }
    }
    panic!(
        "watch printed nothing for 20 token creations; stderr: {}",
        std::fs::read_to_string(&w.err_log).unwrap_or_default()
    );
}

/// Whether the task events in `seen` include `id` reaching `state`.
fn saw_task_state(seen: &[Value], id: u64, state: &str) -> bool {
    seen.iter()
        .any(|v| v["kind"] == "task" && v["id"] == id && v["state"] == state)
}

#[test]
fn watch_streams_task_changes_and_resumes_from_seq_without_gaps_or_repeats() {
    let mut hub = Hub::init();
    hub.set_policy("heartbeat_interval", "\"1s\"");
    hub.start();
    let _sc = online_sidecar(&hub, "watched", None);

    let mut w1 = Watch::start(&hub, None, "live");
    wait_watching(&hub, &mut w1);
    let ids: Vec<u64> = (0..3)
        .map(|i| submit(&hub, &format!("watched {i}"), &[]))
        .collect();
    w1.read_until("every task completed", TASK_END, |seen| {
        ids.iter().all(|id| saw_task_state(seen, *id, "completed"))
    });
    wait_all_completed(&hub, &ids);

    // One object per line with consecutive sequence numbers.
    let s1 = w1.seqs();
    assert_eq!(s1.len(), w1.seen.len(), "events with seq 0 in a live watch");
    assert!(
        s1.windows(2).all(|p| p[1] == p[0] + 1),
        "gaps or repeats in the live stream: {s1:?}"
    );
    // Each task's changes chain from state to state and end completed.
    for id in &ids {
        let chain: Vec<&Value> = w1
            .seen
            .iter()
            .filter(|v| v["kind"] == "task" && v["id"] == *id)
            .collect();
        assert!(chain.len() >= 2, "task {id}: {chain:?}");
        assert!(
            chain.windows(2).all(|p| p[1]["from"] == p[0]["state"]),
            "task {id}'s changes do not chain: {chain:?}"
        );
        assert!(
            chain.iter().any(|v| v["state"] == "running"),
            "task {id} never seen running: {chain:?}"
        );
        assert_eq!(
            chain.last().map(|v| &v["state"]),
            Some(&Value::from("completed")),
            "task {id}: {chain:?}"
        );
    }

    // --from a sequence in the middle: exactly the same events from there on.
    let from = s1[s1.len() / 3];
    let last = *s1.last().expect("some events");
    let mut w2 = Watch::start(&hub, Some(from), "resumed");
    w2.read_until(
        "the replay up to the live watch's last event",
        EVENT,
        |seen| seen.iter().any(|v| v["seq"].as_u64() >= Some(last)),
    );
    let replay: Vec<&Value> = w2
        .seen
        .iter()
        .filter(|v| v["seq"].as_u64() <= Some(last))
        .collect();
    let live: Vec<&Value> = w1
        .seen
        .iter()
        .filter(|v| v["seq"].as_u64() >= Some(from))
        .collect();
    assert_eq!(
        replay.iter().map(|v| v["seq"].clone()).collect::<Vec<_>>(),
        live.iter().map(|v| v["seq"].clone()).collect::<Vec<_>>(),
        "watch --from {from} did not replay exactly what the live watch saw"
    );
    assert_eq!(
        replay, live,
        "the replayed events differ from the live ones"
    );
    assert!(
        !w2.seen.iter().any(|v| v["kind"] == "pruned"),
        "--from {from} reported pruning: {:?}",
        w2.seen
    );

    // Both keep streaming: a new event reaches both with the next sequence number.
    hub.token("agent");
    let next = last + 1;
    for (w, name) in [(&mut w1, "live"), (&mut w2, "resumed")] {
        w.read_until(&format!("seq {next} on the {name} watch"), EVENT, |seen| {
            seen.iter().any(|v| v["seq"].as_u64() == Some(next))
        });
        let s = w.seqs();
        assert!(
            s.windows(2).all(|p| p[1] == p[0] + 1),
            "{name}: gaps or repeats: {s:?}"
        );
    }
}

#[test]
fn watch_from_a_pruned_seq_reports_the_pruning_and_sends_a_snapshot() {
    let mut hub = Hub::init();
    hub.set_policy("events_max", "5");
    hub.start();
    // No agent has the capability: these stay queued (live, so in the snapshot).
    let queued: Vec<u64> = (0..3)
        .map(|i| submit(&hub, &format!("waiting {i}"), &["--capability", "nowhere"]))
        .collect();
    let cancelled = submit(&hub, "cancelled", &["--capability", "nowhere"]);
    let out = hub.cli(&["task", "cancel", &cancelled.to_string()]);
    assert!(
        out.status.success(),
        "cancel: {}",
        muster_tests::stderr(&out)
    );
    for _ in 0..4 {
        hub.token("agent");
    }

    let mut w = Watch::start(&hub, Some(1), "pruned");
    w.read_until("a pruning note and the snapshot", EVENT, |seen| {
        queued.iter().all(|id| {
            seen.iter()
                .any(|v| v["kind"] == "snapshot_task" && v["id"] == *id)
        })
    });
    let first = &w.seen[0];
    assert_eq!(first["kind"], "pruned", "the first line: {first}");
    assert_eq!(first["requested"], 1, "{first}");
    let oldest = first["oldest"]
        .as_u64()
        .unwrap_or_else(|| panic!("no oldest: {first}"));
    assert!(oldest > 1, "pruned but oldest is {oldest}: {first}");
    let snap: Vec<&Value> = w
        .seen
        .iter()
        .filter(|v| v["kind"] == "snapshot_task")
        .collect();
    let snap_ids: BTreeSet<u64> = snap.iter().filter_map(|v| v["id"].as_u64()).collect();
    assert_eq!(
        snap_ids,
        queued.iter().copied().collect::<BTreeSet<u64>>(),
        "the snapshot should list the live tasks, not the cancelled {cancelled}: {snap:?}"
    );
    assert!(
        snap.iter().all(|v| v["state"] == "queued"),
        "snapshot states: {snap:?}"
    );

    // After the snapshot, live events follow.
    let id = submit(&hub, "after the snapshot", &["--capability", "nowhere"]);
    w.read_until("the new task's event", EVENT, |seen| {
        saw_task_state(seen, id, "queued")
    });
    let live = w.seqs();
    assert!(
        live.iter().all(|s| *s >= oldest),
        "events older than the oldest retained ({oldest}) after a prune: {live:?}"
    );
    assert!(
        live.windows(2).all(|p| p[1] == p[0] + 1),
        "gaps or repeats after the snapshot: {live:?}"
    );

    // A --from still retained replays from exactly there, without a pruning note.
    let retained = *live.first().expect("a live event");
    let mut w2 = Watch::start(&hub, Some(retained), "retained");
    w2.read_until("the retained events", EVENT, |seen| {
        saw_task_state(seen, id, "queued")
    });
    assert!(
        !w2.seen.iter().any(|v| v["kind"] == "pruned"),
        "--from {retained} (retained) reported pruning: {:?}",
        w2.seen
    );
    assert_eq!(w2.seqs().first(), Some(&retained), "{:?}", w2.seen);
}

#[test]
fn a_sidecar_without_its_hub_is_live_but_not_ready() {
    let (mut hub, _http) = hub_with_http();
    hub.start();
    let sc_http: SocketAddr = ([127, 0, 0, 1], free_tcp_port()).into();
    let _sc = online_sidecar(&hub, "ready-or-not", Some(sc_http));
    let (status, body) = get(sc_http, "/readyz");
    assert_eq!(status, 200, "connected and writable: {body}");
    hub.stop();
    let body = wait_for(
        Duration::from_secs(30),
        "the sidecar's /readyz to turn 503",
        || match get(sc_http, "/readyz") {
            (503, body) => Ok(body),
            (s, body) => Err(format!("{s}: {body}")),
        },
    );
    assert!(body.contains("not connected to the hub"), "{body}");
    let (status, body) = get(sc_http, "/livez");
    assert_eq!(status, 200, "its loop still answers: {body}");
    let (status, _) = get(sc_http, "/healthz");
    assert_eq!(status, 503, "/healthz is /readyz");
}
