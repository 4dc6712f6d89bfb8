//! Where the sidecar's private key lives.
//!
//! [`load_key`] tries, in order (DESIGN.md, "Identity and security"):
//!
//! 1. a systemd credential, `$CREDENTIALS_DIRECTORY/sidecar-key`
//!    (`LoadCredentialEncrypted=`); systemd decrypts it at each start and makes
//!    it readable by the service only, so its mode is not checked here;
//! 2. `<data_dir>/sidecar.key`, which must be a regular file owned by this user
//!    with no permission bits for group or others.
//!
//! [`store_key`] (used by `enroll`) creates the key file with mode 0600, never
//! replacing an existing one; [`probe_store`] checks beforehand that it could.
//!
//! There is no OS keychain path: agent hosts are headless, where Secret
//! Service needs a desktop session, and the kernel keyring forgets on reboot,
//! so it could never be the only copy (README.md, "Keys").
//!
//! The calls block (file IO): call them from `spawn_blocking` in async code. The environment is read only by the thin wrappers
//! [`load_key`] and [`store_key`]; the `_from`/`_to` cores take it as arguments
//! so tests can feed it.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// File name of the systemd credential under `$CREDENTIALS_DIRECTORY`.
pub const CREDENTIAL_NAME: &str = "sidecar-key";
/// File name of the key file under the state directory.
pub const KEY_FILE: &str = "sidecar.key";

/// Largest key file read; a PEM private key is a few hundred bytes, so
/// anything near this is not a key, and the bound keeps a wrong path (a log
/// file, a device) from being read into memory whole.
const KEY_BYTES_MAX: u64 = 64 * 1024;

/// Where a key was found or stored, for `doctor` and the startup log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A systemd credential at this path.
    SystemdCredential(PathBuf),
    /// A 0600 file at this path.
    File(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SystemdCredential(p) => write!(f, "systemd credential {}", p.display()),
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

/// Loads the private key (PEM) from the first source that has one.
///
/// # Errors
/// See [`load_key_from`].
pub fn load_key(data_dir: &Path) -> Result<(String, KeySource), KeyError> {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    load_key_from(data_dir, credentials.as_deref())
}

/// [`load_key`] with the credentials directory given.
///
/// # Errors
/// [`KeyError::Missing`] naming every place looked; for a key file that exists,
/// [`KeyError::UnsafePermissions`], [`KeyError::NotOwned`], [`KeyError::NotAFile`];
/// [`KeyError::NotAKey`] for content that is not a PEM private key;
/// [`KeyError::Io`] when a present credential or file cannot be read.
pub fn load_key_from(
    data_dir: &Path,
    credentials_dir: Option<&Path>,
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
    store_key_to(data_dir, credentials.as_deref(), pem)
}

/// [`store_key`] with the credentials directory given.
///
/// Creates `<data_dir>/sidecar.key`
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
    pem: &str,
) -> Result<KeySource, KeyError> {
    let path = check_free(data_dir, credentials_dir)?;
    write_new_key_file(data_dir, &path, pem)?;
    Ok(KeySource::File(path))
}

/// Checks that [`store_key`] would succeed, without storing anything: no
/// credential shadows the file, no key file exists, and the state directory
/// exists (created 0750 if missing) and takes a 0600 file (a probe file is
/// written, synced and removed). `enroll` calls it before it spends the token.
///
/// # Errors
/// As [`store_key_to`].
pub fn probe_store(data_dir: &Path) -> Result<PathBuf, KeyError> {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    probe_store_to(data_dir, credentials.as_deref())
}

/// [`probe_store`] with the credentials directory given; returns where the key will go.
///
/// # Errors
/// As [`store_key_to`].
pub fn probe_store_to(
    data_dir: &Path,
    credentials_dir: Option<&Path>,
) -> Result<PathBuf, KeyError> {
    let path = check_free(data_dir, credentials_dir)?;
    create_state_dir(data_dir)?;
    let probe = data_dir.join(format!(".{KEY_FILE}.probe-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&probe)?;
        file.write_all(b"probe")?;
        file.sync_all()
    })();
    let _ = fs::remove_file(&probe);
    result.map_err(|source| KeyError::Io {
        path: probe,
        source,
    })?;
    Ok(path)
}

/// Where a new key file goes, if nothing is in the way.
fn check_free(data_dir: &Path, credentials_dir: Option<&Path>) -> Result<PathBuf, KeyError> {
    if let Some(dir) = credentials_dir {
        let path = dir.join(CREDENTIAL_NAME);
        if path.exists() {
            return Err(KeyError::ShadowedByCredential { path });
        }
    }
    let path = data_dir.join(KEY_FILE);
    if fs::symlink_metadata(&path).is_ok() {
        return Err(KeyError::Exists { path });
    }
    Ok(path)
}

