//! Issue 4, bad input against the real binaries on 127.0.0.1: floods of
//! enrollment attempts and of submissions past the queue limit, task
//! descriptions at and one byte past their limit, and an authenticated
//! sidecar session that sends garbage after a valid hello. None of it may
//! crash a process, make the hub unresponsive to other clients, or lose
//! accepted work. (Random, truncated and oversized frames on operator streams
//! are in foundation.rs.)

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use muster_protocol::client::{self, Credential};
use muster_protocol::msg::{Hello, HubMsg, Open, OpenBody};
use muster_protocol::{AgentName, PROTOCOL_VERSION, decode, encode, frame_codec};
use muster_tests::tasks::pid_alive;
use muster_tests::{Hub, Sidecar, noise, noise_hex, stderr, wait_for};
use serde_json::Value;
use tokio_util::codec::{FramedRead, FramedWrite};

/// How long a fresh sidecar may take to connect and show up online.
const CONNECT: Duration = Duration::from_secs(20);
/// How long a short task may take from submission to its end.
const TASK_END: Duration = Duration::from_secs(20);
/// What "answers quickly" means for another client during a flood (a CLI
/// process with its own QUIC handshake, on a 2-core machine the flood and other
/// test binaries load; unloaded it takes about 0.1 s, and the tests print it).
const QUICK: Duration = Duration::from_secs(6);

// === helpers ===

/// A hub (heartbeat 1 s) with `limits` edits, started.
fn hub_with_limits(limits: &[(&str, &str)]) -> Hub {
    let mut hub = Hub::init();
    hub.set_policy("heartbeat_interval", "\"1s\"");
    for (k, v) in limits {
        hub.set_limit(k, v);
    }
    hub.start();
    hub
}

/// An enrolled sidecar with `capabilities`, started and online.
fn online_sidecar(hub: &Hub, name: &str, capabilities: &[&str]) -> Sidecar {
    let mut sc = Sidecar::enroll(hub, name, capabilities);
    sc.set_agent("settle", "\"100ms\"");
    sc.start_connected(CONNECT);
    hub.wait_agent_state(name, "online", CONNECT);
    sc
}

/// The hub process is alive, answers `stats`, and never panicked.
fn assert_hub_healthy(hub: &Hub) {
    let pid = hub.pid().expect("the hub fixture runs");
    assert!(pid_alive(pid), "the hub process {pid} is gone");
    let v = hub.json(&["stats"]);
    assert!(v.get("agents").is_some(), "stats: {v}");
    assert!(!hub.log().contains("panicked"), "the hub panicked");
}

/// Submits a task and waits until it completed; returns `task show`.
fn run_task(hub: &Hub, title: &str, extra: &[&str]) -> Value {
    let mut args = vec!["submit", "--title", title];
    args.extend_from_slice(extra);
    let id = hub.json(&args)["id"].as_u64().expect("submit prints an id");
    let t = wait_for(TASK_END, &format!("task {id} ({title}) ended"), || {
        let t = hub.json(&["task", "show", &id.to_string()]);
        if ["completed", "failed", "cancelled"]
            .iter()
            .any(|s| t["state"] == *s)
        {
            Ok(t)
        } else {
            Err(t.to_string())
        }
    });
    assert_eq!(t["state"], "completed", "{t}");
    t
}

/// Runs `muster-hub <args> --json` and times it; `(elapsed, output)`.
fn timed(hub: &Hub, args: &[&str]) -> (Duration, std::process::Output) {
    let mut all = args.to_vec();
    all.push("--json");
    let start = Instant::now();
    let out = hub.cli(&all);
    (start.elapsed(), out)
}

// === enrollment flood ===

