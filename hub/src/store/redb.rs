//! The embedded backend: one redb file in the data directory ([`DB_FILE`]).
//!
//! ```text
//! meta        &str          -> u64            schema_version, next_task_id
//! tasks       u64 task      -> TaskRecord      every task, live or finished
//! by_state    (u8, u64)     -> ()              (state, task): `tasks --state`, and restart reads only the unfinished
//! finished    (u64, u64)    -> ()              (finished at, task): retention pruning reads only what expired
//! attempts    (u64, u64)    -> AttemptRecord   (task, generation)
//! keys        &str          -> u64             idempotency key -> task
//! events      u64 seq       -> EventRecord     the event log, pruned by count
//! agents      &str name     -> AgentRecord     the registry
//! identities  &str sha256   -> Identity        certificate fingerprint -> identity
//! tokens      &str sha256   -> TokenRecord     hash of a join token's secret -> token
//! api_tokens  &str sha256   -> ApiToken        hash of an API token's secret -> token
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use muster_protocol::TaskId;
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
};

use super::{
    Backend, Page, SCHEMA_VERSION, Scan, SchemaState, Snapshot, StoreError, StoreKind, TaskFilter,
    dec, enc, event_record, state_code,
};
use crate::core::{
    AgentRecord, AttemptRecord, EventRecord, Identity, Restored, TaskRecord, TaskState,
    TokenRecord, Write,
};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const TASKS: TableDefinition<u64, &[u8]> = TableDefinition::new("tasks");
/// Unfinished tasks, up to schema 4: `by_state` holds the same set, so writing
/// both cost two B-tree writes per task for nothing (schema 5 drops it).
const LIVE_V4: TableDefinition<u64, ()> = TableDefinition::new("live");
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
pub struct RedbStore {
    db: Database,
    /// The committed state of the unfinished tasks this process has written, so a
    /// commit can move their index entries without reading and decoding the old record.
    live_states: Mutex<HashMap<u64, TaskState>>,
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

/// Rows per chunk of `store copy`.
const DUMP_CHUNK: usize = 2_000;

/// Which table a [`RedbDump`] reads next.
#[derive(Clone, PartialEq, Eq)]
enum DumpAt {
    Tasks(Option<u64>),
    Attempts(Option<(u64, u64)>),
    Events(Option<u64>),
    Keys(Option<String>),
    Keyed(usize, Option<String>),
    Meta,
    Done,
}

/// Every table of a redb store, read in chunks from one read transaction
/// (one snapshot), for `store copy`.
pub(crate) struct RedbDump {
    tx: ReadTransaction,
    at: DumpAt,
}

/// The tables keyed by text that hold bincode records, in copy order.
const KEYED: [(&str, TableDefinition<&str, &[u8]>); 4] = [
    ("agents", AGENTS),
    ("identities", IDENTITIES),
    ("tokens", TOKENS),
    ("api_tokens", API_TOKENS),
];

impl RedbDump {
    /// The next chunk of rows (at most [`DUMP_CHUNK`]), `None` after the last.
    pub(crate) fn next_chunk(&mut self) -> Result<Option<super::postgres::Columns>, StoreError> {
        use std::ops::Bound::{Excluded, Unbounded};
        let mut c = super::postgres::Columns::default();
        loop {
            match self.at.clone() {
                DumpAt::Tasks(after) => {
                    let t = self.tx.open_table(TASKS)?;
                    let lo = after.map_or(Unbounded, Excluded);
                    let mut last = None;
                    for row in t.range::<u64>((lo, Unbounded))?.take(DUMP_CHUNK) {
                        let (k, v) = row?;
                        let rec: TaskRecord = dec("tasks", v.value())?;
                        c.push_task(k.value(), &rec, v.value().to_vec());
                        last = Some(k.value());
                    }
                    self.at = match last {
                        Some(l) => DumpAt::Tasks(Some(l)),
                        None => DumpAt::Attempts(None),
                    };
                }
                DumpAt::Attempts(after) => {
                    let t = self.tx.open_table(ATTEMPTS)?;
                    let lo = after.map_or(Unbounded, Excluded);
                    let mut last = None;
                    for row in t.range::<(u64, u64)>((lo, Unbounded))?.take(DUMP_CHUNK) {
                        let (k, v) = row?;
                        let (task, generation) = k.value();
                        c.push_attempt(task, generation, v.value().to_vec());
                        last = Some((task, generation));
                    }
                    self.at = match last {
                        Some(l) => DumpAt::Attempts(Some(l)),
                        None => DumpAt::Events(None),
                    };
                }
                DumpAt::Events(after) => {
                    let t = self.tx.open_table(EVENTS)?;
                    let lo = after.map_or(Unbounded, Excluded);
                    let mut last = None;
                    for row in t.range::<u64>((lo, Unbounded))?.take(DUMP_CHUNK) {
                        let (k, v) = row?;
                        c.push_event(k.value(), v.value().to_vec());
                        last = Some(k.value());
                    }
                    self.at = match last {
                        Some(l) => DumpAt::Events(Some(l)),
                        None => DumpAt::Keys(None),
                    };
                }
                DumpAt::Keys(after) => {
                    let t = self.tx.open_table(KEYS)?;
                    let mut last = None;
                    let rows = match &after {
                        Some(a) => t.range::<&str>((Excluded(a.as_str()), Unbounded))?,
                        None => t.range::<&str>(..)?,
                    };
                    for row in rows.take(DUMP_CHUNK) {
                        let (k, v) = row?;
                        c.push_key(k.value(), v.value());
                        last = Some(k.value().to_string());
                    }
                    self.at = match last {
                        Some(l) => DumpAt::Keys(Some(l)),
                        None => DumpAt::Keyed(0, None),
                    };
                }
                DumpAt::Keyed(i, after) => {
                    let Some((name, def)) = KEYED.get(i) else {
                        self.at = DumpAt::Meta;
                        continue;
                    };
                    let t = self.tx.open_table(*def)?;
                    let mut last = None;
                    let rows = match &after {
                        Some(a) => t.range::<&str>((Excluded(a.as_str()), Unbounded))?,
                        None => t.range::<&str>(..)?,
                    };
                    for row in rows.take(DUMP_CHUNK) {
                        let (k, v) = row?;
                        c.push_keyed(name, k.value(), v.value().to_vec());
                        last = Some(k.value().to_string());
                    }
                    self.at = match last {
                        Some(l) => DumpAt::Keyed(i, Some(l)),
                        None => DumpAt::Keyed(i + 1, None),
                    };
                }
                DumpAt::Meta => {
                    let meta = self.tx.open_table(META)?;
                    if let Some(n) = meta.get("next_task_id")? {
                        c.set_next_task_id(n.value());
                    }
                    self.at = DumpAt::Done;
                    return Ok(Some(c));
                }
                DumpAt::Done => return Ok(None),
            }
            if !c.is_empty() {
                return Ok(Some(c));
            }
        }
    }
}

/// Where the schema of the redb file at `path` stands, without changing it.
///
/// # Errors
/// [`StoreError`] when the file cannot be opened (a running hub holds it) or read.
pub fn schema_state(path: &Path) -> Result<SchemaState, StoreError> {
    if !path.exists() {
        return Ok(SchemaState::Missing);
    }
    let db = Database::open(path)?;
    let tx = db.begin_read()?;
    let found = match tx.open_table(META) {
        Ok(meta) => meta.get("schema_version")?.map(|v| v.value()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(e.into()),
    };
    Ok(match found {
        None => SchemaState::Missing,
        Some(v) if v > SCHEMA_VERSION => SchemaState::Newer(v),
        Some(v) if v < SCHEMA_VERSION => SchemaState::Older(v),
        Some(_) => SchemaState::Current,
    })
}

impl RedbStore {
    /// Every table, in chunks from one snapshot (`store copy`).
    ///
    /// # Errors
    /// [`StoreError`] when no read transaction can start.
    pub(crate) fn dump(&self) -> Result<RedbDump, StoreError> {
        Ok(RedbDump {
            tx: self.db.begin_read()?,
            at: DumpAt::Tasks(None),
        })
    }

    /// Opens (or creates) the database and checks its schema version.
    ///
    /// # Errors
    /// [`StoreError`] when the file cannot be opened or is from a newer build.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db = Database::builder().create(path)?;
        let store = RedbStore {
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
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::TooNew {
                        found: v,
                        supported: SCHEMA_VERSION,
                    });
                }
                Some(v @ (1..=4)) => {
                    drop(meta);
                    if v == 1 {
                        migrate_v1(&tx)?;
                    }
                    if v <= 2 {
                        migrate_v2(&tx)?;
                    }
                    if v <= 3 {
                        migrate_v3(&tx)?;
                    }
                    // 4 → 5: the `live` table goes (see `LIVE_V4`).
                    tx.delete_table(LIVE_V4)?;
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
}

impl Backend for RedbStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Redb
    }

