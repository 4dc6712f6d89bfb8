//! After a restart: re-attach to the runs that outlived the sidecar, start
//! what was accepted and never spawned, deal with orphans (runs spawned
//! just before a crash whose acceptance was never committed), and keep the
//! output of every run directory it removes.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use muster_protocol::{Generation, TaskId};
use tracing::warn;

use super::Daemon;
use crate::core::Core;
use crate::logs::Logs;
use crate::logs::keep::{AtStartup, RunDirSeen, parse_attempt, plan_run_dir};

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
    /// orphan for the hub's resent assignment to claim; the others have their
    /// output kept, then are removed (see [`crate::logs::keep::plan_run_dir`]);
    /// and moves to `logs/` a crash cut short are finished. Returns the
    /// orphans' attempts, for the core.
    pub(super) async fn sweep_runs(&mut self, core: &Core) -> Vec<(TaskId, Generation)> {
        let held: HashSet<String> = core
            .tasks()
            .map(|t| format!("{}-{}", t.task, t.generation))
            .collect();
        let dir = self.cfg.data_dir.join("runs");
        let logs = Arc::clone(&self.logs);
        let found = tokio::task::spawn_blocking(move || sweep(&dir, &logs, &held))
            .await
            .unwrap_or_default();
        if !found.is_empty() {
            warn!(
                "{} run(s) were started just before a crash and never recorded; \
                 each is adopted if the hub assigns its attempt again, else ended \
                 (its output kept)",
                found.len()
            );
        }
        self.orphans = found;
        self.orphans.keys().copied().collect()
    }

    /// Ends the orphaned runs the core gave up on (unclaimed, or superseded by
    /// a newer generation), keeps their output, and removes their directories.
    pub(super) fn end_orphans(&mut self, which: &[(TaskId, Generation)]) {
        let mut ending = Vec::new();
        for k in which {
            if let Some(h) = self.orphans.remove(k) {
                ending.push((*k, self.run_dirs.path(k.0, k.1), h));
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
        let logs = Arc::clone(&self.logs);
        tokio::task::spawn_blocking(move || {
            let handles: Vec<_> = ending.iter().map(|(_, _, h)| h.clone()).collect();
            // Ended first: the output is final before it is moved.
            crate::agent::end_orphans(&handles, grace);
            for ((task, generation), dir, _) in ending {
                keep_then_remove(&logs, &dir, task, generation);
            }
        });
    }
}

/// Plans each run directory not held by the queue ([`plan_run_dir`]) and does
/// what is planned, then finishes the moves to `logs/` a crash cut short.
/// Returns the orphans (by attempt, parsed from `<task>-<generation>`). Blocking.
pub(super) fn sweep(
    runs: &Path,
    logs: &Logs,
    held: &HashSet<String>,
) -> HashMap<(TaskId, Generation), crate::agent::RunHandle> {
    let mut orphans = HashMap::new();
    for e in std::fs::read_dir(runs).into_iter().flatten().flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy().into_owned();
        let dir = e.path();
        let attempt = parse_attempt(&name);
        let hidden = name.starts_with('.');
        let is_held = held.contains(&name);
        let handle = if hidden || is_held {
            None
        } else {
            crate::agent::recorded_handle(&dir)
        };
        let seen = RunDirSeen {
            attempt,
            held: is_held,
            hidden,
            handle: handle.is_some(),
            release_began: attempt.is_some_and(|(t, g)| logs.release_began(t, g)),
        };
        match (plan_run_dir(&seen), attempt, handle) {
            (AtStartup::Leave, ..) => {}
            (AtStartup::Orphan, Some(a), Some(h)) => {
                orphans.insert(a, h);
            }
            (AtStartup::KeepThenRemove, Some((task, generation)), _) => {
                keep_then_remove(logs, &dir, task, generation);
            }
            (AtStartup::EndThenRemove, _, Some(h)) => {
                // Not an attempt's directory name: nothing can claim it, nor read it.
                crate::agent::end_orphans(&[h], Duration::from_secs(10));
                remove(&dir);
            }
            (AtStartup::Remove, ..) => remove(&dir),
            (plan, ..) => warn!(
                "{}: {plan:?} without what it needs; left alone",
                dir.display()
            ),
        }
    }
    logs.finish_moves(held);
    orphans
}

/// Keeps an attempt's output, then removes its run directory; one whose
/// output could not be kept stays (the next start tries again).
fn keep_then_remove(logs: &Logs, dir: &Path, task: TaskId, generation: Generation) {
    match logs.keep(dir, task, generation) {
        Ok(()) => remove(dir),
        Err(e) => warn!(
            %task, %generation,
            "could not keep the output of {}: {e}; the directory stays",
            dir.display()
        ),
    }
}

fn remove(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!("could not remove the run directory {}: {e}", dir.display());
    }
}
