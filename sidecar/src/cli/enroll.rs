//! `enroll`: spend a join token on a certificate for a key made here, and
//! write sidecar.toml.

use std::path::Path;

use muster_protocol::AgentName;
use muster_protocol::client::{self, JoinToken};
use muster_protocol::msg::Role;

use super::{CA_FILE, CERT_FILE, Failure, fail};
use crate::config::{CONFIG_FILE, SidecarConfig};
use crate::keystore;

/// Enrolls this machine with `token`, checking all that can fail before the token is spent.
pub(super) async fn enroll(
    token: &str,
    data_dir: &Path,
    name: Option<String>,
    capabilities: Vec<String>,
    slots: u32,
) -> Result<(), Failure> {
    let usage = |m: String| Failure {
        code: 2,
        message: m,
    };
    let token: JoinToken = token
        .parse()
        .map_err(|e: client::ClientError| usage(e.to_string()))?;
    if data_dir.join(CERT_FILE).exists() {
        return Err(fail(format!(
            "{} is already enrolled ({} exists); remove the state directory to enroll again",
            data_dir.display(),
            data_dir.join(CERT_FILE).display()
        )));
    }
    let name = name.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    });
    let name = AgentName::new(name).map_err(|e| usage(format!("--name: {e}")))?;
    let mut config = SidecarConfig::new(name.clone(), token.hub.clone(), data_dir.to_path_buf());
    config.hubs = token.hubs[1..].to_vec();
    config.capabilities = capabilities;
    config.slots = slots;
    // Check everything that can fail here before the token is spent: the hub
    // uses it up on the first try, so a failure after that needs a new token.
    // First the whole config file, so a bad capability loses no token.
    let rendered = config.render();
    SidecarConfig::parse(&rendered, &data_dir.join(CONFIG_FILE))
        .map_err(|e| usage(e.to_string()))?;
    // Then the state directory and the key's place: created if missing,
    // writable, nothing there yet (a probe file is written and removed).
    let dir = data_dir.to_path_buf();
    let key_path = tokio::task::spawn_blocking(move || keystore::probe_store(&dir))
        .await
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| {
            fail(format!(
                "cannot store the key, so the token was not used: {e}"
            ))
        })?;
    tracing::debug!(key = %key_path.display(), "the key's place is writable");
    let key = rcgen::KeyPair::generate().map_err(|e| fail(e.to_string()))?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| fail(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name.as_str());
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| fail(e.to_string()))?;
    let grant = (config.capabilities.clone(), config.slots);
    let (cert, ca) = client::enroll(&token, &name, Role::Agent, csr, grant)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let key_pem = key.serialize_pem();
    let dir = data_dir.to_path_buf();
    let source = tokio::task::spawn_blocking(move || keystore::store_key(&dir, &key_pem))
        .await
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| fail(e.to_string()))?;
    write(&data_dir.join(CA_FILE), &ca, 0o644)?;
    write(&data_dir.join(CONFIG_FILE), &rendered, 0o644)?;
    // The certificate last: its presence means "enrolled".
    write(&data_dir.join(CERT_FILE), &cert, 0o644)?;
    eprintln!("enrolled as {name} with hub {}; key in {source}", token.hub);
    eprintln!(
        "edit {} to set the agent command, then run `muster-sidecar run --data-dir {}`",
        data_dir.join(CONFIG_FILE).display(),
        data_dir.display()
    );
    Ok(())
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), Failure> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let err = |e: std::io::Error| fail(format!("{}: {e}", path.display()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
