//! `hub.toml`: the hub's configuration, parsed once and all at once.
//!
//! Every key is optional and has a default ([`HubConfig::default`]). Unknown
//! keys are errors, so a typo never passes silently, and every problem in the
//! file is reported in one [`ConfigError::Invalid`], each naming its key.
//! [`HubConfig::render`] writes the whole file back, every key with a comment;
//! `init` uses it, and `parse(render(c)) == c`.
//!
//! Parsing walks a [`toml::Table`] by hand instead of using serde's
//! `deny_unknown_fields`, because serde stops at the first error.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use muster_protocol::duration::{format_duration, parse_duration};
use muster_protocol::limits::FRAME_BYTES_MAX;
use toml::{Table, Value};

pub use muster_hub_core::policy::{Limits, Policy};

/// The file name under the configuration directory.
pub const CONFIG_FILE: &str = "hub.toml";

/// The whole hub configuration (`hub.toml`).
#[derive(Debug, Clone, PartialEq)]
pub struct HubConfig {
    /// QUIC (UDP) address the hub listens on for sidecars, operators and enrollment.
    pub listen: SocketAddr,
    /// `host:port` written into join tokens; empty means [`HubConfig::advertise_addr`] derives it.
    pub advertise: String,
    /// Address of the HTTP listener for `/metrics` and `/healthz`; `None` turns it off.
    pub http_listen: Option<SocketAddr>,
    /// State directory: CA, certificates and the redb database.
    pub data_dir: PathBuf,
    /// argv run once per alert with the alert as JSON on stdin; empty runs nothing.
    pub alert_command: Vec<String>,
    /// Timeouts, retries and the circuit breaker (`[policy]`).
    pub policy: Policy,
    /// Bounds on queues and inputs (`[limits]`).
    pub limits: Limits,
}

/// Why hub.toml could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What is wrong and on which line.
        message: String,
    },
    /// The file is TOML but one or more keys are wrong; all of them are listed.
    #[error("{}", Lines { path, problems })]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found, in file order of the known keys, unknown keys last.
        problems: Vec<Problem>,
    },
}

/// One bad key in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, e.g. `policy.accept_timeout`.
    pub key: String,
    /// What is wrong and what is accepted.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

// === impl HubConfig ===

const TOP_KEYS: &[&str] = &[
    "listen",
    "advertise",
    "http_listen",
    "data_dir",
    "alert_command",
    "policy",
    "limits",
];
const POLICY_KEYS: &[&str] = &[
    "heartbeat_interval",
    "accept_timeout",
    "start_timeout",
    "lost_grace",
    "agent_down_alert",
    "stall_alert",
    "max_attempts",
    "backoff_initial",
    "backoff_factor",
    "backoff_max",
    "breaker_failures",
    "breaker_cooldown",
    "breaker_cooldown_max",
    "retention",
    "events_max",
];
const LIMITS_KEYS: &[&str] = &[
    "max_queued_tasks",
    "max_description_bytes",
    "max_result_bytes",
    "max_frame_bytes",
    "max_tasks_per_submitter",
    "enroll_per_minute",
    "unauthenticated_per_minute",
    "unauthenticated_per_minute_total",
    "unauthenticated_per_source",
    "unauthenticated_max",
    "handshakes_per_source",
    "messages_per_second",
    "max_connections",
];

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7440)),
            advertise: String::new(),
            http_listen: None,
            data_dir: PathBuf::from("/var/lib/muster-hub"),
            alert_command: Vec::new(),
            policy: Policy::default(),
            limits: Limits::default(),
        }
    }
}

