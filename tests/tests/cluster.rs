//! Issue 19: hubs on PostgreSQL, one leader fenced by a term, failover.
//!
//! Three real hubs share one test database (`MUSTER_TEST_PG_URL`, which
//! `tests/run.sh` starts; each test makes its own database); four real
//! sidecars run instant-ish agents that log every start. The checks are the
//! issue's: after a kill -9 of the leader during a storm of submissions a
//! standby serves within the lease plus 5 s, every acknowledged task
//! completes, none twice, and no running agent is started again; a leader
//! stopped past its lease is fenced by the term when it wakes and steps down;
//! a database restarted under a leader loses nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use muster_hub::store::testdb::TestDb;
use muster_tests::pg::PgServer;
use muster_tests::tasks::{argv, go_online};
use muster_tests::{Hub, Sidecar, set_toml_key, stderr, stdout, wait_for, wait_until};
use serde_json::Value;

/// The leader lease the tests run with.
const LEASE: Duration = Duration::from_secs(2);
/// How long the whole fleet may take to finish the storm's tasks.
const ALL_DONE: Duration = Duration::from_secs(180);

/// A hub of the cluster on `db`: lease [`LEASE`], one-second heartbeats,
/// health and metrics on a loopback port ([`http_port`]).
fn member(hub: Hub) -> Hub {
    set_toml_key(&hub.config_path(), "store", "lease", "\"2s\"");
    hub.set_policy("heartbeat_interval", "\"1s\"");
    let http = format!("\"127.0.0.1:{}\"", muster_tests::free_tcp_port());
    set_toml_key(&hub.config_path(), "", "http_listen", &http);
    hub
}

/// The port of `hub`'s `http_listen`.
fn http_port(hub: &Hub) -> u16 {
    let text = std::fs::read_to_string(hub.config_path()).expect("hub.toml");
    let line = text
        .lines()
        .find(|l| l.starts_with("http_listen"))
        .expect("http_listen is set");
    line.trim_end_matches('"')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

/// `GET http://127.0.0.1:<port><path>`: status and body.
fn http_get(port: u16, path: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut res = agent
        .get(&format!("http://127.0.0.1:{port}{path}"))
        .call()
        .expect("an HTTP answer");
    let status = res.status().as_u16();
    (status, res.body_mut().read_to_string().unwrap_or_default())
}

/// Three hubs on one database, started; the first leads.
fn cluster(db: &TestDb) -> Vec<Hub> {
    let mut a = member(Hub::init_store(db.url()));
    a.start();
    let mut hubs = vec![a];
    for _ in 0..2 {
        let mut h = member(Hub::join(&hubs[0], db.url()));
        h.start();
        hubs.push(h);
    }
    hubs
}

/// `cluster status --json` through `hub`'s data directory.
fn status(hub: &Hub) -> Value {
    hub.json(&["cluster", "status"])
}

/// Which of `hubs` leads now, by the database's word (with a fresh lease).
fn leader_index(hubs: &[Hub], ask: &Hub) -> Option<usize> {
    let s = status(ask);
    if s["lease_fresh"] != true {
        return None;
    }
    let addr = s["leader"].as_str()?.to_string();
    hubs.iter().position(|h| h.addr().to_string() == addr)
}

/// A token from the cluster that names all three hubs.
fn cluster_token(hubs: &[Hub], via: &Hub) -> String {
    wait_for(Duration::from_secs(30), "a token naming every hub", || {
        let t = via.token("agent");
        if hubs.iter().all(|h| t.contains(&h.addr().to_string())) {
            Ok(t)
        } else {
            Err(t)
        }
    })
}

/// An enrolled sidecar with 4 slots whose agent logs "task generation" at
/// each start to `runs`, then works for `work`.
fn worker(hubs: &[Hub], via: &Hub, name: &str, runs: &Path, work: &str) -> Sidecar {
    let sc = Sidecar::new(name);
    let out = sc.enroll_args(
        &["--token", "-", "--slots", "4"],
        Some(&cluster_token(hubs, via)),
    );
    assert!(out.status.success(), "enroll: {}", stderr(&out));
    let config = std::fs::read_to_string(sc.config_path()).expect("sidecar.toml");
    for h in hubs {
        assert!(
            config.contains(&h.addr().to_string()),
            "sidecar.toml names every hub of the cluster:\n{config}"
        );
    }
    sc.set("", "disk_floor_mb", "1");
    sc.set_agent("settle", "\"50ms\"");
    sc.set_agent("stop_grace", "\"2s\"");
    let script = format!(
        "echo \"$MUSTER_TASK_ID $MUSTER_GENERATION\" >> '{}'; sleep {work}",
        runs.display()
    );
    sc.set_agent("command", &argv(&["sh", "-c", &script]));
    sc
}

/// Task id → the generations its agent was started with, from the run log.
fn starts(runs: &Path) -> BTreeMap<u64, Vec<u64>> {
    let text = std::fs::read_to_string(runs).unwrap_or_default();
    let mut out: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for line in text.lines() {
        let mut w = line.split_whitespace().map(|x| x.parse::<u64>().ok());
        if let (Some(Some(id)), Some(Some(generation))) = (w.next(), w.next()) {
            out.entry(id).or_default().push(generation);
        }
    }
    out
}

/// Every task the cluster holds, by id, with its state and generation.
fn all_tasks(via: &Hub) -> BTreeMap<u64, (String, u64)> {
    let mut out = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut args = vec!["tasks", "--limit", "1000"];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c.as_str()]);
        }
        let page = via.json(&args);
        for t in page["tasks"].as_array().into_iter().flatten() {
            let id = t["id"].as_u64().expect("an id");
            let state = t["state"].as_str().unwrap_or("?").to_string();
            out.insert(id, (state, t["generation"].as_u64().unwrap_or(0)));
        }
        match page["next_cursor"].as_u64() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

