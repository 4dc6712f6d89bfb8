//! The hub's durable store (redb).
//!
//! ```text
//! meta        &str          -> u64            schema_version, next_task_id
//! tasks       u64 task      -> TaskRecord      every task, live or finished
//! live        u64 task      -> ()              non-terminal tasks: restart reads only these
//! by_state    (u8, u64)     -> ()              (state, task) for `tasks --state`
//! finished    (u64, u64)    -> ()              (finished at, task): retention pruning reads only what expired
//! attempts    (u64, u64)    -> AttemptRecord   (task, generation)
//! keys        &str          -> u64             idempotency key -> task
//! events      u64 seq       -> EventRecord     the event log, pruned by count
//! agents      &str name     -> AgentRecord     the registry
//! identities  &str sha256   -> Identity        certificate fingerprint -> identity
//! tokens      &str sha256   -> TokenRecord     hash of a join token's secret -> token
//! api_tokens  &str sha256   -> ApiToken        hash of an API token's secret -> token
//! ```
//!
//! Values are bincode ([`muster_protocol::encode`]). Every batch of core
//! writes is one durable transaction ([`Store::commit`]): the group commit.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use muster_protocol::{TaskId, decode, encode};
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::core::{
    AgentRecord, Archive, AttemptRecord, Event, EventRecord, Identity, Millis, Restored,
    TaskRecord, TaskState, TokenRecord, Write,
};

/// The schema this build writes; older files are migrated, newer ones refused.
///
/// 2: identities carry their grant (capabilities, slots); tokens carry a name and a grant.
/// 3: tasks carry a repository, base, environment and labels; attempts their work result.
/// 4: attempts carry their usage (tokens and cost).
pub const SCHEMA_VERSION: u64 = 4;
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

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const TASKS: TableDefinition<u64, &[u8]> = TableDefinition::new("tasks");
const LIVE: TableDefinition<u64, ()> = TableDefinition::new("live");
const BY_STATE: TableDefinition<(u8, u64), ()> = TableDefinition::new("by_state");
const FINISHED: TableDefinition<(u64, u64), ()> = TableDefinition::new("finished");
const ATTEMPTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("attempts");
const KEYS: TableDefinition<&str, u64> = TableDefinition::new("keys");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const IDENTITIES: TableDefinition<&str, &[u8]> = TableDefinition::new("identities");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
// A table added without a schema step: a store without it simply has no API tokens.
const API_TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_tokens");

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed (disk full, I/O error, corruption).
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
    /// The file was written by a newer muster.
    #[error(
        "the database has schema version {found}, newer than this build's {SCHEMA_VERSION}; run the newer muster-hub or restore a backup"
    )]
    TooNew {
        /// The version found.
        found: u64,
    },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// The hub's redb database.
pub struct Store {
    db: Database,
    /// The committed state of the unfinished tasks this process has written, so a
    /// commit can move their index entries without reading and decoding the old record.
    live_states: Mutex<HashMap<u64, TaskState>>,
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    // Our own record types always encode; a failure here is a bug, not input.
    encode(v).expect("hub records always encode")
}

fn dec<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    decode(bytes).map_err(|e| StoreError::Corrupt {
        table,
        reason: e.to_string(),
    })
}