impl HubConfig {
    /// Reads and parses the file at `path`.
    ///
    /// # Errors
    /// [`ConfigError::Io`] if it cannot be read, otherwise as [`HubConfig::parse`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses hub.toml text; `path` is used only in messages.
    ///
    /// # Errors
    /// [`ConfigError::Syntax`] for TOML that does not parse, [`ConfigError::Invalid`]
    /// listing every unknown key, wrong type, bad value and inconsistent pair.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: path.to_owned(),
                message: syntax_message(text, &e),
            })?;
        let mut problems = Vec::new();
        let d = Self::default();

        let mut top = Fields::new(table, "", &mut problems);
        let listen = top.socket_addr("listen").unwrap_or(d.listen);
        let advertise = top.host_port("advertise", true).unwrap_or(d.advertise);
        let http_listen = top.opt_socket_addr("http_listen").unwrap_or(d.http_listen);
        let data_dir = top.path("data_dir").unwrap_or(d.data_dir);
        let alert_command = top.argv("alert_command").unwrap_or(d.alert_command);
        let policy_table = top.table("policy");
        let limits_table = top.table("limits");
        top.finish(
            TOP_KEYS,
            &[("policy", POLICY_KEYS), ("limits", LIMITS_KEYS)],
        );

        let policy = parse_policy(policy_table, &mut problems);
        let limits = parse_limits(limits_table, &mut problems);
        let config = Self {
            listen,
            advertise,
            http_listen,
            data_dir,
            alert_command,
            policy,
            limits,
        };
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// The whole file: every key with its current value and a comment saying
    /// what it is for and its default.
    pub fn render(&self) -> String {
        let d = Self::default();
        let (p, dp) = (&self.policy, &d.policy);
        let (l, dl) = (&self.limits, &d.limits);
        let mut w = Writer::default();
        w.raw("# muster hub configuration. Every key is optional; durations are\n");
        w.raw("# \"500ms\", \"30s\", \"5m\", \"1h\" or \"7d\". Unknown keys are errors.\n\n");
        w.addr(
            "listen",
            &self.listen,
            &d.listen,
            "QUIC (UDP) address for sidecars, operators and enrollment.",
        );
        w.string("advertise", &self.advertise, &d.advertise, "host:port written into join tokens; \"\" = the listen address if specific, else host name and port.");
        w.opt_addr(
            "http_listen",
            self.http_listen,
            d.http_listen,
            "HTTP address for /metrics and /healthz, e.g. \"127.0.0.1:7441\"; \"\" = off.",
        );
        w.path(
            "data_dir",
            &self.data_dir,
            &d.data_dir,
            "State directory: CA, certificates and database.",
        );
        w.argv(
            "alert_command",
            &self.alert_command,
            &d.alert_command,
            "argv run for each alert, with the alert as JSON on stdin; [] = none.",
        );

        w.raw("\n[policy]\n");
        w.dur(
            "heartbeat_interval",
            p.heartbeat_interval,
            dp.heartbeat_interval,
            "How often sidecars send a heartbeat.",
        );
        w.dur(
            "accept_timeout",
            p.accept_timeout,
            dp.accept_timeout,
            "An assignment not accepted within this is re-queued.",
        );
        w.dur(
            "start_timeout",
            p.start_timeout,
            dp.start_timeout,
            "An attempt not verified as started within this is re-queued.",
        );
        w.dur(
            "lost_grace",
            p.lost_grace,
            dp.lost_grace,
            "A sidecar silent this long is lost; must exceed heartbeat_interval.",
        );
        w.dur(
            "agent_down_alert",
            p.agent_down_alert,
            dp.agent_down_alert,
            "An agent disconnected this long raises an alert.",
        );
        w.dur(
            "stall_alert",
            p.stall_alert,
            dp.stall_alert,
            "A running task without progress this long raises an alert.",
        );
        w.int(
            "max_attempts",
            p.max_attempts,
            dp.max_attempts,
            "Attempts per task before it fails for good.",
        );
        w.dur(
            "backoff_initial",
            p.backoff_initial,
            dp.backoff_initial,
            "Delay before the first retry; at most backoff_max.",
        );
        w.int(
            "backoff_factor",
            p.backoff_factor,
            dp.backoff_factor,
            "Each further retry waits this many times longer.",
        );
        w.dur(
            "backoff_max",
            p.backoff_max,
            dp.backoff_max,
            "Longest delay between retries.",
        );
        w.int(
            "breaker_failures",
            p.breaker_failures,
            dp.breaker_failures,
            "Consecutive failures on one agent that open its circuit breaker.",
        );
        w.dur(
            "breaker_cooldown",
            p.breaker_cooldown,
            dp.breaker_cooldown,
            "First cooldown of an open breaker; at most breaker_cooldown_max.",
        );
        w.dur(
            "breaker_cooldown_max",
            p.breaker_cooldown_max,
            dp.breaker_cooldown_max,
            "Longest cooldown after repeated trips.",
        );
        w.dur(
            "retention",
            p.retention,
            dp.retention,
            "How long finished tasks are kept.",
        );
        w.int(
            "events_max",
            p.events_max,
            dp.events_max,
            "Events kept in the event log; older ones are pruned.",
        );

        w.raw("\n[limits]\n");
        w.int(
            "max_queued_tasks",
            l.max_queued_tasks,
            dl.max_queued_tasks,
            "Tasks waiting for an agent; more are refused.",
        );
        w.int(
            "max_description_bytes",
            l.max_description_bytes,
            dl.max_description_bytes,
            "Largest task description in bytes.",
        );
        w.int(
            "max_result_bytes",
            l.max_result_bytes,
            dl.max_result_bytes,
            "Largest task result in bytes.",
        );
        w.int(
            "max_frame_bytes",
            l.max_frame_bytes,
            dl.max_frame_bytes,
            "Largest protocol frame; at most 1048576, above description + result.",
        );
        w.int(
            "max_tasks_per_submitter",
            l.max_tasks_per_submitter,
            dl.max_tasks_per_submitter,
            "Unfinished tasks one submitter may hold.",
        );
        w.int(
            "enroll_per_minute",
            l.enroll_per_minute,
            dl.enroll_per_minute,
            "Failed enrollment attempts per minute from one source address (successes are free).",
        );
        w.int(
            "unauthenticated_per_minute",
            l.unauthenticated_per_minute,
            dl.unauthenticated_per_minute,
            "Connections without a client certificate per minute from one source address.",
        );
        w.int(
            "unauthenticated_per_minute_total",
            l.unauthenticated_per_minute_total,
            dl.unauthenticated_per_minute_total,
            "Connections without a client certificate per minute from all sources.",
        );
        w.int(
            "unauthenticated_per_source",
            l.unauthenticated_per_source,
            dl.unauthenticated_per_source,
            "Connections without a client certificate open at once from one source address.",
        );
        w.int(
            "unauthenticated_max",
            l.unauthenticated_max,
            dl.unauthenticated_max,
            "Connections without a client certificate open at once (at most max_connections / 2).",
        );
        w.int(
            "handshakes_per_source",
            l.handshakes_per_source,
            dl.handshakes_per_source,
            "QUIC handshakes in flight at once from one source address; more are refused\n# and the client retries. Raise it when many sidecars share one address (NAT).",
        );
        w.int(
            "messages_per_second",
            l.messages_per_second,
            dl.messages_per_second,
            "Messages accepted per second on one connection.",
        );
        w.int(
            "max_connections",
            l.max_connections,
            dl.max_connections,
            "Open connections at once.",
        );
        w.out
    }

    /// The address join tokens carry: `advertise` if set, else `listen` if its
    /// IP is specific, else `<host_name>:<listen port>`.
    pub fn advertise_addr(&self, host_name: &str) -> String {
        if !self.advertise.is_empty() {
            return self.advertise.clone();
        }
        if !self.listen.ip().is_unspecified() {
            return self.listen.to_string();
        }
        let port = self.listen.port();
        if host_name.contains(':') && !host_name.starts_with('[') {
            // An IPv6 literal needs brackets before a port can follow it.
            format!("[{host_name}]:{port}")
        } else {
            format!("{host_name}:{port}")
        }
    }
}

