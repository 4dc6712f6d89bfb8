//! The muster sidecar: keeps this machine's share of the queue durably,
//! wakes the local agent, verifies it started, watches it, and reports.
//!
//! Parts: [`config`] (sidecar.toml), [`keystore`] (where the private key
//! lives), [`core`] (pure decisions with explicit time: phases, outbox, slots,
//! start deadlines, heartbeats, orphans, run directory release), [`queue`] (redb),
//! [`agent`] (the runner: exec and wake modes, verification, probes),
//! [`host`] (self-test and host figures), [`local`] (the agent's Unix socket),
//! [`tasktoken`] (each attempt's secret for that socket),
//! [`daemon`] (the IO shell that joins them to the hub session); [`workspace`]
//! (each attempt's directory or git worktree, its checkpoints and retention);
//! [`logs`] (each attempt's output kept, capped, swept and read);
//! [`test_hooks`] (acting only with the `test-hooks` feature, for the crash tests).

pub mod agent;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod host;
pub mod keystore;
pub mod local;
pub mod logs;
pub mod queue;
pub mod rundirs;
pub mod tasktoken;
pub mod test_hooks;
pub mod transcript;
pub mod workspace;

/// The decision core, a crate of its own so that it cannot reach IO.
pub use muster_sidecar_core as core;
