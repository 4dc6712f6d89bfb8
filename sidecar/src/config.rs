//! `sidecar.toml`: the sidecar's configuration, parsed once and all at once.
//!
//! `name` and `hub` are required; every other key has a default. Each key is
//! declared once, with its default and doc line, through
//! [`muster_config::config!`]. Unknown keys are errors, so a typo never passes
//! silently, and every problem in the file is reported in one
//! [`ConfigError::Invalid`], each at its line and column.
//! [`SidecarConfig::render`] writes the whole file back, every key with a
//! comment; `enroll` uses it, and `parse(render(c)) == c`.
//!
//! `verify`, `verify_process` and `verify_command` are read together into one
//! [`Verify`], so a combination that cannot work is refused here, at its line,
//! and the runner never meets one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use muster_config::{
    Argv, Between, Checks, Codec, Command, Compound, HostPort, HostPorts, KeyProblem, Node, Reader,
    Refused, Section, Writer,
};
use muster_protocol::AgentName;
use muster_protocol::limits::{CAPABILITIES_MAX, NAME_BYTES_MAX};

pub use muster_config::{ConfigError, Problem};

/// The file name under the configuration directory.
pub const CONFIG_FILE: &str = "sidecar.toml";

/// Most agent runs one sidecar supervises at once; `slots` above this is refused.
pub const SLOTS_MAX: u32 = muster_protocol::limits::SLOTS_MAX;

const DATA_DIR_DEFAULT: &str = "/var/lib/muster-sidecar";

muster_config::config! {
    /// The whole sidecar configuration (`sidecar.toml`).
    #[derive(Debug, Clone, PartialEq)]
    pub struct SidecarConfig {
        required {
            /// The name this sidecar enrolled under (1 to 64 of A-Z a-z 0-9 . _ -).
            name: AgentName as Name =>
                "set the name this sidecar enrolled under, e.g. name = \"build-01\"",
            /// The hub's QUIC address as host:port.
            hub: String as HostPort => "set the hub's address, e.g. hub = \"hub.example.net:7440\"",
        }
        /// A cluster's other hubs, tried in turn when `hub` does not answer (a standby names the leader); filled from the join token.
        hubs: Vec<String> as HostPorts = Vec::new(),
        /// State directory: queue, key file, local socket and work/.
        data_dir: PathBuf = PathBuf::from(DATA_DIR_DEFAULT),
        /// What this agent can do, e.g. ["rust", "review"]; at most 32.
        capabilities: Vec<String> as Capabilities = Vec::new(),
        /// Agent runs supervised at once, 1 to 256.
        slots: u32 as Between<1, { SLOTS_MAX as u64 }> = 1,
        /// HTTP address for /metrics and /healthz, e.g. "127.0.0.1:7442"; "" = off.
        http_listen: Option<SocketAddr> = None,
        /// Self-test fails below this much free space (MiB) in data_dir; 0 = no check.
        disk_floor_mb: u64 = 512,
        sections {
            /// How the agent is started, verified, probed and stopped.
            agent: AgentConfig,
            /// Where each attempt works: the shared directory, a fresh one, or a git worktree.
            workspace: WorkspaceConfig,
            /// How much of each attempt's output is kept, and for how long.
            logs: LogsConfig,
        }
    }
}

muster_config::config! {
    /// How the sidecar starts the agent (`[agent]` in sidecar.toml).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct AgentConfig {
        /// "exec": the command is the run; "wake": it wakes an agent that lives elsewhere.
        mode: Mode = Mode::Exec,
        /// argv that runs or wakes the agent; gets the MUSTER_* variables; may use {task_id}, {generation}, {workspace}, {prompt_file}, {task_file}.
        command: Vec<String> as Command = vec!["/usr/local/bin/run-agent".into()],
        /// Working directory; "" = the state directory's work/ folder.
        working_dir: Option<PathBuf> = None,
        /// exec: alive this long after spawn counts as started.
        settle: Duration = Duration::from_millis(500),
        /// wake: argv that stops the agent; exec stops with SIGTERM.
        stop_command: Vec<String> as Argv = Vec::new(),
        /// Time after SIGTERM or stop_command before SIGKILL.
        stop_grace: Duration = Duration::from_secs(10),
        /// Optional self-test of the agent, run when idle; [] = none.
        health_command: Vec<String> as Argv = Vec::new(),
        /// wake: how long to wait for the start to be verified.
        start_timeout: Duration = Duration::from_secs(60),
        /// exec: "recorded" (the sidecar's reaper process keeps the exit status through a sidecar restart) or "waited" (the sidecar is the run's parent; a run that ends while the sidecar is down has no status).
        exec_status: ExecStatus = ExecStatus::Recorded,
        /// The command's standard input: "null", or "prompt" (the task's prompt file, for `claude -p` or `codex exec -`).
        stdin: Stdin = Stdin::Null,
        /// wake: the agent's session name, e.g. "muster-{task_id}", reported to the hub; "" = the verified process group.
        session: String = String::new(),
        /// The agent's stdout is a transcript to read usage from: "claude-stream-json" (claude -p --output-format stream-json), "codex-json" (codex exec --json) or "none".
        transcript: Transcript = Transcript::None,
        compound {
            /// Wake: how the start is verified (`verify`, `verify_process`, `verify_command`).
            verify: Verify,
        }
    }
    check = check_agent;
}

