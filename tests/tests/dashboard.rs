//! Issue 17, the dashboard in a real browser: headless Debian Chromium driven
//! through chromedriver (WebDriver, `fantoccini`), against the real hub and
//! sidecar binaries on 127.0.0.1.
//!
//! Each test starts its own chromedriver on a free loopback port with a fresh
//! Chromium profile; both die with the test ([`Browser`]'s `Drop`). Conditions
//! are awaited by polling with deadlines. Every test saves a screenshot under
//! `<target>/dashboard-screenshots/`. Without `chromium` and `chromedriver`
//! the tests fail, naming `tests/run.sh`, which installs them.
//!
//! `docs_screenshots` (ignored; run with `--ignored`) renders the README's
//! pictures `docs/dashboard-fleet.png` and `docs/dashboard-task.png`.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use muster_tests::tasks::*;
use muster_tests::{Hub, Sidecar, free_tcp_port, set_toml_key, wait_for, wait_until};
use serde_json::{Value, json};
use tempfile::TempDir;

/// Where Debian installs the browser and its driver (`chromium`, `chromium-driver`).
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long chromedriver may take to listen.
const DRIVER_READY: Duration = Duration::from_secs(20);
/// How long a page may take to show what a test waits for (a loaded machine).
const PAGE: Duration = Duration::from_secs(20);
/// The promise: a task submitted elsewhere shows without a reload within 2 s.
const LIVE: Duration = Duration::from_secs(2);
/// How long a short task may take to reach a state.
const TASK: Duration = Duration::from_secs(30);

// === The browser ===

/// A headless Chromium session through a chromedriver of its own.
struct Browser {
    name: String,
    client: Option<Client>,
    driver: Child,
    rt: tokio::runtime::Runtime,
    _profile: TempDir,
}

