//! `doctor`: check a hub's data directory, config and reachability.

use std::time::Instant;

use crate::cli::{CliError, ConnectArgs};
use crate::config::{CONFIG_FILE, HubConfig};
use muster_protocol::msg::OpRequest;

pub(crate) async fn doctor(connect: &ConnectArgs, json: bool) -> Result<(), CliError> {
    let mut checks = if json {
        muster_protocol::doctor::Checks::json()
    } else {
        muster_protocol::doctor::Checks::default()
    };
    if let Some(dir) = &connect.data_dir {
        checks.check(
            "config",
            HubConfig::load(&dir.join(CONFIG_FILE))
                .map(|_| "valid".into())
                .map_err(|e| e.to_string()),
        );
        for key in ["ca.key", "server.key", "admin.key"] {
            use std::os::unix::fs::MetadataExt;
            let p = dir.join(key);
            checks.check(
                key,
                match std::fs::metadata(&p) {
                    Ok(m) if m.mode() & 0o077 == 0 => {
                        Ok(format!("{} mode {:o}", p.display(), m.mode() & 0o777))
                    }
                    Ok(m) => Err(format!(
                        "{} has mode {:o}; run chmod 600",
                        p.display(),
                        m.mode() & 0o777
                    )),
                    Err(e) => Err(format!("{}: {e}", p.display())),
                },
            );
        }
    }
    let started = Instant::now();
    let answer = match connect.connect().await {
        Ok(s) => {
            let r = s.call(OpRequest::Stats).await;
            s.close().await;
            r.map(|_| {
                format!(
                    "answered in {:.1} ms",
                    started.elapsed().as_secs_f64() * 1000.0
                )
            })
            .map_err(|e| e.message)
        }
        Err(e) => Err(e.message),
    };
    checks.check("hub", answer);
    checks.finish();
    if checks.failed() {
        Err(CliError::fail("some checks failed"))
    } else {
        Ok(())
    }
}