fn parse_policy(table: Table, problems: &mut Vec<Problem>) -> Policy {
    let d = Policy::default();
    let mut t = Fields::new(table, "policy", problems);
    let p = Policy {
        heartbeat_interval: t
            .duration("heartbeat_interval")
            .unwrap_or(d.heartbeat_interval),
        accept_timeout: t.duration("accept_timeout").unwrap_or(d.accept_timeout),
        start_timeout: t.duration("start_timeout").unwrap_or(d.start_timeout),
        lost_grace: t.duration("lost_grace").unwrap_or(d.lost_grace),
        agent_down_alert: t.duration("agent_down_alert").unwrap_or(d.agent_down_alert),
        stall_alert: t.duration("stall_alert").unwrap_or(d.stall_alert),
        max_attempts: t.uint("max_attempts", 1).unwrap_or(d.max_attempts),
        backoff_initial: t.duration("backoff_initial").unwrap_or(d.backoff_initial),
        backoff_factor: t.uint("backoff_factor", 1).unwrap_or(d.backoff_factor),
        backoff_max: t.duration("backoff_max").unwrap_or(d.backoff_max),
        breaker_failures: t.uint("breaker_failures", 1).unwrap_or(d.breaker_failures),
        breaker_cooldown: t.duration("breaker_cooldown").unwrap_or(d.breaker_cooldown),
        breaker_cooldown_max: t
            .duration("breaker_cooldown_max")
            .unwrap_or(d.breaker_cooldown_max),
        retention: t.duration("retention").unwrap_or(d.retention),
        events_max: t.uint("events_max", 1).unwrap_or(d.events_max),
    };
    t.finish(POLICY_KEYS, &[]);
    let mut bad = |key: &str, reason: String| {
        problems.push(Problem {
            key: format!("policy.{key}"),
            reason,
        });
    };
    if p.backoff_initial > p.backoff_max {
        bad(
            "backoff_initial",
            format!(
                "{} is longer than backoff_max ({}); it must be at most that",
                format_duration(p.backoff_initial),
                format_duration(p.backoff_max)
            ),
        );
    }
    if p.breaker_cooldown > p.breaker_cooldown_max {
        bad(
            "breaker_cooldown",
            format!(
                "{} is longer than breaker_cooldown_max ({}); it must be at most that",
                format_duration(p.breaker_cooldown),
                format_duration(p.breaker_cooldown_max)
            ),
        );
    }
    if p.lost_grace <= p.heartbeat_interval {
        bad(
            "lost_grace",
            format!(
                "{} is not longer than heartbeat_interval ({}); one late heartbeat would lose the sidecar",
                format_duration(p.lost_grace),
                format_duration(p.heartbeat_interval)
            ),
        );
    }
    p
}

