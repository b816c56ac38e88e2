//! The benchmarks: `worker bench` (the queue, `queue`, with the claim's
//! cost by backlog size in `backlog` and PostgreSQL's own yardstick in
//! `pgbench`, and a long run in `soak`) and `worker bench-pipeline` (the document pipeline,
//! `pipeline`), with what they share: a scratch database, the generated corpus (`corpus`) and readings
//! from /proc (`procfs`). Nothing in the daemon's path depends on this wing;
//! its SQL is the store's (`store::bench`).

pub mod pipeline;
pub mod queue;

mod backlog;
mod corpus;
mod pgbench;
pub mod procfs;
mod soak;

use anyhow::{Context, Result};
use tokio_postgres::Client;

use crate::config::{DatabaseSettings, Settings};
use crate::db;

/// A fresh database named `{prefix}_{pid}` beside the configured one, for a
/// benchmark to fill: the admin connection, its name and settings for it.
async fn scratch_database(
    settings: &Settings,
    prefix: &str,
) -> Result<(Client, String, DatabaseSettings)> {
    let admin = db::connect(&settings.database, "docworker bench").await?;
    let name = format!("{prefix}_{}", std::process::id());
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .context("creating the scratch database (the configured user needs CREATEDB)")?;
    let mut cfg: tokio_postgres::Config = settings.database.url.parse()?;
    cfg.dbname(&name);
    let mut scratch = settings.database.clone();
    scratch.url = config_to_url(&cfg);
    Ok((admin, name, scratch))
}

/// Rebuilds a URL from a parsed config (host, port, user, password, dbname).
fn config_to_url(cfg: &tokio_postgres::Config) -> String {
    let (host, port) = db::host_and_port(cfg);
    let user = cfg.get_user().unwrap_or("postgres");
    let db = cfg.get_dbname().unwrap_or("postgres");
    match cfg.get_password() {
        Some(pw) => format!(
            "host={host} port={port} user={user} password={} dbname={db}",
            String::from_utf8_lossy(pw)
        ),
        None => format!("host={host} port={port} user={user} dbname={db}"),
    }
}