#[test]
fn enrollment_flood_is_rate_limited_and_the_hub_keeps_serving() {
    const PER_MINUTE: usize = 10;
    const FLOOD: usize = 50;
    let hub = hub_with_limits(&[("enroll_per_minute", &PER_MINUTE.to_string())]);
    // A real sidecar, enrolled first (that enrollment counts against the minute).
    let steady = online_sidecar(&hub, "steady", &[]);

    let intruder = Sidecar::new("intruder");
    let started = Instant::now();
    let mut said = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        let garbage = format!(
            "muster1/{}/{}/{}",
            hub.addr(),
            hub.ca_fingerprint(),
            noise_hex(32)
        );
        let out = intruder.enroll_with(&garbage, &[]);
        assert!(!out.status.success(), "a garbage token enrolled");
        said.push(stderr(&out));
    }
    let flood = started.elapsed();
    assert!(
        !intruder.data_dir().join("sidecar.crt").exists(),
        "a refused enrollment left a certificate"
    );
    let unknown = said
        .iter()
        .filter(|s| s.contains("does not know this token"))
        .count();
    let limited = said
        .iter()
        .filter(|s| s.contains("too many enrollment attempts"))
        .count();
    eprintln!(
        "{FLOOD} garbage enrollments in {} ms: {unknown} unknown token, {limited} too many attempts",
        flood.as_millis()
    );
    for s in &said {
        assert!(
            s.contains("does not know this token") || s.contains("too many enrollment attempts"),
            "an unexpected refusal: {s}"
        );
    }
    assert!(
        said[0].contains("does not know this token"),
        "first: {}",
        said[0]
    );
    assert!(
        (1..=PER_MINUTE).contains(&unknown),
        "{unknown} attempts got past a limit of {PER_MINUTE} a minute"
    );
    if flood < Duration::from_secs(50) {
        // One window: once limited, every later attempt is limited.
        let first_limited = said
            .iter()
            .position(|s| s.contains("too many"))
            .expect("some attempts are limited");
        assert!(
            said[first_limited..].iter().all(|s| s.contains("too many")),
            "an attempt got through after the limit: {said:?}"
        );
        assert_eq!(
            unknown + limited,
            FLOOD,
            "every attempt was refused one way or the other"
        );
    }
    let last = said.last().map(String::as_str).unwrap_or_default();
    assert!(
        last.contains("try again in"),
        "the limited refusal says when to try again: {last}"
    );

    // The hub still serves everyone else: operators quickly, the sidecar's session untouched.
    let (took, out) = timed(&hub, &["agents"]);
    assert!(out.status.success(), "agents: {}", stderr(&out));
    assert!(took < QUICK, "agents took {} ms", took.as_millis());
    assert_eq!(hub.agent_state("steady").as_deref(), Some("online"));
    assert!(
        !steady.log().contains("session ended"),
        "the real sidecar's session was disturbed:\n{}",
        steady.log()
    );
    let t = run_task(&hub, "after the enrollment flood", &[]);
    assert_eq!(t["agent"], "steady", "{t}");
    assert_hub_healthy(&hub);
}

// === submission flood past the queue limit ===

