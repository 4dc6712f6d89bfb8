//! What is wrong and where: [`Problem`] (one, at a line and column) and
//! [`ConfigError`] (why a whole file cannot be used).

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in a configuration file, at the line and column it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
    /// Dotted key, e.g. `policy.accept_timeout` or `alert_command[1]`; empty for a TOML syntax error.
    pub key: String,
    /// What is wrong and what to write instead.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.reason)
    }
}

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file has problems; every one found is listed, in file order.
    #[error("{}", Lines { path, problems })]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem, each at its line and column.
        problems: Vec<Problem>,
    },
}

/// Shows each problem on its own line as `file:line:column: key: reason`,
/// the form editors and terminals turn into links.
struct Lines<'a> {
    path: &'a Path,
    problems: &'a [Problem],
}

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}:{p}", self.path.display())?;
        }
        Ok(())
    }
}

// === Sink: problems as byte offsets until the text turns them into lines ===

/// A problem found while reading, placed by byte offset into the text.
#[derive(Debug)]
pub(crate) struct Found {
    pub(crate) at: usize,
    pub(crate) key: String,
    pub(crate) reason: String,
}

/// Every problem found in one file, in the order they were found.
#[derive(Debug, Default)]
pub(crate) struct Sink {
    found: Vec<Found>,
}

impl Sink {
    pub(crate) fn push(&mut self, at: usize, key: String, reason: String) {
        self.found.push(Found { at, key, reason });
    }

    pub(crate) fn len(&self) -> usize {
        self.found.len()
    }

    /// The problems in file order, each with its line and column in `text`.
    pub(crate) fn into_problems(self, text: &str) -> Vec<Problem> {
        let mut found = self.found;
        found.sort_by_key(|f| f.at);
        found
            .into_iter()
            .map(|f| {
                let (line, column) = line_column(text, f.at);
                Problem {
                    line,
                    column,
                    key: f.key,
                    reason: f.reason,
                }
            })
            .collect()
    }
}

/// Line and column (both from 1, the column in characters) of byte `offset`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    // An offset inside a character (never from the parser, but input is
    // untrusted) counts from the start of that character.
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}
