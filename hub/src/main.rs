//! `muster-hub`: the hub daemon, its PKI, and the operator CLI.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use muster_hub::cli::{self, CliError, ConnectArgs, print};
use muster_hub::config::{CONFIG_FILE, HubConfig};
use muster_hub::init::init_data_dir;
use muster_hub::server::{Hub, hostname};
use muster_protocol::client::{self, JoinToken};
use muster_protocol::duration::parse_duration;
use muster_protocol::msg::{OpRequest, Role, SubmitRequest, TimeoutAction};
use muster_protocol::{AgentName, EventSeq, TaskId};

#[derive(Parser)]
#[command(
    name = "muster-hub",
    version,
    about = "The muster hub: schedules agent tasks across machines"
)]
struct Cli {
    /// Log format for daemons.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create a hub data directory: CA, server certificate, admin credential, hub.toml, database.
    Init {
        /// Where the hub keeps its state.
        #[arg(long, default_value = cli::DEFAULT_DATA_DIR)]
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
    Submit(SubmitArgs),
    /// List tasks, newest first.
    Tasks {
        /// Only this state.
        #[arg(long)]
        state: Option<String>,
        /// Only tasks of this agent.
        #[arg(long)]
        agent: Option<String>,
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
    },
    /// Check the hub's configuration, files and that it answers.
    Doctor {
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a single-use join token; prints it alone on stdout.
    Create {
        /// The role it grants.
        #[arg(long, default_value = "agent")]
        role: Role,
        /// How long it is valid.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Only this name may enroll with it; enrolling replaces the name's
        /// current identity (use it to replace a host), which is revoked at once.
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
}

#[derive(Subcommand)]
enum IdentityCommand {
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
enum TaskCommand {
    /// Show a task with its attempts and audit trail.
    Show { id: u64 },
    /// Cancel a task; a running agent is stopped.
    Cancel { id: u64 },
    /// Run a finished task again.
    Requeue { id: u64 },
}

#[derive(Subcommand)]
enum AgentCommand {
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
struct SubmitArgs {
    /// One-line title.
    #[arg(long, required_unless_present = "batch")]
    title: Option<String>,
    /// Submit many tasks from a file ("-" for stdin), one JSON object per line:
    /// {"title": …, "description", "capabilities", "priority", "max_attempts",
    /// "timeout", "timeout_action", "after", "key"} (all but title optional).
    #[arg(long, conflicts_with_all = [
        "title", "description", "description_file", "capabilities", "priority",
        "max_attempts", "timeout", "timeout_action", "after", "key", "wait",
    ])]
    batch: Option<PathBuf>,
    /// Description text.
    #[arg(long, conflicts_with = "description_file")]
    description: Option<String>,
    /// Read the description from a file ("-" for stdin).
    #[arg(long)]
    description_file: Option<PathBuf>,
    /// A capability the agent must have (repeatable).
    #[arg(long = "capability")]
    capabilities: Vec<String>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Attempts in all.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Task timeout, e.g. 30m.
    #[arg(long)]
    timeout: Option<String>,
    /// On timeout: fail or retry.
    #[arg(long, default_value = "fail")]
    timeout_action: String,
    /// Run only after this task completes (repeatable).
    #[arg(long = "after")]
    after: Vec<u64>,
    /// Idempotency key: a second submit with it returns the first task.
    #[arg(long)]
    key: Option<String>,
    /// Follow the task to its end; exit 0 only if it completed.
    #[arg(long)]
    wait: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own progress; the hub inside it only speaks up for problems.
    let quiet = matches!(cli.command, Command::Demo { .. });
    init_logging(cli.log_format, if quiet { "warn" } else { "info" });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("muster-hub: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("muster-hub: {}", cli::escape_controls(&e.message, true));
            ExitCode::from(e.code.clamp(1, 255) as u8)
        }
    }
}

fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn config_error(e: impl std::fmt::Display) -> CliError {
    CliError {
        code: 78,
        message: e.to_string(),
    }
}

async fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Init {
            data_dir,
            listen,
            sans,
            force,
        } => init(data_dir, listen, sans, force),
        Command::Serve { config, data_dir } => serve(config, data_dir).await,
        Command::Token {
            command:
                TokenCommand::Create {
                    role,
                    ttl,
                    name,
                    capabilities,
                    slots,
                },
            connect,
        } => {
            let name = name.map(AgentName::new).transpose().map_err(|e| CliError {
                code: 2,
                message: format!("--name: {e}"),
            })?;
            let ttl = parse_duration(&ttl).map_err(|e| CliError {
                code: 2,
                message: format!("--ttl: {e}"),
            })?;
            let s = connect.connect().await?;
            let v = s
                .call(OpRequest::TokenCreate {
                    role,
                    ttl_s: ttl.as_secs().max(1),
                    name,
                    capabilities: (!capabilities.is_empty()).then_some(capabilities),
                    slots,
                })
                .await?;
            s.close().await;
            eprintln!(
                "a single-use {role} token, valid for {}; enroll with it:",
                muster_protocol::duration::format_duration(ttl)
            );
            println!("{}", v["token"].as_str().unwrap_or_default());
            Ok(())
        }
        Command::Login {
            token,
            token_file,
            name,
            role,
            save_to,
        } => {
            let token = muster_protocol::join_token::read(token, token_file)
                .map_err(|message| CliError { code: 2, message })?;
            login(&token, name, role, save_to).await
        }
        Command::Submit(args) => submit(args).await,
        Command::Tasks {
            state,
            agent,
            limit,
            cursor,
            json,
            connect,
        } => {
            let v = one(
                &connect,
                OpRequest::Tasks {
                    state,
                    agent,
                    limit,
                    cursor,
                },
            )
            .await?;
            print(&v, json, cli::tasks_table);
            Ok(())
        }
        Command::Task {
            command,
            json,
            connect,
        } => {
            let req = match command {
                TaskCommand::Show { id } => OpRequest::TaskShow { id: TaskId(id) },
                TaskCommand::Cancel { id } => OpRequest::TaskCancel { id: TaskId(id) },
                TaskCommand::Requeue { id } => OpRequest::TaskRequeue { id: TaskId(id) },
            };
            let v = one(&connect, req).await?;
            print(&v, json, cli::task_detail);
            Ok(())
        }
        Command::Agents { json, connect } => {
            let v = one(&connect, OpRequest::Agents).await?;
            print(&v, json, cli::agents_table);
            Ok(())
        }
        Command::Agent {
            command,
            json,
            connect,
        } => {
            let (req, detail) = match command {
                AgentCommand::Show { name } => (OpRequest::AgentShow { name }, true),
                AgentCommand::Drain { name } => (OpRequest::AgentDrain { name }, false),
                AgentCommand::Undrain { name } => (OpRequest::AgentUndrain { name }, false),
                AgentCommand::Revoke { name } => (OpRequest::AgentRevoke { name }, false),
                AgentCommand::Set {
                    name,
                    capabilities,
                    no_capabilities,
                    slots,
                } => {
                    let capabilities =
                        (no_capabilities || !capabilities.is_empty()).then_some(capabilities);
                    (
                        OpRequest::AgentSet {
                            name,
                            capabilities,
                            slots,
                        },
                        false,
                    )
                }
            };
            let v = one(&connect, req).await?;
            print(&v, json, |v| {
                if detail {
                    cli::agent_detail(v)
                } else {
                    format!("{v}\n")
                }
            });
            Ok(())
        }
        Command::Identity {
            command:
                IdentityCommand::Revoke {
                    name,
                    role,
                    fingerprint,
                },
            json,
            connect,
        } => {
            use muster_protocol::msg::IdentityTarget;
            let target = match (fingerprint, name) {
                (Some(fp), _) => IdentityTarget::Fingerprint(fp),
                (None, Some(name)) => IdentityTarget::Named { role, name },
                (None, None) => {
                    return Err(CliError {
                        code: 2,
                        message: "give NAME or --fingerprint FP".into(),
                    });
                }
            };
            let v = one(&connect, OpRequest::IdentityRevoke(target)).await?;
            print(&v, json, |v| {
                format!(
                    "revoked {} {} ({})\n",
                    v["role"].as_str().unwrap_or("?"),
                    v["name"].as_str().unwrap_or("?"),
                    v["fingerprint"].as_str().unwrap_or("?")
                )
            });
            Ok(())
        }
        Command::Watch {
            from,
            json,
            connect,
        } => watch(&connect, from, json).await,
        Command::Alerts { json, connect } => {
            let v = one(&connect, OpRequest::Alerts).await?;
            print(&v, json, |v| {
                let list = v["alerts"].as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    "no open alerts\n".into()
                } else {
                    list.iter().map(|a| format!("{a}\n")).collect()
                }
            });
            Ok(())
        }
        Command::Stats { json, connect } => {
            let v = one(&connect, OpRequest::Stats).await?;
            print(&v, json, |v| {
                v.as_object()
                    .map(|o| o.iter().map(|(k, x)| format!("{k:<28} {x}\n")).collect())
                    .unwrap_or_default()
            });
            Ok(())
        }
        Command::Doctor { connect } => doctor(&connect).await,
        Command::Demo { tasks } => muster_hub::demo::run(tasks).await,
    }
}