/// Schema 1 → 2: identities gain a grant, tokens a name and a grant. An agent
/// keeps what its last hello claimed (its registry record), so an upgraded fleet
/// keeps working; one that never connected gets no capabilities and one slot
/// until `muster-hub agent set` grants more.
fn migrate_v1(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    #[derive(serde::Deserialize)]
    struct IdentityV1 {
        name: String,
        role: muster_protocol::msg::Role,
        fingerprint: String,
        key_fingerprint: String,
        created_at: u64,
        revoked_at: Option<u64>,
    }
    #[derive(serde::Deserialize)]
    struct TokenV1 {
        role: muster_protocol::msg::Role,
        created_by: String,
        created_at: u64,
        expires_at: u64,
        used_at: Option<u64>,
    }
    let agents: HashMap<String, AgentRecord> = {
        let t = tx.open_table(AGENTS)?;
        let mut m = HashMap::new();
        for row in t.iter()? {
            let a: AgentRecord = dec("agents", row?.1.value())?;
            m.insert(a.name.clone(), a);
        }
        m
    };
    let mut identities = tx.open_table(IDENTITIES)?;
    let old: Vec<(String, IdentityV1)> = identities
        .iter()?
        .map(|row| {
            let (k, v) = row?;
            Ok((k.value().to_string(), dec("identities", v.value())?))
        })
        .collect::<Result<_, StoreError>>()?;
    for (k, i) in old {
        let (capabilities, slots) = match (i.role, agents.get(&i.name)) {
            (muster_protocol::msg::Role::Agent, Some(a)) => {
                (a.capabilities.clone(), a.slots.max(1))
            }
            (muster_protocol::msg::Role::Agent, None) => (Vec::new(), 1),
            _ => (Vec::new(), 0),
        };
        let new = Identity {
            name: i.name,
            role: i.role,
            fingerprint: i.fingerprint,
            key_fingerprint: i.key_fingerprint,
            created_at: i.created_at,
            revoked_at: i.revoked_at,
            capabilities,
            slots,
        };
        identities.insert(k.as_str(), enc(&new).as_slice())?;
    }
    let mut tokens = tx.open_table(TOKENS)?;
    let old: Vec<(String, TokenV1)> = tokens
        .iter()?
        .map(|row| {
            let (k, v) = row?;
            Ok((k.value().to_string(), dec("tokens", v.value())?))
        })
        .collect::<Result<_, StoreError>>()?;
    for (k, t) in old {
        let new = TokenRecord {
            role: t.role,
            created_by: t.created_by,
            created_at: t.created_at,
            expires_at: t.expires_at,
            used_at: t.used_at,
            name: None,
            capabilities: None,
            slots: None,
        };
        tokens.insert(k.as_str(), enc(&new).as_slice())?;
    }
    Ok(())
}

/// Schema 2 → 3: tasks gain `repo`, `base`, `env` and `labels`, attempts gain
/// `work`, all as trailing fields. bincode writes a struct as its fields in
/// order, so a version-2 record followed by the encoding of the new fields'
/// empty values is exactly the version-3 record; each result is decoded before
/// it is written, so a record that does not fit that shape stops the open as
/// [`StoreError::Corrupt`] instead of being written damaged.
fn migrate_v2(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    type Pairs = Vec<(String, String)>;
    let task_tail = enc(&(None::<String>, None::<String>, Pairs::new(), Pairs::new()));
    let mut tasks = tx.open_table(TASKS)?;
    let mut from = 0;
    loop {
        // In chunks, so a store of any size migrates in bounded memory.
        let chunk: Vec<(u64, Vec<u8>)> = tasks
            .range(from..)?
            .take(MIGRATE_CHUNK)
            .map(|row| {
                let (k, v) = row?;
                Ok((k.value(), v.value().to_vec()))
            })
            .collect::<Result<_, StoreError>>()?;
        let Some(&(last, _)) = chunk.last() else {
            break;
        };
        for (k, mut bytes) in chunk {
            bytes.extend_from_slice(&task_tail);
            dec::<TaskRecord>("tasks", &bytes)?;
            tasks.insert(k, bytes.as_slice())?;
        }
        match last.checked_add(1) {
            Some(next) => from = next,
            None => break,
        }
    }
    // Attempts are checked by the last step of the chain (migrate_v3), which
    // always follows: only the newest shape decodes as an AttemptRecord.
    append_to_attempts(tx, &enc(&None::<muster_protocol::work::WorkResult>), false)
}

/// Schema 3 → 4: attempts gain `usage`, a trailing field (see [`migrate_v2`]
/// for why appending its empty value's encoding is the migration).
fn migrate_v3(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    append_to_attempts(tx, &enc(&None::<muster_protocol::msg::Usage>), true)
}

/// Appends `tail` to every attempt record; with `check`, each result must
/// decode as the current [`AttemptRecord`].
fn append_to_attempts(
    tx: &redb::WriteTransaction,
    attempt_tail: &[u8],
    check: bool,
) -> Result<(), StoreError> {
    let mut attempts = tx.open_table(ATTEMPTS)?;
    let mut from = (0, 0);
    loop {
        let chunk: Vec<((u64, u64), Vec<u8>)> = attempts
            .range(from..)?
            .take(MIGRATE_CHUNK)
            .map(|row| {
                let (k, v) = row?;
                Ok((k.value(), v.value().to_vec()))
            })
            .collect::<Result<_, StoreError>>()?;
        let Some(&(last, _)) = chunk.last() else {
            break;
        };
        for (k, mut bytes) in chunk {
            bytes.extend_from_slice(attempt_tail);
            if check {
                dec::<AttemptRecord>("attempts", &bytes)?;
            }
            attempts.insert(k, bytes.as_slice())?;
        }
        from = match (last.1.checked_add(1), last.0.checked_add(1)) {
            (Some(g), _) => (last.0, g),
            (None, Some(t)) => (t, 0),
            (None, None) => break,
        };
    }
    Ok(())
}

