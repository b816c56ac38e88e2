//! The claim's cost by backlog size, on cold statistics: for each size, the
//! backlog is bulk-inserted with autovacuum kept off the table, as right
//! after the app's bulk upload (never analyzed at the first size; at the
//! later ones, stale: the previous size's daemon vacuumed and analyzed the
//! table, autovacuum being off, before it was emptied and refilled), then
//!
//! - one in-process claimer runs the daemon's own write cycle back to back
//!   (record the last 10 outcomes, claim 10 more): its per-statement time;
//! - a `worker run` daemon at the given concurrency works on the backlog for
//!   a fixed window: its jobs per second on the database clock.
//!
//! The claim must cost the same at 20,000 pending rows as at 1,000,000.

use std::time::{Duration, Instant};

use anyhow::Result;
use tokio_postgres::Client;

use super::queue::{percentiles, spawn_daemon};
use crate::config::DatabaseSettings;
use crate::db;
use crate::store::{bench as sql, Backoff, Ended, Ending, WriteCycle};

/// Write cycles timed per backlog size.
const CYCLES: usize = 1_000;
/// Jobs claimed per cycle, as a daemon at concurrency 10 does.
const CLAIM: i64 = 10;
/// How long the daemon works on each backlog.
const WINDOW: Duration = Duration::from_secs(10);

pub struct BacklogFigures {
    pub pending: i32,
    pub cycle_p50_ms: f64,
    pub cycle_p99_ms: f64,
    pub daemon_jobs_per_s: f64,
}

pub async fn measure(
    db_settings: &DatabaseSettings,
    client: &Client,
    sizes: &[i32],
    concurrency: usize,
) -> Result<Vec<BacklogFigures>> {
    let pool = db::pool(db_settings, "docworker bench claimer")?;
    let cycle = WriteCycle::new("bench-claimer", Duration::from_secs(30), &["noop"]);
    let backoff = Backoff {
        base_secs: 5.0,
        max_secs: 600.0,
    };
    let mut figures = Vec::new();
    for &pending in sizes {
        sql::truncate(client).await?;
        sql::insert_noops(client, pending).await?;

        let mut times = Vec::with_capacity(CYCLES);
        let mut claimed = Vec::new();
        for _ in 0..CYCLES {
            let ended: Vec<Ended<'_>> = claimed
                .iter()
                .map(|key| Ended {
                    key: *key,
                    ending: Ending::Completed,
                })
                .collect();
            let started = Instant::now();
            let done = cycle.run(&pool, &ended, backoff, CLAIM, &[]).await?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            claimed = done.claimed.iter().map(|j| j.key).collect();
        }
        let (p50, _, p99) = percentiles(&mut times);

        sql::truncate(client).await?;
        sql::insert_noops(client, pending).await?;
        let mut daemon = spawn_daemon(&db_settings.url, concurrency)?;
        tokio::time::sleep(WINDOW).await;
        daemon.start_kill().ok();
        daemon.wait().await.ok();
        let (n, span) = sql::completed_span(client).await?;
        figures.push(BacklogFigures {
            pending,
            cycle_p50_ms: p50,
            cycle_p99_ms: p99,
            daemon_jobs_per_s: n as f64 / span.as_secs_f64().max(1e-9),
        });
    }
    Ok(figures)
}
