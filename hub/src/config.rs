//! `hub.toml`: the hub's configuration, parsed once and all at once.
//!
//! Every key is optional and declared once, with its default and doc line,
//! through [`muster_config::config!`]: here the top-level keys, in the core
//! (`muster_hub_core::policy`) the `[policy]` and `[limits]` sections. Unknown
//! keys are errors, so a typo never passes silently, and every problem in the
//! file is reported in one [`ConfigError::Invalid`], each at its line and
//! column. [`HubConfig::render`] writes the whole file back, every key with a
//! comment; `init` uses it, and `parse(render(c)) == c`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use muster_config::{Argv, HostPortOrEmpty};

use crate::store::{PgOptions, StoreKind};

pub use muster_config::{ConfigError, Problem};
pub use muster_hub_core::policy::{Limits, Policy};

/// The file name under the configuration directory.
pub const CONFIG_FILE: &str = "hub.toml";

muster_config::config! {
    /// The whole hub configuration (`hub.toml`).
    #[derive(Debug, Clone, PartialEq)]
    pub struct HubConfig {
        /// QUIC (UDP) address for sidecars, operators and enrollment.
        listen: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 7440)),
        /// host:port written into join tokens; "" = the listen address if specific, else host name and port.
        advertise: String as HostPortOrEmpty = String::new(),
        /// HTTP address for /metrics and /healthz, e.g. "127.0.0.1:7441"; "" = off.
        http_listen: Option<SocketAddr> = None,
        /// State directory: CA, certificates and database.
        data_dir: PathBuf = PathBuf::from("/var/lib/muster-hub"),
        /// argv run for each alert, with the alert as JSON on stdin; [] = none.
        alert_command: Vec<String> as Argv = Vec::new(),
        sections {
            /// Timeouts, retries, the circuit breaker and retention.
            policy: Policy,
            /// Bounds on queues and inputs.
            limits: Limits,
            /// The web dashboard and the HTTP JSON API (/api/v1).
            dashboard: Dashboard,
            /// Where the hub keeps its state: a redb file (one hub) or PostgreSQL (several hubs, one leader).
            store: StoreConfig,
        }
    }
}

/// How the dashboard listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DashboardTls {
    /// Plain HTTP: loopback addresses only.
    Off,
    /// HTTPS with the hub's own certificate (issued by its CA for the `init --san` names).
    Hub,
    /// HTTPS with the PEM `cert` and `key` files given.
    Files,
}
muster_config::words!(DashboardTls {
    DashboardTls::Off => "off",
    DashboardTls::Hub => "hub",
    DashboardTls::Files => "files",
});

muster_config::config! {
    /// The web dashboard and HTTP JSON API (`[dashboard]` in hub.toml).
    #[derive(Debug, Clone, PartialEq)]
    pub struct Dashboard {
        /// Address of the dashboard and /api/v1, e.g. "127.0.0.1:7442"; "" = off. Beyond loopback, tls must be "hub" or "files".
        listen: Option<SocketAddr> = None,
        /// "off" (plain HTTP, loopback only), "hub" (HTTPS with the hub's certificate for its --san names) or "files" (HTTPS with cert and key).
        tls: DashboardTls = DashboardTls::Off,
        /// PEM certificate chain, for tls = "files".
        cert: Option<PathBuf> = None,
        /// PEM private key of cert, for tls = "files" (keep it 0600).
        key: Option<PathBuf> = None,
        /// The URL browsers open the dashboard at, for login links; "" = from listen (and the advertise host when listening on all addresses).
        url: String = String::new(),
        /// How long a login URL from `muster-hub dashboard` stays usable (once).
        login_ttl: Duration = Duration::from_secs(5 * 60),
        /// How long a browser session lasts after its login.
        session_ttl: Duration = Duration::from_secs(12 * 3600),
    }
    check = check_dashboard;
}

muster_config::words!(StoreKind {
    StoreKind::Redb => "redb",
    StoreKind::Postgres => "postgres",
});

/// The systemd credential the PostgreSQL password is read from when
/// `password_file` is not set (`LoadCredential=pg-password:/path` in the unit).
pub const PG_PASSWORD_CREDENTIAL: &str = "pg-password";

/// The longest password file read, so a wrong path cannot fill the memory.
const PASSWORD_BYTES_MAX: u64 = 4096;

