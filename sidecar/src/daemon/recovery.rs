//! After a restart: re-attach to the runs that outlived the sidecar, start
//! what was accepted and never spawned, and deal with orphans (runs spawned
//! just before a crash whose acceptance was never committed).

use std::time::Duration;

use muster_protocol::{Generation, TaskId};
use tracing::warn;

use super::Daemon;
use crate::core::Core;

impl Daemon {
    /// After a restart: re-attach to runs that outlived us, start what was accepted.
    pub(super) async fn recover(&mut self, core: &Core) {
        use muster_protocol::msg::Phase;
        for t in core.tasks() {
            if t.phase == Phase::Finished {
                continue;
            }
            let dir = self.run_dirs.path(t.task, t.generation);
            let from_file = t.handle.is_none();
            let handle = match &t.handle {
                Some(h) => Some(h.clone()),
                // Accepted, and the spawn not recorded: the run may have left its
                // handle before the crash (see "Launch before commit").
                None => {
                    let d = dir.clone();
                    tokio::task::spawn_blocking(move || crate::agent::recorded_handle(&d))
                        .await
                        .ok()
                        .flatten()
                }
            };
            match handle {
                Some(h) => {
                    // Its own directory, never a pooled one: that would hold another
                    // run's exit status.
                    let spec = self.run_spec(core, t.task, t.generation, t.spec.clone(), dir);
                    self.handles.insert((t.task, t.generation), h.clone());
                    if from_file {
                        self.record_handle(t.task, t.generation, &h);
                    }
                    self.runner.recover(spec, h, self.run_tx.clone());
                }
                // Never spawned: start it (at least once).
                None => {
                    let dir = self.run_dirs.take(t.task, t.generation);
                    let spec = self.run_spec(core, t.task, t.generation, t.spec.clone(), dir);
                    self.runner.start(spec, self.run_tx.clone());
                }
            }
        }
    }

    /// At startup: the run directories of tasks no longer held. One whose run was
    /// spawned (spawned, then the sidecar died before its commit) is kept as an
    /// orphan for the hub's resent assignment to claim; the others are removed.
    /// Returns the orphans' attempts, for the core.
    pub(super) async fn sweep_runs(&mut self, core: &Core) -> Vec<(TaskId, Generation)> {
        let keep: std::collections::HashSet<String> = core
            .tasks()
            .map(|t| format!("{}-{}", t.task, t.generation))
            .collect();
        let dir = self.cfg.data_dir.join("runs");
        let found = tokio::task::spawn_blocking(move || sweep(&dir, &keep))
            .await
            .unwrap_or_default();
        if !found.is_empty() {
            warn!(
                "{} run(s) were started just before a crash and never recorded; \
                 each is adopted if the hub assigns its attempt again, else ended",
                found.len()
            );
        }
        self.orphans = found;
        self.orphans.keys().copied().collect()
    }

    /// Ends the orphaned runs the core gave up on (unclaimed, or superseded by
    /// a newer generation) and removes their directories.
    pub(super) fn end_orphans(&mut self, which: &[(TaskId, Generation)]) {
        let mut ending = Vec::new();
        for k in which {
            if let Some(h) = self.orphans.remove(k) {
                ending.push((self.run_dirs.path(k.0, k.1), h));
            }
        }
        if ending.is_empty() {
            return;
        }
        warn!(
            "ending {} run(s) started before a crash whose attempts the hub did not assign again (or assigned anew)",
            ending.len()
        );
        let grace = self.cfg.agent.stop_grace;
        tokio::task::spawn_blocking(move || {
            let handles: Vec<_> = ending.iter().map(|(_, h)| h.clone()).collect();
            crate::agent::end_orphans(&handles, grace);
            for (dir, _) in ending {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    warn!("could not remove the run directory {}: {e}", dir.display());
                }
            }
        });
    }
}

/// Removes the run directories of attempts not in `keep` that never spawned a
/// run, and returns those that did (by attempt, parsed from `<task>-<generation>`).
pub(super) fn sweep(
    runs: &std::path::Path,
    keep: &std::collections::HashSet<String>,
) -> std::collections::HashMap<
    (muster_protocol::TaskId, muster_protocol::Generation),
    crate::agent::RunHandle,
> {
    let mut orphans = std::collections::HashMap::new();
    let Ok(entries) = std::fs::read_dir(runs) else {
        return orphans;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy().into_owned();
        if name.starts_with('.') || keep.contains(&name) {
            continue;
        }
        let dir = e.path();
        let attempt = name.split_once('-').and_then(|(t, g)| {
            Some((
                muster_protocol::TaskId(t.parse().ok()?),
                muster_protocol::Generation(g.parse().ok()?),
            ))
        });
        match (attempt, crate::agent::recorded_handle(&dir)) {
            (Some(a), Some(h)) => {
                orphans.insert(a, h);
            }
            (None, Some(h)) => {
                // Not an attempt's directory name: nothing can claim it.
                crate::agent::end_orphans(&[h], Duration::from_secs(10));
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    warn!("could not remove the run directory {}: {e}", dir.display());
                }
            }
            _ => {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    warn!("could not remove the run directory {}: {e}", dir.display());
                }
            }
        }
    }
    orphans
}
