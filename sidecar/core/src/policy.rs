//! What the shell tells the core about this sidecar's configuration, and the
//! fixed limits the core keeps.

use std::time::Duration;

use crate::run::RunMode;

/// How long after the first welcome the hub's resent assignments may claim
/// orphaned runs; the hub resends them right behind the welcome, so this is ample.
pub const ORPHAN_CLAIM: Duration = Duration::from_secs(5);

/// The heartbeat interval until the hub's welcome names one (the hub's default).
pub const HEARTBEAT_INTERVAL_DEFAULT: Duration = Duration::from_secs(10);

/// The shortest heartbeat interval taken from a welcome, so a misconfigured
/// hub cannot make its sidecars spin.
pub const HEARTBEAT_INTERVAL_MIN: Duration = Duration::from_millis(100);

/// Each heartbeat interval is scaled by a factor drawn from
/// `[1 - HEARTBEAT_JITTER, 1 + HEARTBEAT_JITTER]`, so a fleet started together
/// spreads its heartbeats instead of sending them in step.
pub const HEARTBEAT_JITTER: f64 = 0.1;

/// Assignments held back for a free slot, at most. The hub never assigns beyond
/// a sidecar's slots, so these only cover a hub whose view has drifted; beyond
/// the bound an assignment is ignored, and the hub's acceptance timeout
/// re-queues it. Each holds a task spec (description at most 64 KiB).
pub const DEFERRED_MAX: usize = 16;

/// Longest an assignment is held back for a slot (at most one heartbeat
/// interval). A slot the hub and this sidecar disagree about frees within
/// milliseconds; one held longer (a sidecar stopped, or cut off) may have
/// been re-assigned elsewhere by then, and starting it late would run a
/// superseded attempt beside its successor. So it is dropped instead: the
/// hub re-queues it at its acceptance timeout, or resends it after a welcome.
pub const DEFERRED_HOLD_MAX: Duration = Duration::from_secs(2);

/// The parts of `sidecar.toml` the core decides with. Built by the shell from
/// the configuration; immutable for the life of the core.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Agent runs supervised at once at most; an assignment beyond them waits
    /// (in memory, unaccepted) until a slot frees.
    pub slots: u32,
    /// The mode new runs start in.
    pub mode: RunMode,
    /// Exec runs: alive this long after the spawn counts as started (zero: the
    /// spawn itself).
    pub settle: Duration,
    /// Wake runs: how long the wake command may run, and then how long the
    /// runner may take to verify the start; after a restart, how long a run
    /// may take to be found again.
    pub start_timeout: Duration,
    /// Wake runs: who establishes the start.
    pub verify: Verifier,
}

/// Who establishes that a wake run started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verifier {
    /// The runner, by a process or a command probe (`verify = "process"` or
    /// `"command"`), within [`Policy::start_timeout`].
    Runner,
    /// The agent itself (`verify = "agent-ack"`, `muster-sidecar task start`).
    /// The sidecar sets no deadline on that: the hub's start timeout does.
    Agent,
}

impl Default for Policy {
    /// The defaults of `sidecar.toml`: one slot, exec, 500 ms settle.
    fn default() -> Self {
        Policy {
            slots: 1,
            mode: RunMode::Exec,
            settle: Duration::from_millis(500),
            start_timeout: Duration::from_secs(60),
            verify: Verifier::Agent,
        }
    }
}
