//! `sidecar.toml`: the sidecar's configuration, parsed once and all at once.
//!
//! `name` and `hub` are required; every other key has a default. Unknown keys
//! are errors, so a typo never passes silently, and every problem in the file
//! is reported in one [`ConfigError::Invalid`], each naming its key.
//! [`SidecarConfig::render`] writes the whole file back, every key with a
//! comment; `enroll` uses it, and `parse(render(c)) == c`.
//!
//! Parsing walks a [`toml::Table`] by hand instead of using serde's
//! `deny_unknown_fields`, because serde stops at the first error.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use muster_protocol::AgentName;
use muster_protocol::duration::{format_duration, parse_duration};
use muster_protocol::limits::{CAPABILITIES_MAX, NAME_BYTES_MAX};
use toml::{Table, Value};

use crate::agent::{AgentConfig, ExecStatus, Mode, Verify};

/// The file name under the configuration directory.
pub const CONFIG_FILE: &str = "sidecar.toml";

/// Most agent runs one sidecar supervises at once; `slots` above this is refused.
pub const SLOTS_MAX: u32 = 256;

/// The whole sidecar configuration (`sidecar.toml`).
#[derive(Debug, Clone, PartialEq)]
pub struct SidecarConfig {
    /// The name this sidecar enrolled under; its certificate carries the same name.
    pub name: AgentName,
    /// The hub's QUIC address as `host:port`.
    pub hub: String,
    /// State directory: the redb queue, the key file, the local socket and `work/`.
    pub data_dir: PathBuf,
    /// What this agent can do; tasks that require a capability go only to agents that list it.
    pub capabilities: Vec<String>,
    /// Agent runs supervised at once (1 to [`SLOTS_MAX`]).
    pub slots: u32,
    /// Address of the HTTP listener for `/metrics` and `/healthz`; `None` turns it off.
    pub http_listen: Option<SocketAddr>,
    /// The self-test fails when `data_dir` has less free space than this, in MiB (0 turns the check off).
    pub disk_floor_mb: u64,
    /// How the agent is started, verified, probed and stopped (`[agent]`).
    pub agent: AgentConfig,
}

/// Why sidecar.toml could not be used.
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
    /// Dotted key, e.g. `agent.verify_command`.
    pub key: String,
    /// What is wrong and what is accepted.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

// === impl SidecarConfig ===

const TOP_KEYS: &[&str] = &[
    "name",
    "hub",
    "data_dir",
    "capabilities",
    "slots",
    "http_listen",
    "disk_floor_mb",
    "agent",
];
const AGENT_KEYS: &[&str] = &[
    "mode",
    "command",
    "working_dir",
    "settle",
    "verify",
    "verify_process",
    "verify_command",
    "stop_command",
    "stop_grace",
    "health_command",
    "start_timeout",
    "exec_status",
];

const DATA_DIR_DEFAULT: &str = "/var/lib/muster-sidecar";
const SLOTS_DEFAULT: u32 = 1;
const DISK_FLOOR_MB_DEFAULT: u64 = 512;

impl SidecarConfig {
    /// A configuration with the given identity and hub and every other key at its default.
    pub fn new(name: AgentName, hub: String, data_dir: PathBuf) -> Self {
        Self {
            name,
            hub,
            data_dir,
            capabilities: Vec::new(),
            slots: SLOTS_DEFAULT,
            http_listen: None,
            disk_floor_mb: DISK_FLOOR_MB_DEFAULT,
            agent: AgentConfig::default(),
        }
    }