#[test]
fn submission_flood_past_the_queue_limit_is_refused_naming_it_and_others_are_served() {
    const LIMIT: usize = 20;
    const FLOOD_THREADS: usize = 4;
    const FLOOD_EACH: usize = 25;
    let hub = hub_with_limits(&[("max_queued_tasks", &LIMIT.to_string())]);
    // No sidecars: nothing leaves the queue.
    let mut accepted = Vec::new();
    for i in 0..LIMIT {
        let v = hub.json(&["submit", "--title", &format!("queued {i}")]);
        accepted.push(v["id"].as_u64().expect("an id"));
    }
    let out = hub.cli(&["submit", "--title", "one too many", "--json"]);
    assert!(
        !out.status.success(),
        "the {}th submission was accepted",
        LIMIT + 1
    );
    let first_refusal = stderr(&out);
    eprintln!("submission {}: {}", LIMIT + 1, first_refusal.trim());
    assert!(
        first_refusal.contains("max_queued_tasks"),
        "the refusal names the limit: {first_refusal}"
    );
    assert!(
        first_refusal.contains(&LIMIT.to_string()),
        "the refusal gives the limit's value: {first_refusal}"
    );

    // A flood from other clients while an operator keeps asking `agents` and `stats`.
    let refusals = Mutex::new(Vec::new());
    let flooding = std::sync::atomic::AtomicUsize::new(FLOOD_THREADS);
    let mut latencies: Vec<(String, Duration)> = Vec::new();
    let flood_start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..FLOOD_THREADS {
            let (hub, refusals, flooding) = (&hub, &refusals, &flooding);
            s.spawn(move || {
                for i in 0..FLOOD_EACH {
                    let out = hub.cli(&["submit", "--title", &format!("flood {t}.{i}"), "--json"]);
                    refusals
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((out.status.success(), stderr(&out)));
                }
                flooding.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        while flooding.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            for what in ["agents", "stats"] {
                let (took, out) = timed(&hub, &[what]);
                assert!(
                    out.status.success(),
                    "{what} during the flood: {}",
                    stderr(&out)
                );
                latencies.push((what.to_string(), took));
            }
        }
    });
    let flood = flood_start.elapsed();
    let refusals = refusals.into_inner().unwrap_or_else(|p| p.into_inner());
    assert_eq!(refusals.len(), FLOOD_THREADS * FLOOD_EACH);
    for (ok, msg) in &refusals {
        assert!(!ok, "a submission past the limit was accepted");
        assert!(msg.contains("max_queued_tasks"), "refusal: {msg}");
    }
    let slowest = latencies
        .iter()
        .max_by_key(|(_, d)| *d)
        .cloned()
        .expect("the operator asked at least once");
    eprintln!(
        "{} refused submissions in {} ms; {} operator calls meanwhile, slowest {} in {} ms",
        refusals.len(),
        flood.as_millis(),
        latencies.len(),
        slowest.0,
        slowest.1.as_millis()
    );
    assert!(
        slowest.1 < QUICK,
        "{} took {} ms during the flood",
        slowest.0,
        slowest.1.as_millis()
    );

    // The 20 accepted tasks are all still there, queued, nothing else.
    let v = hub.json(&["tasks", "--limit", "1000"]);
    let mut listed: Vec<u64> = v["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["id"].as_u64())
        .collect();
    listed.sort_unstable();
    accepted.sort_unstable();
    assert_eq!(listed, accepted, "exactly the accepted tasks exist");
    for t in v["tasks"].as_array().into_iter().flatten() {
        assert_eq!(t["state"], "queued", "{t}");
    }
    assert_hub_healthy(&hub);

    // Once a sidecar takes work, the queue drains and submissions work again.
    let _sc = online_sidecar(&hub, "drainer", &[]);
    let t = run_task(&hub, "after the flood", &[]);
    assert_eq!(t["state"], "completed");
    let done = wait_for(TASK_END * 2, "the 20 queued tasks completed", || {
        let v = hub.json(&["tasks", "--state", "completed", "--limit", "1000"]);
        let n = v["tasks"].as_array().map_or(0, Vec::len);
        if n > LIMIT {
            Ok(n)
        } else {
            Err(format!("{n} completed"))
        }
    });
    assert_eq!(done, LIMIT + 1, "the 20 queued tasks and the new one");
}

// === description at and past its limit ===

#[test]
fn description_at_its_limit_is_accepted_and_one_byte_more_is_refused_naming_the_limit() {
    const LIMIT: usize = 65_536;
    let hub = hub_with_limits(&[("max_description_bytes", &LIMIT.to_string())]);
    let dir = tempfile::tempdir().expect("a temporary directory");
    // Multi-byte text: the limit is in bytes, not characters.
    let at_limit = "é".repeat(LIMIT / 2);
    assert_eq!(at_limit.len(), LIMIT);
    let past = format!("{at_limit}x");
    let at_path = dir.path().join("at-limit.txt");
    let past_path = dir.path().join("past-limit.txt");
    std::fs::write(&at_path, &at_limit).expect("write the description");
    std::fs::write(&past_path, &past).expect("write the description");

    let v = hub.json(&[
        "submit",
        "--title",
        "at the limit",
        "--description-file",
        &at_path.to_string_lossy(),
    ]);
    let id = v["id"].as_u64().expect("an id");
    let t = hub.json(&["task", "show", &id.to_string()]);
    assert_eq!(
        t["description"].as_str().map(str::len),
        Some(LIMIT),
        "the description arrived whole"
    );
    assert_eq!(t["description"].as_str(), Some(at_limit.as_str()));

    let out = hub.cli(&[
        "submit",
        "--title",
        "one byte past",
        "--description-file",
        &past_path.to_string_lossy(),
        "--json",
    ]);
    assert!(
        !out.status.success(),
        "one byte past the limit was accepted"
    );
    let msg = stderr(&out);
    eprintln!("{} bytes: {}", LIMIT + 1, msg.trim());
    assert!(
        msg.contains("max_description_bytes"),
        "the refusal names the limit: {msg}"
    );
    assert!(
        msg.contains(&LIMIT.to_string()) && msg.contains(&(LIMIT + 1).to_string()),
        "the refusal gives the size and the limit: {msg}"
    );

    // Nothing lost, nothing extra: the accepted task is there, the refused one is not.
    let v = hub.json(&["tasks"]);
    let tasks = v["tasks"].as_array().cloned().unwrap_or_default();
    assert_eq!(tasks.len(), 1, "{v}");
    assert_eq!(tasks[0]["id"], id, "{v}");
    // The hub still takes a normal submission and still answers.
    let v = hub.json(&["submit", "--title", "normal", "--description", "small"]);
    assert!(v["id"].as_u64().is_some(), "{v}");
    assert_hub_healthy(&hub);
}

// === an authenticated sidecar session that sends garbage ===

/// The credential `muster-sidecar enroll` left in a sidecar's state directory.
fn sidecar_credential(sc: &Sidecar) -> Credential {
    let read = |f: &str| {
        let p = sc.data_dir().join(f);
        std::fs::read_to_string(&p).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (is the key in a keychain instead of the file?)",
                p.display()
            )
        })
    };
    Credential {
        ca_pem: read("ca.crt"),
        cert_pem: read("sidecar.crt"),
        key_pem: read("sidecar.key"),
    }
}