/// Placeholders (`{task_id}`, `{generation}`, `{workspace}`, `{prompt_file}`)
/// are checked where they are written.
fn check_agent(a: &AgentConfig, checks: &mut muster_config::Checks<'_>) {
    use crate::agent::template;
    let mut words: Vec<(&'static str, &str)> = Vec::new();
    words.extend(a.command.iter().map(|w| ("command", w.as_str())));
    words.extend(a.stop_command.iter().map(|w| ("stop_command", w.as_str())));
    words.push(("session", a.session.as_str()));
    match a.verify.probe() {
        Some(Probe::Process(pattern)) => words.push(("verify_process", pattern.as_str())),
        Some(Probe::Command(argv)) => {
            words.extend(argv.iter().map(|w| ("verify_command", w.as_str())));
        }
        None => {}
    }
    for (key, word) in words {
        if let Err(reason) = template::check(word) {
            checks.bad(&[key], reason);
            return;
        }
    }
}

impl SidecarConfig {
    /// A configuration with the given identity and hub and every other key at its default.
    pub fn new(name: AgentName, hub: String, data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            ..Self::from_required(name, hub)
        }
    }

    /// Reads and parses the file at `path`.
    ///
    /// # Errors
    /// [`ConfigError::Io`] if it cannot be read, otherwise as [`SidecarConfig::parse`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        muster_config::load(path, std::fs::read_to_string(path))
    }

    /// Parses sidecar.toml text; `path` is used only in messages.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] listing every problem: TOML syntax, missing
    /// required key, unknown key, wrong type, bad value and inconsistent pair.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        muster_config::parse_file(path, text)
    }

    /// The whole file: every key with its current value and a comment saying
    /// what it is for and its default.
    pub fn render(&self) -> String {
        muster_config::render(self, HEADER)
    }
}

/// The comment at the top of the file `enroll` writes.
const HEADER: &str = "# muster sidecar configuration. name and hub are required; every other\n\
                      # key is optional. Durations are \"500ms\", \"30s\", \"5m\", \"1h\" or \"7d\".\n\
                      # Commands are argv arrays, never shell strings. Unknown keys are errors.\n";

// === The agent's settings ===

/// See [`AgentConfig::mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The command is the agent run.
    Exec,
    /// The command only wakes the agent.
    Wake,
}

muster_config::words!(Mode { Mode::Exec => "exec", Mode::Wake => "wake" });

/// See [`AgentConfig::exec_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecStatus {
    /// The exit status is written to the run directory, so it is known even when the
    /// run ends while the sidecar is down: by the runner's reaper (one exec per run),
    /// or without one by a `/bin/sh` wrapper (two execs per run).
    Recorded,
    /// The command is spawned directly and the sidecar waits for it: one exec per run
    /// (about 1 ms of CPU less here), but a run that ends while the sidecar is down
    /// ends `agent_exited` without its status.
    Waited,
}

/// See [`AgentConfig::stdin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdin {
    /// Standard input is `/dev/null`.
    Null,
    /// Standard input is the task's prompt file.
    Prompt,
}

muster_config::words!(Stdin { Stdin::Null => "null", Stdin::Prompt => "prompt" });

/// See [`AgentConfig::transcript`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transcript {
    /// The agent's output is not read.
    None,
    /// Claude Code's `--output-format stream-json`.
    ClaudeStreamJson,
    /// Codex's `codex exec --json`.
    CodexJson,
}

muster_config::words!(Transcript {
    Transcript::None => "none",
    Transcript::ClaudeStreamJson => "claude-stream-json",
    Transcript::CodexJson => "codex-json",
});

impl Transcript {
    /// The parser's format, if the output is read.
    pub fn format(self) -> Option<crate::transcript::Format> {
        match self {
            Transcript::None => None,
            Transcript::ClaudeStreamJson => Some(crate::transcript::Format::ClaudeStreamJson),
            Transcript::CodexJson => Some(crate::transcript::Format::CodexJson),
        }
    }
}

