//! Typed identities, so a task id can never be passed where a generation is expected.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::limits::NAME_BYTES_MAX;

/// A task, numbered by the hub in submission order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub u64);

/// One assignment of a task; the fence that makes late reports harmless.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

/// A sidecar's report number; the hub acknowledges reports cumulatively by it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct ReportId(pub u64);

/// Position in the hub's event log, used by `watch --from`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct EventSeq(pub u64);

/// An agent's (or operator's) enrolled name: 1 to 64 of `[A-Za-z0-9._-]`.
///
/// Deserializing checks it too, so a name from the network is as valid as one
/// from [`AgentName::new`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgentName(String);

impl TryFrom<String> for AgentName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        AgentName::new(s)
    }
}

impl From<AgentName> for String {
    fn from(n: AgentName) -> String {
        n.0
    }
}

/// Why a string is not a valid [`AgentName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name was empty.
    #[error("name is empty; use 1 to {NAME_BYTES_MAX} of A-Z a-z 0-9 . _ -")]
    Empty,
    /// The name was longer than the limit.
    #[error("name is {0} bytes long; the limit is {NAME_BYTES_MAX}")]
    TooLong(usize),
    /// The name held a character outside the allowed set.
    #[error("name contains {0:?}; use only A-Z a-z 0-9 . _ -")]
    BadChar(char),
}

impl AgentName {
    /// Validates and wraps a name.
    ///
    /// # Errors
    /// [`NameError`] when the name is empty, too long or has a character outside the set.
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > NAME_BYTES_MAX {
            return Err(NameError::TooLong(name.len()));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NameError::BadChar(c));
        }
        Ok(Self(name))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Maps keyed by name can be searched with a `&str` (derived `Hash`/`Eq` agree with `str`'s).
impl std::borrow::Borrow<str> for AgentName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! display_u64 {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    )*};
}
display_u64!(TaskId, Generation, ReportId, EventSeq);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(AgentName::new("build-01.a_b").is_ok());
        assert_eq!(AgentName::new(""), Err(NameError::Empty));
        assert_eq!(AgentName::new("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(AgentName::new("x".repeat(65)), Err(NameError::TooLong(65)));
    }

    #[test]
    fn decoded_names_are_validated() {
        let good = crate::encode(&"build-01".to_string()).expect("encode");
        assert_eq!(
            crate::decode::<AgentName>(&good)
                .expect("valid name")
                .as_str(),
            "build-01"
        );
        for bad in ["", "a/b", "a\nb", "\u{1b}[31m", "admin x"] {
            let bytes = crate::encode(&bad.to_string()).expect("encode");
            assert!(
                crate::decode::<AgentName>(&bytes).is_err(),
                "{bad:?} decoded as a name"
            );
        }
    }
}
