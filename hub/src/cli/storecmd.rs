//! `migrate [--check]` and `store copy`: the store's schema and moving a
//! hub's state from its redb file into PostgreSQL. Both block (a PostgreSQL
//! store runs its own runtime), so the dispatcher runs them in `block_in_place`.

use std::path::Path;

use crate::cli::CliError;
use crate::cli::dispatch::config_error;
use crate::config::{CONFIG_FILE, HubConfig};
use crate::store::{
    DB_FILE, PG_SCHEMA_VERSION, PgStore, RedbStore, SCHEMA_VERSION, SchemaState, Store, StoreKind,
};

fn load(config: Option<&Path>, data_dir: &Path) -> Result<HubConfig, CliError> {
    let path = config.map_or_else(|| data_dir.join(CONFIG_FILE), Path::to_path_buf);
    HubConfig::load(&path).map_err(config_error)
}

/// `migrate`: with `check`, exit 0 when the schema is current and 1 with a
/// sentence otherwise; without, create or migrate it as `serve` would.
pub(crate) fn migrate(check: bool, config: Option<&Path>, data_dir: &Path) -> Result<(), CliError> {
    let cfg = load(config, data_dir)?;
    let (what, supported, state) = match cfg.store.kind {
        StoreKind::Redb => {
            let path = data_dir.join(DB_FILE);
            let state = crate::store::redb::schema_state(&path).map_err(|e| {
                CliError::fail(format!(
                    "{}: {e} (a running hub holds the file open; stop it first)",
                    path.display()
                ))
            })?;
            (path.display().to_string(), SCHEMA_VERSION, state)
        }
        StoreKind::Postgres => {
            let opts = cfg.store.pg_options().map_err(config_error)?;
            let state = PgStore::schema_state(&opts)
                .map_err(|e| CliError::fail(format!("{}: {e}", opts.url)))?;
            (opts.url, PG_SCHEMA_VERSION, state)
        }
    };
    if check {
        return match state {
            SchemaState::Current => {
                println!("{what}: schema version {supported}, current");
                Ok(())
            }
            SchemaState::Missing => Err(CliError::fail(format!(
                "{what}: no schema yet; the hub creates it when it starts (or run `muster-hub migrate`)"
            ))),
            SchemaState::Older(v) => Err(CliError::fail(format!(
                "{what}: schema version {v}, this build writes {supported}: a migration is pending; the hub runs it when it starts (or run `muster-hub migrate`)"
            ))),
            SchemaState::Newer(v) => Err(CliError::fail(format!(
                "{what}: schema version {v} is newer than this build's {supported}; run the newer muster-hub"
            ))),
        };
    }
    match cfg.store.kind {
        StoreKind::Redb => drop(Store::open(&data_dir.join(DB_FILE)).map_err(fail)?),
        StoreKind::Postgres => {
            let opts = cfg.store.pg_options().map_err(config_error)?;
            drop(Store::open_postgres(&opts).map_err(fail)?);
        }
    }
    println!("{what}: schema version {supported}, current");
    Ok(())
}

fn fail(e: crate::store::StoreError) -> CliError {
    CliError::fail(e.to_string())
}

/// `store copy --from redb --to postgres`: every table of the redb file into
/// the PostgreSQL database of `[store] url`, in one transaction.
pub(crate) fn copy(config: Option<&Path>, data_dir: &Path) -> Result<(), CliError> {
    let cfg = load(config, data_dir)?;
    if cfg.store.url.is_empty() {
        return Err(config_error(
            "hub.toml has no [store] url; set url = \"postgres://user@host:port/dbname\" (kind may stay \"redb\" until the copy is done)",
        ));
    }
    let path = data_dir.join(DB_FILE);
    if !path.exists() {
        return Err(CliError::fail(format!(
            "{}: no redb store to copy",
            path.display()
        )));
    }
    let src = RedbStore::open(&path).map_err(|e| {
        CliError::fail(format!(
            "{}: {e} (a running hub holds the file open; stop it first)",
            path.display()
        ))
    })?;
    let opts = cfg.store.pg_options().map_err(config_error)?;
    let dst = PgStore::open(&opts).map_err(|e| CliError::fail(format!("{}: {e}", opts.url)))?;
    let n = dst.copy_from_redb(&src).map_err(fail)?;
    println!(
        "copied {} tasks, {} attempts, {} idempotency keys, {} events, {} agents, {} identities, {} tokens from {} to {}",
        n.tasks,
        n.attempts,
        n.keys,
        n.events,
        n.agents,
        n.identities,
        n.tokens,
        path.display(),
        opts.url
    );
    if cfg.store.kind == StoreKind::Redb {
        eprintln!(
            "now set kind = \"postgres\" under [store] in hub.toml and start the hub; {} stays as it was",
            path.display()
        );
    }
    Ok(())
}
