//! The operator CLI of `muster-hub`, one module per command group: [`args`]
//! (the command line), [`connect`] (finding the hub and a credential),
//! [`dispatch`] (running one command), and `daemon` (`init`, `serve`),
//! `login`, `submit`, `watch`, `doctor`, `storecmd` (`migrate`, `store copy`).

mod args;
mod connect;
mod daemon;
mod dispatch;
mod doctor;
mod login;
mod storecmd;
mod submit;
mod watch;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command, LogFormat};
pub use connect::*;
use dispatch::run;

/// The `muster-hub` command line: parses, runs one command, maps the result to
/// an exit code (1 failure, 2 usage, 78 configuration error).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Generated from the command line's own definition: no runtime, no logger.
    match &cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "muster-hub",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => {
            use clap::CommandFactory;
            return match clap_mangen::generate_to(Cli::command(), dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("muster-hub: writing man pages into {}: {e}", dir.display());
                    ExitCode::from(1)
                }
            };
        }
        _ => {}
    }
    // The demo prints its own progress; the hub inside it only speaks up for problems.
    let quiet = matches!(cli.command, Command::Demo { .. });
    let format = match &cli.command {
        Command::Serve { log_format, .. } => *log_format,
        _ => LogFormat::Text,
    };
    init_logging(format, if quiet { "warn" } else { "info" });
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
            eprintln!("muster-hub: {}", escape_controls(&e.message, true));
            ExitCode::from(e.code.clamp(1, 255) as u8)
        }
    }
}

fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let style = muster_protocol::logstyle::detect();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(style.ansi);
    match (format, style.timestamps) {
        (LogFormat::Text, true) => builder.init(),
        (LogFormat::Text, false) => builder.without_time().init(),
        (LogFormat::Json, _) => builder.json().init(),
    }
}