muster_config::words!(ExecStatus {
    ExecStatus::Recorded => "recorded",
    ExecStatus::Waited => "waited",
});

/// How a wake run's start is verified, and whether the agent is then watched.
/// One value for three keys, so a choice without the pattern or command it
/// needs, or with both, cannot be represented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// The agent runs `muster-sidecar task start` itself (`verify = "agent-ack"`);
    /// a probe, when one is set, only watches that it stays alive.
    AgentAck(Option<Probe>),
    /// The probe verifies the start, then watches the agent (`verify = "process"` or `"command"`).
    Probe(Probe),
}

impl Default for Verify {
    fn default() -> Self {
        Verify::AgentAck(None)
    }
}

impl Verify {
    /// The probe that checks the agent is there, if any.
    pub fn probe(&self) -> Option<&Probe> {
        match self {
            Verify::AgentAck(probe) => probe.as_ref(),
            Verify::Probe(probe) => Some(probe),
        }
    }
}

/// How the agent's presence is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A process whose name equals, or whose command line contains, this text (`verify_process`).
    Process(String),
    /// This argv exits 0 (`verify_command`).
    Command(Vec<String>),
}

/// The `verify` key's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyBy {
    /// `"agent-ack"`: the agent's own `task start`.
    AgentAck,
    /// `"process"`: `verify_process` appears.
    Process,
    /// `"command"`: `verify_command` exits 0.
    Command,
}

muster_config::words!(VerifyBy {
    VerifyBy::AgentAck => "agent-ack",
    VerifyBy::Process => "process",
    VerifyBy::Command => "command",
});

muster_config::config! {
    /// The `[agent]` keys behind [`Verify`], as written in the file.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct VerifyKeys {
        /// wake: "agent-ack", "process" or "command" verifies the start.
        verify: VerifyBy = VerifyBy::AgentAck,
        /// verify = "process": name or command-line pattern of the agent's process.
        verify_process: String = String::new(),
        /// verify = "command": argv whose exit 0 means the agent is alive.
        verify_command: Vec<String> as Argv = Vec::new(),
    }
}

impl Compound for Verify {
    type Keys = VerifyKeys;

    fn build(k: VerifyKeys) -> Result<Self, Vec<KeyProblem>> {
        let process = (!k.verify_process.is_empty()).then_some(Probe::Process(k.verify_process));
        let command = (!k.verify_command.is_empty()).then_some(Probe::Command(k.verify_command));
        let problem = |key, reason: &str| {
            Err(vec![KeyProblem {
                key,
                reason: reason.into(),
            }])
        };
        match (k.verify, process, command) {
            (VerifyBy::AgentAck, Some(_), Some(_)) => problem(
                "verify_command",
                "is set as well as verify_process; with verify = \"agent-ack\" either one may watch the agent, not both: remove one",
            ),
            (VerifyBy::AgentAck, process, command) => Ok(Verify::AgentAck(process.or(command))),
            (VerifyBy::Process, _, Some(_)) => problem(
                "verify_command",
                "is set but verify = \"process\" uses verify_process; remove verify_command or set verify = \"command\"",
            ),
            (VerifyBy::Process, Some(p), None) => Ok(Verify::Probe(p)),
            (VerifyBy::Process, None, None) => problem(
                "verify_process",
                "is empty but verify = \"process\" needs it; give a process name or command-line pattern",
            ),
            (VerifyBy::Command, Some(_), _) => problem(
                "verify_process",
                "is set but verify = \"command\" uses verify_command; remove verify_process or set verify = \"process\"",
            ),
            (VerifyBy::Command, None, Some(c)) => Ok(Verify::Probe(c)),
            (VerifyBy::Command, None, None) => problem(
                "verify_command",
                "is empty but verify = \"command\" needs it; give an argv whose exit 0 means alive",
            ),
        }
    }

    fn to_keys(&self) -> VerifyKeys {
        let (verify, probe) = match self {
            Verify::AgentAck(probe) => (VerifyBy::AgentAck, probe.as_ref()),
            Verify::Probe(p @ Probe::Process(_)) => (VerifyBy::Process, Some(p)),
            Verify::Probe(p @ Probe::Command(_)) => (VerifyBy::Command, Some(p)),
        };
        let mut keys = VerifyKeys {
            verify,
            ..VerifyKeys::default()
        };
        match probe {
            Some(Probe::Process(pattern)) => keys.verify_process = pattern.clone(),
            Some(Probe::Command(argv)) => keys.verify_command = argv.clone(),
            None => {}
        }
        keys
    }
}

