//! Runs one parsed command: the small ones inline, the rest in their modules.

use crate::cli::args::{
    AgentCommand, Command, IdentityCommand, TaskCommand, TokenCommand, TokenKind,
};
use crate::cli::daemon::{init, serve};
use crate::cli::doctor::doctor;
use crate::cli::login::login;
use crate::cli::submit::submit;
use crate::cli::watch::watch;
use crate::cli::{CliError, ConnectArgs, print};
use muster_protocol::duration::parse_duration;
use muster_protocol::msg::{OpRequest, Role};
use muster_protocol::{AgentName, TaskId};

/// How long until the wall-clock time `at_ms`, in words ("29d 23h", "expired").
fn until(at_ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    match at_ms.checked_sub(now) {
        Some(ms) if ms > 0 => muster_protocol::duration::format_duration(
            std::time::Duration::from_secs(ms.div_ceil(1000)),
        ),
        _ => "expired".into(),
    }
}

fn usage(message: &str) -> CliError {
    CliError {
        code: 2,
        message: message.into(),
    }
}

pub(crate) fn config_error(e: impl std::fmt::Display) -> CliError {
    CliError {
        code: 78,
        message: e.to_string(),
    }
}

pub(crate) async fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Init {
            data_dir,
            listen,
            sans,
            force,
        } => init(data_dir, listen, sans, force),
        Command::Serve { config, data_dir } => serve(config, data_dir).await,
        Command::Token {
            command:
                TokenCommand::Create {
                    kind: TokenKind::Api,
                    role,
                    ttl,
                    name,
                    capabilities,
                    slots,
                },
            connect,
        } => {
            let Some(name) = name else {
                return Err(usage(
                    "--kind api needs --name NAME, to list and revoke it by",
                ));
            };
            if !capabilities.is_empty() || slots.is_some() {
                return Err(usage(
                    "--capability and --slots grant agents; an API token has none",
                ));
            }
            let ttl = parse_duration(ttl.as_deref().unwrap_or("30d"))
                .map_err(|e| usage(&format!("--ttl: {e}")))?;
            let role = role.unwrap_or(Role::Operator);
            let v = one(
                &connect,
                OpRequest::ApiTokenCreate {
                    role,
                    ttl_s: ttl.as_secs().max(1),
                    name,
                },
            )
            .await?;
            eprintln!(
                "an API token with role {role}, valid for {}; send it as `Authorization: Bearer <token>` (shown once):",
                muster_protocol::duration::format_duration(ttl)
            );
            println!("{}", v["token"].as_str().unwrap_or_default());
            Ok(())
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    kind: TokenKind::Join,
                    role,
                    ttl,
                    name,
                    capabilities,
                    slots,
                },
            connect,
        } => {
            let role = role.unwrap_or(Role::Agent);
            let name = name.map(AgentName::new).transpose().map_err(|e| CliError {
                code: 2,
                message: format!("--name: {e}"),
            })?;
            let ttl = parse_duration(ttl.as_deref().unwrap_or("1h")).map_err(|e| CliError {
                code: 2,
                message: format!("--ttl: {e}"),
            })?;
            let s = connect.connect().await?;
            let v = s
                .call(OpRequest::TokenCreate {
                    role,
                    ttl_s: ttl.as_secs().max(1),
                    name,
                    capabilities: (!capabilities.is_empty()).then_some(capabilities),
                    slots,
                })
                .await?;
            s.close().await;
            eprintln!(
                "a single-use {role} token, valid for {}; enroll with it:",
                muster_protocol::duration::format_duration(ttl)
            );
            println!("{}", v["token"].as_str().unwrap_or_default());
            Ok(())
        }
        Command::Token {
            command: TokenCommand::List { json },
            connect,
        } => {
            let v = one(&connect, OpRequest::ApiTokens).await?;
            print(&v, json, |v| {
                let list = v["tokens"].as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    return "no live API tokens\n".into();
                }
                let mut out = format!(
                    "{:<24} {:<9} {:<16} {}\n",
                    "NAME", "ROLE", "CREATED BY", "EXPIRES"
                );
                for t in list {
                    out += &format!(
                        "{:<24} {:<9} {:<16} {}\n",
                        t["name"].as_str().unwrap_or_default(),
                        t["role"].as_str().unwrap_or_default(),
                        t["created_by"].as_str().unwrap_or_default(),
                        until(t["expires_at"].as_u64().unwrap_or(0)),
                    );
                }
                out
            });
            Ok(())
        }
        Command::Token {
            command: TokenCommand::Revoke { name },
            connect,
        } => {
            one(&connect, OpRequest::ApiTokenRevoke { name: name.clone() }).await?;
            eprintln!("API token {name} revoked");
            Ok(())
        }
        Command::Dashboard { role, connect } => {
            let v = one(&connect, OpRequest::DashboardLogin { role }).await?;
            eprintln!(
                "a one-time {} login for the dashboard, valid for {}; open it in a browser:",
                v["role"].as_str().unwrap_or_default(),
                until(v["expires_at"].as_u64().unwrap_or(0))
            );
            println!("{}", v["url"].as_str().unwrap_or_default());
            Ok(())
        }
        Command::Login {
            token,
            token_file,
            name,
            role,
            save_to,
        } => {
            let token = muster_protocol::join_token::read(token, token_file)
                .map_err(|message| CliError { code: 2, message })?;
            login(&token, name, role, save_to).await
        }
        Command::Submit(args) => submit(*args).await,
        Command::Tasks {
            state,
            agent,
            label,
            limit,
            cursor,
            json,
            connect,
        } => {
            let label = match label {
                Some(l) => Some(
                    muster_protocol::work::split_pair("--label", &l)
                        .map_err(|message| CliError { code: 2, message })?,
                ),
                None => None,
            };
            let v = one(
                &connect,
                OpRequest::Tasks {
                    state,
                    agent,
                    limit,
                    cursor,
                    label,
                },
            )
            .await?;
            print(&v, json, crate::cli::tasks_table);
            Ok(())
        }
        Command::Task {
            command,
            json,
            connect,
        } => {
            let req = match command {
                TaskCommand::Logs {
                    id,
                    attempt,
                    follow,
                    stream,
                    tail,
                } => {
                    use muster_protocol::msg::{LogQuery, LogStream};
                    let query = LogQuery {
                        task: TaskId(id),
                        generation: attempt.map(muster_protocol::Generation),
                        stream: match stream {
                            crate::cli::args::StreamArg::Stdout => LogStream::Stdout,
                            crate::cli::args::StreamArg::Stderr => LogStream::Stderr,
                        },
                        tail,
                        follow,
                    };
                    return crate::cli::watch::logs(&connect, query, json).await;
                }
                TaskCommand::Show { id } => OpRequest::TaskShow { id: TaskId(id) },
                TaskCommand::Cancel { id } => OpRequest::TaskCancel { id: TaskId(id) },
                TaskCommand::Requeue { id } => OpRequest::TaskRequeue { id: TaskId(id) },
            };
            let v = one(&connect, req).await?;
            print(&v, json, crate::cli::task_detail);
            Ok(())
        }
        Command::Agents { json, connect } => {
            let v = one(&connect, OpRequest::Agents).await?;
            print(&v, json, crate::cli::agents_table);
            Ok(())
        }
        Command::Agent {
            command,
            json,
            connect,
        } => {
            let (req, detail) = match command {
                AgentCommand::Show { name } => (OpRequest::AgentShow { name }, true),
                AgentCommand::Drain { name } => (OpRequest::AgentDrain { name }, false),
                AgentCommand::Undrain { name } => (OpRequest::AgentUndrain { name }, false),
                AgentCommand::Revoke { name } => (OpRequest::AgentRevoke { name }, false),
                AgentCommand::Set {
                    name,
                    capabilities,
                    no_capabilities,
                    slots,
                } => {
                    let capabilities =
                        (no_capabilities || !capabilities.is_empty()).then_some(capabilities);
                    (
                        OpRequest::AgentSet {
                            name,
                            capabilities,
                            slots,
                        },
                        false,
                    )
                }
            };
            let v = one(&connect, req).await?;
            print(&v, json, |v| {
                if detail {
                    crate::cli::agent_detail(v)
                } else {
                    format!("{v}\n")
                }
            });
            Ok(())
        }
        Command::Identity {
            command:
                IdentityCommand::Revoke {
                    name,
                    role,
                    fingerprint,
                },
            json,
            connect,
        } => {
            use muster_protocol::msg::IdentityTarget;
            let target = match (fingerprint, name) {
                (Some(fp), _) => IdentityTarget::Fingerprint(fp),
                (None, Some(name)) => IdentityTarget::Named { role, name },
                (None, None) => {
                    return Err(CliError {
                        code: 2,
                        message: "give NAME or --fingerprint FP".into(),
                    });
                }
            };
            let v = one(&connect, OpRequest::IdentityRevoke(target)).await?;
            print(&v, json, |v| {
                format!(
                    "revoked {} {} ({})\n",
                    v["role"].as_str().unwrap_or("?"),
                    v["name"].as_str().unwrap_or("?"),
                    v["fingerprint"].as_str().unwrap_or("?")
                )
            });
            Ok(())
        }
        Command::Watch {
            from,
            json,
            connect,
        } => watch(&connect, from, json).await,
        Command::Alerts { json, connect } => {
            let v = one(&connect, OpRequest::Alerts).await?;
            print(&v, json, |v| {
                let list = v["alerts"].as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    "no open alerts\n".into()
                } else {
                    list.iter().map(|a| format!("{a}\n")).collect()
                }
            });
            Ok(())
        }
        Command::Stats { json, connect } => {
            let v = one(&connect, OpRequest::Stats).await?;
            print(&v, json, |v| {
                v.as_object()
                    .map(|o| o.iter().map(|(k, x)| format!("{k:<28} {x}\n")).collect())
                    .unwrap_or_default()
            });
            Ok(())
        }
        Command::Doctor { connect } => doctor(&connect).await,
        Command::Demo { tasks, keep } => crate::demo::run(tasks, keep).await,
    }
}

pub(crate) async fn one(
    connect: &ConnectArgs,
    req: OpRequest,
) -> Result<serde_json::Value, CliError> {
    let s = connect.connect().await?;
    let v = s.call(req).await;
    s.close().await;
    v
}
