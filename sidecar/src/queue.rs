//! The sidecar's durable queue (redb).
//!
//! ```text
//! meta    &str   -> u64         schema_version, next_report
//! tasks   u64    -> LocalTask   tasks held, with phase and run handle
//! outbox  u64    -> Report      reports not yet acknowledged by the hub
//! ```
//!
//! [`Queue::apply`] writes one batch of core effects in one durable transaction.

use std::path::Path;

use muster_protocol::msg::Report;
use muster_protocol::{decode, encode};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::core::{Effect, LocalTask};

/// The schema this build writes.
pub const SCHEMA_VERSION: u64 = 1;
/// The database file in the data directory.
pub const DB_FILE: &str = "sidecar.redb";

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
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
        if !effects.iter().any(Effect::is_store) {
            return Ok(());
        }
        let mut tx = self.db.begin_write()?;
        // A batch that only forgets (acknowledged reports, finished or dropped tasks)
        // need not reach the disk before anything else happens: if it is lost in a
        // crash, the restarted sidecar replays reports the hub already has and offers
        // tasks it already ended, and the hub answers both as repeats. Such batches
        // ride on the next durable commit; it saves one flush per acknowledgement.
        let forget_only = effects.iter().all(|e| {
            matches!(e, Effect::DeleteReport(_) | Effect::DeleteTask(..)) || !e.is_store()
        });
        tx.set_durability(if forget_only {
            Durability::None
        } else {
            Durability::Immediate
        })?;
        {
            let mut tasks = tx.open_table(TASKS)?;
            let mut outbox = tx.open_table(OUTBOX)?;
            let mut meta = tx.open_table(META)?;
            for e in effects {
                match e {
                    Effect::PutTask(t) => {
                        let bytes = encode(t).map_err(|e| QueueError::Db(e.to_string()))?;
                        tasks.insert(t.task.0, bytes.as_slice())?;
                    }
                    Effect::DeleteTask(id, _) => {
                        tasks.remove(id.0)?;
                    }
                    Effect::PutReport(r) => {
                        let bytes = encode(r).map_err(|e| QueueError::Db(e.to_string()))?;
                        outbox.insert(r.id.0, bytes.as_slice())?;
                    }
                    Effect::DeleteReport(id) => {
                        outbox.remove(id.0)?;
                    }
                    Effect::NextReport(n) => {
                        meta.insert("next_report", *n)?;
                    }
                    _ => {}
                }
            }
        }
        tx.commit()?;
        Ok(())
    }
}
