//! The operator CLI: finds the hub and a credential, sends one request, prints the answer.
//!
//! Credential discovery, first match wins: `--hub`/`--credential` or
//! `--data-dir D` (the admin credential of the hub whose data directory that
//! is), then `MUSTER_HUB`/`MUSTER_CREDENTIAL`, then the credential saved by
//! `login`, then the default data directory of a hub on this machine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use muster_protocol::client::{self, ClientError, Credential};
use muster_protocol::msg::{OpRequest, OpResponse};
use serde_json::Value;

use crate::config::{CONFIG_FILE, HubConfig};
use crate::pki::{ADMIN_CERT, ADMIN_KEY, CA_CERT};

/// Where a hub on this machine keeps its state by default.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/muster-hub";

/// How the CLI reaches the hub.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConnectArgs {
    /// Hub address (host:port); also MUSTER_HUB.
    #[arg(long, env = "MUSTER_HUB", global = true)]
    pub hub: Option<String>,
    /// Operator credential file written by `login`; also MUSTER_CREDENTIAL.
    #[arg(long, env = "MUSTER_CREDENTIAL", global = true)]
    pub credential: Option<PathBuf>,
    /// Use the admin credential of the hub whose data directory this is.
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
}

/// A CLI failure with its exit code.
#[derive(Debug)]
pub struct CliError {
    /// 1 failure, 2 usage, 78 configuration.
    pub code: i32,
    /// What to print.
    pub message: String,
}

impl CliError {
    /// A plain failure (exit 1).
    pub fn fail(message: impl Into<String>) -> Self {
        CliError {
            code: 1,
            message: message.into(),
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        // A hub that cannot be reached is not a failed task: scripts tell them apart.
        let code = match e {
            ClientError::Resolve(..)
            | ClientError::Connect { .. }
            | ClientError::Busy(_)
            | ClientError::NotLeader { .. }
            | ClientError::Protocol(_) => crate::cli::watch::EXIT_UNREACHABLE,
            _ => 1,
        };
        CliError {
            code,
            message: e.to_string(),
        }
    }
}

/// The saved operator credential: `$XDG_CONFIG_HOME/muster/operator.toml` or `~/.config/muster/operator.toml`.
pub fn saved_credential_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")))?;
    Some(base.join("muster").join("operator.toml"))
}

/// A credential file: the hub address and three PEMs.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct CredentialFile {
    /// Hub address.
    pub hub: String,
    /// A cluster's other hubs (from the join token), tried when `hub` does not answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hubs: Vec<String>,
    /// The hub's CA.
    pub ca: String,
    /// Our certificate.
    pub cert: String,
    /// Our private key.
    pub key: String,
}

/// Reads a credential file, refusing one readable by others.
///
/// # Errors
/// [`CliError`] naming the file and what is wrong.
pub fn read_credential_file(path: &Path) -> Result<(String, Credential), CliError> {
    read_credential_hubs(path).map(|(mut hubs, cred)| (hubs.swap_remove(0), cred))
}

/// Reads a credential file: every hub address it names (`hub` first) and the credential.
///
/// # Errors
/// [`CliError`] naming the file and what is wrong.
pub fn read_credential_hubs(path: &Path) -> Result<(Vec<String>, Credential), CliError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| CliError::fail(format!("credential {}: {e}", path.display())))?;
    if meta.mode() & 0o077 != 0 {
        return Err(CliError::fail(format!(
            "credential {} has mode {:o}, readable by others; run `chmod 600 {}`",
            path.display(),
            meta.mode() & 0o777,
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::fail(format!("credential {}: {e}", path.display())))?;
    let f: CredentialFile = toml::from_str(&text)
        .map_err(|e| CliError::fail(format!("credential {}: {e}", path.display())))?;
    let mut hubs = vec![f.hub];
    hubs.extend(f.hubs);
    Ok((
        hubs,
        Credential {
            ca_pem: f.ca,
            cert_pem: f.cert,
            key_pem: f.key,
        },
    ))
}

/// The admin credential and address of the hub whose data directory is `dir`.
///
/// # Errors
/// [`CliError`] naming the missing file or bad config.
pub fn data_dir_credential(dir: &Path) -> Result<(String, Credential), CliError> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).map_err(|e| {
            CliError::fail(format!(
                "{}: {e} (is {} a hub data directory? `muster-hub init` creates one)",
                dir.join(name).display(),
                dir.display()
            ))
        })
    };
    let cred = Credential {
        ca_pem: read(CA_CERT)?,
        cert_pem: read(ADMIN_CERT)?,
        key_pem: crate::pki::read_secret(&dir.join(ADMIN_KEY))
            .map_err(|e| CliError::fail(e.to_string()))?,
    };
    let config = HubConfig::load(&dir.join(CONFIG_FILE)).map_err(|e| CliError {
        code: 78,
        message: e.to_string(),
    })?;
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv6() {
            std::net::Ipv6Addr::LOCALHOST.into()
        } else {
            std::net::Ipv4Addr::LOCALHOST.into()
        });
    }
    Ok((addr.to_string(), cred))
}

