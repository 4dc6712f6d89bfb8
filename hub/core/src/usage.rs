//! Tokens and cost, summed: over the fleet, per agent and per label, for
//! `stats` and `/metrics`. Each attempt's latest cumulative report is kept in
//! its record; here only the growth between reports is added, so a repeated
//! or replayed report adds nothing. In memory, like the other counters: they
//! start again at zero when the hub does (Prometheus counters may).

use std::collections::BTreeMap;

use muster_wire::msg::Usage;
use serde::Serialize;

/// Distinct `key=value` labels summed one by one; the usage of tasks with
/// other labels is summed under [`LABEL_OTHER`], so the metrics' series stay
/// bounded (64 × 5 series at most).
pub const LABELS_MAX: usize = 64;
/// The label bucket for every label past the first [`LABELS_MAX`].
pub const LABEL_OTHER: &str = "other";

/// Usage summed three ways.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageTotals {
    /// Over every attempt.
    pub total: Usage,
    /// Per agent (bounded by the registry).
    pub by_agent: BTreeMap<String, Usage>,
    /// Per `key=value` label, the first [`LABELS_MAX`] seen, then [`LABEL_OTHER`].
    pub by_label: BTreeMap<String, Usage>,
}

impl UsageTotals {
    /// Adds the growth of one attempt's usage, on `agent`, for a task with `labels`.
    pub fn count(&mut self, agent: &str, labels: &[(String, String)], growth: &Usage) {
        add(&mut self.total, growth);
        add(self.by_agent.entry(agent.to_string()).or_default(), growth);
        for (k, v) in labels {
            let name = format!("{k}={v}");
            let key = if self.by_label.contains_key(&name) || self.by_label.len() < LABELS_MAX {
                name
            } else {
                LABEL_OTHER.to_string()
            };
            add(self.by_label.entry(key).or_default(), growth);
        }
    }
}

/// Adds the figures; a sum has no one model.
fn add(sum: &mut Usage, growth: &Usage) {
    sum.add(growth);
    sum.model = None;
}

/// [`Usage`] as JSON documents show it, keys in alphabetical order, with the
/// cost in dollars beside the exact micro-dollars.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageView {
    cache_read_tokens: u64,
    cache_write_tokens: u64,
    cost_micro_usd: Option<u64>,
    cost_usd: Option<f64>,
    input_tokens: u64,
    model: Option<String>,
    output_tokens: u64,
}

impl From<&Usage> for UsageView {
    fn from(u: &Usage) -> Self {
        // Every field, named: a new one fails to compile here until it is shown.
        let Usage {
            model,
            input_tokens,
            output_tokens,
            cache_read_tokens,
            cache_write_tokens,
            cost_micro_usd,
        } = u;
        UsageView {
            cache_read_tokens: *cache_read_tokens,
            cache_write_tokens: *cache_write_tokens,
            cost_micro_usd: *cost_micro_usd,
            cost_usd: cost_micro_usd.map(|c| c as f64 / 1e6),
            input_tokens: *input_tokens,
            model: model.clone(),
            output_tokens: *output_tokens,
        }
    }
}

/// The `usage` part of `stats`: keys in alphabetical order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageStats {
    /// Per agent.
    pub by_agent: BTreeMap<String, UsageView>,
    /// Per label.
    pub by_label: BTreeMap<String, UsageView>,
    /// Over every attempt.
    pub total: UsageView,
}

impl From<&UsageTotals> for UsageStats {
    fn from(t: &UsageTotals) -> Self {
        let views = |m: &BTreeMap<String, Usage>| {
            m.iter()
                .map(|(k, u)| (k.clone(), UsageView::from(u)))
                .collect()
        };
        UsageStats {
            by_agent: views(&t.by_agent),
            by_label: views(&t.by_label),
            total: UsageView::from(&t.total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(input: u64, cost: Option<u64>) -> Usage {
        Usage {
            input_tokens: input,
            cost_micro_usd: cost,
            ..Usage::default()
        }
    }

    #[test]
    fn sums_per_agent_and_label_with_a_bounded_label_set() {
        let mut t = UsageTotals::default();
        let labels = |i: usize| vec![("team".to_string(), format!("t{i}"))];
        for i in 0..LABELS_MAX + 10 {
            t.count("a", &labels(i), &tokens(1, Some(10)));
        }
        t.count("b", &labels(0), &tokens(5, None));
        assert_eq!(t.total.input_tokens, LABELS_MAX as u64 + 15);
        assert_eq!(t.total.cost_micro_usd, Some(10 * (LABELS_MAX as u64 + 10)));
        assert_eq!(t.by_agent["b"].input_tokens, 5);
        assert_eq!(t.by_agent["b"].cost_micro_usd, None);
        assert_eq!(t.by_label.len(), LABELS_MAX + 1);
        assert_eq!(t.by_label[LABEL_OTHER].input_tokens, 10);
        assert_eq!(t.by_label["team=t0"].input_tokens, 6);
    }

    #[test]
    fn growth_between_cumulative_reports_adds_once() {
        let first = tokens(100, Some(1_000));
        let second = tokens(250, Some(2_500));
        let g = second.growth_since(&first);
        assert_eq!((g.input_tokens, g.cost_micro_usd), (150, Some(1_500)));
        let again = second.growth_since(&second);
        assert_eq!((again.input_tokens, again.cost_micro_usd), (0, Some(0)));
        let smaller = first.growth_since(&second);
        assert_eq!(smaller.input_tokens, 0, "never below zero");
    }
}
