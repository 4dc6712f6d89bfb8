//! The sidecar's metrics and its `/metrics` and `/healthz` endpoint: counters
//! and a histogram updated as events pass, gauges set from the core when
//! scraped. The HTTP task only asks the daemon loop, which owns the state.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::Daemon;
use crate::core::Core;

/// The sidecar's metrics: counters and a histogram updated as events pass,
/// gauges set when scraped.
pub(super) struct SidecarStats {
    pub(super) registry: prometheus_client::registry::Registry,
    pub(super) queue_depth: prometheus_client::metrics::gauge::Gauge,
    pub(super) busy: prometheus_client::metrics::gauge::Gauge,
    pub(super) outbox: prometheus_client::metrics::gauge::Gauge,
    pub(super) connected: prometheus_client::metrics::gauge::Gauge,
    pub(super) runs_started: prometheus_client::metrics::counter::Counter,
    pub(super) probe_failures: prometheus_client::metrics::counter::Counter,
    pub(super) reconnects: prometheus_client::metrics::counter::Counter,
    pub(super) wake_latency: prometheus_client::metrics::histogram::Histogram,
}

impl Default for SidecarStats {
    fn default() -> Self {
        use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
        let s = SidecarStats {
            registry: prometheus_client::registry::Registry::with_prefix("muster_sidecar"),
            queue_depth: Default::default(),
            busy: Default::default(),
            outbox: Default::default(),
            connected: Default::default(),
            runs_started: Default::default(),
            probe_failures: Default::default(),
            reconnects: Default::default(),
            wake_latency: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
        };
        let mut r = prometheus_client::registry::Registry::with_prefix("muster_sidecar");
        r.register(
            "queue_depth",
            "Tasks held by this sidecar",
            s.queue_depth.clone(),
        );
        r.register("busy_slots", "Slots in use", s.busy.clone());
        r.register(
            "outbox_depth",
            "Reports awaiting the hub's acknowledgement",
            s.outbox.clone(),
        );
        r.register(
            "connected",
            "1 while the hub session is up",
            s.connected.clone(),
        );
        r.register("runs_started", "Agent runs started", s.runs_started.clone());
        r.register(
            "probe_failures",
            "Runs that ended agent_exited: the agent was gone",
            s.probe_failures.clone(),
        );
        r.register(
            "reconnects",
            "Sessions established after the first",
            s.reconnects.clone(),
        );
        r.register(
            "wake_latency_seconds",
            "Start of a run to its verified start",
            s.wake_latency.clone(),
        );
        SidecarStats { registry: r, ..s }
    }
}

/// A `/metrics` or `/healthz` request to the daemon loop.
pub(super) type Scrape = oneshot::Sender<(bool, String)>;

pub(super) fn http_handler(tx: mpsc::Sender<Scrape>) -> muster_protocol::http::Handler {
    use muster_protocol::http::{PROMETHEUS, TEXT};
    Arc::new(move |path: String| {
        let tx = tx.clone();
        Box::pin(async move {
            let (otx, orx) = oneshot::channel();
            if tx.try_send(otx).is_err() {
                return (503, TEXT, "the sidecar loop is busy\n".into());
            }
            let Ok(Ok((healthy, metrics))) =
                tokio::time::timeout(Duration::from_secs(2), orx).await
            else {
                return (
                    503,
                    TEXT,
                    "unhealthy: the sidecar loop did not answer within 2 s\n".into(),
                );
            };
            match path.as_str() {
                "/metrics" => (200, PROMETHEUS, metrics),
                "/healthz" if healthy => (200, TEXT, "ok\n".into()),
                "/healthz" => (503, TEXT, "unhealthy: the queue is not writable\n".into()),
                _ => (404, TEXT, "try /metrics or /healthz\n".into()),
            }
        })
    })
}

impl Daemon {
    /// Renders the sidecar's metrics from its current state.
    pub(super) fn render_metrics(&self, core: &Core) -> String {
        let m = &self.stats;
        m.queue_depth.set(core.tasks().count() as i64);
        m.busy.set(core.busy() as i64);
        m.outbox.set(core.outbox().count() as i64);
        m.connected.set(i64::from(self.tx.is_some()));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &m.registry).is_err() {
            out.push_str("# encoding failed\n");
        }
        out
    }
}
