//! The `muster-sidecar` command line: the daemon, enrollment, and the agent-facing
//! commands. Lives in the library so `muster-hub sidecar …` (used by the demo)
//! runs the very same code.
//!
//! One module per command group: [`serve`] (`run`, and the config and key it
//! loads), [`enroll`], [`doctor`], [`agent`] (the commands that talk to the
//! running sidecar's socket: `task …`, `status`, `whoami`), [`workspaces`]
//! (the attempt workspaces on this host). This file holds the arguments and
//! the dispatch.

mod agent;
mod doctor;
mod enroll;
mod logs;
mod serve;
mod workspaces;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    ///
    /// Example: printf '%s\n' "$TOKEN" | muster-sidecar enroll --token - --name build-01 --capability rust
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
    ///
    /// Example: muster-sidecar run --data-dir /var/lib/muster-sidecar
    Run {
        /// sidecar.toml to use (default: <data-dir>/sidecar.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The state directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Ask the running sidecar how it is doing.
    ///
    /// Example: muster-sidecar status --json
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Check config, key, hub reachability and disk space.
    ///
    /// Example: muster-sidecar doctor --data-dir /var/lib/muster-sidecar
    Doctor {
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Print JSON (one document) instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List the attempt workspaces on this host: task, generation, state, size, branch.
    ///
    /// Example: muster-sidecar workspaces
    Workspaces {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// sidecar.toml to use (default: <data-dir>/sidecar.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The state directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// An attempt's output on this host (stdout by default), from its files.
    ///
    /// Example: muster-sidecar logs 42 --follow
    Logs {
        /// The task.
        task: u64,
        /// The attempt (generation); default the latest on this host.
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
        /// sidecar.toml to use (default: <data-dir>/sidecar.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The state directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Agent commands about the current task.
    ///
    /// Example: muster-sidecar task progress "tests pass; writing the docs"
    Task {
        #[command(subcommand)]
        command: TaskCommand,
        /// Read the attempt (task, generation, token, socket) from this task.json
        /// instead of the MUSTER_* environment, e.g. inside a tmux session
        /// (`--task-file {task_file}` in sidecar.toml).
        #[arg(long, global = true)]
        task_file: Option<PathBuf>,
    },
    /// Which agent this is, and the task variables in the environment.
    ///
    /// Example: muster-sidecar whoami --json
    Whoami {
        /// Print JSON (one document) instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script.
    ///
    /// Example: muster-sidecar completions bash > /etc/bash_completion.d/muster-sidecar
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (muster-sidecar.1 and one per command) into a directory.
    ///
    /// Example: muster-sidecar man /usr/local/share/man/man1
    Man {
        /// The directory to write them into.
        dir: std::path::PathBuf,
    },
    /// Internal: the helper that parents exec runs and records their exit
    /// statuses; started by `run`, talks to it on stdin and stdout.
    #[command(hide = true)]
    Reaper,
}

/// `--stream`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum StreamArg {
    Stdout,
    Stderr,
}

#[derive(Subcommand)]
enum TaskCommand {
    /// Print the current task.
    ///
    /// Example: muster-sidecar task current
    Current,
    /// Say the agent has started (verify = agent-ack).
    ///
    /// Example: muster-sidecar task start
    Start,
    /// Report progress.
    ///
    /// Example: muster-sidecar task progress "halfway"
    Progress {
        /// What happened.
        message: String,
    },
    /// Report the task completed.
    ///
    /// Example: muster-sidecar task complete --result "fixed" --link https://example.com/pr/7
    Complete {
        /// The result to record.
        #[arg(long)]
        result: Option<String>,
        /// A link to the work, e.g. the pull request's URL; `task show` on the hub shows it.
        #[arg(long)]
        link: Option<String>,
    },
    /// Report the task failed.
    ///
    /// Example: muster-sidecar task fail --reason "cannot reproduce" --no-retry
    Fail {
        /// Why.
        #[arg(long)]
        reason: String,
        /// Do not retry this task.
        #[arg(long)]
        no_retry: bool,
    },
    /// Report the tokens and cost the attempt has used so far (cumulative:
    /// each report replaces the last).
    ///
    /// Example: muster-sidecar task usage --input-tokens 1200 --output-tokens 340 --cost-usd 0.04
    Usage {
        /// Input tokens not read from a cache.
        #[arg(long)]
        input_tokens: u64,
        /// Output tokens.
        #[arg(long)]
        output_tokens: u64,
        /// Input tokens read from the prompt cache.
        #[arg(long, default_value_t = 0)]
        cache_read_tokens: u64,
        /// Input tokens written to the prompt cache.
        #[arg(long, default_value_t = 0)]
        cache_write_tokens: u64,
        /// Cost in US dollars, e.g. 0.0421.
        #[arg(long)]
        cost_usd: Option<String>,
        /// The model.
        #[arg(long)]
        model: Option<String>,
    },
}

/// Why a command failed: the exit code and the sentence to print.
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
    // Generated from the command line's own definition: no runtime, no logger.
    match &cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "muster-sidecar",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => {
            use clap::CommandFactory;
            return match clap_mangen::generate_to(Cli::command(), dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!(
                        "muster-sidecar: writing man pages into {}: {e}",
                        dir.display()
                    );
                    ExitCode::from(1)
                }
            };
        }
        _ => {}
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let style = muster_protocol::logstyle::detect();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(style.ansi);
    match (cli.log_format, style.timestamps) {
        (LogFormat::Text, true) => logs.init(),
        (LogFormat::Text, false) => logs.without_time().init(),
        (LogFormat::Json, _) => logs.json().init(),
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
            enroll::enroll(&token, &data_dir, name, capabilities, slots).await
        }
        Command::Run { config, data_dir } => serve::serve(config, data_dir).await,
        Command::Status { json, data_dir } => agent::status(json, &data_dir).await,
        Command::Completions { .. } | Command::Man { .. } => Ok(()),
        Command::Reaper => Err(Failure {
            code: 2,
            message: "the reaper runs before the runtime starts".into(),
        }),
        Command::Doctor { data_dir, json } => doctor::doctor(&data_dir, json).await,
        Command::Workspaces {
            json,
            config,
            data_dir,
        } => workspaces::workspaces(json, config, data_dir).await,
        Command::Logs {
            task,
            attempt,
            follow,
            stream,
            tail,
            config,
            data_dir,
        } => {
            logs::logs(logs::LogArgs {
                task,
                attempt,
                follow,
                stream: match stream {
                    StreamArg::Stdout => muster_protocol::msg::LogStream::Stdout,
                    StreamArg::Stderr => muster_protocol::msg::LogStream::Stderr,
                },
                tail,
                config,
                data_dir,
            })
            .await
        }
        Command::Task { command, task_file } => agent::task(command, task_file.as_deref()).await,
        Command::Whoami { json } => agent::whoami(json).await,
    }
}