/// Records rewritten per step of a migration.
const MIGRATE_CHUNK: usize = 4096;

/// The code of a state in the `by_state` index keys: its position in
/// [`TaskState::ALL`]. Stored, so the order of `ALL` is part of the schema
/// (pinned by `tests/golden/hub-store/by_state_codes.hex`).
pub fn state_code(s: TaskState) -> u8 {
    TaskState::ALL.iter().position(|x| *x == s).unwrap_or(0) as u8
}

impl Store {
    /// Opens (or creates) the database and checks its schema version.
    ///
    /// # Errors
    /// [`StoreError`] when the file cannot be opened or is from a newer build.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::builder().create(path)?;
        let store = Store {
            db,
            live_states: Mutex::new(HashMap::new()),
        };
        store.init_schema()?;
        Ok(store)
    }

    fn init_schema(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let found = meta.get("schema_version")?.map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => return Err(StoreError::TooNew { found: v }),
                Some(v @ (1..=3)) => {
                    drop(meta);
                    if v == 1 {
                        migrate_v1(&tx)?;
                    }
                    if v <= 2 {
                        migrate_v2(&tx)?;
                    }
                    migrate_v3(&tx)?;
                    tx.open_table(META)?
                        .insert("schema_version", SCHEMA_VERSION)?;
                }
                Some(_) => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
            }
            // Create every table so read transactions never meet a missing one.
            tx.open_table(TASKS)?;
            tx.open_table(LIVE)?;
            tx.open_table(BY_STATE)?;
            tx.open_table(FINISHED)?;
            tx.open_table(ATTEMPTS)?;
            tx.open_table(KEYS)?;
            tx.open_table(EVENTS)?;
            tx.open_table(AGENTS)?;
            tx.open_table(IDENTITIES)?;
            tx.open_table(TOKENS)?;
            tx.open_table(API_TOKENS)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Applies one batch of core writes in one durable transaction.
    ///
    /// # Errors
    /// [`StoreError`] when the commit fails; nothing of the batch is then durable.
    pub fn commit(&self, writes: &[Write], events_max: u64) -> Result<(), StoreError> {
        match commit_kind(writes) {
            CommitKind::Nothing => return Ok(()),
            CommitKind::Flushed => {}
        }
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        let mut live_states = self
            .live_states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Applied to `live_states` only once the transaction has committed.
        let mut states: Vec<(u64, TaskState)> = Vec::new();
        {
            let mut tasks = tx.open_table(TASKS)?;
            let mut live = tx.open_table(LIVE)?;
            let mut by_state = tx.open_table(BY_STATE)?;
            let mut finished = tx.open_table(FINISHED)?;
            let mut attempts = tx.open_table(ATTEMPTS)?;
            let mut keys = tx.open_table(KEYS)?;
            let mut events = tx.open_table(EVENTS)?;
            let mut agents = tx.open_table(AGENTS)?;
            let mut identities = tx.open_table(IDENTITIES)?;
            let mut tokens = tx.open_table(TOKENS)?;
            let mut api_tokens = tx.open_table(API_TOKENS)?;
            let mut meta = tx.open_table(META)?;
            let mut last_event = None;
            for w in writes {
                match w {
                    Write::Task(t) => {
                        let id = t.id.0;
                        // (state, finished at) of what is stored now, if anything.
                        let old = match live_states.get(&id) {
                            Some(state) => Some((*state, 0)),
                            None => tasks
                                .get(id)?
                                .map(|v| dec::<TaskRecord>("tasks", v.value()))
                                .transpose()?
                                .map(|old| (old.state, old.updated_at)),
                        };
                        if let Some((state, updated_at)) = old {
                            by_state.remove((state_code(state), id))?;
                            if state.is_terminal() {
                                finished.remove((updated_at, id))?;
                            }
                        }
                        if t.state.is_terminal() {
                            finished.insert((t.updated_at, id), ())?;
                        }
                        by_state.insert((state_code(t.state), id), ())?;
                        if t.state.is_terminal() {
                            live.remove(id)?;
                        } else {
                            live.insert(id, ())?;
                        }
                        tasks.insert(id, enc(t).as_slice())?;
                        states.push((id, t.state));
                    }
                    Write::Attempt(a) => {
                        attempts.insert((a.task.0, a.generation.0), enc(a).as_slice())?;
                    }
                    Write::Agent(a) => {
                        agents.insert(a.name.as_str(), enc(a).as_slice())?;
                    }
                    Write::Identity(i) => {
                        identities.insert(i.fingerprint.as_str(), enc(i).as_slice())?;
                    }
                    Write::Token(hash, t) => {
                        tokens.insert(hash.as_str(), enc(t).as_slice())?;
                    }
                    Write::ApiToken(hash, t) => {
                        api_tokens.insert(hash.as_str(), enc(t).as_slice())?;
                    }
                    Write::Key(k, id) => {
                        keys.insert(k.as_str(), id.0)?;
                    }
                    Write::Event { seq, at, event } => {
                        events.insert(*seq, enc(&event_record(*seq, *at, event)).as_slice())?;
                        last_event = Some(*seq);
                    }
                    Write::NextTaskId(n) => {
                        meta.insert("next_task_id", *n)?;
                    }
                }
            }
            // The event log is pruned by count, oldest first.
            if let Some(last) = last_event {
                let floor = last.saturating_sub(events_max);
                if floor > 0 {
                    events.retain_in(..floor, |_, _| false)?;
                }
            }
        }
        tx.commit()?;
        for (id, state) in states {
            if state.is_terminal() {
                live_states.remove(&id);
            } else {
                live_states.insert(id, state);
            }
        }
        Ok(())
    }

    /// Deletes up to `max` tasks that finished before `before` (their attempts, indexes
    /// and idempotency keys too). Returns the ids pruned.
    ///
    /// # Errors
    /// [`StoreError`] when the transaction fails; nothing is then deleted.
    pub fn prune(&self, before: u64, max: usize) -> Result<Vec<TaskId>, StoreError> {
        let tx = self.db.begin_write()?;
        let mut pruned = Vec::new();
        {
            let mut finished = tx.open_table(FINISHED)?;
            let mut tasks = tx.open_table(TASKS)?;
            let mut by_state = tx.open_table(BY_STATE)?;
            let mut attempts = tx.open_table(ATTEMPTS)?;
            let mut keys = tx.open_table(KEYS)?;
            let expired: Vec<(u64, u64)> = finished
                .range((0, 0)..(before, 0))?
                .take(max)
                .map(|r| r.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            for (at, id) in expired {
                finished.remove((at, id))?;
                let rec = tasks
                    .remove(id)?
                    .map(|v| dec::<TaskRecord>("tasks", v.value()))
                    .transpose()?;
                if let Some(rec) = rec {
                    by_state.remove((state_code(rec.state), id))?;
                    if let Some(k) = &rec.key {
                        keys.remove(k.as_str())?;
                    }
                }
                attempts.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
                pruned.push(TaskId(id));
            }
        }
        tx.commit()?;
        Ok(pruned)
    }

    /// Reads what the core needs at startup: live tasks, registry, identities, tokens, keys.
    ///
    /// # Errors
    /// [`StoreError`] when a table cannot be read or a record does not decode.
    pub fn restore(&self, now: u64) -> Result<Restored, StoreError> {
        let tx = self.db.begin_read()?;
        let mut r = Restored::default();
        let tasks = tx.open_table(TASKS)?;
        let attempts = tx.open_table(ATTEMPTS)?;
        for id in tx.open_table(LIVE)?.iter()? {
            let id = id?.0.value();
            let Some(bytes) = tasks.get(id)? else {
                continue;
            };
            let rec: TaskRecord = dec("tasks", bytes.value())?;
            let attempt = if rec.generation.0 > 0 {
                attempts
                    .get((id, rec.generation.0))?
                    .map(|v| dec::<AttemptRecord>("attempts", v.value()))
                    .transpose()?
            } else {
                None
            };
            r.live.push((rec, attempt));
        }
        for row in tx.open_table(AGENTS)?.iter()? {
            r.agents.push(dec("agents", row?.1.value())?);
        }
        for row in tx.open_table(IDENTITIES)?.iter()? {
            r.identities.push(dec("identities", row?.1.value())?);
        }
        for row in tx.open_table(TOKENS)?.iter()? {
            let (k, v) = row?;
            let t: TokenRecord = dec("tokens", v.value())?;
            // Expired or used tokens still answer "expired"/"used" for a day, then go.
            if t.expires_at + 86_400_000 > now {
                r.tokens.push((k.value().to_string(), t));
            }
        }
        for row in tx.open_table(API_TOKENS)?.iter()? {
            let (k, v) = row?;
            let t: crate::core::web::ApiToken = dec("api_tokens", v.value())?;
            // Only live tokens authorize; expired and revoked ones stay on disk as a record.
            if t.revoked_at.is_none() && t.expires_at > now {
                r.api_tokens.push((k.value().to_string(), t));
            }
        }
        for row in tx.open_table(KEYS)?.iter()? {
            let (k, v) = row?;
            r.keys.push((k.value().to_string(), TaskId(v.value())));
        }
        let meta = tx.open_table(META)?;
        r.next_task_id = meta.get("next_task_id")?.map(|v| v.value()).unwrap_or(1);
        r.next_event_seq = tx
            .open_table(EVENTS)?
            .last()?
            .map(|(k, _)| k.value() + 1)
            .unwrap_or(1);
        Ok(r)
    }

    /// A read snapshot, for queries and the core's [`Archive`].
    ///
    /// # Errors
    /// [`StoreError`] when redb cannot start a read transaction.
    pub fn reader(&self) -> Result<Reader, StoreError> {
        Ok(Reader {
            tx: self.db.begin_read()?,
        })
    }

    /// Writes and reads back a probe row: is the store writable?
    ///
    /// # Errors
    /// [`StoreError`] when the write fails.
    pub fn probe(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let n = meta.get("probe")?.map(|v| v.value()).unwrap_or(0);
            meta.insert("probe", n + 1)?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// A consistent read snapshot of the store.
pub struct Reader {
    tx: ReadTransaction,
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

impl Reader {
    /// A task by id.
    ///
    /// # Errors
    /// [`StoreError`] on a read or decode failure.
    pub fn task(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let t = self.tx.open_table(TASKS)?;
        t.get(id.0)?.map(|v| dec("tasks", v.value())).transpose()
    }

    /// Every attempt of a task, oldest first.
    ///
    /// # Errors
    /// [`StoreError`] on a read or decode failure.
    pub fn attempts(&self, id: TaskId) -> Result<Vec<AttemptRecord>, StoreError> {
        let t = self.tx.open_table(ATTEMPTS)?;
        let mut out = Vec::new();
        for row in t.range((id.0, 0)..=(id.0, u64::MAX))? {
            out.push(dec("attempts", row?.1.value())?);
        }
        Ok(out)
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
        let t = self.tx.open_table(ATTEMPTS)?;
        let mut out = Vec::new();
        for row in t.range((id.0, 0)..=(id.0, u64::MAX))?.rev().take(max) {
            out.push(dec("attempts", row?.1.value())?);
        }
        Ok(out)
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
        let tasks = self.tx.open_table(TASKS)?;
        let below = cursor.unwrap_or(u64::MAX);
        let mut out = Vec::new();
        let mut last = None;
        let mut scanned = 0;
        let push = |raw: &[u8], out: &mut Vec<TaskRecord>| -> Result<(), StoreError> {
            if filter.may_match(raw) {
                let rec: TaskRecord = dec("tasks", raw)?;
                if filter.matches(&rec) {
                    out.push(rec);
                }
            }
            Ok(())
        };
        if let Some(s) = filter.state {
            let idx = self.tx.open_table(BY_STATE)?;
            let code = state_code(s);
            for row in idx.range((code, 0)..(code, below))?.rev() {
                let id = row?.0.value().1;
                last = Some(id);
                scanned += 1;
                if let Some(v) = tasks.get(id)? {
                    push(v.value(), &mut out)?;
                }
                if out.len() >= limit || scanned >= SCAN_ROWS_MAX {
                    break;
                }
            }
        } else {
            for row in tasks.range(..below)?.rev() {
                let (k, v) = row?;
                last = Some(k.value());
                scanned += 1;
                push(v.value(), &mut out)?;
                if out.len() >= limit || scanned >= SCAN_ROWS_MAX {
                    break;
                }
            }
        }
        let more = out.len() >= limit || scanned >= SCAN_ROWS_MAX;
        Ok(Page {
            tasks: out,
            next_cursor: if more { last } else { None },
        })
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
        let t = self.tx.open_table(EVENTS)?;
        let oldest = t.first()?.map(|(k, _)| k.value());
        let mut out = Vec::new();
        for row in t.range(from..)?.take(limit) {
            out.push(dec("events", row?.1.value())?);
        }
        Ok((out, oldest))
    }

    /// The last event sequence number, if any.
    ///
    /// # Errors
    /// [`StoreError`] on a read failure.
    pub fn last_event(&self) -> Result<Option<u64>, StoreError> {
        let t = self.tx.open_table(EVENTS)?;
        Ok(t.last()?.map(|(k, _)| k.value()))
    }

    /// Every agent in the registry.
    ///
    /// # Errors
    /// [`StoreError`] on a read or decode failure.
    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let t = self.tx.open_table(AGENTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            out.push(dec("agents", row?.1.value())?);
        }
        Ok(out)
    }

    /// Every identity.
    ///
    /// # Errors
    /// [`StoreError`] on a read or decode failure.
    pub fn identities(&self) -> Result<Vec<Identity>, StoreError> {
        let t = self.tx.open_table(IDENTITIES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            out.push(dec("identities", row?.1.value())?);
        }
        Ok(out)
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

    fn task(id: u64, state: TaskState, at: u64, key: Option<&str>) -> TaskRecord {
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
    fn one_of_each_write() -> Vec<(&'static str, Write)> {
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
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join(DB_FILE)).expect("open");
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
        assert_eq!(live, vec![1, 4]);
        let page = store
            .reader()
            .expect("reader")
            .tasks(Some(TaskState::Completed), None, None, 10, None)
            .expect("page");
        assert_eq!(
            page.tasks.iter().map(|t| t.id.0).collect::<Vec<_>>(),
            vec![2]
        );
        let pruned = store.prune(1_000, 10).expect("prune");
        assert_eq!(
            pruned,
            vec![TaskId(2)],
            "only the completed task older than the cutoff"
        );
        let reader = store.reader().expect("reader");
        assert!(reader.task(TaskId(2)).expect("read").is_none());
        assert!(
            reader.task(TaskId(3)).expect("read").is_some(),
            "finished after the cutoff: kept"
        );
        assert!(
            reader.task(TaskId(1)).expect("read").is_some(),
            "requeued: live, kept"
        );
        assert!(
            store.restore(0).expect("restore").keys.is_empty(),
            "its key is gone too"
        );
    }

    /// Each task is listed under exactly one state, whether its old index entry came
    /// from the in-memory cache of committed states or from reading the record back
    /// (a fresh process, a finished task requeued).
    #[test]
    fn each_task_is_indexed_under_exactly_its_current_state() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(DB_FILE);
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
        let store = Store::open(&path).expect("open");
        let steps = [
            (TaskState::Queued, 100),
            (TaskState::Assigned, 110),
            (TaskState::Running, 120),
        ];
        for (state, at) in steps {
            store
                .commit(&[Write::Task(task(7, state, at, None))], 1000)
                .expect("commit");
            assert_eq!(listed(&store), vec![(state, vec![7])]);
        }
        drop(store);
        // A new process knows nothing of what was committed: it reads the record back.
        let store = Store::open(&path).expect("reopen");
        for (state, at) in [
            (TaskState::Completed, 130),
            (TaskState::Queued, 140),
            (TaskState::Running, 150),
            (TaskState::Failed, 160),
        ] {
            store
                .commit(&[Write::Task(task(7, state, at, None))], 1000)
                .expect("commit");
            assert_eq!(listed(&store), vec![(state, vec![7])], "after {state:?}");
        }
        let pruned = store.prune(1_000, 10).expect("prune");
        assert_eq!(
            pruned,
            vec![TaskId(7)],
            "one finished-index entry, the last"
        );
    }

    #[test]
    fn a_schema_3_database_is_migrated_giving_attempts_empty_usage() {
        use muster_protocol::Generation;
        use muster_protocol::msg::Outcome;
        /// An attempt as schema 3 wrote it: the fields before `usage`.
        #[derive(serde::Serialize)]
        struct AttemptV3 {
            task: TaskId,
            generation: Generation,
            agent: String,
            assigned_at: u64,
            accepted_at: Option<u64>,
            started_at: Option<u64>,
            ended_at: Option<u64>,
            outcome: Option<Outcome>,
            error: Option<muster_protocol::msg::Failure>,
            pid: Option<u32>,
            session: Option<String>,
            work: Option<muster_protocol::work::WorkResult>,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE);
        let work = muster_protocol::work::WorkResult {
            branch: "muster/7".into(),
            head: "h".into(),
            commits: 2,
            ..Default::default()
        };
        {
            let db = Database::builder().create(&path).expect("create");
            let tx = db.begin_write().expect("write");
            {
                tx.open_table(META)
                    .expect("meta")
                    .insert("schema_version", 3)
                    .expect("insert");
                let mut tasks = tx.open_table(TASKS).expect("tasks");
                let mut attempts = tx.open_table(ATTEMPTS).expect("attempts");
                for id in [1u64, 2, 5000] {
                    let t = task(id, TaskState::Completed, 20, None);
                    tasks.insert(id, enc(&t).as_slice()).expect("insert");
                    for g in 1..=2 {
                        let a = AttemptV3 {
                            task: TaskId(id),
                            generation: Generation(g),
                            agent: "b1".into(),
                            assigned_at: 11,
                            accepted_at: Some(12),
                            started_at: Some(13),
                            ended_at: Some(20),
                            outcome: Some(Outcome::Completed),
                            error: None,
                            pid: Some(42),
                            session: Some("s".into()),
                            work: Some(work.clone()),
                        };
                        attempts
                            .insert((id, g), enc(&a).as_slice())
                            .expect("insert");
                    }
                }
            }
            tx.commit().expect("commit");
        }
        let store = Store::open(&path).expect("the schema 3 file opens and migrates");
        let reader = store.reader().expect("reader");
        for id in [1u64, 2, 5000] {
            let a = reader.newest_attempts(TaskId(id), 5).expect("attempts");
            assert_eq!(a.len(), 2);
            for a in a {
                assert_eq!((a.pid, a.usage), (Some(42), None));
                assert_eq!(a.work.as_ref(), Some(&work));
            }
        }
        drop(reader);
        drop(store);
        let store = Store::open(&path).expect("reopen");
        let a = store
            .reader()
            .expect("reader")
            .newest_attempts(TaskId(2), 5)
            .expect("attempts");
        assert_eq!(a.len(), 2, "opening again changes nothing");
    }

    #[test]
    fn a_schema_2_database_is_migrated_giving_tasks_and_attempts_empty_work_fields() {
        use crate::core::Audit;
        use muster_protocol::Generation;
        use muster_protocol::msg::{Outcome, TimeoutAction};
        /// A task as schema 2 wrote it: the fields before `repo`.
        #[derive(serde::Serialize)]
        struct TaskV2 {
            id: TaskId,
            title: String,
            description: String,
            capabilities: Vec<String>,
            priority: i32,
            max_attempts: u32,
            timeout_ms: Option<u64>,
            timeout_action: TimeoutAction,
            after: Vec<TaskId>,
            key: Option<String>,
            state: TaskState,
            generation: Generation,
            attempts: u32,
            not_before: Option<u64>,
            agent: Option<String>,
            submitted_at: u64,
            updated_at: u64,
            progress_at: Option<u64>,
            progress_note: Option<String>,
            result: Option<String>,
            reason: Option<String>,
            audit: Vec<Audit>,
        }
        /// An attempt as schema 2 wrote it: the fields before `work`.
        #[derive(serde::Serialize)]
        struct AttemptV2 {
            task: TaskId,
            generation: Generation,
            agent: String,
            assigned_at: u64,
            accepted_at: Option<u64>,
            started_at: Option<u64>,
            ended_at: Option<u64>,
            outcome: Option<Outcome>,
            error: Option<muster_protocol::msg::Failure>,
            pid: Option<u32>,
            session: Option<String>,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE);
        {
            let db = Database::builder().create(&path).expect("create");
            let tx = db.begin_write().expect("write");
            {
                tx.open_table(META)
                    .expect("meta")
                    .insert("schema_version", 2)
                    .expect("insert");
                let mut tasks = tx.open_table(TASKS).expect("tasks");
                let mut attempts = tx.open_table(ATTEMPTS).expect("attempts");
                for id in [1u64, 2, 5000] {
                    let t = TaskV2 {
                        id: TaskId(id),
                        title: format!("task {id}"),
                        description: "d".into(),
                        capabilities: vec!["rust".into()],
                        priority: 3,
                        max_attempts: 2,
                        timeout_ms: Some(9),
                        timeout_action: TimeoutAction::Retry,
                        after: vec![],
                        key: Some(format!("k{id}")),
                        state: TaskState::Completed,
                        generation: Generation(1),
                        attempts: 1,
                        not_before: None,
                        agent: Some("b1".into()),
                        submitted_at: 10,
                        updated_at: 20,
                        progress_at: Some(15),
                        progress_note: Some("half".into()),
                        result: Some("ok".into()),
                        reason: None,
                        audit: vec![Audit {
                            at: 10,
                            who: "admin".into(),
                            action: "submit".into(),
                        }],
                    };
                    tasks.insert(id, enc(&t).as_slice()).expect("insert");
                    let a = AttemptV2 {
                        task: TaskId(id),
                        generation: Generation(1),
                        agent: "b1".into(),
                        assigned_at: 11,
                        accepted_at: Some(12),
                        started_at: Some(13),
                        ended_at: Some(20),
                        outcome: Some(Outcome::Completed),
                        error: None,
                        pid: Some(42),
                        session: Some("s".into()),
                    };
                    attempts
                        .insert((id, 1), enc(&a).as_slice())
                        .expect("insert");
                }
            }
            tx.commit().expect("commit");
        }
        let store = Store::open(&path).expect("the schema 2 file opens and migrates");
        let reader = store.reader().expect("reader");
        for id in [1u64, 2, 5000] {
            let t = reader.task(TaskId(id)).expect("read").expect("kept");
            assert_eq!(
                (t.title.as_str(), t.key.as_deref()),
                (
                    format!("task {id}").as_str(),
                    Some(format!("k{id}").as_str())
                )
            );
            assert_eq!(t.progress_note.as_deref(), Some("half"));
            assert_eq!(t.audit.len(), 1);
            assert_eq!(
                (t.repo, t.base, t.env.len(), t.labels.len()),
                (None, None, 0, 0)
            );
            let a = reader.newest_attempts(TaskId(id), 5).expect("attempts");
            assert_eq!(a.len(), 1);
            assert_eq!((a[0].pid, a[0].session.as_deref()), (Some(42), Some("s")));
            assert_eq!(a[0].work, None);
        }
        drop(reader);
        drop(store);
        // Opening again finds the current version and changes nothing.
        let store = Store::open(&path).expect("reopen");
        let t = store
            .reader()
            .expect("reader")
            .task(TaskId(2))
            .expect("read");
        assert_eq!(t.map(|t| t.result), Some(Some("ok".into())));
    }

    #[test]
    fn a_schema_1_database_is_migrated_keeping_each_agents_claims_as_its_grant() {
        use muster_protocol::msg::Role;
        #[derive(serde::Serialize)]
        struct IdentityV1<'a> {
            name: &'a str,
            role: Role,
            fingerprint: &'a str,
            key_fingerprint: &'a str,
            created_at: u64,
            revoked_at: Option<u64>,
        }
        #[derive(serde::Serialize)]
        struct TokenV1 {
            role: Role,
            created_by: String,
            created_at: u64,
            expires_at: u64,
            used_at: Option<u64>,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE);
        {
            let db = Database::builder().create(&path).expect("create");
            let tx = db.begin_write().expect("write");
            {
                tx.open_table(META)
                    .expect("meta")
                    .insert("schema_version", 1)
                    .expect("insert");
                let mut ids = tx.open_table(IDENTITIES).expect("identities");
                for (name, role, fp) in [
                    ("b1", Role::Agent, "fp1"),
                    ("new", Role::Agent, "fp2"),
                    ("admin", Role::Admin, "fp3"),
                ] {
                    let v = IdentityV1 {
                        name,
                        role,
                        fingerprint: fp,
                        key_fingerprint: "k",
                        created_at: 1,
                        revoked_at: None,
                    };
                    ids.insert(fp, enc(&v).as_slice()).expect("insert");
                }
                let t = TokenV1 {
                    role: Role::Agent,
                    created_by: "admin".into(),
                    created_at: 1,
                    expires_at: u64::MAX / 2,
                    used_at: None,
                };
                tx.open_table(TOKENS)
                    .expect("tokens")
                    .insert("hash", enc(&t).as_slice())
                    .expect("insert");
                let agent = AgentRecord {
                    name: "b1".into(),
                    version: "0.1.0".into(),
                    capabilities: vec!["rust".into()],
                    slots: 3,
                    enrolled_at: 1,
                    last_seen: None,
                    host: None,
                    self_test: None,
                    drained: false,
                    revoked: false,
                };
                tx.open_table(AGENTS)
                    .expect("agents")
                    .insert("b1", enc(&agent).as_slice())
                    .expect("insert");
            }
            tx.commit().expect("commit");
        }
        let store = Store::open(&path).expect("the old file opens and migrates");
        let r = store.restore(2).expect("restore");
        let by_fp = |fp: &str| {
            r.identities
                .iter()
                .find(|i| i.fingerprint == fp)
                .cloned()
                .expect("identity kept")
        };
        let b1 = by_fp("fp1");
        assert_eq!((b1.capabilities, b1.slots), (vec!["rust".to_string()], 3));
        let new = by_fp("fp2");
        assert_eq!((new.capabilities.len(), new.slots), (0, 1));
        assert_eq!(by_fp("fp3").role, Role::Admin);
        let (_, t) = &r.tokens[0];
        assert_eq!((t.name.clone(), t.slots), (None, None));
        drop(store);
        // Opening again finds version 2 and changes nothing.
        let store = Store::open(&path).expect("reopen");
        assert_eq!(store.restore(2).expect("restore").identities.len(), 3);
    }
}
