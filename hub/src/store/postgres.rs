//! The PostgreSQL backend: the same records as redb, in the schema `muster`,
//! so several hubs can share one database (one leader at a time, fenced by
//! the term in `muster.leader`).
//!
//! ```text
//! meta        key text          -> value bigint     schema_version, next_task_id, probe
//! tasks       id bigint         -> rec bytea         + state, live, finished_at, generation (index columns)
//! attempts    (task, generation)-> rec bytea
//! keys        key bytea         -> task bigint       idempotency key (bytea: a key may hold NUL, which text refuses)
//! events      seq bigint        -> rec bytea         the event log, pruned by count
//! agents      name bytea        -> rec bytea
//! identities  fingerprint bytea -> rec bytea
//! tokens      hash bytea        -> rec bytea
//! api_tokens  hash bytea        -> rec bytea
//! leader      id = 1            -> term, hub, addr, renewed_at     the leader's term: every write checks it
//! hubs        name text         -> addr, started_at, seen_at       the hubs sharing this database
//! ```
//!
//! [`PgStore`] owns a small tokio runtime of its own and its connections; every
//! call blocks on it, so callers stay synchronous like the redb backend's (and
//! must not call it from inside an async runtime). A commit is one transaction:
//! the term check (`SELECT … FOR SHARE`) and one multi-row upsert per table,
//! pipelined on the one connection, then `COMMIT` with `synchronous_commit`
//! as the server has it (on by default): nothing is acknowledged before that
//! returns.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use muster_protocol::TaskId;
use tokio::runtime::{Handle, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

use super::{
    Backend, CopyCounts, Page, Scan, SchemaState, Snapshot, StoreError, StoreKind, TaskFilter, dec,
    enc, event_record, state_code,
};
use crate::core::{
    AgentRecord, AttemptRecord, EventRecord, Identity, Restored, TaskRecord, TokenRecord, Write,
};

/// The schema version of `muster.*` this build writes; a newer one is refused.
///
/// 1: the first (records as redb schema 4 holds them).
pub const PG_SCHEMA_VERSION: u64 = 1;

/// The transaction-level advisory lock held while the schema is created or
/// migrated, so two hubs starting at once do not race ("muster" + 1).
const MIGRATION_LOCK: i64 = 0x6d75_7374_6572_0001;

/// How long one store operation may wait for the server before it fails, so a
/// hung database stops the core with an error instead of holding it forever.
const OP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Reader connections kept open for the next snapshot; more are opened on
/// demand and closed when their snapshot ends.
const READERS_POOLED_MAX: usize = 4;

/// Rows fetched per round trip when a listing walks the tasks.
const SCAN_CHUNK_MAX: i64 = 2_000;

/// The schema at version 1, created in one transaction.
const SCHEMA_V1: &str = "
CREATE TABLE muster.tasks (
    id bigint PRIMARY KEY,
    state smallint NOT NULL,
    live boolean NOT NULL,
    finished_at bigint,
    generation bigint NOT NULL,
    rec bytea NOT NULL
);
CREATE INDEX tasks_by_state ON muster.tasks (state, id);
CREATE INDEX tasks_live ON muster.tasks (id) WHERE live;
CREATE INDEX tasks_finished ON muster.tasks (finished_at, id) WHERE finished_at IS NOT NULL;
CREATE TABLE muster.attempts (
    task bigint NOT NULL,
    generation bigint NOT NULL,
    rec bytea NOT NULL,
    PRIMARY KEY (task, generation)
);
CREATE TABLE muster.keys (key bytea PRIMARY KEY, task bigint NOT NULL);
CREATE TABLE muster.events (seq bigint PRIMARY KEY, rec bytea NOT NULL);
CREATE TABLE muster.agents (name bytea PRIMARY KEY, rec bytea NOT NULL);
CREATE TABLE muster.identities (fingerprint bytea PRIMARY KEY, rec bytea NOT NULL);
CREATE TABLE muster.tokens (hash bytea PRIMARY KEY, rec bytea NOT NULL);
CREATE TABLE muster.api_tokens (hash bytea PRIMARY KEY, rec bytea NOT NULL);
CREATE TABLE muster.leader (
    id int PRIMARY KEY CHECK (id = 1),
    term bigint NOT NULL,
    hub text NOT NULL DEFAULT '',
    addr text NOT NULL DEFAULT '',
    renewed_at timestamptz
);
INSERT INTO muster.leader VALUES (1, 0, '', '', NULL);
CREATE TABLE muster.hubs (
    name text PRIMARY KEY,
    addr text NOT NULL,
    started_at timestamptz NOT NULL,
    seen_at timestamptz NOT NULL
);
INSERT INTO muster.meta VALUES ('schema_version', 1);
";

/// How to reach the database.
#[derive(Clone, PartialEq, Eq)]
pub struct PgOptions {
    /// `postgres://user@host:port/db`, without a password.
    pub url: String,
    /// The password, read from a 0600 file or a systemd credential.
    pub password: Option<String>,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

impl PgOptions {
    /// The connection settings: the URL, plus the password when there is one.
    ///
    /// # Errors
    /// [`StoreError::Db`] when the URL does not parse.
    pub fn config(&self) -> Result<tokio_postgres::Config, StoreError> {
        let mut config: tokio_postgres::Config = self.url.parse().map_err(|e| {
            StoreError::Db(format!(
                "store url {:?} is not a PostgreSQL URL ({e}); write it as postgres://user@host:port/db",
                self.url
            ))
        })?;
        if let Some(p) = &self.password {
            config.password(p.as_bytes());
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("muster-hub");
        Ok(config)
    }
}

/// The statements every commit uses, prepared once per connection.
struct Statements {
    term: Statement,
    tasks: Statement,
    attempts: Statement,
    keys: Statement,
    events: Statement,
    agents: Statement,
    identities: Statement,
    tokens: Statement,
    api_tokens: Statement,
    meta: Statement,
    events_prune: Statement,
}

/// The writer connection and its statements.
struct Writer {
    client: Client,
    st: Statements,
}

/// The hub's PostgreSQL database.
pub struct PgStore {
    /// `Some` until drop, which shuts it down without blocking (a store may be
    /// dropped on an async thread when the hub fails to start).
    rt: Option<Runtime>,
    handle: Handle,
    config: tokio_postgres::Config,
    /// The connection every write goes through, one transaction at a time.
    writer: Mutex<Writer>,
    /// Idle reader connections (see [`READERS_POOLED_MAX`]).
    readers: Arc<Mutex<Vec<Client>>>,
    /// The leader term this hub holds; 0 = none, and then every write is refused.
    term: AtomicU64,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A tokio-postgres error as a [`StoreError`], with the server's message
/// (its `Display` alone says only "db error").
fn pg(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Db(format!(
            "PostgreSQL: {} (SQLSTATE {})",
            db.message(),
            db.code().code()
        )),
        None => StoreError::Db(format!("PostgreSQL: {e}")),
    }
}

/// A u64 id or bound as a bigint: ids never reach 2^63, so saturating only
/// ever affects an open upper bound (a cursor of "everything").
fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A bigint read back as the u64 it was written from.
fn unbig(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `fut` on `handle`, failing after [`OP_TIMEOUT`].
fn run<T>(
    handle: &Handle,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    handle.block_on(async {
        tokio::time::timeout(OP_TIMEOUT, fut).await.map_err(|_| {
            StoreError::Db(format!(
                "PostgreSQL did not answer within {} s; is the database up?",
                OP_TIMEOUT.as_secs()
            ))
        })?
    })
}

/// Opens one connection, its driver spawned on `handle`.
fn connect(handle: &Handle, config: &tokio_postgres::Config) -> Result<Client, StoreError> {
    run(handle, async {
        let (client, conn) = config.connect(NoTls).await.map_err(|e| {
            StoreError::Db(format!(
                "cannot connect to PostgreSQL: {}",
                match e.as_db_error() {
                    Some(db) => db.message().to_string(),
                    None => e.to_string(),
                }
            ))
        })?;
        tokio::spawn(async move {
            // A lost connection shows in the next call on its client as an error.
            if let Err(e) = conn.await {
                tracing::warn!("PostgreSQL connection ended: {e}");
            }
        });
        Ok(client)
    })
}

/// A kv table's upsert, for tables keyed by bytes.
fn kv_upsert(table: &str, key: &str) -> String {
    format!(
        "INSERT INTO muster.{table} ({key}, rec) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
         ON CONFLICT ({key}) DO UPDATE SET rec = EXCLUDED.rec"
    )
}

async fn prepare(client: &Client) -> Result<Statements, StoreError> {
    let p = |sql: String| async move { client.prepare(&sql).await.map_err(pg) };
    Ok(Statements {
        term: p("SELECT term FROM muster.leader WHERE id = 1 FOR SHARE".into()).await?,
        tasks: p("INSERT INTO muster.tasks (id, state, live, finished_at, generation, rec) \
             SELECT * FROM unnest($1::bigint[], $2::smallint[], $3::boolean[], $4::bigint[], $5::bigint[], $6::bytea[]) \
             ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, live = EXCLUDED.live, \
             finished_at = EXCLUDED.finished_at, generation = EXCLUDED.generation, rec = EXCLUDED.rec"
            .into())
        .await?,
        attempts: p("INSERT INTO muster.attempts (task, generation, rec) \
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bytea[]) \
             ON CONFLICT (task, generation) DO UPDATE SET rec = EXCLUDED.rec"
            .into())
        .await?,
        keys: p("INSERT INTO muster.keys (key, task) SELECT * FROM unnest($1::bytea[], $2::bigint[]) \
             ON CONFLICT (key) DO UPDATE SET task = EXCLUDED.task"
            .into())
        .await?,
        events: p("INSERT INTO muster.events (seq, rec) SELECT * FROM unnest($1::bigint[], $2::bytea[]) \
             ON CONFLICT (seq) DO UPDATE SET rec = EXCLUDED.rec"
            .into())
        .await?,
        agents: p(kv_upsert("agents", "name")).await?,
        identities: p(kv_upsert("identities", "fingerprint")).await?,
        tokens: p(kv_upsert("tokens", "hash")).await?,
        api_tokens: p(kv_upsert("api_tokens", "hash")).await?,
        meta: p("INSERT INTO muster.meta (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
            .into())
        .await?,
        events_prune: p("DELETE FROM muster.events WHERE seq < $1".into()).await?,
    })
}

/// Reads the schema version, if the schema exists.
async fn schema_version(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Option<u64>, StoreError> {
    let exists = client
        .query_one("SELECT to_regclass('muster.meta') IS NOT NULL", &[])
        .await
        .map_err(pg)?
        .try_get::<_, bool>(0)
        .map_err(pg)?;
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT value FROM muster.meta WHERE key = 'schema_version'",
            &[],
        )
        .await
        .map_err(pg)?;
    row.map(|r| r.try_get::<_, i64>(0).map(unbig).map_err(pg))
        .transpose()
}

/// Creates or migrates the schema under the migration lock.
async fn init_schema(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg)?;
    // Held until this transaction ends, so a second hub starting now waits
    // here and then finds the schema made.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    match schema_version(&tx).await? {
        None => {
            tx.batch_execute(
                "CREATE SCHEMA IF NOT EXISTS muster;
                 CREATE TABLE muster.meta (key text PRIMARY KEY, value bigint NOT NULL);",
            )
            .await
            .map_err(pg)?;
            tx.batch_execute(SCHEMA_V1).await.map_err(pg)?;
        }
        Some(v) if v > PG_SCHEMA_VERSION => {
            return Err(StoreError::TooNew {
                found: v,
                supported: PG_SCHEMA_VERSION,
            });
        }
        // Version 1 is the first: nothing to migrate yet. A later version adds
        // its steps here, each in this same transaction.
        Some(_) => {}
    }
    tx.commit().await.map_err(pg)
}

/// One batch of writes as one array per column, a record written twice in the
/// batch kept once with its last value (one upsert may touch a row only once).
#[derive(Default)]
pub(crate) struct Columns {
    task_id: Vec<i64>,
    task_state: Vec<i16>,
    task_live: Vec<bool>,
    task_finished: Vec<Option<i64>>,
    task_generation: Vec<i64>,
    task_rec: Vec<Vec<u8>>,
    attempt_task: Vec<i64>,
    attempt_generation: Vec<i64>,
    attempt_rec: Vec<Vec<u8>>,
    key: Vec<Vec<u8>>,
    key_task: Vec<i64>,
    event_seq: Vec<i64>,
    event_rec: Vec<Vec<u8>>,
    agent: (Vec<Vec<u8>>, Vec<Vec<u8>>),
    identity: (Vec<Vec<u8>>, Vec<Vec<u8>>),
    token: (Vec<Vec<u8>>, Vec<Vec<u8>>),
    api_token: (Vec<Vec<u8>>, Vec<Vec<u8>>),
    next_task_id: Option<i64>,
    events_floor: Option<i64>,
}

impl Columns {
    /// Adds one stored task row as its bytes are.
    pub(crate) fn push_task(&mut self, id: u64, rec: &TaskRecord, raw: Vec<u8>) {
        let done = rec.state.is_terminal();
        self.task_id.push(big(id));
        self.task_state.push(i16::from(state_code(rec.state)));
        self.task_live.push(!done);
        self.task_finished.push(done.then(|| big(rec.updated_at)));
        self.task_generation.push(big(rec.generation.0));
        self.task_rec.push(raw);
    }

    /// Adds one stored attempt row.
    pub(crate) fn push_attempt(&mut self, task: u64, generation: u64, raw: Vec<u8>) {
        self.attempt_task.push(big(task));
        self.attempt_generation.push(big(generation));
        self.attempt_rec.push(raw);
    }

    /// Adds one idempotency key.
    pub(crate) fn push_key(&mut self, key: &str, task: u64) {
        self.key.push(key.as_bytes().to_vec());
        self.key_task.push(big(task));
    }

    /// Adds one stored event.
    pub(crate) fn push_event(&mut self, seq: u64, raw: Vec<u8>) {
        self.event_seq.push(big(seq));
        self.event_rec.push(raw);
    }

    /// Adds one row of a table keyed by text: agents, identities, tokens or api_tokens.
    pub(crate) fn push_keyed(&mut self, table: &str, key: &str, raw: Vec<u8>) {
        let col = match table {
            "agents" => &mut self.agent,
            "identities" => &mut self.identity,
            "tokens" => &mut self.token,
            _ => &mut self.api_token,
        };
        col.0.push(key.as_bytes().to_vec());
        col.1.push(raw);
    }

    /// Sets the next task id.
    pub(crate) fn set_next_task_id(&mut self, n: u64) {
        self.next_task_id = Some(big(n));
    }

    /// Whether no row was added.
    pub(crate) fn is_empty(&self) -> bool {
        self.task_id.is_empty()
            && self.attempt_task.is_empty()
            && self.key.is_empty()
            && self.event_seq.is_empty()
            && self.agent.0.is_empty()
            && self.identity.0.is_empty()
            && self.token.0.is_empty()
            && self.api_token.0.is_empty()
            && self.next_task_id.is_none()
    }

    /// How many rows of each table this holds.
    pub(crate) fn count_into(&self, n: &mut CopyCounts) {
        n.tasks += self.task_id.len() as u64;
        n.attempts += self.attempt_task.len() as u64;
        n.keys += self.key.len() as u64;
        n.events += self.event_seq.len() as u64;
        n.agents += self.agent.0.len() as u64;
        n.identities += self.identity.0.len() as u64;
        n.tokens += (self.token.0.len() + self.api_token.0.len()) as u64;
    }

    fn of(writes: &[Write], events_max: u64) -> Columns {
        let mut c = Columns::default();
        // Newest first, so the first write seen of each record is its last.
        let mut seen: HashSet<(u8, Vec<u8>)> = HashSet::new();
        let mut first = |table: u8, key: &[u8]| seen.insert((table, key.to_vec()));
        let mut last_event = None;
        for w in writes.iter().rev() {
            match w {
                Write::Task(t) => {
                    if first(0, &t.id.0.to_le_bytes()) {
                        let done = t.state.is_terminal();
                        c.task_id.push(big(t.id.0));
                        c.task_state.push(i16::from(state_code(t.state)));
                        c.task_live.push(!done);
                        c.task_finished.push(done.then(|| big(t.updated_at)));
                        c.task_generation.push(big(t.generation.0));
                        c.task_rec.push(enc(t));
                    }
                }
                Write::Attempt(a) => {
                    let mut k = a.task.0.to_le_bytes().to_vec();
                    k.extend_from_slice(&a.generation.0.to_le_bytes());
                    if first(1, &k) {
                        c.attempt_task.push(big(a.task.0));
                        c.attempt_generation.push(big(a.generation.0));
                        c.attempt_rec.push(enc(a));
                    }
                }
                Write::Key(k, id) => {
                    if first(2, k.as_bytes()) {
                        c.key.push(k.as_bytes().to_vec());
                        c.key_task.push(big(id.0));
                    }
                }
                Write::Event { seq, at, event } => {
                    last_event = last_event.or(Some(*seq));
                    if first(3, &seq.to_le_bytes()) {
                        c.event_seq.push(big(*seq));
                        c.event_rec.push(enc(&event_record(*seq, *at, event)));
                    }
                }
                Write::Agent(a) => {
                    if first(4, a.name.as_bytes()) {
                        c.agent.0.push(a.name.as_bytes().to_vec());
                        c.agent.1.push(enc(a));
                    }
                }
                Write::Identity(i) => {
                    if first(5, i.fingerprint.as_bytes()) {
                        c.identity.0.push(i.fingerprint.as_bytes().to_vec());
                        c.identity.1.push(enc(i));
                    }
                }
                Write::Token(hash, t) => {
                    if first(6, hash.as_bytes()) {
                        c.token.0.push(hash.as_bytes().to_vec());
                        c.token.1.push(enc(t));
                    }
                }
                Write::ApiToken(hash, t) => {
                    if first(7, hash.as_bytes()) {
                        c.api_token.0.push(hash.as_bytes().to_vec());
                        c.api_token.1.push(enc(t));
                    }
                }
                Write::NextTaskId(n) => {
                    if c.next_task_id.is_none() {
                        c.next_task_id = Some(big(*n));
                    }
                }
            }
        }
        // The event log is pruned by count, oldest first, as redb does.
        if let Some(last) = last_event {
            let floor = last.saturating_sub(events_max);
            if floor > 0 {
                c.events_floor = Some(big(floor));
            }
        }
        c
    }
}

type Pending<'a> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + 'a>>;

/// Writes `c` in `tx`: one multi-row statement per table, all issued at once
/// so tokio-postgres pipelines them on the connection.
async fn write_columns(
    tx: &tokio_postgres::Transaction<'_>,
    st: &Statements,
    c: &Columns,
) -> Result<(), tokio_postgres::Error> {
    let tasks: [&(dyn ToSql + Sync); 6] = [
        &c.task_id,
        &c.task_state,
        &c.task_live,
        &c.task_finished,
        &c.task_generation,
        &c.task_rec,
    ];
    let attempts: [&(dyn ToSql + Sync); 3] =
        [&c.attempt_task, &c.attempt_generation, &c.attempt_rec];
    let keys: [&(dyn ToSql + Sync); 2] = [&c.key, &c.key_task];
    let events: [&(dyn ToSql + Sync); 2] = [&c.event_seq, &c.event_rec];
    let agents: [&(dyn ToSql + Sync); 2] = [&c.agent.0, &c.agent.1];
    let identities: [&(dyn ToSql + Sync); 2] = [&c.identity.0, &c.identity.1];
    let tokens: [&(dyn ToSql + Sync); 2] = [&c.token.0, &c.token.1];
    let api_tokens: [&(dyn ToSql + Sync); 2] = [&c.api_token.0, &c.api_token.1];
    let next: [&(dyn ToSql + Sync); 2] = [&"next_task_id", &c.next_task_id];
    let floor: [&(dyn ToSql + Sync); 1] = [&c.events_floor];
    let mut pending: Vec<Pending<'_>> = Vec::new();
    macro_rules! add {
        ($rows:expr, $stmt:expr, $params:expr) => {
            if $rows > 0 {
                pending.push(Box::pin(tx.execute($stmt, $params)));
            }
        };
    }
    add!(c.task_id.len(), &st.tasks, &tasks);
    add!(c.attempt_task.len(), &st.attempts, &attempts);
    add!(c.key.len(), &st.keys, &keys);
    add!(c.event_seq.len(), &st.events, &events);
    add!(c.agent.0.len(), &st.agents, &agents);
    add!(c.identity.0.len(), &st.identities, &identities);
    add!(c.token.0.len(), &st.tokens, &tokens);
    add!(c.api_token.0.len(), &st.api_tokens, &api_tokens);
    add!(usize::from(c.next_task_id.is_some()), &st.meta, &next);
    add!(
        usize::from(c.events_floor.is_some()),
        &st.events_prune,
        &floor
    );
    futures::future::try_join_all(pending).await?;
    Ok(())
}

/// Checks the term read inside a write transaction against ours.
fn fence(ours: u64, current: u64) -> Result<(), StoreError> {
    if ours == 0 || current != ours {
        return Err(StoreError::Fenced { ours, current });
    }
    Ok(())
}

/// Reads the term inside `tx` (locking its row, see the module docs) and
/// checks it against ours: the fence of a write that is not pipelined.
async fn check_term(
    tx: &tokio_postgres::Transaction<'_>,
    st: &Statements,
    ours: u64,
) -> Result<(), StoreError> {
    let row = tx.query_one(&st.term, &[]).await.map_err(pg)?;
    fence(ours, unbig(row.try_get::<_, i64>(0).map_err(pg)?))
}

impl PgStore {
    /// Connects, creates or migrates the `muster` schema (under an advisory
    /// lock, so hubs starting together do not race) and prepares the commit
    /// statements. Writes are refused until [`PgStore::set_term`] or
    /// [`PgStore::take_term`] gives this hub the current term.
    ///
    /// # Errors
    /// [`StoreError`] when the database cannot be reached, the user may not
    /// create the schema, or the schema is newer than this build.
    pub fn open(opts: &PgOptions) -> Result<PgStore, StoreError> {
        let config = opts.config()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("muster-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Db(format!("cannot start the PostgreSQL runtime: {e}")))?;
        let handle = rt.handle().clone();
        let mut client = connect(&handle, &config)?;
        run(&handle, init_schema(&mut client))?;
        let st = run(&handle, prepare(&client))?;
        Ok(PgStore {
            rt: Some(rt),
            handle,
            config,
            writer: Mutex::new(Writer { client, st }),
            readers: Arc::new(Mutex::new(Vec::new())),
            term: AtomicU64::new(0),
        })
    }

    /// Where the database's schema stands, without changing anything (for
    /// `muster-hub migrate --check`).
    ///
    /// # Errors
    /// [`StoreError`] when the database cannot be reached or read.
    pub fn schema_state(opts: &PgOptions) -> Result<SchemaState, StoreError> {
        let config = opts.config()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Db(format!("cannot start the PostgreSQL runtime: {e}")))?;
        let found = rt.block_on(async {
            tokio::time::timeout(OP_TIMEOUT, async {
                let (client, conn) = config.connect(NoTls).await.map_err(pg)?;
                tokio::spawn(conn);
                schema_version(&client).await
            })
            .await
            .map_err(|_| StoreError::Db("PostgreSQL did not answer in time".into()))?
        })?;
        Ok(match found {
            None => SchemaState::Missing,
            Some(v) if v > PG_SCHEMA_VERSION => SchemaState::Newer(v),
            Some(v) if v < PG_SCHEMA_VERSION => SchemaState::Older(v),
            Some(_) => SchemaState::Current,
        })
    }

    /// Sets the leader term this hub's writes must find in `muster.leader`.
    pub fn set_term(&self, term: u64) {
        self.term.store(term, Ordering::SeqCst);
    }

    /// The term this hub holds (0: none).
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::SeqCst)
    }

    /// Increments the leader term, records this hub as the leader and holds
    /// the new term: from now on a hub holding an older term has its writes
    /// refused. The leader election decides when a hub may call this.
    ///
    /// # Errors
    /// [`StoreError`] when the update fails.
    pub fn take_term(&self, hub: &str, addr: &str) -> Result<u64, StoreError> {
        let w = lock(&self.writer);
        let term = run(&self.handle, async {
            let row = w
                .client
                .query_one(
                    "UPDATE muster.leader SET term = term + 1, hub = $1, addr = $2, renewed_at = now() \
                     WHERE id = 1 RETURNING term",
                    &[&hub, &addr],
                )
                .await
                .map_err(pg)?;
            row.try_get::<_, i64>(0).map(unbig).map_err(pg)
        })?;
        self.set_term(term);
        Ok(term)
    }

    /// Whether the store holds no task, attempt, agent, identity or token
    /// (`store copy` only fills an empty database).
    ///
    /// # Errors
    /// [`StoreError`] when the tables cannot be read.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        let w = lock(&self.writer);
        run(&self.handle, async {
            let row = w
                .client
                .query_one(
                    "SELECT NOT EXISTS (SELECT 1 FROM muster.tasks) AND NOT EXISTS (SELECT 1 FROM muster.attempts) \
                     AND NOT EXISTS (SELECT 1 FROM muster.agents) AND NOT EXISTS (SELECT 1 FROM muster.identities) \
                     AND NOT EXISTS (SELECT 1 FROM muster.tokens) AND NOT EXISTS (SELECT 1 FROM muster.api_tokens) \
                     AND NOT EXISTS (SELECT 1 FROM muster.events) AND NOT EXISTS (SELECT 1 FROM muster.keys)",
                    &[],
                )
                .await
                .map_err(pg)?;
            row.try_get::<_, bool>(0).map_err(pg)
        })
    }

    /// Copies every table of the redb store `src` into this database in one
    /// transaction, in chunks of bounded size (`muster-hub store copy`).
    ///
    /// # Errors
    /// [`StoreError`] when this database already holds hub state (a copy only
    /// fills an empty one), or a read or write fails: then nothing is copied.
    pub fn copy_from_redb(&self, src: &super::RedbStore) -> Result<CopyCounts, StoreError> {
        if !self.is_empty()? {
            return Err(StoreError::Db(
                "the PostgreSQL database already holds hub state; store copy fills an empty database only (create a new one, or drop schema muster)".into(),
            ));
        }
        let mut dump = src.dump()?;
        let mut counts = CopyCounts::default();
        let mut w = lock(&self.writer);
        let Writer { client, st } = &mut *w;
        let tx = run(&self.handle, async {
            client.transaction().await.map_err(pg)
        })?;
        while let Some(c) = dump.next_chunk()? {
            run(&self.handle, async {
                write_columns(&tx, st, &c).await.map_err(pg)
            })?;
            c.count_into(&mut counts);
        }
        run(&self.handle, async { tx.commit().await.map_err(pg) })?;
        Ok(counts)
    }
}

