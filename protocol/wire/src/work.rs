//! Code work: the repository, base, environment and labels a task may carry,
//! the workspace a sidecar offers, and what an attempt left in its workspace.
//!
//! The checks here are the one definition of a valid value; the CLI runs them
//! before sending, the hub at admission, and the sidecar again before any of
//! it reaches `git` or an agent's environment, because each treats the other
//! as untrusted.

use serde::{Deserialize, Serialize};

/// Longest repository (URL or path).
pub const REPO_BYTES_MAX: usize = 1024;
/// Longest base ref.
pub const BASE_BYTES_MAX: usize = 255;
/// Most `--env` entries on one task.
pub const ENV_MAX: usize = 32;
/// Longest environment variable name.
pub const ENV_NAME_BYTES_MAX: usize = 128;
/// Longest environment value.
pub const ENV_VALUE_BYTES_MAX: usize = 4096;
/// Most labels on one task.
pub const LABELS_MAX: usize = 16;
/// Longest label key.
pub const LABEL_KEY_BYTES_MAX: usize = 64;
/// Longest label value.
pub const LABEL_VALUE_BYTES_MAX: usize = 128;
/// Longest `git diff --stat` kept for an attempt.
pub const DIFFSTAT_BYTES_MAX: usize = 4096;
/// Longest link (e.g. a pull request URL) kept for an attempt.
pub const LINK_BYTES_MAX: usize = 2048;

/// Environment names a task may not set: the sidecar's own hand-off to the
/// agent, and variables that change what the loader or shell runs.
const ENV_RESERVED: [&str; 7] = ["PATH", "HOME", "IFS", "ENV", "BASH_ENV", "SHELLOPTS", "PS4"];
/// Prefixes of names a task may not set, for the same reason.
const ENV_RESERVED_PREFIXES: [&str; 4] = ["MUSTER_", "LD_", "DYLD_", "GIT_"];

/// What workspaces a sidecar gives its runs (`[workspace] mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceMode {
    /// Every run shares the agent's working directory.
    #[default]
    Shared,
    /// A fresh empty directory per attempt.
    Dir,
    /// A git worktree per attempt on branch `muster/<task>`.
    Git,
}

impl WorkspaceMode {
    /// The stable name used in config, JSON and listings.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkspaceMode::Shared => "shared",
            WorkspaceMode::Dir => "dir",
            WorkspaceMode::Git => "git",
        }
    }

    /// Whether a sidecar in this mode can run a task that names a repository.
    pub fn serves_repos(self) -> bool {
        self == WorkspaceMode::Git
    }
}

/// What an attempt left in its workspace, recorded when it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkResult {
    /// The branch the attempt worked on (`muster/<task>`).
    pub branch: String,
    /// The commit the branch started from.
    pub base_commit: String,
    /// The branch's head commit when the attempt ended.
    pub head: String,
    /// Commits on the branch since `base_commit`.
    pub commits: u32,
    /// `git diff --stat` from base to head, at most [`DIFFSTAT_BYTES_MAX`].
    pub diffstat: String,
    /// The tree had uncommitted changes when the attempt ended.
    pub dirty: bool,
    /// The ref that keeps the attempt's work, uncommitted changes included.
    pub checkpoint: Option<String>,
    /// A link the agent gave (`task complete --link`), e.g. a pull request.
    pub link: Option<String>,
}

impl WorkResult {
    /// Cuts every field to its bound, for a result read from a peer.
    pub fn bounded(mut self) -> Self {
        use crate::limits::truncate_utf8;
        self.branch = truncate_utf8(self.branch, BASE_BYTES_MAX);
        self.base_commit = truncate_utf8(self.base_commit, 64);
        self.head = truncate_utf8(self.head, 64);
        self.diffstat = truncate_utf8(self.diffstat, DIFFSTAT_BYTES_MAX);
        self.checkpoint = self.checkpoint.map(|c| truncate_utf8(c, BASE_BYTES_MAX));
        self.link = self.link.map(|l| truncate_utf8(l, LINK_BYTES_MAX));
        self
    }
}

/// Checks a repository: a URL or an absolute path on the agent hosts.
///
/// # Errors
/// A sentence naming what is wrong with it.
pub fn check_repo(repo: &str) -> Result<(), String> {
    if repo.is_empty() || repo.len() > REPO_BYTES_MAX {
        return Err(format!(
            "--repo must be 1 to {REPO_BYTES_MAX} bytes (a git URL or an absolute path on the agent hosts)"
        ));
    }
    if repo.starts_with('-') {
        return Err(format!(
            "--repo {repo:?} starts with '-'; give a git URL or an absolute path"
        ));
    }
    if repo.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(
            "--repo holds whitespace or a control character; give a git URL or an absolute path"
                .into(),
        );
    }
    // `ext::` runs a command on the agent host; git refuses it by default, and so do we.
    if repo.starts_with("ext::") || repo.starts_with("fd::") {
        return Err(format!(
            "--repo {repo:?}: the ext:: and fd:: transports are not allowed"
        ));
    }
    Ok(())
}

/// Checks a base ref (a branch, tag or commit).
///
/// # Errors
/// A sentence naming what is wrong with it.
pub fn check_base(base: &str) -> Result<(), String> {
    let bad = base.is_empty()
        || base.len() > BASE_BYTES_MAX
        || base.starts_with('-')
        || base.starts_with('/')
        || base.ends_with('/')
        || base.ends_with('.')
        || base.ends_with(".lock")
        || base.contains("..")
        || base.contains("@{")
        || base.contains("//")
        || base
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c));
    if bad {
        return Err(format!(
            "--base {base:?} is not a valid git ref; give a branch, tag or commit such as main or v1.2 (at most {BASE_BYTES_MAX} bytes)"
        ));
    }
    Ok(())
}

