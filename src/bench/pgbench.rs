//! PostgreSQL's own yardstick for a queue: pgbench running one `UPDATE` of a
//! random row per transaction, on the same cluster, with as many clients as
//! the daemon has slots. A claim-and-complete cycle cannot beat a bare
//! one-row update; how close it comes is the figure that matters.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::scratch_database;
use crate::config::Settings;

/// The script: one statement per transaction.
const SCRIPT: &str = "\\set aid random(1, 1000000)\nUPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n";

/// pgbench on this machine: PATH first, then Debian's versioned directory.
fn find() -> Option<std::path::PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("pgbench"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin/pgbench"))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        found.pop()
    })
}

/// Transactions per second, or `None` when pgbench is not installed.
pub async fn update_tps(
    settings: &Settings,
    clients: usize,
    duration: Duration,
) -> Result<Option<f64>> {
    let Some(pgbench) = find() else {
        return Ok(None);
    };
    let (admin, name, scratch) = scratch_database(settings, "docworker_pgbench").await?;
    let result = run(&pgbench, &scratch.url, clients, duration).await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    result.map(Some)
}

async fn run(
    pgbench: &std::path::Path,
    conn: &str,
    clients: usize,
    duration: Duration,
) -> Result<f64> {
    let init = tokio::process::Command::new(pgbench)
        .args(["-i", "-q", "-s", "10", conn])
        .stdin(Stdio::null())
        .output()
        .await
        .context("running pgbench -i")?;
    if !init.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }
    let script = std::env::temp_dir().join(format!("docworker-pgbench-{}.sql", std::process::id()));
    std::fs::write(&script, SCRIPT)?;
    let threads = clients.min(std::thread::available_parallelism().map_or(1, |n| n.get()));
    let out = tokio::process::Command::new(pgbench)
        .args(["-n", "-M", "prepared"])
        .arg(format!("-c{clients}"))
        .arg(format!("-j{threads}"))
        .arg(format!("-T{}", duration.as_secs().max(1)))
        .arg("-f")
        .arg(&script)
        .arg(conn)
        .stdin(Stdio::null())
        .output()
        .await
        .context("running pgbench");
    let _ = std::fs::remove_file(&script);
    let out = out?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench failed: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_tps(&stdout).with_context(|| format!("no tps in pgbench's output:\n{stdout}"))
}

/// `tps = 9123.45 (without initial connection time)`.
fn parse_tps(output: &str) -> Option<f64> {
    output
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tps = "))
        .find_map(|rest| rest.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_tps_line() {
        let out = "latency average = 1.1 ms\ninitial connection time = 3.2 ms\ntps = 9123.456789 (without initial connection time)\n";
        assert_eq!(super::parse_tps(out), Some(9123.456789));
        assert_eq!(super::parse_tps("nothing"), None);
    }
}