fn parse_limits(table: Table, problems: &mut Vec<Problem>) -> Limits {
    let d = Limits::default();
    let mut t = Fields::new(table, "limits", problems);
    let l = Limits {
        max_queued_tasks: t.uint("max_queued_tasks", 1).unwrap_or(d.max_queued_tasks),
        max_description_bytes: t
            .uint("max_description_bytes", 1)
            .unwrap_or(d.max_description_bytes),
        max_result_bytes: t.uint("max_result_bytes", 1).unwrap_or(d.max_result_bytes),
        max_frame_bytes: t.uint("max_frame_bytes", 1).unwrap_or(d.max_frame_bytes),
        max_tasks_per_submitter: t
            .uint("max_tasks_per_submitter", 1)
            .unwrap_or(d.max_tasks_per_submitter),
        enroll_per_minute: t
            .uint("enroll_per_minute", 1)
            .unwrap_or(d.enroll_per_minute),
        unauthenticated_per_minute: t
            .uint("unauthenticated_per_minute", 1)
            .unwrap_or(d.unauthenticated_per_minute),
        unauthenticated_per_minute_total: t
            .uint("unauthenticated_per_minute_total", 1)
            .unwrap_or(d.unauthenticated_per_minute_total),
        unauthenticated_per_source: t
            .uint("unauthenticated_per_source", 1)
            .unwrap_or(d.unauthenticated_per_source),
        unauthenticated_max: t
            .uint("unauthenticated_max", 1)
            .unwrap_or(d.unauthenticated_max),
        handshakes_per_source: t
            .uint("handshakes_per_source", 1)
            .unwrap_or(d.handshakes_per_source),
        messages_per_second: t
            .uint("messages_per_second", 1)
            .unwrap_or(d.messages_per_second),
        max_connections: t.uint("max_connections", 1).unwrap_or(d.max_connections),
    };
    t.finish(LIMITS_KEYS, &[]);
    let frame_max = FRAME_BYTES_MAX as u64;
    if l.max_frame_bytes > frame_max {
        problems.push(Problem {
            key: "limits.max_frame_bytes".into(),
            reason: format!(
                "{} is above the protocol's ceiling of {frame_max} (1 MiB)",
                l.max_frame_bytes
            ),
        });
    }
    let payload = l.max_description_bytes.saturating_add(l.max_result_bytes);
    if l.max_frame_bytes <= payload {
        problems.push(Problem {
            key: "limits.max_frame_bytes".into(),
            reason: format!(
                "{} must be larger than max_description_bytes + max_result_bytes ({payload}), or a full task would not fit in a frame",
                l.max_frame_bytes
            ),
        });
    }
    l
}

