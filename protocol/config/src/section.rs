//! Tables of keys: the [`Section`] trait that [`config!`](crate::config)
//! implements, the [`Reader`] it reads a table with, the [`Writer`] it
//! renders with, [`Compound`] settings made of several keys, and [`Checks`]
//! across keys.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

use crate::codec::{Codec, Node};
use crate::problem::Sink;

/// A table of keys, declared with [`config!`](crate::config).
pub trait Section: Sized {
    /// Every key and sub-table this section reads, in declaration order.
    fn keys() -> Vec<&'static str>;

    /// Reads this section's keys from `reader`, reporting every problem to it.
    /// A refused key's default stands in, so the checks across keys still run
    /// (a check never reports on a refused key); `None` only when a required
    /// key has no value.
    fn read_from(reader: &mut Reader<'_>) -> Option<Self>;

    /// Writes every key, each with its doc line, its default and its value.
    fn render_into(&self, writer: &mut Writer);
}

/// A setting made of several keys of one table that are only valid together,
/// such as a choice and the value that choice needs. The keys are declared
/// once, with [`config!`](crate::config), as [`Compound::Keys`]; the setting
/// itself is a type that cannot hold an invalid combination.
pub trait Compound: Sized {
    /// The keys as written in the file, read flat from the parent table.
    type Keys: Section;

    /// Builds the setting from its keys: the one place the combination is checked.
    ///
    /// # Errors
    /// Each problem names the key it is about and says what to change.
    fn build(keys: Self::Keys) -> Result<Self, Vec<KeyProblem>>;

    /// The keys that write this setting back; `build(to_keys(s)) == s`.
    fn to_keys(&self) -> Self::Keys;
}

/// A problem with one key of a [`Compound`] or a [`Checks`] pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyProblem {
    /// The key, without its table's name.
    pub key: &'static str,
    /// What is wrong, naming every key involved, and what to change.
    pub reason: String,
}

// === impl Reader ===

