//! The sidecar's durable queue (redb).
//!
//! ```text
//! meta    &str   -> u64         schema_version, next_report
//! tasks   u64    -> LocalTask   tasks held, with phase and run handle
//! outbox  u64    -> Report      reports not yet acknowledged by the hub
//! ```
//!
//! [`Queue::apply`] writes one batch of core effects in one durable transaction.

use std::collections::BTreeMap;
use std::path::Path;

use muster_protocol::msg::Report;
use muster_protocol::{decode, encode};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::core::{Effect, LocalTask};

/// The schema this build writes; older files are migrated on open.
///
/// 2: task specs carry a repository, base and environment; finished reports the work result.
/// 3: the outbox may hold `Ran` reports (an attempt's start and end in one),
/// which a build of schema 2 cannot read; nothing else changed.
pub const SCHEMA_VERSION: u64 = 3;
/// The database file in the data directory.
pub const DB_FILE: &str = "sidecar.redb";

/// How a batch commits is the core's decision (it also decides when run
/// directories may go); the queue applies it.
pub use crate::core::{CommitKind, commit_kind};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Commits made by every queue of this process, flushed and unflushed: a
/// benchmark that runs many sidecars in one process reads its commits per
/// task here (a daemon's own `/metrics` are per process anyway).
static COMMITS: [std::sync::atomic::AtomicU64; 2] = [
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
];

/// Queue commits made in this process so far: (flushed, unflushed).
pub fn commits_in_process() -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (COMMITS[0].load(Relaxed), COMMITS[1].load(Relaxed))
}
const TASKS: TableDefinition<u64, &[u8]> = TableDefinition::new("tasks");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