impl ConnectArgs {
    /// Resolves the hub address and credential, in the documented order.
    ///
    /// # Errors
    /// [`CliError`] saying where it looked.
    pub fn resolve(&self) -> Result<(String, Credential), CliError> {
        self.resolve_hubs()
            .map(|(mut hubs, cred)| (hubs.swap_remove(0), cred))
    }

    /// Like [`ConnectArgs::resolve`], with every hub address to try, the first first.
    ///
    /// # Errors
    /// [`CliError`] saying where it looked.
    pub fn resolve_hubs(&self) -> Result<(Vec<String>, Credential), CliError> {
        let with_flag = |(mut hubs, cred): (Vec<String>, Credential)| {
            if let Some(h) = &self.hub {
                hubs = vec![h.clone()];
            }
            (hubs, cred)
        };
        if let Some(dir) = &self.data_dir {
            return data_dir_credential(dir).map(|(h, c)| (vec![h], c));
        }
        if let Some(path) = &self.credential {
            return read_credential_hubs(path).map(with_flag);
        }
        if let Some(path) = saved_credential_path().filter(|p| p.exists()) {
            return read_credential_hubs(&path).map(with_flag);
        }
        let default = Path::new(DEFAULT_DATA_DIR);
        if default.join(ADMIN_KEY).exists() {
            return data_dir_credential(default).map(|(h, c)| (vec![h], c));
        }
        Err(CliError::fail(
            "no credential found: pass --data-dir of a hub, --credential FILE (or MUSTER_CREDENTIAL), or run `muster-hub login --token TOKEN` first",
        ))
    }

    /// Connects to the hub.
    ///
    /// # Errors
    /// [`CliError`] when the hub cannot be reached or the credential is bad.
    pub async fn connect(&self) -> Result<Session, CliError> {
        let (hubs, cred) = self.resolve_hubs()?;
        // A ping first: a standby of a cluster refuses it naming the leader,
        // which `follow_leader` then dials, so every later request reaches it.
        let (_, (endpoint, conn)) = client::follow_leader(&hubs, |hub| {
            let cred = &cred;
            async move {
                let (endpoint, conn) = client::connect(&hub, cred).await?;
                match client::request(&conn, OpRequest::Ping).await {
                    Ok(_) => Ok((endpoint, conn)),
                    Err(e) => {
                        conn.close(0u32.into(), b"not the leader");
                        Err(e)
                    }
                }
            }
        })
        .await?;
        Ok(Session { endpoint, conn })
    }
}

/// An operator connection.
pub struct Session {
    endpoint: quinn::Endpoint,
    /// The QUIC connection.
    pub conn: quinn::Connection,
}

