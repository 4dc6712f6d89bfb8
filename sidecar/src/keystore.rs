//! Where the sidecar's private key lives.
//!
//! [`load_key`] tries, in order (DESIGN.md, "Identity and security"):
//!
//! 1. a systemd credential, `$CREDENTIALS_DIRECTORY/sidecar-key`
//!    (`LoadCredentialEncrypted=`); systemd decrypts it at each start and makes
//!    it readable by the service only, so its mode is not checked here;
//! 2. the OS keychain, where one answers ([`OsKeychain`]);
//! 3. `<data_dir>/sidecar.key`, which must be a regular file owned by this user
//!    with no permission bits for group or others.
//!
//! [`store_key`] (used by `enroll`) writes to the keychain if one stores, else
//! creates the key file with mode 0600, never replacing an existing one.
//!
//! The calls block (file IO, keychain IPC): call them from `spawn_blocking` in
//! async code. The environment is read only by the thin wrappers
//! [`load_key`] and [`store_key`]; the `_from`/`_to` cores take it as arguments
//! so tests can feed it.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use keyring_core::{CredentialPersistence, Entry};

/// File name of the systemd credential under `$CREDENTIALS_DIRECTORY`.
pub const CREDENTIAL_NAME: &str = "sidecar-key";
/// File name of the key file under the state directory.
pub const KEY_FILE: &str = "sidecar.key";
/// Service name of the keychain entry.
pub const KEYCHAIN_SERVICE: &str = "muster-sidecar";
/// User (account) name of the keychain entry.
pub const KEYCHAIN_USER: &str = "sidecar-key";

/// Largest key file read; a PEM private key is a few hundred bytes, so
/// anything near this is not a key, and the bound keeps a wrong path (a log
/// file, a device) from being read into memory whole.
const KEY_BYTES_MAX: u64 = 64 * 1024;

/// Where a key was found or stored, for `doctor` and the startup log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A systemd credential at this path.
    SystemdCredential(PathBuf),
    /// The OS keychain.
    Keychain,
    /// A 0600 file at this path.
    File(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SystemdCredential(p) => write!(f, "systemd credential {}", p.display()),
            Self::Keychain => write!(
                f,
                "OS keychain (service {KEYCHAIN_SERVICE:?}, account {KEYCHAIN_USER:?})"
            ),
            Self::File(p) => write!(f, "key file {}", p.display()),
        }
    }
}