muster_config::config! {
    /// Where the hub keeps its state (`[store]` in hub.toml).
    #[derive(Debug, Clone, PartialEq)]
    pub struct StoreConfig {
        /// "redb" (hub.redb in data_dir; one hub) or "postgres" (a PostgreSQL database several hubs share).
        kind: StoreKind = StoreKind::Redb,
        /// For kind = "postgres": postgres://user@host:port/dbname, without a password (see password_file).
        url: String = String::new(),
        /// For kind = "postgres": a file holding the password (mode 0600, owned by the hub's user); "" = the systemd credential pg-password if set, else no password.
        password_file: Option<PathBuf> = None,
        /// For kind = "postgres": how long the leader's lease lasts unrenewed before another hub may take over (1s to 60s).
        lease: Duration = Duration::from_secs(5),
    }
    check = check_store;
}

/// Keys of `[store]` that depend on each other.
fn check_store(s: &StoreConfig, checks: &mut muster_config::Checks<'_>) {
    if s.kind == StoreKind::Postgres && s.url.is_empty() {
        checks.bad(
            &["kind", "url"],
            "kind = \"postgres\" needs url = \"postgres://user@host:port/dbname\"".to_string(),
        );
    }
    if !s.url.is_empty() {
        match s.url.parse::<tokio_postgres::Config>() {
            Err(e) => checks.bad(
                &["url"],
                format!("is not a PostgreSQL URL ({e}); write it as postgres://user@host:port/dbname"),
            ),
            Ok(c) if c.get_password().is_some() => checks.bad(
                &["url"],
                "carries a password, which hub.toml must not hold; remove it from the URL and put it in a file named by password_file (mode 0600) or in the systemd credential pg-password".to_string(),
            ),
            Ok(_) => {}
        }
    }
    if s.lease < Duration::from_secs(1) || s.lease > Duration::from_secs(60) {
        checks.bad(&["lease"], "must be between 1s and 60s".to_string());
    }
}

impl StoreConfig {
    /// How to reach the PostgreSQL database: the URL and the password from
    /// `password_file`, else from the systemd credential `pg-password`
    /// (`$CREDENTIALS_DIRECTORY`), else none (trust or peer authentication).
    ///
    /// # Errors
    /// A sentence naming the file and what is wrong with it: unreadable, readable
    /// by others than its owner, or owned by another user.
    pub fn pg_options(&self) -> Result<PgOptions, String> {
        let password = match &self.password_file {
            Some(path) => Some(read_password(path, true)?),
            None => match std::env::var_os("CREDENTIALS_DIRECTORY") {
                Some(dir) => {
                    let path = Path::new(&dir).join(PG_PASSWORD_CREDENTIAL);
                    // systemd makes credentials readable by the service alone.
                    path.exists()
                        .then(|| read_password(&path, false))
                        .transpose()?
                }
                None => None,
            },
        };
        Ok(PgOptions {
            url: self.url.clone(),
            password,
        })
    }
}

/// Reads a password file; with `check`, refuses one others may read or that
/// another user owns (the password opens the whole database).
fn read_password(path: &Path, check: bool) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("store password_file {}: {e}", path.display()))?;
    if check {
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "store password_file {} has mode {:o}: others may read the database password; run chmod 600 {}",
                path.display(),
                meta.mode() & 0o777,
                path.display()
            ));
        }
        // The owner of /proc/self is this process's user.
        let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
        if me.is_some_and(|me| me != meta.uid()) {
            return Err(format!(
                "store password_file {} is owned by uid {}, not by the hub's user; chown it to the user the hub runs as",
                path.display(),
                meta.uid()
            ));
        }
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(PASSWORD_BYTES_MAX).read_to_string(&mut text))
        .map_err(|e| format!("store password file {}: {e}", path.display()))?;
    // A file written with echo ends in a newline that is not part of the password.
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// Keys of `[dashboard]` that depend on each other.
fn check_dashboard(d: &Dashboard, checks: &mut muster_config::Checks<'_>) {
    if let Some(addr) = d.listen
        && !addr.ip().is_loopback()
        && d.tls == DashboardTls::Off
    {
        checks.bad(
            &["listen", "tls"],
            format!(
                "{addr} is reachable beyond this machine, and plain HTTP would send sessions and tokens in clear text; set tls = \"hub\" (the hub's certificate) or tls = \"files\" with cert and key, or listen on 127.0.0.1"
            ),
        );
    }
    if d.tls == DashboardTls::Files && (d.cert.is_none() || d.key.is_none()) {
        checks.bad(
            &["tls", "cert", "key"],
            "tls = \"files\" needs both cert and key (PEM file paths)".to_string(),
        );
    }
    if d.login_ttl.is_zero() || d.session_ttl.is_zero() {
        checks.bad(
            &["login_ttl", "session_ttl"],
            "must be longer than 0 s".to_string(),
        );
    }
}

