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
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// One line per event, for people and journald.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Create a hub data directory: CA, server certificate, admin credential, hub.toml, database.
    ///
    /// Example: muster-hub init --data-dir /var/lib/muster-hub --san hub.example.net
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
        /// host:port join tokens carry, as other machines reach the hub
        /// (default: the first --san that is not a loopback name, at the listen port).
        #[arg(long)]
        advertise: Option<String>,
        /// Overwrite an existing data directory.
        #[arg(long)]
        force: bool,
        /// Keep the state in this PostgreSQL database instead of the redb file:
        /// postgres://user@host:port/dbname, without a password. Writes [store]
        /// into hub.toml and creates the schema.
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        /// Join the cluster whose state is in this PostgreSQL database, as a
        /// further hub: the data directory holds ca.crt, ca.key, admin.crt and
        /// admin.key copied from the first hub; this issues the hub's own server
        /// certificate and writes hub.toml.
        #[arg(long, value_name = "URL", conflicts_with = "store")]
        join: Option<String>,
        /// A file holding the PostgreSQL password (mode 0600, owned by the hub's
        /// user); without it, the systemd credential pg-password, else none.
        #[arg(long, value_name = "PATH")]
        pg_password_file: Option<PathBuf>,
    },
    /// Run the hub daemon.
    ///
    /// Example: muster-hub serve --data-dir /var/lib/muster-hub
    Serve {
        /// hub.toml to use (default: <data-dir>/hub.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Log line format: text for people and journald, json for log shippers.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Join tokens.
    ///
    /// Example: muster-hub token create --role agent --ttl 1h
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Enroll this machine as an operator and save the credential.
    ///
    /// Example: printf '%s\n' "$TOKEN" | muster-hub login --token -
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
        /// The role to enroll with; by default the one the token grants.
        #[arg(long, value_parser = role_parser())]
        role: Option<Role>,
        /// Where to save the credential (default: ~/.config/muster/operator.toml).
        #[arg(long = "save-to")]
        save_to: Option<PathBuf>,
        /// Print JSON (one document: hub, name, role, credential) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Submit a task.
    ///
    /// Example: muster-hub submit --title "fix the build" --capability rust --wait
    Submit(Box<SubmitArgs>),
    /// List tasks, newest first.
    ///
    /// Example: muster-hub tasks --state queued --label team=infra
    Tasks {
        /// Only this state.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(crate::core::TaskState::ALL.map(|s| s.as_str())))]
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
        /// Print JSON (one document) instead of text, for scripts.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// One task: show, cancel or requeue.
    ///
    /// Example: muster-hub task show 42
    Task {
        #[command(subcommand)]
        command: TaskCommand,
        /// Print JSON (one document) instead of text, for scripts.
        #[arg(long, global = true)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// List agents with their state.
    ///
    /// Example: muster-hub agents --json
    Agents {
        /// Print JSON (one document) instead of text, for scripts.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Revoke one identity, agent or operator (the last admin cannot be revoked).
    ///
    /// Example: muster-hub identity revoke alice --role operator
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
        /// Print JSON (one document) instead of text, for scripts.
        #[arg(long, global = true)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// One agent: show, drain, undrain, revoke, or change its grant.
    ///
    /// Example: muster-hub agent drain build-01
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
        /// Print JSON (one document) instead of text, for scripts.
        #[arg(long, global = true)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Stream task and agent events as they happen.
    ///
    /// Example: muster-hub watch --from 1 --json
    Watch {
        /// Resume from this sequence number.
        #[arg(long)]
        from: Option<u64>,
        /// Print JSON (one document) instead of text, for scripts.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Open alerts.
    ///
    /// Example: muster-hub alerts
    Alerts {
        /// Print JSON (one document) instead of text, for scripts.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Coordination figures: messages and bytes per task, commits.
    ///
    /// Example: muster-hub stats --json
    Stats {
        /// Print JSON (one document) instead of text, for scripts.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// A local fleet on loopback running sample tasks end to end (no set-up needed).
    ///
    /// Example: muster-hub demo --keep
    Demo {
        /// How many sample tasks to run.
        #[arg(long, default_value_t = 20)]
        tasks: usize,
        /// Keep the fleet running after the sample tasks, with the web dashboard on
        /// a loopback port; prints a login URL and runs until Ctrl-C or SIGTERM.
        #[arg(long)]
        keep: bool,
    },
    /// List identities: operators, submitters, admins and agents.
    ///
    /// Example: muster-hub identities --role operator
    Identities {
        /// Only this role.
        #[arg(long, value_parser = role_parser())]
        role: Option<Role>,
        /// Also revoked identities.
        #[arg(long)]
        all: bool,
        /// Print JSON (one document) instead of text, for scripts.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Print a one-time login URL for the web dashboard, bound to this identity.
    ///
    /// Example: muster-hub dashboard --role operator
    Dashboard {
        /// The browser session's role: at most your own (default: your own).
        #[arg(long, value_parser = role_parser())]
        role: Option<Role>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Print a shell completion script.
    ///
    /// Example: muster-hub completions bash > /etc/bash_completion.d/muster-hub
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (muster-hub.1 and one per command) into a directory.
    ///
    /// Example: muster-hub man /usr/local/share/man/man1
    Man {
        /// The directory to write them into.
        dir: PathBuf,
    },
    /// Check whether the store's schema is this build's (--check), or create
    /// and migrate it now (what `serve` does at start).
    ///
    /// Example: muster-hub migrate --check --data-dir /var/lib/muster-hub
    Migrate {
        /// Only check: exit 0 when the schema is current, 1 with a sentence when
        /// a migration is pending or the schema is newer than this build.
        #[arg(long)]
        check: bool,
        /// hub.toml to use (default: <data-dir>/hub.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The data directory.
        #[arg(long, default_value = crate::cli::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Move a hub's state between stores.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Check the hub's configuration, files and that it answers.
    ///
    /// Example: muster-hub doctor --data-dir /var/lib/muster-hub
    Doctor {
        /// Print JSON (one document) instead of text, for scripts.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// A cluster of hubs on PostgreSQL.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand)]
pub(crate) enum ClusterCommand {
    /// The hubs of the cluster, which leads, its term and the age of its lease,
    /// read from the database named in this hub's hub.toml.
    ///
    /// Example: muster-hub cluster status --data-dir /var/lib/muster-hub
    Status {
        /// The data directory whose hub.toml names the database.
        #[arg(long, default_value = crate::cli::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Print JSON (one document) instead of a table, for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum StoreCommand {
    /// Copy every table of the data directory's redb file into the PostgreSQL
    /// database hub.toml's [store] url names, in one transaction; the target
    /// must hold no hub state. Stop the hub first.
    ///
    /// Example: muster-hub store copy --from redb --to postgres --data-dir /var/lib/muster-hub
    Copy {
        /// The source store.
        #[arg(long, value_enum)]
        from: CopyFrom,
        /// The target store.
        #[arg(long, value_enum)]
        to: CopyTo,
        /// hub.toml to use (default: <data-dir>/hub.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The data directory holding hub.redb.
        #[arg(long, default_value = crate::cli::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
}

/// Where `store copy` reads.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum CopyFrom {
    /// The redb file in the data directory.
    Redb,
}

/// Where `store copy` writes.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum CopyTo {
    /// The PostgreSQL database of hub.toml's [store] url.
    Postgres,
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
        /// The role it grants (join: agent, operator, submitter or admin; api: operator, submitter or admin).
        #[arg(long, value_parser = role_parser())]
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
    /// List unused join tokens and live API tokens (never their secrets). Admins only.
    ///
    /// Example: muster-hub token list --kind api
    List {
        /// Only this kind (default: both).
        #[arg(long, value_enum)]
        kind: Option<TokenKind>,
        /// Print JSON (one document) instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an API token by name (requests and event streams using it stop at
    /// once), or with --kind join an unused join token by its id.
    ///
    /// Example: muster-hub token revoke ci-bot; muster-hub token revoke --kind join 3fa9c2e1b0d4
    Revoke {
        /// Which kind of token.
        #[arg(long, value_enum, default_value = "api")]
        kind: TokenKind,
        /// The API token's name, or the join token's id as `token list` shows it.
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
    ///
    /// Example: muster-hub identity revoke alice --role operator
    #[command(group(clap::ArgGroup::new("which").required(true).args(["name", "fingerprint"])))]
    Revoke {
        /// Its name.
        name: Option<String>,
        /// Its role (agents and operators have separate namespaces).
        #[arg(long, default_value = "operator", requires = "name", value_parser = role_parser())]
        role: Role,
        /// Its certificate fingerprint, or a unique prefix of at least 8 hex digits.
        #[arg(long, conflicts_with = "name")]
        fingerprint: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum TaskCommand {
    /// Show a task with its attempts and audit trail.
    ///
    /// Example: muster-hub task show 42 --json
    Show { id: u64 },
    /// Wait until a task ends, printing its state changes and progress notes as
    /// they come; exit 0 completed, 1 failed, 3 cancelled, 69 hub unreachable.
    ///
    /// Example: muster-hub task wait 42
    Wait { id: u64 },
    /// Cancel a task; a running agent is stopped.
    ///
    /// Example: muster-hub task cancel 42
    Cancel { id: u64 },
    /// Run a finished task again.
    ///
    /// Example: muster-hub task requeue 42
    Requeue { id: u64 },
    /// An attempt's output, from the sidecar that holds it.
    ///
    /// Example: muster-hub task logs 42 --follow
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
    ///
    /// Example: muster-hub agent show build-01
    Show { name: String },
    /// Stop giving the agent new work.
    ///
    /// Example: muster-hub agent drain build-01
    Drain { name: String },
    /// Give a drained agent work again.
    ///
    /// Example: muster-hub agent undrain build-01
    Undrain { name: String },
    /// Revoke the agent's credential and cut its session.
    ///
    /// Example: muster-hub agent revoke build-01
    Revoke { name: String },
    /// Change what the agent is granted; its session keeps only what the new grant allows.
    ///
    /// Example: muster-hub agent set build-01 --capability rust --slots 2
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
    /// On timeout: fail the task, or retry it if attempts remain.
    #[arg(long, default_value = "fail", value_parser = clap::builder::PossibleValuesParser::new(["fail", "retry"]))]
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
    /// Print JSON (one document) instead of text, for scripts.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

/// `--role`: its values listed in `--help`, parsed into a [`Role`].
fn role_parser() -> impl clap::builder::TypedValueParser<Value = Role> {
    use clap::builder::TypedValueParser;
    // Only the listed words get this far, and each parses.
    clap::builder::PossibleValuesParser::new(["agent", "operator", "submitter", "admin"])
        .map(|s| s.parse::<Role>().unwrap_or(Role::Operator))
}