/// What happened on the garbage session.
#[derive(Debug)]
struct GarbageSession {
    welcome: String,
    after_garbage: String,
}

/// Opens a session as `name` with its own credential, expects a welcome, then
/// sends one length-prefixed frame of random bytes and waits (bounded) for
/// the hub to end the stream or the connection.
async fn garbage_after_hello(
    target: String,
    cred: Credential,
    name: String,
) -> Result<GarbageSession, String> {
    let (endpoint, conn) = client::connect(&target, &cred)
        .await
        .map_err(|e| format!("connect with the sidecar's credential: {e}"))?;
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let max = muster_protocol::limits::FRAME_BYTES_MAX;
    let mut wr = FramedWrite::new(send, frame_codec(max));
    let mut rd = FramedRead::new(recv, frame_codec(max));
    let open = Open {
        protocol: PROTOCOL_VERSION,
        body: OpenBody::Session(Hello {
            version: "0.0.0-garbage".into(),
            agent: AgentName::new(&name).map_err(|e| e.to_string())?,
            capabilities: vec![],
            slots: 1,
            resume: vec![],
            workspace: Default::default(),
        }),
    };
    let bytes = encode(&open).map_err(|e| e.to_string())?;
    wr.send(Bytes::from(bytes))
        .await
        .map_err(|e| format!("send hello: {e}"))?;
    let welcome = match tokio::time::timeout(Duration::from_secs(10), rd.next()).await {
        Ok(Some(Ok(frame))) => match decode::<HubMsg>(&frame) {
            Ok(HubMsg::Welcome(w)) => format!("{w:?}"),
            other => return Err(format!("no welcome after a valid hello: {other:?}")),
        },
        other => return Err(format!("no answer to a valid hello: {other:?}")),
    };
    // A frame of noise where a session message belongs.
    let _ = wr.send(Bytes::from(noise(200))).await;
    let end = async {
        let mut frames = Vec::new();
        loop {
            match rd.next().await {
                Some(Ok(f)) => frames.push(match decode::<HubMsg>(&f) {
                    Ok(m) => format!("{m:?}"),
                    Err(e) => format!("undecodable frame: {e}"),
                }),
                Some(Err(e)) => return format!("read error: {e} after {frames:?}"),
                None => return format!("stream finished after {frames:?}"),
            }
        }
    };
    let closed = tokio::select! {
        how = end => Some(how),
        e = conn.closed() => Some(format!("connection closed: {e}")),
        () = tokio::time::sleep(Duration::from_secs(5)) => None,
    };
    endpoint.close(0u32.into(), b"");
    match closed {
        Some(after_garbage) => Ok(GarbageSession {
            welcome,
            after_garbage,
        }),
        None => Err("the hub kept the session open 5 s after garbage".into()),
    }
}

