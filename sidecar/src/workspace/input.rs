//! Checks of what a task gives the workspace layer (its repo and base)
//! before any of it reaches a git command line.

use super::WorkspaceError;

/// Longest repository text accepted.
const REPO_BYTES_MAX: usize = 4096;
/// Longest base accepted (git's own limit on a ref name's component is 255).
const BASE_BYTES_MAX: usize = 255;

/// A repository must be a URL, `host:path`, or an absolute path, and must
/// not be read as an option or a remote helper (`ext::…`).
pub(super) fn check_repo(repo: &str) -> Result<(), WorkspaceError> {
    let bad = |reason: &str| {
        Err(WorkspaceError::BadRepo {
            repo: repo.into(),
            reason: reason.into(),
        })
    };
    if repo.is_empty() {
        return bad("is empty; give a URL or an absolute path");
    }
    if repo.len() > REPO_BYTES_MAX {
        return bad("is longer than 4096 bytes");
    }
    if repo.starts_with('-') {
        return bad("starts with '-', which git would read as an option");
    }
    if repo.chars().any(char::is_control) {
        return bad("contains control characters");
    }
    if repo.contains("::") {
        return bad(
            "uses a remote helper (\"<helper>::\"), which is not allowed; give a URL or an absolute path",
        );
    }
    let url = repo.contains("://");
    let scp = repo
        .find(':')
        .is_some_and(|c| !repo[..c].contains('/') && c > 0);
    if !url && !scp && !repo.starts_with('/') {
        return bad(
            "is a relative path; give a URL (https://, ssh://, file://) or an absolute path",
        );
    }
    Ok(())
}

/// A base must be usable as a ref name or commit id and not read as an option.
pub(super) fn check_base(repo: &str, base: &str) -> Result<(), WorkspaceError> {
    let bad = |reason: &str| {
        Err(WorkspaceError::BadBase {
            repo: repo.into(),
            base: base.into(),
            reason: reason.into(),
        })
    };
    if base.is_empty() {
        return bad("is empty; give a branch, tag or commit, or none for the default branch");
    }
    if base.len() > BASE_BYTES_MAX {
        return bad("is longer than 255 bytes");
    }
    if base.starts_with('-') {
        return bad("starts with '-', which git would read as an option");
    }
    if base
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c))
        || base.contains("..")
        || base.contains("@{")
        || base.ends_with('/')
        || base.ends_with(".lock")
    {
        return bad("is not a valid branch, tag or commit name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repos() {
        for ok in [
            "https://github.com/acme/widgets.git",
            "ssh://git@host:22/x.git",
            "git@github.com:acme/widgets.git",
            "file:///srv/git/x",
            "/srv/git/x",
        ] {
            assert!(check_repo(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "x",
            "./x",
            "-u",
            "ext::sh -c x",
            "fd::3",
            "a\nb",
            "/x\u{7}",
        ] {
            assert!(check_repo(bad).is_err(), "{bad}");
        }
        assert!(check_repo(&format!("/{}", "x".repeat(5000))).is_err());
    }

    #[test]
    fn bases() {
        for ok in [
            "main",
            "release/1.2",
            "refs/heads/main",
            "v1.0",
            "0123abcd",
            "origin/main",
        ] {
            assert!(check_base("r", ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "-x", "a b", "a..b", "a~1", "a^", "x:y", "x@{1}", "x/", "x.lock", "*",
        ] {
            assert!(check_base("r", bad).is_err(), "{bad}");
        }
    }
}
