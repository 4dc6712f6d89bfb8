//! The muster wire contract, shared by the hub, the sidecar and the operator CLI.
//!
//! Parts: the wire types of `muster-wire`, re-exported ([`ids`], [`msg`],
//! [`codec`] with [`encode`]/[`decode`], [`limits`]), [`framing`]
//! (length-delimited frames with a size limit), [`tls`] (rustls/quinn builders
//! shared by both ends) and [`client`], [`http`] (the small `/metrics` endpoint both daemons serve) and
//! [`join_token`], and [`human`] (tables and times for the command lines). Nothing here holds runtime state.
//!
//! Data flow: a peer builds a message from [`msg`] and sends it with a
//! [`FrameWriter`] (from [`framed`]), which [`encode`]s it as one frame with
//! [`frame_codec`]; the receiver's [`FrameReader`] reads one frame (refused
//! before allocation if it is larger than the limit) and [`decode`]s it, which
//! returns an error, never a panic, on any byte string.

pub mod client;
pub mod doctor;
pub mod framing;
pub mod http;
pub mod human;
pub mod join_token;
pub mod logstyle;
pub mod procstat;
pub mod tls;

pub use framing::{FrameError, FrameReader, FrameWriter, frame_codec, framed};
pub use muster_wire::{
    AgentName, DecodeError, EncodeError, EventSeq, Generation, NameError, PROTOCOL_VERSION,
    ReportId, TaskId, codec, decode, duration, encode, ids, limits, msg, pace, peek_open,
    peek_protocol, work,
};
/// Tracing target of the latency points (`muster-bench latency --breakdown`
/// turns it on at debug level in the hub and the sidecars and reads them back).
pub const LATENCY_TARGET: &str = "muster::latency";

/// Wall-clock microseconds since the Unix epoch, for latency points compared
/// across processes on one machine.
pub fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// QUIC application close code: the client certificate is not (or no longer) a
/// live identity at the hub. Clients read the code, never the reason text.
pub const CLOSE_NOT_ENROLLED: u32 = 6;
/// QUIC application close code: this hub is a standby of a cluster. The
/// reason bytes are the leader's address (`host:port`, UTF-8, at most
/// [`LEADER_ADDR_MAX`] bytes) or empty while no leader is known.
pub const CLOSE_NOT_LEADER: u32 = 7;
/// Longest leader address a standby sends, and a client accepts.
pub const LEADER_ADDR_MAX: usize = 256;
/// ALPN for sessions (sidecars) and operator requests; always mutual TLS.
pub const ALPN_SESSION: &[u8] = b"muster/1";
/// ALPN for enrollment: the only thing an unauthenticated peer may reach.
pub const ALPN_ENROLL: &[u8] = b"muster-enroll/1";
/// The server name every client asks for; the hub certificate always carries it.
pub const HUB_SERVER_NAME: &str = "localhost";