    /// Reads and parses the file at `path`.
    ///
    /// # Errors
    /// [`ConfigError::Io`] if it cannot be read, otherwise as [`SidecarConfig::parse`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses sidecar.toml text; `path` is used only in messages.
    ///
    /// # Errors
    /// [`ConfigError::Syntax`] for TOML that does not parse, [`ConfigError::Invalid`]
    /// listing every missing required key, unknown key, wrong type, bad value
    /// and inconsistent pair.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: path.to_owned(),
                message: syntax_message(text, &e),
            })?;
        let mut problems = Vec::new();

        let mut top = Fields::new(table, "", &mut problems);
        let name = top
            .required(
                "name",
                "set the name this sidecar enrolled under, e.g. name = \"build-01\"",
            )
            .then(|| top.name("name"))
            .flatten();
        let hub = top
            .required(
                "hub",
                "set the hub's address, e.g. hub = \"hub.example.net:7440\"",
            )
            .then(|| top.host_port("hub", false))
            .flatten();
        let data_dir = top
            .path("data_dir")
            .unwrap_or_else(|| DATA_DIR_DEFAULT.into());
        let capabilities = top.capabilities("capabilities").unwrap_or_default();
        let slots = top.uint("slots", 1).unwrap_or(SLOTS_DEFAULT);
        let http_listen = top.opt_socket_addr("http_listen").unwrap_or(None);
        let disk_floor_mb = top
            .uint("disk_floor_mb", 0)
            .unwrap_or(DISK_FLOOR_MB_DEFAULT);
        let agent_table = top.table("agent");
        top.finish(TOP_KEYS, &[("agent", AGENT_KEYS)]);

        if slots > SLOTS_MAX {
            problems.push(Problem {
                key: "slots".into(),
                reason: format!("{slots} is too large; use 1 to {SLOTS_MAX}"),
            });
        }
        let agent = parse_agent(agent_table, &mut problems);

        match (name, hub) {
            (Some(name), Some(hub)) if problems.is_empty() => Ok(Self {
                name,
                hub,
                data_dir,
                capabilities,
                slots,
                http_listen,
                disk_floor_mb,
                agent,
            }),
            _ => Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            }),
        }
    }

    /// The whole file: every key with its current value and a comment saying
    /// what it is for and its default.
    pub fn render(&self) -> String {
        let a = &self.agent;
        let da = AgentConfig::default();
        let mut w = Writer::default();
        w.raw("# muster sidecar configuration. name and hub are required; every other\n");
        w.raw("# key is optional. Durations are \"500ms\", \"30s\", \"5m\", \"1h\" or \"7d\".\n");
        w.raw("# Commands are argv arrays, never shell strings. Unknown keys are errors.\n\n");
        w.raw("# The name this sidecar enrolled under (1 to 64 of A-Z a-z 0-9 . _ -). Required.\n");
        w.raw(&format!("name = {}\n", quote(self.name.as_str())));
        w.raw("# The hub's QUIC address as host:port. Required.\n");
        w.raw(&format!("hub = {}\n", quote(&self.hub)));
        w.path(
            "data_dir",
            &self.data_dir,
            Path::new(DATA_DIR_DEFAULT),
            "State directory: queue, key file, local socket and work/.",
        );
        w.argv(
            "capabilities",
            &self.capabilities,
            &[],
            "What this agent can do, e.g. [\"rust\", \"review\"]; at most 32.",
        );
        w.int(
            "slots",
            self.slots,
            SLOTS_DEFAULT,
            "Agent runs supervised at once, 1 to 256.",
        );
        w.opt_addr(
            "http_listen",
            self.http_listen,
            None,
            "HTTP address for /metrics and /healthz, e.g. \"127.0.0.1:7442\"; \"\" = off.",
        );
        w.int(
            "disk_floor_mb",
            self.disk_floor_mb,
            DISK_FLOOR_MB_DEFAULT,
            "Self-test fails below this much free space (MiB) in data_dir; 0 = no check.",
        );

        w.raw("\n[agent]\n");
        w.string(
            "mode",
            mode_text(a.mode),
            mode_text(da.mode),
            "\"exec\": the command is the run; \"wake\": it wakes an agent that lives elsewhere.",
        );
        w.argv(
            "command",
            &a.command,
            &da.command,
            "argv that runs or wakes the agent; gets the MUSTER_* variables.",
        );
        w.path(
            "working_dir",
            a.working_dir.as_deref().unwrap_or(Path::new("")),
            Path::new(""),
            "Working directory; \"\" = the state directory's work/ folder.",
        );
        w.dur(
            "settle",
            a.settle,
            da.settle,
            "exec: alive this long after spawn counts as started.",
        );
        w.string(
            "verify",
            verify_text(a.verify),
            verify_text(da.verify),
            "wake: \"agent-ack\", \"process\" or \"command\" verifies the start.",
        );
        w.string(
            "verify_process",
            &a.verify_process,
            &da.verify_process,
            "verify = \"process\": name or command-line pattern of the agent's process.",
        );
        w.argv(
            "verify_command",
            &a.verify_command,
            &da.verify_command,
            "verify = \"command\": argv whose exit 0 means the agent is alive.",
        );
        w.argv(
            "stop_command",
            &a.stop_command,
            &da.stop_command,
            "wake: argv that stops the agent; exec stops with SIGTERM.",
        );
        w.dur(
            "stop_grace",
            a.stop_grace,
            da.stop_grace,
            "Time after SIGTERM or stop_command before SIGKILL.",
        );
        w.argv(
            "health_command",
            &a.health_command,
            &da.health_command,
            "Optional self-test of the agent, run when idle; [] = none.",
        );
        w.dur(
            "start_timeout",
            a.start_timeout,
            da.start_timeout,
            "wake: how long to wait for the start to be verified.",
        );
        w.string(
            "exec_status",
            exec_status_text(a.exec_status),
            exec_status_text(da.exec_status),
            "exec: \"recorded\" (the sidecar's reaper process keeps the exit status through a sidecar restart) or \"waited\" (the sidecar is the run's parent; a run that ends while the sidecar is down has no status).",
        );
        w.out
    }
}

