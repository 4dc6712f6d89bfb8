//! The hub's durable store: one interface, two backends.
//!
//! ```text
//!  core thread ──commit/prune/restore/probe──▶ Store ──Box<dyn Backend>──▶ redb::RedbStore     (hub.redb, embedded)
//!              ──reader()──▶ Reader ──Box<dyn Snapshot>──┘                  postgres::PgStore  (PostgreSQL, schema `muster`)
//! ```
//!
//! Both backends hold the same records (bincode bytes, [`muster_protocol::encode`])
//! and keep the same contract: every batch of core writes is one durable
//! transaction ([`Store::commit`], the group commit), nothing of a batch is
//! acknowledged before it returns, and a [`Reader`] is one consistent snapshot.
//! What both share is written once here: the commit decision ([`commit_kind`]),
//! the task filter and its byte prefilter, the page scan with its
//! [`SCAN_ROWS_MAX`] bound, the event rendering and the state codes. The redb
//! tables are listed in [`redb`], the PostgreSQL tables in [`postgres`].

pub mod postgres;
pub mod redb;
pub mod testdb;

use std::path::Path;

use muster_protocol::{TaskId, decode, encode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::core::{
    AgentRecord, Archive, AttemptRecord, Event, EventRecord, Identity, Millis, Restored,
    TaskRecord, TaskState, Write,
};

pub use self::postgres::{PG_SCHEMA_VERSION, PgOptions, PgStore};
pub use self::redb::RedbStore;

/// The schema this build writes; older files are migrated, newer ones refused.
///
/// 2: identities carry their grant (capabilities, slots); tokens carry a name and a grant.
/// 3: tasks carry a repository, base, environment and labels; attempts their work result.
/// 4: attempts carry their usage (tokens and cost).
/// 5 (redb): the `live` table is gone; `by_state`'s unfinished states list the same tasks.
pub const SCHEMA_VERSION: u64 = 5;
/// The database file name in the data directory.
pub const DB_FILE: &str = "hub.redb";

/// An event as the log stores it: the core's typed [`Event`] rendered as the JSON
/// text `watch --json` prints.
pub fn event_record(seq: u64, at: Millis, event: &Event) -> EventRecord {
    EventRecord {
        seq,
        at,
        json: event_json(event),
    }
}

/// An event's JSON text.
pub fn event_json(event: &Event) -> String {
    // Only a map with non-string keys fails to serialize; events have none.
    serde_json::to_string(event).unwrap_or_default()
}

/// Whether and how a batch of core writes is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitKind {
    /// No writes: no transaction.
    Nothing,
    /// One transaction flushed to the disk (redb `Durability::Immediate`, which
    /// calls `fdatasync`) before [`Store::commit`] returns, so before anything the
    /// batch guards (an answer, an assignment, an acknowledgement) is sent.
    Flushed,
}

/// How [`Store::commit`] commits `writes`: every kind of write is flushed, because
/// every batch guards something the core loop sends once the commit returns
/// (tasks and keys: the answer to a submission; attempts: the assignment and the
/// `Ack` of a report; agents, identities and tokens: the welcome, enrollment and
/// token answers; events: what `watch` shows). Listed per kind, so a new kind of
/// write needs a decision here.
pub fn commit_kind(writes: &[Write]) -> CommitKind {
    if writes.iter().any(needs_flush) {
        CommitKind::Flushed
    } else {
        CommitKind::Nothing
    }
}

/// Whether a batch holding `w` must reach the disk before its sends (see [`commit_kind`]).
fn needs_flush(w: &Write) -> bool {
    match w {
        Write::Task(_)
        | Write::Attempt(_)
        | Write::Agent(_)
        | Write::Identity(_)
        | Write::Token(..)
        | Write::ApiToken(..)
        | Write::Key(..)
        | Write::Event { .. }
        | Write::NextTaskId(_) => true,
    }
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (disk full, I/O error, corruption, a lost connection).
    #[error("database: {0}")]
    Db(String),
    /// A record did not decode: the file is damaged or from an incompatible build.
    #[error("database record in table {table} does not decode: {reason}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// The decode error.
        reason: String,
    },
    /// The database was written by a newer muster.
    #[error(
        "the database has schema version {found}, newer than this build's {supported}; run the newer muster-hub or restore a backup"
    )]
    TooNew {
        /// The version found.
        found: u64,
        /// The newest version this build reads.
        supported: u64,
    },
    /// Another hub incremented the leader term since this hub took it: this
    /// hub's write was refused (rolled back) and it must stop serving.
    #[error("another hub took over (term {current}; this hub held term {ours}); stepping down")]
    Fenced {
        /// The term this hub held.
        ours: u64,
        /// The term in the database.
        current: u64,
    },
}

