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
        ws.root().display(),
        human_bytes(usage.workspaces),
        usage.count,
        human_bytes(c.max_disk),
        human_bytes(usage.mirrors),
    );
    if list.is_empty() {
        return Ok(());
    }
    println!(
        "{:>8} {:>4}  {:<8} {:>10}  {:<9} {:<14} DIR",
        "TASK", "GEN", "STATE", "SIZE", "FINISHED", "BRANCH"
    );
    let now = wall_ms();
    for w in &list {
        println!("{}", row(w, now));
    }
    Ok(())
}

fn row(w: &WorkspaceInfo, now_ms: u64) -> String {
    let state = match w.state {
        WorkspaceState::Running => "running",
        WorkspaceState::Finished => "finished",
    };
    let finished = w.finished_at_ms.map_or_else(
        || "-".to_string(),
        |at| format!("{} ago", ago(now_ms.saturating_sub(at))),
    );
    format!(
        "{:>8} {:>4}  {:<8} {:>10}  {:<9} {:<14} {}",
        w.task.0,
        w.generation.0,
        state,
        human_bytes(w.bytes),
        finished,
        w.branch.as_deref().unwrap_or("-"),
        w.dir.display()
    )
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

/// An age in its largest whole unit: "45s", "12m", "5h", "3d".
fn ago(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
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
    fn sizes_and_ages_for_people() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(12 * 1024), "12.0 KiB");
        assert_eq!(human_bytes(20 << 30), "20.0 GiB");
        assert_eq!(ago(59_999), "59s");
        assert_eq!(ago(3_600_000), "1h");
        assert_eq!(ago(3 * 86_400_000), "3d");
    }
}
