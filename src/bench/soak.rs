//! `worker bench --soak`: a long run at 1.5x a given load, to see what a
//! short benchmark cannot: whether pickup latency stays flat and the table
//! and its indexes stop growing once pruning and autovacuum keep pace.
//!
//! The bench enqueues `noop` jobs at the target rate in small INSERTs (a
//! few rows per 10 ms, as many uploads would), a `worker run` daemon works
//! them, and finished rows are pruned after a short retention so the table
//! reaches a steady state within the run. Autovacuum runs as the
//! migrations configure it, or, where the cluster has it off, the workers'
//! maintenance vacuums instead. One line per window.

use std::time::{Duration, Instant};

use anyhow::Result;
use tokio_postgres::Client;

use super::queue::spawn_daemon_with;
use crate::config::DatabaseSettings;
use crate::store::bench as sql;

/// Finished rows are pruned after this long during a soak.
const RETENTION: &str = "1m";
const TICK: Duration = Duration::from_millis(10);

pub async fn run(
    db_settings: &DatabaseSettings,
    client: &Client,
    jobs_per_s: f64,
    duration: Duration,
    window: Duration,
    concurrency: usize,
) -> Result<()> {
    println!(
        "soak: {jobs_per_s:.0} jobs/s for {} at concurrency {concurrency}, finished rows pruned after {RETENTION}, one line per {}",
        humantime::format_duration(duration),
        humantime::format_duration(window)
    );
    println!(
        "autovacuum on this cluster: {} (when off, the workers vacuum the queue's tables themselves)",
        sql::autovacuum_setting(client).await?
    );
    println!(
        "  window  enqueued  pickup p50    p99   pending   rows   table MB  indexes MB  dead rows"
    );
    let mut daemon = spawn_daemon_with(
        &db_settings.url,
        concurrency,
        &[("DOCWORKER__MAINTENANCE__RETENTION", RETENTION)],
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let started = Instant::now();
    let mut enqueued = 0f64;
    let mut window_start = sql::clock(client).await?;
    let mut next_window = started + window;
    let mut n = 0;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while started.elapsed() < duration {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * jobs_per_s - enqueued).floor();
        if due >= 1.0 {
            sql::insert_noops(client, due as i32).await?;
            enqueued += due;
        }
        if Instant::now() >= next_window {
            let window_end = sql::clock(client).await?;
            // Jobs of this window get a moment to be claimed.
            tokio::time::sleep(Duration::from_millis(200)).await;
            n += 1;
            print_window(client, n, window_start, window_end).await?;
            window_start = window_end;
            next_window += window;
        }
    }
    daemon.start_kill().ok();
    daemon.wait().await.ok();
    Ok(())
}

async fn print_window(client: &Client, n: usize, from: f64, to: f64) -> Result<()> {
    let w = sql::soak_window(client, from, to).await?;
    let mb = |b: i64| b as f64 / 1e6;
    println!(
        "  {n:>6}  {:>8}  {:>8.2} ms {:>6.2} ms  {:>7}  {:>6}  {:>9.1}  {:>10.1}  {:>9}{}",
        w.enqueued,
        w.pickup_p50_ms,
        w.pickup_p99_ms,
        w.pending,
        w.rows,
        mb(w.table_bytes),
        mb(w.index_bytes),
        w.dead_rows,
        if w.claimed < w.enqueued {
            format!("  ({} not yet claimed)", w.enqueued - w.claimed)
        } else {
            String::new()
        }
    );
    Ok(())
}
