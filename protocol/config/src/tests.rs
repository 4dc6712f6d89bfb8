use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{Argv, AtLeast, Between, Checks, Command, Compound, HostPort, KeyProblem, Problem};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Colour {
    Red,
    Green,
}
crate::words!(Colour { Colour::Red => "red", Colour::Green => "green" });

crate::config! {
    /// The top of a test file.
    #[derive(Debug, Clone, PartialEq)]
    struct Top {
        /// Where to listen.
        listen: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 7440)),
        /// Off when empty.
        http_listen: Option<SocketAddr> = None,
        /// A directory.
        data_dir: PathBuf = PathBuf::from("/var/lib/x"),
        /// An optional command.
        notify: Vec<String> as Argv = Vec::new(),
        /// A colour.
        colour: Colour = Colour::Red,
        sections {
            /// Timing.
            timing: Timing,
            /// A nested choice.
            probe: ProbeTable,
        }
    }
}

crate::config! {
    /// Timing keys.
    #[derive(Debug, Clone, PartialEq)]
    struct Timing {
        /// How often.
        interval: Duration = Duration::from_secs(10),
        /// How long before giving up; longer than interval.
        grace: Duration = Duration::from_secs(60),
        /// Tries; at least one.
        tries: u32 as AtLeast<1> = 3,
        /// A bounded count,
        /// written over two lines.
        slots: u32 as Between<1, 8> = 1,
        /// Big numbers.
        events_max: u64 = 100_000,
    }
    check = check_timing;
}

fn check_timing(t: &Timing, checks: &mut Checks<'_>) {
    if t.grace <= t.interval {
        checks.bad(
            &["grace", "interval"],
            "is not longer than interval; make it longer",
        );
    }
}

/// A probe: a pattern or a command, never both.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum Probe {
    #[default]
    None,
    Pattern(String),
    Command(Vec<String>),
}

crate::config! {
    /// The keys behind [`Probe`].
    #[derive(Debug, Clone, PartialEq)]
    struct ProbeKeys {
        /// A pattern.
        pattern: String = String::new(),
        /// A command.
        command: Vec<String> as Argv = Vec::new(),
    }
}

impl Compound for Probe {
    type Keys = ProbeKeys;

    fn build(k: ProbeKeys) -> Result<Self, Vec<KeyProblem>> {
        match (k.pattern.is_empty(), k.command.is_empty()) {
            (true, true) => Ok(Probe::None),
            (false, true) => Ok(Probe::Pattern(k.pattern)),
            (true, false) => Ok(Probe::Command(k.command)),
            (false, false) => Err(vec![KeyProblem {
                key: "command",
                reason: "is set as well as pattern; set only one".into(),
            }]),
        }
    }

    fn to_keys(&self) -> ProbeKeys {
        let mut k = ProbeKeys::default();
        match self {
            Probe::None => {}
            Probe::Pattern(p) => k.pattern = p.clone(),
            Probe::Command(c) => k.command = c.clone(),
        }
        k
    }
}

crate::config! {
    /// A table holding a compound setting.
    #[derive(Debug, Clone, PartialEq)]
    struct ProbeTable {
        /// Something plain first.
        name: String = String::new(),
        compound {
            /// The probe.
            probe: Probe,
        }
    }
}

crate::config! {
    /// A file with required keys.
    #[derive(Debug, Clone, PartialEq)]
    struct Needs {
        required {
            /// Who.
            name: String => "set it, e.g. name = \"a\"",
            /// Where.
            hub: String as HostPort => "set it, e.g. hub = \"h:1\"",
        }
        /// What to run.
        command: Vec<String> as Command = vec!["/bin/agent".into()],
    }
}

fn problems<T: crate::Section + std::fmt::Debug>(text: &str) -> Vec<String> {
    match crate::parse::<T>(text) {
        Ok(v) => panic!("expected problems, got {v:?}"),
        Err(p) => p.iter().map(Problem::to_string).collect(),
    }
}

#[test]
fn every_problem_is_reported_at_once_with_line_and_column() {
    let text = "\
listen = \"nowhere\"
colur = \"red\"
data_dir = 5
[timing]
interval = \"30x\"
tries = 0
slots = 9
";
    assert_eq!(
        problems::<Top>(text),
        [
            "1:10: listen: \"nowhere\" is not an IP address and port; write e.g. \"0.0.0.0:7440\" or \"[::]:7440\"",
            "2:1: colur: unknown key; did you mean \"colour\"?",
            "3:12: data_dir: expected a path string, found integer 5",
            "5:12: timing.interval: \"30x\" has unknown unit \"x\"; use ms, s, m, h or d",
            "6:9: timing.tries: 0 is too small; use 1 to 4294967295",
            "7:9: timing.slots: 9 is too large; use 1 to 8",
        ]
    );
}

