//! Small helpers: phase deadlines, percentiles, task submission, output.

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, bail};
use muster_protocol::msg::{OpRequest, SubmitRequest, TimeoutAction};
use serde_json::{Value, json};

use crate::hub::Ops;

/// Runs one phase of a mode under a deadline; exceeding it is an error naming the phase.
pub(crate) async fn phase<T>(
    name: &str,
    limit: Duration,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(|e| e.context(format!("phase {name:?}"))),
        Err(_) => bail!(
            "phase {name:?} did not finish within its deadline of {:.0} s",
            limit.as_secs_f64()
        ),
    }
}

/// p50 / p99 / max (nearest rank) of values in milliseconds, as JSON.
pub(crate) fn summary(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return json!({ "n": 0, "p50_ms": null, "p99_ms": null, "max_ms": null });
    }
    v.sort_by(f64::total_cmp);
    let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    json!({
        "n": v.len(),
        "p50_ms": round3(rank(0.50)),
        "p99_ms": round3(rank(0.99)),
        "max_ms": round3(v[v.len() - 1]),
        "mean_ms": round3(v.iter().sum::<f64>() / v.len() as f64),
    })
}

/// Rounds to three decimals for readable JSON.
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Milliseconds of a duration.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A bench task: a title and every other field at its default.
fn bench_task(title: String) -> SubmitRequest {
    SubmitRequest {
        title,
        description: String::new(),
        capabilities: Vec::new(),
        priority: 0,
        max_attempts: None,
        timeout_ms: None,
        timeout_action: TimeoutAction::Fail,
        after: Vec::new(),
        key: None,
        ..Default::default()
    }
}

/// Submits one bench task; returns its id.
pub(crate) async fn submit(ops: &Ops, title: String) -> Result<u64> {
    let v = ops.call(OpRequest::Submit(bench_task(title))).await?;
    match v["id"].as_u64() {
        Some(id) => Ok(id),
        None => bail!("submit answered without an id: {v}"),
    }
}

/// Submits one task per title in one `SubmitBatch`; returns their ids in order.
pub(crate) async fn submit_batch(ops: &Ops, titles: Vec<String>) -> Result<Vec<u64>> {
    let n = titles.len();
    let reqs = titles.into_iter().map(bench_task).collect();
    let v = ops.call(OpRequest::SubmitBatch(reqs)).await?;
    let ids: Option<Vec<u64>> = v["results"]
        .as_array()
        .map(|rs| rs.iter().map(|r| r["id"].as_u64()).collect())
        .unwrap_or(None);
    match ids {
        Some(ids) if ids.len() == n => Ok(ids),
        _ => bail!("the batch of {n} was not accepted whole: {v}"),
    }
}

/// A number from a stats document (0 if absent).
pub(crate) fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(0.0)
}

/// Prints the result: one JSON line, or an indented table.
pub(crate) fn print(v: &Value, as_json: bool) {
    if as_json {
        println!("{v}");
        return;
    }
    let mut out = String::new();
    table(&mut out, "", v);
    print!("{out}");
}

fn table(out: &mut String, prefix: &str, v: &Value) {
    match v {
        // A ratio to the floor on one line: figure ÷ floor = ratio.
        Value::Object(m) if prefix.starts_with("ratios.") && m.contains_key("ratio") => {
            let text = |k: &str| match &m[k] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push_str(&format!(
                "{prefix}\n    {} ({}) ÷ {} (floor.{}) = {}\n",
                text("value"),
                text("figure"),
                text("floor_value"),
                text("floor"),
                text("ratio")
            ));
        }
        Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                table(out, &key, x);
            }
        }
        other => out.push_str(&format!("{prefix:<44} {other}\n")),
    }
}