/// The comment at the top of the file `init` writes.
const HEADER: &str = "# muster hub configuration. Every key is optional; durations are\n\
                      # \"500ms\", \"30s\", \"5m\", \"1h\" or \"7d\". Unknown keys are errors.\n";

impl HubConfig {
    /// Reads and parses the file at `path`.
    ///
    /// # Errors
    /// [`ConfigError::Io`] if it cannot be read, otherwise as [`HubConfig::parse`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        muster_config::load(path, std::fs::read_to_string(path))
    }

    /// Parses hub.toml text; `path` is used only in messages.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] listing every problem: TOML syntax, unknown
    /// key, wrong type, bad value and inconsistent pair.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        muster_config::parse_file(path, text)
    }

    /// The whole file: every key with its current value and a comment saying
    /// what it is for and its default.
    pub fn render(&self) -> String {
        muster_config::render(self, HEADER)
    }

    /// Why the address join tokens carry may not work from other machines: the
    /// hub listens on all addresses, so it expects them, but the token names a
    /// loopback address or a bare host name (no domain) that they may not resolve.
    pub fn advertise_warning(&self, host_name: &str) -> Option<String> {
        if !self.listen.ip().is_unspecified() {
            return None;
        }
        let addr = self.advertise_addr(host_name);
        let host = addr
            .rsplit_once(':')
            .map_or(addr.as_str(), |(h, _)| h)
            .trim_matches(['[', ']']);
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let bare = host.parse::<std::net::IpAddr>().is_err() && !host.contains('.');
        (loopback || bare).then(|| {
            format!(
                "join tokens carry {addr}, which other machines may not reach{}; set advertise = \"hub.example.net:{}\" in hub.toml (or `muster-hub init --advertise`) to a name or address they resolve",
                if loopback { " (a loopback address)" } else { " (a host name without a domain)" },
                self.listen.port()
            )
        })
    }

    /// The address join tokens carry: `advertise` if set, else `listen` if its
    /// IP is specific, else `<host_name>:<listen port>`.
    pub fn advertise_addr(&self, host_name: &str) -> String {
        if !self.advertise.is_empty() {
            return self.advertise.clone();
        }
        if !self.listen.ip().is_unspecified() {
            return self.listen.to_string();
        }
        let port = self.listen.port();
        if host_name.contains(':') && !host_name.starts_with('[') {
            // An IPv6 literal needs brackets before a port can follow it.
            format!("[{host_name}]:{port}")
        } else {
            format!("{host_name}:{port}")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use muster_config::Section;

    use super::*;

    fn parse(text: &str) -> Result<HubConfig, ConfigError> {
        HubConfig::parse(text, Path::new("/etc/muster/hub.toml"))
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn has(problems: &[Problem], key: &str, needle: &str) -> bool {
        problems
            .iter()
            .any(|p| p.key == key && p.reason.contains(needle))
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(parse("").expect("empty"), HubConfig::default());
        assert_eq!(
            parse("[policy]\n[limits]\n").expect("sections"),
            HubConfig::default()
        );
    }

    #[test]
    fn defaults_render_and_parse_back() {
        let d = HubConfig::default();
        let text = d.render();
        assert_eq!(parse(&text).expect("render parses"), d);
        let keys = HubConfig::keys()
            .into_iter()
            .chain(Policy::keys())
            .chain(Limits::keys());
        for key in keys {
            let line = format!("\n{key} = ");
            let sect = format!("[{key}]");
            assert!(
                text.contains(&line) || text.contains(&sect),
                "{key} missing from render"
            );
        }
        assert!(text.starts_with("# muster hub configuration."));
        assert!(text.contains("# QUIC (UDP) address"));
        assert!(text.contains("Default: \"10s\""));
        assert!(text.contains(
            "# QUIC handshakes in flight at once from one source address; more are refused\n\
             # and the client retries. Raise it when many sidecars share one address (NAT). Default: 16.\n\
             handshakes_per_source = 16\n"
        ));
    }

    #[test]
    fn changed_values_render_and_parse_back() {
        let mut c = HubConfig {
            advertise: "hub.example.net:7440".into(),
            http_listen: Some("127.0.0.1:7441".parse().expect("addr")),
            data_dir: "/srv/hub \"quoted\"".into(),
            alert_command: vec!["/usr/bin/notify".into(), "--tag=a\\b".into()],
            ..HubConfig::default()
        };
        c.policy.stall_alert = Duration::from_millis(1500);
        c.policy.max_attempts = 7;
        c.limits.max_connections = 5;
        c.limits.handshakes_per_source = 3;
        c.limits.unauthenticated_per_minute_total = 9;
        assert_eq!(parse(&c.render()).expect("round trip"), c);
    }

    #[test]
    fn several_mistakes_are_all_reported_with_file_line_and_key() {
        let text = r#"
listen = "nowhere"
lisen = "0.0.0.0:1"
data_dir = 5
[policy]
accept_timeout = "30x"
max_attempts = 0
heartbeat_interval = "0s"
[limits]
max_frame_bytes = 2000000
"#;
        let err = parse(text).expect_err("invalid");
        let msg = err.to_string();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("expected Invalid, got {err:?}");
        };
        assert!(has(problems, "listen", "not an IP address and port"));
        assert!(has(problems, "lisen", "did you mean \"listen\"?"));
        assert!(has(
            problems,
            "data_dir",
            "expected a path string, found integer 5"
        ));
        assert!(has(problems, "policy.max_attempts", "0 is too small"));
        assert!(has(problems, "policy.heartbeat_interval", "is zero"));
        assert!(has(problems, "limits.max_frame_bytes", "ceiling"));
        assert!(msg.contains(
            "/etc/muster/hub.toml:6:18: policy.accept_timeout: \"30x\" has unknown unit \"x\"; use ms, s, m, h or d"
        ));
        assert_eq!(problems.len(), 7, "{msg}");
        assert_eq!(msg.lines().count(), problems.len());
        assert!(msg.lines().all(|l| l.starts_with("/etc/muster/hub.toml:")));
        let lines: Vec<usize> = problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [2, 3, 4, 6, 7, 8, 10], "{msg}");
    }

    #[test]
    fn unknown_keys_get_hints() {
        let p = problems(
            "[policy]\nacept_timeout = \"1s\"\nzzz = 1\n[limitz]\nheartbeat_interval = \"1s\"\n",
        );
        assert!(has(
            &p,
            "policy.acept_timeout",
            "did you mean \"accept_timeout\"?"
        ));
        assert!(has(&p, "policy.zzz", "known keys here"));
        assert!(has(&p, "limitz", "did you mean \"limits\"?"));
        let p = problems("stall_alert = \"1m\"\n");
        assert!(has(&p, "stall_alert", "belongs under [policy]"));
        let p = problems("[policy]\nheartbeat_intreval = \"5s\"\n");
        assert!(has(
            &p,
            "policy.heartbeat_intreval",
            "did you mean \"heartbeat_interval\"?"
        ));
    }

    #[test]
    fn wrong_types_name_the_expected_type() {
        let p = problems(
            "listen = 7440\nalert_command = \"notify --json\"\npolicy = 3\n[limits]\nmax_connections = \"lots\"\n",
        );
        assert!(has(&p, "listen", "expected an address string"));
        assert!(has(&p, "alert_command", "expected an array of strings"));
        assert!(has(
            &p,
            "policy",
            "expected a table [policy], found integer 3"
        ));
        assert!(has(
            &p,
            "limits.max_connections",
            "expected a whole number, found string \"lots\""
        ));
        let p = problems("alert_command = [\"a\", 2]\n[limits]\nmax_connections = 99999999999\n");
        assert!(has(&p, "alert_command[1]", "expected a string"));
        assert!(has(&p, "limits.max_connections", "too large"));
        let p = problems("[policy]\nretention = 30\n");
        assert!(has(
            &p,
            "policy.retention",
            "expected a duration string such as \"30s\", found integer 30"
        ));
    }

    #[test]
    fn bad_durations() {
        let p = problems("[policy]\nbackoff_max = \"10\"\nretention = \"-1d\"\n");
        assert!(has(&p, "policy.backoff_max", "no unit"));
        assert!(has(&p, "policy.retention", "whole number"));
    }

    #[test]
    fn cross_field_checks() {
        let p = problems(
            "[policy]\nbackoff_initial = \"1h\"\nbreaker_cooldown = \"2h\"\nheartbeat_interval = \"1m\"\n\
             [limits]\nmax_description_bytes = 600000\nmax_result_bytes = 600000\n",
        );
        assert!(has(
            &p,
            "policy.backoff_initial",
            "longer than backoff_max (10m)"
        ));
        assert!(has(
            &p,
            "policy.breaker_cooldown",
            "longer than breaker_cooldown_max (1h)"
        ));
        assert!(has(
            &p,
            "policy.lost_grace",
            "not longer than heartbeat_interval (1m)"
        ));
        assert!(has(&p, "limits.max_frame_bytes", "must be larger than"));
        assert_eq!(p.len(), 4);
        // Each at its own key's line; an absent key at its table's header.
        let at = |key: &str| p.iter().find(|x| x.key == key).map(|x| (x.line, x.column));
        assert_eq!(at("policy.backoff_initial"), Some((2, 1)));
        assert_eq!(at("policy.lost_grace"), Some((1, 1)));
        assert_eq!(at("limits.max_frame_bytes"), Some((5, 1)));
        // A refused key hides only the checks it is part of.
        let p = problems("[policy]\naccept_timeout = \"thirty\"\nlost_grace = \"5s\"\n");
        assert!(has(&p, "policy.accept_timeout", "whole number"));
        assert!(has(
            &p,
            "policy.lost_grace",
            "not longer than heartbeat_interval"
        ));
        let p = problems("[policy]\nheartbeat_interval = \"0s\"\nlost_grace = \"5s\"\n");
        assert_eq!(p.len(), 1, "{p:?}");
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = parse("listen = \"0.0.0.0:1\"\npolicy = [\n").expect_err("syntax");
        let msg = err.to_string();
        assert!(msg.starts_with("/etc/muster/hub.toml:2:"), "{msg}");
        assert!(msg.contains("TOML syntax error"), "{msg}");
    }

    #[test]
    fn load_reports_missing_file() {
        let err = HubConfig::load(Path::new("/nonexistent/muster/hub.toml")).expect_err("missing");
        assert!(matches!(err, ConfigError::Io { .. }));
        assert!(
            err.to_string()
                .starts_with("/nonexistent/muster/hub.toml: cannot read")
        );
    }

    #[test]
    fn the_store_section_is_checked() {
        let c = parse("[store]\nkind = \"postgres\"\nurl = \"postgres://muster@127.0.0.1:5432/muster\"\nlease = \"10s\"\n")
            .expect("postgres config");
        assert_eq!(c.store.kind, StoreKind::Postgres);
        assert_eq!(parse(&c.render()).expect("round trip"), c);
        let p = problems("[store]\nkind = \"postgres\"\n");
        assert!(has(&p, "store.kind", "needs url"), "{p:?}");
        let p = problems(
            "[store]\nkind = \"postgres\"\nurl = \"postgres://muster:secret@127.0.0.1/muster\"\n",
        );
        assert!(has(&p, "store.url", "carries a password"), "{p:?}");
        assert!(
            !p.iter().any(|x| x.reason.contains("secret")),
            "the password is not echoed"
        );
        let p = problems("[store]\nkind = \"mysql\"\nlease = \"2m\"\n");
        assert!(has(&p, "store.kind", "\"redb\""), "{p:?}");
        assert!(has(&p, "store.lease", "between 1s and 60s"), "{p:?}");
    }

    #[test]
    fn a_password_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let store = StoreConfig {
            kind: StoreKind::Postgres,
            url: "postgres://muster@127.0.0.1/muster".into(),
            password_file: Some(path.clone()),
            ..StoreConfig::default()
        };
        let err = store.pg_options().expect_err("refused");
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let o = store.pg_options().expect("read");
        assert_eq!(o.password.as_deref(), Some("s3cret"));
        let gone = StoreConfig {
            password_file: Some(dir.path().join("missing")),
            ..store
        };
        assert!(gone.pg_options().expect_err("missing").contains("missing"));
    }

    #[test]
    fn advertise_addr_prefers_setting_then_specific_listen_then_host() {
        let mut c = HubConfig::default();
        assert_eq!(c.advertise_addr("hub1"), "hub1:7440");
        assert_eq!(c.advertise_addr("fe80::1"), "[fe80::1]:7440");
        c.listen = "10.0.0.5:9000".parse().expect("addr");
        assert_eq!(c.advertise_addr("hub1"), "10.0.0.5:9000");
        c.listen = "[::]:9000".parse().expect("addr");
        assert_eq!(c.advertise_addr("hub1"), "hub1:9000");
        c.advertise = "hub.example.net:443".into();
        assert_eq!(c.advertise_addr("hub1"), "hub.example.net:443");
    }
}
