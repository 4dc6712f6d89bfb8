//! Identities, grants, bounded text, hub files and hostile numbers (items 1, 3, 4, 8, 9, 10).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use muster_tests::tasks::{ONLINE, agent_script, argv, go_online, submit, wait_state};
use muster_tests::{Hub, Sidecar, bins, stderr, stdout, wait_for};

/// How long a short task may take from submission to its end.
const TASK_END: Duration = Duration::from_secs(30);

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Item 1: a second host enrolling under a held name is refused, naming the holder;
/// a token made for that name replaces the host, revoking the old identity at once.
#[test]
fn a_held_name_cannot_be_taken_and_a_named_token_replaces_the_host() {
    let hub = Hub::started();
    let mut real = Sidecar::enroll(&hub, "build-01", &[]);
    go_online(&hub, &mut real);

    let impostor = Sidecar::new("build-01");
    let out = impostor.enroll_with(&hub.token("agent"), &[]);
    assert!(!out.status.success(), "a second build-01 was enrolled");
    let err = stderr(&out);
    assert!(
        err.contains("held by another identity") && err.contains("token create --name build-01"),
        "{err}"
    );
    assert!(!impostor.data_dir().join("sidecar.crt").exists());
    // The real agent is untouched and still does work.
    let id = submit(&hub, "still mine", &[]);
    let t = wait_state(&hub, id, &["completed"], TASK_END);
    assert_eq!(t["agent"], "build-01");

    // Replacing the host takes a token made for its name.
    let out = hub.cli(&["token", "create", "--name", "build-01"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let named = stdout(&out).trim().to_string();
    let wrong = Sidecar::new("build-02");
    let out = wrong.enroll_with(&named, &[]);
    assert!(
        !out.status.success(),
        "a token for build-01 enrolled build-02"
    );
    assert!(
        stderr(&out).contains("for the name build-01"),
        "{}",
        stderr(&out)
    );
    let mut replacement = Sidecar::new("build-01");
    let out = replacement.enroll_with(&named, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    replacement.set("", "disk_floor_mb", "1");
    replacement.set_agent("command", &argv(&["/bin/true"]));
    // The old host's session is cut and its credential refused.
    wait_for(ONLINE, "the old build-01 refused", || {
        let log = real.log();
        if log.contains("revoked") {
            Ok(())
        } else {
            Err(muster_tests::tail(&log, 2000).to_string())
        }
    });
    go_online(&hub, &mut replacement);
    let id = submit(&hub, "for the new host", &[]);
    wait_state(&hub, id, &["completed"], TASK_END);
    let ids = hub.json(&["agent", "show", "build-01"]);
    assert_eq!(ids["state"], "online", "{ids}");
}

/// Item 1: `admin` is reserved, and `agent revoke admin` cannot touch the hub's admin.
#[test]
fn nobody_enrolls_as_admin_and_agent_revoke_cannot_reach_an_operator() {
    let hub = Hub::started();
    let evil = Sidecar::new("admin");
    let out = evil.enroll_with(&hub.token("agent"), &[]);
    assert!(!out.status.success(), "an agent enrolled as admin");
    assert!(stderr(&out).contains("reserved"), "{}", stderr(&out));
    let out = hub.cli(&["agent", "revoke", "admin"]);
    assert!(!out.status.success(), "agent revoke admin succeeded");
    // The admin credential still works, and the last admin cannot be revoked at all.
    let out = hub.cli(&["identity", "revoke", "admin", "--role", "admin"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("last admin"), "{}", stderr(&out));
    hub.json(&["agents"]);
}

/// Item 1: a name with a control character, a slash or a newline never reaches the
/// registry, whatever a hand-made enrollment frame says.
#[test]
fn a_hand_made_enrollment_with_a_bad_name_is_refused() {
    use futures::{SinkExt, StreamExt};
    use muster_protocol::msg::{EnrollRefusal, EnrollResponse, Role};
    #[derive(serde::Serialize)]
    struct RawEnroll {
        protocol: u32,
        secret: String,
        role: Role,
        name: String,
        csr_pem: String,
        capabilities: Vec<String>,
        slots: u32,
    }
    let hub = Hub::started();
    let token: muster_protocol::client::JoinToken = hub.token("agent").parse().expect("a token");
    let addr = hub.addr();
    let fp = hub.ca_fingerprint();
    for bad in ["a/b", "line\nbreak", "esc\u{1b}[2J", ""] {
        let req = RawEnroll {
            protocol: muster_protocol::PROTOCOL_VERSION,
            secret: token.secret.clone(),
            role: Role::Agent,
            name: bad.into(),
            csr_pem: String::new(),
            capabilities: Vec::new(),
            slots: 1,
        };
        let answer = muster_tests::block_on(async {
            let mut endpoint =
                quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).expect("endpoint");
            endpoint.set_default_client_config(
                muster_protocol::tls::enroll_client_config(&fp).expect("config"),
            );
            let conn = endpoint
                .connect(addr, muster_protocol::HUB_SERVER_NAME)
                .expect("connect")
                .await
                .expect("handshake");
            let (send, recv) = conn.open_bi().await.expect("stream");
            let codec = || muster_protocol::frame_codec(64 * 1024);
            let mut wr = tokio_util::codec::FramedWrite::new(send, codec());
            let mut rd = tokio_util::codec::FramedRead::new(recv, codec());
            wr.send(bytes::Bytes::from(
                muster_protocol::encode(&req).expect("encode"),
            ))
            .await
            .expect("send");
            let frame = tokio::time::timeout(Duration::from_secs(10), rd.next())
                .await
                .expect("an answer in time")
                .expect("a frame")
                .expect("a readable frame");
            endpoint.close(0u32.into(), b"");
            muster_protocol::decode::<EnrollResponse>(&frame).expect("an enroll answer")
        });
        assert!(
            matches!(
                answer,
                EnrollResponse::Refused(EnrollRefusal::BadRequest { .. })
            ),
            "name {bad:?}: {answer:?}"
        );
    }
    // The token was not spent on any of them.
    let _ = token;
    let honest = Sidecar::new("honest");
    let out = honest.enroll_with(
        &format!("muster1/{}/{}/{}", token.hub, fp, token.secret),
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Item 3: capabilities and slots are granted, not claimed: a sidecar whose
/// sidecar.toml claims more than its grant is refused, and `agent set` widens it.
#[test]
fn a_sidecar_claiming_more_than_its_grant_is_refused() {
    let hub = Hub::started();
    let out = hub.cli(&["token", "create", "--capability", "rust", "--slots", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out).trim().to_string();
    // Asking beyond the token at enrollment is refused and spends nothing.
    let greedy = Sidecar::new("greedy");
    let out = greedy.enroll_with(&token, &["rust", "gpu"]);
    assert!(
        !out.status.success(),
        "enrolled with an ungranted capability"
    );
    assert!(stderr(&out).contains("not granted"), "{}", stderr(&out));
    let out = greedy.enroll_with(&token, &["rust"]);
    assert!(out.status.success(), "{}", stderr(&out));
    greedy.set("", "disk_floor_mb", "1");
    greedy.set_agent("command", &argv(&["/bin/true"]));
    // Now it claims every capability and many slots in its config.
    greedy.set("", "capabilities", "[\"rust\", \"gpu\"]");
    greedy.set("", "slots", "200");
    let mut greedy = greedy;
    greedy.start();
    wait_for(ONLINE, "the greedy hello refused", || {
        let log = greedy.log();
        if log.contains("not granted") {
            Ok(())
        } else {
            Err(muster_tests::tail(&log, 2000).to_string())
        }
    });
    let a = hub.agent("greedy");
    assert!(
        a.as_ref().is_none_or(|a| a["state"] != "online"),
        "the greedy sidecar is online: {a:?}"
    );
    // A gpu task stays queued: nobody holds that capability.
    let gpu = submit(&hub, "needs a gpu", &["--capability", "gpu"]);
    greedy.stop();
    greedy.set("", "capabilities", "[\"rust\"]");
    greedy.set("", "slots", "2");
    go_online(&hub, &mut greedy);
    let v = hub.agent("greedy").expect("listed");
    assert_eq!(v["slots"], 2, "{v}");
    assert_eq!(v["capabilities"], serde_json::json!(["rust"]), "{v}");
    let t = hub.json(&["task", "show", &gpu.to_string()]);
    assert_eq!(t["state"], "queued", "{t}");
    // An operator grants gpu; after a restart of the sidecar with it, the task runs.
    let out = hub.cli(&[
        "agent",
        "set",
        "greedy",
        "--capability",
        "rust",
        "--capability",
        "gpu",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    greedy.stop();
    greedy.set("", "capabilities", "[\"rust\", \"gpu\"]");
    go_online(&hub, &mut greedy);
    wait_state(&hub, gpu, &["completed"], TASK_END);
}

/// Item 4: text at its legal limits cannot make a listing fail: 17 tasks with
/// 64 KiB descriptions list (in pages), and huge failure reasons leave `alerts` working.
#[test]
fn listings_fit_one_answer_whatever_the_text() {
    let hub = Hub::started();
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big.txt");
    std::fs::write(&big, "d".repeat(64 * 1024)).expect("write");
    let big = big.to_string_lossy().into_owned();
    for i in 0..17 {
        submit(
            &hub,
            &format!("big {i}"),
            &["--description-file", &big, "--capability", "none"],
        );
    }
    let mut seen = 0;
    let mut cursor: Option<u64> = None;
    let mut pages = 0;
    loop {
        let mut args = vec!["tasks".to_string(), "--limit".into(), "1000".into()];
        if let Some(c) = cursor {
            args.extend(["--cursor".into(), c.to_string()]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let v = hub.json(&refs);
        seen += v["tasks"].as_array().map_or(0, Vec::len);
        pages += 1;
        match v["next_cursor"].as_u64() {
            Some(c) => cursor = Some(c),
            None => break,
        }
        assert!(pages < 10, "the pages never end: {v}");
    }
    assert_eq!(seen, 17, "every task is listed across {pages} pages");
    assert!(
        pages >= 2,
        "17 × 64 KiB cannot fit one frame, yet one page came back"
    );

    // Failure reasons of 120 KB each, from the agent's own `task fail`.
    let mut sc = Sidecar::enroll(&hub, "loud", &["loud"]);
    let body = format!(
        "#!/bin/sh\nr=$(head -c 120000 /dev/zero | tr '\\0' r)\nexec '{}' task fail --no-retry --reason \"$r\"\n",
        bins().sidecar.display()
    );
    let path = agent_script(&sc, "loud.sh", &body);
    sc.set_agent("command", &argv(&[&path.to_string_lossy()]));
    go_online(&hub, &mut sc);
    let ids: Vec<u64> = (0..10)
        .map(|i| submit(&hub, &format!("loud {i}"), &["--capability", "loud"]))
        .collect();
    for id in &ids {
        let t = wait_state(&hub, *id, &["failed"], TASK_END);
        let reason = t["attempt_history"][0]["error"]["reason"]
            .as_str()
            .unwrap_or_default();
        assert!(
            reason.len() <= muster_protocol::limits::REASON_BYTES_MAX,
            "a {} byte reason was kept",
            reason.len()
        );
    }
    let v = hub.json(&["alerts"]);
    let failed = v["alerts"].as_array().map_or(0, |a| {
        a.iter().filter(|x| x["alert"] == "task_failed").count()
    });
    assert_eq!(failed, 10, "{v}");
    let out = hub.cli(&["alerts"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Item 8: `init` leaves the data directory 0750 and secrets and the database 0600;
/// the hub refuses a key that group or others can read, naming the chmod.
#[test]
fn hub_files_are_private_and_an_exposed_key_is_refused() {
    let mut hub = Hub::init();
    let d = hub.data_dir().to_path_buf();
    assert_eq!(mode(&d), 0o750, "data directory");
    for f in ["hub.redb", "ca.key", "server.key", "admin.key"] {
        assert_eq!(mode(&d.join(f)), 0o600, "{f}");
    }
    for key in ["ca.key", "server.key"] {
        let path = d.join(key);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let out = hub.serve_output(Duration::from_secs(20));
        assert!(!out.status.success(), "the hub started with {key} mode 644");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("chmod 600 {}", path.display())),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    hub.start();
    let admin = d.join("admin.key");
    std::fs::set_permissions(&admin, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let out = hub.cli(&["agents"]);
    assert!(
        !out.status.success(),
        "the CLI used a group-readable admin key"
    );
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    std::fs::set_permissions(&admin, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    hub.json(&["agents"]);
}

/// Item 9: a timeout that would wrap `start + timeout` is refused at admission
/// instead of failing the task at once (or panicking the hub).
#[test]
fn a_timeout_beyond_the_maximum_is_refused_and_the_hub_keeps_serving() {
    let hub = Hub::started();
    for t in ["18446744073709551615ms", "100000d"] {
        let out = hub.cli(&["submit", "--title", "wrap", "--timeout", t]);
        assert!(!out.status.success(), "--timeout {t} was accepted");
        assert!(stderr(&out).contains("timeout"), "{}", stderr(&out));
    }
    let v = hub.json(&["tasks"]);
    assert_eq!(v["tasks"].as_array().map(Vec::len), Some(0), "{v}");
    let id = submit(
        &hub,
        "a sane timeout",
        &["--timeout", "30d", "--capability", "none"],
    );
    let t = hub.json(&["task", "show", &id.to_string()]);
    assert_eq!(t["state"], "queued", "{t}");
}

/// Item 10: escape sequences in agent text are shown escaped in human output.
#[test]
fn terminal_escapes_from_agents_are_shown_escaped() {
    let hub = Hub::started();
    let mut sc = Sidecar::enroll(&hub, "painter", &[]);
    let body = format!(
        "#!/bin/sh\nexec '{}' task fail --no-retry --reason \"$(printf 'boom\\033]0;pwned\\007\\033[2J')\"\n",
        bins().sidecar.display()
    );
    let path = agent_script(&sc, "paint.sh", &body);
    sc.set_agent("command", &argv(&[&path.to_string_lossy()]));
    go_online(&hub, &mut sc);
    let id = submit(&hub, "paint", &[]);
    let t = wait_state(&hub, id, &["failed"], TASK_END);
    // The hub keeps the text as the agent sent it (JSON shows it as is)…
    assert!(t.to_string().contains("\\u001b]0;pwned"), "{t}");
    // …and human output never sends the escape byte to the terminal.
    for args in [
        vec!["task", "show", &*id.to_string()],
        vec!["alerts"],
        vec!["tasks"],
    ] {
        let out = hub.cli(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{args:?}: {text:?}"
        );
    }
    let show = stdout(&hub.cli(&["task", "show", &id.to_string()]));
    assert!(show.contains("\\u{1b}]0;pwned"), "{show}");
}