// === The workspace settings ===

/// Default of `[workspace] max_disk`: 20 GiB.
pub const WORKSPACE_MAX_DISK_DEFAULT: u64 = 20 << 30;

muster_config::config! {
    /// Where each attempt works (`[workspace]` in sidecar.toml); see [`crate::workspace`].
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct WorkspaceConfig {
        /// "shared": every attempt in the agent's working_dir; "dir": a fresh empty directory per attempt; "git": a git worktree per attempt.
        mode: WorkspaceMode = WorkspaceMode::Shared,
        /// Where attempt workspaces live, <root>/<task>-<generation>; "" = <data_dir>/workspaces. Mirrors of repositories live in <data_dir>/mirrors.
        root: Option<PathBuf> = None,
        /// Directory the `copy` entries are taken from; "" = none.
        template_dir: Option<PathBuf> = None,
        /// Files or directories, relative to template_dir, copied into every new workspace, e.g. [".env", "config/local"].
        copy: Vec<PathBuf> as RelPaths = Vec::new(),
        /// argv run in every new workspace after the copies, e.g. ["npm", "ci"]; [] = none.
        setup_command: Vec<String> as Argv = Vec::new(),
        /// Longest setup_command run; then its process group is killed and the attempt fails.
        setup_timeout: Duration = Duration::from_secs(300),
        /// Longest clone or fetch of a repository before an attempt.
        fetch_timeout: Duration = Duration::from_secs(120),
        /// Finished workspaces older than this are removed (their checkpoints are kept).
        retention: Duration = Duration::from_secs(7 * 86_400),
        /// Most disk all workspaces may use, e.g. "20GiB"; finished ones are removed oldest first to stay below.
        max_disk: u64 as ByteSize = WORKSPACE_MAX_DISK_DEFAULT,
        compound {
            /// Whether a retried attempt continues from the task's last checkpoint (`continue`).
            retry_from: RetryFrom,
        }
    }
    check = check_workspace;
}

/// See [`WorkspaceConfig::mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkspaceMode {
    /// Every attempt runs in the agent's `working_dir` (the behaviour before workspaces).
    Shared,
    /// A fresh empty directory per attempt.
    Dir,
    /// A git worktree per attempt, on branch `muster/<task>`, from a local mirror of the task's repo.
    Git,
}

muster_config::words!(WorkspaceMode {
    WorkspaceMode::Shared => "shared",
    WorkspaceMode::Dir => "dir",
    WorkspaceMode::Git => "git",
});

impl WorkspaceMode {
    /// The mode's word in sidecar.toml.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkspaceMode::Shared => "shared",
            WorkspaceMode::Dir => "dir",
            WorkspaceMode::Git => "git",
        }
    }
}

/// Where a retried attempt of a task starts in git mode (`continue = true | false`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetryFrom {
    /// From the task's newest checkpoint on this host, when there is one (`continue = true`).
    #[default]
    Checkpoint,
    /// From the base, whatever earlier attempts did (`continue = false`).
    Base,
}

/// The key behind [`RetryFrom`]. Declared by hand because `continue` is a
/// Rust keyword, which [`muster_config::config!`] cannot take as a field name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContinueKey {
    /// The value of `continue`.
    pub resume: bool,
}

const CONTINUE_KEY: &str = "continue";
const CONTINUE_DOC: &[&str] = &[
    " A retried attempt of a task starts from its last checkpoint on this host instead of from the base.",
];

impl Section for ContinueKey {
    fn keys() -> Vec<&'static str> {
        vec![CONTINUE_KEY]
    }

    fn read_from(reader: &mut Reader<'_>) -> Option<Self> {
        let resume = reader.key::<bool, Flag>(CONTINUE_KEY, || true);
        Some(ContinueKey {
            resume: resume.unwrap_or(true),
        })
    }

    fn render_into(&self, writer: &mut Writer) {
        writer.key::<bool, Flag>(CONTINUE_KEY, CONTINUE_DOC, &self.resume, Some(&true));
    }
}

impl Compound for RetryFrom {
    type Keys = ContinueKey;

    fn build(k: ContinueKey) -> Result<Self, Vec<KeyProblem>> {
        Ok(if k.resume {
            RetryFrom::Checkpoint
        } else {
            RetryFrom::Base
        })
    }

    fn to_keys(&self) -> ContinueKey {
        ContinueKey {
            resume: *self == RetryFrom::Checkpoint,
        }
    }
}