impl Backend for PgStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Postgres
    }

    fn set_term(&self, term: u64) {
        PgStore::set_term(self, term);
    }

    fn as_postgres(&self) -> Option<&PgStore> {
        Some(self)
    }

    fn commit(&self, writes: &[Write], events_max: u64) -> Result<(), StoreError> {
        let ours = self.term();
        let c = Columns::of(writes, events_max);
        let mut w = lock(&self.writer);
        let Writer { client, st } = &mut *w;
        run(&self.handle, async {
            let tx = client.transaction().await.map_err(pg)?;
            // Issued together: tokio-postgres pipelines them on the one
            // connection, so the batch costs about one round trip, not one
            // per statement. The term check is first in the pipeline, so the
            // writes run after its row lock is granted.
            let term = tx.query_one(&st.term, &[]);
            let (row, ()) = futures::future::try_join(term, write_columns(&tx, st, &c))
                .await
                .map_err(pg)?;
            let current = unbig(row.try_get::<_, i64>(0).map_err(pg)?);
            // Dropping the transaction without commit rolls it back.
            fence(ours, current)?;
            tx.commit().await.map_err(pg)
        })
    }

    fn prune(&self, before: u64, max: usize) -> Result<Vec<TaskId>, StoreError> {
        let ours = self.term();
        let mut w = lock(&self.writer);
        let Writer { client, st } = &mut *w;
        run(&self.handle, async {
            let tx = client.transaction().await.map_err(pg)?;
            check_term(&tx, st, ours).await?;
            let max = i64::try_from(max).unwrap_or(i64::MAX);
            let rows = tx
                .query(
                    "DELETE FROM muster.tasks WHERE id IN (SELECT id FROM muster.tasks \
                     WHERE finished_at < $1 ORDER BY finished_at, id LIMIT $2) \
                     RETURNING id, finished_at, rec",
                    &[&big(before), &max],
                )
                .await
                .map_err(pg)?;
            let mut gone: Vec<(i64, i64)> = Vec::with_capacity(rows.len());
            let mut keys: Vec<Vec<u8>> = Vec::new();
            for row in rows {
                let id: i64 = row.try_get(0).map_err(pg)?;
                let at: Option<i64> = row.try_get(1).map_err(pg)?;
                let rec: TaskRecord = dec("tasks", row.try_get::<_, &[u8]>(2).map_err(pg)?)?;
                if let Some(k) = rec.key {
                    keys.push(k.into_bytes());
                }
                gone.push((at.unwrap_or(0), id));
            }
            gone.sort_unstable();
            let ids: Vec<i64> = gone.iter().map(|(_, id)| *id).collect();
            if !ids.is_empty() {
                tx.execute(
                    "DELETE FROM muster.attempts WHERE task = ANY($1::bigint[])",
                    &[&ids],
                )
                .await
                .map_err(pg)?;
                tx.execute(
                    "DELETE FROM muster.keys WHERE key = ANY($1::bytea[])",
                    &[&keys],
                )
                .await
                .map_err(pg)?;
            }
            tx.commit().await.map_err(pg)?;
            Ok(ids.into_iter().map(|id| TaskId(unbig(id))).collect())
        })
    }

    fn restore(&self, now: u64) -> Result<Restored, StoreError> {
        let mut w = lock(&self.writer);
        let client = &mut w.client;
        run(&self.handle, async {
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg)?;
            let mut r = Restored::default();
            // Live tasks and their current attempts only: a takeover or a
            // restart does not grow with the finished history.
            let mut current: HashMap<i64, AttemptRecord> = HashMap::new();
            for row in tx
                .query(
                    "SELECT a.task, a.rec FROM muster.attempts a JOIN muster.tasks t \
                     ON a.task = t.id AND a.generation = t.generation WHERE t.live",
                    &[],
                )
                .await
                .map_err(pg)?
            {
                let id: i64 = row.try_get(0).map_err(pg)?;
                current.insert(
                    id,
                    dec("attempts", row.try_get::<_, &[u8]>(1).map_err(pg)?)?,
                );
            }
            for row in tx
                .query(
                    "SELECT id, rec FROM muster.tasks WHERE live ORDER BY id",
                    &[],
                )
                .await
                .map_err(pg)?
            {
                let id: i64 = row.try_get(0).map_err(pg)?;
                let rec: TaskRecord = dec("tasks", row.try_get::<_, &[u8]>(1).map_err(pg)?)?;
                let attempt = if rec.generation.0 > 0 {
                    current.remove(&id)
                } else {
                    None
                };
                r.live.push((rec, attempt));
            }
            let all = |sql: &'static str| {
                let tx = &tx;
                async move { tx.query(sql, &[]).await.map_err(pg) }
            };
            for row in all("SELECT rec FROM muster.agents ORDER BY name").await? {
                r.agents
                    .push(dec("agents", row.try_get::<_, &[u8]>(0).map_err(pg)?)?);
            }
            for row in all("SELECT rec FROM muster.identities ORDER BY fingerprint").await? {
                r.identities
                    .push(dec("identities", row.try_get::<_, &[u8]>(0).map_err(pg)?)?);
            }
            for row in all("SELECT hash, rec FROM muster.tokens ORDER BY hash").await? {
                let hash = text("tokens", row.try_get(0).map_err(pg)?)?;
                let t: TokenRecord = dec("tokens", row.try_get::<_, &[u8]>(1).map_err(pg)?)?;
                // Expired or used tokens still answer "expired"/"used" for a day, then go.
                if t.expires_at + 86_400_000 > now {
                    r.tokens.push((hash, t));
                }
            }
            for row in all("SELECT hash, rec FROM muster.api_tokens ORDER BY hash").await? {
                let hash = text("api_tokens", row.try_get(0).map_err(pg)?)?;
                let t: crate::core::web::ApiToken =
                    dec("api_tokens", row.try_get::<_, &[u8]>(1).map_err(pg)?)?;
                // Only live tokens authorize; expired and revoked ones stay as a record.
                if t.revoked_at.is_none() && t.expires_at > now {
                    r.api_tokens.push((hash, t));
                }
            }
            for row in all("SELECT key, task FROM muster.keys ORDER BY key").await? {
                let k = text("keys", row.try_get(0).map_err(pg)?)?;
                r.keys.push((k, TaskId(unbig(row.try_get(1).map_err(pg)?))));
            }
            let next: Option<i64> = tx
                .query_opt(
                    "SELECT value FROM muster.meta WHERE key = 'next_task_id'",
                    &[],
                )
                .await
                .map_err(pg)?
                .map(|row| row.try_get(0))
                .transpose()
                .map_err(pg)?;
            r.next_task_id = next.map_or(1, unbig);
            let last: Option<i64> = tx
                .query_one("SELECT max(seq) FROM muster.events", &[])
                .await
                .map_err(pg)?
                .try_get(0)
                .map_err(pg)?;
            r.next_event_seq = last.map_or(1, |s| unbig(s) + 1);
            tx.commit().await.map_err(pg)?;
            Ok(r)
        })
    }

    fn reader(&self) -> Result<Box<dyn Snapshot>, StoreError> {
        // The connection and its transaction are taken at the first read: the
        // core opens a reader for every batch, and most batches read nothing.
        Ok(Box::new(PgSnapshot {
            handle: self.handle.clone(),
            config: self.config.clone(),
            client: std::cell::OnceCell::new(),
            pool: Arc::clone(&self.readers),
        }))
    }

    fn probe(&self) -> Result<(), StoreError> {
        let ours = self.term();
        let mut w = lock(&self.writer);
        let Writer { client, st } = &mut *w;
        run(&self.handle, async {
            let tx = client.transaction().await.map_err(pg)?;
            check_term(&tx, st, ours).await?;
            tx.execute(
                "INSERT INTO muster.meta (key, value) VALUES ('probe', 1) \
                 ON CONFLICT (key) DO UPDATE SET value = muster.meta.value + 1",
                &[],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)
        })
    }
}

