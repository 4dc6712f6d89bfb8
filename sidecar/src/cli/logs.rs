//! `logs`: an attempt's output on this host, read from its files (the run
//! directory while it runs, the log directory after); the daemon need not run.
//! With `--follow` it ends when the attempt's output is kept (the hub
//! acknowledged its end), or when nothing is running it any more.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use muster_protocol::msg::LogStream;
use muster_protocol::{Generation, TaskId};

use super::serve::load_config;
use super::{Failure, fail};
use crate::logs::Logs;

/// What `muster-sidecar logs` asks for.
pub(super) struct LogArgs {
    pub(super) task: u64,
    pub(super) attempt: Option<u64>,
    pub(super) follow: bool,
    pub(super) stream: LogStream,
    pub(super) tail: Option<u64>,
    pub(super) config: Option<PathBuf>,
    pub(super) data_dir: Option<PathBuf>,
}

/// Prints an attempt's output: raw bytes, control characters escaped on a terminal.
pub(super) async fn logs(a: LogArgs) -> Result<(), Failure> {
    let cfg = load_config(a.config, a.data_dir)?;
    let logs = Logs::new(&cfg.data_dir, cfg.logs.clone());
    let task = TaskId(a.task);
    let agent = cfg.name.to_string();
    let Some(generation) = a.attempt.map(Generation).or_else(|| logs.latest(task)) else {
        return Err(fail(format!(
            "this host ({agent}) has no output of task {task}"
        )));
    };
    let mut reader = logs
        .open(task, generation, a.stream, a.tail, a.follow)
        .await
        .map_err(|e| fail(e.describe(task, generation, &agent)))?;
    let mut out = std::io::stdout().lock();
    let terminal = out.is_terminal();
    let written = |e: std::io::Error| fail(format!("writing the log: {e}"));
    while let Some(data) = reader
        .next()
        .await
        .map_err(|e| fail(e.describe(task, generation, &agent)))?
    {
        if terminal {
            let text = String::from_utf8_lossy(&data);
            let safe: String = text
                .chars()
                .map(|c| {
                    if c.is_control() && !matches!(c, '\n' | '\t') {
                        '\u{fffd}'
                    } else {
                        c
                    }
                })
                .collect();
            out.write_all(safe.as_bytes()).map_err(written)?;
        } else {
            out.write_all(&data).map_err(written)?;
        }
        out.flush().map_err(written)?;
    }
    let end = reader.end();
    if end.cut_bytes > 0 {
        eprintln!(
            "muster: {} bytes in the middle of this log were cut ([logs] max_bytes_per_attempt)",
            end.cut_bytes
        );
    }
    Ok(())
}
