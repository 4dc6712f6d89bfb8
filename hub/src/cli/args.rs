//! The command line of `muster-hub`: every command and its arguments (clap).

use std::path::PathBuf;

use crate::cli::ConnectArgs;
use clap::{Parser, Subcommand};
use muster_protocol::msg::Role;

#[derive(Parser)]
#[command(
    name = "muster-hub",
    version,
    about = "The muster hub: schedules agent tasks across machines"
)]
pub(crate) struct Cli {
    /// Log format for daemons.
    #[arg(long, value_enum, default_value = "text", global = true)]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Create a hub data directory: CA, server certificate, admin credential, hub.toml, database.
    Init {
        /// Where the hub keeps its state.
        #[arg(long, default_value = crate::cli::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// QUIC listen address.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Extra subject alternative names for the server certificate.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Overwrite an existing data directory.
        #[arg(long)]
        force: bool,
    },
    /// Run the hub daemon.
    Serve {
        /// hub.toml to use (default: <data-dir>/hub.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Enroll this machine as an operator and save the credential.
    Login {
        /// A join token from `muster-hub token create --role operator|admin`,
        /// or `-` to read it from stdin. A literal token is visible in `ps`:
        /// prefer `--token -` or `--token-file`.
        #[arg(long)]
        token: Option<String>,
        /// A file whose first line is the join token.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// The name to enroll under (default: user@host).
        #[arg(long)]
        name: Option<String>,
        /// The role the token grants.
        #[arg(long, default_value = "operator")]
        role: Role,
        /// Where to save the credential (default: ~/.config/muster/operator.toml).
        #[arg(long = "save-to")]
        save_to: Option<PathBuf>,
    },
    /// Submit a task.
    Submit(Box<SubmitArgs>),
    /// List tasks, newest first.
    Tasks {
        /// Only this state.
        #[arg(long)]
        state: Option<String>,
        /// Only tasks of this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Only tasks with this label, as KEY=VALUE.
        #[arg(long)]
        label: Option<String>,
        /// Page length.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue from a previous page's cursor.
        #[arg(long)]
        cursor: Option<u64>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// One task: show, cancel or requeue.
    Task {
        #[command(subcommand)]
        command: TaskCommand,
        #[arg(long, global = true)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// List agents with their state.
    Agents {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Revoke one identity, agent or operator (the last admin cannot be revoked).
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
        #[arg(long, global = true)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// One agent: show, drain, undrain, revoke, or change its grant.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
        #[arg(long, global = true)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Stream task and agent events as they happen.
    Watch {
        /// Resume from this sequence number.
        #[arg(long)]
        from: Option<u64>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Open alerts.
    Alerts {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Coordination figures: messages and bytes per task, commits.
    Stats {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// A local fleet on loopback running sample tasks end to end (no set-up needed).
    Demo {
        /// How many sample tasks to run.
        #[arg(long, default_value_t = 20)]
        tasks: usize,
        /// Keep the fleet running after the sample tasks, with the web dashboard on
        /// a loopback port; prints a login URL and runs until Ctrl-C or SIGTERM.
        #[arg(long)]
        keep: bool,
    },
    /// Print a one-time login URL for the web dashboard, bound to this identity.
    ///
    /// Example: muster-hub dashboard --role operator
    Dashboard {
        /// The browser session's role: at most your own (default: your own).
        #[arg(long)]
        role: Option<Role>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Check the hub's configuration, files and that it answers.
    Doctor {
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a single-use join token, or with `--kind api` an API token for the
    /// HTTP API; prints it alone on stdout.
    ///
    /// Example: muster-hub token create --kind api --name ci-bot --role operator --ttl 30d
    Create {
        /// join: a single-use token to enroll a host or operator; api: a bearer
        /// token for the HTTP API (`Authorization: Bearer ...`), usable until it expires.
        #[arg(long, value_enum, default_value = "join")]
        kind: TokenKind,
        /// The role it grants (join: agent, operator or admin; api: operator or admin).
        #[arg(long)]
        role: Option<Role>,
        /// How long it is valid (default: join 1h, api 30d).
        #[arg(long)]
        ttl: Option<String>,
        /// join: only this name may enroll with it; enrolling replaces the name's
        /// current identity (use it to replace a host), which is revoked at once.
        /// api: the token's name (required), to list and revoke it by.
        #[arg(long)]
        name: Option<String>,
        /// Agents: a capability it grants (repeatable); without any, the host's
        /// own list at enrollment is granted.
        #[arg(long = "capability")]
        capabilities: Vec<String>,
        /// Agents: the slots it grants at most; without it, what the host asks for.
        #[arg(long)]
        slots: Option<u32>,
    },
    /// List the live API tokens (names, roles, expiry; never the secrets). Admins only.
    ///
    /// Example: muster-hub token list
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an API token by name: requests and event streams using it stop at once.
    ///
    /// Example: muster-hub token revoke ci-bot
    Revoke {
        /// The token's name.
        name: String,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum TokenKind {
    /// A single-use join token.
    Join,
    /// An API token for the HTTP API.
    Api,
}

#[derive(Subcommand)]
pub(crate) enum IdentityCommand {
    /// Revoke one identity by role and name, or by certificate fingerprint.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["name", "fingerprint"])))]
    Revoke {
        /// Its name.
        name: Option<String>,
        /// Its role (agents and operators have separate namespaces).
        #[arg(long, default_value = "operator", requires = "name")]
        role: Role,
        /// Its certificate fingerprint, or a unique prefix of at least 8 hex digits.
        #[arg(long, conflicts_with = "name")]
        fingerprint: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum TaskCommand {
    /// Show a task with its attempts and audit trail.
    Show { id: u64 },
    /// Cancel a task; a running agent is stopped.
    Cancel { id: u64 },
    /// Run a finished task again.
    Requeue { id: u64 },
    /// An attempt's output, from the sidecar that holds it.
    Logs {
        id: u64,
        /// The attempt (generation); default the latest.
        #[arg(long)]
        attempt: Option<u64>,
        /// Keep printing new output until the attempt ends.
        #[arg(long)]
        follow: bool,
        /// Which output.
        #[arg(long, value_enum, default_value = "stdout")]
        stream: StreamArg,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<u64>,
    },
}

/// `--stream`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum StreamArg {
    Stdout,
    Stderr,
}

#[derive(Subcommand)]
pub(crate) enum AgentCommand {
    /// Show one agent.
    Show { name: String },
    /// Stop giving the agent new work.
    Drain { name: String },
    /// Give a drained agent work again.
    Undrain { name: String },
    /// Revoke the agent's credential and cut its session.
    Revoke { name: String },
    /// Change what the agent is granted; its session keeps only what the new grant allows.
    Set {
        name: String,
        /// A capability it may claim (repeatable); replaces the granted list.
        #[arg(long = "capability", conflicts_with = "no_capabilities")]
        capabilities: Vec<String>,
        /// Grant no capabilities at all.
        #[arg(long)]
        no_capabilities: bool,
        /// The slots it may claim (1 to 256).
        #[arg(long)]
        slots: Option<u32>,
    },
}

#[derive(clap::Args)]
pub(crate) struct SubmitArgs {
    /// One-line title.
    #[arg(long, required_unless_present = "batch")]
    pub(crate) title: Option<String>,
    /// Submit many tasks from a file ("-" for stdin), one JSON object per line:
    /// {"title": …, "description", "capabilities", "priority", "max_attempts",
    /// "timeout", "timeout_action", "after", "key", "repo", "base",
    /// "env": {"K": "V"}, "labels": {"K": "V"}} (all but title optional).
    #[arg(long, conflicts_with_all = [
        "title", "description", "description_file", "capabilities", "priority",
        "max_attempts", "timeout", "timeout_action", "after", "key", "wait",
        "repo", "base", "env", "labels",
    ])]
    pub(crate) batch: Option<PathBuf>,
    /// Description text.
    #[arg(long, conflicts_with = "description_file")]
    pub(crate) description: Option<String>,
    /// Read the description from a file ("-" for stdin).
    #[arg(long)]
    pub(crate) description_file: Option<PathBuf>,
    /// A capability the agent must have (repeatable).
    #[arg(long = "capability")]
    pub(crate) capabilities: Vec<String>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub(crate) priority: i32,
    /// Attempts in all.
    #[arg(long)]
    pub(crate) max_attempts: Option<u32>,
    /// Task timeout, e.g. 30m.
    #[arg(long)]
    pub(crate) timeout: Option<String>,
    /// On timeout: fail or retry.
    #[arg(long, default_value = "fail")]
    pub(crate) timeout_action: String,
    /// Run only after this task completes (repeatable).
    #[arg(long = "after")]
    pub(crate) after: Vec<u64>,
    /// Idempotency key: a second submit with it returns the first task.
    #[arg(long)]
    pub(crate) key: Option<String>,
    /// Repository to work on: a git URL or an absolute path on the agent hosts.
    /// Only sidecars with `[workspace] mode = "git"` take the task.
    #[arg(long)]
    pub(crate) repo: Option<String>,
    /// Ref to branch from (default: the repository's default branch).
    #[arg(long, requires = "repo")]
    pub(crate) base: Option<String>,
    /// Environment for the agent, KEY=VALUE (repeatable; not for secrets: shown by `task show`).
    #[arg(long = "env")]
    pub(crate) env: Vec<String>,
    /// A label, KEY=VALUE (repeatable); `tasks --label` filters by it.
    #[arg(long = "label")]
    pub(crate) labels: Vec<String>,
    /// Follow the task to its end; exit 0 only if it completed.
    #[arg(long)]
    pub(crate) wait: bool,
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}
