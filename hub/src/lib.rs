//! The muster hub: PKI, durable store, scheduler core, QUIC server, operator CLI.
//!
//! Parts: [`config`] (hub.toml), [`pki`] (CA, certificates, CSR signing),
//! [`core`] (pure decisions: registry, tasks, scheduler), [`store`] (redb with
//! group commit), [`server`] (QUIC endpoint and the core loop that joins them).

pub mod cli;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod init;
pub mod metrics;
pub mod pki;
pub mod server;
pub mod store;

/// The decision core, a crate of its own so that it cannot reach IO.
pub use muster_hub_core as core;