/// A queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// redb failed.
    #[error("sidecar database: {0}")]
    Db(String),
    /// A record does not decode.
    #[error("sidecar database: a record in {0} does not decode ({1}); the file is damaged")]
    Corrupt(&'static str, String),
    /// A newer build wrote the file.
    #[error(
        "sidecar database has schema version {0}, newer than this build's {SCHEMA_VERSION}; run the newer muster-sidecar"
    )]
    TooNew(u64),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for QueueError {
            fn from(e: $t) -> Self {
                QueueError::Db(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Schema 1 → 2: a held task's spec gains `repo`, `base` and `env` (empty), a
/// `Finished` report gains `work` (none). Read with private copies of the old
/// types, written in the new form, in the open's one transaction: a crash
/// leaves the old file and version, and the next open migrates again. A
/// sidecar holds at most its slots and their reports, so this is small.
fn migrate_v1(tx: &redb::WriteTransaction) -> Result<(), QueueError> {
    use muster_protocol::msg::{Failure, Outcome, Phase, ReportBody, TaskSpec};
    use muster_protocol::{Generation, ReportId, TaskId};

    use crate::agent::RunHandle;

    #[derive(serde::Deserialize)]
    struct TaskSpecV1 {
        title: String,
        description: String,
        capabilities: Vec<String>,
        priority: i32,
        timeout_ms: Option<u64>,
    }
    #[derive(serde::Deserialize)]
    struct LocalTaskV1 {
        task: TaskId,
        generation: Generation,
        spec: TaskSpecV1,
        phase: Phase,
        handle: Option<RunHandle>,
    }
    #[derive(serde::Deserialize)]
    enum ReportBodyV1 {
        Accepted,
        Started {
            pid: Option<u32>,
            session: Option<String>,
        },
        Progress {
            note: String,
        },
        Finished {
            outcome: Outcome,
            result: Option<String>,
            error: Option<Failure>,
        },
    }
    #[derive(serde::Deserialize)]
    struct ReportV1 {
        id: ReportId,
        task: TaskId,
        generation: Generation,
        body: ReportBodyV1,
    }

    let mut tasks = tx.open_table(TASKS)?;
    let old: Vec<(u64, LocalTaskV1)> = tasks
        .iter()?
        .map(|row| {
            let (k, v) = row?;
            let t = decode(v.value()).map_err(|e| QueueError::Corrupt("tasks", e.to_string()))?;
            Ok((k.value(), t))
        })
        .collect::<Result<_, QueueError>>()?;
    for (k, t) in old {
        let new = LocalTask {
            task: t.task,
            generation: t.generation,
            spec: TaskSpec {
                title: t.spec.title,
                description: t.spec.description,
                capabilities: t.spec.capabilities,
                priority: t.spec.priority,
                timeout_ms: t.spec.timeout_ms,
                repo: None,
                base: None,
                env: Vec::new(),
            },
            phase: t.phase,
            handle: t.handle,
        };
        let bytes = encode(&new).map_err(|e| QueueError::Db(e.to_string()))?;
        tasks.insert(k, bytes.as_slice())?;
    }
    let mut outbox = tx.open_table(OUTBOX)?;
    let old: Vec<(u64, ReportV1)> = outbox
        .iter()?
        .map(|row| {
            let (k, v) = row?;
            let r = decode(v.value()).map_err(|e| QueueError::Corrupt("outbox", e.to_string()))?;
            Ok((k.value(), r))
        })
        .collect::<Result<_, QueueError>>()?;
    for (k, r) in old {
        let body = match r.body {
            ReportBodyV1::Accepted => ReportBody::Accepted,
            ReportBodyV1::Started { pid, session } => ReportBody::Started { pid, session },
            ReportBodyV1::Progress { note } => ReportBody::Progress { note },
            ReportBodyV1::Finished {
                outcome,
                result,
                error,
            } => ReportBody::Finished {
                outcome,
                result,
                error,
                work: None,
            },
        };
        let new = Report {
            id: r.id,
            task: r.task,
            generation: r.generation,
            body,
        };
        let bytes = encode(&new).map_err(|e| QueueError::Db(e.to_string()))?;
        outbox.insert(k, bytes.as_slice())?;
    }
    Ok(())
}

/// What the queue held at startup.
pub struct Loaded {
    /// Tasks held.
    pub tasks: Vec<LocalTask>,
    /// Unacknowledged reports.
    pub outbox: Vec<Report>,
    /// The next report id.
    pub next_report: u64,
}

/// The sidecar's redb database.
pub struct Queue {
    db: Database,
}

impl Queue {
    /// Opens or creates the database and checks its schema.
    ///
    /// # Errors
    /// [`QueueError`] when it cannot be opened or is from a newer build.
    pub fn open(path: &Path) -> Result<Queue, QueueError> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let found = meta.get("schema_version")?.map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => return Err(QueueError::TooNew(v)),
                Some(v) if v < SCHEMA_VERSION => {
                    drop(meta);
                    if v == 1 {
                        migrate_v1(&tx)?;
                    }
                    // 2 → 3 rewrites nothing: schema 2 rows read as they are.
                    tx.open_table(META)?
                        .insert("schema_version", SCHEMA_VERSION)?;
                }
                Some(_) => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
            }
            tx.open_table(TASKS)?;
            tx.open_table(OUTBOX)?;
        }
        tx.commit()?;
        Ok(Queue { db })
    }

    /// Reads everything back.
    ///
    /// # Errors
    /// [`QueueError`] on a read or decode failure.
    pub fn load(&self) -> Result<Loaded, QueueError> {
        let tx = self.db.begin_read()?;
        let mut tasks = Vec::new();
        for row in tx.open_table(TASKS)?.iter()? {
            let v = row?.1;
            tasks.push(decode(v.value()).map_err(|e| QueueError::Corrupt("tasks", e.to_string()))?);
        }
        let mut outbox = Vec::new();
        for row in tx.open_table(OUTBOX)?.iter()? {
            let v = row?.1;
            outbox
                .push(decode(v.value()).map_err(|e| QueueError::Corrupt("outbox", e.to_string()))?);
        }
        let next_report = tx
            .open_table(META)?
            .get("next_report")?
            .map(|v| v.value())
            .unwrap_or(1);
        Ok(Loaded {
            tasks,
            outbox,
            next_report,
        })
    }

    /// Applies the store effects of one batch in one durable transaction.
    ///
    /// # Errors
    /// [`QueueError`] when the commit fails; then nothing of the batch is durable.
    pub fn apply(&self, effects: &[Effect]) -> Result<(), QueueError> {
        let durability = match commit_kind(effects) {
            CommitKind::Nothing => return Ok(()),
            CommitKind::Unflushed => Durability::None,
            CommitKind::Flushed => Durability::Immediate,
        };
        // Only the last write of each row counts (a batch accepts, starts and
        // finishes a task, and a held forget may precede a new assignment of the
        // same task), and rows go in in key order.
        let mut task_rows: BTreeMap<u64, Option<&LocalTask>> = BTreeMap::new();
        let mut report_rows: BTreeMap<u64, Option<&Report>> = BTreeMap::new();
        let mut next_report = None;
        for e in effects {
            match e {
                Effect::PutTask(t) => {
                    task_rows.insert(t.task.0, Some(t));
                }
                Effect::DeleteTask(id, _) => {
                    task_rows.insert(id.0, None);
                }
                Effect::PutReport(r) => {
                    report_rows.insert(r.id.0, Some(r));
                }
                Effect::DeleteReport(id) => {
                    report_rows.insert(id.0, None);
                }
                Effect::NextReport(n) => next_report = Some(*n),
                _ => {}
            }
        }
        let mut tx = self.db.begin_write()?;
        tx.set_durability(durability)?;
        {
            let mut tasks = tx.open_table(TASKS)?;
            for (id, row) in task_rows {
                match row {
                    Some(t) => {
                        let bytes = encode(t).map_err(|e| QueueError::Db(e.to_string()))?;
                        tasks.insert(id, bytes.as_slice())?;
                    }
                    None => {
                        tasks.remove(id)?;
                    }
                }
            }
            let mut outbox = tx.open_table(OUTBOX)?;
            for (id, row) in report_rows {
                match row {
                    Some(r) => {
                        let bytes = encode(r).map_err(|e| QueueError::Db(e.to_string()))?;
                        outbox.insert(id, bytes.as_slice())?;
                    }
                    None => {
                        outbox.remove(id)?;
                    }
                }
            }
            if let Some(n) = next_report {
                tx.open_table(META)?.insert("next_report", n)?;
            }
        }
        tx.commit()?;
        let which = usize::from(!matches!(durability, Durability::Immediate));
        COMMITS[which].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use muster_protocol::msg::{Assign, HubMsg, Outcome, ReportBody, SessionMsg, TaskSpec};
    use muster_protocol::{Generation, ReportId, TaskId};

    use super::*;
    use crate::agent::RunEvent;
    use crate::core::Core;

    const T: TaskId = TaskId(1);
    const G: Generation = Generation(1);

    fn assign() -> HubMsg {
        HubMsg::Assign(Assign {
            task: T,
            generation: G,
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

    fn started() -> RunEvent {
        RunEvent::Started {
            task: T,
            generation: G,
            pid: Some(9),
            session: None,
        }
    }

    fn finished() -> RunEvent {
        RunEvent::Finished {
            task: T,
            generation: G,
            outcome: Outcome::Completed,
            result: None,
            error: None,
            work: None,
        }
    }

    /// The batch the core produces for `step`, after `before` on a fresh core.
    fn batch(before: &[&dyn Fn(&mut Core)], step: &dyn Fn(&mut Core)) -> Vec<Effect> {
        let mut c = Core::new(
            vec![],
            vec![],
            1,
            crate::core::Policy {
                slots: 4,
                ..Default::default()
            },
            1,
        );
        for b in before {
            b(&mut c);
            let _ = c.take_effects();
        }
        step(&mut c);
        c.take_effects()
    }

    #[test]
    fn accepting_starting_and_finishing_are_flushed_before_their_report() {
        let accept = |c: &mut Core| c.handle_hub(std::time::Duration::ZERO, assign());
        let start = |c: &mut Core| c.handle_run(std::time::Duration::ZERO, started());
        let finish = |c: &mut Core| c.handle_run(std::time::Duration::ZERO, finished());
        for (kind, effects) in [
            ("accept", batch(&[], &accept)),
            ("start", batch(&[&accept], &start)),
            ("finish", batch(&[&accept, &start], &finish)),
        ] {
            assert!(
                effects
                    .iter()
                    .any(|e| matches!(e, Effect::Send(SessionMsg::Report(_)))),
                "the {kind} batch sends a report: {effects:?}"
            );
            assert_eq!(commit_kind(&effects), CommitKind::Flushed, "{kind}");
        }
    }

    #[test]
    fn acknowledgements_cancels_and_abandons_only_forget_and_are_not_flushed() {
        let accept = |c: &mut Core| c.handle_hub(std::time::Duration::ZERO, assign());
        let start = |c: &mut Core| c.handle_run(std::time::Duration::ZERO, started());
        let finish = |c: &mut Core| c.handle_run(std::time::Duration::ZERO, finished());
        // Reports 1 (accepted) and 2 (started) are acknowledged: only the outbox shrinks.
        let ack_some = batch(&[&accept, &start], &|c: &mut Core| {
            c.handle_hub(std::time::Duration::ZERO, HubMsg::Ack { upto: ReportId(2) });
        });
        assert_eq!(
            ack_some,
            vec![
                Effect::DeleteReport(ReportId(1)),
                Effect::DeleteReport(ReportId(2))
            ]
        );
        // The final acknowledgement also forgets the ended task.
        let ack_all = batch(&[&accept, &start, &finish], &|c: &mut Core| {
            c.handle_hub(std::time::Duration::ZERO, HubMsg::Ack { upto: ReportId(3) });
        });
        assert!(ack_all.contains(&Effect::DeleteTask(T, G)), "{ack_all:?}");
        let cancel = batch(&[&accept], &|c: &mut Core| {
            c.handle_hub(
                std::time::Duration::ZERO,
                HubMsg::Cancel {
                    task: T,
                    generation: G,
                },
            );
        });
        let abandon = batch(&[&accept, &start], &|c: &mut Core| {
            c.handle_hub(
                std::time::Duration::ZERO,
                HubMsg::Abandon {
                    task: T,
                    generation: G,
                    reason: "superseded".into(),
                },
            );
        });
        for (kind, effects) in [
            ("ack of non-final reports", ack_some),
            ("final ack", ack_all),
            ("cancel", cancel),
            ("abandon", abandon),
        ] {
            assert_eq!(
                commit_kind(&effects),
                CommitKind::Unflushed,
                "{kind}: {effects:?}"
            );
        }
    }

    #[test]
    fn a_forget_batch_with_anything_stored_is_flushed_and_no_store_effect_means_no_commit() {
        // A new assignment in the same batch as an acknowledgement: the Accepted it
        // sends must be durable, so the whole batch is flushed.
        let mixed = batch(
            &[&|c: &mut Core| c.handle_hub(std::time::Duration::ZERO, assign())],
            &|c: &mut Core| {
                c.handle_hub(std::time::Duration::ZERO, HubMsg::Ack { upto: ReportId(1) });
                c.handle_hub(
                    std::time::Duration::ZERO,
                    HubMsg::Assign(Assign {
                        task: TaskId(2),
                        generation: G,
                        spec: TaskSpec {
                            title: "u".into(),
                            description: String::new(),
                            capabilities: vec![],
                            priority: 0,
                            timeout_ms: None,
                            ..Default::default()
                        },
                    }),
                );
            },
        );
        assert!(mixed.contains(&Effect::DeleteReport(ReportId(1))));
        assert_eq!(commit_kind(&mixed), CommitKind::Flushed);
        // The write probe of /healthz and /metrics: one flushed commit.
        assert_eq!(commit_kind(&[Effect::NextReport(7)]), CommitKind::Flushed);
        assert_eq!(commit_kind(&[]), CommitKind::Nothing);
        let no_store = [
            Effect::StopRun(T, G),
            Effect::ForgetRun(T, G),
            Effect::Send(SessionMsg::Report(Report {
                id: ReportId(1),
                task: T,
                generation: G,
                body: muster_protocol::msg::ReportBody::Accepted,
            })),
        ];
        assert_eq!(commit_kind(&no_store), CommitKind::Nothing);
    }

    #[test]
    fn apply_commits_what_commit_kind_chose() {
        let dir = tempfile::tempdir().expect("temp dir");
        let q = Queue::open(&dir.path().join(DB_FILE)).expect("open");
        let accept = batch(&[], &|c: &mut Core| {
            c.handle_hub(std::time::Duration::ZERO, assign())
        });
        q.apply(&accept).expect("flushed commit");
        let loaded = q.load().expect("load");
        assert_eq!(loaded.tasks.len(), 1);
        assert_eq!(loaded.outbox.len(), 1);
        q.apply(&[Effect::DeleteReport(ReportId(1))])
            .expect("unflushed commit");
        assert!(q.load().expect("load").outbox.is_empty());
    }

    #[test]
    fn a_schema_1_queue_is_migrated_keeping_held_tasks_and_unacknowledged_reports() {
        use muster_protocol::msg::{Failure, Phase};
        #[derive(serde::Serialize)]
        struct TaskSpecV1 {
            title: String,
            description: String,
            capabilities: Vec<String>,
            priority: i32,
            timeout_ms: Option<u64>,
        }
        #[derive(serde::Serialize)]
        struct LocalTaskV1 {
            task: TaskId,
            generation: Generation,
            spec: TaskSpecV1,
            phase: Phase,
            handle: Option<crate::agent::RunHandle>,
        }
        #[derive(serde::Serialize)]
        #[allow(dead_code)]
        enum ReportBodyV1 {
            Accepted,
            Started {
                pid: Option<u32>,
                session: Option<String>,
            },
            Progress {
                note: String,
            },
            Finished {
                outcome: Outcome,
                result: Option<String>,
                error: Option<Failure>,
            },
        }
        #[derive(serde::Serialize)]
        struct ReportV1 {
            id: ReportId,
            task: TaskId,
            generation: Generation,
            body: ReportBodyV1,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE);
        {
            let db = Database::create(&path).expect("create");
            let tx = db.begin_write().expect("write");
            {
                tx.open_table(META)
                    .expect("meta")
                    .insert("schema_version", 1)
                    .expect("insert");
                tx.open_table(META)
                    .expect("meta")
                    .insert("next_report", 9)
                    .expect("insert");
                let t = LocalTaskV1 {
                    task: T,
                    generation: G,
                    spec: TaskSpecV1 {
                        title: "old".into(),
                        description: "kept".into(),
                        capabilities: vec!["rust".into()],
                        priority: 2,
                        timeout_ms: Some(5),
                    },
                    phase: Phase::Running,
                    handle: None,
                };
                tx.open_table(TASKS)
                    .expect("tasks")
                    .insert(T.0, encode(&t).expect("encode").as_slice())
                    .expect("insert");
                let mut outbox = tx.open_table(OUTBOX).expect("outbox");
                for (id, body) in [
                    (
                        7,
                        ReportBodyV1::Started {
                            pid: Some(3),
                            session: None,
                        },
                    ),
                    (
                        8,
                        ReportBodyV1::Finished {
                            outcome: Outcome::Failed,
                            result: Some("r".into()),
                            error: Some(Failure {
                                reason: "why".into(),
                                ..Failure::default()
                            }),
                        },
                    ),
                ] {
                    let r = ReportV1 {
                        id: ReportId(id),
                        task: T,
                        generation: G,
                        body,
                    };
                    outbox
                        .insert(id, encode(&r).expect("encode").as_slice())
                        .expect("insert");
                }
            }
            tx.commit().expect("commit");
        }
        let loaded = Queue::open(&path)
            .expect("the old file opens")
            .load()
            .expect("load");
        assert_eq!(loaded.next_report, 9);
        assert_eq!(loaded.tasks.len(), 1);
        let t = &loaded.tasks[0];
        assert_eq!(
            (t.spec.title.as_str(), t.spec.description.as_str()),
            ("old", "kept")
        );
        assert_eq!(
            (t.spec.repo.clone(), t.spec.env.len(), t.phase),
            (None, 0, Phase::Running)
        );
        assert_eq!(loaded.outbox.len(), 2);
        assert_eq!(
            loaded.outbox[0].body,
            ReportBody::Started {
                pid: Some(3),
                session: None
            }
        );
        let ReportBody::Finished {
            outcome,
            error,
            work,
            ..
        } = &loaded.outbox[1].body
        else {
            panic!("finished report kept: {:?}", loaded.outbox[1]);
        };
        assert_eq!(
            (*outcome, error.as_ref().map(|e| e.reason.as_str()), work),
            (Outcome::Failed, Some("why"), &None)
        );
        // Opening again finds the current version and reads the same.
        assert_eq!(
            Queue::open(&path)
                .expect("reopen")
                .load()
                .expect("load")
                .tasks
                .len(),
            1
        );
    }

    #[test]
    fn a_schema_2_queue_opens_as_it_is_and_is_marked_3() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE);
        let held = batch(&[], &|c: &mut Core| {
            c.handle_hub(std::time::Duration::ZERO, assign())
        });
        {
            let q = Queue::open(&path).expect("create");
            q.apply(&held).expect("commit");
            let tx = q.db.begin_write().expect("write");
            tx.open_table(META)
                .expect("meta")
                .insert("schema_version", 2)
                .expect("insert");
            tx.commit().expect("commit");
        }
        let q = Queue::open(&path).expect("a schema 2 file opens");
        let version =
            q.db.begin_read()
                .expect("read")
                .open_table(META)
                .expect("meta")
                .get("schema_version")
                .expect("get")
                .map(|v| v.value());
        assert_eq!(version, Some(SCHEMA_VERSION));
        let loaded = q.load().expect("load");
        assert_eq!((loaded.tasks.len(), loaded.outbox.len()), (1, 1));
        assert_eq!(loaded.outbox[0].body, ReportBody::Accepted);
    }

    #[test]
    fn only_the_last_write_of_each_row_is_stored() {
        let dir = tempfile::tempdir().expect("temp dir");
        let q = Queue::open(&dir.path().join(DB_FILE)).expect("open");
        let accept = |c: &mut Core| c.handle_hub(std::time::Duration::ZERO, assign());
        let start = |c: &mut Core| c.handle_run(std::time::Duration::ZERO, started());
        let finish = |c: &mut Core| c.handle_run(std::time::Duration::ZERO, finished());
        // Accepted, started and finished in one commit, as a fast run is.
        let mut all = batch(&[], &accept);
        all.extend(batch(&[&accept], &start));
        all.extend(batch(&[&accept, &start], &finish));
        let puts = all
            .iter()
            .filter(|e| matches!(e, Effect::PutTask(_)))
            .count();
        assert!(
            puts > 1,
            "the batches should write the task more than once: {all:?}"
        );
        let last_task = all
            .iter()
            .rev()
            .find_map(|e| match e {
                Effect::PutTask(t) => Some(t.clone()),
                _ => None,
            })
            .expect("a task write");
        let reports: Vec<_> = all
            .iter()
            .filter_map(|e| match e {
                Effect::PutReport(r) => Some(r.id),
                _ => None,
            })
            .collect();
        q.apply(&all).expect("apply");
        let loaded = q.load().expect("load");
        assert_eq!(loaded.tasks, vec![last_task]);
        assert_eq!(
            loaded.outbox.iter().map(|r| r.id).collect::<Vec<_>>(),
            reports
        );
        // A forget, then the same task assigned again, in one commit: the task is held.
        let mut again = vec![Effect::DeleteTask(T, G), Effect::DeleteReport(reports[1])];
        again.extend(batch(&[], &accept));
        let mut expected: std::collections::BTreeSet<ReportId> = reports.iter().copied().collect();
        expected.remove(&reports[1]);
        expected.extend(again.iter().filter_map(|e| match e {
            Effect::PutReport(r) => Some(r.id),
            _ => None,
        }));
        q.apply(&again).expect("apply");
        let loaded = q.load().expect("load");
        assert_eq!(loaded.tasks.len(), 1, "{:?}", loaded.tasks);
        assert_eq!(
            loaded
                .outbox
                .iter()
                .map(|r| r.id)
                .collect::<std::collections::BTreeSet<_>>(),
            expected
        );
    }
}