pub(crate) fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    // Our own record types always encode; a failure here is a bug, not input.
    encode(v).expect("hub records always encode")
}

pub(crate) fn dec<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    decode(bytes).map_err(|e| StoreError::Corrupt {
        table,
        reason: e.to_string(),
    })
}

/// The code of a state in the `by_state` index keys: its position in
/// [`TaskState::ALL`]. Stored, so the order of `ALL` is part of the schema
/// (pinned by `tests/golden/hub-store/by_state_codes.hex`).
pub fn state_code(s: TaskState) -> u8 {
    TaskState::ALL.iter().position(|x| *x == s).unwrap_or(0) as u8
}

/// One page of `tasks`.
pub struct Page {
    /// The tasks, newest first.
    pub tasks: Vec<TaskRecord>,
    /// Pass as `--cursor` for the next page; `None` at the end.
    pub next_cursor: Option<u64>,
}

/// Rows examined per page at most when filtering, so a page is bounded in time.
pub const SCAN_ROWS_MAX: usize = 100_000;

/// Which tasks a listing wants; every field narrows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFilter {
    /// Only this state.
    pub state: Option<TaskState>,
    /// Only tasks whose latest attempt ran on this agent.
    pub agent: Option<String>,
    /// Only tasks carrying this label (key and value).
    pub label: Option<(String, String)>,
    /// Only tasks requiring this capability.
    pub capability: Option<String>,
    /// Only tasks whose title contains this text (case-insensitive).
    pub search: Option<String>,
}

impl TaskFilter {
    /// Whether `t` passes every filter but the state (which the index applies).
    pub fn matches(&self, t: &TaskRecord) -> bool {
        self.state.is_none_or(|s| t.state == s)
            && self
                .agent
                .as_deref()
                .is_none_or(|a| t.agent.as_deref() == Some(a))
            && self
                .label
                .as_ref()
                .is_none_or(|(k, v)| t.labels.iter().any(|l| &l.0 == k && &l.1 == v))
            && self
                .capability
                .as_deref()
                .is_none_or(|c| t.capabilities.iter().any(|x| x == c))
            && self
                .search
                .as_deref()
                .is_none_or(|q| contains_folded(&t.title, q))
    }
}

impl TaskFilter {
    /// Whether a stored record (its bincode bytes) may match: every text the
    /// filter looks for must occur in the record's bytes, since bincode stores
    /// strings as their UTF-8 bytes. A cheap test that never says no to a
    /// match, so a selective filter (a title search, an agent) decodes only
    /// the few records that pass instead of every record it scans.
    fn may_match(&self, raw: &[u8]) -> bool {
        let has = |needle: &str| contains_bytes(raw, needle.as_bytes());
        self.agent.as_deref().is_none_or(has)
            && self.label.as_ref().is_none_or(|(k, v)| has(k) && has(v))
            && self.capability.as_deref().is_none_or(has)
            && self.search.as_deref().is_none_or(|q| {
                // A non-ASCII search folds case beyond ASCII: only decoding can tell.
                // The title alone is searched when its bytes can be found: a tenth
                // of the record, and no false hits in the description or the repo.
                !q.is_ascii()
                    || contains_ascii_folded(stored_title(raw).unwrap_or(raw), q.as_bytes())
            })
    }
}

/// The title of a stored task record, read from its bytes without decoding the
/// rest: bincode (varint integers, little endian) writes the id and then the
/// title, as its length and its UTF-8 bytes, first. `None` if the bytes do not
/// read so (pinned by a test against [`TaskRecord`]'s encoding).
fn stored_title(raw: &[u8]) -> Option<&[u8]> {
    let (_id, rest) = varint(raw)?;
    let (len, rest) = varint(rest)?;
    rest.get(..usize::try_from(len).ok()?)
}

/// One bincode varint: below 251 itself, else a marker byte and 2, 4 or 8 bytes.
fn varint(b: &[u8]) -> Option<(u64, &[u8])> {
    let (&first, rest) = b.split_first()?;
    let wide = |n: usize| -> Option<(u64, &[u8])> {
        let (bytes, rest) = (rest.get(..n)?, rest.get(n..)?);
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(bytes);
        Some((u64::from_le_bytes(v), rest))
    };
    match first {
        0..=250 => Some((u64::from(first), rest)),
        251 => wide(2),
        252 => wide(4),
        253 => wide(8),
        _ => None,
    }
}

/// Whether `hay` contains `needle` byte for byte.
fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    let Some(last) = hay.len().checked_sub(needle.len()) else {
        return false;
    };
    hay[..=last]
        .iter()
        .enumerate()
        .any(|(i, &b)| b == first && &hay[i + 1..i + needle.len()] == rest)
}