    fn commit(&self, writes: &[Write], events_max: u64) -> Result<(), StoreError> {
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
    fn prune(&self, before: u64, max: usize) -> Result<Vec<TaskId>, StoreError> {
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
    fn restore(&self, now: u64) -> Result<Restored, StoreError> {
        let tx = self.db.begin_read()?;
        let mut r = Restored::default();
        let tasks = tx.open_table(TASKS)?;
        let attempts = tx.open_table(ATTEMPTS)?;
        let by_state = tx.open_table(BY_STATE)?;
        let mut live = Vec::new();
        for state in TaskState::ALL.into_iter().filter(|s| !s.is_terminal()) {
            let code = state_code(state);
            for row in by_state.range((code, 0)..=(code, u64::MAX))? {
                live.push(row?.0.value().1);
            }
        }
        // In the order of the ids, as the core's queue was built before.
        live.sort_unstable();
        for id in live {
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
    fn reader(&self) -> Result<Box<dyn Snapshot>, StoreError> {
        Ok(Box::new(RedbSnapshot {
            tx: self.db.begin_read()?,
        }))
    }

    /// Writes and reads back a probe row: is the store writable?
    ///
    /// # Errors
    /// [`StoreError`] when the write fails.
    fn probe(&self) -> Result<(), StoreError> {
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

/// A consistent read snapshot: one redb read transaction.
struct RedbSnapshot {
    tx: ReadTransaction,
}

impl Snapshot for RedbSnapshot {
    fn task(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let t = self.tx.open_table(TASKS)?;
        t.get(id.0)?.map(|v| dec("tasks", v.value())).transpose()
    }

    fn attempts(&self, id: TaskId) -> Result<Vec<AttemptRecord>, StoreError> {
        let t = self.tx.open_table(ATTEMPTS)?;
        let mut out = Vec::new();
        for row in t.range((id.0, 0)..=(id.0, u64::MAX))? {
            out.push(dec("attempts", row?.1.value())?);
        }
        Ok(out)
    }

    fn newest_attempts(&self, id: TaskId, max: usize) -> Result<Vec<AttemptRecord>, StoreError> {
        let t = self.tx.open_table(ATTEMPTS)?;
        let mut out = Vec::new();
        for row in t.range((id.0, 0)..=(id.0, u64::MAX))?.rev().take(max) {
            out.push(dec("attempts", row?.1.value())?);
        }
        Ok(out)
    }

    fn tasks_matching(
        &self,
        filter: &TaskFilter,
        limit: usize,
        cursor: Option<u64>,
    ) -> Result<Page, StoreError> {
        let tasks = self.tx.open_table(TASKS)?;
        let below = cursor.unwrap_or(u64::MAX);
        let mut scan = Scan::new(filter, limit);
        if let Some(s) = filter.state {
            let idx = self.tx.open_table(BY_STATE)?;
            let code = state_code(s);
            for row in idx.range((code, 0)..(code, below))?.rev() {
                let id = row?.0.value().1;
                let raw = tasks.get(id)?;
                if scan.offer(id, raw.as_ref().map(|v| v.value()))? {
                    break;
                }
            }
        } else {
            for row in tasks.range(..below)?.rev() {
                let (k, v) = row?;
                if scan.offer(k.value(), Some(v.value()))? {
                    break;
                }
            }
        }
        Ok(scan.finish())
    }

    fn events(
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

    fn last_event(&self) -> Result<Option<u64>, StoreError> {
        let t = self.tx.open_table(EVENTS)?;
        Ok(t.last()?.map(|(k, _)| k.value()))
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let t = self.tx.open_table(AGENTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            out.push(dec("agents", row?.1.value())?);
        }
        Ok(out)
    }

    fn identities(&self) -> Result<Vec<Identity>, StoreError> {
        let t = self.tx.open_table(IDENTITIES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            out.push(dec("identities", row?.1.value())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use muster_protocol::TaskId;

    use super::*;
    use crate::store::tests::task;
    use crate::store::{DB_FILE, Store};
    #[test]
    fn a_schema_4_database_loses_its_live_table_and_restores_the_same_tasks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE);
        {
            let store = RedbStore::open(&path).expect("create");
            let writes: Vec<Write> = [
                (3, TaskState::Running),
                (1, TaskState::Queued),
                (2, TaskState::Completed),
                (4, TaskState::Assigned),
                (5, TaskState::Failed),
            ]
            .into_iter()
            .map(|(id, state)| Write::Task(task(id, state, 10, None)))
            .collect();
            store.commit(&writes, 100).expect("commit");
            // What schema 4 had beside: the unfinished tasks in `live`.
            let tx = store.db.begin_write().expect("write");
            {
                let mut live = tx.open_table(LIVE_V4).expect("live");
                for id in [1u64, 3, 4] {
                    live.insert(id, ()).expect("insert");
                }
                tx.open_table(META)
                    .expect("meta")
                    .insert("schema_version", 4)
                    .expect("insert");
            }
            tx.commit().expect("commit");
        }
        let store = RedbStore::open(&path).expect("the schema 4 file opens and migrates");
        let tx = store.db.begin_read().expect("read");
        let tables: Vec<String> = tx
            .list_tables()
            .expect("tables")
            .map(|t| redb::TableHandle::name(&t).to_string())
            .collect();
        assert!(!tables.iter().any(|t| t == "live"), "{tables:?}");
        let version = tx
            .open_table(META)
            .expect("meta")
            .get("schema_version")
            .expect("get")
            .map(|v| v.value());
        assert_eq!(version, Some(SCHEMA_VERSION));
        drop(tx);
        let live: Vec<u64> = store
            .restore(0)
            .expect("restore")
            .live
            .iter()
            .map(|(t, _)| t.id.0)
            .collect();
        assert_eq!(live, [1, 3, 4], "the unfinished tasks, in id order");
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