/// `copy` needs a `template_dir`, and neither `copy` nor `setup_command` means
/// anything in shared mode, where nothing new is made per attempt.
fn check_workspace(w: &WorkspaceConfig, checks: &mut Checks<'_>) {
    if !w.copy.is_empty() && w.template_dir.is_none() {
        checks.bad(
            &["copy", "template_dir"],
            "lists entries but template_dir is not set; set template_dir to the directory they are copied from",
        );
    }
    if w.mode == WorkspaceMode::Shared {
        if !w.copy.is_empty() {
            checks.bad(
                &["copy", "mode"],
                "has no effect with mode = \"shared\"; set mode = \"dir\" or \"git\", or remove copy",
            );
        }
        if !w.setup_command.is_empty() {
            checks.bad(
                &["setup_command", "mode"],
                "has no effect with mode = \"shared\"; set mode = \"dir\" or \"git\", or remove setup_command",
            );
        }
    }
}

// === Codecs of sidecar-only values ===

/// An [`AgentName`], checked as the hub checks it at enrollment.
#[derive(Debug)]
struct Name;

impl Codec<AgentName> for Name {
    fn read(node: &Node<'_>) -> Result<AgentName, Refused> {
        let text = node.string("a name string such as \"build-01\"")?;
        AgentName::new(text).map_err(|e| node.invalid(format!("{text:?} is not a valid name: {e}")))
    }

    fn write(value: &AgentName) -> String {
        muster_config::codec::quote(value.as_str())
    }
}

/// Capability words: at most [`CAPABILITIES_MAX`], each 1 to 64 of `[A-Za-z0-9._-]`.
#[derive(Debug)]
struct Capabilities;

impl Codec<Vec<String>> for Capabilities {
    fn read(node: &Node<'_>) -> Result<Vec<String>, Refused> {
        let items = node.items("an array of strings such as [\"rust\", \"review\"]")?;
        if items.len() > CAPABILITIES_MAX {
            return Err(node.invalid(format!(
                "has {} entries; at most {CAPABILITIES_MAX} are allowed",
                items.len()
            )));
        }
        Refused::collect(items.iter().map(|item| {
            let cap = item.string("a string")?;
            let valid = (1..=NAME_BYTES_MAX).contains(&cap.len())
                && cap
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if valid {
                Ok(cap.to_owned())
            } else {
                Err(item.invalid(format!(
                    "{cap:?} is not a capability; use 1 to {NAME_BYTES_MAX} of A-Z a-z 0-9 . _ -"
                )))
            }
        }))
    }

    fn write(value: &Vec<String>) -> String {
        muster_config::codec::quote_all(value)
    }
}

/// `true` or `false`.
#[derive(Debug)]
struct Flag;

impl Codec<bool> for Flag {
    fn read(node: &Node<'_>) -> Result<bool, Refused> {
        match node.value() {
            toml::de::DeValue::Boolean(b) => Ok(*b),
            _ => Err(node.wrong_type("true or false")),
        }
    }

    fn write(value: &bool) -> String {
        value.to_string()
    }
}

/// Relative paths inside a directory: no absolute path, no `..`, and nothing
/// under `.git` (a worktree's `.git` is git's, and a copy over it would cut
/// the tree from its repository).
#[derive(Debug)]
struct RelPaths;

impl Codec<Vec<PathBuf>> for RelPaths {
    fn read(node: &Node<'_>) -> Result<Vec<PathBuf>, Refused> {
        let items =
            node.items("an array of relative paths such as [\".env\", \"config/local\"]")?;
        Refused::collect(items.iter().map(|item| {
            let text = item.string("a relative path string")?;
            rel_path(text).map_err(|why| item.invalid(format!("{text:?} {why}")))
        }))
    }

    fn write(value: &Vec<PathBuf>) -> String {
        let texts: Vec<String> = value
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        muster_config::codec::quote_all(&texts)
    }
}

/// `text` as a path relative to a directory and staying inside it.
fn rel_path(text: &str) -> Result<PathBuf, &'static str> {
    use std::path::Component;
    let path = PathBuf::from(text);
    let mut normal = path.components().filter_map(|c| match c {
        Component::Normal(n) => Some(Ok(n)),
        Component::CurDir => None,
        Component::ParentDir => Some(Err(
            "contains \"..\"; give a path inside template_dir, e.g. \"config/local\"",
        )),
        Component::RootDir | Component::Prefix(_) => Some(Err(
            "is absolute; give a path relative to template_dir, e.g. \".env\"",
        )),
    });
    match normal.next() {
        None => Err("names no file; give a path relative to template_dir, e.g. \".env\""),
        Some(Err(why)) => Err(why),
        Some(Ok(first)) if first == ".git" => {
            Err("is inside .git, which belongs to git; copy files of the tree instead")
        }
        Some(Ok(_)) => match normal.find_map(Result::err) {
            Some(why) => Err(why),
            None => Ok(path),
        },
    }
}

