//! `run`: load the config and the credential, build the runner, and run the
//! daemon until SIGTERM or Ctrl-C.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use muster_protocol::client::Credential;

use super::{CA_FILE, CERT_FILE, DEFAULT_DATA_DIR, Failure, fail};
use crate::agent::ProcessRunner;
use crate::config::{CONFIG_FILE, SidecarConfig};
use crate::{daemon, keystore};

/// The configuration at `config` (default `<data_dir>/sidecar.toml`), with
/// `data_dir` overriding the file's when given.
pub(super) fn load_config(
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

/// The credential in `data_dir`, and where its key came from.
pub(super) fn load_credential(
    data_dir: &Path,
) -> Result<(Credential, keystore::KeySource), Failure> {
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

/// Runs the daemon until SIGTERM or Ctrl-C.
pub(super) async fn serve(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
) -> Result<(), Failure> {
    let cfg = load_config(config, data_dir)?;
    // File reads block: off the async workers.
    let dir = cfg.data_dir.clone();
    let (credential, source) = tokio::task::spawn_blocking(move || load_credential(&dir))
        .await
        .map_err(|e| fail(format!("loading the key: {e}")))??;
    tracing::info!("private key from {source}");
    let workspaces = Arc::new(crate::workspace::Workspaces::from_config(&cfg));
    let runner = match crate::agent::own_executable() {
        Ok(exe) => ProcessRunner::with_reaper(cfg.agent.clone(), cfg.data_dir.clone(), exe),
        Err(e) => {
            tracing::warn!(
                "cannot find this binary to start the reaper ({e}); exec runs use the /bin/sh wrapper"
            );
            ProcessRunner::new(cfg.agent.clone(), cfg.data_dir.clone())
        }
    };
    let runner = Arc::new(runner.with_workspaces(Arc::clone(&workspaces)));
    let opts = daemon::Options {
        config: cfg,
        credential,
        runner,
        local_socket: true,
        workspaces,
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
