//! The config toolkit both daemons use: each key is declared once and the
//! rest follows from that declaration.
//!
//! ```text
//!  config! { struct … { /// doc   key: Type [as Codec] = default, … } }
//!      │ generates
//!      ├─ the struct, its Default (or a constructor taking the required keys)
//!      └─ impl Section: keys(), read_from(Reader), render_into(Writer)
//!
//!  text ─▶ parse::<T>() ─▶ toml DeTable (spans) ─▶ Reader ─▶ Codec::read per key ─▶ T
//!                                   │                 └─ leftovers: unknown keys (+ nearest known)
//!                                   └─ every problem, sorted, each at line:column ─▶ Err(Vec<Problem>)
//!  T ─▶ render() ─▶ Writer ─▶ `# doc Default: x.` / `key = value` lines, `[table]` headers
//! ```
//!
//! Parts: [`config!`] and [`words!`] (the declarations), [`codec`] (how one
//! value is read and written), [`Section`], [`Reader`], [`Writer`],
//! [`Compound`] and [`Checks`] (tables, settings made of several keys, checks
//! across keys), [`Problem`] and [`ConfigError`] (what went wrong, where).
//!
//! No runtime and no IO: the daemons read their files and hand the text here,
//! so the hub's decision core can declare its `[policy]` and `[limits]`
//! sections with the same macro.

pub mod codec;
mod macros;
mod problem;
mod section;

use std::path::Path;

pub use codec::{
    Argv, AtLeast, Between, Codec, Command, HostPort, HostPortOrEmpty, HostPorts, Node, Refused,
    ValueError,
};
pub use problem::{ConfigError, Problem};
pub use section::{Checks, Compound, KeyProblem, Reader, Section, Writer};

use problem::{Sink, line_column};

/// Parses a whole file as the top-level section `T`.
///
/// # Errors
/// Every problem in the file, in file order, each at its line and column:
/// unknown keys (with the nearest known one), missing required keys, wrong
/// types, bad values, and checks across keys. A file that is not valid TOML
/// gives its syntax errors instead (one per line): a document recovered from
/// broken syntax can put keys in the wrong table, so its other problems could
/// be false.
pub fn parse<T: Section>(text: &str) -> Result<T, Vec<Problem>> {
    let (doc, errors) = toml::de::DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        return Err(syntax_problems(text, &errors));
    }
    let mut sink = Sink::default();
    let mut reader = Reader::new(doc.into_inner(), &mut sink);
    let value = T::read_from(&mut reader);
    reader.finish(&T::keys());
    match value {
        Some(value) if sink.len() == 0 => Ok(value),
        _ => Err(sink.into_problems(text)),
    }
}

/// As [`parse`], with `path` named in the error.
///
/// # Errors
/// [`ConfigError::Invalid`] with every problem.
pub fn parse_file<T: Section>(path: &Path, text: &str) -> Result<T, ConfigError> {
    parse(text).map_err(|problems| ConfigError::Invalid {
        path: path.to_owned(),
        problems,
    })
}

/// Parses the file at `path` whose reading gave `read`: the caller does the
/// IO (`std::fs::read_to_string(path)`), so this crate never touches a file.
///
/// # Errors
/// [`ConfigError::Io`] if reading failed, otherwise as [`parse_file`].
pub fn load<T: Section>(path: &Path, read: std::io::Result<String>) -> Result<T, ConfigError> {
    let text = read.map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_file(path, &text)
}

/// The whole file for `value`: `header` (comment lines, each ending in a
/// newline), then every key with a comment saying what it is for and its
/// default. `parse(render(v)) == v`.
pub fn render<T: Section>(value: &T, header: &str) -> String {
    let mut w = Writer::default();
    w.raw(header);
    w.raw("\n");
    value.render_into(&mut w);
    w.finish()
}

/// The known word closest to `word`, if close enough to be a typo of it.
pub fn nearest<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    let len = word.chars().count();
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(word, k), *k))
        .filter(|(d, _)| *d <= 2.max(len / 4) && *d < len)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// TOML syntax errors as problems, the first on each line: the parser's later
/// errors on a line are mostly echoes of its first.
fn syntax_problems(text: &str, errors: &[toml::de::Error]) -> Vec<Problem> {
    let mut problems: Vec<Problem> = errors
        .iter()
        .map(|e| {
            let (line, column) = line_column(text, e.span().map_or(0, |s| s.start));
            Problem {
                line,
                column,
                key: String::new(),
                reason: format!("TOML syntax error: {}", e.message().trim_end()),
            }
        })
        .collect();
    problems.sort_by_key(|p| (p.line, p.column));
    problems.dedup_by_key(|p| p.line);
    problems
}

#[cfg(test)]
mod tests;
