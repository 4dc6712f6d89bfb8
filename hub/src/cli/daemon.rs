//! `init` and `serve`: a new data directory, and the hub daemon itself.

use std::path::PathBuf;
use std::time::Duration;

use crate::cli::CliError;
use crate::cli::dispatch::config_error;
use crate::config::{CONFIG_FILE, HubConfig};
use crate::init::init_data_dir;
use crate::server::{Hub, hostname};

pub(crate) fn init(
    data_dir: PathBuf,
    listen: Option<std::net::SocketAddr>,
    mut sans: Vec<String>,
    force: bool,
) -> Result<(), CliError> {
    let occupied = std::fs::read_dir(&data_dir).is_ok_and(|mut d| d.next().is_some());
    if occupied && !force {
        return Err(CliError::fail(format!(
            "{} already exists and is not empty; refusing to touch it (pass --force to overwrite its PKI, config and database)",
            data_dir.display()
        )));
    }
    if occupied {
        for f in [
            "hub.redb",
            "ca.crt",
            "ca.key",
            "server.crt",
            "server.key",
            "admin.crt",
            "admin.key",
            CONFIG_FILE,
        ] {
            let _ = std::fs::remove_file(data_dir.join(f));
        }
    }
    let mut config = HubConfig {
        data_dir: data_dir.clone(),
        ..HubConfig::default()
    };
    if let Some(l) = listen {
        config.listen = l;
    }
    for default in [
        hostname(),
        "localhost".into(),
        "127.0.0.1".into(),
        "::1".into(),
    ] {
        if !sans.contains(&default) {
            sans.push(default);
        }
    }
    let fp = init_data_dir(&data_dir, &config, &sans).map_err(CliError::fail)?;
    eprintln!(
        "initialised {} (listen {}, SANs {})",
        data_dir.display(),
        config.listen,
        sans.join(", ")
    );
    eprintln!("CA fingerprint (SHA-256), pinned by join tokens:");
    println!("{fp}");
    Ok(())
}

pub(crate) async fn serve(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
) -> Result<(), CliError> {
    let path = config.unwrap_or_else(|| {
        data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::cli::DEFAULT_DATA_DIR))
            .join(CONFIG_FILE)
    });
    let mut cfg = HubConfig::load(&path).map_err(config_error)?;
    if let Some(d) = data_dir {
        cfg.data_dir = d;
    }
    let data_dir = cfg.data_dir.clone();
    let hub = Hub {
        config: cfg,
        data_dir,
    };
    let running = hub
        .start()
        .await
        .map_err(|e| CliError::fail(e.to_string()))?;
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("serving"),
    ]);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::fail(format!("cannot watch SIGTERM: {e}")))?;
    let mut fatal = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = fatal.tick() => {
                if running.core_finished() {
                    break;
                }
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("shutting down");
    running
        .shutdown()
        .await
        .map_err(|e| CliError::fail(format!("fatal: {e}")))
}
