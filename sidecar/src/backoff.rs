//! The sidecar's reconnect pacing, built on the shared [`Backoff`].

use std::time::Duration;

use muster_protocol::pace::Backoff;

/// Reconnecting after a failure: 1 s doubling to 60 s, each delay jittered
/// within [base/2, base] so a fleet never reconnects in step.
pub fn reconnect() -> Backoff {
    Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
}

/// Retrying after the hub refused a connection at a cap: 250 ms doubling to at
/// most 4 s, jittered, so a fleet reconnecting at once spreads out without
/// waiting the reconnect backoff's minute.
pub fn busy() -> Backoff {
    Backoff::new(Duration::from_millis(250), Duration::from_secs(4))
}