/// One table being read. Each key read is taken out, so what is left at the
/// end is unknown; every problem goes to the file's list, with its place.
#[derive(Debug)]
pub struct Reader<'a> {
    table: DeTable<'a>,
    /// Dotted name of this table followed by a dot, or empty at the top.
    prefix: String,
    /// Where the table starts (its `[header]`), for problems about absent keys.
    at: usize,
    /// Keys read so far and where each was written, for later checks.
    seen: Vec<(&'static str, usize)>,
    /// Keys whose values were refused: checks that involve them stay quiet.
    refused: Vec<&'static str>,
    /// Sub-tables read so far, with their keys, for "belongs under" hints.
    sections: Vec<(&'static str, Vec<&'static str>)>,
    sink: &'a mut Sink,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(table: DeTable<'a>, sink: &'a mut Sink) -> Self {
        Self {
            table,
            prefix: String::new(),
            at: 0,
            seen: Vec::new(),
            refused: Vec::new(),
            sections: Vec::new(),
            sink,
        }
    }

    /// Reads the key `name` with codec `C`; `default()` when it is absent,
    /// `None` when it was refused (the problem is reported).
    pub fn key<T, C: Codec<T>>(
        &mut self,
        name: &'static str,
        default: impl FnOnce() -> T,
    ) -> Option<T> {
        match self.take(name) {
            None => Some(default()),
            Some((value, span)) => self.read::<T, C>(name, &value, &span),
        }
    }

    /// Reads the key `name` with codec `C`; reports it as missing, with `hint`, when absent.
    pub fn required<T, C: Codec<T>>(&mut self, name: &'static str, hint: &str) -> Option<T> {
        match self.take(name) {
            None => {
                let key = self.full(name);
                self.sink.push(self.at, key, format!("is required; {hint}"));
                None
            }
            Some((value, span)) => self.read::<T, C>(name, &value, &span),
        }
    }

    /// Reads the keys of a [`Compound`] from this table and builds it; `None`
    /// when a key was refused (then it is not built: its keys would be half
    /// defaults) or the combination was.
    pub fn compound<C: Compound>(&mut self) -> Option<C> {
        let first = self.seen.len();
        let refused = self.refused.len();
        let keys = C::Keys::read_from(self)?;
        if self.refused.len() > refused {
            return None;
        }
        match C::build(keys) {
            Ok(value) => Some(value),
            Err(problems) => {
                // A problem about an absent key is placed at the first key of
                // the group that was written, so it points at the choice.
                let fallback = self
                    .seen
                    .get(first..)
                    .and_then(|s| s.first())
                    .map(|(_, at)| *at);
                for p in problems {
                    let at = self.place(p.key).or(fallback).unwrap_or(self.at);
                    let key = self.full(p.key);
                    self.sink.push(at, key, p.reason);
                    self.refused.push(p.key);
                }
                None
            }
        }
    }

    /// Reads the sub-table `name` as section `S`; an absent one is empty.
    pub fn section<S: Section>(&mut self, name: &'static str) -> Option<S> {
        self.sections.push((name, S::keys()));
        let (table, at) = match self.table.remove_entry(name) {
            None => (DeTable::new(), self.at),
            Some((key, value)) => {
                self.seen.push((name, key.span().start));
                let span = value.span();
                match value.into_inner() {
                    DeValue::Table(t) => (t, span.start),
                    other => {
                        self.refused.push(name);
                        let found = crate::codec::describe(&other);
                        let key = self.full(name);
                        self.sink.push(
                            span.start,
                            key,
                            format!("expected a table [{}{name}], found {found}", self.prefix),
                        );
                        return None;
                    }
                }
            }
        };
        let mut sub = Reader {
            table,
            prefix: format!("{}{name}.", self.prefix),
            at,
            seen: Vec::new(),
            refused: Vec::new(),
            sections: Vec::new(),
            sink: &mut *self.sink,
        };
        let value = S::read_from(&mut sub);
        sub.finish(&S::keys());
        value
    }

    /// Runs the checks across this section's keys on its value.
    pub fn check<T>(&mut self, value: &T, check: fn(&T, &mut Checks<'_>)) {
        check(
            value,
            &mut Checks {
                prefix: &self.prefix,
                at: self.at,
                seen: &self.seen,
                refused: &self.refused,
                sink: &mut *self.sink,
            },
        );
    }

    /// Reports every key left over as unknown, with the nearest known key as
    /// a hint, or the sub-table it belongs in.
    pub(crate) fn finish(self, known: &[&'static str]) {
        for (key, _) in self.table.iter() {
            let name: &str = key.get_ref();
            let reason =
                if let Some((s, _)) = self.sections.iter().find(|(_, keys)| keys.contains(&name)) {
                    format!("unknown key; it belongs under [{}{s}]", self.prefix)
                } else if let Some(near) = crate::nearest(name, known) {
                    format!("unknown key; did you mean {near:?}?")
                } else {
                    format!("unknown key; known keys here: {}", known.join(", "))
                };
            self.sink
                .push(key.span().start, format!("{}{name}", self.prefix), reason);
        }
    }

    fn take(&mut self, name: &'static str) -> Option<(DeValue<'a>, Range<usize>)> {
        let (key, value) = self.table.remove_entry(name)?;
        self.seen.push((name, key.span().start));
        let span = value.span();
        Some((value.into_inner(), span))
    }

    fn read<T, C: Codec<T>>(
        &mut self,
        name: &'static str,
        value: &DeValue<'_>,
        span: &Range<usize>,
    ) -> Option<T> {
        match C::read(&Node::new(value, span)) {
            Ok(v) => Some(v),
            Err(refused) => {
                self.refused.push(name);
                for r in refused.into_refusals() {
                    let mut key = self.full(name);
                    if let Some(i) = r.item {
                        key.push_str(&format!("[{i}]"));
                    }
                    self.sink.push(r.at, key, r.error.to_string());
                }
                None
            }
        }
    }

    /// Where key `name` of this table was written, if it was.
    fn place(&self, name: &str) -> Option<usize> {
        place(&self.seen, name)
    }

    fn full(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

// === impl Checks ===

/// Checks across the keys of one section; each problem is placed at its key's
/// line, or at the table's header when the key was left out.
#[derive(Debug)]
pub struct Checks<'c> {
    prefix: &'c str,
    at: usize,
    seen: &'c [(&'static str, usize)],
    refused: &'c [&'static str],
    sink: &'c mut Sink,
}

