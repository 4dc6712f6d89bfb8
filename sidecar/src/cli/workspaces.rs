//! `workspaces`: every attempt workspace on this host, with its state and
//! size, as a table or JSON. Reads the files only; the daemon need not run.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use super::serve::load_config;
use super::{Failure, fail};
use crate::workspace::{WorkspaceInfo, WorkspaceState, Workspaces};

/// Lists the workspaces of the sidecar configured at `config` / `data_dir`.
pub(super) async fn workspaces(
    json: bool,
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
) -> Result<(), Failure> {
    let cfg = load_config(config, data_dir)?;
    let ws = Workspaces::from_config(&cfg);
    let (ws, list, usage) = tokio::task::spawn_blocking(move || {
        let list = ws.list();
        let usage = ws.disk_use();
        (ws, list, usage)
    })
    .await
    .map_err(|e| fail(format!("listing the workspaces failed: {e}")))?;
    let c = ws.config();
    if json {
        let v = serde_json::json!({
            "mode": c.mode.as_str(),
            "root": ws.root(),
            "mirrors": ws.mirrors_dir(),
            "max_disk": c.max_disk,
            "retention_ms": u64::try_from(c.retention.as_millis()).unwrap_or(u64::MAX),
            "disk": usage,
            "workspaces": list,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "mode {}  root {}  {} in {} workspaces (max_disk {})  mirrors {}",
        c.mode.as_str(),
        muster_protocol::human::escape_controls(&ws.root().display().to_string(), false),
        human_bytes(usage.workspaces),
        usage.count,
        human_bytes(c.max_disk),
        human_bytes(usage.mirrors),
    );
    if list.is_empty() {
        return Ok(());
    }
    let now = wall_ms();
    let rows: Vec<[String; 7]> = list.iter().map(|w| row(w, now)).collect();
    print!(
        "{}",
        muster_protocol::human::table(
            &["TASK", "GEN", "STATE", "SIZE", "FINISHED", "BRANCH", "DIR"],
            &rows
        )
    );
    Ok(())
}

/// One workspace as a table row.
fn row(w: &WorkspaceInfo, now_ms: u64) -> [String; 7] {
    let state = match w.state {
        WorkspaceState::Running => "running",
        WorkspaceState::Finished => "finished",
    };
    [
        w.task.0.to_string(),
        w.generation.0.to_string(),
        state.to_string(),
        human_bytes(w.bytes),
        w.finished_at_ms.map_or_else(
            || "-".to_string(),
            |at| muster_protocol::human::ago(at, now_ms),
        ),
        w.branch.as_deref().unwrap_or("-").to_string(),
        w.dir.display().to_string(),
    ]
}

/// A size for people: "512 B", "12.0 KiB", "3.4 GiB".
pub(super) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_say_size_and_age_for_people() {
        let w = WorkspaceInfo {
            task: muster_protocol::TaskId(41),
            generation: muster_protocol::Generation(2),
            dir: PathBuf::from("/var/lib/muster-sidecar/workspaces/41-2"),
            kind: crate::workspace::WorkspaceKind::Git,
            repo: None,
            branch: Some("muster/41\u{1b}[2J".into()),
            state: WorkspaceState::Finished,
            finished_at_ms: Some(1_000),
            bytes: 12 * 1024,
        };
        let r = row(&w, 3_601_000);
        assert_eq!(r[0], "41");
        assert_eq!(r[3], "12.0 KiB");
        assert_eq!(r[4], "1h ago");
        let t = muster_protocol::human::table(
            &["TASK", "GEN", "STATE", "SIZE", "FINISHED", "BRANCH", "DIR"],
            &[r],
        );
        assert!(!t.contains('\u{1b}'), "{t}");
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(12 * 1024), "12.0 KiB");
        assert_eq!(human_bytes(20 << 30), "20.0 GiB");
    }
}
