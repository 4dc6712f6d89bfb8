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
    join: bool,
) -> Result<(), CliError> {
    let occupied = std::fs::read_dir(&data_dir).is_ok_and(|mut d| d.next().is_some());
    if join {
        check_join_dir(&data_dir, force)?;
    } else if occupied && !force {
        return Err(CliError::fail(format!(
            "{} already exists and is not empty; refusing to touch it (pass --force to overwrite its PKI, config and database)",
            data_dir.display()
        )));
    }
    if occupied && !join {
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
    let fp = if join {
        tokio::task::block_in_place(|| join_data_dir(&data_dir, &config, &sans))?
    } else {
        tokio::task::block_in_place(|| init_data_dir(&data_dir, &config, &sans))
            .map_err(CliError::fail)?
    };
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
    if cfg.store.kind == crate::store::StoreKind::Postgres {
        return serve_cluster(cfg, data_dir).await;
    }
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

/// What a further hub of a cluster copies from the first hub's data directory.
pub(crate) const JOIN_FILES: [&str; 4] = ["ca.crt", "ca.key", "admin.crt", "admin.key"];

/// `init --join`: the copied PKI is there, and no hub was made here yet.
fn check_join_dir(dir: &std::path::Path, force: bool) -> Result<(), CliError> {
    let missing: Vec<&str> = JOIN_FILES
        .iter()
        .copied()
        .filter(|f| !dir.join(f).exists())
        .collect();
    if !missing.is_empty() {
        return Err(CliError::fail(format!(
            "--join: {} lacks {}; copy {} from the first hub's data directory into it first (ca.key is the cluster's crown jewel: copy it over a secure channel, mode 0600)",
            dir.display(),
            missing.join(", "),
            JOIN_FILES.join(", ")
        )));
    }
    if dir.join(CONFIG_FILE).exists() && !force {
        return Err(CliError::fail(format!(
            "--join: {} already has a {CONFIG_FILE}; refusing to touch it (pass --force to replace it and the server certificate)",
            dir.display()
        )));
    }
    Ok(())
}

/// `init --join`: this hub's server certificate from the cluster's CA, its
/// hub.toml, and a check that the database is this cluster's (the copied
/// admin credential is a live identity there).
fn join_data_dir(
    dir: &std::path::Path,
    config: &HubConfig,
    sans: &[String],
) -> Result<String, CliError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |e: String| CliError::fail(format!("--join: {e}"));
    let opts = config.store.pg_options().map_err(fail)?;
    let store = crate::store::Store::open_postgres(&opts)
        .map_err(|e| fail(format!("{e} (store url {})", opts.url)))?;
    let admin_pem = std::fs::read_to_string(dir.join(crate::pki::ADMIN_CERT))
        .map_err(|e| fail(format!("{}: {e}", crate::pki::ADMIN_CERT)))?;
    let admin_fp = {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(admin_pem.as_bytes())
            .map(|der| muster_protocol::tls::fingerprint(der.as_ref()))
            .map_err(|_| {
                fail(format!(
                    "{} is not a PEM certificate",
                    crate::pki::ADMIN_CERT
                ))
            })?
    };
    let known = store
        .reader()
        .and_then(|r| r.identities())
        .map_err(|e| fail(e.to_string()))?
        .iter()
        .any(|i| i.fingerprint == admin_fp && i.revoked_at.is_none());
    if !known {
        return Err(fail(format!(
            "the copied admin credential is not a live identity in {}: this database belongs to another cluster, or no hub was initialised on it (run `muster-hub init --store URL` on the first hub)",
            opts.url
        )));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
        .map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    let pki = crate::pki::Pki::join(dir, sans).map_err(|e| fail(e.to_string()))?;
    crate::pki::write_file(&dir.join(CONFIG_FILE), config.render().as_bytes(), 0o644)
        .map_err(|e| fail(e.to_string()))?;
    Ok(pki.ca_fingerprint())
}

/// The PostgreSQL options hub.toml names and their connection settings
/// (a bad URL or password file is a configuration error, exit 78).
fn pg_settings(
    cfg: &HubConfig,
) -> Result<(crate::store::PgOptions, tokio_postgres::Config), CliError> {
    let opts = cfg
        .store
        .pg_options()
        .map_err(|message| CliError { code: 78, message })?;
    let pg = opts.config().map_err(|e| CliError {
        code: 78,
        message: e.to_string(),
    })?;
    Ok((opts, pg))
}

/// `serve` on PostgreSQL: a member of a cluster (of one or more hubs) that
/// leads when it wins the election and is a standby otherwise.
async fn serve_cluster(cfg: HubConfig, data_dir: PathBuf) -> Result<(), CliError> {
    let (opts, pg) = pg_settings(&cfg)?;
    let addr = cfg.advertise_addr(&hostname());
    if addr.ends_with(":0") {
        return Err(CliError {
            code: 78,
            message: format!(
                "listen = {:?}: a hub of a cluster needs a fixed port (standbys and the leader name it to sidecars)",
                cfg.listen.to_string()
            ),
        });
    }
    let campaign = crate::cluster::Campaign {
        pg,
        lease: cfg.store.lease,
        addr,
    };
    let open: crate::cluster::OpenStore = std::sync::Arc::new(move |term| {
        let store = crate::store::Store::open_postgres(&opts).map_err(|e| e.to_string())?;
        store.set_term(term);
        Ok(store)
    });
    let shutdown = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        tracing::info!("shutting down");
    };
    crate::cluster::serve(cfg, data_dir, campaign, open, shutdown)
        .await
        .map_err(CliError::fail)
}

/// `cluster status`: read from the database this data directory's hub.toml names.
pub(crate) async fn cluster_status(data_dir: &std::path::Path, json: bool) -> Result<(), CliError> {
    let cfg = HubConfig::load(&data_dir.join(CONFIG_FILE)).map_err(config_error)?;
    if cfg.store.kind != crate::store::StoreKind::Postgres {
        return Err(CliError {
            code: 78,
            message: format!(
                "{}: this hub keeps its state in redb, so it is a cluster of one; clusters run on PostgreSQL ([store] kind = \"postgres\")",
                data_dir.join(CONFIG_FILE).display()
            ),
        });
    }
    let (_, pg) = pg_settings(&cfg)?;
    let status = crate::cluster::status(&pg, cfg.store.lease)
        .await
        .map_err(|e| CliError {
            code: crate::cli::watch::EXIT_UNREACHABLE,
            message: e,
        })?;
    if json {
        let v = serde_json::to_value(&status).map_err(|e| CliError::fail(e.to_string()))?;
        println!("{v}");
        return Ok(());
    }
    let lease = match (status.leader.as_deref(), status.lease_age_ms) {
        (Some(l), Some(age)) => format!(
            "leader {l}, term {}, lease renewed {} ago{}",
            status.term,
            secs(age),
            if status.lease_fresh {
                String::new()
            } else {
                format!(
                    " (older than the lease of {}: an election is due)",
                    secs(status.lease_ms)
                )
            }
        ),
        _ => "no hub has led yet".to_string(),
    };
    println!("{}", crate::cli::connect::escape_controls(&lease, false));
    let rows: Vec<[String; 3]> = status
        .hubs
        .iter()
        .map(|h| {
            [
                h.addr.clone(),
                if h.leader { "leader" } else { "standby" }.to_string(),
                format!("{} ago", secs(h.seen_ms_ago)),
            ]
        })
        .collect();
    print!(
        "{}",
        crate::cli::dispatch::table(&["HUB", "ROLE", "SEEN"], &rows)
    );
    Ok(())
}

/// Milliseconds as seconds with a tenth: a lease is a few seconds long.
fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
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