impl Session {
    /// Sends a request; an error answer becomes a [`CliError`].
    ///
    /// # Errors
    /// [`CliError`] with the hub's message.
    pub async fn call(&self, req: OpRequest) -> Result<Value, CliError> {
        match client::request(&self.conn, req).await? {
            OpResponse::Ok { json } => serde_json::from_str(&json)
                .map_err(|e| CliError::fail(format!("the hub sent malformed JSON: {e}"))),
            OpResponse::Error(e) => Err(CliError::fail(e.message)),
            OpResponse::Event { .. } | OpResponse::LogChunk { .. } => {
                Err(CliError::fail("unexpected streamed answer"))
            }
        }
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

// === Printing ===

/// Prints a value as JSON or through a human formatter. Human output shows
/// control characters escaped, so text from agents cannot drive the terminal.
pub fn print(v: &Value, json: bool, human: impl Fn(&Value) -> String) {
    if json {
        println!("{v}");
    } else {
        print!("{}", human(&sanitize(v)));
    }
}

/// Fields whose text is shown on several lines; their newlines and tabs are kept.
const MULTILINE: [&str; 7] = [
    "description",
    "diffstat",
    "result",
    "stdout_tail",
    "stderr_tail",
    "progress_note",
    "output_tail",
];

/// A copy of `v` with every string's control characters escaped (`\u{1b}`), and
/// newlines too except in the [`MULTILINE`] fields.
pub fn sanitize(v: &Value) -> Value {
    fn walk(v: &Value, keep_lines: bool) -> Value {
        match v {
            Value::String(s) => Value::String(escape_controls(s, keep_lines)),
            Value::Array(a) => Value::Array(a.iter().map(|x| walk(x, keep_lines)).collect()),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, x)| (k.clone(), walk(x, MULTILINE.contains(&k.as_str()))))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    walk(v, false)
}

pub use muster_protocol::human::escape_controls;

/// A commit id cut to 12 hex digits, as people read them.
fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

fn s(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::Null => "-".into(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

/// The `agents` table.
pub fn agents_table(v: &Value) -> String {
    let rows: Vec<[String; 8]> = v["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .map(agent_row)
        .collect();
    let mut out = if rows.is_empty() {
        "no agents enrolled; `muster-hub token create` makes a join token for one\n".into()
    } else {
        crate::cli::dispatch::table(
            &[
                "NAME",
                "STATE",
                "AVAILABLE",
                "TASKS",
                "LOAD",
                "MEM FREE",
                "HEARTBEAT",
                "WHY",
            ],
            &rows,
        )
    };
    if v["truncated"] == true {
        out.push_str(&format!(
            "… {} agents in all; `muster-hub agent show NAME` shows any one\n",
            v["total"]
        ));
    }
    out
}

fn agent_row(a: &Value) -> [String; 8] {
    let load = a["host"]["load1"]
        .as_f64()
        .map_or("-".into(), |l| format!("{l:.2}"));
    let mem = a["host"]["mem_available_bytes"]
        .as_u64()
        .map_or("-".into(), |m| format!("{} MiB", m >> 20));
    let age = a["last_heartbeat_age_ms"].as_u64().map_or("-".into(), |m| {
        format!("{} ago", crate::cli::dispatch::span(m / 1000))
    });
    let why = [s(a, "why"), s(a, "unavailable_reason")]
        .into_iter()
        .filter(|x| !x.is_empty() && x != "-")
        .collect::<Vec<_>>()
        .join("; ");
    [
        s(a, "name"),
        s(a, "state"),
        if a["available"].as_bool() == Some(true) {
            "yes"
        } else {
            "no"
        }
        .into(),
        format!("{}/{}", s(a, "tasks"), s(a, "slots")),
        load,
        mem,
        age,
        why,
    ]
}

/// One agent in detail.
pub fn agent_detail(a: &Value) -> String {
    let [name, state, available, tasks, load, mem, age, why] = agent_row(a);
    let list = |k: &str| {
        let items: Vec<&str> = a[k]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str())
            .collect();
        if items.is_empty() {
            "none".to_string()
        } else {
            items.join(", ")
        }
    };
    let yes = |k: &str| if a[k] == true { "yes" } else { "no" };
    let t = &a["self_test"];
    let self_test = if t.is_null() {
        "not run yet".to_string()
    } else if t["passed"] == true {
        format!(
            "passed (command ok, disk ok{})",
            t["hub_rtt_us"]
                .as_u64()
                .map(|us| format!(", hub round trip {:.1} ms", us as f64 / 1000.0))
                .unwrap_or_default()
        )
    } else {
        let problems: Vec<&str> = t["problems"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str())
            .collect();
        format!("FAILED: {}", problems.join("; "))
    };
    let mut out = format!("agent {name}  {state}  available {available}");
    if !why.is_empty() {
        out += &format!("  ({why})");
    }
    out += &format!(
        "\n  tasks {tasks}  load {load}  memory free {mem}  last heartbeat {age}\n  version {}  capabilities {}  workspace {}\n  drained {}  revoked {}\n  self-test {self_test}\n",
        s(a, "version"),
        list("capabilities"),
        s(a, "workspace"),
        yes("drained"),
        yes("revoked"),
    );
    out
}

/// The `tasks` table.
pub fn tasks_table(v: &Value) -> String {
    let now = now_ms();
    let rows: Vec<[String; 6]> = v["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            // Why it waits, or why it ended: the one thing a person scans for.
            let note = if t["waiting"].is_string() {
                s(t, "waiting")
            } else if t["reason"].is_string() {
                s(t, "reason")
            } else {
                String::new()
            };
            [
                s(t, "id"),
                s(t, "state"),
                t["submitted_at"].as_u64().map_or("-".into(), |at| {
                    crate::cli::dispatch::span(now.saturating_sub(at) / 1000)
                }),
                s(t, "agent"),
                s(t, "title"),
                note,
            ]
        })
        .collect();
    let mut out = if rows.is_empty() {
        "no tasks match\n".to_string()
    } else {
        crate::cli::dispatch::table(&["ID", "STATE", "AGE", "AGENT", "TITLE", "NOTE"], &rows)
    };
    if let Some(c) = v["next_cursor"].as_u64() {
        out.push_str(&format!("more: --cursor {c}\n"));
    }
    out
}

/// Wall-clock milliseconds now.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A time as a person reads it: how long ago (or from now), and exactly, in UTC.
pub fn when(at_ms: u64) -> String {
    let now = now_ms();
    let rel = if at_ms <= now {
        format!("{} ago", crate::cli::dispatch::span((now - at_ms) / 1000))
    } else {
        format!(
            "in {}",
            crate::cli::dispatch::span((at_ms - now).div_ceil(1000))
        )
    };
    let exact = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| at_ms.to_string());
    format!("{rel} ({exact})")
}

/// Lines of a description `task show` prints; `--json` has all of it.
const DESCRIPTION_LINES_SHOWN: usize = 20;

/// One task with attempts and audit trail.
pub fn task_detail(t: &Value) -> String {
    let mut out = format!(
        "task {}  {}\n  state {}  priority {}  attempts {}/{}  agent {}\n",
        s(t, "id"),
        s(t, "title"),
        s(t, "state"),
        s(t, "priority"),
        s(t, "attempts"),
        s(t, "max_attempts"),
        s(t, "agent")
    );
    if !t["repo"].is_null() {
        out.push_str(&format!(
            "  repo {}  base {}\n",
            s(t, "repo"),
            if t["base"].is_null() {
                "(default branch)".to_string()
            } else {
                s(t, "base")
            }
        ));
    }
    for (key, name) in [("labels", "labels"), ("env", "env")] {
        if let Some(m) = t[key].as_object().filter(|m| !m.is_empty()) {
            let pairs: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect();
            out.push_str(&format!("  {name} {}\n", pairs.join(" ")));
        }
    }
    if let Some(at) = t["submitted_at"].as_u64() {
        out.push_str(&format!("  submitted {}\n", when(at)));
    }
    if t["waiting"].is_string() {
        out.push_str(&format!("  waiting: {}\n", s(t, "waiting")));
    }
    if t["progress_note"].is_string() {
        let at = t["progress_at"].as_u64().map(when).unwrap_or_default();
        out.push_str(&format!("  progress: {}  ({at})\n", s(t, "progress_note")));
    }
    if let Some(d) = t["description"].as_str().filter(|d| !d.trim().is_empty()) {
        out.push_str("  description:\n");
        for line in d.lines().take(DESCRIPTION_LINES_SHOWN) {
            out.push_str(&format!("    {line}\n"));
        }
        let more = d.lines().count().saturating_sub(DESCRIPTION_LINES_SHOWN);
        if more > 0 {
            out.push_str(&format!("    … {more} more lines (--json shows all)\n"));
        }
    }
    if !t["reason"].is_null() {
        out.push_str(&format!("  reason: {}\n", s(t, "reason")));
    }
    if !t["result"].is_null() {
        out.push_str(&format!("  result: {}\n", s(t, "result")));
    }
    if let Some(line) = activity_line(&t["activity"]) {
        out.push_str(&line);
    }
    if let Some(line) = usage_line(&t["usage"]) {
        out.push_str(&format!("  usage {line}\n"));
    }
    for a in t["audit"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {} by {} {}\n",
            s(a, "action"),
            s(a, "who"),
            a["at"].as_u64().map(when).unwrap_or_else(|| s(a, "at"))
        ));
    }
    for a in t["attempt_history"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  attempt {} on {}: {}\n",
            s(a, "generation"),
            s(a, "agent"),
            s(a, "outcome")
        ));
        if let Some(line) = usage_line(&a["usage"]) {
            out.push_str(&format!("    usage {line}\n"));
        }
        let w = &a["work"];
        if w["branch"].as_str().is_some_and(|b| !b.is_empty()) {
            out.push_str(&format!(
                "    branch {}  head {}  {} commit(s) since {}{}\n",
                s(w, "branch"),
                short(&s(w, "head")),
                s(w, "commits"),
                short(&s(w, "base_commit")),
                if w["dirty"] == true {
                    "  (uncommitted changes checkpointed)"
                } else {
                    ""
                }
            ));
            if !w["checkpoint"].is_null() {
                out.push_str(&format!("    checkpoint {}\n", s(w, "checkpoint")));
            }
            let stat = s(w, "diffstat");
            if !stat.trim().is_empty() && stat != "-" {
                out.push_str(&format!(
                    "    {}\n",
                    stat.trim_end().replace('\n', "\n    ")
                ));
            }
        }
        if w["link"].is_string() {
            out.push_str(&format!("    link {}\n", s(w, "link")));
        }
        let e = &a["error"];
        if !e.is_null() {
            out.push_str(&format!(
                "    {} (exit {} signal {}) command {}\n",
                s(e, "reason"),
                s(e, "exit_code"),
                s(e, "signal"),
                e["command"]
            ));
            for (k, label) in [("stdout_tail", "stdout"), ("stderr_tail", "stderr")] {
                let tail = s(e, k);
                if !tail.is_empty() && tail != "-" {
                    out.push_str(&format!(
                        "    {label}: {}\n",
                        tail.trim_end().replace('\n', "\n      ")
                    ));
                }
            }
        }
    }
    out
}