/// A number of bytes: a whole number, or a string with a unit such as
/// `"20GiB"`, `"512MiB"` or `"10GB"` (B, KiB, MiB, GiB, TiB; kB, MB, GB, TB).
#[derive(Debug)]
struct ByteSize;

// === The log settings ===

/// Default of `[logs] max_bytes_per_attempt`: 64 MiB per file.
pub const LOGS_PER_ATTEMPT_DEFAULT: u64 = 64 << 20;
/// Default of `[logs] max_disk`: 5 GiB.
pub const LOGS_MAX_DISK_DEFAULT: u64 = 5 << 30;

muster_config::config! {
    /// What is kept of each attempt's stdout and stderr (`[logs]` in sidecar.toml); see [`crate::logs`].
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct LogsConfig {
        /// Most bytes kept of each of an attempt's stdout and stderr; beyond it the first and last halves are kept and the gap is marked.
        max_bytes_per_attempt: u64 as ByteSize = LOGS_PER_ATTEMPT_DEFAULT,
        /// Logs of attempts that ended longer ago than this are removed.
        retention: Duration = Duration::from_secs(7 * 86_400),
        /// Most disk all kept logs may use, e.g. "5GiB"; the oldest are removed first to stay below.
        max_disk: u64 as ByteSize = LOGS_MAX_DISK_DEFAULT,
    }
}

/// The byte units a [`ByteSize`] accepts, largest first within each family.
const BYTE_UNITS: &[(&str, u64)] = &[
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("kB", 1_000),
    ("B", 1),
];

impl Codec<u64> for ByteSize {
    fn read(node: &Node<'_>) -> Result<u64, Refused> {
        let bytes = match node.value() {
            toml::de::DeValue::Integer(_) => muster_config::codec::read_int(node, 0, i128::MAX)?,
            toml::de::DeValue::String(text) => {
                parse_bytes(text).map_err(|why| node.invalid(format!("{text:?} {why}")))?
            }
            _ => return Err(node.wrong_type("a size such as \"20GiB\" or a number of bytes")),
        };
        if bytes == 0 {
            return Err(node.invalid(
                "is zero; give a size such as \"20GiB\" (to keep no finished workspace, shorten retention)",
            ));
        }
        Ok(bytes)
    }

    fn write(value: &u64) -> String {
        BYTE_UNITS[..4]
            .iter()
            .find(|(_, per)| *value != 0 && value.is_multiple_of(*per))
            .map_or_else(
                || value.to_string(),
                |(unit, per)| muster_config::codec::quote(&format!("{}{unit}", value / per)),
            )
    }
}

/// `"<whole number><unit>"`, spaces allowed between, as bytes.
fn parse_bytes(text: &str) -> Result<u64, &'static str> {
    const HINT: &str = "is not a size; write e.g. \"20GiB\", \"512MiB\" or \"10GB\"";
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| HINT)?;
    let per = match unit.trim() {
        "" => 1,
        u => BYTE_UNITS
            .iter()
            .find(|(name, _)| *name == u)
            .map(|(_, per)| *per)
            .ok_or("has an unknown unit; use B, KiB, MiB, GiB, TiB, kB, MB, GB or TB")?,
    };
    n.checked_mul(per).ok_or("is too large")
}

#[cfg(test)]
mod tests {
    use muster_config::Section;

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

