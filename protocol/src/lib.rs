//! The muster wire contract, shared by the hub, the sidecar and the operator CLI.
//!
//! Parts: [`ids`] (typed identities), [`msg`] (every message that crosses the
//! wire), [`codec`] (bincode 2 behind [`encode`]/[`decode`] and length-delimited
//! framing with a size limit), [`tls`] (rustls/quinn builders shared by both
//! ends) and [`limits`]. Nothing here holds runtime state.
//!
//! Data flow: a peer builds a message from [`msg`], [`encode`]s it, and writes
//! it as one frame with [`frame_codec`]; the receiver reads one frame (refused
//! before allocation if it is larger than the limit) and [`decode`]s it, which
//! returns an error, never a panic, on any byte string.

pub mod client;
pub mod codec;
pub mod duration;
pub mod ids;
pub mod limits;
pub mod msg;
pub mod tls;

pub use codec::{DecodeError, EncodeError, decode, encode, frame_codec, peek_open, peek_protocol};
pub use ids::{AgentName, EventSeq, Generation, NameError, ReportId, TaskId};

/// The protocol version this build speaks; carried in every `Open` frame.
/// Version 2: enrollment carries the requested grant, tokens carry a name and a
/// grant, identities are revoked one at a time (issue 12).
pub const PROTOCOL_VERSION: u32 = 2;
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
/// ALPN for sessions (sidecars) and operator requests; always mutual TLS.
pub const ALPN_SESSION: &[u8] = b"muster/1";
/// ALPN for enrollment: the only thing an unauthenticated peer may reach.
pub const ALPN_ENROLL: &[u8] = b"muster-enroll/1";
/// The server name every client asks for; the hub certificate always carries it.
pub const HUB_SERVER_NAME: &str = "localhost";
