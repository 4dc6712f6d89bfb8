//! Sidecars for the bench: enrollment with join tokens and CSRs, the instant
//! runner, and full sidecar daemons (the library, real redb files) run as
//! tasks of this process, on the bench's runtime or on a runtime of their own
//! ([`Fleet::on_own_runtime`], threads named [`FLEET_THREAD`]) so that their
//! CPU time can be told apart from the client's.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use muster_protocol::client::{self, Credential, JoinToken};
use muster_protocol::msg::{OpRequest, Outcome, Role};
use muster_protocol::{AgentName, Generation, TaskId};
use muster_sidecar::agent::{
    ExecStatus, Mode, ProcessRunner, RunEvent, RunHandle, RunSpec, Runner,
};
use muster_sidecar::config::SidecarConfig;
use muster_sidecar::daemon::{self, Options};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::hub::Ops;

/// Which runner the sidecars use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Agent {
    /// In-process: `Started` and `Finished{completed}` at once.
    Instant,
    /// The real process runner spawning `/bin/true` (exec mode, settle 0) under the
    /// status-recording `sh` wrapper (the default `exec_status = "recorded"`).
    Exec,
    /// As `exec`, with `exec_status = "waited"`: `/bin/true` spawned directly.
    ExecWaited,
}

impl Agent {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Agent::Instant => "instant",
            Agent::Exec => "exec",
            Agent::ExecWaited => "exec-waited",
        }
    }
}

/// A runner that completes every attempt at once, in process.
pub(crate) struct InstantRunner;

impl InstantRunner {
    fn complete(task: TaskId, generation: Generation, events: mpsc::Sender<RunEvent>) {
        // `start` is called from the daemon loop, which also drains `events`: never block it.
        tokio::spawn(async move {
            let _ = events
                .send(RunEvent::Started {
                    task,
                    generation,
                    pid: None,
                    session: None,
                })
                .await;
            let _ = events
                .send(RunEvent::Finished {
                    task,
                    generation,
                    outcome: Outcome::Completed,
                    result: None,
                    error: None,
                    work: None,
                })
                .await;
        });
    }
}

impl Runner for InstantRunner {
    fn start(&self, run: RunSpec, events: mpsc::Sender<RunEvent>) {
        Self::complete(run.task, run.generation, events);
    }
    fn recover(&self, run: RunSpec, _handle: RunHandle, events: mpsc::Sender<RunEvent>) {
        Self::complete(run.task, run.generation, events);
    }
    fn stop(&self, _task: TaskId, _generation: Generation) {}
    fn forget(&self, _task: TaskId, _generation: Generation) {}
}

/// An enrolled agent identity.
#[derive(Clone)]
pub(crate) struct Identity {
    pub(crate) name: AgentName,
    pub(crate) cred: Credential,
}

/// Creates a join token and enrolls `name` with a fresh key pair, as `muster-sidecar enroll` does.
pub(crate) async fn enroll(ops: &Ops, name: &str) -> Result<Identity> {
    let v = ops
        .call(OpRequest::TokenCreate {
            role: Role::Agent,
            ttl_s: 3600,
            name: None,
            capabilities: None,
            slots: None,
        })
        .await
        .context("token create")?;
    let token: JoinToken = v["token"]
        .as_str()
        .ok_or_else(|| anyhow!("token create answered without a token: {v}"))?
        .parse()?;
    enroll_with(&token, name).await
}

/// Enrolls `name` with a fresh key pair and `token` (a cluster's token names
/// every hub: the enrollment follows them to the leader).
pub(crate) async fn enroll_with(token: &JoinToken, name: &str) -> Result<Identity> {
    let name = AgentName::new(name)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name.as_str());
    let csr = params.serialize_request(&key)?.pem()?;
    // The bench's sidecars set their slots after enrollment: ask for the most.
    let grant = (Vec::new(), muster_protocol::limits::SLOTS_MAX);
    let (cert, ca) = client::enroll(token, &name, Role::Agent, csr, grant)
        .await
        .with_context(|| format!("enrolling {name}"))?;
    Ok(Identity {
        name,
        cred: Credential {
            ca_pem: ca,
            cert_pem: cert,
            key_pem: key.serialize_pem(),
        },
    })
}

