//! Performs the core's effects that are not store writes (sends, runs,
//! stops, forgotten tasks), after the batch's commit; and "launch before
//! commit" (see the module docs of [`super`]), which starts runs before it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use muster_protocol::msg::SessionMsg;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::Daemon;
use crate::agent::{RunEvent, RunSpec};
use crate::core::{Core, Effect};

/// Run handles remembered for reusing run directories, at most.
const HANDLES_MAX: usize = 4096;
/// How long a batch waits for the runs it started to spawn before committing.
pub(super) const LAUNCH_WAIT: Duration = Duration::from_millis(20);

impl Daemon {
    /// Notes what the core just asked for, before the commit: the wake clock
    /// counts from the decision to start a run to the decision that it started.
    pub(super) fn note_effects(&mut self, effects: &[Effect]) {
        let now = Instant::now();
        for e in effects {
            if let Some(latency) = self.wake.observe(e, now) {
                self.stats.wake_latency.observe(latency.as_secs_f64());
            }
        }
    }

    pub(super) fn observe_run(&mut self, e: &RunEvent) {
        match e {
            RunEvent::Preparing { .. } | RunEvent::Prepared { .. } | RunEvent::Started { .. } => {}
            RunEvent::Finished {
                task,
                generation,
                outcome,
                ..
            } => {
                if *outcome == muster_protocol::msg::Outcome::AgentExited {
                    self.stats.probe_failures.inc();
                }
                self.stats
                    .runs_ended
                    .get_or_create(&vec![("outcome", outcome.as_str().to_string())])
                    .inc();
                if let Some(at) = self.run_spawned.remove(&(*task, *generation)) {
                    self.stats.run_duration.observe(at.elapsed().as_secs_f64());
                }
            }
            RunEvent::Spawned {
                task,
                generation,
                handle,
            } => {
                debug!(target: "muster::latency", task = task.0, point = "sc_spawned", at_us = muster_protocol::wall_us());
                // Stale entries (a run spawned after its task was dropped) only cost a
                // reuse; the bound keeps them from piling up.
                if self.handles.len() >= HANDLES_MAX {
                    self.handles.clear();
                }
                if self.run_spawned.len() >= HANDLES_MAX {
                    self.run_spawned.clear();
                }
                self.run_spawned
                    .insert((*task, *generation), Instant::now());
                self.handles.insert((*task, *generation), handle.clone());
            }
        }
    }

    pub(super) fn run_spec(
        &self,
        core: &Core,
        task: muster_protocol::TaskId,
        generation: muster_protocol::Generation,
        spec: muster_protocol::msg::TaskSpec,
        run_dir: PathBuf,
    ) -> RunSpec {
        RunSpec {
            task,
            generation,
            agent: self.cfg.name.clone(),
            spec,
            run_dir,
            socket: self.socket_path.clone(),
            token: self.token_key.token(task, generation),
            probe_interval: core.heartbeat_interval(),
        }
    }

    /// Launch before commit (see the module docs): starts the runs `effects`
    /// ask for, then handles what those runs report within [`LAUNCH_WAIT`] (the
    /// spawn, often the start too), so it joins the assignment's commit.
    pub(super) async fn launch(
        &mut self,
        core: &mut Core,
        run_rx: &mut mpsc::Receiver<RunEvent>,
        effects: &mut Vec<Effect>,
    ) {
        let (starts, rest): (Vec<Effect>, Vec<Effect>) = std::mem::take(effects)
            .into_iter()
            .partition(|e| matches!(e, Effect::StartRun(..) | Effect::AdoptRun(..)));
        *effects = rest;
        let mut waiting = std::collections::HashSet::new();
        for e in starts {
            if let Effect::StartRun(task, generation, _) | Effect::AdoptRun(task, generation, _) =
                &e
            {
                waiting.insert((*task, *generation));
            }
            self.perform(core, e);
        }
        #[cfg(feature = "test-hooks")]
        crate::test_hooks::hold_before_accept_commit(&self.cfg.data_dir, waiting.iter().copied())
            .await;
        #[cfg(feature = "test-hooks")]
        if crate::test_hooks::holding(&self.cfg.data_dir) {
            // The acceptance commits without its spawn (see `test_hooks`).
            return;
        }
        let deadline = tokio::time::Instant::now() + LAUNCH_WAIT;
        while !waiting.is_empty() {
            let Ok(Some(e)) = tokio::time::timeout_at(deadline, run_rx.recv()).await else {
                break;
            };
            if !matches!(e, RunEvent::Started { .. }) {
                waiting.remove(&e.attempt());
            }
            self.observe_run(&e);
            core.handle_run(self.now(), e);
        }
        // What is already there comes along, e.g. a start right after its spawn.
        while let Ok(e) = run_rx.try_recv() {
            self.observe_run(&e);
            core.handle_run(self.now(), e);
        }
        let more = core.take_effects();
        self.note_effects(&more);
        effects.extend(more);
    }

