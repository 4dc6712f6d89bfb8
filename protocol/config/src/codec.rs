//! How one key's value is read from TOML and written back: the [`Codec`]
//! trait, the [`Node`] a codec reads, and the codecs both daemons use.
//!
//! A plain type is its own codec (`Duration`, `SocketAddr`, `PathBuf`, …).
//! Unit structs add rules to a type without changing it: [`Argv`] is a
//! `Vec<String>` whose program name is not empty, [`AtLeast`] a number with a
//! floor, [`HostPort`] a `String` that names a host and a port.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use muster_wire::duration::{format_duration, parse_duration};
use toml::de::DeValue;

/// Reads values of type `T` from TOML and writes them back.
pub trait Codec<T> {
    /// Reads one value.
    ///
    /// # Errors
    /// A [`Refused`] saying what is wrong and what to write instead; for an
    /// array, one entry for each bad item.
    fn read(node: &Node<'_>) -> Result<T, Refused>;

    /// `value` as TOML text, e.g. `"30s"`, `3` or `["a", "b"]`; reading it back gives `value`.
    fn write(value: &T) -> String;
}

/// Why one value cannot be used ("bad value"; the file-level error is
/// [`ConfigError`](crate::ConfigError)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// The value has another TOML type than the key holds.
    #[error("expected {expected}, found {found}")]
    Type {
        /// What the key holds, with an example.
        expected: String,
        /// The value's type, with the value when it is short.
        found: String,
    },
    /// The type is right but the value is not accepted; the text says why and what to write.
    #[error("{0}")]
    Invalid(String),
}

/// One or more [`ValueError`]s of one value, each at the value or one of its items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    errors: Vec<Refusal>,
}

/// One [`ValueError`] with its place: the item index (for arrays) and byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) item: Option<usize>,
    pub(crate) at: usize,
    pub(crate) error: ValueError,
}

impl Refused {
    /// The errors, in the order they were found.
    pub fn errors(&self) -> impl Iterator<Item = &ValueError> {
        self.errors.iter().map(|r| &r.error)
    }

    pub(crate) fn into_refusals(self) -> Vec<Refusal> {
        self.errors
    }

    /// Reads every item, reporting each bad one, not just the first.
    ///
    /// # Errors
    /// Every item's refusal, merged.
    pub fn collect<T>(
        results: impl IntoIterator<Item = Result<T, Refused>>,
    ) -> Result<Vec<T>, Refused> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for r in results {
            match r {
                Ok(v) => good.push(v),
                Err(e) => bad.extend(e.errors),
            }
        }
        if bad.is_empty() {
            Ok(good)
        } else {
            Err(Refused { errors: bad })
        }
    }
}

/// One TOML value being read, with its place in the file.
#[derive(Debug, Clone, Copy)]
pub struct Node<'a> {
    value: &'a DeValue<'a>,
    at: usize,
    item: Option<usize>,
}

impl<'a> Node<'a> {
    pub(crate) fn new(value: &'a DeValue<'a>, span: &Range<usize>) -> Self {
        Self {
            value,
            at: span.start,
            item: None,
        }
    }

    /// The value as parsed.
    pub fn value(&self) -> &'a DeValue<'a> {
        self.value
    }

    /// A refusal of this value because of its type; `expected` names what the
    /// key holds with an example, e.g. `a duration string such as "30s"`.
    pub fn wrong_type(&self, expected: &str) -> Refused {
        self.refuse(ValueError::Type {
            expected: expected.to_owned(),
            found: describe(self.value),
        })
    }

    /// A refusal of this value; `reason` says what is wrong and what to write.
    pub fn invalid(&self, reason: impl Into<String>) -> Refused {
        self.refuse(ValueError::Invalid(reason.into()))
    }

