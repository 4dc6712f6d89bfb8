//! The files of the workspace layer, all blocking: each attempt's record
//! beside its tree, the `copy` entries, and disk use.
//!
//! ```text
//! <root>/
//!   17-3/          the tree of task 17, generation 3 (a git worktree or a plain directory)
//!   17-3.json      its Record: written before the tree exists, finished_at_ms set by finish
//!   .17-3.json.tmp a record being replaced (renamed over 17-3.json)
//! ```
//!
//! The record is written before the tree is made, so the sweep never meets
//! a tree of a running attempt without one (it takes a tree without a record
//! for the leftover of a crash, finished when it was last modified).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use muster_protocol::{Generation, TaskId};

use super::{WorkspaceInfo, WorkspaceKind, WorkspaceState};
use serde::{Deserialize, Serialize};

/// What is known about one attempt's workspace, kept in `<root>/<task>-<generation>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Record {
    pub(super) task: u64,
    pub(super) generation: u64,
    pub(super) kind: WorkspaceKind,
    /// The repository as the task gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) repo: Option<String>,
    /// The bare mirror the worktree belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) mirror: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) base: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) base_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) base_commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) continued_from: Option<String>,
    pub(super) prepared_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) finished_at_ms: Option<u64>,
    /// The branch's head when the attempt finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) head: Option<String>,
    /// The checkpoint commit taken when the attempt finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) checkpoint: Option<String>,
    /// Why preparing it failed, when it did (the tree is kept for a look until the sweep).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) failed: Option<String>,
}

/// `<task>-<generation>`, the name of an attempt's tree and record.
pub(super) fn attempt_name(task: TaskId, generation: Generation) -> String {
    format!("{task}-{generation}")
}

/// The task and generation in an attempt's name.
pub(super) fn parse_attempt(name: &str) -> Option<(u64, u64)> {
    let (t, g) = name.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(t) || !digits(g) {
        return None;
    }
    Some((t.parse().ok()?, g.parse().ok()?))
}

/// The record's path for the tree at `dir`.
pub(super) fn record_path(dir: &Path) -> PathBuf {
    dir.with_extension("json")
}

/// Reads a record; `None` if there is none or it cannot be read.
pub(super) fn read_record(path: &Path) -> Option<Record> {
    let text = fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Writes a record whole: to a temporary file, then renamed over the old one.
pub(super) fn write_record(path: &Path, record: &Record) -> io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let text = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    fs::write(&tmp, text)?;
    fs::rename(&tmp, path)
}

/// Removes a file or tree that may already be gone. Directories the agent
/// made read-only are made writable first, so that they can be emptied.
pub(super) fn remove_all(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(m) => m,
    };
    if !meta.is_dir() {
        return fs::remove_file(path);
    }
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_writable(path);
            fs::remove_dir_all(path)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Gives the owner write and search permission on every directory under `root`.
fn make_writable(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(meta) = fs::symlink_metadata(&dir)
            && meta.is_dir()
        {
            let mut perm = meta.permissions();
            perm.set_mode(perm.mode() | 0o700);
            let _ = fs::set_permissions(&dir, perm);
            if let Ok(entries) = fs::read_dir(&dir) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
}

/// Disk used by everything under `root`: allocated blocks, symbolic links not
/// followed. A file hard-linked twice counts twice. Iterative, so a deep tree
/// cannot exhaust the stack.
pub(super) fn disk_bytes(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        total = total.saturating_add(meta.blocks().saturating_mul(512));
        if meta.is_dir()
            && let Ok(entries) = fs::read_dir(&path)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    total
}

/// Every workspace under `root`, by its record and tree. Blocking.
pub(super) fn scan(root: &Path) -> Vec<WorkspaceInfo> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".json").unwrap_or(&name);
            parse_attempt(stem).map(|_| stem.to_string())
        })
        .collect();
    names.sort();
    names.dedup();
    let mut out: Vec<WorkspaceInfo> = names
        .into_iter()
        .filter_map(|name| {
            let (task, generation) = parse_attempt(&name)?;
            let dir = root.join(&name);
            let record = read_record(&record_path(&dir));
            let meta = std::fs::symlink_metadata(&dir).ok();
            let bytes = if meta.is_some() { disk_bytes(&dir) } else { 0 };
            let (state, finished_at_ms) = match &record {
                Some(r) if r.finished_at_ms.is_none() => (WorkspaceState::Running, None),
                Some(r) => (WorkspaceState::Finished, r.finished_at_ms),
                None => {
                    let modified = meta
                        .and_then(|m| m.modified().ok())
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                    (WorkspaceState::Finished, Some(modified))
                }
            };
            Some(WorkspaceInfo {
                task: TaskId(task),
                generation: Generation(generation),
                dir,
                kind: record.as_ref().map_or(WorkspaceKind::Dir, |r| r.kind),
                repo: record.as_ref().and_then(|r| r.repo.clone()),
                branch: record.as_ref().and_then(|r| r.branch.clone()),
                state,
                finished_at_ms,
                bytes,
            })
        })
        .collect();
    out.sort_by_key(|w| (w.task, w.generation));
    out
}