/// Enrolls `n` identities named `<prefix>-<i>`, `concurrency` at a time, in order.
pub(crate) async fn enroll_many(
    ops: &Arc<Ops>,
    prefix: &str,
    n: usize,
    concurrency: usize,
) -> Result<Vec<Identity>> {
    use futures::StreamExt;
    let results: Vec<Result<Identity>> = futures::stream::iter(0..n)
        .map(|i| {
            let ops = ops.clone();
            let name = format!("{prefix}-{i:05}");
            async move { enroll(&ops, &name).await }
        })
        .buffered(concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

/// The name of every thread of a fleet's own runtime (workers and blocking
/// threads alike), as `/proc/self/task/*/comm` shows it.
pub(crate) const FLEET_THREAD: &str = "muster-fleet";

/// Worker threads of a fleet's own runtime.
const FLEET_WORKERS: usize = 2;

/// Sidecar daemons running in this process.
pub(crate) struct Fleet {
    stop: CancellationToken,
    daemons: Vec<JoinHandle<Result<(), daemon::DaemonError>>>,
    /// The fleet's own runtime, if it has one; `None`: the caller's.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Fleet {
    /// Daemons on the caller's runtime.
    pub(crate) fn new() -> Self {
        Fleet {
            stop: CancellationToken::new(),
            daemons: Vec::new(),
            runtime: None,
        }
    }

    /// Daemons on a multi-thread runtime of their own: [`FLEET_WORKERS`]
    /// workers, every thread (blocking ones too) named [`FLEET_THREAD`], idle
    /// blocking threads kept for an hour (a thread that exits takes its CPU
    /// time out of the per-thread sums).
    pub(crate) fn on_own_runtime() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(FLEET_WORKERS)
            .thread_name(FLEET_THREAD)
            .thread_keep_alive(Duration::from_secs(3600))
            .enable_all()
            .build()
            .context("starting the fleet's runtime")?;
        Ok(Fleet {
            stop: CancellationToken::new(),
            daemons: Vec::new(),
            runtime: Some(runtime),
        })
    }

    /// The runtime the daemons run on.
    fn handle(&self) -> tokio::runtime::Handle {
        self.runtime
            .as_ref()
            .map_or_else(tokio::runtime::Handle::current, |r| r.handle().clone())
    }

    /// Starts one sidecar daemon for `id` with its state in `dir`.
    pub(crate) fn spawn(
        &mut self,
        id: &Identity,
        hub: &str,
        dir: PathBuf,
        slots: u32,
        agent: Agent,
    ) -> Result<()> {
        self.spawn_with(id, hub, dir, slots, agent, |_| {})
    }

    /// [`Fleet::spawn`] with `tweak` applied to the sidecar's configuration.
    pub(crate) fn spawn_with(
        &mut self,
        id: &Identity,
        hub: &str,
        dir: PathBuf,
        slots: u32,
        agent: Agent,
        tweak: impl FnOnce(&mut SidecarConfig),
    ) -> Result<()> {
        let handle = self.handle();
        // Whatever the runner or the workspaces start, they start on the fleet's runtime.
        let _enter = handle.enter();
        let mut config = sidecar_config(id, hub, dir, slots);
        tweak(&mut config);
        if agent == Agent::ExecWaited {
            config.agent.exec_status = ExecStatus::Waited;
        }
        let runner: Arc<dyn Runner> = match agent {
            Agent::Instant => Arc::new(InstantRunner),
            // This binary is its own reaper, as `muster-sidecar` is.
            Agent::Exec | Agent::ExecWaited => Arc::new(ProcessRunner::with_reaper(
                config.agent.clone(),
                config.data_dir.clone(),
                muster_sidecar::agent::own_executable()?,
            )),
        };
        let workspaces = Arc::new(muster_sidecar::workspace::Workspaces::from_config(&config));
        let opts = Options {
            config,
            credential: id.cred.clone(),
            runner,
            local_socket: false,
            workspaces,
        };
        let stop = self.stop.clone();
        self.daemons.push(
            handle.spawn(async move { daemon::run(opts, || {}, stop.cancelled_owned()).await }),
        );
        Ok(())
    }

    /// Stops every daemon (they drain) and waits for them.
    pub(crate) async fn shutdown(mut self) -> Result<()> {
        self.stop.cancel();
        let mut failed = Vec::new();
        for d in std::mem::take(&mut self.daemons) {
            match tokio::time::timeout(Duration::from_secs(10), d).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => failed.push(e.to_string()),
                Ok(Err(e)) => failed.push(e.to_string()),
                Err(_) => failed.push("did not stop within 10 s".into()),
            }
        }
        if !failed.is_empty() {
            bail!("sidecars failed: {}", failed.join("; "));
        }
        Ok(())
    }

    /// A daemon that already ended (a fatal error), if any.
    pub(crate) fn any_finished(&self) -> bool {
        self.daemons.iter().any(JoinHandle::is_finished)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
        // Dropped inside the bench's runtime: a blocking shutdown would panic.
        if let Some(r) = self.runtime.take() {
            r.shutdown_background();
        }
    }
}

/// The sidecar configuration the bench uses: `/bin/true` in exec mode with no
/// settle time (the instant runner ignores the command but the self-test checks it),
/// no disk floor (temporary directories).
pub(crate) fn sidecar_config(id: &Identity, hub: &str, dir: PathBuf, slots: u32) -> SidecarConfig {
    let mut config = SidecarConfig::new(id.name.clone(), hub.to_string(), dir);
    config.slots = slots;
    config.disk_floor_mb = 0;
    config.agent.mode = Mode::Exec;
    config.agent.command = vec!["/bin/true".into()];
    config.agent.settle = Duration::ZERO;
    config
}

/// Enrolls `k` sidecars and starts them in `root/<name>`; returns their identities.
pub(crate) async fn start_fleet(
    ops: &Arc<Ops>,
    fleet: &mut Fleet,
    hub: &str,
    root: &Path,
    k: usize,
    slots: u32,
    agent: Agent,
) -> Result<Vec<Identity>> {
    let ids = enroll_many(ops, "bench", k, 16).await?;
    for id in &ids {
        fleet.spawn(id, hub, root.join(id.name.as_str()), slots, agent)?;
    }
    Ok(ids)
}

/// Waits until `k` agents are online and available.
pub(crate) async fn wait_available(
    ops: &Ops,
    fleet: &Fleet,
    k: usize,
    deadline: Duration,
) -> Result<()> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let n = ops.online(true).await?;
        if n >= k {
            return Ok(());
        }
        if fleet.any_finished() {
            bail!("a sidecar daemon stopped while starting ({n}/{k} available)");
        }
        if tokio::time::Instant::now() > until {
            bail!(
                "only {n} of {k} sidecars online and available after {} s",
                deadline.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