/// A key column read back as the text it was written from.
fn text(table: &'static str, raw: &[u8]) -> Result<String, StoreError> {
    String::from_utf8(raw.to_vec()).map_err(|e| StoreError::Corrupt {
        table,
        reason: format!("a key is not UTF-8: {e}"),
    })
}

/// A consistent read snapshot: one `REPEATABLE READ READ ONLY` transaction on
/// a reader connection, rolled back when the snapshot drops.
struct PgSnapshot {
    handle: Handle,
    config: tokio_postgres::Config,
    /// Set at the first read, with its transaction begun.
    client: std::cell::OnceCell<Client>,
    pool: Arc<Mutex<Vec<Client>>>,
}

impl Drop for PgSnapshot {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let ended = run(&self.handle, async {
            client.batch_execute("ROLLBACK").await.map_err(pg)
        });
        if ended.is_ok() && !client.is_closed() {
            let mut pool = lock(&self.pool);
            if pool.len() < READERS_POOLED_MAX {
                pool.push(client);
            }
        }
    }
}

impl PgSnapshot {
    /// The snapshot's connection: at the first call an idle reader connection
    /// (else a new one) with `REPEATABLE READ READ ONLY` begun on it.
    fn client(&self) -> Result<&Client, StoreError> {
        if let Some(c) = self.client.get() {
            return Ok(c);
        }
        let client = loop {
            let idle = lock(&self.pool).pop();
            match idle {
                Some(c) if c.is_closed() => continue,
                Some(c) => break c,
                None => break connect(&self.handle, &self.config)?,
            }
        };
        run(&self.handle, async {
            client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(pg)
        })?;
        Ok(self.client.get_or_init(|| client))
    }