async fn one(connect: &ConnectArgs, req: OpRequest) -> Result<serde_json::Value, CliError> {
    let s = connect.connect().await?;
    let v = s.call(req).await;
    s.close().await;
    v
}

fn init(
    data_dir: PathBuf,
    listen: Option<std::net::SocketAddr>,
    mut sans: Vec<String>,
    force: bool,
) -> Result<(), CliError> {
    let occupied = std::fs::read_dir(&data_dir).is_ok_and(|mut d| d.next().is_some());
    if occupied && !force {
        return Err(CliError::fail(format!(
            "{} already exists and is not empty; refusing to touch it (pass --force to overwrite its PKI, config and database)",
            data_dir.display()
        )));
    }
    if occupied {
        for f in [
            "hub.redb",
            "ca.crt",
            "ca.key",
            "server.crt",
            "server.key",
            "admin.crt",
            "admin.key",
            CONFIG_FILE,
        ] {
            let _ = std::fs::remove_file(data_dir.join(f));
        }
    }
    let mut config = HubConfig {
        data_dir: data_dir.clone(),
        ..HubConfig::default()
    };
    if let Some(l) = listen {
        config.listen = l;
    }
    for default in [
        hostname(),
        "localhost".into(),
        "127.0.0.1".into(),
        "::1".into(),
    ] {
        if !sans.contains(&default) {
            sans.push(default);
        }
    }
    let fp = init_data_dir(&data_dir, &config, &sans).map_err(CliError::fail)?;
    eprintln!(
        "initialised {} (listen {}, SANs {})",
        data_dir.display(),
        config.listen,
        sans.join(", ")
    );
    eprintln!("CA fingerprint (SHA-256), pinned by join tokens:");
    println!("{fp}");
    Ok(())
}

