//! A fresh PostgreSQL database per test, for the hub's unit tests and the
//! black-box suite alike: created from `MUSTER_TEST_PG_URL` (which
//! `tests/run.sh` sets after starting a private cluster) and dropped after.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::PgOptions;

/// The variable naming the test server, e.g. `postgres://postgres@127.0.0.1:15432/postgres`.
pub const TEST_PG_URL: &str = "MUSTER_TEST_PG_URL";

/// How long creating or dropping a test database may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A database `muster_t_<random>` on the test server, dropped when this drops.
#[derive(Debug)]
pub struct TestDb {
    base: String,
    name: String,
    url: String,
}

impl TestDb {
    /// A fresh database, or `None` when `MUSTER_TEST_PG_URL` is not set: then,
    /// outside CI, it prints `SKIPPED: …` so the caller can return.
    ///
    /// # Panics
    /// When the variable is missing and `CI=true` (a green CI run must not hide
    /// a test that did not run), or when the server refuses the new database.
    pub fn create() -> Option<TestDb> {
        let Ok(base) = std::env::var(TEST_PG_URL) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{TEST_PG_URL} is not set and CI=true, so the PostgreSQL tests cannot be skipped (bash tests/run.sh starts a server and sets it)"
            );
            eprintln!("SKIPPED: no {TEST_PG_URL} (run bash tests/run.sh)");
            return None;
        };
        match TestDb::create_on(&base) {
            Ok(db) => Some(db),
            Err(e) => panic!("{e}"),
        }
    }

    /// A fresh database on the server `base` names (a URL of any database there).
    ///
    /// # Errors
    /// The server's message when it refuses.
    pub fn create_on(base: &str) -> Result<TestDb, String> {
        let name = format!("muster_t_{:016x}", random());
        admin(base, &format!("CREATE DATABASE {name}"))
            .map_err(|e| format!("cannot create test database {name} on {base}: {e}"))?;
        let url = with_database(base, &name);
        Ok(TestDb {
            base: base.to_string(),
            name,
            url,
        })
    }

    /// A fresh database `<prefix><random>` on the server `base` (a
    /// superuser's URL), dropped when this drops. Blocks: call it outside an
    /// async runtime's threads (it runs its own).
    ///
    /// # Errors
    /// The server's message when it refuses the new database.
    pub fn create_at(base: &str, prefix: &str) -> Result<TestDb, String> {
        let name = format!("{prefix}{:016x}", random());
        admin(base, &format!("CREATE DATABASE {name}"))
            .map_err(|e| format!("cannot create database {name}: {e}"))?;
        Ok(TestDb {
            url: with_database(base, &name),
            base: base.to_string(),
            name,
        })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL of this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How a store connects to this database.
    pub fn options(&self) -> PgOptions {
        PgOptions {
            url: self.url.clone(),
            password: None,
        }
    }

    /// Runs `sql` on this database (test set-up and inspection).
    ///
    /// # Errors
    /// The server's message.
    pub fn execute(&self, sql: &str) -> Result<(), String> {
        admin(&self.url, sql)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // FORCE ends a connection a failed test left open.
        let _ = admin(
            &self.base,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (main, query) = match url.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (url, None),
    };
    let host_part = match main.find("://") {
        Some(i) => match main[i + 3..].find('/') {
            Some(j) => &main[..i + 3 + j],
            None => main,
        },
        None => main,
    };
    match query {
        Some(q) => format!("{host_part}/{name}?{q}"),
        None => format!("{host_part}/{name}"),
    }
}

/// Runs `sql` on its own short-lived connection, on a thread of its own so
/// that it works from inside an async runtime too (a bench's drop).
fn admin(url: &str, sql: &str) -> Result<(), String> {
    let (url, sql) = (url.to_string(), sql.to_string());
    std::thread::spawn(move || admin_here(&url, &sql))
        .join()
        .map_err(|_| "the admin connection thread panicked".to_string())?
}

fn admin_here(url: &str, sql: &str) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let work = async {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            let driver = tokio::spawn(conn);
            let r = client
                .batch_execute(sql)
                .await
                .map_err(|e| match e.as_db_error() {
                    Some(db) => db.message().to_string(),
                    None => e.to_string(),
                });
            drop(client);
            let _ = driver.await;
            r
        };
        tokio::time::timeout(ADMIN_TIMEOUT, work)
            .await
            .map_err(|_| format!("no answer within {ADMIN_TIMEOUT:?}"))?
    })
}

/// Enough randomness for a name no other test run picks at the same time.
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_is_replaced() {
        assert_eq!(
            with_database("postgres://p@127.0.0.1:5/postgres", "x"),
            "postgres://p@127.0.0.1:5/x"
        );
        assert_eq!(
            with_database("postgres://p@127.0.0.1:5", "x"),
            "postgres://p@127.0.0.1:5/x"
        );
        assert_eq!(
            with_database("postgres://p@h/db?sslmode=disable", "x"),
            "postgres://p@h/x?sslmode=disable"
        );
    }
}