    /// The `rec` column (the first) of every row `sql` gives, decoded.
    fn recs<T: serde::de::DeserializeOwned>(
        &self,
        table: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<T>, StoreError> {
        let client = self.client()?;
        run(&self.handle, async {
            let rows = client.query(sql, params).await.map_err(pg)?;
            rows.iter()
                .map(|row| dec(table, row.try_get::<_, &[u8]>(0).map_err(pg)?))
                .collect()
        })
    }

    fn max_or_min(&self, sql: &str) -> Result<Option<u64>, StoreError> {
        let client = self.client()?;
        run(&self.handle, async {
            let v: Option<i64> = client
                .query_one(sql, &[])
                .await
                .map_err(pg)?
                .try_get(0)
                .map_err(pg)?;
            Ok(v.map(unbig))
        })
    }
}

impl Snapshot for PgSnapshot {
    fn task(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        Ok(self
            .recs(
                "tasks",
                "SELECT rec FROM muster.tasks WHERE id = $1",
                &[&big(id.0)],
            )?
            .pop())
    }

    fn attempts(&self, id: TaskId) -> Result<Vec<AttemptRecord>, StoreError> {
        self.recs(
            "attempts",
            "SELECT rec FROM muster.attempts WHERE task = $1 ORDER BY generation",
            &[&big(id.0)],
        )
    }