impl Browser {
    /// Starts chromedriver and a Chromium session; `name` names its screenshots.
    fn start(name: &str) -> Browser {
        for tool in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: the dashboard tests need Debian's chromium and chromium-driver; \
                 run `bash tests/run.sh` (as root it installs them) or `apt-get install chromium chromium-driver`"
            );
        }
        let port = free_tcp_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{CHROMEDRIVER} does not start ({e}); see tests/run.sh"));
        let mut guard = KillOnDrop(Some(driver));
        wait_until(DRIVER_READY, "chromedriver listening", || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        let profile = tempfile::Builder::new()
            .prefix("muster-chromium-")
            .tempdir()
            .expect("a temporary directory");
        let caps = json!({
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1280,860",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let caps = match caps {
            Value::Object(m) => m,
            _ => unreachable!("a JSON object"),
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = rt
            .block_on(async {
                tokio::time::timeout(
                    PAGE,
                    ClientBuilder::new(connector)
                        .capabilities(caps)
                        .connect(&format!("http://127.0.0.1:{port}")),
                )
                .await
            })
            .unwrap_or_else(|_| panic!("Chromium did not start within {PAGE:?}"))
            .unwrap_or_else(|e| panic!("Chromium does not start through chromedriver: {e}"));
        Browser {
            name: name.into(),
            client: Some(client),
            driver: guard.0.take().expect("the driver"),
            rt,
            _profile: profile,
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("a live session")
    }

    /// Opens `url` and waits for it to load.
    fn goto(&self, url: &str) {
        self.rt
            .block_on(self.client().goto(url))
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// The path of the page shown now.
    fn path(&self) -> String {
        self.rt
            .block_on(self.client().current_url())
            .map(|u| u.path().to_string())
            .unwrap_or_default()
    }

    /// Runs `script` (a function body) in the page; what it returns.
    fn js(&self, script: &str) -> Value {
        self.rt
            .block_on(self.client().execute(script, vec![]))
            .unwrap_or(Value::Null)
    }

    /// Runs an asynchronous `script` whose last argument is its callback.
    fn js_async(&self, script: &str) -> Value {
        self.rt
            .block_on(self.client().execute_async(script, vec![]))
            .unwrap_or_else(|e| panic!("script failed: {e}"))
    }

    /// Polls `script` until it returns something other than null or false.
    fn wait_js(&self, timeout: Duration, what: &str, script: &str) -> Value {
        wait_for(timeout, what, || match self.js(script) {
            Value::Null | Value::Bool(false) => Err(format!("page at {}", self.path())),
            v => Ok(v),
        })
    }

    /// The visible text of the page.
    fn text(&self) -> String {
        self.js("return document.body ? document.body.innerText : '';")
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the page at `path` says `needle`.
    fn wait_text(&self, path: &str, needle: &str) {
        wait_for(PAGE, &format!("{path} saying {needle:?}"), || {
            let (p, t) = (self.path(), self.text());
            if p == path && t.contains(needle) {
                Ok(())
            } else {
                Err(format!("{p}: {}", t.chars().take(400).collect::<String>()))
            }
        });
    }

    /// Clicks the element `css` selects.
    fn click(&self, css: &str) {
        self.rt
            .block_on(async { self.client().find(Locator::Css(css)).await?.click().await })
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Signs in with a one-time login URL; waits for the fleet view.
    fn sign_in(&self, url: &str) {
        self.goto(url);
        wait_for(PAGE, "the fleet view after sign-in", || {
            let p = self.path();
            if p == "/fleet" {
                Ok(())
            } else {
                Err(format!("{p}: {}", self.text()))
            }
        });
    }

    /// Waits until the live badge says Live (the event stream is open).
    fn wait_live(&self) {
        self.wait_js(
            PAGE,
            "the Live badge",
            "const b = document.getElementById('live'); return b && b.textContent === 'Live';",
        );
    }

    /// Saves a PNG of the page as `<target>/dashboard-screenshots/<name>-<step>.png`.
    fn screenshot(&self, step: &str) -> PathBuf {
        let path = screenshot_dir().join(format!("{}-{step}.png", self.name));
        self.save_png(&path);
        path
    }

    fn save_png(&self, path: &Path) {
        let png = self
            .rt
            .block_on(self.client().screenshot())
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("the screenshot directory");
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        eprintln!("screenshot: {}", path.display());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // Ends Chromium; bounded, for a browser that hangs is killed with its driver.
            let _ = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), client.close()).await
            });
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Kills chromedriver if the session never starts.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `<target>/dashboard-screenshots`: the target directory is the one this test
/// binary was built into (`<target>/<profile>/deps/`), so `CARGO_TARGET_DIR` counts.
fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    exe.ancestors()
        .nth(3)
        .map(|t| t.join("dashboard-screenshots"))
        .expect("the test executable lives in <target>/<profile>/deps")
}

// === Fixtures ===

/// A started hub with the dashboard on, after `dashboard` edits (key, TOML value).
fn hub_with_dashboard(dashboard: &[(&str, &str)]) -> (Hub, String) {
    let mut hub = Hub::init();
    hub.set_policy("heartbeat_interval", "\"1s\"");
    let base = hub.enable_dashboard();
    for (k, v) in dashboard {
        set_toml_key(&hub.config_path(), "dashboard", k, v);
    }
    hub.start();
    (hub, base)
}

/// An online sidecar whose agent waits (at most a minute) for `go` in its
/// directory, writing its pid first; the path of `go` and of the pid file.
fn waiting_agent(hub: &Hub, name: &str, caps: &[&str]) -> (Sidecar, PathBuf, PathBuf) {
    let mut sc = sidecar(hub, name, caps);
    let dir = sc.root().to_path_buf();
    let (go, pid) = (dir.join("go"), dir.join("agent.pid"));
    let script = agent_script(
        &sc,
        "agent.sh",
        &format!(
            "#!/bin/sh\necho $$ > '{pid}'\necho \"working on $MUSTER_TASK_ID\"\ni=0\nwhile [ ! -f '{go}' ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\necho done\n",
            pid = pid.display(),
            go = go.display()
        ),
    );
    use_command(&sc, &script);
    go_online(hub, &mut sc);
    (sc, go, pid)
}

/// The JS that reads a task row's state on the tasks page (null when absent).
fn row_state(id: u64) -> String {
    format!(
        "const r = document.querySelector('tr[data-task=\"{id}\"]'); return r ? r.getAttribute('data-state') : null;"
    )
}

// === Tests ===

#[test]
fn login_shows_the_fleet_and_a_post_without_the_csrf_token_is_refused() {
    let (hub, _base) = hub_with_dashboard(&[]);
    let mut a = sidecar(&hub, "alpha", &["rust"]);
    let mut b = sidecar(&hub, "beta", &[]);
    go_online(&hub, &mut a);
    go_online(&hub, &mut b);

    let browser = Browser::start("fleet");
    browser.sign_in(&hub.login_url(None));
    for name in ["alpha", "beta"] {
        browser.wait_js(
            PAGE,
            &format!("{name} listed online"),
            &format!(
                "const r = document.querySelector('tr[data-agent=\"{name}\"]'); return r && r.textContent.includes('online');"
            ),
        );
    }
    let text = browser.text();
    assert!(text.contains("2 agents"), "{text}");
    // An admin session is offered drain.
    browser.wait_js(
        PAGE,
        "a Drain button",
        "return !!document.querySelector('button[data-post$=\"/agents/alpha/drain\"]');",
    );
    browser.wait_live();

    // The page's own fetch, without the header: refused; with it: done.
    let without = browser.js_async(
        "const done = arguments[arguments.length - 1];
         fetch('/api/v1/agents/alpha/drain', {method: 'POST', credentials: 'same-origin'})
           .then(r => done(r.status), e => done(String(e)));",
    );
    assert_eq!(without, json!(403), "a POST without X-CSRF-Token");
    assert_eq!(hub.agent("alpha").expect("alpha")["drained"], false);
    let wrong = browser.js_async(
        "const done = arguments[arguments.length - 1];
         fetch('/api/v1/agents/alpha/drain', {method: 'POST', credentials: 'same-origin',
                headers: {'X-CSRF-Token': 'not-the-token'}})
           .then(r => done(r.status), e => done(String(e)));",
    );
    assert_eq!(wrong, json!(403), "a POST with a wrong X-CSRF-Token");

    // The button carries the token: drain from the page, seen live.
    browser.click("button[data-post$=\"/agents/alpha/drain\"]");
    wait_until(PAGE, "alpha drained", || {
        (hub.agent("alpha")?["drained"] == true).then_some(())
    });
    browser.wait_js(
        PAGE,
        "the Undrain button",
        "return !!document.querySelector('button[data-post$=\"/agents/alpha/undrain\"]');",
    );
    browser.screenshot("fleet");
}

#[test]
fn a_task_submitted_from_the_cli_appears_without_a_reload_and_its_state_changes_live() {
    let (hub, _base) = hub_with_dashboard(&[]);
    let (_sc, go, _pid) = waiting_agent(&hub, "worker", &[]);

    let browser = Browser::start("live");
    browser.sign_in(&hub.login_url(Some("operator")));
    browser.goto(&format!("{}/tasks", _base));
    browser.wait_live();
    // A mark on this very document: a reload would wipe it.
    browser.js("window.__mark = 'same page'; return true;");

    let submitted = Instant::now();
    let id = submit(&hub, "appears live", &[]);
    browser.wait_js(LIVE, "the new task's row within 2 s", &row_state(id));
    eprintln!("task {id} shown {:?} after submit", submitted.elapsed());
    assert_eq!(
        browser.js("return window.__mark || null;"),
        json!("same page"),
        "the page was not reloaded"
    );

    wait_state(&hub, id, &["running"], TASK);
    browser.wait_js(
        PAGE,
        "the row says running",
        &format!("return ({})() === 'running';", fn_of(&row_state(id))),
    );
    browser.screenshot("running");
    std::fs::write(&go, b"go").expect("write the go file");
    browser.wait_js(
        TASK,
        "the row says completed",
        &format!("return ({})() === 'completed';", fn_of(&row_state(id))),
    );
    assert_eq!(
        browser.js("return window.__mark || null;"),
        json!("same page")
    );
    // The operator session was offered no action anywhere on the page.
    assert_eq!(
        browser.js("return document.querySelectorAll('button[data-post], #submit-form').length;"),
        json!(0)
    );
    browser.screenshot("completed");

    // A hidden tab closes its stream (the badge says Paused); shown again, it
    // reopens it (the headless tab is never hidden, so the change is simulated).
    browser.js(
        "Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});
         document.dispatchEvent(new Event('visibilitychange')); return true;",
    );
    browser.wait_js(
        PAGE,
        "the Paused badge",
        "return document.getElementById('live').textContent === 'Paused';",
    );
    browser.js(
        "Object.defineProperty(document, 'hidden', {configurable: true, get: () => false});
         document.dispatchEvent(new Event('visibilitychange')); return true;",
    );
    browser.wait_live();
}

/// A function body as a callable expression.
fn fn_of(body: &str) -> String {
    format!("function () {{ {body} }}")
}

#[test]
fn cancel_from_the_page_stops_the_agent() {
    let (hub, base) = hub_with_dashboard(&[]);
    let (_sc, _go, pid_file) = waiting_agent(&hub, "victim", &[]);
    let id = submit(&hub, "cancel me from the page", &[]);
    wait_state(&hub, id, &["running"], TASK);
    let pid = wait_until(PAGE, "the agent's pid file", || read_pid(&pid_file));
    assert!(pid_alive(pid), "the agent runs");

    let browser = Browser::start("cancel");
    browser.sign_in(&hub.login_url(Some("admin")));
    browser.goto(&format!("{base}/tasks/{id}"));
    browser.wait_text(&format!("/tasks/{id}"), "cancel me from the page");
    browser.wait_live();
    browser.click("button[data-post$=\"/cancel\"]");
    let clicked = Instant::now();
    wait_until(Duration::from_secs(15), "the agent process gone", || {
        (!pid_alive(pid)).then_some(())
    });
    eprintln!("agent gone {:?} after the click", clicked.elapsed());
    browser.wait_js(
        TASK,
        "the page says cancelled",
        "const s = document.getElementById('task-state'); return s && s.textContent === 'cancelled';",
    );
    let t = wait_state(&hub, id, &["cancelled"], TASK);
    let audit = t["audit"].to_string();
    assert!(audit.contains("cancel"), "{t}");
    browser.screenshot("cancelled");
}

#[test]
fn no_session_redirects_to_the_explanation_a_used_login_url_is_refused_and_operators_get_no_actions()
 {
    let (hub, base) = hub_with_dashboard(&[]);
    let browser = Browser::start("login");

    for page in ["/fleet", "/tasks", "/tasks/1", "/alerts"] {
        browser.goto(&format!("{base}{page}"));
        browser.wait_text("/login", "muster-hub dashboard");
    }
    browser.screenshot("no-session");

    let url = hub.login_url(Some("operator"));
    browser.sign_in(&url);
    let text = browser.text();
    assert!(text.contains("operator"), "{text}");
    assert_eq!(
        browser.js("return document.querySelectorAll('button[data-post]').length;"),
        json!(0),
        "an operator session is offered no actions"
    );
    // The same link a second time: refused, though its script posts it again.
    browser.goto(&url);
    browser.wait_text("/login", "already used");
    browser.screenshot("reused");

    // A session cookie still works; signing out ends it.
    browser.goto(&format!("{base}/tasks"));
    browser.wait_text("/tasks", "No tasks match");
    browser.click("form.logout button");
    wait_for(PAGE, "the sign-in page after signing out", || {
        let p = browser.path();
        if p == "/login" { Ok(()) } else { Err(p) }
    });
    browser.goto(&format!("{base}/fleet"));
    browser.wait_text("/login", "muster-hub dashboard");
}

#[test]
fn an_expired_login_url_is_refused() {
    let (hub, _base) = hub_with_dashboard(&[("login_ttl", "\"1s\"")]);
    let browser = Browser::start("expired");
    let url = hub.login_url(None);
    // The passage of time is what is tested here: the link's whole lifetime.
    std::thread::sleep(Duration::from_millis(1500));
    browser.goto(&url);
    browser.wait_text("/login", "expired");
    browser.screenshot("expired");
}

/// Renders the README's pictures into `docs/` (run on purpose with
/// `cargo test -p muster-tests --test dashboard -- --ignored docs_screenshots`).
#[test]
#[ignore = "writes docs/dashboard-*.png; run on purpose"]
fn docs_screenshots() {
    let (hub, base) = hub_with_dashboard(&[]);
    let mut fleet = Vec::new();
    for (name, caps) in [
        ("build-01", &["rust", "linux"][..]),
        ("build-02", &["rust", "linux"][..]),
        ("gpu-01", &["cuda"][..]),
    ] {
        fleet.push(waiting_agent(&hub, name, caps));
    }
    let titles = [
        ("Fix the flaky retry test in the scheduler", "team=core"),
        ("Bump tokio and fix the deprecations", "team=infra"),
        ("Write API.md examples for /api/v1/tasks", "team=docs"),
    ];
    let ids: Vec<u64> = titles
        .iter()
        .map(|(title, label)| submit(&hub, title, &["--label", label]))
        .collect();
    for id in &ids {
        wait_state(&hub, *id, &["running"], TASK);
    }
    // The first agent finishes its task; the others keep working.
    let first_agent = show(&hub, ids[0])["agent"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let first_go = fleet
        .iter()
        .find(|(sc, _, _)| sc.name() == first_agent)
        .map(|(_, go, _)| go.clone())
        .expect("the first task's agent");
    std::fs::write(&first_go, b"go").expect("go");
    wait_state(&hub, ids[0], &["completed"], TASK);
    let spare = fleet
        .iter()
        .map(|(sc, _, _)| sc.name().to_string())
        .find(|n| *n != first_agent)
        .expect("another agent");
    assert!(hub.cli(&["agent", "drain", &spare]).status.success());
    submit(
        &hub,
        "Port the demo to --keep",
        &[
            "--label",
            "team=core",
            "--capability",
            "cuda",
            "--priority",
            "5",
        ],
    );

    let browser = Browser::start("docs");
    browser.sign_in(&hub.login_url(None));
    browser.wait_live();
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    browser.save_png(&docs.join("dashboard-fleet.png"));
    browser.goto(&format!("{base}/tasks/{}", ids[0]));
    browser.wait_live();
    browser.save_png(&docs.join("dashboard-task.png"));
}
