//! Read-only operator queries served from the store after the batch commit, and
//! the `watch` streams fed from the event log.

use std::sync::atomic::Ordering;

use muster_protocol::msg::{OpError, OpErrorCode, OpRequest, OpResponse};
use muster_protocol::{EventSeq, TaskId};
use tokio::sync::mpsc;

use super::driver::Watcher;
use super::session::internal;
use crate::core::{Answer, Core, Stats, TaskState, views};
use crate::metrics::Counters;
use crate::store::{Store, StoreError, TaskFilter};

/// Most `watch` events sent per read of the log.
pub(super) const WATCH_PAGE: usize = 512;
/// Most attempts `task show` lists (newest first; the rest are counted).
pub(super) const ATTEMPTS_SHOWN_MAX: usize = 100;
/// The `stats` answer: the core's figures and the shell's message, byte and commit counts.
pub(super) fn render_stats(stats: &Stats, metrics: &Counters) -> OpResponse {
    let Ok(mut v) = serde_json::to_value(stats) else {
        return OpResponse::Error(OpError {
            code: OpErrorCode::Internal,
            message: "could not render the stats".into(),
        });
    };
    let finished = stats.finished.max(1) as f64;
    let msgs = metrics.msgs_in.load(Ordering::Relaxed) + metrics.msgs_out.load(Ordering::Relaxed);
    let bytes = metrics.bytes.load(Ordering::Relaxed);
    let commits = metrics.commits.load(Ordering::Relaxed);
    let writes = metrics.writes.load(Ordering::Relaxed);
    v["messages"] = msgs.into();
    v["bytes"] = bytes.into();
    v["messages_per_finished_task"] = (msgs as f64 / finished).into();
    v["bytes_per_finished_task"] = (bytes as f64 / finished).into();
    v["commits"] = commits.into();
    v["mean_group_size"] = (writes as f64 / commits.max(1) as f64).into();
    v["mean_commit_ms"] =
        (metrics.commit_us.load(Ordering::Relaxed) as f64 / commits.max(1) as f64 / 1000.0).into();
    OpResponse::Ok {
        json: v.to_string(),
    }
}

/// An answer of the core, as the JSON text of `OpResponse::Ok`.
pub(super) fn render_answer(answer: &Answer) -> OpResponse {
    match serde_json::to_string(answer) {
        Ok(json) => OpResponse::Ok { json },
        Err(e) => internal(&format!("could not render the answer: {e}")),
    }
}

/// Serves the read-only task queries from the store, after the batch's commit.
pub(super) fn query(
    core: &Core,
    store: &Store,
    fingerprint: &str,
    request: OpRequest,
    now: crate::core::Millis,
) -> OpResponse {
    if let Err(e) = core.authorize(fingerprint, &request) {
        return OpResponse::Error(e);
    }
    let result = (|| -> Result<OpResponse, StoreError> {
        let reader = store.reader()?;
        Ok(match request {
            OpRequest::TaskShow { id } => match reader.task(id)? {
                Some(t) => {
                    let mut v = views::task_json(&t);
                    let budget = views::REPLY_BYTES_MAX.saturating_sub(v.to_string().len());
                    let newest = reader.newest_attempts(id, ATTEMPTS_SHOWN_MAX)?;
                    let (mut attempts, left_out) =
                        views::fit(newest.iter().map(views::AttemptView::of), budget);
                    attempts.reverse();
                    v["attempt_history"] = serde_json::to_value(attempts).unwrap_or_default();
                    // Older attempts than those shown (by count or by size) are counted.
                    let older = t.generation.0.saturating_sub(newest.len() as u64);
                    v["attempts_not_shown"] = (left_out as u64 + older).into();
                    // The task's usage: every attempt's latest report, summed.
                    let mut usage: Option<muster_protocol::msg::Usage> = None;
                    for u in newest.iter().filter_map(|a| a.usage.as_ref()) {
                        usage.get_or_insert_with(Default::default).add(u);
                    }
                    v["usage"] = serde_json::to_value(
                        usage.as_ref().map(crate::core::usage::UsageView::from),
                    )
                    .unwrap_or_default();
                    // Why it is not running yet, if it is waiting.
                    if let Some(why) = core.waiting_reason(id, now) {
                        v["waiting"] = why.into();
                    }
                    // What the running attempt is doing: in the core's memory only.
                    v["activity"] =
                        serde_json::to_value(core.activity_view(id, now)).unwrap_or_default();
                    OpResponse::Ok {
                        json: v.to_string(),
                    }
                }
                None => not_found_task(id),
            },
            OpRequest::Tasks {
                state,
                agent,
                label,
                limit,
                cursor,
            } => {
                if let Some((k, _)) = &label
                    && let Err(message) = muster_protocol::work::check_label_key(k)
                {
                    return Ok(OpResponse::Error(OpError {
                        code: OpErrorCode::Invalid,
                        message: format!("--label: {message}"),
                    }));
                }
                let state = match state.as_deref().map(|s| (s, TaskState::parse(s))) {
                    Some((s, None)) => {
                        return Ok(OpResponse::Error(OpError {
                            code: OpErrorCode::Invalid,
                            message: format!(
                                "--state {s:?} is not a state; use one of blocked, queued, assigned, accepted, running, completed, failed, cancelled"
                            ),
                        }));
                    }
                    Some((_, Some(s))) => Some(s),
                    None => None,
                };
                let filter = TaskFilter {
                    state,
                    agent,
                    label,
                    ..TaskFilter::default()
                };
                tasks_page(core, &reader, &filter, (limit, cursor), now)?
            }
            _ => internal("not a query"),
        })
    })();
    result.unwrap_or_else(|e| internal(&format!("store: {e}")))
}

