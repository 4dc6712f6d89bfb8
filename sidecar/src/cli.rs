//! The `muster-sidecar` command line: the daemon, enrollment, and the agent-facing
//! commands. Lives in the library so `muster-hub sidecar …` (used by the demo)
//! runs the very same code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use crate::agent::ProcessRunner;
use crate::config::{CONFIG_FILE, SidecarConfig};
use crate::core::AgentCmd;
use crate::local::{self, AgentRequest, Request};
use crate::{daemon, keystore};
use clap::{Parser, Subcommand};
use muster_protocol::AgentName;
use muster_protocol::client::{self, Credential, JoinToken};
use muster_protocol::msg::Role;

const DEFAULT_DATA_DIR: &str = "/var/lib/muster-sidecar";
/// The sidecar's certificate and the hub's CA, beside the key.
const CERT_FILE: &str = "sidecar.crt";
const CA_FILE: &str = "ca.crt";

#[derive(Parser)]
#[command(
    name = "muster-sidecar",
    version,
    about = "The muster sidecar: runs this machine's share of the work"
)]
struct Cli {
    /// Log format for the daemon.
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
    /// Enroll this machine with a join token: generates its key, gets a certificate, writes sidecar.toml.
    Enroll {
        /// A join token from `muster-hub token create`, or `-` to read it from
        /// stdin (first line). A literal token is visible to every user in `ps`
        /// while enroll runs: prefer `--token -` or `--token-file`.
        #[arg(long)]
        token: Option<String>,
        /// A file whose first line is the join token (keep it mode 0600).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Agent runs this sidecar may supervise at once (asked of the hub,
        /// which grants at most what the token allows), written to sidecar.toml.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(muster_protocol::limits::SLOTS_MAX)))]
        slots: u32,
        /// The state directory.
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// The agent's name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// A capability this agent has (repeatable).
        #[arg(long = "capability")]
        capabilities: Vec<String>,
    },
    /// Run the sidecar daemon.
    Run {
        /// sidecar.toml to use (default: <data-dir>/sidecar.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The state directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Ask the running sidecar how it is doing.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Check config, key, hub reachability and disk space.
    Doctor {
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Agent commands about the current task.
    Task {
        #[command(subcommand)]
        command: TaskCommand,
    },
    /// Which agent this is.
    Whoami,
    /// Internal: the helper that parents exec runs and records their exit
    /// statuses; started by `run`, talks to it on stdin and stdout.
    #[command(hide = true)]
    Reaper,
}

#[derive(Subcommand)]
enum TaskCommand {
    /// Print the current task.
    Current,
    /// Say the agent has started (verify = agent-ack).
    Start,
    /// Report progress.
    Progress {
        /// What happened.
        message: String,
    },
    /// Report the task completed.
    Complete {
        /// The result to record.
        #[arg(long)]
        result: Option<String>,
    },
    /// Report the task failed.
    Fail {
        /// Why.
        #[arg(long)]
        reason: String,
        /// Do not retry this task.
        #[arg(long)]
        no_retry: bool,
    },
}

struct Failure {
    code: u8,
    message: String,
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

/// Runs the command line with these arguments (the first is the program name).
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // No runtime and no logger: it only spawns, waits and writes small files.
    if matches!(cli.command, Command::Reaper) {
        return crate::agent::reaper_main();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("muster-sidecar: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("muster-sidecar: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Enroll {
            token,
            token_file,
            slots,
            data_dir,
            name,
            capabilities,
        } => {
            let token =
                muster_protocol::join_token::read(token, token_file).map_err(|m| Failure {
                    code: 2,
                    message: m,
                })?;
            enroll(&token, &data_dir, name, capabilities, slots).await
        }
        Command::Run { config, data_dir } => serve(config, data_dir).await,
        Command::Status { json, data_dir } => {
            let a = local::call(
                &socket(Some(&data_dir)),
                &Request::Query {
                    cmd: "status".into(),
                },
            )
            .await
            .map_err(fail)?;
            if json {
                println!("{}", a.data);
            } else {
                let d = &a.data;
                println!(
                    "{}  hub {}  {}  {}  free slots {}/{}  outbox {}",
                    d["name"].as_str().unwrap_or("?"),
                    d["hub"].as_str().unwrap_or("?"),
                    if d["connected"] == true {
                        "connected"
                    } else {
                        "disconnected"
                    },
                    d["state"].as_str().unwrap_or("?"),
                    d["free_slots"],
                    d["slots"],
                    d["outbox"]
                );
                for t in d["tasks"].as_array().into_iter().flatten() {
                    println!(
                        "  task {} gen {} {} {}",
                        t["id"], t["generation"], t["phase"], t["title"]
                    );
                }
            }
            Ok(())
        }
        Command::Reaper => Err(Failure {
            code: 2,
            message: "the reaper runs before the runtime starts".into(),
        }),
        Command::Doctor { data_dir } => doctor(&data_dir).await,
        Command::Task { command } => task(command).await,
        Command::Whoami => {
            let a = local::call(
                &socket(None),
                &Request::Query {
                    cmd: "whoami".into(),
                },
            )
            .await
            .map_err(fail)?;
            println!(
                "agent {}  hub {}",
                a.data["name"].as_str().unwrap_or("?"),
                a.data["hub"].as_str().unwrap_or("?")
            );
            for var in ["MUSTER_TASK_ID", "MUSTER_GENERATION", "MUSTER_TASK_FILE"] {
                if let Ok(v) = std::env::var(var) {
                    println!("{var}={v}");
                }
            }
            Ok(())
        }
    }
}

/// The local socket: `$MUSTER_SOCKET` (set for agents), else the state directory's.
fn socket(data_dir: Option<&Path>) -> PathBuf {
    match (std::env::var_os("MUSTER_SOCKET"), data_dir) {
        (_, Some(d)) => d.join(local::SOCKET_FILE),
        (Some(s), None) => PathBuf::from(s),
        (None, None) => Path::new(DEFAULT_DATA_DIR).join(local::SOCKET_FILE),
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

async fn task(command: TaskCommand) -> Result<(), Failure> {
    let cmd = match command {
        TaskCommand::Current => AgentCmd::Current,
        TaskCommand::Start => AgentCmd::Start,
        TaskCommand::Progress { message } => AgentCmd::Progress { message },
        TaskCommand::Complete { result } => AgentCmd::Complete { result },
        TaskCommand::Fail { reason, no_retry } => AgentCmd::Fail { reason, no_retry },
    };
    let current = matches!(cmd, AgentCmd::Current);
    // The attempt and its secret come from the environment the sidecar gave
    // the agent, never from the command line, where `ps` would show the token.
    let req = AgentRequest {
        task: env_u64("MUSTER_TASK_ID"),
        generation: env_u64("MUSTER_GENERATION"),
        token: std::env::var("MUSTER_TASK_TOKEN").ok(),
        cmd,
    };
    let a = local::call(&socket(None), &Request::Agent(req))
        .await
        .map_err(fail)?;
    if !a.ok {
        return Err(fail(a.message));
    }
    if current {
        println!("{}", a.data);
    } else {
        println!("{}", a.message);
    }
    Ok(())
}

async fn enroll(
    token: &str,
    data_dir: &Path,
    name: Option<String>,
    capabilities: Vec<String>,
    slots: u32,
) -> Result<(), Failure> {
    let usage = |m: String| Failure {
        code: 2,
        message: m,
    };
    let token: JoinToken = token
        .parse()
        .map_err(|e: client::ClientError| usage(e.to_string()))?;
    if data_dir.join(CERT_FILE).exists() {
        return Err(fail(format!(
            "{} is already enrolled ({} exists); remove the state directory to enroll again",
            data_dir.display(),
            data_dir.join(CERT_FILE).display()
        )));
    }
    let name = name.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    });
    let name = AgentName::new(name).map_err(|e| usage(format!("--name: {e}")))?;
    let mut config = SidecarConfig::new(name.clone(), token.hub.clone(), data_dir.to_path_buf());
    config.capabilities = capabilities;
    config.slots = slots;
    // Check everything that can fail here before the token is spent: the hub
    // uses it up on the first try, so a failure after that needs a new token.
    // First the whole config file, so a bad capability loses no token.
    let rendered = config.render();
    SidecarConfig::parse(&rendered, &data_dir.join(CONFIG_FILE))
        .map_err(|e| usage(e.to_string()))?;
    // Then the state directory and the key's place: created if missing,
    // writable, nothing there yet (a probe file is written and removed).
    let dir = data_dir.to_path_buf();
    let key_path = tokio::task::spawn_blocking(move || keystore::probe_store(&dir))
        .await
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| {
            fail(format!(
                "cannot store the key, so the token was not used: {e}"
            ))
        })?;
    tracing::debug!(key = %key_path.display(), "the key's place is writable");
    let key = rcgen::KeyPair::generate().map_err(|e| fail(e.to_string()))?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| fail(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name.as_str());
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| fail(e.to_string()))?;
    let grant = (config.capabilities.clone(), config.slots);
    let (cert, ca) = client::enroll(&token, &name, Role::Agent, csr, grant)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let key_pem = key.serialize_pem();
    let dir = data_dir.to_path_buf();
    let source = tokio::task::spawn_blocking(move || keystore::store_key(&dir, &key_pem))
        .await
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| fail(e.to_string()))?;
    write(&data_dir.join(CA_FILE), &ca, 0o644)?;
    write(&data_dir.join(CONFIG_FILE), &rendered, 0o644)?;
    // The certificate last: its presence means "enrolled".
    write(&data_dir.join(CERT_FILE), &cert, 0o644)?;
    eprintln!("enrolled as {name} with hub {}; key in {source}", token.hub);
    eprintln!(
        "edit {} to set the agent command, then run `muster-sidecar run --data-dir {}`",
        data_dir.join(CONFIG_FILE).display(),
        data_dir.display()
    );
    Ok(())
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), Failure> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let err = |e: std::io::Error| fail(format!("{}: {e}", path.display()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn load_config(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
) -> Result<SidecarConfig, Failure> {
    let path = config.unwrap_or_else(|| {
        data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
            .join(CONFIG_FILE)
    });
    let mut cfg = SidecarConfig::load(&path).map_err(|e| Failure {
        code: 78,
        message: e.to_string(),
    })?;
    if let Some(d) = data_dir {
        cfg.data_dir = d;
    }
    Ok(cfg)
}

fn load_credential(data_dir: &Path) -> Result<(Credential, keystore::KeySource), Failure> {
    let (key_pem, source) = keystore::load_key(data_dir).map_err(|e| Failure {
        code: 78,
        message: e.to_string(),
    })?;
    let read = |f: &str| {
        std::fs::read_to_string(data_dir.join(f)).map_err(|e| Failure {
            code: 78,
            message: format!(
                "{}: {e} (enroll first: `muster-sidecar enroll --token …`)",
                data_dir.join(f).display()
            ),
        })
    };
    Ok((
        Credential {
            ca_pem: read(CA_FILE)?,
            cert_pem: read(CERT_FILE)?,
            key_pem,
        },
        source,
    ))
}

async fn serve(config: Option<PathBuf>, data_dir: Option<PathBuf>) -> Result<(), Failure> {
    let cfg = load_config(config, data_dir)?;
    // File reads block: off the async workers.
    let dir = cfg.data_dir.clone();
    let (credential, source) = tokio::task::spawn_blocking(move || load_credential(&dir))
        .await
        .map_err(|e| fail(format!("loading the key: {e}")))??;
    tracing::info!("private key from {source}");
    let runner = Arc::new(match crate::agent::own_executable() {
        Ok(exe) => ProcessRunner::with_reaper(cfg.agent.clone(), cfg.data_dir.clone(), exe),
        Err(e) => {
            tracing::warn!(
                "cannot find this binary to start the reaper ({e}); exec runs use the /bin/sh wrapper"
            );
            ProcessRunner::new(cfg.agent.clone(), cfg.data_dir.clone())
        }
    });
    let opts = daemon::Options {
        config: cfg,
        credential,
        runner,
        local_socket: true,
    };
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let ready = || {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    };
    daemon::run(opts, ready, shutdown)
        .await
        .map_err(|e| fail(format!("fatal: {e}")))
}

async fn doctor(data_dir: &Path) -> Result<(), Failure> {
    let mut failed = false;
    let mut check = |name: &str, r: Result<String, String>| match r {
        Ok(m) => println!("ok    {name}: {m}"),
        Err(m) => {
            failed = true;
            println!("fail  {name}: {m}");
        }
    };
    let cfg = SidecarConfig::load(&data_dir.join(CONFIG_FILE));
    check(
        "config",
        cfg.as_ref()
            .map(|_| "valid".to_string())
            .map_err(|e| e.to_string()),
    );
    let cred = load_credential(data_dir);
    check(
        "key",
        cred.as_ref()
            .map(|(_, s)| format!("store in use: {s} (readable, safe permissions)"))
            .map_err(|f| f.message.clone()),
    );
    if let Ok(cfg) = &cfg {
        check(
            "agent command",
            crate::agent::check_command(&cfg.agent)
                .map(|_| format!("{:?} is executable", cfg.agent.command[0])),
        );
        let free = crate::host::disk_free(data_dir);
        let floor = cfg.disk_floor_mb << 20;
        check(
            "disk",
            match free {
                Some(f) if f >= floor => Ok(format!(
                    "{} MiB free (floor {} MiB)",
                    f >> 20,
                    cfg.disk_floor_mb
                )),
                Some(f) => Err(format!(
                    "{} MiB free, below the floor of {} MiB",
                    f >> 20,
                    cfg.disk_floor_mb
                )),
                None => Err("cannot tell the free space of the state directory".into()),
            },
        );
        if let Ok((cred, _)) = &cred {
            let started = Instant::now();
            let hub = match client::connect(&cfg.hub, cred).await {
                Ok((endpoint, conn)) => {
                    // A hello-less round trip: an operator request the hub refuses for role agent.
                    let r = client::request(&conn, muster_protocol::msg::OpRequest::Stats).await;
                    let ms = started.elapsed().as_secs_f64() * 1000.0;
                    conn.close(0u32.into(), b"doctor");
                    endpoint.wait_idle().await;
                    match r {
                        Ok(_) => Ok(format!(
                            "{} answered: handshake and round trip in {ms:.1} ms",
                            cfg.hub
                        )),
                        Err(e) => Err(format!("{}: {e}", cfg.hub)),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            check("hub", hub);
        }
    }
    if failed {
        Err(fail("some checks failed"))
    } else {
        Ok(())
    }
}