    /// The string, or a refusal naming `expected`.
    ///
    /// # Errors
    /// The value is not a string.
    pub fn string(&self, expected: &str) -> Result<&'a str, Refused> {
        match self.value {
            DeValue::String(s) => Ok(s),
            _ => Err(self.wrong_type(expected)),
        }
    }

    /// The integer, or a refusal naming `expected`.
    ///
    /// # Errors
    /// The value is not an integer.
    pub fn integer(&self, expected: &str) -> Result<i128, Refused> {
        match self.value {
            DeValue::Integer(i) => i128::from_str_radix(i.as_str(), i.radix())
                .map_err(|_| self.invalid(format!("{i} is too large"))),
            _ => Err(self.wrong_type(expected)),
        }
    }

    /// The array's items, each a node of its own, or a refusal naming `expected`.
    ///
    /// # Errors
    /// The value is not an array.
    pub fn items(&self, expected: &str) -> Result<Vec<Node<'a>>, Refused> {
        match self.value {
            DeValue::Array(items) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, item)| Node {
                    value: item.get_ref(),
                    at: item.span().start,
                    item: Some(i),
                })
                .collect()),
            _ => Err(self.wrong_type(expected)),
        }
    }

    /// Every item as a string; each one that is not is refused on its own.
    ///
    /// # Errors
    /// The value is not an array, or some items are not strings.
    pub fn strings(&self, expected: &str) -> Result<Vec<String>, Refused> {
        let items = self.items(expected)?;
        Refused::collect(
            items
                .iter()
                .map(|n| n.string("a string").map(str::to_owned)),
        )
    }

    fn refuse(&self, error: ValueError) -> Refused {
        Refused {
            errors: vec![Refusal {
                item: self.item,
                at: self.at,
                error,
            }],
        }
    }
}

/// A value's TOML type, with the value itself for short scalars.
pub(crate) fn describe(v: &DeValue<'_>) -> String {
    let (kind, text) = match v {
        DeValue::Table(_) => return "a table".into(),
        DeValue::Array(_) => return "an array".into(),
        DeValue::String(s) => ("string", quote(s)),
        DeValue::Integer(i) => ("integer", i.to_string()),
        DeValue::Float(f) => ("float", f.to_string()),
        DeValue::Boolean(b) => ("boolean", b.to_string()),
        DeValue::Datetime(d) => ("datetime", d.to_string()),
    };
    if text.chars().count() <= 40 {
        format!("{kind} {text}")
    } else {
        kind.into()
    }
}

/// `s` as a TOML basic string, with every escape it needs.
pub fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// `items` as a TOML array of basic strings.
pub fn quote_all(items: &[String]) -> String {
    toml::Value::Array(items.iter().cloned().map(toml::Value::String).collect()).to_string()
}