/// A page of tasks as the `tasks` answer: `tasks`, `next_cursor`, `truncated`.
pub(super) fn tasks_page(
    core: &Core,
    reader: &crate::store::Reader,
    filter: &TaskFilter,
    (limit, cursor): (u32, Option<u64>),
    now: crate::core::Millis,
) -> Result<OpResponse, StoreError> {
    let limit = limit.clamp(1, muster_protocol::limits::PAGE_LEN_MAX) as usize;
    let page = reader.tasks_matching(filter, limit, cursor)?;
    let (tasks, left_out) = views::fit(
        page.tasks.iter().map(|t| {
            let mut v = views::task_json(t);
            if !t.state.is_terminal()
                && let Some(why) = core.waiting_reason(t.id, now)
            {
                v["waiting"] = why.into();
            }
            v
        }),
        views::REPLY_BYTES_MAX,
    );
    // Cut short by size: the next page starts below the last task shown.
    let next_cursor = if left_out > 0 {
        tasks.last().and_then(|t| t["id"].as_u64())
    } else {
        page.next_cursor
    };
    Ok(OpResponse::Ok {
        json: serde_json::json!({
            "tasks": tasks,
            "next_cursor": next_cursor,
            "truncated": left_out > 0,
        })
        .to_string(),
    })
}

/// The `tasks` listing with every filter (the HTTP API's and the dashboard's),
/// authorized as `tasks`.
pub(super) fn tasks_query(
    core: &Core,
    store: &Store,
    fingerprint: &str,
    (filter, limit, cursor): (TaskFilter, u32, Option<u64>),
    now: crate::core::Millis,
) -> OpResponse {
    let as_request = OpRequest::Tasks {
        state: None,
        agent: None,
        label: None,
        limit,
        cursor,
    };
    if let Err(e) = core.authorize(fingerprint, &as_request) {
        return OpResponse::Error(e);
    }
    store
        .reader()
        .and_then(|r| tasks_page(core, &r, &filter, (limit, cursor), now))
        .unwrap_or_else(|e| internal(&format!("store: {e}")))
}

pub(super) fn not_found_task(id: TaskId) -> OpResponse {
    OpResponse::Error(OpError {
        code: OpErrorCode::NotFound,
        message: format!("no task {id}; `muster-hub tasks` lists them"),
    })
}

pub(super) fn start_watch(
    core: &Core,
    store: &Store,
    fingerprint: String,
    tx: mpsc::Sender<OpResponse>,
    from: Option<EventSeq>,
    watchers: &mut Vec<Watcher>,
) {
    if let Err(e) = core.authorize(&fingerprint, &OpRequest::Watch { from }) {
        let _ = tx.try_send(OpResponse::Error(e));
        return;
    }
    let Ok(reader) = store.reader() else { return };
    let last = reader.last_event().ok().flatten().unwrap_or(0);
    let next = match from {
        None => last + 1,
        Some(EventSeq(seq)) => {
            let oldest = reader.events(0, 1).ok().and_then(|(_, o)| o).unwrap_or(1);
            if seq < oldest {
                // Pruned: say so, then send a fresh snapshot and continue from now.
                let note =
                    serde_json::json!({"kind": "pruned", "requested": seq, "oldest": oldest});
                let _ = tx.try_send(OpResponse::Event {
                    seq: EventSeq(0),
                    json: note.to_string(),
                });
                snapshot(&reader, &tx);
                last + 1
            } else {
                seq
            }
        }
    };
    watchers.push(Watcher {
        fingerprint,
        tx,
        next,
    });
}

pub(super) fn snapshot(reader: &crate::store::Reader, tx: &mpsc::Sender<OpResponse>) {
    for state in TaskState::ALL.iter().filter(|s| !s.is_terminal()) {
        if let Ok(page) = reader.tasks(Some(*state), None, None, 1000, None) {
            for t in page.tasks {
                let mut v = views::task_json(&t);
                v["kind"] = "snapshot_task".into();
                let _ = tx.try_send(OpResponse::Event {
                    seq: EventSeq(0),
                    json: v.to_string(),
                });
            }
        }
    }
}

pub(super) fn feed_watchers(core: &Core, store: &Store, watchers: &mut Vec<Watcher>) {
    if watchers.is_empty() {
        return;
    }
    let Ok(reader) = store.reader() else { return };
    let watch = OpRequest::Watch { from: None };
    watchers.retain_mut(|w| {
        // A credential that expired (an API token) ends its stream as a revoked one does.
        if w.tx.is_closed() || core.authorize(&w.fingerprint, &watch).is_err() {
            return false;
        }
        let room = w.tx.capacity().min(WATCH_PAGE);
        let Ok((events, _)) = reader.events(w.next, room) else {
            return true;
        };
        for e in events {
            let msg = OpResponse::Event {
                seq: EventSeq(e.seq),
                json: e.json,
            };
            if w.tx.try_send(msg).is_err() {
                return true;
            }
            w.next = e.seq + 1;
        }
        true
    });
}
