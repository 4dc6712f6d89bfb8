//! The policies and bounds the core decides by (`[policy]` and `[limits]` in
//! hub.toml), each key declared once: its doc line is also its comment in the
//! file `init` writes. Plain data; the hub's shell reads the file.

use std::time::Duration;

use muster_config::{AtLeast, Checks};
use muster_wire::duration::format_duration;
use muster_wire::limits::FRAME_BYTES_MAX;

muster_config::config! {
    /// Timeouts, retries, the circuit breaker and retention (`[policy]` in hub.toml).
    #[derive(Debug, Clone, PartialEq)]
    pub struct Policy {
        /// How often sidecars send a heartbeat.
        heartbeat_interval: Duration = Duration::from_secs(10),
        /// An assignment not accepted within this is re-queued.
        accept_timeout: Duration = Duration::from_secs(30),
        /// An attempt not verified as started within this (counted from the sidecar's last progress report, which it sends while it prepares a workspace) is re-queued.
        start_timeout: Duration = Duration::from_secs(60),
        /// A sidecar silent this long is lost and its attempts are re-queued; must exceed heartbeat_interval.
        lost_grace: Duration = Duration::from_secs(60),
        /// An agent disconnected this long raises an alert.
        agent_down_alert: Duration = Duration::from_secs(120),
        /// A running task without progress, output or CPU this long raises `stalled` (a busy agent that prints nothing raises nothing).
        stall_alert: Duration = Duration::from_secs(30 * 60),
        /// Attempts per task before it fails for good.
        max_attempts: u32 as AtLeast<1> = 3,
        /// Delay before the first retry; at most backoff_max.
        backoff_initial: Duration = Duration::from_secs(5),
        /// Each further retry waits this many times longer.
        backoff_factor: u32 as AtLeast<1> = 4,
        /// Longest delay between retries.
        backoff_max: Duration = Duration::from_secs(10 * 60),
        /// Consecutive failures on one agent that open its circuit breaker.
        breaker_failures: u32 as AtLeast<1> = 3,
        /// First cooldown of an open breaker; at most breaker_cooldown_max.
        breaker_cooldown: Duration = Duration::from_secs(5 * 60),
        /// Longest cooldown after repeated trips.
        breaker_cooldown_max: Duration = Duration::from_secs(60 * 60),
        /// How long finished tasks are kept.
        retention: Duration = Duration::from_secs(30 * 24 * 60 * 60),
        /// Events kept in the event log; older ones are pruned.
        events_max: u64 as AtLeast<1> = 100_000,
        /// A running agent with no output and no CPU this long (waiting for input, or hung) raises `agent_idle`.
        idle_alert: Duration = Duration::from_secs(5 * 60),
    }
    check = check_policy;
}

muster_config::config! {
    /// Bounds on queues and inputs (`[limits]` in hub.toml).
    #[derive(Debug, Clone, PartialEq)]
    pub struct Limits {
        /// Tasks waiting for an agent; more are refused.
        max_queued_tasks: u64 as AtLeast<1> = 100_000,
        /// Largest task description in bytes.
        max_description_bytes: u64 as AtLeast<1> = 65_536,
        /// Largest task result in bytes.
        max_result_bytes: u64 as AtLeast<1> = 262_144,
        /// Largest protocol frame; at most 1048576, above description + result.
        max_frame_bytes: u64 as AtLeast<1> = 1_048_576,
        /// Unfinished tasks one submitter may hold.
        max_tasks_per_submitter: u64 as AtLeast<1> = 100_000,
        /// Failed enrollment attempts per minute from one source address (successes are free).
        enroll_per_minute: u32 as AtLeast<1> = 30,
        /// Connections without a client certificate per minute from one source address.
        unauthenticated_per_minute: u32 as AtLeast<1> = 120,
        /// Connections without a client certificate per minute from all sources.
        unauthenticated_per_minute_total: u32 as AtLeast<1> = 1200,
        /// Connections without a client certificate open at once from one source address.
        unauthenticated_per_source: u32 as AtLeast<1> = 8,
        /// Connections without a client certificate open at once (at most max_connections / 2).
        unauthenticated_max: u32 as AtLeast<1> = 256,
        /// QUIC handshakes in flight at once from one source address; more are refused
        /// and the client retries. Raise it when many sidecars share one address (NAT).
        handshakes_per_source: u32 as AtLeast<1> = 16,
        /// Messages accepted per second on one connection.
        messages_per_second: u32 as AtLeast<1> = 2000,
        /// Open connections at once.
        max_connections: u32 as AtLeast<1> = 20_000,
    }
    check = check_limits;
}

/// Pairs of keys that only make sense in one order.
fn check_policy(p: &Policy, checks: &mut Checks<'_>) {
    if p.backoff_initial > p.backoff_max {
        checks.bad(
            &["backoff_initial", "backoff_max"],
            format!(
                "{} is longer than backoff_max ({}); it must be at most that",
                format_duration(p.backoff_initial),
                format_duration(p.backoff_max)
            ),
        );
    }
    if p.breaker_cooldown > p.breaker_cooldown_max {
        checks.bad(
            &["breaker_cooldown", "breaker_cooldown_max"],
            format!(
                "{} is longer than breaker_cooldown_max ({}); it must be at most that",
                format_duration(p.breaker_cooldown),
                format_duration(p.breaker_cooldown_max)
            ),
        );
    }
    if p.lost_grace <= p.heartbeat_interval {
        checks.bad(
            &["lost_grace", "heartbeat_interval"],
            format!(
                "{} is not longer than heartbeat_interval ({}); one late heartbeat would lose the sidecar",
                format_duration(p.lost_grace),
                format_duration(p.heartbeat_interval)
            ),
        );
    }
}

/// A full task must fit in one frame, and no frame may pass the codec's ceiling.
fn check_limits(l: &Limits, checks: &mut Checks<'_>) {
    let frame_max = FRAME_BYTES_MAX as u64;
    if l.max_frame_bytes > frame_max {
        checks.bad(
            &["max_frame_bytes"],
            format!(
                "{} is above the protocol's ceiling of {frame_max} (1 MiB)",
                l.max_frame_bytes
            ),
        );
    }
    let payload = l.max_description_bytes.saturating_add(l.max_result_bytes);
    if l.max_frame_bytes <= payload {
        checks.bad(
            &["max_frame_bytes", "max_description_bytes", "max_result_bytes"],
            format!(
                "{} must be larger than max_description_bytes + max_result_bytes ({payload}), or a full task would not fit in a frame",
                l.max_frame_bytes
            ),
        );
    }
}
