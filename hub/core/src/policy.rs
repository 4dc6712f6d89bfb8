//! The policies and bounds the core decides by (`[policy]` and `[limits]` in
//! hub.toml): plain data, parsed and rendered by the hub's config module.

use std::time::Duration;

/// Timeouts, retries, the circuit breaker and retention (`[policy]` in hub.toml).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// How often sidecars send a heartbeat.
    pub heartbeat_interval: Duration,
    /// An assignment not accepted within this is re-queued.
    pub accept_timeout: Duration,
    /// An accepted attempt not verified as started within this is re-queued.
    pub start_timeout: Duration,
    /// A sidecar silent this long is lost and its attempts are re-queued; must exceed the heartbeat interval.
    pub lost_grace: Duration,
    /// An agent disconnected this long raises an "agent down" alert.
    pub agent_down_alert: Duration,
    /// A running task without progress this long raises a "stalled" alert.
    pub stall_alert: Duration,
    /// Attempts per task before it fails for good.
    pub max_attempts: u32,
    /// Delay before the first retry.
    pub backoff_initial: Duration,
    /// Each further retry waits this many times longer.
    pub backoff_factor: u32,
    /// Longest delay between retries.
    pub backoff_max: Duration,
    /// Consecutive failed attempts on one agent that open its circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker keeps the agent out of scheduling at first.
    pub breaker_cooldown: Duration,
    /// Longest cooldown after repeated trips.
    pub breaker_cooldown_max: Duration,
    /// How long finished tasks are kept before pruning.
    pub retention: Duration,
    /// Events kept in the event log; older ones are pruned.
    pub events_max: u64,
}

/// Bounds on queues and inputs (`[limits]` in hub.toml).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Tasks waiting for an agent; a submit beyond this is refused.
    pub max_queued_tasks: u64,
    /// Largest task description in bytes.
    pub max_description_bytes: u64,
    /// Largest task result in bytes.
    pub max_result_bytes: u64,
    /// Largest protocol frame in bytes; at most 1 MiB and larger than description plus result.
    pub max_frame_bytes: u64,
    /// Unfinished tasks one submitter may hold.
    pub max_tasks_per_submitter: u64,
    /// Failed enrollment attempts accepted per minute from one source address.
    pub enroll_per_minute: u32,
    /// Connections without a client certificate accepted per minute from one source address.
    pub unauthenticated_per_minute: u32,
    /// Connections without a client certificate accepted per minute from all sources together.
    pub unauthenticated_per_minute_total: u32,
    /// Connections without a client certificate open at once from one source address.
    pub unauthenticated_per_source: u32,
    /// Connections without a client certificate open at once; at most half of `max_connections`.
    pub unauthenticated_max: u32,
    /// QUIC handshakes in flight at once from one source address.
    pub handshakes_per_source: u32,
    /// Messages accepted per second on one connection.
    pub messages_per_second: u32,
    /// Open connections at once.
    pub max_connections: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(10),
            accept_timeout: Duration::from_secs(30),
            start_timeout: Duration::from_secs(60),
            lost_grace: Duration::from_secs(60),
            agent_down_alert: Duration::from_secs(120),
            stall_alert: Duration::from_secs(30 * 60),
            max_attempts: 3,
            backoff_initial: Duration::from_secs(5),
            backoff_factor: 4,
            backoff_max: Duration::from_secs(10 * 60),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(5 * 60),
            breaker_cooldown_max: Duration::from_secs(60 * 60),
            retention: Duration::from_secs(30 * 24 * 60 * 60),
            events_max: 100_000,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_queued_tasks: 100_000,
            max_description_bytes: 65_536,
            max_result_bytes: 262_144,
            max_frame_bytes: 1_048_576,
            max_tasks_per_submitter: 100_000,
            enroll_per_minute: 30,
            unauthenticated_per_minute: 120,
            unauthenticated_per_minute_total: 1200,
            unauthenticated_per_source: 8,
            unauthenticated_max: 256,
            handshakes_per_source: 16,
            messages_per_second: 2000,
            max_connections: 20_000,
        }
    }
}