/// Whether `hay` contains `needle` with ASCII letters compared without case.
fn contains_ascii_folded(hay: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    let Some(last) = hay.len().checked_sub(needle.len()) else {
        return false;
    };
    let (lo, up) = (first.to_ascii_lowercase(), first.to_ascii_uppercase());
    hay[..=last].iter().enumerate().any(|(i, &b)| {
        (b == lo || b == up) && hay[i + 1..i + needle.len()].eq_ignore_ascii_case(rest)
    })
}

/// Case-insensitive substring search without allocating per row for ASCII text.
fn contains_folded(hay: &str, needle: &str) -> bool {
    if needle.is_ascii() {
        let n = needle.as_bytes();
        n.is_empty()
            || hay
                .as_bytes()
                .windows(n.len())
                .any(|w| w.eq_ignore_ascii_case(n))
    } else {
        hay.to_lowercase().contains(&needle.to_lowercase())
    }
}

/// One page of a task listing being filled: each backend walks its rows
/// newest first (by id, or by id within one state) and offers each to
/// [`Scan::offer`] until it says stop, so the paging rules live here once.
pub(crate) struct Scan<'f> {
    filter: &'f TaskFilter,
    limit: usize,
    out: Vec<TaskRecord>,
    last: Option<u64>,
    scanned: usize,
}

impl<'f> Scan<'f> {
    /// An empty page for `filter`, at most `limit` tasks.
    pub(crate) fn new(filter: &'f TaskFilter, limit: usize) -> Self {
        Scan {
            filter,
            limit,
            out: Vec::new(),
            last: None,
            scanned: 0,
        }
    }

    /// Examines the task `id` stored as `raw` (`None`: the index names a task
    /// that is gone). Returns whether the page is full, or has examined
    /// [`SCAN_ROWS_MAX`] rows: then the walk stops.
    pub(crate) fn offer(&mut self, id: u64, raw: Option<&[u8]>) -> Result<bool, StoreError> {
        self.last = Some(id);
        self.scanned += 1;
        if let Some(raw) = raw
            && self.filter.may_match(raw)
        {
            let rec: TaskRecord = dec("tasks", raw)?;
            if self.filter.matches(&rec) {
                self.out.push(rec);
            }
        }
        Ok(self.done())
    }

    fn done(&self) -> bool {
        self.out.len() >= self.limit || self.scanned >= SCAN_ROWS_MAX
    }

    /// The page: a cursor when it was cut short by its limit or the scan bound,
    /// so a search over any number of tasks goes on page by page.
    pub(crate) fn finish(self) -> Page {
        let more = self.done();
        Page {
            tasks: self.out,
            next_cursor: if more { self.last } else { None },
        }
    }
}

/// Where a store's schema stands against this build (`muster-hub migrate --check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaState {
    /// No schema yet: the hub creates it at start.
    Missing,
    /// An older version: the hub migrates it at start.
    Older(u64),
    /// This build's version.
    Current,
    /// A newer build wrote it: this build refuses it.
    Newer(u64),
}

/// Rows copied per table by `muster-hub store copy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyCounts {
    /// Tasks.
    pub tasks: u64,
    /// Attempts.
    pub attempts: u64,
    /// Idempotency keys.
    pub keys: u64,
    /// Events.
    pub events: u64,
    /// Agents in the registry.
    pub agents: u64,
    /// Identities.
    pub identities: u64,
    /// Join tokens and API tokens.
    pub tokens: u64,
}

/// A storage engine behind [`Store`]: called synchronously from the hub's
/// core thread (never from inside an async runtime).
pub trait Backend: Send {
    /// Applies one batch of core writes in one durable transaction; nothing of
    /// it is durable when this fails.
    ///
    /// # Errors
    /// [`StoreError`] when the transaction fails or is fenced.
    fn commit(&self, writes: &[Write], events_max: u64) -> Result<(), StoreError>;
    /// Deletes up to `max` tasks finished before `before`; returns their ids.
    ///
    /// # Errors
    /// [`StoreError`] when the transaction fails; nothing is then deleted.
    fn prune(&self, before: u64, max: usize) -> Result<Vec<TaskId>, StoreError>;
    /// The live state the core starts from.
    ///
    /// # Errors
    /// [`StoreError`] on a read or decode failure.
    fn restore(&self, now: u64) -> Result<Restored, StoreError>;
    /// A consistent read snapshot.
    ///
    /// # Errors
    /// [`StoreError`] when no read transaction can start.
    fn reader(&self) -> Result<Box<dyn Snapshot>, StoreError>;
    /// Writes a probe row: is the store writable?
    ///
    /// # Errors
    /// [`StoreError`] when the write fails.
    fn probe(&self) -> Result<(), StoreError>;
    /// Sets the leader term this hub's writes must find (PostgreSQL only).
    fn set_term(&self, _term: u64) {}
    /// The PostgreSQL store, for what only it has (the leader term).
    fn as_postgres(&self) -> Option<&PgStore> {
        None
    }
    /// Which engine this is.
    fn kind(&self) -> StoreKind;
}