/// Turns a TOML parser error into one line naming line and column.
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("TOML syntax error at line {line}, column {column}: {message}")
        }
        None => format!("TOML syntax error: {message}"),
    }
}

struct Lines<'a> {
    path: &'a Path,
    problems: &'a [Problem],
}

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {p}", self.path.display())?;
        }
        Ok(())
    }
}

// === Fields: takes known keys out of one table, collecting problems ===

/// One table being read. Each getter removes its key, so what is left at
/// [`Fields::finish`] is unknown. A getter returns `None` both when the key is
/// absent (the caller uses the default) and when it is wrong (a problem has
/// been recorded, so the default never reaches a finished config).
struct Fields<'p> {
    table: Table,
    section: &'static str,
    problems: &'p mut Vec<Problem>,
}

impl<'p> Fields<'p> {
    fn new(table: Table, section: &'static str, problems: &'p mut Vec<Problem>) -> Self {
        Self {
            table,
            section,
            problems,
        }
    }

    fn key(&self, key: &str) -> String {
        if self.section.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.section)
        }
    }

    fn bad(&mut self, key: &str, reason: String) {
        let key = self.key(key);
        self.problems.push(Problem { key, reason });
    }

    fn string_like(&mut self, key: &str, expected: &str) -> Option<String> {
        match self.table.remove(key)? {
            Value::String(s) => Some(s),
            other => {
                self.bad(
                    key,
                    format!("expected {expected}, found {}", describe(&other)),
                );
                None
            }
        }
    }

    fn duration(&mut self, key: &str) -> Option<Duration> {
        let text = self.string_like(key, "a duration string such as \"30s\"")?;
        match parse_duration(&text) {
            Ok(d) if d.is_zero() => {
                self.bad(
                    key,
                    format!("{text:?} is zero; it must be longer, e.g. \"30s\""),
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.bad(key, e);
                None
            }
        }
    }

    fn uint<T: TryFrom<i64> + fmt::Display + Bounded>(&mut self, key: &str, min: i64) -> Option<T> {
        let n = match self.table.remove(key)? {
            Value::Integer(n) => n,
            other => {
                self.bad(
                    key,
                    format!("expected a whole number, found {}", describe(&other)),
                );
                return None;
            }
        };
        if n < min {
            self.bad(
                key,
                format!("{n} is too small; use {min} to {}", T::MAX_TEXT),
            );
            return None;
        }
        match T::try_from(n) {
            Ok(v) => Some(v),
            Err(_) => {
                self.bad(
                    key,
                    format!("{n} is too large; use {min} to {}", T::MAX_TEXT),
                );
                None
            }
        }
    }

    fn socket_addr(&mut self, key: &str) -> Option<SocketAddr> {
        let text = self.string_like(key, "an address string such as \"0.0.0.0:7440\"")?;
        self.parse_addr(key, &text)
    }

    fn opt_socket_addr(&mut self, key: &str) -> Option<Option<SocketAddr>> {
        let text =
            self.string_like(key, "an address string such as \"127.0.0.1:7441\", or \"\"")?;
        if text.is_empty() {
            return Some(None);
        }
        self.parse_addr(key, &text).map(Some)
    }

    fn parse_addr(&mut self, key: &str, text: &str) -> Option<SocketAddr> {
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.bad(
                    key,
                    format!("{text:?} is not an IP address and port; write e.g. \"0.0.0.0:7440\" or \"[::]:7440\""),
                );
                None
            }
        }
    }

    /// A `host:port` string; `allow_empty` lets `""` through as "not set".
    fn host_port(&mut self, key: &str, allow_empty: bool) -> Option<String> {
        let text = self.string_like(key, "a \"host:port\" string")?;
        if text.is_empty() && allow_empty {
            return Some(text);
        }
        let ok = text.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
        });
        if ok {
            Some(text)
        } else {
            self.bad(
                key,
                format!("{text:?} is not host:port; write e.g. \"hub.example.net:7440\""),
            );
            None
        }
    }

    fn path(&mut self, key: &str) -> Option<PathBuf> {
        let text = self.string_like(key, "a path string")?;
        if text.is_empty() {
            self.bad(key, "is empty; give a directory path".into());
            return None;
        }
        Some(PathBuf::from(text))
    }

    /// An argv array; empty is allowed, an empty program name is not.
    fn argv(&mut self, key: &str) -> Option<Vec<String>> {
        let items = match self.table.remove(key)? {
            Value::Array(items) => items,
            other => {
                self.bad(
                    key,
                    format!(
                        "expected an array of strings (argv, no shell) such as [\"/usr/bin/notify\", \"--json\"], found {}",
                        describe(&other)
                    ),
                );
                return None;
            }
        };
        let mut argv = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.into_iter().enumerate() {
            match item {
                Value::String(s) => argv.push(s),
                other => {
                    self.bad(
                        &format!("{key}[{i}]"),
                        format!("expected a string, found {}", describe(&other)),
                    );
                    ok = false;
                }
            }
        }
        if ok && argv.first().is_some_and(String::is_empty) {
            self.bad(&format!("{key}[0]"), "the program name is empty".into());
            ok = false;
        }
        ok.then_some(argv)
    }

    /// A sub-table; a missing one is empty, a non-table is a problem.
    fn table(&mut self, key: &str) -> Table {
        match self.table.remove(key) {
            None => Table::new(),
            Some(Value::Table(t)) => t,
            Some(other) => {
                self.bad(
                    key,
                    format!("expected a table [{key}], found {}", describe(&other)),
                );
                Table::new()
            }
        }
    }

    /// Reports every key left as unknown, with the nearest known key as a hint,
    /// or the section it belongs in when it is a key of another table.
    fn finish(self, known: &[&str], sections: &[(&str, &[&str])]) {
        let Self {
            table,
            section,
            problems,
        } = self;
        for key in table.keys() {
            let full = if section.is_empty() {
                key.clone()
            } else {
                format!("{section}.{key}")
            };
            let mut reason = "unknown key".to_owned();
            if let Some((s, _)) = sections
                .iter()
                .find(|(_, keys)| keys.contains(&key.as_str()))
            {
                reason.push_str(&format!("; it belongs under [{s}]"));
            } else if let Some(near) = nearest(key, known) {
                reason.push_str(&format!("; did you mean {near:?}?"));
            } else {
                reason.push_str(&format!("; known keys here: {}", known.join(", ")));
            }
            problems.push(Problem { key: full, reason });
        }
    }
}

