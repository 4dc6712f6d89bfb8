//! The alert worker: runs `alert_command` once per alert, bounded in time.

use std::time::Duration;

use tokio::sync::mpsc;
use tracing::warn;

/// Alerts waiting for `alert_command`; past this they are dropped (they stay in the event log).
pub(super) const ALERT_QUEUE_LEN: usize = 256;
/// How long one run of `alert_command` may take before it is killed.
pub(super) const ALERT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `alert_command` once per alert with the alert as JSON on stdin, one at a time,
/// each bounded in time; failures are logged and never reach the core.
pub(super) async fn alert_worker(argv: Vec<String>, mut rx: mpsc::Receiver<String>) {
    use tokio::io::AsyncWriteExt;
    while let Some(alert) = rx.recv().await {
        let Some((program, args)) = argv.split_first() else {
            return;
        };
        let spawned = tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                warn!(command = ?argv, "alert_command cannot start: {e}");
                continue;
            }
        };
        let mut line = alert.into_bytes();
        line.push(b'\n');
        let stdin = child.stdin.take();
        // The write is inside the time limit too: a command that never reads its
        // stdin must not hold the worker (and every later alert) forever.
        let run = async move {
            if let Some(mut stdin) = stdin {
                let _ = stdin.write_all(&line).await;
            }
            child.wait_with_output().await
        };
        match tokio::time::timeout(ALERT_COMMAND_TIMEOUT, run).await {
            Ok(Ok(out)) if out.status.success() => {}
            Ok(Ok(out)) => warn!(
                command = ?argv,
                "alert_command failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Ok(Err(e)) => warn!(command = ?argv, "alert_command: {e}"),
            Err(_) => {
                warn!(command = ?argv, "alert_command did not finish within {} s; killed", ALERT_COMMAND_TIMEOUT.as_secs())
            }
        }
    }
}