/// Which engine a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// The embedded redb file in the data directory.
    Redb,
    /// A PostgreSQL database.
    Postgres,
}

/// The reads of one consistent snapshot (see [`Reader`] for each method's contract).
pub trait Snapshot {
    /// A task by id.
    fn task(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError>;
    /// Every attempt of a task, oldest first.
    fn attempts(&self, id: TaskId) -> Result<Vec<AttemptRecord>, StoreError>;
    /// A task's newest attempts, at most `max`, newest first.
    fn newest_attempts(&self, id: TaskId, max: usize) -> Result<Vec<AttemptRecord>, StoreError>;
    /// A page of tasks matching `filter`, newest first, below `cursor` (walked through [`Scan`]).
    fn tasks_matching(
        &self,
        filter: &TaskFilter,
        limit: usize,
        cursor: Option<u64>,
    ) -> Result<Page, StoreError>;
    /// Events from `from` on, at most `limit`, and the oldest retained sequence.
    fn events(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<(Vec<EventRecord>, Option<u64>), StoreError>;
    /// The last event sequence number, if any.
    fn last_event(&self) -> Result<Option<u64>, StoreError>;
    /// Every agent in the registry.
    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
    /// Every identity.
    fn identities(&self) -> Result<Vec<Identity>, StoreError>;
}

/// The hub's durable store, on whichever [`Backend`] the config names.
pub struct Store {
    backend: Box<dyn Backend>,
}

impl Store {
    /// Opens (or creates) the redb database at `path` and checks its schema version.
    ///
    /// # Errors
    /// [`StoreError`] when the file cannot be opened or is from a newer build.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store {
            backend: Box::new(RedbStore::open(path)?),
        })
    }

    /// Connects to PostgreSQL and creates or migrates the `muster` schema.
    /// Must not be called from inside an async runtime (it runs its own).
    ///
    /// # Errors
    /// [`StoreError`] when the database cannot be reached or its schema is newer.
    pub fn open_postgres(opts: &PgOptions) -> Result<Store, StoreError> {
        Ok(Store {
            backend: Box::new(PgStore::open(opts)?),
        })
    }

    /// A store on any backend.
    pub fn from_backend(backend: Box<dyn Backend>) -> Store {
        Store { backend }
    }

    /// Applies one batch of core writes in one durable transaction.
    ///
    /// # Errors
    /// [`StoreError`] when the commit fails; nothing of the batch is then durable.
    pub fn commit(&self, writes: &[Write], events_max: u64) -> Result<(), StoreError> {
        match commit_kind(writes) {
            CommitKind::Nothing => Ok(()),
            CommitKind::Flushed => self.backend.commit(writes, events_max),
        }
    }

    /// Deletes up to `max` tasks that finished before `before` (their attempts, indexes
    /// and idempotency keys too). Returns the ids pruned.
    ///
    /// # Errors
    /// [`StoreError`] when the transaction fails; nothing is then deleted.
    pub fn prune(&self, before: u64, max: usize) -> Result<Vec<TaskId>, StoreError> {
        self.backend.prune(before, max)
    }

    /// Reads what the core needs at startup: live tasks, registry, identities,
    /// tokens, keys; never the finished history, so startup does not grow with it.
    ///
    /// # Errors
    /// [`StoreError`] when a table cannot be read or a record does not decode.
    pub fn restore(&self, now: u64) -> Result<Restored, StoreError> {
        self.backend.restore(now)
    }

    /// A read snapshot, for queries and the core's [`Archive`].
    ///
    /// # Errors
    /// [`StoreError`] when a read transaction cannot start.
    pub fn reader(&self) -> Result<Reader, StoreError> {
        Ok(Reader {
            snap: self.backend.reader()?,
        })
    }

    /// Writes and reads back a probe row: is the store writable?
    ///
    /// # Errors
    /// [`StoreError`] when the write fails.
    pub fn probe(&self) -> Result<(), StoreError> {
        self.backend.probe()
    }

    /// Sets the leader term every later write must find in the database
    /// (PostgreSQL; a no-op on redb, which one hub owns alone).
    pub fn set_term(&self, term: u64) {
        self.backend.set_term(term);
    }

    /// Which engine this store runs on.
    pub fn kind(&self) -> StoreKind {
        self.backend.kind()
    }

    /// The PostgreSQL backend, if this store is one (the leader term lives there).
    pub fn postgres(&self) -> Option<&PgStore> {
        self.backend.as_postgres()
    }

    /// Whether this store is PostgreSQL (shared by several hubs, fenced by a term).
    pub fn is_postgres(&self) -> bool {
        self.kind() == StoreKind::Postgres
    }
}