/// "activity busy_silent: last output 12 s ago, CPU 3.2 s in the last minute, …"
fn activity_line(a: &Value) -> Option<String> {
    let class = a["class"].as_str()?;
    let secs = |ms: &Value| ms.as_u64().map(|ms| ms as f64 / 1000.0);
    let mut parts = Vec::new();
    match secs(&a["output_age_ms"]) {
        Some(age) => parts.push(format!("last output {age:.0} s ago")),
        None => parts.push(format!(
            "silent {:.0} s",
            secs(&a["silent_ms"]).unwrap_or(0.0)
        )),
    }
    if let Some(cpu) = secs(&a["cpu_last_minute_ms"]) {
        parts.push(format!("CPU {cpu:.1} s in the last minute"));
    }
    if let Some(bytes) = a["output_bytes"].as_u64() {
        parts.push(format!("{bytes} bytes of output"));
    }
    if let Some(age) = secs(&a["workspace_age_ms"]) {
        parts.push(format!("workspace changed {age:.0} s ago"));
    }
    let mut line = format!("  activity {class}: {}\n", parts.join(", "));
    let tail = a["output_tail"].as_str().unwrap_or_default().trim_end();
    if !tail.is_empty() && class != "active" {
        line.push_str(&format!(
            "    last output: {}\n",
            tail.replace('\n', "\n      ")
        ));
    }
    Some(line)
}