/// Creates the state directory if missing.
fn create_state_dir(data_dir: &Path) -> Result<(), KeyError> {
    fs::DirBuilder::new()
        .recursive(true)
        // Group may enter (the agent reaches the local socket here); others may not.
        .mode(0o750)
        .create(data_dir)
        .map_err(|source| KeyError::Io {
            path: data_dir.to_owned(),
            source,
        })
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

pub(crate) fn check_metadata(path: &Path, meta: &fs::Metadata) -> Result<(), KeyError> {
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
    create_state_dir(data_dir)?;
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
        let err = load_key_from(&tmp.0, None).expect_err("refused");
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
        let (pem, source) = load_key_from(&tmp.0, None).expect("load");
        assert_eq!(pem, PEM);
        assert_eq!(source, KeySource::File(path.clone()));
        assert!(source.to_string().starts_with("key file "));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).expect("chmod");
        load_key_from(&tmp.0, None).expect("0400 loads too");
    }

    #[test]
    fn credential_wins_over_the_file() {
        let tmp = TempDir::new("cred");
        write_key(&tmp.0, 0o644); // would be refused, but is never reached
        let creds = tmp.0.join("creds");
        fs::create_dir(&creds).expect("creds dir");
        let cred = creds.join(CREDENTIAL_NAME);
        fs::write(&cred, PEM).expect("write credential");
        let (pem, source) = load_key_from(&tmp.0, Some(&creds)).expect("load");
        assert_eq!(pem, PEM);
        assert_eq!(source, KeySource::SystemdCredential(cred.clone()));
        assert_eq!(
            source.to_string(),
            format!("systemd credential {}", cred.display())
        );
    }

    #[test]
    fn missing_key_says_where_it_looked() {
        let tmp = TempDir::new("missing");
        let creds = tmp.0.join("creds");
        let err = load_key_from(&tmp.0, Some(&creds)).expect_err("missing");
        let KeyError::Missing { looked } = &err else {
            panic!("expected Missing, got {err:?}");
        };
        assert_eq!(looked.len(), 2);
        let msg = err.to_string();
        assert!(
            msg.contains(&creds.join(CREDENTIAL_NAME).display().to_string()),
            "{msg}"
        );
        assert!(
            msg.contains(&tmp.0.join(KEY_FILE).display().to_string()),
            "{msg}"
        );
        let err = load_key_from(&tmp.0, None).expect_err("missing");
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
        let err = load_key_from(&tmp.0, None).expect_err("not owned");
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
        let err = load_key_from(&tmp.0, None).expect_err("garbage");
        assert!(matches!(err, KeyError::NotAKey { .. }), "{err:?}");
        fs::remove_file(&path).expect("rm");
        fs::create_dir(&path).expect("dir");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).expect("chmod");
        let err = load_key_from(&tmp.0, None).expect_err("dir");
        assert!(matches!(err, KeyError::NotAFile { .. }), "{err:?}");
    }

    #[test]
    fn store_creates_0600_and_never_overwrites() {
        let tmp = TempDir::new("store");
        let data = tmp.0.join("state");
        let source = store_key_to(&data, None, PEM).expect("store creates");
        let path = data.join(KEY_FILE);
        assert_eq!(source, KeySource::File(path.clone()));
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read_to_string(&path).expect("read"), PEM);
        let (pem, _) = load_key_from(&data, None).expect("load");
        assert_eq!(pem, PEM);
        let err = store_key_to(&data, None, "other").expect_err("exists");
        assert!(matches!(err, KeyError::Exists { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
        assert_eq!(fs::read_to_string(&path).expect("read"), PEM);
        let leftovers = fs::read_dir(&data).expect("ls").count();
        assert_eq!(leftovers, 1, "no temporary file left behind");
    }

    #[test]
    fn store_refuses_when_a_credential_would_shadow_it() {
        let tmp = TempDir::new("store-cred");
        fs::write(tmp.0.join(CREDENTIAL_NAME), PEM).expect("write credential");
        let err = store_key_to(&tmp.0, Some(&tmp.0), PEM).expect_err("shadowed");
        assert!(matches!(err, KeyError::ShadowedByCredential { .. }));
    }

    #[test]
    fn probe_checks_the_place_without_leaving_anything() {
        let tmp = TempDir::new("probe");
        let data = tmp.0.join("state");
        let path = probe_store_to(&data, None).expect("probe creates the directory");
        assert_eq!(path, data.join(KEY_FILE));
        assert_eq!(fs::read_dir(&data).expect("ls").count(), 0, "no probe left");
        fs::set_permissions(&data, fs::Permissions::from_mode(0o500)).expect("chmod");
        // Root writes anyway; the refusal is only observable for other users.
        if effective_uid() != 0 {
            let err = probe_store_to(&data, None).expect_err("read-only directory");
            assert!(matches!(err, KeyError::Io { .. }), "{err:?}");
        }
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).expect("chmod");
        write_key(&data, 0o600);
        let err = probe_store_to(&data, None).expect_err("a key exists");
        assert!(matches!(err, KeyError::Exists { .. }), "{err:?}");
    }
}
