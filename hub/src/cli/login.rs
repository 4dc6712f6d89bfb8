//! `login`: enroll this operator with a join token and save the credential.

use std::path::PathBuf;

use crate::cli::CliError;
use crate::server::hostname;
use muster_protocol::AgentName;
use muster_protocol::client::{self, JoinToken};
use muster_protocol::msg::Role;

pub(crate) async fn login(
    token: &str,
    name: Option<String>,
    role: Option<Role>,
    save_to: Option<PathBuf>,
    json: bool,
) -> Result<(), CliError> {
    let token: JoinToken = token.parse()?;
    let name = name.unwrap_or_else(|| {
        let user = std::env::var("USER").unwrap_or_else(|_| "operator".into());
        format!("{user}.{}", hostname())
    });
    let name = AgentName::new(name).map_err(|e| CliError {
        code: 2,
        message: format!("--name: {e}"),
    })?;
    let path = save_to
        .or_else(crate::cli::saved_credential_path)
        .ok_or_else(|| {
            CliError::fail("no place to save the credential: set HOME or pass --save-to")
        })?;
    if path.exists() {
        return Err(CliError::fail(format!(
            "{} already exists; remove it to log in again",
            path.display()
        )));
    }
    let (key, csr) =
        crate::pki::make_csr(name.as_str()).map_err(|e| CliError::fail(e.to_string()))?;
    // The token knows its role; a refusal for the wrong one uses nothing up, so
    // without --role the second try takes the role the hub names.
    let first = role.unwrap_or(Role::Operator);
    let (role, (cert, ca)) = match client::enroll(
        &token,
        &name,
        first,
        csr.clone(),
        (Vec::new(), 0),
    )
    .await
    {
        Err(client::ClientError::WrongRole { token: granted, .. })
            if role.is_none() && granted != Role::Agent =>
        {
            let got = client::enroll(&token, &name, granted, csr, (Vec::new(), 0)).await?;
            (granted, got)
        }
        Err(client::ClientError::WrongRole {
            token: Role::Agent, ..
        }) if role.is_none() => {
            return Err(CliError::fail(
                "this is an agent's join token; enroll a host with `muster-sidecar enroll`, or ask for an operator token (`muster-hub token create --role operator`)",
            ));
        }
        other => (first, other?),
    };
    let file = crate::cli::CredentialFile {
        hub: token.hub.clone(),
        hubs: token.hubs[1..].to_vec(),
        ca,
        cert,
        key: key.serialize_pem(),
    };
    let text = toml::to_string(&file).map_err(|e| CliError::fail(e.to_string()))?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| CliError::fail(format!("{}: {e}", parent.display())))?;
    }
    crate::pki::write_file(&path, text.as_bytes(), 0o600)
        .map_err(|e| CliError::fail(e.to_string()))?;
    if json {
        let doc = serde_json::json!({
            "credential": path.display().to_string(),
            "hub": token.hub,
            "name": name.as_str(),
            "role": role.as_str(),
        });
        println!("{doc}");
    } else {
        eprintln!(
            "logged in to {} as {name} ({role}); credential saved to {}",
            token.hub,
            path.display()
        );
    }
    Ok(())
}
