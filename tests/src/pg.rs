//! A private PostgreSQL server for one test, for what a shared server cannot
//! be used for: restarting the database under a running hub. Started from
//! Debian's binaries (`/usr/lib/postgresql/*/bin`) in a temporary directory
//! on a free loopback port; as root it runs as the `postgres` user, since
//! `initdb` refuses root. Stopped and removed when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{free_tcp_port, run_bounded, stderr};

/// How long initdb, a start or a stop may take.
const PG_TIMEOUT: Duration = Duration::from_secs(60);

/// A running private PostgreSQL server.
pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

fn pg_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

impl PgServer {
    /// Starts a server, or `None` (printing `SKIPPED`) when PostgreSQL is not
    /// installed; under `CI=true` a missing PostgreSQL fails the test instead.
    ///
    /// # Panics
    /// When the server cannot be initialised or started.
    pub fn start() -> Option<PgServer> {
        let Some(bin) = pg_bin() else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "PostgreSQL is not installed and CI=true (bash tests/run.sh installs it)"
            );
            eprintln!("SKIPPED: PostgreSQL is not installed (run bash tests/run.sh)");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("muster-pg-")
            .tempdir()
            .expect("a temporary directory");
        std::fs::create_dir(dir.path().join("data")).expect("data");
        std::fs::create_dir(dir.path().join("sock")).expect("sock");
        let server = PgServer {
            bin,
            port: free_tcp_port(),
            dir,
        };
        if is_root() {
            let out = run_bounded(
                Command::new("chown").args(["-R", "postgres:", &server.path_str(None)]),
                PG_TIMEOUT,
            );
            assert!(out.status.success(), "chown: {}", stderr(&out));
        }
        let data = server.path_str(Some("data"));
        let out = run_bounded(
            &mut server.as_postgres(
                "initdb",
                &[
                    "-D",
                    &data,
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ],
            ),
            PG_TIMEOUT,
        );
        assert!(out.status.success(), "initdb: {}", stderr(&out));
        server.ctl("start");
        Some(server)
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl restart -m fast`: every connection is cut, the server comes back.
    pub fn restart(&self) {
        self.ctl("restart");
    }

    fn ctl(&self, what: &str) {
        let data = self.path_str(Some("data"));
        let log = self.path_str(Some("sock/log"));
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.path_str(Some("sock"))
        );
        let out = run_bounded(
            &mut self.as_postgres(
                "pg_ctl",
                &[
                    "-D", &data, "-l", &log, "-w", "-t", "60", "-m", "fast", "-o", &opts, what,
                ],
            ),
            PG_TIMEOUT,
        );
        assert!(out.status.success(), "pg_ctl {what}: {}", stderr(&out));
    }

    fn path_str(&self, sub: Option<&str>) -> String {
        let p: &Path = self.dir.path();
        match sub {
            Some(s) => p.join(s).to_string_lossy().into_owned(),
            None => p.to_string_lossy().into_owned(),
        }
    }

    fn as_postgres(&self, program: &str, args: &[&str]) -> Command {
        let exe = self.bin.join(program);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe).args(args);
            c
        } else {
            let mut c = Command::new(exe);
            c.args(args);
            c
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.path_str(Some("data"));
        let _ = run_bounded(
            &mut self.as_postgres("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]),
            PG_TIMEOUT,
        );
    }
}

/// Whether this process runs as root, read from /proc (this crate has no unsafe code).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