#[test]
fn sidecar_session_sending_garbage_after_hello_is_closed_and_others_keep_working() {
    let hub = hub_with_limits(&[]);
    // A real sidecar that must not notice anything.
    let bystander = online_sidecar(&hub, "bystander", &["b"]);
    // Another enrolled sidecar whose credential the garbage session uses; its
    // own daemon starts afterwards and must work normally.
    let mut victim = Sidecar::enroll(&hub, "victim", &["v"]);
    victim.set_agent("settle", "\"100ms\"");
    let cred = sidecar_credential(&victim);
    let target = hub.addr().to_string();

    let result = muster_tests::block_on(garbage_after_hello(target, cred, "victim".to_string()));
    let session = result.unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "welcome: {}\nafter garbage: {}",
        session.welcome, session.after_garbage
    );
    assert_hub_healthy(&hub);
    let log = hub.log();
    assert!(
        log.lines()
            .any(|l| l.contains("closing session") && l.contains("victim")),
        "the hub logs why it ended the session:\n{}",
        muster_tests::tail(&log, 3000)
    );

    // The bystander's session is untouched and it still runs work.
    assert_eq!(hub.agent_state("bystander").as_deref(), Some("online"));
    assert!(
        !bystander.log().contains("session ended"),
        "the bystander's session was disturbed:\n{}",
        bystander.log()
    );
    let t = run_task(&hub, "for the bystander", &["--capability", "b"]);
    assert_eq!(t["agent"], "bystander", "{t}");

    // The real sidecar behind the abused credential connects and works.
    victim.start_connected(CONNECT);
    hub.wait_agent_state("victim", "online", CONNECT);
    let t = run_task(&hub, "for the victim", &["--capability", "v"]);
    assert_eq!(t["agent"], "victim", "{t}");
    assert_eq!(t["attempts"], 1, "{t}");
    assert_hub_healthy(&hub);
}

// === batch submission ===

#[test]
fn a_batch_file_is_checked_whole_before_anything_is_sent_and_each_refusal_names_its_line() {
    let hub = hub_with_limits(&[("max_queued_tasks", "3")]);
    let bad = hub.root().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"title\": \"fine\"}\n{\"titel\": \"a typo\"}\n\n{\"title\": \"t\", \"timeout\": \"soon\"}\n",
    )
    .expect("write the batch");
    let out = hub.cli(&["submit", "--batch", &bad.to_string_lossy()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "a usage error: {err}");
    assert!(err.contains("nothing was submitted"), "{err}");
    assert!(err.contains("line 2") && err.contains("titel"), "{err}");
    assert!(err.contains("line 4") && err.contains("--timeout"), "{err}");
    let v = hub.json(&["tasks"]);
    assert_eq!(v["tasks"].as_array().map(Vec::len), Some(0), "{v}");

    // Four good lines against a queue of three: three go in, the fourth is
    // refused naming the limit, and what went in is exactly what the file says.
    let good = hub.root().join("good.jsonl");
    std::fs::write(
        &good,
        concat!(
            "{\"title\": \"first\", \"priority\": 5, \"capabilities\": [\"rust\"], \"key\": \"k1\"}\n",
            "{\"title\": \"second\", \"description\": \"two\", \"timeout\": \"30m\", \"timeout_action\": \"retry\"}\n",
            "{\"title\": \"third\", \"max_attempts\": 1}\n",
            "{\"title\": \"fourth\"}\n",
        ),
    )
    .expect("write the batch");
    let out = hub.cli(&["submit", "--batch", &good.to_string_lossy(), "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON results");
    assert_eq!(
        (v["accepted"].as_u64(), v["refused"].as_u64()),
        (Some(3), Some(1)),
        "{v}"
    );
    let results = v["results"].as_array().expect("results");
    let lines: Vec<u64> = results.iter().filter_map(|r| r["line"].as_u64()).collect();
    assert_eq!(lines, [1, 2, 3, 4]);
    assert!(
        results[3]["error"]
            .as_str()
            .is_some_and(|e| e.contains("max_queued_tasks")),
        "{v}"
    );
    let first = hub.json(&["task", "show", &results[0]["id"].to_string()]);
    assert_eq!(first["title"], "first", "{first}");
    assert_eq!(first["priority"], 5, "{first}");
    assert_eq!(first["capabilities"][0], "rust", "{first}");
    let second = hub.json(&["task", "show", &results[1]["id"].to_string()]);
    assert_eq!(second["description"], "two", "{second}");
    assert_eq!(second["timeout_ms"], 1_800_000, "{second}");
    let v = hub.json(&["tasks"]);
    assert_eq!(v["tasks"].as_array().map(Vec::len), Some(3), "{v}");
}