/// Why the private key could not be loaded or stored.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file grants permissions to group or others.
    #[error(
        "{}: key file has mode {mode:04o}, so group or others may read it; refusing it. Fix: chmod 600 {}",
        path.display(),
        path.display()
    )]
    UnsafePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file belongs to another user.
    #[error(
        "{}: key file is owned by uid {owner}, not by this process's uid {uid}; refusing it. Fix: chown the file to the service user",
        path.display()
    )]
    NotOwned {
        /// The key file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        uid: u32,
    },
    /// The key path exists but is not a regular file (a directory, a device, a FIFO).
    #[error("{}: not a regular file; the key must be a plain file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The key was found but does not look like a PEM private key.
    #[error(
        "{location}: does not hold a PEM private key (no \"PRIVATE KEY-----\" marker, or over 64 KiB)"
    )]
    NotAKey {
        /// Where it was read from.
        location: KeySource,
    },
    /// No store held a key.
    #[error(
        "no private key found; looked in: {}. Enroll first: muster-sidecar enroll --token …",
        looked.join("; ")
    )]
    Missing {
        /// Each place looked, in order, as a phrase.
        looked: Vec<String>,
    },
    /// Storing would replace an existing key file.
    #[error(
        "{}: a key file already exists; refusing to replace it. Move it away first if you mean to re-enroll",
        path.display()
    )]
    Exists {
        /// The existing key file.
        path: PathBuf,
    },
    /// A systemd credential provides the key, so a stored key would never be used.
    #[error(
        "{}: a systemd credential provides the key, so a new key stored elsewhere would be ignored; update the credential instead (systemd-creds encrypt)",
        path.display()
    )]
    ShadowedByCredential {
        /// The credential.
        path: PathBuf,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// A keychain holding one key; [`OsKeychain`] in production, a fake in tests.
///
/// Both calls answer "no keychain here" rather than failing where no store is
/// available, so the caller moves on to the next source.
pub trait Keychain {
    /// The stored key; `Ok(None)` if there is none or no keychain answers.
    ///
    /// # Errors
    /// A description of a keychain that answered but failed.
    fn get(&self) -> Result<Option<String>, String>;

    /// Stores the key; `Ok(false)` if no keychain answers, so the caller writes a file.
    ///
    /// # Errors
    /// A description of a keychain that answered but failed.
    fn set(&self, pem: &str) -> Result<bool, String>;
}

/// The OS keychain through keyring-core's default store.
///
/// Answers only when the process has set a default store that persists until
/// deleted (macOS Keychain, Windows Credential Manager, Secret Service). A store
/// that forgets on reboot or logout, such as the Linux kernel keyring, is
/// ignored: it must never be the only copy of the key. This build sets no
/// default store on Linux, so here the sidecar uses the credential or the file.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsKeychain;

impl OsKeychain {
    /// The entry, or `None` when no persistent store is set.
    fn entry(self) -> Result<Option<Entry>, String> {
        let Some(store) = keyring_core::get_default_store() else {
            return Ok(None);
        };
        if !matches!(store.persistence(), CredentialPersistence::UntilDelete) {
            return Ok(None);
        }
        match Entry::new(KEYCHAIN_SERVICE, KEYCHAIN_USER) {
            Ok(entry) => Ok(Some(entry)),
            Err(keyring_core::Error::NoDefaultStore) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl Keychain for OsKeychain {
    fn get(&self) -> Result<Option<String>, String> {
        let Some(entry) = self.entry()? else {
            return Ok(None);
        };
        match entry.get_password() {
            Ok(pem) => Ok(Some(pem)),
            Err(keyring_core::Error::NoEntry | keyring_core::Error::NoDefaultStore) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    fn set(&self, pem: &str) -> Result<bool, String> {
        let Some(entry) = self.entry()? else {
            return Ok(false);
        };
        match entry.set_password(pem) {
            Ok(()) => Ok(true),
            Err(keyring_core::Error::NoDefaultStore) => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Loads the private key (PEM) from the first source that has one.
///
/// # Errors
/// See [`load_key_from`].
pub fn load_key(data_dir: &Path) -> Result<(String, KeySource), KeyError> {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    load_key_from(data_dir, credentials.as_deref(), &OsKeychain)
}

/// [`load_key`] with the credentials directory and keychain given.
///
/// # Errors
/// [`KeyError::Missing`] naming every place looked; for a key file that exists,
/// [`KeyError::UnsafePermissions`], [`KeyError::NotOwned`], [`KeyError::NotAFile`];
/// [`KeyError::NotAKey`] for content that is not a PEM private key;
/// [`KeyError::Io`] when a present credential or file cannot be read.
pub fn load_key_from(
    data_dir: &Path,
    credentials_dir: Option<&Path>,
    keychain: &dyn Keychain,
) -> Result<(String, KeySource), KeyError> {
    let mut looked = Vec::new();

    match credentials_dir {
        Some(dir) => {
            let path = dir.join(CREDENTIAL_NAME);
            match File::open(&path) {
                Ok(file) => {
                    let source = KeySource::SystemdCredential(path.clone());
                    let pem = read_pem(file, &path, source.clone())?;
                    return Ok((pem, source));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    looked.push(format!("systemd credential {} (absent)", path.display()));
                }
                Err(source) => return Err(KeyError::Io { path, source }),
            }
        }
        None => looked.push(format!(
            "systemd credential $CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME} (CREDENTIALS_DIRECTORY not set)"
        )),
    }

    match keychain.get() {
        Ok(Some(pem)) => {
            if !looks_like_pem_key(&pem) {
                return Err(KeyError::NotAKey {
                    location: KeySource::Keychain,
                });
            }
            return Ok((pem, KeySource::Keychain));
        }
        Ok(None) => looked.push("OS keychain (none answers, or no entry)".into()),
        Err(e) => {
            // A keychain that fails is treated like one that is absent, so a
            // locked desktop keyring cannot stop a sidecar that has a key file.
            tracing::warn!(error = %e, "OS keychain failed; trying the key file");
            looked.push(format!("OS keychain (failed: {e})"));
        }
    }

    let path = data_dir.join(KEY_FILE);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            looked.push(format!("key file {} (absent)", path.display()));
            return Err(KeyError::Missing { looked });
        }
        Err(source) => return Err(KeyError::Io { path, source }),
    };
    // Check the opened file, not the path, so a swap between check and read cannot pass.
    let meta = file.metadata().map_err(|source| KeyError::Io {
        path: path.clone(),
        source,
    })?;
    check_metadata(&path, &meta)?;
    let source = KeySource::File(path.clone());
    let pem = read_pem(file, &path, source.clone())?;
    Ok((pem, source))
}

/// Stores a newly generated private key (PEM) for `enroll`.
///
/// # Errors
/// See [`store_key_to`].
pub fn store_key(data_dir: &Path, pem: &str) -> Result<KeySource, KeyError> {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    store_key_to(data_dir, credentials.as_deref(), &OsKeychain, pem)
}

/// [`store_key`] with the credentials directory and keychain given.
///
/// Stores in the keychain if one stores, else creates `<data_dir>/sidecar.key`
/// with mode 0600: written under a temporary name, synced, then linked into
/// place, so a crash never leaves half a key and an existing key is never replaced.
///
/// # Errors
/// [`KeyError::ShadowedByCredential`] when a systemd credential already provides
/// a key; [`KeyError::Exists`] when the key file exists; [`KeyError::Io`] when
/// the directory or file cannot be written.
pub fn store_key_to(
    data_dir: &Path,
    credentials_dir: Option<&Path>,
    keychain: &dyn Keychain,
    pem: &str,
) -> Result<KeySource, KeyError> {
    if let Some(dir) = credentials_dir {
        let path = dir.join(CREDENTIAL_NAME);
        if path.exists() {
            return Err(KeyError::ShadowedByCredential { path });
        }
    }
    let path = data_dir.join(KEY_FILE);
    // Refuse before touching the keychain too: the file would win over nothing,
    // but a stale file next to a keychain entry would confuse `doctor` and people.
    if fs::symlink_metadata(&path).is_ok() {
        return Err(KeyError::Exists { path });
    }
    match keychain.set(pem) {
        Ok(true) => return Ok(KeySource::Keychain),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "OS keychain failed; writing the key file"),
    }
    write_new_key_file(data_dir, &path, pem)?;
    Ok(KeySource::File(path))
}

/// Refuses a key file whose mode grants anything to group or others.
///
/// # Errors
/// [`KeyError::UnsafePermissions`] naming the mode and the fix, [`KeyError::NotOwned`],
/// [`KeyError::NotAFile`], or [`KeyError::Io`] if the file cannot be examined.
pub fn check_file_mode(path: &Path) -> Result<(), KeyError> {
    let meta = fs::metadata(path).map_err(|source| KeyError::Io {
        path: path.to_owned(),
        source,
    })?;
    check_metadata(path, &meta)
}

fn check_metadata(path: &Path, meta: &fs::Metadata) -> Result<(), KeyError> {
    if !meta.is_file() {
        return Err(KeyError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::UnsafePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let uid = effective_uid();
    if meta.uid() != uid {
        return Err(KeyError::NotOwned {
            path: path.to_owned(),
            owner: meta.uid(),
            uid,
        });
    }
    Ok(())
}

/// The effective uid, without `unsafe`: `/proc/self` is owned by it.
fn effective_uid() -> u32 {
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}

fn read_pem(file: File, path: &Path, source: KeySource) -> Result<String, KeyError> {
    let mut pem = String::new();
    file.take(KEY_BYTES_MAX + 1)
        .read_to_string(&mut pem)
        .map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => KeyError::NotAKey {
                location: source.clone(),
            },
            _ => KeyError::Io {
                path: path.to_owned(),
                source: e,
            },
        })?;
    if pem.len() as u64 > KEY_BYTES_MAX || !looks_like_pem_key(&pem) {
        return Err(KeyError::NotAKey { location: source });
    }
    Ok(pem)
}

fn looks_like_pem_key(text: &str) -> bool {
    text.contains("-----BEGIN") && text.contains("PRIVATE KEY-----")
}

fn write_new_key_file(data_dir: &Path, path: &Path, pem: &str) -> Result<(), KeyError> {
    let io_err = |p: &Path| {
        let p = p.to_owned();
        move |source| KeyError::Io { path: p, source }
    };
    fs::DirBuilder::new()
        .recursive(true)
        // Group may enter (the agent reaches the local socket here); others may not.
        .mode(0o750)
        .create(data_dir)
        .map_err(io_err(data_dir))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = data_dir.join(format!(".{KEY_FILE}.tmp-{}-{nanos}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        file.write_all(pem.as_bytes()).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        // A hard link, unlike rename, fails if the target exists: an existing
        // key is never replaced, even by a concurrent enroll.
        fs::hard_link(&tmp, path).map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: path.to_owned(),
                }
            } else {
                KeyError::Io {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        // Make the new directory entry durable.
        File::open(data_dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(data_dir))
    })();
    // The temporary name is only a staging step; remove it whatever happened.
    let _ = fs::remove_file(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const PEM: &str =
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";

    /// A unique directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos();
            let dir = std::env::temp_dir().join(format!(
                "muster-keystore-{tag}-{}-{nanos}",
                std::process::id()
            ));
            fs::create_dir_all(&dir).expect("create temp dir");
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A keychain that answers from memory, or never answers.
    #[derive(Default)]
    struct FakeKeychain {
        answers: bool,
        fails: bool,
        stored: RefCell<Option<String>>,
    }

    impl Keychain for FakeKeychain {
        fn get(&self) -> Result<Option<String>, String> {
            if self.fails {
                return Err("locked".into());
            }
            Ok(self.stored.borrow().clone())
        }

        fn set(&self, pem: &str) -> Result<bool, String> {
            if self.fails {
                return Err("locked".into());
            }
            if !self.answers {
                return Ok(false);
            }
            *self.stored.borrow_mut() = Some(pem.to_owned());
            Ok(true)
        }
    }

    fn write_key(dir: &Path, mode: u32) -> PathBuf {
        let path = dir.join(KEY_FILE);
        fs::write(&path, PEM).expect("write key");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn file_0644_is_refused_with_mode_and_fix() {
        let tmp = TempDir::new("0644");
        let path = write_key(&tmp.0, 0o644);
        let err = load_key_from(&tmp.0, None, &FakeKeychain::default()).expect_err("refused");
        assert!(matches!(
            err,
            KeyError::UnsafePermissions { mode: 0o644, .. }
        ));
        let msg = err.to_string();
        assert!(msg.contains("mode 0644"), "{msg}");
        assert!(
            msg.contains(&format!("chmod 600 {}", path.display())),
            "{msg}"
        );
        assert!(matches!(
            check_file_mode(&path),
            Err(KeyError::UnsafePermissions { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(check_file_mode(&path).is_err());
    }

    #[test]
    fn file_0600_loads() {
        let tmp = TempDir::new("0600");
        let path = write_key(&tmp.0, 0o600);
        check_file_mode(&path).expect("0600 is fine");
        let (pem, source) = load_key_from(&tmp.0, None, &FakeKeychain::default()).expect("load");
        assert_eq!(pem, PEM);
        assert_eq!(source, KeySource::File(path.clone()));
        assert!(source.to_string().starts_with("key file "));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).expect("chmod");
        load_key_from(&tmp.0, None, &FakeKeychain::default()).expect("0400 loads too");
    }

    #[test]
    fn credential_wins_over_keychain_and_file() {
        let tmp = TempDir::new("cred");
        write_key(&tmp.0, 0o644); // would be refused, but is never reached
        let creds = tmp.0.join("creds");
        fs::create_dir(&creds).expect("creds dir");
        let cred = creds.join(CREDENTIAL_NAME);
        fs::write(&cred, PEM).expect("write credential");
        let keychain = FakeKeychain {
            stored: RefCell::new(Some("other".into())),
            ..FakeKeychain::default()
        };
        let (pem, source) = load_key_from(&tmp.0, Some(&creds), &keychain).expect("load");
        assert_eq!(pem, PEM);
        assert_eq!(source, KeySource::SystemdCredential(cred.clone()));
        assert_eq!(
            source.to_string(),
            format!("systemd credential {}", cred.display())
        );
    }

    #[test]
    fn keychain_wins_over_file_and_a_failing_one_is_skipped() {
        let tmp = TempDir::new("keychain");
        write_key(&tmp.0, 0o600);
        let keychain = FakeKeychain {
            stored: RefCell::new(Some(PEM.into())),
            ..FakeKeychain::default()
        };
        let (_, source) = load_key_from(&tmp.0, None, &keychain).expect("load");
        assert_eq!(source, KeySource::Keychain);
        let failing = FakeKeychain {
            fails: true,
            ..FakeKeychain::default()
        };
        let (_, source) = load_key_from(&tmp.0, None, &failing).expect("load");
        assert!(matches!(source, KeySource::File(_)));
    }

    #[test]
    fn missing_key_says_where_it_looked() {
        let tmp = TempDir::new("missing");
        let creds = tmp.0.join("creds");
        let err =
            load_key_from(&tmp.0, Some(&creds), &FakeKeychain::default()).expect_err("missing");
        let KeyError::Missing { looked } = &err else {
            panic!("expected Missing, got {err:?}");
        };
        assert_eq!(looked.len(), 3);
        let msg = err.to_string();
        assert!(
            msg.contains(&creds.join(CREDENTIAL_NAME).display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("OS keychain"), "{msg}");
        assert!(
            msg.contains(&tmp.0.join(KEY_FILE).display().to_string()),
            "{msg}"
        );
        let err = load_key_from(&tmp.0, None, &FakeKeychain::default()).expect_err("missing");
        assert!(err.to_string().contains("CREDENTIALS_DIRECTORY not set"));
    }

    #[test]
    fn file_of_another_user_is_refused() {
        // Only root can give a file away; elsewhere the check is exercised by real use.
        if effective_uid() != 0 {
            return;
        }
        let tmp = TempDir::new("owner");
        let path = write_key(&tmp.0, 0o600);
        std::os::unix::fs::chown(&path, Some(65534), None).expect("chown");
        let err = load_key_from(&tmp.0, None, &FakeKeychain::default()).expect_err("not owned");
        assert!(
            matches!(
                err,
                KeyError::NotOwned {
                    owner: 65534,
                    uid: 0,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_and_directories_are_refused() {
        let tmp = TempDir::new("garbage");
        let path = tmp.0.join(KEY_FILE);
        fs::write(&path, "hello").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let err = load_key_from(&tmp.0, None, &FakeKeychain::default()).expect_err("garbage");
        assert!(matches!(err, KeyError::NotAKey { .. }), "{err:?}");
        fs::remove_file(&path).expect("rm");
        fs::create_dir(&path).expect("dir");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).expect("chmod");
        let err = load_key_from(&tmp.0, None, &FakeKeychain::default()).expect_err("dir");
        assert!(matches!(err, KeyError::NotAFile { .. }), "{err:?}");
    }

    #[test]
    fn store_creates_0600_and_never_overwrites() {
        let tmp = TempDir::new("store");
        let data = tmp.0.join("state");
        let source =
            store_key_to(&data, None, &FakeKeychain::default(), PEM).expect("store creates");
        let path = data.join(KEY_FILE);
        assert_eq!(source, KeySource::File(path.clone()));
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read_to_string(&path).expect("read"), PEM);
        let (pem, _) = load_key_from(&data, None, &FakeKeychain::default()).expect("load");
        assert_eq!(pem, PEM);
        let err = store_key_to(&data, None, &FakeKeychain::default(), "other").expect_err("exists");
        assert!(matches!(err, KeyError::Exists { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
        assert_eq!(fs::read_to_string(&path).expect("read"), PEM);
        let leftovers = fs::read_dir(&data).expect("ls").count();
        assert_eq!(leftovers, 1, "no temporary file left behind");
    }

    #[test]
    fn store_prefers_a_keychain_that_stores() {
        let tmp = TempDir::new("store-kc");
        let keychain = FakeKeychain {
            answers: true,
            ..FakeKeychain::default()
        };
        let source = store_key_to(&tmp.0, None, &keychain, PEM).expect("store");
        assert_eq!(source, KeySource::Keychain);
        assert!(!tmp.0.join(KEY_FILE).exists());
        let failing = FakeKeychain {
            fails: true,
            ..FakeKeychain::default()
        };
        let source = store_key_to(&tmp.0, None, &failing, PEM).expect("falls back");
        assert!(matches!(source, KeySource::File(_)));
    }

    #[test]
    fn store_refuses_when_a_credential_would_shadow_it() {
        let tmp = TempDir::new("store-cred");
        fs::write(tmp.0.join(CREDENTIAL_NAME), PEM).expect("write credential");
        let err = store_key_to(&tmp.0, Some(&tmp.0), &FakeKeychain::default(), PEM)
            .expect_err("shadowed");
        assert!(matches!(err, KeyError::ShadowedByCredential { .. }));
    }

    #[test]
    fn os_keychain_without_a_store_does_not_answer() {
        // No test in this crate sets a default store, so nothing answers.
        assert_eq!(OsKeychain.get(), Ok(None));
        assert_eq!(OsKeychain.set(PEM), Ok(false));
    }
}