/// A consistent read snapshot of the store.
pub struct Reader {
    snap: Box<dyn Snapshot>,
}

impl Reader {
    /// A task by id.
    ///
    /// # Errors
    /// [`StoreError`] on a read or decode failure.
    pub fn task(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        self.snap.task(id)
    }

    /// Every attempt of a task, oldest first.
    ///
    /// # Errors
    /// [`StoreError`] on a read or decode failure.
    pub fn attempts(&self, id: TaskId) -> Result<Vec<AttemptRecord>, StoreError> {
        self.snap.attempts(id)
    }

    /// A task's newest attempts, at most `max`, newest first (requeues keep adding
    /// generations, so a task's history has no bound of its own).
    ///
    /// # Errors
    /// [`StoreError`] on a read or decode failure.
    pub fn newest_attempts(
        &self,
        id: TaskId,
        max: usize,
    ) -> Result<Vec<AttemptRecord>, StoreError> {
        self.snap.newest_attempts(id, max)
    }

    /// A page of tasks, newest first, below `cursor`, optionally filtered.
    ///
    /// # Errors
    /// [`StoreError`] on a read or decode failure.
    pub fn tasks(
        &self,
        state: Option<TaskState>,
        agent: Option<&str>,
        label: Option<(&str, &str)>,
        limit: usize,
        cursor: Option<u64>,
    ) -> Result<Page, StoreError> {
        let filter = TaskFilter {
            state,
            agent: agent.map(str::to_string),
            label: label.map(|(k, v)| (k.to_string(), v.to_string())),
            ..TaskFilter::default()
        };
        self.tasks_matching(&filter, limit, cursor)
    }

    /// A page of tasks matching `filter`, newest first, below `cursor`. At most
    /// [`SCAN_ROWS_MAX`] rows are examined per page (the state filter walks its
    /// index, so it examines only tasks in that state); a page cut short by that
    /// bound still has a cursor, so a search over any number of tasks goes on page
    /// by page in bounded time each.
    ///
    /// # Errors
    /// [`StoreError`] on a read or decode failure.
    pub fn tasks_matching(
        &self,
        filter: &TaskFilter,
        limit: usize,
        cursor: Option<u64>,
    ) -> Result<Page, StoreError> {
        self.snap.tasks_matching(filter, limit, cursor)
    }

    /// Events from `from` on, at most `limit`; also returns the oldest retained sequence.
    ///
    /// # Errors
    /// [`StoreError`] on a read or decode failure.
    pub fn events(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<(Vec<EventRecord>, Option<u64>), StoreError> {
        self.snap.events(from, limit)
    }

    /// The last event sequence number, if any.
    ///
    /// # Errors
    /// [`StoreError`] on a read failure.
    pub fn last_event(&self) -> Result<Option<u64>, StoreError> {
        self.snap.last_event()
    }

    /// Every agent in the registry.
    ///
    /// # Errors
    /// [`StoreError`] on a read or decode failure.
    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.snap.agents()
    }

    /// Every identity.
    ///
    /// # Errors
    /// [`StoreError`] on a read or decode failure.
    pub fn identities(&self) -> Result<Vec<Identity>, StoreError> {
        self.snap.identities()
    }
}