#[test]
fn the_file_error_names_the_file_on_every_line() {
    let err = crate::parse_file::<Top>(
        std::path::Path::new("/etc/x.toml"),
        "listen = 1\n[timing]\ntries = -1\n",
    )
    .expect_err("invalid");
    assert_eq!(
        err.to_string(),
        "/etc/x.toml:1:10: listen: expected an address string such as \"0.0.0.0:7440\", found integer 1\n\
         /etc/x.toml:3:9: timing.tries: -1 is too small; use 1 to 4294967295"
    );
    let err = crate::load::<Top>(
        std::path::Path::new("/nonexistent/x.toml"),
        Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
    )
    .expect_err("missing");
    assert!(matches!(err, crate::ConfigError::Io { .. }));
    assert!(
        err.to_string()
            .starts_with("/nonexistent/x.toml: cannot read")
    );
}

#[test]
fn unknown_keys_suggest_the_near_one_or_list_the_known_ones() {
    let p = problems::<Top>("[timing]\nintreval = \"1s\"\nzzz = 1\n[timng]\ninterval = \"1s\"\n");
    assert_eq!(
        p,
        [
            "2:1: timing.intreval: unknown key; did you mean \"interval\"?",
            "3:1: timing.zzz: unknown key; known keys here: interval, grace, tries, slots, events_max",
            "4:2: timng: unknown key; did you mean \"timing\"?",
        ]
    );
    assert_eq!(
        problems::<Top>("grace = \"2m\"\n"),
        ["1:1: grace: unknown key; it belongs under [timing]"]
    );
    assert_eq!(crate::nearest("x", &["listen"]), None);
    assert_eq!(
        crate::nearest("heartbeat_intreval", &["heartbeat_interval", "x"]),
        Some("heartbeat_interval")
    );
}

#[test]
fn wrong_types_name_the_expected_type_and_what_was_found() {
    let p = problems::<Top>(
        "notify = \"mail --now\"\ncolour = \"gren\"\ntiming = 3\nhttp_listen = true\n[probe]\ncommand = [\"a\", 2, {x = 1}]\n",
    );
    assert_eq!(
        p,
        [
            "1:10: notify: expected an array of strings (argv, no shell) such as [\"/usr/local/bin/run-agent\", \"--flag\"], found string \"mail --now\"",
            "2:10: colour: \"gren\" is not accepted; use \"red\" or \"green\"; did you mean \"green\"?",
            "3:10: timing: expected a table [timing], found integer 3",
            "4:15: http_listen: expected an address string such as \"127.0.0.1:7441\", or \"\", found boolean true",
            "6:17: probe.command[1]: expected a string, found integer 2",
            "6:20: probe.command[2]: expected a string, found a table",
        ]
    );
    let p = problems::<Top>(
        "[timing]\ninterval = 30\nevents_max = 99999999999999999999\ngrace = \"0s\"\n",
    );
    assert_eq!(
        p,
        [
            "2:12: timing.interval: expected a duration string such as \"30s\", found integer 30",
            "3:14: timing.events_max: 99999999999999999999 is too large; use 0 to 9223372036854775807",
            "4:9: timing.grace: \"0s\" is zero; it must be longer, e.g. \"30s\"",
        ]
    );
}

#[test]
fn defaults_round_trip_through_the_rendered_file() {
    let text = crate::render(&Top::default(), "# test\n");
    assert_eq!(
        crate::parse::<Top>(&text).expect("render parses"),
        Top::default()
    );
    assert_eq!(crate::parse::<Top>("").expect("empty"), Top::default());
    assert!(
        text.starts_with(
            "# test\n\n# Where to listen. Default: \"0.0.0.0:7440\".\nlisten = \"0.0.0.0:7440\"\n"
        ),
        "{text}"
    );
    assert!(text.contains("\n# Timing.\n[timing]\n"), "{text}");
    assert!(
        text.contains("# A bounded count,\n# written over two lines. Default: 1.\nslots = 1\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "\n[probe]\n# Something plain first. Default: \"\".\nname = \"\"\n# A pattern."
        ),
        "{text}"
    );
    for key in <Top as crate::Section>::keys()
        .into_iter()
        .chain(<Timing as crate::Section>::keys())
        .chain(<ProbeTable as crate::Section>::keys())
    {
        assert!(
            text.contains(&format!("\n{key} = ")) || text.contains(&format!("[{key}]")),
            "{key} missing from {text}"
        );
    }
}

#[test]
fn changed_values_round_trip_through_the_rendered_file() {
    let mut t = Top {
        http_listen: Some("127.0.0.1:7441".parse().expect("addr")),
        data_dir: "/srv/x \"quoted\"".into(),
        notify: vec!["/usr/bin/notify".into(), "--tag=a\\b".into()],
        colour: Colour::Green,
        ..Top::default()
    };
    t.timing.interval = Duration::from_millis(1500);
    t.timing.tries = 7;
    t.probe.probe = Probe::Command(vec!["true".into()]);
    assert_eq!(
        crate::parse::<Top>(&crate::render(&t, "")).expect("round trip"),
        t
    );
    t.probe.probe = Probe::Pattern("agent".into());
    assert_eq!(
        crate::parse::<Top>(&crate::render(&t, "")).expect("round trip"),
        t
    );
}

