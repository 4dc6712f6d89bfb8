//! The muster wire types, shared by the hub, the sidecar, their cores and the
//! operator CLI: [`ids`] (typed identities), [`msg`] (every message that
//! crosses the wire), [`limits`], [`duration`] (the duration syntax of config
//! files and command lines), [`pace`] (backoff, rate windows, a seeded RNG)
//! and [`codec`] (bincode 2 behind
//! [`encode`]/[`decode`]).
//!
//! No runtime, network, clock or IO: the decision cores depend on this crate
//! and on nothing that could block. Framing, TLS and the client live in
//! `muster-protocol`, which re-exports everything here.

pub mod codec;
pub mod duration;
pub mod ids;
pub mod limits;
pub mod msg;
pub mod pace;
pub mod work;

pub use codec::{DecodeError, EncodeError, decode, encode, peek_open, peek_protocol};
pub use ids::{AgentName, EventSeq, Generation, NameError, ReportId, TaskId};

/// The protocol version this build speaks; carried in every `Open` frame.
/// Version 2: enrollment carries the requested grant, tokens carry a name and a
/// grant, identities are revoked one at a time (issue 12).
/// Version 3: tasks carry a repository, base, environment and labels; hellos
/// the workspace mode; finished reports the work result (issue 15).
/// Version 4 (issue 16): usage reports (`ReportBody::Usage`), each running
/// attempt's activity in heartbeats, `task logs` (`OpRequest::TaskLogs`,
/// `OpResponse::LogChunk`) and the log streams the hub opens on a sidecar's connection.
/// Version 5 (issue 20): `ReportBody::Ran`, an attempt's start and end in one
/// report (a hub of version 4 could not decode it, so it refuses up front).
pub const PROTOCOL_VERSION: u32 = 5;