fn mode_text(m: Mode) -> &'static str {
    match m {
        Mode::Exec => "exec",
        Mode::Wake => "wake",
    }
}

fn exec_status_text(e: ExecStatus) -> &'static str {
    match e {
        ExecStatus::Recorded => "recorded",
        ExecStatus::Waited => "waited",
    }
}

fn verify_text(v: Verify) -> &'static str {
    match v {
        Verify::AgentAck => "agent-ack",
        Verify::Process => "process",
        Verify::Command => "command",
    }
}

fn parse_agent(table: Table, problems: &mut Vec<Problem>) -> AgentConfig {
    let d = AgentConfig::default();
    let mut t = Fields::new(table, "agent", problems);
    let mode = t
        .choice("mode", &[("exec", Mode::Exec), ("wake", Mode::Wake)])
        .unwrap_or(d.mode);
    let command = t.argv("command");
    let command_empty = command.as_ref().is_some_and(Vec::is_empty);
    let working_dir = t
        .string("working_dir")
        .map(|s| (!s.is_empty()).then(|| PathBuf::from(s)));
    let a = AgentConfig {
        mode,
        working_dir: working_dir.unwrap_or(d.working_dir),
        settle: t.duration("settle").unwrap_or(d.settle),
        verify: t
            .choice(
                "verify",
                &[
                    ("agent-ack", Verify::AgentAck),
                    ("process", Verify::Process),
                    ("command", Verify::Command),
                ],
            )
            .unwrap_or(d.verify),
        verify_process: t.string("verify_process").unwrap_or(d.verify_process),
        verify_command: t.argv("verify_command").unwrap_or(d.verify_command),
        stop_command: t.argv("stop_command").unwrap_or(d.stop_command),
        stop_grace: t.duration("stop_grace").unwrap_or(d.stop_grace),
        health_command: t.argv("health_command").unwrap_or(d.health_command),
        start_timeout: t.duration("start_timeout").unwrap_or(d.start_timeout),
        exec_status: t
            .choice(
                "exec_status",
                &[
                    ("recorded", ExecStatus::Recorded),
                    ("waited", ExecStatus::Waited),
                ],
            )
            .unwrap_or(d.exec_status),
        command: command.unwrap_or(d.command),
    };
    t.finish(AGENT_KEYS, &[]);
    let mut bad = |key: &str, reason: &str| {
        problems.push(Problem {
            key: format!("agent.{key}"),
            reason: reason.to_owned(),
        });
    };
    if command_empty {
        bad(
            "command",
            "is empty; give the agent's argv, e.g. [\"/usr/local/bin/run-agent\"]",
        );
    }
    if a.verify == Verify::Process && a.verify_process.is_empty() {
        bad(
            "verify_process",
            "is empty but verify = \"process\" needs it; give a process name or command-line pattern",
        );
    }
    if a.verify == Verify::Command && a.verify_command.is_empty() {
        bad(
            "verify_command",
            "is empty but verify = \"command\" needs it; give an argv whose exit 0 means alive",
        );
    }
    a
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

    /// Records a problem if `key` is absent; returns whether it is present.
    fn required(&mut self, key: &str, hint: &str) -> bool {
        let present = self.table.contains_key(key);
        if !present {
            self.bad(key, format!("is required; {hint}"));
        }
        present
    }

    fn string(&mut self, key: &str) -> Option<String> {
        self.string_like(key, "a string")
    }

    fn name(&mut self, key: &str) -> Option<AgentName> {
        let text = self.string_like(key, "a name string such as \"build-01\"")?;
        match AgentName::new(text.as_str()) {
            Ok(name) => Some(name),
            Err(e) => {
                self.bad(key, format!("{text:?} is not a valid name: {e}"));
                None
            }
        }
    }

    /// One of a fixed set of words.
    fn choice<T: Copy>(&mut self, key: &str, options: &[(&'static str, T)]) -> Option<T> {
        let words: Vec<&str> = options.iter().map(|(w, _)| *w).collect();
        let list = words
            .iter()
            .map(|w| format!("{w:?}"))
            .collect::<Vec<_>>()
            .join(" or ");
        let text = self.string_like(key, &format!("a string, {list}"))?;
        if let Some((_, v)) = options.iter().find(|(w, _)| *w == text) {
            return Some(*v);
        }
        let hint = match nearest(&text, &words) {
            Some(near) => format!("; did you mean {near:?}?"),
            None => String::new(),
        };
        self.bad(key, format!("{text:?} is not accepted; use {list}{hint}"));
        None
    }

    /// Capability words: at most [`CAPABILITIES_MAX`], each 1 to 64 of `[A-Za-z0-9._-]`.
    fn capabilities(&mut self, key: &str) -> Option<Vec<String>> {
        let items = match self.table.remove(key)? {
            Value::Array(items) => items,
            other => {
                self.bad(
                    key,
                    format!(
                        "expected an array of strings such as [\"rust\", \"review\"], found {}",
                        describe(&other)
                    ),
                );
                return None;
            }
        };
        if items.len() > CAPABILITIES_MAX {
            self.bad(
                key,
                format!(
                    "has {} entries; at most {CAPABILITIES_MAX} are allowed",
                    items.len()
                ),
            );
            return None;
        }
        let mut caps = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.into_iter().enumerate() {
            let item_key = format!("{key}[{i}]");
            let Value::String(cap) = item else {
                self.bad(
                    &item_key,
                    format!("expected a string, found {}", describe(&item)),
                );
                ok = false;
                continue;
            };
            let valid = (1..=NAME_BYTES_MAX).contains(&cap.len())
                && cap
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if valid {
                caps.push(cap);
            } else {
                self.bad(
                    &item_key,
                    format!("{cap:?} is not a capability; use 1 to {NAME_BYTES_MAX} of A-Z a-z 0-9 . _ -"),
                );
                ok = false;
            }
        }
        ok.then_some(caps)
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
                        "expected an array of strings (argv, no shell) such as [\"/usr/local/bin/run-agent\"], found {}",
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

    const MINIMAL: &str = "name = \"build-01\"\nhub = \"hub.example.net:7440\"\n";

    fn parse(text: &str) -> Result<SidecarConfig, ConfigError> {
        SidecarConfig::parse(text, Path::new("/etc/muster/sidecar.toml"))
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

    fn defaults() -> SidecarConfig {
        SidecarConfig::new(
            AgentName::new("build-01").expect("name"),
            "hub.example.net:7440".into(),
            DATA_DIR_DEFAULT.into(),
        )
    }

    #[test]
    fn minimal_file_gives_defaults() {
        assert_eq!(parse(MINIMAL).expect("minimal"), defaults());
    }

    #[test]
    fn empty_file_names_the_required_keys() {
        let p = problems("");
        assert!(has(&p, "name", "is required"));
        assert!(has(&p, "hub", "is required"));
        assert_eq!(p.len(), 2);
        let p = problems("name = \"\"\nhub = \"nohost\"\n");
        assert!(has(&p, "name", "name is empty"));
        assert!(has(&p, "hub", "is not host:port"));
    }

    #[test]
    fn defaults_render_and_parse_back() {
        let d = defaults();
        let text = d.render();
        assert_eq!(parse(&text).expect("render parses"), d);
        for key in TOP_KEYS.iter().chain(AGENT_KEYS) {
            let line = format!("\n{key} = ");
            let sect = format!("[{key}]");
            assert!(
                text.contains(&line) || text.contains(&sect),
                "{key} missing from render"
            );
        }
        assert!(text.contains("Default: \"500ms\""));
    }

    #[test]
    fn changed_values_render_and_parse_back() {
        let mut c = defaults();
        c.capabilities = vec!["rust".into(), "review".into()];
        c.slots = 4;
        c.http_listen = Some("127.0.0.1:7442".parse().expect("addr"));
        c.disk_floor_mb = 0;
        c.agent = AgentConfig {
            mode: Mode::Wake,
            command: vec![
                "tmux".into(),
                "new-session".into(),
                "-d".into(),
                "say \"hi\"".into(),
            ],
            working_dir: Some("/srv/agent".into()),
            settle: Duration::from_millis(1500),
            verify: Verify::Command,
            verify_process: "claude".into(),
            verify_command: vec!["tmux".into(), "has-session".into()],
            stop_command: vec!["tmux".into(), "kill-session".into()],
            stop_grace: Duration::from_secs(3),
            health_command: vec!["/bin/true".into()],
            start_timeout: Duration::from_secs(90),
            exec_status: ExecStatus::Waited,
        };
        assert_eq!(parse(&c.render()).expect("round trip"), c);
    }

    #[test]
    fn several_mistakes_are_all_reported_with_file_and_key() {
        let text = r#"
name = "build 01"
hub = "hub.example.net:7440"
slots = 0
capabilties = ["rust"]
capabilities = ["ok", "no spaces", 3]
[agent]
mode = "exe"
settle = "5x"
command = []
"#;
        let err = parse(text).expect_err("invalid");
        let msg = err.to_string();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("expected Invalid, got {err:?}");
        };
        assert!(has(problems, "name", "contains ' '"));
        assert!(has(problems, "slots", "0 is too small"));
        assert!(has(
            problems,
            "capabilties",
            "did you mean \"capabilities\"?"
        ));
        assert!(has(problems, "capabilities[1]", "is not a capability"));
        assert!(has(
            problems,
            "capabilities[2]",
            "expected a string, found integer 3"
        ));
        assert!(has(
            problems,
            "agent.mode",
            "use \"exec\" or \"wake\"; did you mean \"exec\"?"
        ));
        assert!(has(problems, "agent.command", "is empty"));
        assert!(msg.contains(
            "/etc/muster/sidecar.toml: agent.settle: \"5x\" has unknown unit \"x\"; use ms, s, m, h or d"
        ));
        assert_eq!(problems.len(), 8, "{msg}");
        assert_eq!(msg.lines().count(), problems.len());
        assert!(
            msg.lines()
                .all(|l| l.starts_with("/etc/muster/sidecar.toml: "))
        );
    }

    #[test]
    fn unknown_keys_get_hints() {
        let p = problems(&format!(
            "{MINIMAL}[agent]\nverfy = \"process\"\nqqqq = 1\n"
        ));
        assert!(has(&p, "agent.verfy", "did you mean \"verify\"?"));
        assert!(has(&p, "agent.qqqq", "known keys here"));
        let p = problems(&format!("settle = \"1s\"\n{MINIMAL}"));
        assert!(has(&p, "settle", "belongs under [agent]"));
    }

    #[test]
    fn wrong_types_name_the_expected_type() {
        let p = problems(
            "name = 5\nhub = \"h:1\"\nslots = \"two\"\nagent = \"x\"\nhttp_listen = true\ncapabilities = \"rust\"\n",
        );
        assert!(has(&p, "name", "expected a name string"));
        assert!(has(
            &p,
            "slots",
            "expected a whole number, found string \"two\""
        ));
        assert!(has(&p, "agent", "expected a table [agent]"));
        assert!(has(&p, "http_listen", "expected an address string"));
        assert!(has(&p, "capabilities", "expected an array of strings"));
        let p = problems(&format!(
            "{MINIMAL}[agent]\ncommand = \"/bin/agent --go\"\nstop_grace = 10\n"
        ));
        assert!(has(
            &p,
            "agent.command",
            "expected an array of strings (argv, no shell)"
        ));
        assert!(has(&p, "agent.stop_grace", "expected a duration string"));
    }

    #[test]
    fn bounds() {
        let many: Vec<String> = (0..33).map(|i| format!("\"c{i}\"")).collect();
        let p = problems(&format!(
            "{MINIMAL}slots = 257\ncapabilities = [{}]\n[agent]\nstart_timeout = \"0\"\n",
            many.join(", ")
        ));
        assert!(has(&p, "slots", "use 1 to 256"));
        assert!(has(&p, "capabilities", "at most 32"));
        assert!(has(&p, "agent.start_timeout", "is zero"));
        let long = "x".repeat(65);
        let p = problems(&format!("{MINIMAL}capabilities = [\"{long}\", \"\"]\n"));
        assert!(has(&p, "capabilities[0]", "not a capability"));
        assert!(has(&p, "capabilities[1]", "not a capability"));
    }

    #[test]
    fn cross_field_checks() {
        let p = problems(&format!(
            "{MINIMAL}[agent]\nmode = \"wake\"\nverify = \"process\"\ncommand = [\"\"]\n"
        ));
        assert!(has(
            &p,
            "agent.verify_process",
            "verify = \"process\" needs it"
        ));
        assert!(has(&p, "agent.command[0]", "program name is empty"));
        let p = problems(&format!("{MINIMAL}[agent]\nverify = \"command\"\n"));
        assert!(has(
            &p,
            "agent.verify_command",
            "verify = \"command\" needs it"
        ));
        let p = problems(&format!("{MINIMAL}[agent]\nverify = \"ack\"\n"));
        assert!(has(
            &p,
            "agent.verify",
            "use \"agent-ack\" or \"process\" or \"command\""
        ));
    }

    #[test]
    fn working_dir_empty_is_none() {
        let c = parse(&format!("{MINIMAL}[agent]\nworking_dir = \"\"\n")).expect("ok");
        assert_eq!(c.agent.working_dir, None);
        let c = parse(&format!("{MINIMAL}[agent]\nworking_dir = \"/w\"\n")).expect("ok");
        assert_eq!(c.agent.working_dir, Some(PathBuf::from("/w")));
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = parse("name = \"a\"\nhub = \n").expect_err("syntax");
        assert!(matches!(err, ConfigError::Syntax { .. }));
        let msg = err.to_string();
        assert!(
            msg.starts_with("/etc/muster/sidecar.toml: TOML syntax error at line 2"),
            "{msg}"
        );
    }
}