    fn agent(keys: &str) -> Result<SidecarConfig, ConfigError> {
        parse(&format!("{MINIMAL}[agent]\n{keys}"))
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
        for key in SidecarConfig::keys()
            .into_iter()
            .chain(AgentConfig::keys())
            .chain(WorkspaceConfig::keys())
            .chain(LogsConfig::keys())
        {
            let line = format!("\n{key} = ");
            let sect = format!("[{key}]");
            assert!(
                text.contains(&line) || text.contains(&sect),
                "{key} missing from render"
            );
        }
        assert!(text.contains("Default: \"500ms\""));
        assert!(text.contains("Required.\nname = \"build-01\"\n"));
        assert_eq!(Verify::default().to_keys(), VerifyKeys::default());
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
            verify: Verify::Probe(Probe::Command(vec!["tmux".into(), "has-session".into()])),
            stop_command: vec!["tmux".into(), "kill-session".into()],
            stop_grace: Duration::from_secs(3),
            health_command: vec!["/bin/true".into()],
            start_timeout: Duration::from_secs(90),
            exec_status: ExecStatus::Waited,
            stdin: Stdin::Prompt,
            session: "muster-{task_id}".into(),
            transcript: Transcript::CodexJson,
        };
        c.workspace = WorkspaceConfig {
            mode: WorkspaceMode::Git,
            root: Some("/srv/workspaces".into()),
            template_dir: Some("/srv/template".into()),
            copy: vec![".env".into(), "config/local".into()],
            setup_command: vec!["npm".into(), "ci".into()],
            setup_timeout: Duration::from_secs(600),
            fetch_timeout: Duration::from_secs(30),
            retention: Duration::from_secs(3 * 86_400),
            max_disk: 512 << 20,
            retry_from: RetryFrom::Base,
        };
        c.logs = LogsConfig {
            max_bytes_per_attempt: 1 << 20,
            retention: Duration::from_secs(3600),
            max_disk: 3 << 30,
        };
        assert_eq!(parse(&c.render()).expect("round trip"), c);
        c.workspace.max_disk = 1_000_001;
        assert_eq!(parse(&c.render()).expect("round trip"), c);
        for verify in [
            Verify::AgentAck(None),
            Verify::AgentAck(Some(Probe::Process("claude".into()))),
            Verify::AgentAck(Some(Probe::Command(vec!["true".into()]))),
            Verify::Probe(Probe::Process("claude".into())),
        ] {
            c.agent.verify = verify;
            assert_eq!(parse(&c.render()).expect("round trip"), c);
        }
    }

    #[test]
    fn several_mistakes_are_all_reported_with_file_line_and_key() {
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
            "/etc/muster/sidecar.toml:9:10: agent.settle: \"5x\" has unknown unit \"x\"; use ms, s, m, h or d"
        ));
        assert_eq!(problems.len(), 8, "{msg}");
        assert_eq!(msg.lines().count(), problems.len());
        assert!(
            msg.lines()
                .all(|l| l.starts_with("/etc/muster/sidecar.toml:"))
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
    fn verify_is_one_setting_checked_at_parse_time() {
        let ok = |keys: &str| agent(keys).expect(keys).agent.verify;
        assert_eq!(ok(""), Verify::AgentAck(None));
        assert_eq!(
            ok("verify_process = \"claude\"\n"),
            Verify::AgentAck(Some(Probe::Process("claude".into())))
        );
        assert_eq!(
            ok("verify = \"command\"\nverify_command = [\"true\"]\n"),
            Verify::Probe(Probe::Command(vec!["true".into()]))
        );
        assert_eq!(
            ok("verify = \"process\"\nverify_process = \"claude\"\nverify_command = []\n"),
            Verify::Probe(Probe::Process("claude".into()))
        );

        // A choice without what it needs: named at the `verify` line.
        let p = problems(&format!(
            "{MINIMAL}[agent]\nmode = \"wake\"\nverify = \"process\"\ncommand = [\"\"]\n"
        ));
        assert!(has(
            &p,
            "agent.verify_process",
            "verify = \"process\" needs it"
        ));
        assert_eq!(
            p.iter()
                .find(|x| x.key == "agent.verify_process")
                .map(|x| x.line),
            Some(5)
        );
        assert!(has(&p, "agent.command[0]", "program name is empty"));
        let p = problems(&format!("{MINIMAL}[agent]\nverify = \"command\"\n"));
        assert!(has(
            &p,
            "agent.verify_command",
            "verify = \"command\" needs it"
        ));

        // Both set: refused, naming both keys, at the line of the extra one.
        let p = problems(&format!(
            "{MINIMAL}[agent]\nverify = \"process\"\nverify_process = \"claude\"\nverify_command = [\"true\"]\n"
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!((p[0].key.as_str(), p[0].line), ("agent.verify_command", 6));
        assert!(p[0].reason.contains("verify_process"), "{p:?}");
        let p = problems(&format!(
            "{MINIMAL}[agent]\nverify_command = [\"true\"]\nverify_process = \"claude\"\n"
        ));
        assert!(has(&p, "agent.verify_command", "as well as verify_process"));
        let p = problems(&format!(
            "{MINIMAL}[agent]\nverify = \"command\"\nverify_process = \"claude\"\nverify_command = [\"true\"]\n"
        ));
        assert!(has(
            &p,
            "agent.verify_process",
            "verify = \"command\" uses verify_command"
        ));

        let p = problems(&format!("{MINIMAL}[agent]\nverify = \"ack\"\n"));
        assert!(has(
            &p,
            "agent.verify",
            "use \"agent-ack\" or \"process\" or \"command\""
        ));
    }

    fn workspace(keys: &str) -> Result<SidecarConfig, ConfigError> {
        parse(&format!("{MINIMAL}[workspace]\n{keys}"))
    }

    #[test]
    fn workspace_defaults_and_values() {
        let w = parse(MINIMAL).expect("minimal").workspace;
        assert_eq!(w.mode, WorkspaceMode::Shared);
        assert_eq!(w.retry_from, RetryFrom::Checkpoint);
        assert_eq!(w.max_disk, 20 << 30);
        assert_eq!(w.retention, Duration::from_secs(7 * 86_400));
        assert!(defaults().render().contains("\n[workspace]\n"));
        assert!(defaults().render().contains("\ncontinue = true\n"));
        assert!(defaults().render().contains("\nmax_disk = \"20GiB\"\n"));

        let w = workspace(
            "mode = \"git\"\ncontinue = false\nmax_disk = \"512 MiB\"\ntemplate_dir = \"/t\"\ncopy = [\".env\", \"./config/local\", \"a/b/\"]\n",
        )
        .expect("valid")
        .workspace;
        assert_eq!(w.mode, WorkspaceMode::Git);
        assert_eq!(w.retry_from, RetryFrom::Base);
        assert_eq!(w.max_disk, 512 << 20);
        assert_eq!(w.copy.len(), 3);
        for (text, bytes) in [
            ("1000000", 1_000_000),
            ("\"10GB\"", 10_000_000_000),
            ("\"3KiB\"", 3 << 10),
            ("\"7\"", 7),
            ("\"1TiB\"", 1 << 40),
        ] {
            let w = workspace(&format!("max_disk = {text}\n"))
                .expect(text)
                .workspace;
            assert_eq!(w.max_disk, bytes, "{text}");
        }
    }

    #[test]
    fn workspace_mistakes_are_named_at_their_key() {
        let p = problems(&format!(
            "{MINIMAL}[workspace]\nmode = \"worktree\"\ncontinue = \"yes\"\nmax_disk = \"20 gigs\"\ntemplate_dir = \"/t\"\ncopy = [\"/etc/passwd\", \"../up\", \"a/../../b\", \".git/config\", \"\", \"ok\"]\n"
        ));
        assert!(has(
            &p,
            "workspace.mode",
            "use \"shared\" or \"dir\" or \"git\""
        ));
        assert!(has(&p, "workspace.continue", "expected true or false"));
        assert!(has(&p, "workspace.max_disk", "unknown unit"));
        assert!(has(&p, "workspace.copy[0]", "is absolute"));
        assert!(has(&p, "workspace.copy[1]", "contains \"..\""));
        assert!(has(&p, "workspace.copy[2]", "contains \"..\""));
        assert!(has(&p, "workspace.copy[3]", "inside .git"));
        assert!(has(&p, "workspace.copy[4]", "names no file"));
        assert_eq!(p.len(), 8, "{p:?}");
        let line = |key: &str| p.iter().find(|x| x.key == key).map(|x| x.line);
        assert_eq!(line("workspace.copy[0]"), Some(8));
        assert_eq!(line("workspace.continue"), Some(5));

        let p = problems(&format!(
            "{MINIMAL}[workspace]\nmode = \"dir\"\ncopy = [\".env\"]\nmax_disk = 0\n"
        ));
        assert!(has(&p, "workspace.copy", "template_dir is not set"));
        assert!(has(&p, "workspace.max_disk", "is zero"));
        let p = problems(&format!(
            "{MINIMAL}[workspace]\ntemplate_dir = \"/t\"\ncopy = [\".env\"]\nsetup_command = [\"make\"]\n"
        ));
        assert!(has(&p, "workspace.copy", "mode = \"shared\""));
        assert!(has(&p, "workspace.setup_command", "mode = \"shared\""));
        let p = problems(&format!("{MINIMAL}[workspace]\ncontinu = true\n"));
        assert!(has(&p, "workspace.continu", "did you mean \"continue\"?"));
    }

    #[test]
    fn working_dir_empty_is_none() {
        let c = agent("working_dir = \"\"\n").expect("ok");
        assert_eq!(c.agent.working_dir, None);
        let c = agent("working_dir = \"/w\"\n").expect("ok");
        assert_eq!(c.agent.working_dir, Some(PathBuf::from("/w")));
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = parse("name = \"a\"\nhub = \n").expect_err("syntax");
        let msg = err.to_string();
        assert!(msg.starts_with("/etc/muster/sidecar.toml:2:"), "{msg}");
        assert!(msg.contains("TOML syntax error"), "{msg}");
    }
}