impl Checks<'_> {
    /// Reports a problem with `keys[0]` that involves every key in `keys`;
    /// `reason` names them and what to change. It is dropped when one of them
    /// was refused: its value here is a stand-in default, not the file's.
    pub fn bad(&mut self, keys: &[&'static str], reason: impl Into<String>) {
        let Some(key) = keys.first() else {
            return;
        };
        if keys.iter().any(|k| self.refused.contains(k)) {
            return;
        }
        let at = place(self.seen, key).unwrap_or(self.at);
        self.sink
            .push(at, format!("{}{key}", self.prefix), reason.into());
    }
}

/// Where key `name` was written, among the keys read from one table.
fn place(seen: &[(&'static str, usize)], name: &str) -> Option<usize> {
    seen.iter().find(|(k, _)| *k == name).map(|(_, at)| *at)
}

// === impl Writer ===

/// Renders a configuration file: each key on its own line under a comment
/// that says what it is for and its default, tables as `[name]` headers.
#[derive(Debug, Default)]
pub struct Writer {
    out: String,
    /// Dotted name of the table being written, followed by a dot.
    prefix: String,
}

impl Writer {
    /// Writes `text` as it is (a header comment, say).
    pub fn raw(&mut self, text: &str) {
        self.out.push_str(text);
    }

    /// Writes one key: its doc lines as a comment ending with its default
    /// (or "Required." when it has none), then `key = value`.
    pub fn key<T, C: Codec<T>>(&mut self, key: &str, doc: &[&str], value: &T, default: Option<&T>) {
        self.comment(doc);
        match default {
            Some(d) => {
                self.out.push_str(" Default: ");
                self.out.push_str(&C::write(d));
                self.out.push('.');
            }
            None => self.out.push_str(" Required."),
        }
        self.out.push('\n');
        self.out.push_str(key);
        self.out.push_str(" = ");
        self.out.push_str(&C::write(value));
        self.out.push('\n');
    }

    /// Writes the keys of a [`Compound`] where they stand in its table.
    pub fn compound<C: Compound>(&mut self, value: &C) {
        value.to_keys().render_into(self);
    }

    /// Writes a sub-table: a blank line, its doc as a comment, `[name]`, its keys.
    pub fn section<S: Section>(&mut self, name: &str, doc: &[&str], value: &S) {
        let inner = format!("{}{name}.", self.prefix);
        let outer = std::mem::replace(&mut self.prefix, inner);
        self.out.push('\n');
        self.comment(doc);
        self.out.push('\n');
        self.out.push('[');
        self.out.push_str(self.prefix.trim_end_matches('.'));
        self.out.push_str("]\n");
        value.render_into(self);
        self.prefix = outer;
    }

    pub(crate) fn finish(self) -> String {
        self.out
    }

    /// Doc lines as `# ` comment lines, the last left open for a suffix.
    fn comment(&mut self, doc: &[&str]) {
        for (i, line) in doc.iter().enumerate() {
            if i > 0 {
                self.out.push('\n');
            }
            let line = line.strip_prefix(' ').unwrap_or(line);
            self.out.push('#');
            if !line.is_empty() {
                self.out.push(' ');
                self.out.push_str(line);
            }
        }
    }
}
