//! Host figures and the self-test carried by heartbeats.

use std::path::Path;

use muster_protocol::msg::{HostFigures, SelfTest};
use sysinfo::{Disks, System};

use crate::agent::{AgentConfig, check_command};

/// Reads load, memory and the free space of the disk holding `dir`.
pub fn figures(system: &mut System, dir: &Path) -> HostFigures {
    system.refresh_memory();
    let load1 = System::load_average().map_or(0.0, |l| l.one);
    HostFigures {
        load1,
        mem_available_bytes: system.available_memory(),
        mem_total_bytes: system.total_memory(),
        disk_free_bytes: disk_free(dir).unwrap_or(0),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    }
}

/// Free bytes on the filesystem holding `dir` (the longest matching mount point).
pub fn disk_free(dir: &Path) -> Option<u64> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let disks = Disks::new_with_refreshed_list().ok()?;
    disks
        .iter()
        .filter(|d| dir.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| d.available_space())
}

/// The self-test: hub round trip, command present and executable, disk above the floor.
pub fn self_test(
    agent: &AgentConfig,
    hub_rtt_us: Option<u64>,
    disk_free_bytes: u64,
    disk_floor_mb: u64,
    health: Result<(), String>,
) -> SelfTest {
    let mut problems = Vec::new();
    let command_ok = match check_command(agent) {
        Ok(()) => true,
        Err(e) => {
            problems.push(e);
            false
        }
    };
    let floor = disk_floor_mb.saturating_mul(1 << 20);
    let disk_ok = disk_free_bytes >= floor;
    if !disk_ok {
        problems.push(format!(
            "only {} MiB free in the state directory, below the floor of {disk_floor_mb} MiB (disk_floor_mb)",
            disk_free_bytes >> 20
        ));
    }
    if hub_rtt_us.is_none() {
        problems.push("no round trip to the hub measured".into());
    }
    if let Err(e) = health {
        problems.push(format!("health command: {e}"));
    }
    SelfTest {
        passed: problems.is_empty(),
        hub_rtt_us,
        command_ok,
        disk_ok,
        problems,
    }
}
