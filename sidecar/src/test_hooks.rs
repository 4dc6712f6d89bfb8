//! Test-only hooks, which act only in builds with the `test-hooks` feature: the
//! black-box harness (`tests/src/lib.rs`) builds the binaries with it, a
//! release build never has it. The file names are public in every build, so
//! the tests that arm a hook name the same files.
//!
//! Two hooks, for the crash tests. While [`HOLD_HANDLE_FILE`] exists in the data
//! directory, a batch that accepts assignments commits the acceptance without
//! waiting for the spawns ("Launch before commit" in `daemon/mod.rs`), and the batch
//! that would commit a run's handle stops before its commit, writes
//! [`HOLD_REACHED_FILE`] and waits until the hold file is gone. A test that
//! kills the sidecar there leaves exactly the state the restart must handle by
//! re-attaching: an accepted task, a handle file in its run directory, and no
//! handle in the queue. While [`HOLD_ACCEPT_FILE`] exists, a batch that accepts
//! assignments stops after starting their runs and before anything else (the
//! commit of the acceptance included), writes [`HOLD_ACCEPT_REACHED_FILE`] and
//! waits until the hold file is gone: a sidecar killed there leaves runs that
//! its queue and the hub know nothing of.

#[cfg(feature = "test-hooks")]
use std::path::Path;
#[cfg(feature = "test-hooks")]
use std::time::Duration;

#[cfg(feature = "test-hooks")]
use tracing::warn;

#[cfg(feature = "test-hooks")]
use crate::core::Effect;

/// While this file exists in the data directory, run handles are not committed.
pub const HOLD_HANDLE_FILE: &str = "test-hook-hold-handle-commit";
/// Written (with the held attempts, one `task-generation` a line) once a handle's commit is held.
pub const HOLD_REACHED_FILE: &str = "test-hook-hold-handle-commit.reached";
/// While this file exists in the data directory, acceptances are not committed.
pub const HOLD_ACCEPT_FILE: &str = "test-hook-hold-accept-commit";
/// Written (with the held attempts, one `task-generation` a line) once an acceptance's commit is held.
pub const HOLD_ACCEPT_REACHED_FILE: &str = "test-hook-hold-accept-commit.reached";
/// How often a held commit looks whether the hold file is gone.
#[cfg(feature = "test-hooks")]
const HOLD_POLL: Duration = Duration::from_millis(10);

/// Whether the hold is on (one `stat`; only in builds with the feature).
#[cfg(feature = "test-hooks")]
pub(crate) fn holding(data_dir: &Path) -> bool {
    data_dir.join(HOLD_HANDLE_FILE).exists()
}

/// Holds a batch that started the runs of `started` (before it commits their
/// acceptance) for as long as [`HOLD_ACCEPT_FILE`] exists.
#[cfg(feature = "test-hooks")]
pub(crate) async fn hold_before_accept_commit(
    data_dir: &Path,
    started: impl Iterator<Item = (muster_protocol::TaskId, muster_protocol::Generation)>,
) {
    let hold = data_dir.join(HOLD_ACCEPT_FILE);
    if !hold.exists() {
        return;
    }
    let held: String = started.map(|(t, g)| format!("{t}-{g}\n")).collect();
    warn!(
        "test hook: holding the commit of the acceptance of {} until {HOLD_ACCEPT_FILE} is removed",
        held.trim()
    );
    if let Err(e) = std::fs::write(data_dir.join(HOLD_ACCEPT_REACHED_FILE), held) {
        warn!("test hook: cannot write {HOLD_ACCEPT_REACHED_FILE}: {e}");
    }
    while hold.exists() {
        tokio::time::sleep(HOLD_POLL).await;
    }
}

/// Holds a commit that would record a run handle for as long as the hold file exists.
#[cfg(feature = "test-hooks")]
pub(crate) async fn hold_before_handle_commit(data_dir: &Path, store: &[Effect]) {
    let held: Vec<String> = store
        .iter()
        .filter_map(|e| match e {
            Effect::PutTask(t) if t.handle.is_some() => {
                Some(format!("{}-{}", t.task, t.generation))
            }
            _ => None,
        })
        .collect();
    if held.is_empty() || !holding(data_dir) {
        return;
    }
    let held = held.join("\n") + "\n";
    warn!(
        "test hook: holding the commit of the run handle of {} until {HOLD_HANDLE_FILE} is removed",
        held.trim()
    );
    if let Err(e) = std::fs::write(data_dir.join(HOLD_REACHED_FILE), held) {
        warn!("test hook: cannot write {HOLD_REACHED_FILE}: {e}");
    }
    while holding(data_dir) {
        tokio::time::sleep(HOLD_POLL).await;
    }
}

/// While this file exists in the data directory, keeping an attempt's output
/// (`Logs::keep`, at the release of its run directory) stops before the step
/// the file names (`move:stdout`, `move:stderr`, `compact:stdout`,
/// `install:stdout`, …, `ended`; empty: before the first step), writes
/// [`HOLD_KEEP_REACHED_FILE`] (`<task>-<generation> <step>`) and waits until
/// the file is gone. A test that kills the sidecar there leaves a release the
/// restart must finish.
pub const HOLD_KEEP_FILE: &str = "test-hook-hold-keep";
/// Written once a step of keeping an attempt's output is held.
pub const HOLD_KEEP_REACHED_FILE: &str = "test-hook-hold-keep.reached";

/// Holds the step `label` of keeping `attempt`'s output while
/// [`HOLD_KEEP_FILE`] exists and names it (or is empty and `first`). Blocking:
/// keeping runs off the async workers.
#[cfg(feature = "test-hooks")]
pub(crate) fn hold_keep_step(
    data_dir: &Path,
    attempt: (muster_protocol::TaskId, muster_protocol::Generation),
    label: &str,
    first: bool,
) {
    let hold = data_dir.join(HOLD_KEEP_FILE);
    let Ok(want) = std::fs::read_to_string(&hold) else {
        return;
    };
    let want = want.trim();
    if !(want == label || (want.is_empty() && first)) {
        return;
    }
    let (task, generation) = attempt;
    warn!(
        "test hook: holding the step {label} of keeping {task}-{generation}'s output until {HOLD_KEEP_FILE} is removed"
    );
    if let Err(e) = std::fs::write(
        data_dir.join(HOLD_KEEP_REACHED_FILE),
        format!("{task}-{generation} {label}\n"),
    ) {
        warn!("test hook: cannot write {HOLD_KEEP_REACHED_FILE}: {e}");
    }
    while hold.exists() {
        std::thread::sleep(HOLD_POLL);
    }
}