    fn newest_attempts(&self, id: TaskId, max: usize) -> Result<Vec<AttemptRecord>, StoreError> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.recs(
            "attempts",
            "SELECT rec FROM muster.attempts WHERE task = $1 ORDER BY generation DESC LIMIT $2",
            &[&big(id.0), &max],
        )
    }

    fn tasks_matching(
        &self,
        filter: &TaskFilter,
        limit: usize,
        cursor: Option<u64>,
    ) -> Result<Page, StoreError> {
        let client = self.client()?;
        let mut below = big(cursor.unwrap_or(u64::MAX));
        let mut scan = Scan::new(filter, limit);
        // A chunk about the page's size, so a short unfiltered page is one
        // small query, and a selective filter still walks in large steps.
        let chunk = i64::try_from(limit.saturating_add(1))
            .unwrap_or(SCAN_CHUNK_MAX)
            .clamp(64, SCAN_CHUNK_MAX);
        let state = filter.state.map(|s| i16::from(state_code(s)));
        loop {
            let rows = run(&self.handle, async {
                match state {
                    Some(code) => client
                        .query(
                            "SELECT id, rec FROM muster.tasks WHERE state = $1 AND id < $2 \
                             ORDER BY id DESC LIMIT $3",
                            &[&code, &below, &chunk],
                        )
                        .await
                        .map_err(pg),
                    None => client
                        .query(
                            "SELECT id, rec FROM muster.tasks WHERE id < $1 ORDER BY id DESC LIMIT $2",
                            &[&below, &chunk],
                        )
                        .await
                        .map_err(pg),
                }
            })?;
            let n = rows.len();
            for row in rows {
                let id: i64 = row.try_get(0).map_err(pg)?;
                below = id;
                let raw: &[u8] = row.try_get(1).map_err(pg)?;
                if scan.offer(unbig(id), Some(raw))? {
                    return Ok(scan.finish());
                }
            }
            if i64::try_from(n).unwrap_or(0) < chunk {
                return Ok(scan.finish());
            }
        }
    }

