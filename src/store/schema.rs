//! Versioned schema migrations (`worker migrate`) and the start-up check.
//!
//! Migrations are the files in `sql/`, compiled in. All pending ones run in
//! one transaction under a transaction-scoped advisory lock, so replicas that
//! start at once queue behind each other and the later ones find nothing to do.

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;

/// (version, name, sql), in order.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "queue", include_str!("../../sql/0001_queue.sql")),
    (2, "pipeline", include_str!("../../sql/0002_pipeline.sql")),
    (
        3,
        "retry_resets_progress",
        include_str!("../../sql/0003_retry_resets_progress.sql"),
    ),
    (4, "claim", include_str!("../../sql/0004_claim.sql")),
    (
        5,
        "rollup_never_waits",
        include_str!("../../sql/0005_rollup_never_waits.sql"),
    ),
    (
        6,
        "claim_skips_paused",
        include_str!("../../sql/0006_claim_skips_paused.sql"),
    ),
    (
        7,
        "filename_text",
        include_str!("../../sql/0007_filename_text.sql"),
    ),
    (
        8,
        "job_list_index",
        include_str!("../../sql/0008_job_list_index.sql"),
    ),
];

/// The schema version this binary needs.
pub const CURRENT_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

const APPLIED_VERSION_SQL: &str = "SELECT coalesce(max(version), 0) FROM docworker_migrations";

/// Arbitrary but fixed: "docworker" on a phone keypad.
const MIGRATION_LOCK: i64 = 3_627_967_537;

/// Applies what is missing; returns the versions it applied.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>> {
    // Up to date: done, with nothing that needs a DDL right, so the runtime
    // role can run it too (Compose's `migrate` service, a unit's
    // ExecStartPre) and only an upgrade needs the owner.
    if version(client).await? >= CURRENT_VERSION {
        return Ok(Vec::new());
    }
    let role: String = client
        .query_one("SELECT current_user::text", &[])
        .await?
        .get(0);
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS docworker_migrations (
             version    int PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(|e| privilege_hint(e, &role))
    .context("creating the table docworker_migrations")?;
    let current: i32 = tx.query_one(APPLIED_VERSION_SQL, &[]).await?.get(0);
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS.iter().filter(|(v, _, _)| *v > current) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| privilege_hint(e, &role))
            .with_context(|| format!("applying migration {version} ({name})"))?;
        tx.execute(
            "INSERT INTO docworker_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        applied.push(*version);
    }
    tx.commit().await?;
    Ok(applied)
}

/// A refused DDL statement, with the grant that is missing. PostgreSQL
/// only says "permission denied for schema public".
fn privilege_hint(e: tokio_postgres::Error, role: &str) -> anyhow::Error {
    if e.code() != Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
        return e.into();
    }
    let detail = e
        .as_db_error()
        .map_or_else(|| e.to_string(), |db| db.message().to_string());
    anyhow::anyhow!(
        "{detail}. `worker migrate` creates and alters docworker's tables, so while a migration is \
         pending it must run as the role that owns job_tasks and job_batches, with CREATE on the \
         schema: run it with that role's credentials, or grant role {role} that right (GRANT CREATE \
         ON SCHEMA public TO {role}) and the tables' ownership. With the schema up to date it needs \
         no DDL right (see README, \"Database roles\")."
    )
}

/// The version the database is at; 0 when docworker never migrated it.
pub async fn version(client: &Client) -> Result<i32> {
    // Two statements: a query naming a table that does not exist fails when
    // it is parsed, whatever a CASE around it would have chosen at run time.
    let migrated: bool = client
        .query_one(
            "SELECT to_regclass('docworker_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !migrated {
        return Ok(0);
    }
    Ok(client.query_one(APPLIED_VERSION_SQL, &[]).await?.get(0))
}

/// Refuses to run against a schema this binary does not match.
pub async fn ensure_current(client: &Client) -> Result<()> {
    let v = version(client).await?;
    if v < CURRENT_VERSION {
        bail!(
            "the database schema is at version {v} but this worker needs version {CURRENT_VERSION}: run `worker migrate` first"
        );
    }
    if v > CURRENT_VERSION {
        // Migrations only add, so an older worker keeps working during a
        // rolling upgrade; say so rather than refuse.
        tracing::warn!(
            schema = v,
            understood = CURRENT_VERSION,
            "the database schema is newer than this worker; upgrade it when you can"
        );
    }
    Ok(())
}
