//! The sidecar's metrics and its `/metrics`, `/livez` and `/readyz` endpoint
//! (`/healthz` is `/readyz`): counters and histograms updated as events pass,
//! gauges set from the core when scraped. The HTTP task only asks the daemon
//! loop, which owns the state.
//!
//! `/livez`: the loop answers. `/readyz`: the queue is writable (a write probe
//! made at most once per [`PROBE_EVERY`], however often it is asked) and the
//! hub session is up: a sidecar that cannot reach its hub gets no work, and a
//! load balancer or supervisor should know.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use muster_protocol::msg::{ReportBody, SessionMsg};
use muster_protocol::{Generation, TaskId};
use tokio::sync::{mpsc, oneshot};

use super::Daemon;
use crate::core::{Core, Effect};

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
    pub(super) self_test: prometheus_client::metrics::gauge::Gauge,
    pub(super) runs_ended: prometheus_client::metrics::family::Family<
        Vec<(&'static str, String)>,
        prometheus_client::metrics::counter::Counter,
    >,
    pub(super) run_duration: prometheus_client::metrics::histogram::Histogram,
    pub(super) process: muster_protocol::procstat::ProcessMetrics,
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
            self_test: Default::default(),
            runs_ended: Default::default(),
            // 0.1 s to about 14 h.
            run_duration: Histogram::new(exponential_buckets(0.1, 2.0, 20)),
            process: Default::default(),
        };
        // The root holds the standard `process_*` families; ours are under `muster_sidecar_`.
        let mut root = prometheus_client::registry::Registry::default();
        s.process.register(&mut root);
        let r = root.sub_registry_with_prefix("muster_sidecar");
        muster_protocol::procstat::register_build_info(r, env!("CARGO_PKG_VERSION"));
        r.register(
            "self_test_passed",
            "1 while the last self-test passed (command, disk, hub round trip), else 0",
            s.self_test.clone(),
        );
        r.register(
            "runs_ended",
            "Agent runs ended, by outcome",
            s.runs_ended.clone(),
        );
        r.register(
            "run_duration_seconds",
            "From a run's spawn to its end",
            s.run_duration.clone(),
        );
        for o in muster_protocol::msg::Outcome::ALL {
            let _ = s
                .runs_ended
                .get_or_create(&vec![("outcome", o.as_str().to_string())]);
        }
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
        SidecarStats {
            registry: root,
            ..s
        }
    }
}

/// How long a verdict of the queue's write probe stays good.
pub(super) const PROBE_EVERY: Duration = Duration::from_secs(5);

/// What the loop answers an HTTP request with.
#[derive(Debug)]
pub(super) struct Answer {
    /// Whether the queue is writable, or why not.
    pub(super) writable: Result<(), String>,
    /// Whether the hub session is up.
    pub(super) connected: bool,
    /// The metrics text.
    pub(super) metrics: String,
}

/// A `/metrics`, `/livez` or `/readyz` request to the daemon loop.
pub(super) type Scrape = oneshot::Sender<Answer>;

