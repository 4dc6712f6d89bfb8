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
    advertise: Option<String>,
    force: bool,
    postgres: Option<(String, Option<PathBuf>)>,
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
    config.advertise = match advertise {
        Some(a) => check_host_port(&a).map_err(|m| CliError {
            code: 2,
            message: format!("--advertise {a:?}: {m}"),
        })?,
        None => default_advertise(&sans, config.listen.port()).unwrap_or_default(),
    };
    if let Some((url, password_file)) = postgres {
        config.store.kind = crate::store::StoreKind::Postgres;
        config.store.url = url;
        config.store.password_file = password_file;
        // The same checks hub.toml gets: a URL, and no password in it.
        HubConfig::parse(&config.render(), &data_dir.join(CONFIG_FILE)).map_err(|e| CliError {
            code: 2,
            message: format!("--store: {e}"),
        })?;
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
    // Blocking: a PostgreSQL store runs its own runtime.
    let fp = tokio::task::block_in_place(|| init_data_dir(&data_dir, &config, &sans))
        .map_err(CliError::fail)?;
    eprintln!(
        "initialised {} (listen {}, SANs {})",
        data_dir.display(),
        config.listen,
        sans.join(", ")
    );
    if config.store.kind == crate::store::StoreKind::Postgres {
        eprintln!(
            "state in PostgreSQL at {} (schema muster)",
            config.store.url
        );
    }
    if !config.advertise.is_empty() {
        eprintln!("join tokens will carry {}", config.advertise);
    }
    if let Some(w) = config.advertise_warning(&hostname()) {
        eprintln!("warning: {w}");
    }
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

/// `host:port` as hub.toml's `advertise` accepts it (the same check `serve` makes).
fn check_host_port(a: &str) -> Result<String, String> {
    let line = format!("advertise = {}", toml_string(a));
    HubConfig::parse(&line, std::path::Path::new("--advertise"))
        .map(|c| c.advertise)
        .map_err(|e| match e {
            crate::config::ConfigError::Invalid { problems, .. } => problems
                .into_iter()
                .map(|p| p.reason)
                .collect::<Vec<_>>()
                .join("; "),
            other => other.to_string(),
        })
}

/// A TOML basic string of `s`.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.into()).to_string()
}

/// The first name the operator gave with `--san` that other machines could use
/// (not a loopback name), at the listen port.
fn default_advertise(sans: &[String], port: u16) -> Option<String> {
    sans.iter()
        .find(|s| {
            *s != "localhost"
                && !s
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        })
        .map(|s| {
            if s.contains(':') {
                format!("[{s}]:{port}")
            } else {
                format!("{s}:{port}")
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertise_defaults_to_the_first_non_loopback_san() {
        let sans = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            default_advertise(&sans(&["localhost", "127.0.0.1", "hub.example.net"]), 7440),
            Some("hub.example.net:7440".into())
        );
        assert_eq!(
            default_advertise(&sans(&["::1", "fd00::5"]), 9),
            Some("[fd00::5]:9".into())
        );
        assert_eq!(default_advertise(&sans(&["localhost"]), 7440), None);
        assert!(check_host_port("hub:7440").is_ok());
        assert!(check_host_port("hub").is_err());
        assert!(check_host_port(":7440").is_err());
    }
}