/// Reads one of a fixed set of words; [`words!`](crate::words) builds on it.
///
/// # Errors
/// Not a string, or not one of the words (with the nearest one as a hint).
pub fn read_word<T: Copy>(node: &Node<'_>, options: &[(&'static str, T)]) -> Result<T, Refused> {
    let words: Vec<&str> = options.iter().map(|(w, _)| *w).collect();
    let list = words
        .iter()
        .map(|w| format!("{w:?}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let text = node.string(&format!("a string, {list}"))?;
    if let Some((_, v)) = options.iter().find(|(w, _)| *w == text) {
        return Ok(*v);
    }
    let hint = match crate::nearest(text, &words) {
        Some(near) => format!("; did you mean {near:?}?"),
        None => String::new(),
    };
    Err(node.invalid(format!("{text:?} is not accepted; use {list}{hint}")))
}

// === Plain types: each its own codec ===

impl Codec<String> for String {
    fn read(node: &Node<'_>) -> Result<String, Refused> {
        node.string("a string").map(str::to_owned)
    }

    fn write(value: &String) -> String {
        quote(value)
    }
}

impl Codec<Vec<String>> for Vec<String> {
    fn read(node: &Node<'_>) -> Result<Vec<String>, Refused> {
        node.strings("an array of strings such as [\"a\", \"b\"]")
    }

    fn write(value: &Vec<String>) -> String {
        quote_all(value)
    }
}

/// A zero duration is refused: every duration in these files is a timeout or
/// a period, where zero means failing at once or spinning.
impl Codec<Duration> for Duration {
    fn read(node: &Node<'_>) -> Result<Duration, Refused> {
        let text = node.string("a duration string such as \"30s\"")?;
        match parse_duration(text) {
            Ok(d) if d.is_zero() => {
                Err(node.invalid(format!("{text:?} is zero; it must be longer, e.g. \"30s\"")))
            }
            Ok(d) => Ok(d),
            Err(e) => Err(node.invalid(e)),
        }
    }

    fn write(value: &Duration) -> String {
        quote(&format_duration(*value))
    }
}

/// A directory or file; `""` is refused (a path that means "here" is a trap).
impl Codec<PathBuf> for PathBuf {
    fn read(node: &Node<'_>) -> Result<PathBuf, Refused> {
        let text = node.string("a path string")?;
        if text.is_empty() {
            return Err(node.invalid("is empty; give a directory path"));
        }
        Ok(PathBuf::from(text))
    }

    fn write(value: &PathBuf) -> String {
        quote(&value.to_string_lossy())
    }
}

/// A path where `""` means "not set".
impl Codec<Option<PathBuf>> for Option<PathBuf> {
    fn read(node: &Node<'_>) -> Result<Option<PathBuf>, Refused> {
        let text = node.string("a path string, or \"\"")?;
        Ok((!text.is_empty()).then(|| PathBuf::from(text)))
    }

    fn write(value: &Option<PathBuf>) -> String {
        quote(
            &value
                .as_deref()
                .unwrap_or(std::path::Path::new(""))
                .to_string_lossy(),
        )
    }
}

impl Codec<SocketAddr> for SocketAddr {
    fn read(node: &Node<'_>) -> Result<SocketAddr, Refused> {
        let text = node.string("an address string such as \"0.0.0.0:7440\"")?;
        parse_addr(node, text)
    }

    fn write(value: &SocketAddr) -> String {
        quote(&value.to_string())
    }
}

/// An address where `""` turns the listener off.
impl Codec<Option<SocketAddr>> for Option<SocketAddr> {
    fn read(node: &Node<'_>) -> Result<Option<SocketAddr>, Refused> {
        let text = node.string("an address string such as \"127.0.0.1:7441\", or \"\"")?;
        if text.is_empty() {
            return Ok(None);
        }
        parse_addr(node, text).map(Some)
    }

    fn write(value: &Option<SocketAddr>) -> String {
        quote(&value.map(|a| a.to_string()).unwrap_or_default())
    }
}

fn parse_addr(node: &Node<'_>, text: &str) -> Result<SocketAddr, Refused> {
    text.parse().map_err(|_| {
        node.invalid(format!(
            "{text:?} is not an IP address and port; write e.g. \"0.0.0.0:7440\" or \"[::]:7440\""
        ))
    })
}

// === Numbers ===

/// Unsigned integer types a key may hold.
pub trait Int: Copy + fmt::Display + TryFrom<i128> + Into<i128> {
    /// The largest value a file can give: TOML integers are i64, so `u64` stops at `i64::MAX`.
    const MAX: i128;
}

impl Int for u32 {
    const MAX: i128 = u32::MAX as i128;
}

impl Int for u64 {
    const MAX: i128 = i64::MAX as i128;
}

/// A whole number from `min` up to `max` (and the type's own maximum).
///
/// # Errors
/// Not an integer, or out of range (naming the range).
pub fn read_int<T: Int>(node: &Node<'_>, min: i128, max: i128) -> Result<T, Refused> {
    let max = max.min(T::MAX);
    let n = node.integer("a whole number")?;
    if n < min {
        return Err(node.invalid(format!("{n} is too small; use {min} to {max}")));
    }
    if n > max {
        return Err(node.invalid(format!("{n} is too large; use {min} to {max}")));
    }
    T::try_from(n).map_err(|_| node.invalid(format!("{n} is too large; use {min} to {max}")))
}

impl Codec<u32> for u32 {
    fn read(node: &Node<'_>) -> Result<u32, Refused> {
        read_int(node, 0, <u32 as Int>::MAX)
    }

    fn write(value: &u32) -> String {
        value.to_string()
    }
}

impl Codec<u64> for u64 {
    fn read(node: &Node<'_>) -> Result<u64, Refused> {
        read_int(node, 0, <u64 as Int>::MAX)
    }

    fn write(value: &u64) -> String {
        value.to_string()
    }
}

/// A whole number of at least `MIN`, e.g. `AtLeast<1>` for counts where 0 would stop all work.
#[derive(Debug)]
pub struct AtLeast<const MIN: u64>;

impl<T: Int, const MIN: u64> Codec<T> for AtLeast<MIN> {
    fn read(node: &Node<'_>) -> Result<T, Refused> {
        read_int(node, i128::from(MIN), T::MAX)
    }

    fn write(value: &T) -> String {
        value.to_string()
    }
}

/// A whole number from `MIN` to `MAX`.
#[derive(Debug)]
pub struct Between<const MIN: u64, const MAX: u64>;

impl<T: Int, const MIN: u64, const MAX: u64> Codec<T> for Between<MIN, MAX> {
    fn read(node: &Node<'_>) -> Result<T, Refused> {
        read_int(node, i128::from(MIN), i128::from(MAX))
    }

    fn write(value: &T) -> String {
        value.to_string()
    }
}

// === Commands and addresses ===

/// A command as an argv array, never a shell string; `[]` means none, but a
/// given command must name its program.
#[derive(Debug)]
pub struct Argv;

const ARGV_EXPECTED: &str =
    "an array of strings (argv, no shell) such as [\"/usr/local/bin/run-agent\", \"--flag\"]";

impl Codec<Vec<String>> for Argv {
    fn read(node: &Node<'_>) -> Result<Vec<String>, Refused> {
        let argv = node.strings(ARGV_EXPECTED)?;
        if argv.first().is_some_and(String::is_empty) {
            let items = node.items(ARGV_EXPECTED)?;
            if let Some(first) = items.first() {
                return Err(first.invalid("the program name is empty"));
            }
        }
        Ok(argv)
    }

    fn write(value: &Vec<String>) -> String {
        quote_all(value)
    }
}

/// An [`Argv`] that must be given: `[]` is refused.
#[derive(Debug)]
pub struct Command;

impl Codec<Vec<String>> for Command {
    fn read(node: &Node<'_>) -> Result<Vec<String>, Refused> {
        let argv = Argv::read(node)?;
        if argv.is_empty() {
            return Err(node.invalid(
                "is empty; give the program's argv, e.g. [\"/usr/local/bin/run-agent\"]",
            ));
        }
        Ok(argv)
    }

    fn write(value: &Vec<String>) -> String {
        quote_all(value)
    }
}

/// `host:port`, where the host is a name or an address (resolved later, when used).
#[derive(Debug)]
pub struct HostPort;

impl Codec<String> for HostPort {
    fn read(node: &Node<'_>) -> Result<String, Refused> {
        let text = node.string("a \"host:port\" string")?;
        let ok = text.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
        });
        if ok {
            Ok(text.to_owned())
        } else {
            Err(node.invalid(format!(
                "{text:?} is not host:port; write e.g. \"hub.example.net:7440\""
            )))
        }
    }

    fn write(value: &String) -> String {
        quote(value)
    }
}

/// A list of [`HostPort`]s, at most 16 (a cluster's hubs).
#[derive(Debug)]
pub struct HostPorts;

impl Codec<Vec<String>> for HostPorts {
    fn read(node: &Node<'_>) -> Result<Vec<String>, Refused> {
        const MAX: usize = 16;
        let items = node.items("an array of \"host:port\" strings")?;
        if items.len() > MAX {
            return Err(node.invalid(format!(
                "has {} entries; at most {MAX} are allowed",
                items.len()
            )));
        }
        Refused::collect(items.iter().map(HostPort::read))
    }

    fn write(value: &Vec<String>) -> String {
        quote_all(value)
    }
}

/// A [`HostPort`] where `""` means "not set" (the daemon derives a value).
#[derive(Debug)]
pub struct HostPortOrEmpty;

impl Codec<String> for HostPortOrEmpty {
    fn read(node: &Node<'_>) -> Result<String, Refused> {
        match node.value() {
            DeValue::String(s) if s.is_empty() => Ok(String::new()),
            _ => HostPort::read(node),
        }
    }

    fn write(value: &String) -> String {
        quote(value)
    }
}
