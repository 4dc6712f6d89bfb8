//! Runs one parsed command: the small ones inline, the rest in their modules.

use crate::cli::args::{
    AgentCommand, ClusterCommand, Command, IdentityCommand, StoreCommand, TaskCommand,
    TokenCommand, TokenKind,
};
use crate::cli::daemon::{cluster_status, init, serve};
use crate::cli::doctor::doctor;
use crate::cli::login::login;
use crate::cli::submit::submit;
use crate::cli::watch::watch;
use crate::cli::{CliError, ConnectArgs, print};
use muster_protocol::duration::parse_duration;
use muster_protocol::msg::{OpRequest, Role};
use muster_protocol::{AgentName, TaskId};

/// What `agent drain|undrain|revoke|set` did, in a sentence.
fn agent_change(v: &serde_json::Value) -> String {
    let name = v["name"].as_str().unwrap_or("?");
    if let Some(d) = v["drained"].as_bool() {
        return if d {
            format!("agent {name} drained: it takes no new work; its running tasks go on\n")
        } else {
            format!("agent {name} undrained: it takes work again\n")
        };
    }
    if v["revoked"] == true {
        return format!(
            "agent {name} revoked: its session is closed and its certificate refused; its tasks are re-queued after the lost grace\n"
        );
    }
    if let Some(slots) = v["slots"].as_u64() {
        let caps: Vec<&str> = v["capabilities"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str())
            .collect();
        return format!(
            "agent {name} may now claim {slots} slots and capabilities: {}\n",
            if caps.is_empty() {
                "none".to_string()
            } else {
                caps.join(", ")
            }
        );
    }
    format!("agent {name}: done\n")
}

/// `alerts`: one row per open alert, oldest first.
fn alerts_table(v: &serde_json::Value) -> String {
    let rows: Vec<[String; 4]> = v["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            [
                a["alert"].as_str().unwrap_or_default().to_string(),
                a["subject"].as_str().unwrap_or_default().to_string(),
                a["since"].as_u64().map_or("-".into(), |t| {
                    crate::cli::when(t)
                        .split(" (")
                        .next()
                        .unwrap_or_default()
                        .to_string()
                }),
                a["message"].as_str().unwrap_or_default().to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no open alerts\n".into();
    }
    let mut out = table(&["ALERT", "SUBJECT", "SINCE", "MESSAGE"], &rows);
    if v["truncated"] == true {
        out += &format!("… {} open in all; --json lists what fits\n", v["total"]);
    }
    out
}

/// `stats`: one figure per line, numbers rounded for reading.
fn stats_lines(v: &serde_json::Value) -> String {
    let Some(o) = v.as_object() else {
        return String::new();
    };
    let rows: Vec<[String; 2]> = o
        .iter()
        .map(|(k, x)| {
            let shown = match x {
                serde_json::Value::Number(n) if n.is_f64() => {
                    let f = n.as_f64().unwrap_or(0.0);
                    if f.abs() >= 100.0 {
                        format!("{f:.0}")
                    } else {
                        format!("{f:.2}")
                    }
                }
                serde_json::Value::Object(_) | serde_json::Value::Array(_) => {
                    let t = x.to_string();
                    if t.len() > 120 {
                        format!("{}… (--json shows all)", &t[..t.floor_char_boundary(117)])
                    } else {
                        t
                    }
                }
                other => other.to_string().trim_matches('"').to_string(),
            };
            [k.clone(), shown]
        })
        .collect();
    table(&["FIGURE", "VALUE"], &rows)
}

/// `token list`: one table of join and API tokens.
fn tokens_table(v: &serde_json::Value) -> String {
    let mut rows = Vec::new();
    for t in v["join"].as_array().into_iter().flatten() {
        rows.push([
            "join".to_string(),
            t["id"].as_str().unwrap_or_default().to_string(),
            t["role"].as_str().unwrap_or_default().to_string(),
            t["created_by"].as_str().unwrap_or_default().to_string(),
            until(t["expires_at"].as_u64().unwrap_or(0)),
        ]);
    }
    for t in v["api"].as_array().into_iter().flatten() {
        rows.push([
            "api".to_string(),
            t["name"].as_str().unwrap_or_default().to_string(),
            t["role"].as_str().unwrap_or_default().to_string(),
            t["created_by"].as_str().unwrap_or_default().to_string(),
            until(t["expires_at"].as_u64().unwrap_or(0)),
        ]);
    }
    if rows.is_empty() {
        return "no unused join tokens and no live API tokens\n".into();
    }
    table(
        &["KIND", "NAME OR ID", "ROLE", "CREATED BY", "EXPIRES IN"],
        &rows,
    )
}

