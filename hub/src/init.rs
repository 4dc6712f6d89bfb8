//! `muster-hub init`: a new data directory with its PKI, config and database.

use std::path::Path;

use crate::config::HubConfig;
use crate::pki::{Pki, cert_key_fingerprint};
use crate::server::wall_ms;
use crate::store::{Store, StoreKind};

/// Creates a data directory's PKI, config and database (`muster-hub init`).
/// Blocks (a PostgreSQL store runs its own runtime): call it outside an async
/// runtime, or inside `block_in_place`.
///
/// # Errors
/// A message naming what failed.
pub fn init_data_dir(dir: &Path, config: &HubConfig, sans: &[String]) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // Task text and keys live here: group may read (a backup user), others nothing.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    // The store first: a database that refuses (it holds another hub's
    // state) must leave no CA behind to be mistaken for the cluster's.
    let store = open_new_store(dir, config)?;
    let (pki, admin) = Pki::create(dir, sans).map_err(|e| e.to_string())?;
    crate::pki::write_file(
        &dir.join(crate::config::CONFIG_FILE),
        config.render().as_bytes(),
        0o644,
    )
    .map_err(|e| e.to_string())?;
    let key_fp = x509_key_fp(&admin.cert_pem).unwrap_or_default();
    let id = crate::core::Identity {
        name: "admin".into(),
        role: muster_protocol::msg::Role::Admin,
        fingerprint: admin.fingerprint.clone(),
        key_fingerprint: key_fp,
        created_at: wall_ms(),
        revoked_at: None,
        capabilities: Vec::new(),
        slots: 0,
    };
    store
        .commit(&[crate::core::Write::Identity(id)], u64::MAX)
        .map_err(|e| e.to_string())?;
    Ok(pki.ca_fingerprint())
}

/// The store a new data directory's config names: the redb file, or the
/// PostgreSQL database with its schema created (this hub takes the term, so
/// the admin identity can be written).
fn open_new_store(dir: &Path, config: &HubConfig) -> Result<Store, String> {
    match config.store.kind {
        StoreKind::Redb => {
            let store = Store::open(&dir.join(crate::store::DB_FILE)).map_err(|e| e.to_string())?;
            restrict_db(&dir.join(crate::store::DB_FILE)).map_err(|e| e.to_string())?;
            Ok(store)
        }
        StoreKind::Postgres => {
            let opts = config.store.pg_options()?;
            let store =
                Store::open_postgres(&opts).map_err(|e| format!("{e} (store url {})", opts.url))?;
            if let Some(pg) = store.postgres() {
                // A second `init --store` on a cluster's database would make a
                // second CA and fence the serving leader: a further hub joins.
                if !pg.is_empty().map_err(|e| e.to_string())? {
                    return Err(format!(
                        "the database at {} already holds a hub's state; to add this hub to that cluster, copy ca.crt, ca.key, admin.crt and admin.key from the first hub's data directory and run `muster-hub init --join {}`",
                        opts.url, opts.url
                    ));
                }
                // The first hub writes its admin identity under a term of its own.
                pg.take_term(&crate::server::hostname(), "")
                    .map_err(|e| e.to_string())?;
            }
            Ok(store)
        }
    }
}

/// Makes the database readable by the hub's user only: it holds every task's text.
pub(crate) fn restrict_db(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if std::fs::metadata(path)?.mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn x509_key_fp(cert_pem: &str) -> Option<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    cert_key_fingerprint(der.as_ref())
}
