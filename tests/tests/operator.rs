//! The operator's path through the real `muster-hub` binary (issue 18): why a
//! queued task waits and the `unschedulable` alert, `task wait` exit codes by
//! outcome and for an unreachable hub, and `watch` resuming across a hub
//! restart from its last sequence number.
//!
//! Every wait polls with a deadline; child processes are killed on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use muster_tests::{Hub, stderr, wait_for};
use serde_json::Value;

/// Generous for a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// A child process killed and reaped when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn submit(hub: &Hub, args: &[&str]) -> u64 {
    let mut all = vec!["submit"];
    all.extend_from_slice(args);
    hub.json(&all)["id"].as_u64().expect("a task id")
}

#[test]
fn a_task_nobody_can_run_says_why_raises_unschedulable_and_task_wait_exits_by_outcome() {
    let hub = Hub::started();
    let id = submit(&hub, &["--title", "train", "--capability", "gpu"]);

    // Why it waits, in `task show` and in `tasks`.
    let t = hub.json(&["task", "show", &id.to_string()]);
    assert_eq!(t["waiting"], "no agent is enrolled", "{t}");
    let list = hub.json(&["tasks"]);
    assert_eq!(
        list["tasks"][0]["waiting"], "no agent is enrolled",
        "{list}"
    );
    let human = hub.cli(&["tasks"]);
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("no agent is enrolled"),
        "the tasks table shows the reason: {}",
        String::from_utf8_lossy(&human.stdout)
    );

    // The alert, raised within the alert pass after the submission.
    let alert = wait_for(DEADLINE, "an unschedulable alert", || {
        let v = hub.json(&["alerts"]);
        v["alerts"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|x| {
                        x["alert"] == "unschedulable"
                            && x["subject"].as_str() == Some(id.to_string().as_str())
                    })
                    .cloned()
            })
            .ok_or(format!("{v}"))
    });
    assert!(
        alert["message"]
            .as_str()
            .unwrap_or("")
            .contains("cannot run"),
        "{alert}"
    );

    // `task wait` follows the task until it ends; cancelled is exit 3.
    let mut wait = Reaped(
        hub.command(&["task", "wait", &id.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn task wait"),
    );
    // It has opened its stream and read the task once it prints the state.
    let err = wait.0.stderr.take().expect("stderr is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(DEADLINE)
        .expect("task wait says where the task is");
    assert!(first.contains("queued"), "{first}");
    let out = hub.cli(&["task", "cancel", &id.to_string()]);
    assert!(out.status.success(), "cancel: {}", stderr(&out));
    let started = Instant::now();
    let status = loop {
        if let Some(s) = wait.0.try_wait().expect("poll task wait") {
            break s;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "task wait did not end after the cancel"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(3), "cancelled is exit 3");
    let said: Vec<String> = rx.try_iter().collect();
    assert!(
        said.iter().any(|l| l.contains("cancelled")),
        "it printed the change as it came: {said:?}"
    );

    // The task left the queue: its alert clears.
    wait_for(DEADLINE, "the unschedulable alert cleared", || {
        let v = hub.json(&["alerts"]);
        let open = v["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["alert"] == "unschedulable"));
        if open { Err(format!("{v}")) } else { Ok(()) }
    });
}

#[test]
fn task_wait_on_an_unreachable_hub_exits_69() {
    let mut hub = Hub::started();
    let id = submit(&hub, &["--title", "t"]);
    hub.stop();
    let out = hub.cli(&["task", "wait", &id.to_string()]);
    assert_eq!(
        out.status.code(),
        Some(69),
        "an unreachable hub is exit 69, not a failed task: {}",
        stderr(&out)
    );
}

#[test]
fn watch_resumes_across_a_hub_restart_from_its_last_sequence_number() {
    let mut hub = Hub::started();
    let mut watch = Reaped(
        hub.command(&["watch", "--json", "--from", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn watch"),
    );
    let out = watch.0.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let Ok(v) = serde_json::from_str(&line) else {
                continue;
            };
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    let title_seen = |rx: &mpsc::Receiver<Value>, title: &str, seen: &mut Vec<Value>| {
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Ok(v) = rx.recv_timeout(Duration::from_millis(200)) {
                let hit = v["kind"] == "task" && v["title"] == title;
                seen.push(v);
                if hit {
                    return;
                }
            }
        }
        panic!("watch never showed task {title:?}; it printed {seen:?}");
    };
    let mut seen = Vec::new();
    submit(&hub, &["--title", "before"]);
    title_seen(&rx, "before", &mut seen);
    hub.restart();
    submit(&hub, &["--title", "after"]);
    title_seen(&rx, "after", &mut seen);
    assert!(
        watch.0.try_wait().expect("poll watch").is_none(),
        "watch is still running after the restart"
    );
    // No event twice, none skipped: the sequence numbers count up by one.
    let seqs: Vec<u64> = seen.iter().filter_map(|v| v["seq"].as_u64()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "sequence numbers went {seqs:?}"
    );
}