#[test]
fn checks_across_keys_point_at_the_key_or_the_table() {
    assert_eq!(
        problems::<Top>("[timing]\ngrace = \"5s\"\n"),
        ["2:1: timing.grace: is not longer than interval; make it longer"]
    );
    assert_eq!(
        problems::<Top>("# c\n[timing]\ninterval = \"2m\"\n"),
        ["2:1: timing.grace: is not longer than interval; make it longer"]
    );
    // A refused key keeps quiet the checks that involve it (its default
    // stands in, so they could be false), not the others.
    assert_eq!(
        problems::<Top>("[timing]\ninterval = \"nope\"\ngrace = \"1s\"\n").len(),
        1
    );
    assert_eq!(
        problems::<Top>("[timing]\ntries = 0\ngrace = \"1s\"\n"),
        [
            "2:9: timing.tries: 0 is too small; use 1 to 4294967295",
            "3:1: timing.grace: is not longer than interval; make it longer",
        ]
    );
}

#[test]
fn a_compound_setting_is_checked_once_and_names_both_keys() {
    assert_eq!(
        problems::<Top>("[probe]\npattern = \"agent\"\ncommand = [\"true\"]\n"),
        ["3:1: probe.command: is set as well as pattern; set only one"]
    );
    // A refused key: the combination is not judged on a stand-in default.
    assert_eq!(
        problems::<Top>("[probe]\npattern = \"agent\"\ncommand = \"true\"\n").len(),
        1
    );
    let t: Top = crate::parse("[probe]\npattern = \"agent\"\n").expect("pattern");
    assert_eq!(t.probe.probe, Probe::Pattern("agent".into()));
}

#[test]
fn required_keys_are_named_when_missing() {
    assert_eq!(
        problems::<Needs>("command = []\n"),
        [
            "1:1: name: is required; set it, e.g. name = \"a\"",
            "1:1: hub: is required; set it, e.g. hub = \"h:1\"",
            "1:11: command: is empty; give the program's argv, e.g. [\"/usr/local/bin/run-agent\"]",
        ]
    );
    assert_eq!(
        problems::<Needs>("name = \"a\"\nhub = \"nohost\"\ncommand = [\"\"]\n"),
        [
            "2:7: hub: \"nohost\" is not host:port; write e.g. \"hub.example.net:7440\"",
            "3:12: command[0]: the program name is empty",
        ]
    );
    let n = Needs::from_required("a".into(), "h:1".into());
    let text = crate::render(&n, "");
    assert!(text.contains("# Who. Required.\nname = \"a\"\n"), "{text}");
    assert_eq!(crate::parse::<Needs>(&text).expect("round trip"), n);
}

#[test]
fn syntax_errors_are_reported_one_per_line() {
    let p = problems::<Top>("listen = \"0.0.0.0:1\"\nb = \nc = 3\nd = [1,\n");
    assert!(p.len() >= 2, "{p:?}");
    assert!(p[0].starts_with("2:5: TOML syntax error: "), "{p:?}");
    let lines: Vec<&str> = p
        .iter()
        .map(|l| l.split(':').next().unwrap_or(""))
        .collect();
    let mut unique = lines.clone();
    unique.dedup();
    assert_eq!(lines, unique, "one per line: {p:?}");
    assert_eq!(
        problems::<Top>("listen = \"0.0.0.0:1\"\nlisten = \"0.0.0.0:2\"\n"),
        ["2:1: TOML syntax error: duplicate key"]
    );
}

#[test]
fn hostile_input_gives_problems_not_panics() {
    for text in [
        "\u{0}",
        "[[timing]]\ninterval = \"1s\"\n",
        "timing.interval.x = 1\n",
        "[timing]\ninterval = \"\u{e9}\u{e9}\"\n",
        &"[".repeat(10_000),
        &format!("notify = {}", "[".repeat(500)),
        "listen = \"\u{1F600}\"\ncolour = \"\u{1F600}\"\n",
        "slots = 1e9\n[timing]\nslots = 0x10\n",
    ] {
        let _ = crate::parse::<Top>(text);
    }
    let t: Top = crate::parse("[timing]\nevents_max = 1_000\ntries = +2\n").expect("underscores");
    assert_eq!((t.timing.events_max, t.timing.tries), (1000, 2));
    assert_eq!(
        problems::<Top>("[timing]\nslots = 0x10\n"),
        ["2:9: timing.slots: 16 is too large; use 1 to 8"]
    );
}