async fn serve(config: Option<PathBuf>, data_dir: Option<PathBuf>) -> Result<(), CliError> {
    let path = config.unwrap_or_else(|| {
        data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(cli::DEFAULT_DATA_DIR))
            .join(CONFIG_FILE)
    });
    let mut cfg = HubConfig::load(&path).map_err(config_error)?;
    if let Some(d) = data_dir {
        cfg.data_dir = d;
    }
    let data_dir = cfg.data_dir.clone();
    let hub = Hub {
        config: cfg,
        data_dir,
    };
    let running = hub
        .start()
        .await
        .map_err(|e| CliError::fail(e.to_string()))?;
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("serving"),
    ]);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::fail(format!("cannot watch SIGTERM: {e}")))?;
    let mut fatal = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = fatal.tick() => {
                if running.core_finished() {
                    break;
                }
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("shutting down");
    running
        .shutdown()
        .await
        .map_err(|e| CliError::fail(format!("fatal: {e}")))
}

async fn login(
    token: &str,
    name: Option<String>,
    role: Role,
    save_to: Option<PathBuf>,
) -> Result<(), CliError> {
    let token: JoinToken = token.parse()?;
    let name = name.unwrap_or_else(|| {
        let user = std::env::var("USER").unwrap_or_else(|_| "operator".into());
        format!("{user}.{}", hostname())
    });
    let name = AgentName::new(name).map_err(|e| CliError {
        code: 2,
        message: format!("--name: {e}"),
    })?;
    let path = save_to.or_else(cli::saved_credential_path).ok_or_else(|| {
        CliError::fail("no place to save the credential: set HOME or pass --save-to")
    })?;
    if path.exists() {
        return Err(CliError::fail(format!(
            "{} already exists; remove it to log in again",
            path.display()
        )));
    }
    let (key, csr) =
        muster_hub::pki::make_csr(name.as_str()).map_err(|e| CliError::fail(e.to_string()))?;
    let (cert, ca) = client::enroll(&token, &name, role, csr, (Vec::new(), 0)).await?;
    let file = cli::CredentialFile {
        hub: token.hub.clone(),
        ca,
        cert,
        key: key.serialize_pem(),
    };
    let text = toml::to_string(&file).map_err(|e| CliError::fail(e.to_string()))?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| CliError::fail(format!("{}: {e}", parent.display())))?;
    }
    muster_hub::pki::write_file(&path, text.as_bytes(), 0o600)
        .map_err(|e| CliError::fail(e.to_string()))?;
    eprintln!(
        "logged in to {} as {name} ({role}); credential saved to {}",
        token.hub,
        path.display()
    );
    Ok(())
}