/// Why a `copy` entry could not be copied.
#[derive(Debug)]
pub(super) enum CopyError {
    /// The source does not exist.
    Missing(PathBuf),
    /// Reading or writing failed at `path`.
    Io(PathBuf, io::Error),
}

/// Copies `template/rel` to `dest/rel`: a file, or a directory merged into
/// what is there. The entry itself may be a symbolic link (followed, so a
/// template can point at a secret kept elsewhere); links inside a copied
/// directory are copied as links.
pub(super) fn copy_entry(template: &Path, rel: &Path, dest: &Path) -> Result<(), CopyError> {
    let src = template.join(rel);
    let to = dest.join(rel);
    let meta = match fs::metadata(&src) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(CopyError::Missing(src)),
        Err(e) => return Err(CopyError::Io(src, e)),
        Ok(m) => m,
    };
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).map_err(|e| CopyError::Io(parent.to_owned(), e))?;
    }
    if !meta.is_dir() {
        return copy_file(&src, &to);
    }
    let mut stack = vec![(src, to)];
    while let Some((from, to)) = stack.pop() {
        fs::create_dir_all(&to).map_err(|e| CopyError::Io(to.clone(), e))?;
        let entries = fs::read_dir(&from).map_err(|e| CopyError::Io(from.clone(), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| CopyError::Io(from.clone(), e))?;
            let (f, t) = (entry.path(), to.join(entry.file_name()));
            let kind = entry.file_type().map_err(|e| CopyError::Io(f.clone(), e))?;
            if kind.is_dir() {
                stack.push((f, t));
            } else if kind.is_symlink() {
                let target = fs::read_link(&f).map_err(|e| CopyError::Io(f.clone(), e))?;
                let _ = fs::remove_file(&t);
                std::os::unix::fs::symlink(&target, &t).map_err(|e| CopyError::Io(t, e))?;
            } else {
                copy_file(&f, &t)?;
            }
        }
    }
    Ok(())
}

/// One file, with its permissions; a link or file already at `to` is replaced.
fn copy_file(from: &Path, to: &Path) -> Result<(), CopyError> {
    if fs::symlink_metadata(to).is_ok_and(|m| m.file_type().is_symlink()) {
        let _ = fs::remove_file(to);
    }
    fs::copy(from, to)
        .map(drop)
        .map_err(|e| CopyError::Io(to.to_owned(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_names() {
        assert_eq!(attempt_name(TaskId(17), Generation(3)), "17-3".to_string());
        assert_eq!(parse_attempt("17-3"), Some((17, 3)));
        for bad in ["17", "17-", "-3", "a-3", "17-3.json", "17-3-1", ".17-3"] {
            assert_eq!(parse_attempt(bad), None, "{bad}");
        }
        assert_eq!(
            record_path(Path::new("/w/17-3")),
            PathBuf::from("/w/17-3.json")
        );
    }

    #[test]
    fn records_round_trip_and_removal_handles_read_only_trees() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let r = Record {
            task: 1,
            generation: 2,
            kind: WorkspaceKind::Git,
            repo: Some("/r".into()),
            mirror: None,
            branch: Some("muster/1".into()),
            base: None,
            base_ref: None,
            base_commit: None,
            continued_from: None,
            prepared_at_ms: 5,
            finished_at_ms: None,
            head: None,
            checkpoint: None,
            failed: None,
        };
        let path = tmp.path().join("1-2.json");
        write_record(&path, &r).expect("write");
        assert_eq!(read_record(&path), Some(r));
        let locked = tmp.path().join("t/a/b");
        fs::create_dir_all(&locked).expect("mkdir");
        fs::write(locked.join("f"), "x").expect("write");
        fs::set_permissions(tmp.path().join("t/a"), fs::Permissions::from_mode(0o500))
            .expect("chmod");
        assert!(disk_bytes(&tmp.path().join("t")) > 0);
        remove_all(&tmp.path().join("t")).expect("removed");
        assert!(!tmp.path().join("t").exists());
        remove_all(&tmp.path().join("t")).expect("absent is fine");
    }
}
