//! Issue 19, part 1: a hub keeping its state in PostgreSQL (`[store] kind =
//! "postgres"`), end to end against the real binaries on 127.0.0.1: submit →
//! assign → complete, then a restart that keeps every task, attempt and
//! idempotency key.
//!
//! Each test gets a fresh database from `MUSTER_TEST_PG_URL` (tests/run.sh
//! starts a private cluster); without it the tests say SKIPPED, or fail under
//! CI=true.

use std::time::Duration;

use muster_tests::tasks::*;
use muster_tests::{Hub, stderr, stdout};
use serde_json::Value;

/// How long a short task may take from submission to its end.
const TASK_END: Duration = Duration::from_secs(20);

#[test]
fn a_hub_on_postgres_runs_a_task_and_keeps_it_across_a_restart() {
    let Some(mut hub) = Hub::init_postgres() else {
        return;
    };
    let toml = std::fs::read_to_string(hub.config_path()).expect("hub.toml");
    assert!(toml.contains("kind = \"postgres\""), "{toml}");
    assert!(
        !hub.data_dir().join("hub.redb").exists(),
        "no redb file beside a PostgreSQL store"
    );
    hub.set_policy("heartbeat_interval", "\"1s\"");
    hub.start();
    let mut sc = sidecar(&hub, "pg1", &[]);
    let script = agent_script(&sc, "agent.sh", "#!/bin/sh\necho done\nexit 0\n");
    use_command(&sc, &script);
    go_online(&hub, &mut sc);

    let out = hub.cli(&[
        "submit",
        "--title",
        "on postgres",
        "--key",
        "k\u{1}1",
        "--wait",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "submit --wait: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let id = serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v["id"].as_u64())
        .expect("an id");
    let t = wait_state(&hub, id, &["completed", "failed", "cancelled"], TASK_END);
    assert_eq!(t["state"], "completed", "{t}");
    assert_eq!(t["agent"], "pg1", "{t}");
    assert_eq!(outcomes(&t), ["completed"], "{t}");
    // A second task waits in the queue across the restart.
    drop(sc);
    let queued = submit(&hub, "queued across the restart", &[]);

    hub.restart();
    let t = show(&hub, id);
    assert_eq!(t["state"], "completed", "kept across the restart: {t}");
    assert_eq!(attempts(&t).len(), 1, "{t}");
    // Queued, or assigned to the sidecar the hub has not yet seen go.
    let q = show(&hub, queued);
    assert!(q["state"] == "queued" || q["state"] == "assigned", "{q}");
    // The idempotency key survived too: the same key answers the same task.
    let again = submit(&hub, "on postgres", &["--key", "k\u{1}1"]);
    assert_eq!(again, id, "the key still names the first task");
    let listed = hub.json(&["tasks"]);
    let n = listed["tasks"].as_array().map_or(0, Vec::len);
    assert_eq!(n, 2, "{listed}");
}

/// `migrate --check` on both kinds, then `store copy` from a redb hub into a
/// fresh database, which the hub then serves from.
#[test]
fn migrate_check_and_store_copy_move_a_redb_hub_to_postgres() {
    let Some(db) = muster_hub::store::testdb::TestDb::create() else {
        return;
    };
    let mut hub = Hub::init();
    hub.start();
    let ids: Vec<u64> = (0..3)
        .map(|i| {
            submit(
                &hub,
                &format!("to copy {i}"),
                &["--key", &format!("copy-{i}")],
            )
        })
        .collect();
    hub.stop();
    let ok = |args: &[&str]| {
        let out = hub.cli(args);
        assert!(
            out.status.success(),
            "{args:?} exited {}: {}{}",
            out.status,
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    };
    let refused = |args: &[&str], why: &str| {
        let out = hub.cli(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(why), "{args:?}: {}", stderr(&out));
    };
    assert!(ok(&["migrate", "--check"]).contains("current"));
    muster_tests::set_toml_key(
        &hub.config_path(),
        "store",
        "url",
        &format!("\"{}\"", db.url()),
    );
    muster_tests::set_toml_key(&hub.config_path(), "store", "kind", "\"postgres\"");
    refused(&["migrate", "--check"], "no schema yet");
    let copied = ok(&["store", "copy", "--from", "redb", "--to", "postgres"]);
    assert!(copied.contains("copied 3 tasks"), "{copied}");
    assert!(ok(&["migrate", "--check"]).contains("current"));
    refused(
        &["store", "copy", "--from", "redb", "--to", "postgres"],
        "empty database only",
    );
    db.execute("UPDATE muster.meta SET value = 99 WHERE key = 'schema_version'")
        .expect("update");
    refused(&["migrate", "--check"], "newer than this build's");
    db.execute("UPDATE muster.meta SET value = 1 WHERE key = 'schema_version'")
        .expect("update");
    hub.start();
    for id in &ids {
        assert_eq!(show(&hub, *id)["state"], "queued");
    }
    let again = submit(&hub, "to copy 1", &["--key", "copy-1"]);
    assert_eq!(again, ids[1], "the idempotency keys came along");
}