impl Archive for Reader {
    fn task(&self, id: TaskId) -> Option<TaskRecord> {
        // The core can only hear "not found"; the cause of a failed read is logged here.
        Reader::task(self, id).unwrap_or_else(|e| {
            tracing::warn!(task = %id, "reading a finished task: {e}");
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use muster_protocol::Generation;
    use muster_protocol::msg::TimeoutAction;

    use super::*;
    use crate::core::TokenRecord;
    use crate::store::testdb::TestDb;

    /// Where one run of a test keeps its store: every backend in turn.
    pub(crate) enum Place {
        /// A redb file in a temporary directory.
        Redb(tempfile::TempDir),
        /// A fresh PostgreSQL database, dropped after the test.
        Pg(TestDb),
    }

    impl Place {
        /// Opens the store here, as a hub would after taking the leader term.
        pub(crate) fn open(&self) -> Store {
            match self {
                Place::Redb(dir) => Store::open(&dir.path().join(DB_FILE)).expect("open redb"),
                Place::Pg(db) => {
                    let pg = PgStore::open(&db.options()).expect("open postgres");
                    pg.take_term("test", "").expect("take the term");
                    Store::from_backend(Box::new(pg))
                }
            }
        }

        /// The backend's name, for assertion messages.
        pub(crate) fn name(&self) -> &'static str {
            match self {
                Place::Redb(_) => "redb",
                Place::Pg(_) => "postgres",
            }
        }
    }

    /// Every backend a store test runs on: redb always, PostgreSQL when
    /// `MUSTER_TEST_PG_URL` names a server (see [`TestDb::create`]).
    pub(crate) fn places() -> Vec<Place> {
        let mut v = vec![Place::Redb(tempfile::tempdir().expect("temp dir"))];
        v.extend(TestDb::create().map(Place::Pg));
        v
    }

    pub(crate) fn task(id: u64, state: TaskState, at: u64, key: Option<&str>) -> TaskRecord {
        TaskRecord {
            id: TaskId(id),
            title: format!("t{id}"),
            description: String::new(),
            capabilities: vec![],
            priority: 0,
            max_attempts: 3,
            timeout_ms: None,
            timeout_action: TimeoutAction::Fail,
            after: vec![],
            key: key.map(str::to_string),
            state,
            generation: Generation(1),
            attempts: 1,
            not_before: None,
            agent: None,
            submitted_at: at,
            updated_at: at,
            progress_at: None,
            progress_note: None,
            result: None,
            reason: None,
            audit: vec![],
            repo: None,
            base: None,
            env: Vec::new(),
            labels: Vec::new(),
        }
    }

    /// The byte test before decoding never turns away a record the filter
    /// matches, and turns away records that cannot match.
    #[test]
    fn the_byte_prefilter_never_refuses_a_match() {
        let mut t = task(7, TaskState::Failed, 1, None);
        t.title = "Fix the Ledger-Worker retries".into();
        t.agent = Some("agent-00042".into());
        t.capabilities = vec!["gpu".into()];
        t.labels = vec![("team".into(), "infra".into())];
        let raw = enc(&t);
        let f = |search: Option<&str>, agent: Option<&str>| TaskFilter {
            search: search.map(str::to_string),
            agent: agent.map(str::to_string),
            ..TaskFilter::default()
        };
        let matching = [
            f(Some("ledger-worker"), None),
            f(Some("LEDGER"), Some("agent-00042")),
            f(Some("retries"), None),
            f(Some("é"), None),
            TaskFilter {
                label: Some(("team".into(), "infra".into())),
                capability: Some("gpu".into()),
                ..TaskFilter::default()
            },
        ];
        for filter in &matching {
            assert!(filter.may_match(&raw), "{filter:?}");
        }
        for filter in &matching[..3] {
            assert!(filter.matches(&t), "{filter:?}");
        }
        let not = [
            f(Some("ledger-ui"), None),
            f(None, Some("agent-00043")),
            TaskFilter {
                label: Some(("team".into(), "web".into())),
                ..TaskFilter::default()
            },
        ];
        for filter in &not {
            assert!(!filter.may_match(&raw), "{filter:?}");
            assert!(!filter.matches(&t), "{filter:?}");
        }
        // The title is found in the bytes of any id and any title length.
        for (id, len) in [
            (7, 5),
            (250, 250),
            (251, 251),
            (70_000, 70_000),
            (u64::MAX, 3),
        ] {
            let mut t = task(id, TaskState::Queued, 1, None);
            t.title = "x".repeat(len);
            assert_eq!(
                stored_title(&enc(&t)),
                Some(t.title.as_bytes()),
                "{id} {len}"
            );
        }
        assert!(contains_ascii_folded(b"abc", b""));
        assert!(!contains_ascii_folded(b"ab", b"abc"));
        assert!(!contains_bytes(b"", b"a"));
    }

    /// One write of every kind the core produces.
    pub(crate) fn one_of_each_write() -> Vec<(&'static str, Write)> {
        let attempt = AttemptRecord {
            task: TaskId(1),
            generation: Generation(1),
            agent: "a1".into(),
            assigned_at: 1,
            accepted_at: None,
            started_at: None,
            ended_at: None,
            outcome: None,
            error: None,
            pid: None,
            session: None,
            work: None,
            usage: None,
        };
        let agent = AgentRecord {
            name: "a1".into(),
            version: "0.1.0".into(),
            capabilities: vec![],
            slots: 1,
            enrolled_at: 1,
            last_seen: Some(2),
            host: None,
            self_test: None,
            drained: false,
            revoked: false,
        };
        let identity = Identity {
            name: "a1".into(),
            role: muster_protocol::msg::Role::Agent,
            fingerprint: "fp".into(),
            key_fingerprint: "kfp".into(),
            created_at: 1,
            revoked_at: None,
            capabilities: vec![],
            slots: 1,
        };
        let token = TokenRecord {
            role: muster_protocol::msg::Role::Agent,
            created_by: "admin".into(),
            created_at: 1,
            expires_at: 2,
            used_at: None,
            name: None,
            capabilities: None,
            slots: None,
        };
        let event = Event::Enrolled {
            who: "a1".into(),
            role: muster_protocol::msg::Role::Agent,
        };
        vec![
            ("task", Write::Task(task(1, TaskState::Queued, 1, None))),
            ("attempt", Write::Attempt(attempt)),
            ("agent", Write::Agent(agent)),
            ("identity", Write::Identity(identity)),
            ("token", Write::Token("hash".into(), token)),
            ("key", Write::Key("k".into(), TaskId(1))),
            (
                "api token",
                Write::ApiToken(
                    "hash".into(),
                    crate::core::web::ApiToken {
                        name: "ci".into(),
                        role: muster_protocol::msg::Role::Operator,
                        created_by: "admin".into(),
                        created_at: 1,
                        expires_at: 2,
                        revoked_at: None,
                    },
                ),
            ),
            (
                "event",
                Write::Event {
                    seq: 1,
                    at: 1,
                    event,
                },
            ),
            ("next task id", Write::NextTaskId(2)),
        ]
    }

    #[test]
    fn every_kind_of_write_is_committed_with_a_flush_and_nothing_without_a_transaction() {
        assert_eq!(commit_kind(&[]), CommitKind::Nothing);
        for (kind, w) in one_of_each_write() {
            assert_eq!(
                commit_kind(std::slice::from_ref(&w)),
                CommitKind::Flushed,
                "a batch of one {kind} write"
            );
        }
        let all: Vec<Write> = one_of_each_write().into_iter().map(|(_, w)| w).collect();
        assert_eq!(commit_kind(&all), CommitKind::Flushed, "a mixed batch");
    }

    #[test]
    fn indexes_follow_state_and_pruning_takes_only_expired_finished_tasks() {
        for place in places() {
            indexes_follow_state_and_pruning_on(&place);
        }
    }

    fn indexes_follow_state_and_pruning_on(place: &Place) {
        let on = place.name();
        let store = place.open();
        let writes = vec![
            Write::Task(task(1, TaskState::Queued, 100, None)),
            Write::Task(task(2, TaskState::Completed, 100, Some("k2"))),
            Write::Key("k2".into(), TaskId(2)),
            Write::Task(task(3, TaskState::Failed, 5_000, None)),
            Write::Task(task(4, TaskState::Running, 100, None)),
        ];
        store.commit(&writes, 1000).expect("commit");
        // A task that finished and was requeued leaves the finished index.
        store
            .commit(
                &[Write::Task(task(1, TaskState::Completed, 200, None))],
                1000,
            )
            .expect("commit");
        store
            .commit(&[Write::Task(task(1, TaskState::Queued, 300, None))], 1000)
            .expect("commit");
        let r = store.restore(0).expect("restore");
        let mut live: Vec<u64> = r.live.iter().map(|(t, _)| t.id.0).collect();
        live.sort();
        assert_eq!(live, vec![1, 4], "{on}");
        let page = store
            .reader()
            .expect("reader")
            .tasks(Some(TaskState::Completed), None, None, 10, None)
            .expect("page");
        assert_eq!(
            page.tasks.iter().map(|t| t.id.0).collect::<Vec<_>>(),
            vec![2],
            "{on}"
        );
        let pruned = store.prune(1_000, 10).expect("prune");
        assert_eq!(
            pruned,
            vec![TaskId(2)],
            "{on}: only the completed task older than the cutoff"
        );
        let reader = store.reader().expect("reader");
        assert!(reader.task(TaskId(2)).expect("read").is_none(), "{on}");
        assert!(
            reader.task(TaskId(3)).expect("read").is_some(),
            "{on}: finished after the cutoff: kept"
        );
        assert!(
            reader.task(TaskId(1)).expect("read").is_some(),
            "{on}: requeued: live, kept"
        );
        assert!(
            store.restore(0).expect("restore").keys.is_empty(),
            "{on}: its key is gone too"
        );
    }

    /// Each task is listed under exactly one state, whether its old index entry came
    /// from the in-memory cache of committed states or from reading the record back
    /// (a fresh process, a finished task requeued).
    #[test]
    fn each_task_is_indexed_under_exactly_its_current_state() {
        for place in places() {
            each_task_is_indexed_on(&place);
        }
    }

    fn each_task_is_indexed_on(place: &Place) {
        let on = place.name();
        let listed = |store: &Store| -> Vec<(TaskState, Vec<u64>)> {
            let reader = store.reader().expect("reader");
            TaskState::ALL
                .iter()
                .map(|s| {
                    let page = reader.tasks(Some(*s), None, None, 100, None).expect("page");
                    (*s, page.tasks.iter().map(|t| t.id.0).collect())
                })
                .filter(|(_, ids): &(TaskState, Vec<u64>)| !ids.is_empty())
                .collect()
        };
        let store = place.open();
        let steps = [
            (TaskState::Queued, 100),
            (TaskState::Assigned, 110),
            (TaskState::Running, 120),
        ];
        for (state, at) in steps {
            store
                .commit(&[Write::Task(task(7, state, at, None))], 1000)
                .expect("commit");
            assert_eq!(listed(&store), vec![(state, vec![7])], "{on}");
        }
        drop(store);
        // A new process knows nothing of what was committed: it reads the record back.
        let store = place.open();
        for (state, at) in [
            (TaskState::Completed, 130),
            (TaskState::Queued, 140),
            (TaskState::Running, 150),
            (TaskState::Failed, 160),
        ] {
            store
                .commit(&[Write::Task(task(7, state, at, None))], 1000)
                .expect("commit");
            assert_eq!(
                listed(&store),
                vec![(state, vec![7])],
                "{on}: after {state:?}"
            );
        }
        let pruned = store.prune(1_000, 10).expect("prune");
        assert_eq!(
            pruned,
            vec![TaskId(7)],
            "{on}: one finished-index entry, the last"
        );
    }

    /// One of each write, committed and read back through every read the
    /// backends offer, with paging and the scan's cursor.
    #[test]
    fn every_write_reads_back_and_pages_walk_newest_first() {
        for place in places() {
            every_write_reads_back_on(&place);
        }
    }

    fn every_write_reads_back_on(place: &Place) {
        let on = place.name();
        let store = place.open();
        let all: Vec<Write> = one_of_each_write().into_iter().map(|(_, w)| w).collect();
        store.commit(&all, 1000).expect("commit");
        // A batch writing one record twice keeps the last write.
        let mut batch = Vec::new();
        for id in 2..=30u64 {
            let mut t = task(id, TaskState::Queued, id, None);
            t.title = format!("first {id}");
            batch.push(Write::Task(t));
            let mut t = task(id, TaskState::Queued, id, None);
            t.title = if id % 3 == 0 {
                format!("Needle {id}")
            } else {
                format!("hay {id}")
            };
            batch.push(Write::Task(t));
        }
        for seq in 2..=20u64 {
            batch.push(Write::Event {
                seq,
                at: seq,
                event: Event::Enrolled {
                    who: format!("a{seq}"),
                    role: muster_protocol::msg::Role::Agent,
                },
            });
        }
        batch.push(Write::NextTaskId(31));
        store.commit(&batch, 10).expect("commit");
        let r = store.reader().expect("reader");
        assert_eq!(
            r.task(TaskId(9)).expect("read").map(|t| t.title),
            Some("Needle 9".into()),
            "{on}"
        );
        assert_eq!(r.attempts(TaskId(1)).expect("attempts").len(), 1, "{on}");
        assert_eq!(
            r.newest_attempts(TaskId(1), 5).expect("attempts").len(),
            1,
            "{on}"
        );
        assert_eq!(r.agents().expect("agents").len(), 1, "{on}");
        assert_eq!(r.identities().expect("identities").len(), 1, "{on}");
        // The event log keeps the newest `events_max` (10): 10..=20.
        assert_eq!(r.last_event().expect("last"), Some(20), "{on}");
        let (events, oldest) = r.events(0, 100).expect("events");
        assert_eq!(oldest, Some(10), "{on}");
        assert_eq!(events.len(), 11, "{on}");
        let (events, _) = r.events(15, 2).expect("events");
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![15, 16],
            "{on}"
        );
        // Pages of 4 needles, newest first, each below the last's cursor.
        let filter = TaskFilter {
            search: Some("needle".into()),
            ..TaskFilter::default()
        };
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = r.tasks_matching(&filter, 4, cursor).expect("page");
            seen.extend(page.tasks.iter().map(|t| t.id.0));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen, vec![30, 27, 24, 21, 18, 15, 12, 9, 6, 3], "{on}");
        let page = r
            .tasks(Some(TaskState::Queued), None, None, 100, None)
            .expect("page");
        assert_eq!(page.tasks.len(), 30, "{on}");
        assert_eq!(page.next_cursor, None, "{on}");
        drop(r);
        let restored = store.restore(0).expect("restore");
        assert_eq!(restored.next_task_id, 31, "{on}");
        assert_eq!(restored.next_event_seq, 21, "{on}");
        assert_eq!(restored.live.len(), 30, "{on}");
        let (t1, a1) = &restored.live[0];
        assert_eq!(
            (t1.id, a1.as_ref().map(|a| a.agent.as_str())),
            (TaskId(1), Some("a1")),
            "{on}"
        );
        assert_eq!(restored.keys, vec![("k".to_string(), TaskId(1))], "{on}");
        assert_eq!(restored.agents.len(), 1, "{on}");
        assert_eq!(restored.identities.len(), 1, "{on}");
        store.probe().expect("probe");
        store.probe().expect("probe again");
    }
}
