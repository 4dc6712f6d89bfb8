//! `doctor`: check the config, the key, the agent command, disk space, the
//! workspaces and the hub, one line each.

use std::path::Path;
use std::time::Instant;

use muster_protocol::client;

use super::serve::load_credential;
use super::{Failure, fail};
use crate::config::{CONFIG_FILE, SidecarConfig, WorkspaceMode};
use crate::workspace::Workspaces;

/// Runs every check and fails if any did.
pub(super) async fn doctor(data_dir: &Path, json: bool) -> Result<(), Failure> {
    let mut checks = if json {
        muster_protocol::doctor::Checks::json()
    } else {
        muster_protocol::doctor::Checks::default()
    };
    let cfg = SidecarConfig::load(&data_dir.join(CONFIG_FILE));
    checks.check(
        "config",
        cfg.as_ref()
            .map(|_| "valid".to_string())
            .map_err(|e| e.to_string()),
    );
    let cred = load_credential(data_dir);
    checks.check(
        "key",
        cred.as_ref()
            .map(|(_, s)| format!("store in use: {s} (readable, safe permissions)"))
            .map_err(|f| f.message.clone()),
    );
    if let Ok(cfg) = &cfg {
        checks.check(
            "agent command",
            crate::agent::check_command(&cfg.agent)
                .map(|_| format!("{:?} is executable", cfg.agent.command[0])),
        );
        let free = crate::host::disk_free(data_dir);
        let floor = cfg.disk_floor_mb << 20;
        checks.check(
            "disk",
            match free {
                Some(f) if f >= floor => Ok(format!(
                    "{} MiB free (floor {} MiB)",
                    f >> 20,
                    cfg.disk_floor_mb
                )),
                Some(f) => Err(format!(
                    "{} MiB free, below the floor of {} MiB",
                    f >> 20,
                    cfg.disk_floor_mb
                )),
                None => Err("cannot tell the free space of the state directory".into()),
            },
        );
        checks.check("workspaces", workspaces(cfg).await);
        if let Ok((cred, _)) = &cred {
            let started = Instant::now();
            let mut hubs = vec![cfg.hub.clone()];
            hubs.extend(cfg.hubs.iter().filter(|h| **h != cfg.hub).cloned());
            // A hello-less round trip: an operator request the hub refuses for
            // role agent. A standby of a cluster names the leader, who is tried next.
            let answered = client::follow_leader(&hubs, |hub| async move {
                let (endpoint, conn) = client::connect(&hub, cred).await?;
                let r = client::request(&conn, muster_protocol::msg::OpRequest::Stats).await;
                conn.close(0u32.into(), b"doctor");
                endpoint.wait_idle().await;
                r
            })
            .await;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            let hub = match answered {
                Ok((at, _)) if at == cfg.hub => Ok(format!(
                    "{at} answered: handshake and round trip in {ms:.1} ms"
                )),
                Ok((at, _)) => Ok(format!(
                    "{at} answered (the cluster's leader; {} is not): in {ms:.1} ms",
                    cfg.hub
                )),
                Err(e) => Err(format!("{}: {e}", hubs.join(", "))),
            };
            checks.check("hub", hub);
        }
    }
    checks.finish();
    if checks.failed() {
        Err(fail("some checks failed"))
    } else {
        Ok(())
    }
}

/// The workspace mode, git when it is needed, and disk use against `max_disk`.
async fn workspaces(cfg: &SidecarConfig) -> Result<String, String> {
    let ws = Workspaces::from_config(cfg);
    let c = &cfg.workspace;
    if c.mode == WorkspaceMode::Shared {
        return Ok(format!(
            "mode shared: every attempt works in {}",
            ws.shared_dir().display()
        ));
    }
    let git = match c.mode {
        WorkspaceMode::Git => {
            let v = crate::workspace::git_version()
                .await
                .map_err(|e| e.to_string())?;
            format!(", {v}")
        }
        _ => String::new(),
    };
    let max = c.max_disk;
    let usage = tokio::task::spawn_blocking(move || ws.disk_use())
        .await
        .map_err(|e| format!("measuring the workspaces failed: {e}"))?;
    let human = super::workspaces::human_bytes;
    let line = format!(
        "mode {}{git}: {} in {} workspaces (max_disk {}), mirrors {}",
        c.mode.as_str(),
        human(usage.workspaces),
        usage.count,
        human(max),
        human(usage.mirrors)
    );
    if usage.workspaces > max {
        return Err(format!(
            "{line}: above max_disk; the daemon's sweep removes finished workspaces oldest first, and if running ones alone exceed it, raise max_disk"
        ));
    }
    Ok(line)
}