async fn submit(a: SubmitArgs) -> Result<(), CliError> {
    let usage = |m: String| CliError {
        code: 2,
        message: m,
    };
    let Some(title) = a.title.clone() else {
        return submit_batch(a).await;
    };
    let description = match (&a.description, &a.description_file) {
        (Some(d), _) => d.clone(),
        (None, Some(p)) if p.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .map_err(|e| CliError::fail(format!("reading the description from stdin: {e}")))?;
            s
        }
        (None, Some(p)) => std::fs::read_to_string(p)
            .map_err(|e| CliError::fail(format!("--description-file {}: {e}", p.display())))?,
        (None, None) => String::new(),
    };
    let (timeout_ms, timeout_action) =
        timeout_fields(a.timeout.as_deref(), &a.timeout_action).map_err(usage)?;
    let req = SubmitRequest {
        title,
        description,
        capabilities: a.capabilities,
        priority: a.priority,
        max_attempts: a.max_attempts,
        timeout_ms,
        timeout_action,
        after: a.after.into_iter().map(TaskId).collect(),
        key: a.key,
    };
    let s = a.connect.connect().await?;
    let v = s.call(OpRequest::Submit(req)).await?;
    if !a.wait {
        s.close().await;
        print(&v, a.json, |v| format!("submitted task {}\n", v["id"]));
        return Ok(());
    }
    let id = TaskId(v["id"].as_u64().unwrap_or_default());
    if !a.json {
        eprintln!("submitted task {id}; waiting for it to end");
    }
    let started = Instant::now();
    let mut last_state = String::new();
    let v = loop {
        let v = s.call(OpRequest::TaskShow { id }).await?;
        let state = v["state"].as_str().unwrap_or_default().to_string();
        if state != last_state && !a.json {
            eprintln!(
                "{:>7.1}s  {state}  {}",
                started.elapsed().as_secs_f64(),
                v["agent"].as_str().unwrap_or("")
            );
            last_state = state.clone();
        }
        if matches!(state.as_str(), "completed" | "failed" | "cancelled") {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    s.close().await;
    print(&v, a.json, cli::task_detail);
    if v["state"] == "completed" {
        Ok(())
    } else {
        Err(CliError::fail(format!(
            "task {id} ended {}",
            v["state"].as_str().unwrap_or("?")
        )))
    }
}

/// `--timeout` and `--timeout-action` as the request carries them.
fn timeout_fields(
    timeout: Option<&str>,
    action: &str,
) -> Result<(Option<u64>, TimeoutAction), String> {
    let timeout_ms = match timeout {
        Some(t) => Some(
            parse_duration(t)
                .map_err(|e| format!("--timeout: {e}"))?
                .as_millis() as u64,
        ),
        None => None,
    };
    let action = match action {
        "fail" => TimeoutAction::Fail,
        "retry" => TimeoutAction::Retry,
        other => return Err(format!("--timeout-action {other:?}: use fail or retry")),
    };
    Ok((timeout_ms, action))
}

/// One line of a `submit --batch` file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    title: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    priority: i32,
    max_attempts: Option<u32>,
    timeout: Option<String>,
    timeout_action: Option<String>,
    #[serde(default)]
    after: Vec<u64>,
    key: Option<String>,
}

