//! The hub's Prometheus metrics. Histograms are observed by the core loop as it
//! commits; gauges and totals are filled from a core [`Snapshot`] when scraped,
//! so a busy hub pays nothing per task for them.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::core::{Snapshot, TaskState};

type Labels = Vec<(&'static str, String)>;

/// Every metric the hub exports.
pub struct HubMetrics {
    registry: Registry,
    tasks: Family<Labels, Gauge>,
    finished: Family<Labels, Counter>,
    agents: Family<Labels, Gauge>,
    alerts: Family<Labels, Gauge>,
    attempts: Family<Labels, Counter>,
    heartbeats: Counter,
    /// Tokens reported, by agent and kind (bounded by the registry).
    usage_tokens: Family<Labels, Counter>,
    /// Cost reported in micro-dollars (exact), by agent.
    usage_cost: Family<Labels, Counter>,
    /// Tokens reported, by label and kind (at most 65 labels: see `usage::LABELS_MAX`).
    label_tokens: Family<Labels, Counter>,
    /// Cost reported in micro-dollars, by label.
    label_cost: Family<Labels, Counter>,
    messages: Counter,
    bytes: Counter,
    sessions_opened: Counter,
    sessions_refused: Counter,
    enrollments: Family<Labels, Counter>,
    process: muster_protocol::procstat::ProcessMetrics,
    /// Submit → running, seconds.
    pub dispatch: Histogram,
    /// Commit latency, seconds.
    pub commit: Histogram,
    /// Writes per commit.
    pub group: Histogram,
    /// Commits made.
    pub commits: Counter,
    /// 1: this hub serves (a standby answers 0 from its own endpoint).
    leader: Gauge,
}

impl Default for HubMetrics {
    fn default() -> Self {
        // The root holds the standard `process_*` families; ours are under `muster_`.
        let mut root = Registry::default();
        let m = HubMetrics {
            tasks: Family::default(),
            finished: Family::default(),
            agents: Family::default(),
            alerts: Family::default(),
            attempts: Family::default(),
            heartbeats: Counter::default(),
            usage_tokens: Family::default(),
            usage_cost: Family::default(),
            label_tokens: Family::default(),
            label_cost: Family::default(),
            messages: Counter::default(),
            bytes: Counter::default(),
            sessions_opened: Counter::default(),
            sessions_refused: Counter::default(),
            enrollments: Family::default(),
            process: Default::default(),
            dispatch: Histogram::new(exponential_buckets(0.0005, 2.0, 20)),
            commit: Histogram::new(exponential_buckets(0.00005, 2.0, 18)),
            group: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            commits: Counter::default(),
            leader: Gauge::default(),
            registry: Registry::default(),
        };
        m.leader.set(1);
        m.process.register(&mut root);
        let registry = root.sub_registry_with_prefix("muster");
        muster_protocol::procstat::register_build_info(registry, env!("CARGO_PKG_VERSION"));
        registry.register(
            "sessions_opened",
            "Sidecar sessions welcomed since the hub started",
            m.sessions_opened.clone(),
        );
        registry.register(
            "sessions_refused",
            "Sidecar hellos refused since the hub started (unknown or revoked certificate, bad hello)",
            m.sessions_refused.clone(),
        );
        registry.register(
            "enrollments",
            "Enrollments since the hub started, by result (enrolled, refused)",
            m.enrollments.clone(),
        );
        registry.register(
            "cluster_leader",
            "Whether this hub leads its cluster (a hub on redb always does)",
            m.leader.clone(),
        );
        registry.register("tasks", "Live tasks by state", m.tasks.clone());
        registry.register(
            "tasks_finished",
            "Tasks that reached a terminal state since the hub started, by state",
            m.finished.clone(),
        );
        registry.register("agents", "Agents by derived state", m.agents.clone());
        registry.register("alerts_open", "Open alerts by kind", m.alerts.clone());
        registry.register(
            "attempts_ended",
            "Attempts ended since the hub started, by outcome",
            m.attempts.clone(),
        );
        registry.register(
            "heartbeats_received",
            "Heartbeats received since the hub started",
            m.heartbeats.clone(),
        );
        registry.register(
            "usage_tokens",
            "Tokens the agents' usage reports and transcripts counted, by agent and kind",
            m.usage_tokens.clone(),
        );
        registry.register(
            "usage_cost_micro_usd",
            "Cost the agents' usage reports and transcripts counted, in millionths of a dollar, by agent",
            m.usage_cost.clone(),
        );
        registry.register(
            "label_usage_tokens",
            "Tokens by task label (key=value; past the first 64 labels, \"other\") and kind",
            m.label_tokens.clone(),
        );
        registry.register(
            "label_usage_cost_micro_usd",
            "Cost in millionths of a dollar by task label",
            m.label_cost.clone(),
        );
        registry.register(
            "protocol_messages",
            "Session messages, heartbeats apart, since the hub started",
            m.messages.clone(),
        );
        registry.register(
            "protocol_bytes",
            "Bytes of those messages, framing included",
            m.bytes.clone(),
        );
        registry.register(
            "dispatch_latency_seconds",
            "Submit to running",
            m.dispatch.clone(),
        );
        registry.register(
            "commit_latency_seconds",
            "Durable commit of one batch",
            m.commit.clone(),
        );
        registry.register("commit_group_size", "Writes per commit", m.group.clone());
        registry.register("commits", "Durable commits", m.commits.clone());
        // Every label known in advance is exported from the start, at 0, so a query
        // for a kind that never happened returns 0 rather than nothing.
        for o in muster_protocol::msg::Outcome::ALL {
            let _ = m
                .attempts
                .get_or_create(&vec![("outcome", o.as_str().to_string())]);
        }
        for t in TaskState::ALL.iter().filter(|t| t.is_terminal()) {
            let _ = m
                .finished
                .get_or_create(&vec![("state", t.as_str().to_string())]);
        }
        for result in ["enrolled", "refused"] {
            let _ = m
                .enrollments
                .get_or_create(&vec![("result", result.to_string())]);
        }
        HubMetrics {
            registry: root,
            ..m
        }
    }
}

/// Raises a counter to `total` (counters only go up; the core's totals only grow).
fn advance(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

impl HubMetrics {
    /// Fills the gauges from a snapshot and the shell's counters, and renders the text format.
    pub fn render(&self, snap: &Snapshot, shell: &Counters) -> String {
        for (state, n) in &snap.tasks {
            self.tasks
                .get_or_create(&vec![("state", state.as_str().to_string())])
                .set(*n as i64);
        }
        for (state, n) in &snap.counters.finished_by_state {
            advance(
                &self
                    .finished
                    .get_or_create(&vec![("state", state.as_str().to_string())]),
                *n,
            );
        }
        for (state, n) in &snap.agents {
            self.agents
                .get_or_create(&vec![("state", state.as_str().to_string())])
                .set(*n as i64);
        }
        for (kind, n) in &snap.alerts {
            self.alerts
                .get_or_create(&vec![("kind", kind.as_str().to_string())])
                .set(*n as i64);
        }
        for (outcome, n) in &snap.counters.outcomes {
            advance(
                &self
                    .attempts
                    .get_or_create(&vec![("outcome", outcome.as_str().to_string())]),
                *n,
            );
        }
        advance(&self.heartbeats, snap.counters.heartbeats);
        let usage = &snap.counters.usage;
        for (key, tokens, cost, map) in [
            (
                "agent",
                &self.usage_tokens,
                &self.usage_cost,
                &usage.by_agent,
            ),
            (
                "label",
                &self.label_tokens,
                &self.label_cost,
                &usage.by_label,
            ),
        ] {
            for (name, u) in map {
                for (kind, n) in [
                    ("input", u.input_tokens),
                    ("output", u.output_tokens),
                    ("cache_read", u.cache_read_tokens),
                    ("cache_write", u.cache_write_tokens),
                ] {
                    let labels = vec![(key, name.clone()), ("kind", kind.to_string())];
                    advance(&tokens.get_or_create(&labels), n);
                }
                if let Some(c) = u.cost_micro_usd {
                    advance(&cost.get_or_create(&vec![(key, name.clone())]), c);
                }
            }
        }
        let msgs = shell.msgs_in.load(Ordering::Relaxed) + shell.msgs_out.load(Ordering::Relaxed);
        let bytes = shell.bytes.load(Ordering::Relaxed);
        advance(&self.messages, msgs);
        advance(&self.bytes, bytes);
        // Ratios (messages per finished task, say) are left to PromQL:
        // muster_protocol_messages_total / sum(muster_tasks_finished_total).
        advance(&self.sessions_opened, snap.counters.sessions_opened);
        advance(&self.sessions_refused, snap.counters.sessions_refused);
        for (result, n) in [
            ("enrolled", snap.counters.enrollments),
            ("refused", snap.counters.enrollments_refused),
        ] {
            advance(
                &self
                    .enrollments
                    .get_or_create(&vec![("result", result.to_string())]),
                n,
            );
        }
        self.process.update();
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.push_str("# encoding failed\n");
        }
        muster_protocol::http::openmetrics_to_text(&out)
    }
}

/// Shared counters, for `stats` and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Session messages received, heartbeats apart.
    pub msgs_in: AtomicU64,
    /// Session messages sent.
    pub msgs_out: AtomicU64,
    /// Bytes of the above, framing included.
    pub bytes: AtomicU64,
    /// Commits made.
    pub commits: AtomicU64,
    /// Writes committed.
    pub writes: AtomicU64,
    /// Total commit time, microseconds.
    pub commit_us: AtomicU64,
}
