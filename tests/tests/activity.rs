//! Issue 16, parts 3–5, over the real binaries on 127.0.0.1: usage read from
//! both transcript formats and reported with `task usage` shows in `task
//! show`, `stats` and `/metrics`; a busy agent that prints nothing raises no
//! alert while an idle one raises `agent_idle`.
//!
//! Timing: every wait is a poll with a deadline; nothing sleeps for a fixed
//! time to let something happen.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use muster_tests::tasks::*;
use muster_tests::{Hub, Sidecar, set_toml_key, wait_for};
use serde_json::Value;

/// "Eventually" for a short task on a loaded machine.
const EVENTUALLY: Duration = Duration::from_secs(60);

/// A Claude Code `--output-format stream-json` session (the same shape as the
/// parser's unit test: init, one message in two lines, a second message, the
/// result with the session's totals and cost).
const CLAUDE: &str = r#"{"type":"system","subtype":"init","session_id":"5f2c","model":"claude-sonnet-4-5-20250929"}
{"type":"assistant","message":{"id":"msg_01","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"Let me look."}],"usage":{"input_tokens":12,"cache_creation_input_tokens":2048,"cache_read_input_tokens":0,"output_tokens":40}}}
{"type":"assistant","message":{"id":"msg_01","model":"claude-sonnet-4-5-20250929","content":[{"type":"tool_use","id":"toolu_1","name":"Bash","input":{}}],"usage":{"input_tokens":12,"cache_creation_input_tokens":2048,"cache_read_input_tokens":0,"output_tokens":40}}}
{"type":"assistant","message":{"id":"msg_02","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"Done."}],"usage":{"input_tokens":30,"cache_creation_input_tokens":100,"cache_read_input_tokens":2048,"output_tokens":25}}}
{"type":"result","subtype":"success","is_error":false,"num_turns":2,"result":"Done.","session_id":"5f2c","total_cost_usd":0.0421,"usage":{"input_tokens":42,"cache_creation_input_tokens":2148,"cache_read_input_tokens":2048,"output_tokens":65}}
"#;

/// A `codex exec --json` run of two turns.
const CODEX: &str = r#"{"type":"thread.started","thread_id":"0199a213-81c0-7800-8aa1-bbab2a035a53"}
{"type":"turn.started"}
{"type":"item.completed","item":{"id":"item_1","type":"agent_message","text":"Looked."}}
{"type":"turn.completed","usage":{"input_tokens":24763,"cached_input_tokens":24448,"output_tokens":122}}
{"type":"turn.started"}
{"type":"turn.completed","usage":{"input_tokens":1000,"cached_input_tokens":0,"output_tokens":50}}
"#;

// === helpers ===

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a TCP socket on 127.0.0.1")
}

/// `GET /metrics`: the body, or why not.
fn metrics(addr: SocketAddr) -> Result<String, String> {
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    Ok(text)
}

/// The value of the sample `line_start` (name and labels, as printed) in `body`.
fn sample(body: &str, line_start: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
}

/// An enrolled exec sidecar with `caps` whose agent is `script` (a shell body).
fn agent(hub: &Hub, name: &str, caps: &[&str], script: &str) -> Sidecar {
    let mut sc = sidecar(hub, name, caps);
    let path = agent_script(&sc, "agent.sh", script);
    use_command(&sc, &path);
    sc.set_agent("settle", "\"50ms\"");
    go_online(hub, &mut sc);
    sc
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

// === usage ===

#[test]
fn usage_from_both_transcripts_and_task_usage_shows_in_task_show_stats_and_metrics() {
    let mut hub = Hub::init();
    hub.set_policy("heartbeat_interval", "\"1s\"");
    let http: SocketAddr = ([127, 0, 0, 1], free_tcp_port()).into();
    set_toml_key(
        &hub.config_path(),
        "",
        "http_listen",
        &format!("\"{http}\""),
    );
    hub.start();

    // Claude Code and Codex transcripts, as each prints them on stdout.
    let mut claude = sidecar(&hub, "claude-host", &["claude"]);
    let claude_file = claude.root().join("claude.jsonl");
    std::fs::write(&claude_file, CLAUDE).expect("write");
    claude.set_agent("transcript", "\"claude-stream-json\"");
    let script = agent_script(
        &claude,
        "agent.sh",
        &format!("#!/bin/sh\ncat '{}'\nexit 0\n", claude_file.display()),
    );
    use_command(&claude, &script);
    go_online(&hub, &mut claude);

    let mut codex = sidecar(&hub, "codex-host", &["codex"]);
    let codex_file = codex.root().join("codex.jsonl");
    std::fs::write(&codex_file, CODEX).expect("write");
    codex.set_agent("transcript", "\"codex-json\"");
    let script = agent_script(
        &codex,
        "agent.sh",
        &format!("#!/bin/sh\ncat '{}'\nexit 0\n", codex_file.display()),
    );
    use_command(&codex, &script);
    go_online(&hub, &mut codex);

    // Any agent: `task usage`, twice (the second, cumulative, replaces the first).
    let _plain = agent(
        &hub,
        "plain-host",
        &["plain"],
        &format!(
            "#!/bin/sh\n{bin} task usage --input-tokens 10 --output-tokens 2 || exit 3\n\
             {bin} task usage --input-tokens 100 --output-tokens 20 --cache-read-tokens 5 --cost-usd 0.5 --model test-model || exit 4\n\
             exit 0\n",
            bin = sidecar_bin()
        ),
    );

    let ids: Vec<(u64, &str)> = [
        ("claude", "claude-host"),
        ("codex", "codex-host"),
        ("plain", "plain-host"),
    ]
    .iter()
    .map(|(cap, host)| {
        let id = submit(&hub, cap, &["--capability", cap, "--label", "team=web"]);
        (id, *host)
    })
    .collect();
    let mut shown = Vec::new();
    for (id, host) in &ids {
        // The usage report goes before the end, so a completed task has it.
        let t = wait_state(&hub, *id, &["completed", "failed"], EVENTUALLY);
        assert_eq!(t["state"], "completed", "{t}");
        assert_eq!(t["agent"], *host);
        shown.push(t);
    }
    let (claude_t, codex_t, plain_t) = (&shown[0], &shown[1], &shown[2]);

    let u = &claude_t["usage"];
    assert_eq!(
        (n(&u["input_tokens"]), n(&u["output_tokens"])),
        (42, 65),
        "{claude_t}"
    );
    assert_eq!(
        (n(&u["cache_read_tokens"]), n(&u["cache_write_tokens"])),
        (2048, 2148)
    );
    assert_eq!(n(&u["cost_micro_usd"]), 42_100);
    assert_eq!(u["model"], "claude-sonnet-4-5-20250929");
    assert_eq!(
        attempts(claude_t)[0]["usage"],
        *u,
        "the attempt's usage is the task's"
    );

    let u = &codex_t["usage"];
    assert_eq!(
        (
            n(&u["input_tokens"]),
            n(&u["cache_read_tokens"]),
            n(&u["output_tokens"])
        ),
        (24763 - 24448 + 1000, 24448, 172),
        "{codex_t}"
    );
    assert!(u["cost_micro_usd"].is_null(), "codex prints no cost: {u}");

    let u = &plain_t["usage"];
    assert_eq!(
        (
            n(&u["input_tokens"]),
            n(&u["output_tokens"]),
            n(&u["cache_read_tokens"])
        ),
        (100, 20, 5),
        "{plain_t}"
    );
    assert_eq!(n(&u["cost_micro_usd"]), 500_000);
    assert_eq!(u["model"], "test-model");

    // The human `task show` says it too.
    let out = hub.cli(&["task", "show", &ids[0].0.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("usage 42 in, 65 out, 2048 cache read, 2148 cache write, $0.0421"),
        "{text}"
    );

    // stats: per agent and per label.
    let s = hub.json(&["stats"]);
    let by_agent = &s["usage"]["by_agent"];
    assert_eq!(n(&by_agent["claude-host"]["output_tokens"]), 65, "{s}");
    assert_eq!(n(&by_agent["codex-host"]["cache_read_tokens"]), 24448);
    assert_eq!(n(&by_agent["plain-host"]["input_tokens"]), 100);
    let web = &s["usage"]["by_label"]["team=web"];
    assert_eq!(n(&web["input_tokens"]), 42 + 1315 + 100, "{s}");
    assert_eq!(n(&web["cost_micro_usd"]), 42_100 + 500_000);
    assert_eq!(n(&s["usage"]["total"]["output_tokens"]), 65 + 172 + 20);

    // /metrics: counters per agent and per label.
    let body = wait_for(EVENTUALLY, "/metrics to answer", || metrics(http));
    let want = [
        (
            "muster_usage_tokens_total{agent=\"claude-host\",kind=\"input\"}",
            42.0,
        ),
        (
            "muster_usage_tokens_total{agent=\"codex-host\",kind=\"cache_read\"}",
            24448.0,
        ),
        (
            "muster_usage_cost_micro_usd_total{agent=\"plain-host\"}",
            500_000.0,
        ),
        (
            "muster_label_usage_tokens_total{label=\"team=web\",kind=\"output\"}",
            257.0,
        ),
        (
            "muster_label_usage_cost_micro_usd_total{label=\"team=web\"}",
            542_100.0,
        ),
    ];
    for (line, value) in want {
        assert_eq!(sample(&body, line), Some(value), "{line} in\n{body}");
    }
}

// === busy and idle ===

#[test]
fn a_busy_silent_agent_raises_nothing_while_an_idle_one_raises_agent_idle() {
    let mut hub = Hub::init();
    let (hb, window) = (1_000u64, 3_000u64);
    hub.set_policy("heartbeat_interval", "\"1s\"");
    hub.set_policy("idle_alert", "\"3s\"");
    hub.set_policy("stall_alert", "\"3s\"");
    hub.start();
    // One host, two slots: the task named "busy" spins on a CPU, the other waits.
    let mut sc = sidecar(&hub, "worker", &[]);
    sc.set_slots(&hub, 2);
    sc.set_agent("settle", "\"50ms\"");
    let script = agent_script(
        &sc,
        "agent.sh",
        "#!/bin/sh\nif grep -q spin \"$MUSTER_PROMPT_FILE\"; then\n  while :; do :; done\nfi\nexec sleep 600\n",
    );
    use_command(&sc, &script);
    go_online(&hub, &mut sc);

    let busy = submit(&hub, "spin", &[]);
    let idle = submit(&hub, "wait", &[]);
    let started = |id: u64| -> u64 {
        let t = wait_state(&hub, id, &["running"], EVENTUALLY);
        n(&attempts(&t)[0]["started_at"])
    };
    let (busy_at, idle_at) = (started(busy), started(idle));
    let (busy_subject, idle_subject) = (busy.to_string(), idle.to_string());

    // The idle one: `agent_idle` within the window plus one heartbeat (and the
    // alert pass's second), counted from its start by the hub's own clock.
    let alert = wait_for(EVENTUALLY, "agent_idle for the waiting task", || {
        let v = hub.json(&["alerts"]);
        v["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["alert"] == "agent_idle" && a["subject"] == idle_subject.as_str())
            .cloned()
            .ok_or_else(|| v.to_string())
    });
    let after = n(&alert["since"]) - idle_at;
    assert!(
        after <= window + hb + 1_000,
        "agent_idle came {after} ms after the start; the window is {window} ms, a heartbeat {hb} ms"
    );
    let t = show(&hub, idle);
    assert!(
        ["idle", "stalled"].contains(&t["activity"]["class"].as_str().unwrap_or_default()),
        "{t}"
    );

    // The busy one: over three stall windows, no alert of any kind, and it
    // shows as busy and silent.
    let quiet_until = Instant::now() + Duration::from_millis(3 * window + hb);
    let mut checks = 0;
    while Instant::now() < quiet_until {
        let v = hub.json(&["alerts"]);
        let about_busy: Vec<&Value> = v["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["subject"] == busy_subject.as_str())
            .collect();
        assert!(about_busy.is_empty(), "the busy task raised {about_busy:?}");
        checks += 1;
    }
    assert!(checks > 1);
    let t = show(&hub, busy);
    assert_eq!(t["activity"]["class"], "busy_silent", "{t}");
    assert!(
        n(&t["activity"]["cpu_last_minute_ms"]) > 0,
        "a spinning agent uses CPU: {t}"
    );
    assert!(
        n(&attempts(&show(&hub, busy))[0]["started_at"]) == busy_at,
        "still the first attempt"
    );
    let text =
        String::from_utf8_lossy(&hub.cli(&["task", "show", &busy.to_string()]).stdout).to_string();
    assert!(text.contains("activity busy_silent"), "{text}");
    assert!(text.contains("in the last minute"), "{text}");

    for id in [busy, idle] {
        let _ = hub.cli(&["task", "cancel", &id.to_string()]);
    }
    for id in [busy, idle] {
        wait_state(&hub, id, &["cancelled"], EVENTUALLY);
    }
}