/// Bytes of task text per `SubmitBatch` request, at most, so each fits in a frame.
const BATCH_TEXT_BYTES_MAX: usize = 512 * 1024;

/// `submit --batch FILE`: every line is checked before anything is sent; then
/// the tasks go in requests of at most `SUBMIT_BATCH_MAX`, and each line's
/// answer is printed. Exit 1 if the hub refused any.
async fn submit_batch(a: SubmitArgs) -> Result<(), CliError> {
    use muster_protocol::limits::SUBMIT_BATCH_MAX;
    let path = a.batch.unwrap_or_default();
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| CliError::fail(format!("reading the batch from stdin: {e}")))?;
        s
    } else {
        std::fs::read_to_string(&path)
            .map_err(|e| CliError::fail(format!("--batch {}: {e}", path.display())))?
    };
    let mut tasks = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<BatchLine>(line)
            .map_err(|e| e.to_string())
            .and_then(|l| {
                let (timeout_ms, timeout_action) = timeout_fields(
                    l.timeout.as_deref(),
                    l.timeout_action.as_deref().unwrap_or("fail"),
                )?;
                Ok(SubmitRequest {
                    title: l.title,
                    description: l.description,
                    capabilities: l.capabilities,
                    priority: l.priority,
                    max_attempts: l.max_attempts,
                    timeout_ms,
                    timeout_action,
                    after: l.after.into_iter().map(TaskId).collect(),
                    key: l.key,
                })
            });
        match parsed {
            Ok(req) => tasks.push((i + 1, req)),
            Err(e) => errors.push(format!("line {}: {e}", i + 1)),
        }
    }
    if !errors.is_empty() {
        return Err(CliError {
            code: 2,
            message: format!(
                "--batch {}: nothing was submitted:\n  {}",
                path.display(),
                errors.join("\n  ")
            ),
        });
    }
    if tasks.is_empty() {
        return Err(CliError {
            code: 2,
            message: format!("--batch {}: no tasks in it", path.display()),
        });
    }
    let s = a.connect.connect().await?;
    let mut results = Vec::with_capacity(tasks.len());
    let mut rest = tasks.into_iter().peekable();
    while rest.peek().is_some() {
        let (mut lines, mut reqs, mut bytes) = (Vec::new(), Vec::new(), 0);
        while let Some((_, next)) = rest.peek() {
            let size = next.title.len() + next.description.len() + 256;
            if reqs.len() == SUBMIT_BATCH_MAX
                || (!reqs.is_empty() && bytes + size > BATCH_TEXT_BYTES_MAX)
            {
                break;
            }
            let Some((line, req)) = rest.next() else {
                break;
            };
            bytes += size;
            lines.push(line);
            reqs.push(req);
        }
        let v = s.call(OpRequest::SubmitBatch(reqs)).await?;
        let answers = v["results"].as_array().cloned().unwrap_or_default();
        if answers.len() != lines.len() {
            return Err(CliError::fail(format!(
                "the hub answered {} of {} tasks; `muster-hub tasks` shows what it took",
                answers.len(),
                lines.len()
            )));
        }
        for (line, mut r) in lines.into_iter().zip(answers) {
            r["line"] = line.into();
            results.push(r);
        }
    }
    s.close().await;
    let refused = results.iter().filter(|r| r.get("error").is_some()).count();
    let v = serde_json::json!({
        "results": results,
        "accepted": results.len() - refused,
        "refused": refused,
    });
    print(&v, a.json, |v| {
        let mut out = String::new();
        for r in v["results"].as_array().into_iter().flatten() {
            match r.get("error") {
                Some(e) => {
                    out += &format!(
                        "line {}: refused: {}\n",
                        r["line"],
                        e.as_str().unwrap_or("?")
                    )
                }
                None => {
                    out += &format!(
                        "line {}: task {} ({})\n",
                        r["line"],
                        r["id"],
                        r["state"].as_str().unwrap_or("?")
                    )
                }
            }
        }
        out + &format!("{} submitted, {} refused\n", v["accepted"], v["refused"])
    });
    if refused > 0 {
        return Err(CliError::fail(format!(
            "the hub refused {refused} of the tasks"
        )));
    }
    Ok(())
}