/// Integer types a key may hold, with their largest value for messages.
trait Bounded {
    const MAX_TEXT: &'static str;
}
impl Bounded for u32 {
    const MAX_TEXT: &'static str = "4294967295";
}
impl Bounded for u64 {
    const MAX_TEXT: &'static str = "9223372036854775807";
}

/// A value's TOML type, with the value itself for short scalars.
fn describe(v: &Value) -> String {
    match v {
        Value::Table(_) => "a table".into(),
        Value::Array(_) => "an array".into(),
        other => {
            let text = other.to_string();
            if text.len() <= 40 {
                format!("{} {text}", other.type_str())
            } else {
                other.type_str().into()
            }
        }
    }
}

/// The known key closest to `key` by edit distance, if close enough to be a typo.
fn nearest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, _)| *d <= 2.max(key.len() / 4) && *d < key.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = Vec::with_capacity(b.len() + 1);
        cur.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

// === Writer: renders key = value lines with a comment above each ===

#[derive(Default)]
struct Writer {
    out: String,
}

impl Writer {
    fn raw(&mut self, s: &str) {
        self.out.push_str(s);
    }

    fn kv(&mut self, key: &str, value: String, default: String, what: &str) {
        self.out
            .push_str(&format!("# {what} Default: {default}.\n{key} = {value}\n"));
    }

    fn string(&mut self, key: &str, v: &str, d: &str, what: &str) {
        self.kv(key, quote(v), quote(d), what);
    }

    fn addr(&mut self, key: &str, v: &SocketAddr, d: &SocketAddr, what: &str) {
        self.kv(key, quote(&v.to_string()), quote(&d.to_string()), what);
    }

