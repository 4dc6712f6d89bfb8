//! The attempt's secret, `MUSTER_TASK_TOKEN`: what lets an agent report on its
//! own attempt, and only on it, over the local socket.
//!
//! The token is derived, not stored: HMAC-SHA256 of (task, generation) under a
//! per-sidecar random key kept in `<data_dir>/task-token.key` (32 bytes, mode
//! 0600, created once). Derivation was chosen over a column in the redb queue
//! because it needs no schema change and no write on the assignment path, and
//! it survives a sidecar restart by construction: a run that outlives its
//! sidecar still holds a token the restarted sidecar recomputes, and a wake
//! agent started by one sidecar process can report to the next. Removing the
//! key file invalidates every outstanding token (the runs' reports are then
//! refused), which is the intended way to rotate it.
//!
//! The token keeps one agent of this sidecar from acting for another
//! attempt (a confused or hostile agent that sets `MUSTER_TASK_ID` to another
//! task). It cannot protect against an agent running as the sidecar's own user,
//! which can read the key file as it can read the private key.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use muster_protocol::{Generation, TaskId};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// File name of the key under the state directory.
pub const KEY_FILE: &str = "task-token.key";
/// Bytes of key material, and of each token before it is hex-encoded.
pub const KEY_BYTES: usize = 32;
/// Length of a token as the agent sees it (hex).
pub const TOKEN_CHARS: usize = KEY_BYTES * 2;
/// Domain separation, so this key's MACs can never be mistaken for another use.
const CONTEXT: &[u8] = b"muster task token v1\0";

/// The per-sidecar key that derives every attempt's token.
pub struct TokenKey(hmac::Key);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// Reads `<data_dir>/task-token.key`, creating it (0600) on first use. Blocking.
    ///
    /// # Errors
    /// A sentence naming the file and the fix: unsafe permissions, wrong size,
    /// or an IO error.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, String> {
        let path = data_dir.join(KEY_FILE);
        match File::open(&path) {
            Ok(file) => return read_key(file, &path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
        let mut bytes = [0u8; KEY_BYTES];
        SystemRandom::new().fill(&mut bytes).map_err(|_| {
            "the system random source failed; cannot make the task token key".to_string()
        })?;
        match create_key_file(data_dir, &path, &bytes) {
            Ok(()) => Ok(Self::from_bytes(&bytes)),
            // Another process made it first: use theirs, so both agree.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                read_key(file, &path)
            }
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// A key from raw bytes (tests, and [`Self::load_or_create`]).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// The token of one attempt: 32 bytes, hex.
    pub fn token(&self, task: TaskId, generation: Generation) -> String {
        let mut msg = Vec::with_capacity(CONTEXT.len() + 16);
        msg.extend_from_slice(CONTEXT);
        msg.extend_from_slice(&task.0.to_be_bytes());
        msg.extend_from_slice(&generation.0.to_be_bytes());
        let tag = hmac::sign(&self.0, &msg);
        let mut hex = String::with_capacity(TOKEN_CHARS);
        for b in tag.as_ref() {
            hex.push_str(&format!("{b:02x}"));
        }
        hex
    }

    /// Whether `presented` is the token of (task, generation), compared in
    /// constant time so the answer's timing tells nothing about the token.
    pub fn verify(&self, task: TaskId, generation: Generation, presented: &str) -> bool {
        constant_time_eq(
            self.token(task, generation).as_bytes(),
            presented.as_bytes(),
        )
    }
}

/// Equality whose time depends only on the lengths (which are public: every
/// token is [`TOKEN_CHARS`] long), never on where the bytes first differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

fn read_key(file: File, path: &Path) -> Result<TokenKey, String> {
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    crate::keystore::check_metadata(path, &meta).map_err(|e| e.to_string())?;
    let mut bytes = Vec::with_capacity(KEY_BYTES);
    file.take(KEY_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() != KEY_BYTES {
        return Err(format!(
            "{}: holds {} bytes, not the {KEY_BYTES} of a task token key; remove it and restart the sidecar (a new key is made; agents already running can then no longer report)",
            path.display(),
            bytes.len()
        ));
    }
    Ok(TokenKey::from_bytes(&bytes))
}

/// Writes the key under a temporary name, syncs it and links it into place, so
/// a crash never leaves half a key and an existing key is never replaced.
fn create_key_file(data_dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = data_dir.join(format!(".{KEY_FILE}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::hard_link(&tmp, path)?;
        File::open(data_dir)?.sync_all()
    })();
    let _ = fs::remove_file(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn tokens_are_per_attempt_and_verify_only_their_own() {
        let key = TokenKey::from_bytes(&[7; KEY_BYTES]);
        let t = key.token(TaskId(12), Generation(3));
        assert_eq!(t.len(), TOKEN_CHARS);
        assert!(t.chars().all(|c| c.is_ascii_hexdigit()));
        assert!(key.verify(TaskId(12), Generation(3), &t));
        assert!(!key.verify(TaskId(13), Generation(3), &t), "another task");
        assert!(
            !key.verify(TaskId(12), Generation(2), &t),
            "another generation"
        );
        assert!(!key.verify(TaskId(12), Generation(3), ""));
        assert!(!key.verify(TaskId(12), Generation(3), &t[..TOKEN_CHARS - 1]));
        let other = TokenKey::from_bytes(&[8; KEY_BYTES]);
        assert!(
            !other.verify(TaskId(12), Generation(3), &t),
            "another sidecar"
        );
    }

    #[test]
    fn the_key_is_made_once_0600_and_survives_a_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = TokenKey::load_or_create(dir.path()).expect("create");
        let path = dir.path().join(KEY_FILE);
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = TokenKey::load_or_create(dir.path()).expect("reload");
        let t = a.token(TaskId(1), Generation(1));
        assert!(
            b.verify(TaskId(1), Generation(1), &t),
            "same key after a restart"
        );
        assert_eq!(
            fs::read_dir(dir.path()).expect("ls").count(),
            1,
            "no temp file left"
        );

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = TokenKey::load_or_create(dir.path()).expect_err("unsafe mode");
        assert!(err.contains("chmod 600"), "{err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        fs::write(&path, b"short").expect("write");
        let err = TokenKey::load_or_create(dir.path()).expect_err("wrong size");
        assert!(err.contains("remove it and restart"), "{err}");
    }
}
