//! Connections to PostgreSQL: the shared pool and single dedicated sessions.
//!
//! Everything but the LISTEN connection goes through one deadpool pool, so a
//! restarted server is recovered from by simply asking the pool again: closed
//! connections are noticed and replaced on checkout. Every session is
//! secured as `sslmode` says ([`tls`]).

pub mod tls;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::tls::{self as ssl, SslMode};
use crate::config::DatabaseSettings;

/// A session's settings and the TLS connector to open it with.
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    pub sslmode: SslMode,
}

/// Parses the URL and sets what every docworker session wants, with the
/// TLS connector its `sslmode` calls for. `sslmode` and `sslrootcert` in
/// the URL win over `database.sslmode` and `database.sslrootcert`.
pub fn target(db: &DatabaseSettings, application_name: &str) -> Result<Target> {
    let (config, sslmode, rootcert) = session(db, application_name)?;
    Ok(Target {
        tls: tls::connector(sslmode, rootcert.as_deref())?,
        config,
        sslmode,
    })
}

/// The session settings alone (TLS settings taken out of the URL), without
/// building a connector.
pub fn pg_config(db: &DatabaseSettings, application_name: &str) -> Result<tokio_postgres::Config> {
    Ok(session(db, application_name)?.0)
}

/// The session settings, the sslmode, and the root certificate file.
fn session(
    db: &DatabaseSettings,
    application_name: &str,
) -> Result<(tokio_postgres::Config, SslMode, Option<PathBuf>)> {
    let split = ssl::split(&db.url);
    let sslmode = SslMode::parse(split.sslmode.as_deref().unwrap_or(&db.sslmode))
        .context("invalid sslmode (database.url or database.sslmode)")?;
    let rootcert = split
        .sslrootcert
        .or_else(|| (!db.sslrootcert.as_os_str().is_empty()).then(|| db.sslrootcert.clone()));
    let mut config = pg_config_of(&split.rest, db, application_name)?;
    config.ssl_mode(sslmode.negotiation());
    Ok((config, sslmode, rootcert))
}

fn pg_config_of(
    url: &str,
    db: &DatabaseSettings,
    application_name: &str,
) -> Result<tokio_postgres::Config> {
    let mut cfg: tokio_postgres::Config = url.parse().context("invalid value for database.url")?;
    if !db.password_file.as_os_str().is_empty() {
        let password = std::fs::read_to_string(&db.password_file).with_context(|| {
            format!(
                "reading database.password_file {}",
                db.password_file.display()
            )
        })?;
        cfg.password(password.trim());
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name(application_name);
    }
    cfg.connect_timeout(db.connect_timeout);
    // Half-open sockets (a server that vanished without a FIN) are found by
    // keepalive instead of hanging forever.
    cfg.keepalives(true);
    cfg.keepalives_idle(Duration::from_secs(10));
    cfg.keepalives_interval(Duration::from_secs(5));
    cfg.keepalives_retries(3);
    Ok(cfg)
}

/// The shared pool. Creating it does not connect.
pub fn pool(db: &DatabaseSettings, application_name: &str) -> Result<Pool> {
    let target = target(db, application_name)?;
    let manager = Manager::from_config(
        target.config,
        target.tls,
        ManagerConfig {
            // Fast: rely on the connection task noticing a closed socket.
            // A query per checkout would cost the claim loop a round trip.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(db.pool_size)
        .runtime(Runtime::Tokio1)
        .timeouts(Timeouts {
            wait: Some(db.connect_timeout * 2),
            create: Some(db.connect_timeout),
            recycle: Some(db.connect_timeout),
        })
        .build()
        .context("building the connection pool")
}

/// One session outside the pool, with its connection driven in the background.
pub async fn connect(db: &DatabaseSettings, application_name: &str) -> Result<Client> {
    let target = target(db, application_name)?;
    let (client, connection) = target.config.connect(target.tls).await.with_context(|| {
        format!(
            "connecting to PostgreSQL ({}, sslmode {})",
            redacted(&target.config),
            target.sslmode.as_str()
        )
    })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

/// Host, port and database of a config, never the password: safe to log.
pub fn redacted(cfg: &tokio_postgres::Config) -> String {
    let (host, port) = host_and_port(cfg);
    let dbname = cfg.get_dbname().unwrap_or("(default)");
    format!("{host}:{port}/{dbname}")
}

/// The first host (a name, an address or a socket directory) and port.
pub fn host_and_port(cfg: &tokio_postgres::Config) -> (String, u16) {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    (host, cfg.get_ports().first().copied().unwrap_or(5432))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str, password_file: &std::path::Path) -> DatabaseSettings {
        DatabaseSettings {
            url: url.into(),
            password_file: password_file.into(),
            sslmode: "prefer".into(),
            sslrootcert: Default::default(),
            pool_size: 4,
            connect_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn the_password_file_replaces_the_urls_password() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "s3cret\n").unwrap();
        let cfg = pg_config(&settings("postgres://app:old@db/app", &file), "t").unwrap();
        assert_eq!(cfg.get_password(), Some(&b"s3cret"[..]));

        let missing = dir.path().join("missing");
        let err = pg_config(&settings("postgres://app@db/app", &missing), "t").unwrap_err();
        assert!(
            format!("{err:#}").contains("reading database.password_file"),
            "{err:#}"
        );
    }
}