    fn events(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<(Vec<EventRecord>, Option<u64>), StoreError> {
        let oldest = self.max_or_min("SELECT min(seq) FROM muster.events")?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let out = self.recs(
            "events",
            "SELECT rec FROM muster.events WHERE seq >= $1 ORDER BY seq LIMIT $2",
            &[&big(from), &limit],
        )?;
        Ok((out, oldest))
    }

    fn last_event(&self) -> Result<Option<u64>, StoreError> {
        self.max_or_min("SELECT max(seq) FROM muster.events")
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.recs("agents", "SELECT rec FROM muster.agents ORDER BY name", &[])
    }

    fn identities(&self) -> Result<Vec<Identity>, StoreError> {
        self.recs(
            "identities",
            "SELECT rec FROM muster.identities ORDER BY fingerprint",
            &[],
        )
    }
}

#[cfg(test)]
mod tests {
    use muster_protocol::TaskId;

    use super::*;
    use crate::core::TaskState;
    use crate::store::Store;
    use crate::store::testdb::TestDb;
    use crate::store::tests::task;

    fn open(db: &TestDb) -> PgStore {
        PgStore::open(&db.options()).expect("open")
    }

    #[test]
    fn a_commit_after_another_hub_took_the_term_is_fenced_and_writes_nothing() {
        let Some(db) = TestDb::create() else { return };
        let a = open(&db);
        assert_eq!(a.take_term("a", "127.0.0.1:1").expect("term"), 1);
        a.commit(&[Write::Task(task(1, TaskState::Queued, 1, None))], 100)
            .expect("the leader commits");
        let b = open(&db);
        assert_eq!(b.take_term("b", "127.0.0.1:2").expect("term"), 2);
        let err = a
            .commit(&[Write::Task(task(2, TaskState::Queued, 1, None))], 100)
            .expect_err("fenced");
        assert!(
            matches!(
                err,
                StoreError::Fenced {
                    ours: 1,
                    current: 2
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "another hub took over (term 2; this hub held term 1); stepping down"
        );
        assert!(matches!(a.probe(), Err(StoreError::Fenced { .. })));
        assert!(matches!(
            a.prune(u64::MAX, 10),
            Err(StoreError::Fenced { .. })
        ));
        let b = Store::from_backend(Box::new(b));
        let r = b.reader().expect("reader");
        assert!(r.task(TaskId(1)).expect("read").is_some());
        assert!(
            r.task(TaskId(2)).expect("read").is_none(),
            "nothing written"
        );
        drop(r);
        // A store that holds no term writes nothing either.
        let c = open(&db);
        assert!(matches!(
            c.commit(&[Write::NextTaskId(9)], 100),
            Err(StoreError::Fenced {
                ours: 0,
                current: 2
            })
        ));
        b.commit(&[Write::NextTaskId(9)], 100)
            .expect("the new leader commits");
    }

    #[test]
    fn an_idempotency_key_with_nul_commits_and_restores() {
        let Some(db) = TestDb::create() else { return };
        let s = open(&db);
        s.take_term("a", "").expect("term");
        let key = "a\0b\u{7f}é";
        s.commit(
            &[
                Write::Task(task(1, TaskState::Completed, 1, Some(key))),
                Write::Key(key.into(), TaskId(1)),
            ],
            100,
        )
        .expect("commit");
        let r = s.restore(0).expect("restore");
        assert_eq!(r.keys, vec![(key.to_string(), TaskId(1))]);
        assert_eq!(s.prune(10, 10).expect("prune"), vec![TaskId(1)]);
        assert!(s.restore(0).expect("restore").keys.is_empty());
    }

    #[test]
    fn restore_after_many_finished_tasks_loads_only_live_ones() {
        let Some(db) = TestDb::create() else { return };
        let s = open(&db);
        s.take_term("a", "").expect("term");
        for chunk in 0..5u64 {
            let writes: Vec<Write> = (1..=1000u64)
                .map(|i| Write::Task(task(chunk * 1000 + i, TaskState::Completed, 5, None)))
                .collect();
            s.commit(&writes, 100).expect("commit");
        }
        s.commit(
            &[
                Write::Task(task(6001, TaskState::Queued, 5, None)),
                Write::Task(task(6002, TaskState::Running, 5, None)),
            ],
            100,
        )
        .expect("commit");
        let r = s.restore(0).expect("restore");
        let live: Vec<u64> = r.live.iter().map(|(t, _)| t.id.0).collect();
        assert_eq!(live, vec![6001, 6002]);
        // Every finished task is still there for queries.
        let page = Store::from_backend(Box::new(s))
            .reader()
            .expect("reader")
            .tasks(Some(TaskState::Completed), None, None, 10_000, None)
            .expect("page");
        assert_eq!(page.tasks.len(), 5000);
    }

    #[test]
    fn a_newer_schema_is_refused_and_migrate_check_sees_it() {
        let Some(db) = TestDb::create() else { return };
        assert_eq!(
            PgStore::schema_state(&db.options()).expect("state"),
            SchemaState::Missing
        );
        drop(open(&db));
        assert_eq!(
            PgStore::schema_state(&db.options()).expect("state"),
            SchemaState::Current
        );
        db.execute("UPDATE muster.meta SET value = 99 WHERE key = 'schema_version'")
            .expect("update");
        let err = PgStore::open(&db.options()).err().expect("refused");
        assert!(
            matches!(
                err,
                StoreError::TooNew {
                    found: 99,
                    supported: PG_SCHEMA_VERSION
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("run the newer muster-hub"),
            "{err}"
        );
        assert_eq!(
            PgStore::schema_state(&db.options()).expect("state"),
            SchemaState::Newer(99)
        );
    }

    #[test]
    fn hubs_opening_a_new_database_at_once_all_succeed() {
        let Some(db) = TestDb::create() else { return };
        let opts = db.options();
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let opts = opts.clone();
                std::thread::spawn(move || PgStore::open(&opts).map(drop))
            })
            .collect();
        for o in opens {
            o.join().expect("thread").expect("open");
        }
        db.execute("SELECT 1 FROM muster.leader WHERE id = 1 AND term = 0")
            .expect("one leader row");
    }

    #[test]
    fn a_lost_connection_is_an_error_not_a_panic() {
        let Some(db) = TestDb::create() else { return };
        let s = open(&db);
        s.take_term("a", "").expect("term");
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .expect("terminate");
        let err = s
            .commit(&[Write::NextTaskId(3)], 100)
            .expect_err("the connection is gone");
        assert!(matches!(err, StoreError::Db(_)), "{err:?}");
        assert!(s.restore(0).is_err());
    }

    #[test]
    fn store_copy_moves_every_table_of_a_redb_store_and_refuses_a_full_target() {
        let Some(db) = TestDb::create() else { return };
        let dir = tempfile::tempdir().expect("dir");
        let src =
            super::super::RedbStore::open(&dir.path().join(crate::store::DB_FILE)).expect("redb");
        let all: Vec<Write> = crate::store::tests::one_of_each_write()
            .into_iter()
            .map(|(_, w)| w)
            .collect();
        src.commit(&all, 10_000).expect("commit");
        // More rows than one chunk, so the copy walks its chunks.
        let writes: Vec<Write> = (2..=4_500u64)
            .map(|i| {
                let state = if i % 2 == 0 {
                    TaskState::Completed
                } else {
                    TaskState::Queued
                };
                Write::Task(task(i, state, i, Some(&format!("key{i}"))))
            })
            .chain((2..=4_500u64).map(|i| Write::Key(format!("key{i}"), TaskId(i))))
            .collect();
        src.commit(&writes, 10_000).expect("commit");
        let before = src.restore(0).expect("restore");
        let pg = open(&db);
        let counts = pg.copy_from_redb(&src).expect("copy");
        assert_eq!(counts.tasks, 4_500);
        assert_eq!(counts.keys, 4_500);
        assert_eq!(
            (
                counts.attempts,
                counts.events,
                counts.agents,
                counts.identities,
                counts.tokens
            ),
            (1, 1, 1, 1, 2)
        );
        pg.take_term("a", "").expect("term");
        let after = pg.restore(0).expect("restore");
        assert_eq!(after.live.len(), before.live.len());
        assert_eq!(after.keys.len(), before.keys.len());
        assert_eq!(after.next_task_id, before.next_task_id);
        assert_eq!(after.next_event_seq, before.next_event_seq);
        assert_eq!(after.tokens.len(), 1);
        assert_eq!(after.api_tokens.len(), 1);
        let pg = Store::from_backend(Box::new(pg));
        let page = pg
            .reader()
            .expect("reader")
            .tasks(Some(TaskState::Completed), None, None, 10_000, None)
            .expect("page");
        assert_eq!(page.tasks.len(), 2_250);
        let again = PgStore::open(&db.options()).expect("open");
        let err = again.copy_from_redb(&src).expect_err("refused");
        assert!(err.to_string().contains("empty database only"), "{err}");
    }
}