    fn opt_addr(&mut self, key: &str, v: Option<SocketAddr>, d: Option<SocketAddr>, what: &str) {
        let text = |a: Option<SocketAddr>| quote(&a.map(|a| a.to_string()).unwrap_or_default());
        self.kv(key, text(v), text(d), what);
    }

    fn path(&mut self, key: &str, v: &Path, d: &Path, what: &str) {
        self.kv(
            key,
            quote(&v.to_string_lossy()),
            quote(&d.to_string_lossy()),
            what,
        );
    }

    fn argv(&mut self, key: &str, v: &[String], d: &[String], what: &str) {
        let text =
            |a: &[String]| Value::Array(a.iter().cloned().map(Value::String).collect()).to_string();
        self.kv(key, text(v), text(d), what);
    }

    fn dur(&mut self, key: &str, v: Duration, d: Duration, what: &str) {
        self.kv(
            key,
            quote(&format_duration(v)),
            quote(&format_duration(d)),
            what,
        );
    }

    fn int(&mut self, key: &str, v: impl fmt::Display, d: impl fmt::Display, what: &str) {
        self.kv(key, v.to_string(), d.to_string(), what);
    }
}

/// A TOML basic string with every needed escape.
fn quote(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HubConfig, ConfigError> {
        HubConfig::parse(text, Path::new("/etc/muster/hub.toml"))
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn has(problems: &[Problem], key: &str, needle: &str) -> bool {
        problems
            .iter()
            .any(|p| p.key == key && p.reason.contains(needle))
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(parse("").expect("empty"), HubConfig::default());
        assert_eq!(
            parse("[policy]\n[limits]\n").expect("sections"),
            HubConfig::default()
        );
    }

    #[test]
    fn defaults_render_and_parse_back() {
        let d = HubConfig::default();
        let text = d.render();
        assert_eq!(parse(&text).expect("render parses"), d);
        for key in TOP_KEYS.iter().chain(POLICY_KEYS).chain(LIMITS_KEYS) {
            let line = format!("\n{key} = ");
            let sect = format!("[{key}]");
            assert!(
                text.contains(&line) || text.contains(&sect),
                "{key} missing from render"
            );
        }
        assert!(text.contains("# QUIC (UDP) address"));
        assert!(text.contains("Default: \"10s\""));
    }

    #[test]
    fn changed_values_render_and_parse_back() {
        let mut c = HubConfig {
            advertise: "hub.example.net:7440".into(),
            http_listen: Some("127.0.0.1:7441".parse().expect("addr")),
            data_dir: "/srv/hub \"quoted\"".into(),
            alert_command: vec!["/usr/bin/notify".into(), "--tag=a\\b".into()],
            ..HubConfig::default()
        };
        c.policy.stall_alert = Duration::from_millis(1500);
        c.policy.max_attempts = 7;
        c.limits.max_connections = 5;
        c.limits.handshakes_per_source = 3;
        c.limits.unauthenticated_per_minute_total = 9;
        assert_eq!(parse(&c.render()).expect("round trip"), c);
    }

    #[test]
    fn several_mistakes_are_all_reported_with_file_and_key() {
        let text = r#"
listen = "nowhere"
lisen = "0.0.0.0:1"
data_dir = 5
[policy]
accept_timeout = "30x"
max_attempts = 0
heartbeat_interval = "0s"
[limits]
max_frame_bytes = 2000000
"#;
        let err = parse(text).expect_err("invalid");
        let msg = err.to_string();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("expected Invalid, got {err:?}");
        };
        assert!(has(problems, "listen", "not an IP address and port"));
        assert!(has(problems, "lisen", "did you mean \"listen\"?"));
        assert!(has(
            problems,
            "data_dir",
            "expected a path string, found integer 5"
        ));
        assert!(has(problems, "policy.max_attempts", "0 is too small"));
        assert!(has(problems, "policy.heartbeat_interval", "is zero"));
        assert!(has(problems, "limits.max_frame_bytes", "ceiling"));
        assert!(msg.contains(
            "/etc/muster/hub.toml: policy.accept_timeout: \"30x\" has unknown unit \"x\"; use ms, s, m, h or d"
        ));
        assert_eq!(msg.lines().count(), problems.len());
        assert!(msg.lines().all(|l| l.starts_with("/etc/muster/hub.toml: ")));
    }

    #[test]
    fn unknown_keys_get_hints() {
        let p = problems(
            "[policy]\nacept_timeout = \"1s\"\nzzz = 1\n[limitz]\nheartbeat_interval = \"1s\"\n",
        );
        assert!(has(
            &p,
            "policy.acept_timeout",
            "did you mean \"accept_timeout\"?"
        ));
        assert!(has(&p, "policy.zzz", "known keys here"));
        assert!(has(&p, "limitz", "did you mean \"limits\"?"));
        let p = problems("stall_alert = \"1m\"\n");
        assert!(has(&p, "stall_alert", "belongs under [policy]"));
    }

    #[test]
    fn wrong_types_name_the_expected_type() {
        let p = problems(
            "listen = 7440\nalert_command = \"notify --json\"\npolicy = 3\n[limits]\nmax_connections = \"lots\"\n",
        );
        assert!(has(&p, "listen", "expected an address string"));
        assert!(has(&p, "alert_command", "expected an array of strings"));
        assert!(has(
            &p,
            "policy",
            "expected a table [policy], found integer 3"
        ));
        assert!(has(
            &p,
            "limits.max_connections",
            "expected a whole number, found string \"lots\""
        ));
        let p = problems("alert_command = [\"a\", 2]\n[limits]\nmax_connections = 99999999999\n");
        assert!(has(&p, "alert_command[1]", "expected a string"));
        assert!(has(&p, "limits.max_connections", "too large"));
        let p = problems("[policy]\nretention = 30\n");
        assert!(has(
            &p,
            "policy.retention",
            "expected a duration string such as \"30s\", found integer 30"
        ));
    }

    #[test]
    fn bad_durations() {
        let p = problems("[policy]\nbackoff_max = \"10\"\nretention = \"-1d\"\n");
        assert!(has(&p, "policy.backoff_max", "no unit"));
        assert!(has(&p, "policy.retention", "whole number"));
    }

    #[test]
    fn cross_field_checks() {
        let p = problems(
            "[policy]\nbackoff_initial = \"1h\"\nbreaker_cooldown = \"2h\"\nheartbeat_interval = \"1m\"\n\
             [limits]\nmax_description_bytes = 600000\nmax_result_bytes = 600000\n",
        );
        assert!(has(
            &p,
            "policy.backoff_initial",
            "longer than backoff_max (10m)"
        ));
        assert!(has(
            &p,
            "policy.breaker_cooldown",
            "longer than breaker_cooldown_max (1h)"
        ));
        assert!(has(
            &p,
            "policy.lost_grace",
            "not longer than heartbeat_interval (1m)"
        ));
        assert!(has(&p, "limits.max_frame_bytes", "must be larger than"));
        assert_eq!(p.len(), 4);
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = parse("listen = \"0.0.0.0:1\"\npolicy = [\n").expect_err("syntax");
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Syntax { .. }));
        assert!(
            msg.starts_with("/etc/muster/hub.toml: TOML syntax error at line 2"),
            "{msg}"
        );
    }

    #[test]
    fn load_reports_missing_file() {
        let err = HubConfig::load(Path::new("/nonexistent/muster/hub.toml")).expect_err("missing");
        assert!(matches!(err, ConfigError::Io { .. }));
        assert!(
            err.to_string()
                .starts_with("/nonexistent/muster/hub.toml: cannot read")
        );
    }

    #[test]
    fn advertise_addr_prefers_setting_then_specific_listen_then_host() {
        let mut c = HubConfig::default();
        assert_eq!(c.advertise_addr("hub1"), "hub1:7440");
        assert_eq!(c.advertise_addr("fe80::1"), "[fe80::1]:7440");
        c.listen = "10.0.0.5:9000".parse().expect("addr");
        assert_eq!(c.advertise_addr("hub1"), "10.0.0.5:9000");
        c.listen = "[::]:9000".parse().expect("addr");
        assert_eq!(c.advertise_addr("hub1"), "hub1:9000");
        c.advertise = "hub.example.net:443".into();
        assert_eq!(c.advertise_addr("hub1"), "hub.example.net:443");
    }

    #[test]
    fn edit_distance_works() {
        assert_eq!(edit_distance("listen", "lisen"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(nearest("x", TOP_KEYS), None);
    }
}