/// `identities`: one line per identity.
fn identities_table(v: &serde_json::Value) -> String {
    let rows: Vec<[String; 4]> = v["identities"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            [
                i["role"].as_str().unwrap_or_default().to_string(),
                i["name"].as_str().unwrap_or_default().to_string(),
                i["fingerprint"]
                    .as_str()
                    .unwrap_or_default()
                    .chars()
                    .take(16)
                    .collect(),
                if i["revoked_at"].is_null() {
                    "live".into()
                } else {
                    "revoked".into()
                },
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no identities match\n".into();
    }
    let mut out = table(&["ROLE", "NAME", "FINGERPRINT", "STATE"], &rows);
    if v["truncated"] == true {
        out += &format!(
            "(showing {} of {}; use --role to narrow)\n",
            rows.len(),
            v["total"]
        );
    }
    out
}

pub(crate) use muster_protocol::human::table;

/// How long until the wall-clock time `at_ms`, in words ("29d 23h", "expired").
fn until(at_ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    match at_ms.checked_sub(now) {
        Some(ms) if ms > 0 => span(ms.div_ceil(1000)),
        _ => "expired".into(),
    }
}

pub(crate) use muster_protocol::human::span;

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
            advertise,
            force,
            store,
            join,
            pg_password_file,
        } => {
            let joining = join.is_some();
            if pg_password_file.is_some() && store.is_none() && !joining {
                return Err(CliError {
                    code: 2,
                    message: "--pg-password-file goes with --store or --join".into(),
                });
            }
            init(
                data_dir,
                listen,
                sans,
                advertise,
                force,
                store.or(join).map(|url| (url, pg_password_file)),
                joining,
            )
        }
        Command::Serve {
            config, data_dir, ..
        } => serve(config, data_dir).await,
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
            if let Some(w) = v["warning"].as_str() {
                eprintln!("warning: {w}");
            }
            eprintln!(
                "a single-use {role} token, valid for {}; enroll with it:",
                muster_protocol::duration::format_duration(ttl)
            );
            println!("{}", v["token"].as_str().unwrap_or_default());
            Ok(())
        }
        Command::Token {
            command: TokenCommand::List { kind, json },
            connect,
        } => {
            let s = connect.connect().await?;
            let mut all = serde_json::json!({});
            if kind != Some(TokenKind::Api) {
                all["join"] = s.call(OpRequest::JoinTokens).await?["tokens"].take();
            }
            if kind != Some(TokenKind::Join) {
                all["api"] = s.call(OpRequest::ApiTokens).await?["tokens"].take();
            }
            s.close().await;
            print(&all, json, tokens_table);
            Ok(())
        }
        Command::Token {
            command: TokenCommand::Revoke { kind, name },
            connect,
        } => {
            let request = match kind {
                TokenKind::Api => OpRequest::ApiTokenRevoke { name: name.clone() },
                TokenKind::Join => OpRequest::JoinTokenRevoke { id: name.clone() },
            };
            one(&connect, request).await?;
            match kind {
                TokenKind::Api => eprintln!("API token {name} revoked"),
                TokenKind::Join => eprintln!("join token {name} revoked"),
            }
            Ok(())
        }
        Command::Identities {
            role,
            all,
            json,
            connect,
        } => {
            let v = one(&connect, OpRequest::Identities { role, revoked: all }).await?;
            print(&v, json, identities_table);
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
            json,
        } => {
            let token = muster_protocol::join_token::read(token, token_file)
                .map_err(|message| CliError { code: 2, message })?;
            login(&token, name, role, save_to, json).await
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
                TaskCommand::Wait { id } => {
                    return crate::cli::watch::wait_task(&connect, TaskId(id), json).await;
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
                    agent_change(v)
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
            print(&v, json, alerts_table);
            Ok(())
        }
        Command::Stats { json, connect } => {
            let v = one(&connect, OpRequest::Stats).await?;
            print(&v, json, stats_lines);
            Ok(())
        }
        Command::Doctor { json, connect } => doctor(&connect, json).await,
        Command::Migrate {
            check,
            config,
            data_dir,
        } => tokio::task::block_in_place(|| {
            crate::cli::storecmd::migrate(check, config.as_deref(), &data_dir)
        }),
        Command::Store {
            command:
                StoreCommand::Copy {
                    from: _,
                    to: _,
                    config,
                    data_dir,
                },
        } => {
            tokio::task::block_in_place(|| crate::cli::storecmd::copy(config.as_deref(), &data_dir))
        }
        Command::Completions { .. } | Command::Man { .. } => Ok(()),
        Command::Cluster {
            command: ClusterCommand::Status { data_dir, json },
        } => cluster_status(&data_dir, json).await,
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