/// "1200 in, 340 out, 5000 cache read, 0 cache write, $0.0421, claude-sonnet-4-5"
fn usage_line(u: &Value) -> Option<String> {
    if !u.is_object() {
        return None;
    }
    let n = |k: &str| u[k].as_u64().unwrap_or(0);
    let mut line = format!(
        "{} in, {} out, {} cache read, {} cache write",
        n("input_tokens"),
        n("output_tokens"),
        n("cache_read_tokens"),
        n("cache_write_tokens")
    );
    if let Some(cost) = u["cost_usd"].as_f64() {
        line.push_str(&format!(", ${cost:.4}"));
    }
    if let Some(model) = u["model"].as_str() {
        line.push_str(&format!(", {model}"));
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_show_prints_activity_and_usage() {
        let t = serde_json::json!({
            "id": 7, "title": "t", "state": "running",
            "activity": {"class": "busy_silent", "cpu_last_minute_ms": 3200, "output_age_ms": 12000,
                         "output_bytes": 10, "output_tail": "", "silent_ms": 12000},
            "usage": {"input_tokens": 1200, "output_tokens": 340, "cache_read_tokens": 5000,
                      "cache_write_tokens": 0, "cost_usd": 0.0421, "model": "m"},
        });
        let text = task_detail(&t);
        assert!(
            text.contains(
                "activity busy_silent: last output 12 s ago, CPU 3.2 s in the last minute"
            ),
            "{text}"
        );
        assert!(
            text.contains("usage 1200 in, 340 out, 5000 cache read, 0 cache write, $0.0421, m"),
            "{text}"
        );
    }

    #[test]
    fn human_output_escapes_terminal_controls() {
        let v = serde_json::json!({
            "agents": [{"name": "a\u{1b}]0;pwned\u{7}", "why": "x\ny", "version": "\u{202e}evil"}],
            "stdout_tail": "line 1\nline 2\u{1b}[2J",
        });
        let clean = sanitize(&v);
        let text = clean.to_string();
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{202e}'),
            "{text}"
        );
        assert_eq!(clean["agents"][0]["why"], "x\\u{a}y");
        assert_eq!(clean["stdout_tail"], "line 1\nline 2\\u{1b}[2J");
        let table = agents_table(&clean);
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(table.contains("\\u{1b}]0;pwned"), "{table}");
    }
}