pub(super) fn http_handler(tx: mpsc::Sender<Scrape>) -> muster_protocol::http::Handler {
    use muster_protocol::http::{PROMETHEUS, TEXT};
    Arc::new(move |path: String| {
        let tx = tx.clone();
        Box::pin(async move {
            let (otx, orx) = oneshot::channel();
            if tx.try_send(otx).is_err() {
                return (503, TEXT, "the sidecar loop is busy\n".into());
            }
            let Ok(Ok(a)) = tokio::time::timeout(Duration::from_secs(2), orx).await else {
                return (
                    503,
                    TEXT,
                    "unhealthy: the sidecar loop did not answer within 2 s\n".into(),
                );
            };
            match path.as_str() {
                "/metrics" => (200, PROMETHEUS, a.metrics),
                "/livez" => (200, TEXT, "ok: the sidecar loop answers\n".into()),
                "/readyz" | "/healthz" => match (&a.writable, a.connected) {
                    (Ok(()), true) => (200, TEXT, "ok: queue writable, hub connected\n".into()),
                    (Err(e), _) => (
                        503,
                        TEXT,
                        format!("not ready: the queue is not writable: {e}\n"),
                    ),
                    (Ok(()), false) => (
                        503,
                        TEXT,
                        "not ready: not connected to the hub (see the sidecar's log)\n".into(),
                    ),
                },
                _ => (404, TEXT, "try /metrics, /livez or /readyz\n".into()),
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
        m.self_test.set(i64::from(self.last_self_test.passed));
        m.process.update();
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &m.registry).is_err() {
            out.push_str("# encoding failed\n");
        }
        muster_protocol::http::openmetrics_to_text(&out)
    }
}

/// When each run was started, until its start is reported or its task is
/// forgotten: the wake latency histogram's input. Fed from the core's effects,
/// because a start verified by the agent itself (`verify = agent-ack`) and an
/// attempt that ends without starting never pass the runner's `Started`.
#[derive(Debug, Default)]
pub(super) struct WakeClock {
    started: HashMap<(TaskId, Generation), Instant>,
}

impl WakeClock {
    /// Notes one effect the core asked for at `now`; returns the wake latency
    /// when it reports an attempt's start.
    pub(super) fn observe(&mut self, effect: &Effect, now: Instant) -> Option<Duration> {
        match effect {
            Effect::StartRun(task, generation, _) => {
                self.started.insert((*task, *generation), now);
                None
            }
            Effect::Send(SessionMsg::Report(r)) => match r.body {
                ReportBody::Started { .. } | ReportBody::Ran { .. } => self
                    .started
                    .remove(&(r.task, r.generation))
                    .map(|at| now.saturating_duration_since(at)),
                ReportBody::Finished { .. } => {
                    self.started.remove(&(r.task, r.generation));
                    None
                }
                ReportBody::Accepted | ReportBody::Progress { .. } | ReportBody::Usage(_) => None,
            },
            Effect::DeleteTask(task, generation) => {
                self.started.remove(&(*task, *generation));
                None
            }
            _ => None,
        }
    }

    /// Attempts whose start is still awaited.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.started.len()
    }
}

#[cfg(test)]
mod tests {
    use muster_protocol::msg::{Assign, HubMsg, TaskSpec};
    use muster_protocol::{ReportId, TaskId};

    use super::*;
    use crate::core::{AgentCmd, Core, Policy};

    fn assign(task: u64) -> HubMsg {
        HubMsg::Assign(Assign {
            task: TaskId(task),
            generation: Generation(1),
            spec: TaskSpec {
                title: "t".into(),
                description: String::new(),
                capabilities: vec![],
                priority: 0,
                timeout_ms: None,
                ..Default::default()
            },
        })
    }

    fn feed(clock: &mut WakeClock, core: &mut Core) -> Vec<Duration> {
        let now = Instant::now();
        core.take_effects()
            .iter()
            .filter_map(|e| clock.observe(e, now))
            .collect()
    }

    fn core() -> Core {
        let policy = Policy {
            slots: 4,
            ..Policy::default()
        };
        Core::new(vec![], vec![], 1, policy, 1)
    }

    #[test]
    fn an_agent_acknowledged_start_leaves_no_entry_behind() {
        let (mut core, mut clock) = (core(), WakeClock::default());
        core.handle_hub(Duration::ZERO, assign(1));
        assert!(feed(&mut clock, &mut core).is_empty());
        assert_eq!(clock.len(), 1, "the run's start is awaited");
        // verify = agent-ack: the start comes over the local socket, not from the runner.
        let g = Generation(1);
        core.handle_agent(Duration::ZERO, TaskId(1), g, AgentCmd::Start)
            .expect("start");
        assert_eq!(feed(&mut clock, &mut core).len(), 1, "one latency observed");
        core.handle_agent(
            Duration::ZERO,
            TaskId(1),
            g,
            AgentCmd::Complete {
                result: None,
                link: None,
            },
        )
        .expect("complete");
        core.handle_hub(Duration::ZERO, HubMsg::Ack { upto: ReportId(9) });
        feed(&mut clock, &mut core);
        assert_eq!(clock.len(), 0);
    }

    #[test]
    fn attempts_that_end_unstarted_leave_no_entry_behind() {
        let (mut core, mut clock) = (core(), WakeClock::default());
        // One completes with no start report (the agent completes at once), one
        // is abandoned before it starts.
        core.handle_hub(Duration::ZERO, assign(1));
        core.handle_hub(Duration::ZERO, assign(2));
        feed(&mut clock, &mut core);
        assert_eq!(clock.len(), 2);
        core.handle_hub(
            Duration::ZERO,
            HubMsg::Abandon {
                task: TaskId(2),
                generation: Generation(1),
                reason: "reassigned".into(),
            },
        );
        core.handle_agent(
            Duration::ZERO,
            TaskId(1),
            Generation(1),
            AgentCmd::Fail {
                reason: "no".into(),
                no_retry: false,
            },
        )
        .expect("fail");
        feed(&mut clock, &mut core);
        assert_eq!(clock.len(), 0);
    }
}