/// Submits `batch` (JSON lines with keys) through `via` until the cluster
/// acknowledges it (the same keys make a retry return the same tasks).
fn submit_until_acknowledged(via: &Hub, batch: &str, file: &Path) -> Vec<u64> {
    std::fs::write(file, batch).expect("the batch file");
    let path = file.to_string_lossy().into_owned();
    wait_for(Duration::from_secs(60), "the batch acknowledged", || {
        let out = via.cli(&["submit", "--batch", &path, "--json"]);
        if !out.status.success() {
            return Err(stderr(&out));
        }
        let v: Value = serde_json::from_str(stdout(&out).trim()).map_err(|e| e.to_string())?;
        assert_eq!(v["refused"], 0, "no line of the batch refused: {v}");
        let ids: Vec<u64> = v["results"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["id"].as_u64())
            .collect();
        if ids.is_empty() {
            Err(format!("no ids in {v}"))
        } else {
            Ok(ids)
        }
    })
}

#[test]
fn kill9_of_the_leader_during_a_storm_loses_and_repeats_nothing() {
    let Some(db) = TestDb::create() else { return };
    let mut hubs = cluster(&db);
    assert_eq!(
        leader_index(&hubs, &hubs[1]),
        Some(0),
        "the first hub leads"
    );
    let s = status(&hubs[2]);
    assert_eq!(s["hubs"].as_array().map(Vec::len), Some(3), "{s}");
    let term_before = s["term"].as_u64().expect("a term");
    // A standby is live but not ready, names the leader, and says in its
    // metrics that it does not lead; the leader is ready.
    let (code, body) = http_get(http_port(&hubs[1]), "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&hubs[0].addr().to_string()), "{body}");
    assert_eq!(http_get(http_port(&hubs[1]), "/livez").0, 200);
    assert!(
        http_get(http_port(&hubs[1]), "/metrics")
            .1
            .contains("muster_cluster_leader 0")
    );
    assert_eq!(http_get(http_port(&hubs[0]), "/readyz").0, 200);
    assert!(
        http_get(http_port(&hubs[0]), "/metrics")
            .1
            .contains("muster_cluster_leader 1")
    );

    let dir = tempfile::tempdir().expect("a directory");
    let runs = dir.path().join("runs.log");
    let mut sidecars: Vec<Sidecar> = (0..4)
        .map(|i| worker(&hubs, &hubs[2], &format!("w{i}"), &runs, "0.2"))
        .collect();
    for sc in &mut sidecars {
        go_online(&hubs[2], sc);
    }

    // The storm: 20 batches of 50, submitted through the third hub (a
    // standby, so every call follows it to the leader), while the leader is
    // killed after the sixth batch.
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
    let mut killed_at = None;
    for b in 0..20 {
        let batch: String = (0..50)
            .map(|i| {
                let n = b * 50 + i;
                format!("{{\"title\":\"storm {n}\",\"key\":\"storm-{n}\"}}\n")
            })
            .collect();
        let ids = submit_until_acknowledged(&hubs[2], &batch, &dir.path().join("batch.jsonl"));
        assert_eq!(ids.len(), 50, "every task of the batch acknowledged");
        acknowledged.lock().expect("ids").extend(ids);
        if b == 5 {
            // Wait until agents are running, so the kill meets live runs.
            wait_until(Duration::from_secs(30), "runs under way", || {
                (starts(&runs).len() >= 20).then_some(())
            });
            hubs[0].kill9();
            killed_at = Some(Instant::now());
        }
    }
    let killed_at = killed_at.expect("the leader was killed");

    // A standby serves within the lease plus 5 s of the kill.
    let took = wait_for(
        LEASE + Duration::from_secs(5),
        "a new leader",
        || match leader_index(&hubs, &hubs[1]) {
            Some(i) if i != 0 => Ok(killed_at.elapsed()),
            other => Err(format!("leader {other:?}")),
        },
    );
    eprintln!(
        "failover: a standby led {} ms after the kill",
        took.as_millis()
    );
    let s = status(&hubs[1]);
    assert!(s["term"].as_u64() > Some(term_before), "a new term: {s}");
    let new = leader_index(&hubs, &hubs[1]).expect("a leader");
    wait_for(
        Duration::from_secs(10),
        "the new leader ready",
        || match http_get(http_port(&hubs[new]), "/readyz") {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    // Every acknowledged task completes, each agent started once.
    let acknowledged = acknowledged.lock().expect("ids").clone();
    assert_eq!(acknowledged.len(), 1000);
    let tasks = wait_for(ALL_DONE, "all 1,000 tasks completed", || {
        let tasks = all_tasks(&hubs[1]);
        let done = tasks.values().filter(|(s, _)| s == "completed").count();
        if done == acknowledged.len() {
            Ok(tasks)
        } else {
            Err(format!("{done} of {} completed", acknowledged.len()))
        }
    });
    for id in &acknowledged {
        assert!(tasks.contains_key(id), "acknowledged task {id} was lost");
    }
    assert_eq!(tasks.len(), acknowledged.len(), "no task appeared twice");
    let started = starts(&runs);
    for (id, (_, generation)) in &tasks {
        let gens = started.get(id).cloned().unwrap_or_default();
        assert_eq!(
            gens.len(),
            1,
            "task {id}'s agent started exactly once (generations {gens:?})"
        );
        assert_eq!(
            gens[0], *generation,
            "task {id} completed under the generation that ran"
        );
    }
    for sc in &mut sidecars {
        sc.stop();
    }
}

#[test]
fn a_leader_stopped_past_its_lease_is_fenced_by_the_term_and_steps_down() {
    let Some(db) = TestDb::create() else { return };
    let mut hubs = cluster(&db);
    let term_before = status(&hubs[1])["term"].as_u64().expect("a term");
    let pid = hubs[0].pid().expect("the leader runs");
    signal(pid, "STOP");
    let stopped_at = Instant::now();
    let new = wait_for(
        LEASE * 3 + Duration::from_secs(5),
        "a takeover",
        || match leader_index(&hubs, &hubs[1]) {
            Some(i) if i != 0 => Ok(i),
            other => Err(format!("leader {other:?}")),
        },
    );
    eprintln!(
        "takeover {} ms after SIGSTOP",
        stopped_at.elapsed().as_millis()
    );
    let term_after = status(&hubs[1])["term"].as_u64().expect("a term");
    assert!(term_after > term_before);
    // Work submitted to the new leader meanwhile.
    let id = submit_one(&hubs[new], "during the pause");

    // The old leader wakes believing it leads; whatever it is asked now, it
    // may not acknowledge: a submission sent straight to it either fails or
    // (having followed a standby's answer) lands at the new leader.
    signal(pid, "CONT");
    let old = hubs[0].addr().to_string();
    let out = hubs[0].cli(&[
        "submit",
        "--title",
        "sent to the old leader",
        "--key",
        "old-1",
        "--hub",
        &old,
        "--json",
    ]);
    wait_until(Duration::from_secs(20), "the old leader steps down", || {
        hubs[0].log().contains("stepping down").then_some(())
    });
    let tasks = all_tasks(&hubs[new]);
    assert!(tasks.contains_key(&id), "the new leader's task stays");
    if out.status.success() {
        let v: Value = serde_json::from_str(stdout(&out).trim()).expect("json");
        let acked = v["id"].as_u64().expect("an id");
        assert!(
            tasks.contains_key(&acked),
            "a submission acknowledged after the takeover must be in the store: {v}"
        );
    }
    let log = hubs[0].log();
    assert!(
        log.contains("another hub took over") || log.contains("lock connection"),
        "the old leader says why it stepped down:\n{}",
        muster_tests::tail(&log, 3000)
    );
    // It is a standby now: it names the new leader, and its CLI follows.
    let s = status(&hubs[0]);
    assert_eq!(
        s["leader"].as_str(),
        Some(hubs[new].addr().to_string().as_str())
    );
    let again = hubs[0].json(&["task", "show", &id.to_string()]);
    assert_eq!(again["id"].as_u64(), Some(id));
    hubs.truncate(3);
}

#[test]
fn a_database_restart_under_the_leader_loses_nothing() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.url();
    let mut a = member(Hub::init_store(&url));
    a.start();
    let mut b = member(Hub::join(&a, &url));
    b.start();
    let hubs = vec![a, b];
    let dir = tempfile::tempdir().expect("a directory");
    let runs = dir.path().join("runs.log");
    let mut sc = worker(&hubs, &hubs[1], "w0", &runs, "0.5");
    go_online(&hubs[1], &mut sc);
    let batch = |from: usize| -> String {
        (from..from + 40)
            .map(|n| format!("{{\"title\":\"r {n}\",\"key\":\"r-{n}\"}}\n"))
            .collect()
    };
    let file = dir.path().join("batch.jsonl");
    let mut acknowledged: BTreeSet<u64> = submit_until_acknowledged(&hubs[1], &batch(0), &file)
        .into_iter()
        .collect();
    wait_until(Duration::from_secs(30), "runs under way", || {
        (starts(&runs).len() >= 4).then_some(())
    });
    pg.restart();
    acknowledged.extend(submit_until_acknowledged(&hubs[1], &batch(40), &file));
    assert_eq!(acknowledged.len(), 80);
    let tasks = wait_for(ALL_DONE, "all 80 tasks completed", || {
        let tasks = all_tasks(&hubs[1]);
        let done = tasks.values().filter(|(s, _)| s == "completed").count();
        if done == acknowledged.len() {
            Ok(tasks)
        } else {
            Err(format!("{done} of {} completed", acknowledged.len()))
        }
    });
    assert_eq!(
        tasks.keys().copied().collect::<BTreeSet<_>>(),
        acknowledged,
        "exactly the acknowledged tasks"
    );
    for (id, gens) in starts(&runs) {
        assert_eq!(gens.len(), 1, "task {id}'s agent started once: {gens:?}");
    }
    sc.stop();
}

/// `submit --title T --json` through `hub`; returns the id.
fn submit_one(hub: &Hub, title: &str) -> u64 {
    let v = hub.json(&["submit", "--title", title]);
    v["id"].as_u64().expect("an id")
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

#[test]
fn init_refuses_a_second_cluster_on_a_database_and_a_join_without_the_pki() {
    let Some(db) = TestDb::create() else { return };
    let _first = Hub::init_store(db.url());
    let dir = tempfile::tempdir().expect("a directory");
    let init = |data: &Path, args: &[&str]| {
        let port = muster_tests::free_udp_port().to_string();
        let listen = format!("127.0.0.1:{port}");
        muster_tests::run_bounded(
            Command::new(&muster_tests::bins().hub)
                .args([
                    "init",
                    "--data-dir",
                    &data.to_string_lossy(),
                    "--listen",
                    &listen,
                ])
                .args(args),
            Duration::from_secs(60),
        )
    };
    // A second `init --store` would make a second CA and fence the leader.
    let second = dir.path().join("second");
    let out = init(&second, &["--store", db.url()]);
    assert!(!out.status.success(), "refused");
    assert!(stderr(&out).contains("--join"), "{}", stderr(&out));
    assert!(!second.join("ca.key").exists(), "no CA left behind");
    // `--join` names the files it needs when they were not copied.
    let third = dir.path().join("third");
    std::fs::create_dir_all(&third).expect("dir");
    let out = init(&third, &["--join", db.url()]);
    assert!(!out.status.success(), "refused");
    for f in ["ca.crt", "ca.key", "admin.crt", "admin.key"] {
        assert!(stderr(&out).contains(f), "names {f}: {}", stderr(&out));
    }
}

#[test]
fn a_standby_answers_silent_garbage_and_oversize_connections_by_naming_the_leader() {
    use muster_protocol::msg::{HubMsg, Refused};
    let Some(db) = TestDb::create() else { return };
    let mut a = member(Hub::init_store(db.url()));
    a.start();
    let mut b = member(Hub::join(&a, db.url()));
    b.start();
    let leader = a.addr().to_string();
    let standby = b.addr();
    let cfg = muster_protocol::tls::enroll_client_config(&a.ca_fingerprint()).expect("config");
    muster_tests::block_on(async {
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        let connect = || async {
            ep.connect_with(cfg.clone(), standby, "localhost")
                .expect("connect")
                .await
                .expect("a standby completes the handshake")
        };
        let closed_naming_the_leader = |e: quinn::ConnectionError| match e {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(
                    c.error_code,
                    quinn::VarInt::from_u32(muster_protocol::CLOSE_NOT_LEADER)
                );
                assert_eq!(String::from_utf8_lossy(&c.reason), leader);
            }
            other => panic!("closed with {other}, not CLOSE_NOT_LEADER"),
        };
        // Silent: closed after the first-message timeout, naming the leader.
        let silent = connect().await;
        let e = tokio::time::timeout(Duration::from_secs(15), silent.closed())
            .await
            .expect("a silent connection is closed");
        closed_naming_the_leader(e);
        // Oversize: a frame header announcing 1 GiB is not read into memory.
        let big = connect().await;
        let (mut send, _recv) = big.open_bi().await.expect("a stream");
        send.write_all(&(1u32 << 30).to_be_bytes())
            .await
            .expect("write");
        send.write_all(&[0u8; 1024]).await.expect("write");
        let e = tokio::time::timeout(Duration::from_secs(15), big.closed())
            .await
            .expect("an oversize connection is closed");
        closed_naming_the_leader(e);
        // Garbage: the answer is still the typed refusal.
        let junk = connect().await;
        let (mut send, recv) = junk.open_bi().await.expect("a stream");
        send.write_all(&[0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef])
            .await
            .expect("write");
        let _ = send.finish();
        let mut rd = muster_protocol::FrameReader::new(recv, 1 << 16);
        let answer = tokio::time::timeout(Duration::from_secs(15), rd.recv::<HubMsg>())
            .await
            .expect("an answer in time")
            .expect("a frame")
            .expect("not the end of the stream");
        assert_eq!(
            answer,
            HubMsg::Refused(Refused::NotLeader {
                leader: Some(leader.clone())
            })
        );
    });
    // The standby still answers, and its CLI still reaches the leader.
    let stats = b.json(&["stats"]);
    assert!(stats.is_object(), "{stats}");
}