    /// Performs one effect that is not a store write (those are committed
    /// before any of these is performed).
    pub(super) fn perform(&mut self, core: &Core, e: Effect) {
        match e {
            Effect::Send(m) => {
                if let SessionMsg::Report(r) = &m {
                    debug!(target: "muster::latency", task = r.task.0, point = "sc_report_out", kind = ?r.body.kind(), at_us = muster_protocol::wall_us());
                }
                self.send(m)
            }
            Effect::StartRun(task, generation, spec) => {
                self.stats.runs_started.inc();
                let dir = self.run_dirs.take(task, generation);
                let spec = self.run_spec(core, task, generation, spec, dir);
                self.runner.start(spec, self.run_tx.clone());
            }
            Effect::AdoptRun(task, generation, spec) => {
                self.stats.runs_started.inc();
                let Some(handle) = self.orphans.remove(&(task, generation)) else {
                    warn!(%task, %generation, "no orphaned run to adopt; starting it");
                    return self.perform(core, Effect::StartRun(task, generation, spec));
                };
                // The same attempt, spawned before a crash: never run it twice.
                info!(%task, %generation, "adopting the run started before the crash");
                let dir = self.run_dirs.path(task, generation);
                let spec = self.run_spec(core, task, generation, spec, dir);
                self.handles.insert((task, generation), handle.clone());
                self.record_handle(task, generation, &handle);
                self.runner.recover(spec, handle, self.run_tx.clone());
            }
            Effect::EndOrphans(which) => self.end_orphans(&which),
            Effect::StopRun(task, generation) => self.runner.stop(task, generation),
            Effect::ForgetRun(task, generation) => self.runner.forget(task, generation),
            Effect::TimeOutStart(task, generation, outcome) => {
                self.runner.time_out(task, generation, outcome)
            }
            Effect::Heartbeat => self.heartbeat(core),
            Effect::ReleaseRunDir(task, generation) => {
                // Nothing of ours reads the directory once the task is forgotten; a run
                // still stopping keeps its open files. Without this, every attempt would
                // leave its files behind until the next restart's sweep.
                let dir = self.run_dirs.path(task, generation);
                let handle = self.handles.remove(&(task, generation));
                self.releases.push(((task, generation), dir, handle));
            }
            Effect::PutTask(_)
            | Effect::DeleteTask(..)
            | Effect::PutReport(_)
            | Effect::DeleteReport(_)
            | Effect::NextReport(_) => {}
        }
    }

    /// Records at the core the handle of a run re-attached through its handle
    /// file, so the store holds it: the file alone would be the run's only trace,
    /// and a restart that found neither would start the attempt again.
    pub(super) fn record_handle(
        &self,
        task: muster_protocol::TaskId,
        generation: muster_protocol::Generation,
        handle: &crate::agent::RunHandle,
    ) {
        let ev = RunEvent::Spawned {
            task,
            generation,
            handle: handle.clone(),
        };
        if self.run_tx.try_send(ev).is_err() {
            warn!(%task, %generation, "could not record a re-attached run's handle now; its handle file still holds it");
        }
    }

    /// Removes the run directories the core released in this batch (their
    /// tasks' forgetting is durable), off the async workers: each one's
    /// output is kept first, and a directory whose output could not be kept
    /// stays (a restart tries again; see `crate::logs::keep`).
    pub(super) fn release_run_dirs(&mut self) {
        if self.releases.is_empty() {
            return;
        }
        let releases = std::mem::take(&mut self.releases);
        let run_dirs = Arc::clone(&self.run_dirs);
        let logs = Arc::clone(&self.logs);
        tokio::task::spawn_blocking(move || {
            for ((task, generation), dir, handle) in releases {
                match logs.keep(&dir, task, generation) {
                    Ok(()) => run_dirs.release(&dir, handle.as_ref()),
                    Err(e) => warn!(
                        %task, %generation,
                        "could not keep the output of {}: {e}; the directory stays (a restart tries again)",
                        dir.display()
                    ),
                }
            }
        });
    }
}