/// Checks the `--env` entries of a task.
///
/// # Errors
/// A sentence naming the entry and what is wrong with it.
pub fn check_env(env: &[(String, String)]) -> Result<(), String> {
    if env.len() > ENV_MAX {
        return Err(format!("{} --env entries; at most {ENV_MAX}", env.len()));
    }
    for (i, (name, value)) in env.iter().enumerate() {
        let valid = !name.is_empty()
            && name.len() <= ENV_NAME_BYTES_MAX
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit();
        if !valid {
            return Err(format!(
                "--env {name:?}: a name is 1 to {ENV_NAME_BYTES_MAX} of A-Z a-z 0-9 _, not starting with a digit"
            ));
        }
        let upper = name.to_ascii_uppercase();
        if ENV_RESERVED.contains(&upper.as_str())
            || ENV_RESERVED_PREFIXES.iter().any(|p| upper.starts_with(p))
        {
            return Err(format!(
                "--env {name}: reserved (the sidecar sets MUSTER_*; PATH, HOME, LD_*, GIT_* and shell start-up variables belong to the host)"
            ));
        }
        if value.len() > ENV_VALUE_BYTES_MAX || value.contains('\0') {
            return Err(format!(
                "--env {name}: the value must be at most {ENV_VALUE_BYTES_MAX} bytes without NUL"
            ));
        }
        if env[..i].iter().any(|(n, _)| n == name) {
            return Err(format!("--env {name} is given twice"));
        }
    }
    Ok(())
}

/// Checks a label key or the key of a label filter.
///
/// # Errors
/// A sentence naming the key and what is wrong with it.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let valid = !key.is_empty()
        && key.len() <= LABEL_KEY_BYTES_MAX
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "label {key:?}: a key is 1 to {LABEL_KEY_BYTES_MAX} of A-Z a-z 0-9 . _ - /"
        ))
    }
}

/// Checks the labels of a task.
///
/// # Errors
/// A sentence naming the label and what is wrong with it.
pub fn check_labels(labels: &[(String, String)]) -> Result<(), String> {
    if labels.len() > LABELS_MAX {
        return Err(format!("{} labels; at most {LABELS_MAX}", labels.len()));
    }
    for (i, (key, value)) in labels.iter().enumerate() {
        check_label_key(key)?;
        if value.len() > LABEL_VALUE_BYTES_MAX || value.chars().any(char::is_control) {
            return Err(format!(
                "label {key}: the value must be at most {LABEL_VALUE_BYTES_MAX} bytes without control characters"
            ));
        }
        if labels[..i].iter().any(|(k, _)| k == key) {
            return Err(format!("label {key} is given twice"));
        }
    }
    Ok(())
}

/// Splits `K=V` as given on a command line.
///
/// # Errors
/// A sentence naming the flag when there is no `=`.
pub fn split_pair(flag: &str, text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => Err(format!("{flag} {text:?}: expected KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn repos_that_could_inject_options_or_commands_are_refused() {
        assert!(check_repo("https://example.com/x.git").is_ok());
        assert!(check_repo("/srv/repos/app").is_ok());
        assert!(check_repo("git@github.com:org/app.git").is_ok());
        for bad in [
            "",
            "--upload-pack=touch /tmp/x",
            "ext::sh -c x",
            "a b",
            "x\ny",
        ] {
            assert!(check_repo(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn base_refs_follow_git_rules() {
        for ok in ["main", "release/1.2", "v1.0", "0a1b2c3d"] {
            assert!(check_base(ok).is_ok(), "{ok:?} refused");
        }
        for bad in [
            "", "-x", "a..b", "a b", "x.lock", "ref~1", "a:b", "/x", "x/", "@{-1}",
        ] {
            assert!(check_base(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn env_names_are_checked_and_reserved_ones_refused() {
        assert!(check_env(&pairs(&[("RUST_LOG", "debug"), ("X1", "")])).is_ok());
        for bad in [
            "1X",
            "A-B",
            "",
            "PATH",
            "LD_PRELOAD",
            "muster_task",
            "GIT_DIR",
        ] {
            let e = check_env(&pairs(&[(bad, "v")])).expect_err("refused");
            assert!(e.contains("--env"), "{e}");
        }
        assert!(check_env(&pairs(&[("A", "1"), ("A", "2")])).is_err());
        let many: Vec<_> = (0..=ENV_MAX)
            .map(|i| (format!("V{i}"), String::new()))
            .collect();
        assert!(check_env(&many).is_err());
        assert!(check_env(&pairs(&[("A", &"x".repeat(ENV_VALUE_BYTES_MAX + 1))])).is_err());
    }

    #[test]
    fn labels_are_bounded_and_unique() {
        assert!(check_labels(&pairs(&[("team", "infra"), ("jira/id", "ABC-1")])).is_ok());
        assert!(check_labels(&pairs(&[("a b", "x")])).is_err());
        assert!(check_labels(&pairs(&[("k", "v"), ("k", "w")])).is_err());
        assert!(check_labels(&pairs(&[("k", "line\nbreak")])).is_err());
        assert_eq!(
            split_pair("--label", "a=b=c").expect("split"),
            ("a".into(), "b=c".into())
        );
        assert!(split_pair("--label", "ab").is_err());
    }
}