async fn watch(connect: &ConnectArgs, from: Option<u64>, json: bool) -> Result<(), CliError> {
    use bytes::Bytes;
    use futures::{SinkExt, StreamExt};
    use muster_protocol::msg::{OpResponse, Open, OpenBody};
    let s = connect.connect().await?;
    let (send, recv) = s.conn.open_bi().await.map_err(client::refused_or_lost)?;
    let codec = || muster_protocol::frame_codec(muster_protocol::limits::FRAME_BYTES_MAX);
    let mut wr = tokio_util::codec::FramedWrite::new(send, codec());
    let mut rd = tokio_util::codec::FramedRead::new(recv, codec());
    let open = Open {
        protocol: muster_protocol::PROTOCOL_VERSION,
        body: OpenBody::Request(OpRequest::Watch {
            from: from.map(EventSeq),
        }),
    };
    let bytes = muster_protocol::encode(&open).map_err(|e| CliError::fail(e.to_string()))?;
    wr.send(Bytes::from(bytes))
        .await
        .map_err(|e| CliError::fail(e.to_string()))?;
    while let Some(frame) = rd.next().await {
        let frame = frame.map_err(|e| CliError::fail(format!("watch stream: {e}")))?;
        match muster_protocol::decode::<OpResponse>(&frame) {
            Ok(OpResponse::Event { seq, json: doc }) => {
                if json {
                    let mut v: serde_json::Value = serde_json::from_str(&doc).unwrap_or_default();
                    v["seq"] = seq.0.into();
                    println!("{v}");
                } else {
                    println!("{seq:>8}  {}", cli::escape_controls(&doc, false));
                }
            }
            Ok(OpResponse::Error(e)) => return Err(CliError::fail(e.message)),
            Ok(OpResponse::Ok { .. }) => {}
            Err(e) => return Err(CliError::fail(format!("watch stream: {e}"))),
        }
    }
    Ok(())
}

async fn doctor(connect: &ConnectArgs) -> Result<(), CliError> {
    let mut failed = false;
    let mut check = |name: &str, r: Result<String, String>| match r {
        Ok(m) => println!("ok    {name}: {m}"),
        Err(m) => {
            failed = true;
            println!("fail  {name}: {m}");
        }
    };
    if let Some(dir) = &connect.data_dir {
        check(
            "config",
            HubConfig::load(&dir.join(CONFIG_FILE))
                .map(|_| "valid".into())
                .map_err(|e| e.to_string()),
        );
        for key in ["ca.key", "server.key", "admin.key"] {
            use std::os::unix::fs::MetadataExt;
            let p = dir.join(key);
            check(
                key,
                match std::fs::metadata(&p) {
                    Ok(m) if m.mode() & 0o077 == 0 => {
                        Ok(format!("{} mode {:o}", p.display(), m.mode() & 0o777))
                    }
                    Ok(m) => Err(format!(
                        "{} has mode {:o}; run chmod 600",
                        p.display(),
                        m.mode() & 0o777
                    )),
                    Err(e) => Err(format!("{}: {e}", p.display())),
                },
            );
        }
    }
    let started = Instant::now();
    let answer = match connect.connect().await {
        Ok(s) => {
            let r = s.call(OpRequest::Stats).await;
            s.close().await;
            r.map(|_| {
                format!(
                    "answered in {:.1} ms",
                    started.elapsed().as_secs_f64() * 1000.0
                )
            })
            .map_err(|e| e.message)
        }
        Err(e) => Err(e.message),
    };
    check("hub", answer);
    if failed {
        Err(CliError::fail("some checks failed"))
    } else {
        Ok(())
    }
}
