//! `worker bench`: the queue's throughput and pickup latency, measured on a
//! scratch database against a real `worker run` child process.
//!
//! Phase 1 enqueues N noop jobs in one INSERT (as the app's bulk upload does,
//! and like it leaving the table unanalyzed unless `--analyze`), starts the
//! daemon and times the drain on the database clock (first claim to last
//! completion), then sets it beside pgbench's one-statement UPDATE on the
//! same cluster (`pgbench`) and prints the claim's cost at several backlog
//! sizes (`backlog`). Phase 2 inserts jobs one at a time into an idle daemon and measures, per job, the time from
//! just before the INSERT is sent to the start of the claim statement that
//! picked it up (`started_at`) and to its completion (`finished_at`). The
//! daemon's resident memory is read from /proc while it idles.

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;

use super::procfs::memory_kib;
use super::{backlog, pgbench, scratch_database, soak};
use crate::config::{DatabaseSettings, Settings};
use crate::db;
use crate::store::{bench as sql, schema};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Noop jobs to drain in the throughput phase.
    #[arg(long, default_value_t = 20_000)]
    pub jobs: i32,
    /// The daemon's concurrency.
    #[arg(long, default_value_t = 10)]
    pub concurrency: usize,
    /// Jobs inserted one at a time in the latency phase.
    #[arg(long, default_value_t = 200)]
    pub latency_jobs: usize,
    /// Pause between those inserts.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Keep the scratch database afterwards.
    #[arg(long)]
    pub keep: bool,
    /// ANALYZE the table after the bulk insert. By default the drain runs on
    /// the statistics the app's own bulk upload leaves: none.
    #[arg(long)]
    pub analyze: bool,
    /// Backlog sizes for the claim-cost table (comma-separated; empty skips it).
    #[arg(long, value_delimiter = ',', default_value = "20000,200000,1000000")]
    pub backlogs: Vec<i32>,
    /// How long pgbench's one-statement UPDATE runs for the reference
    /// figure ("0s" skips it).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub pgbench: Duration,
    /// Instead of the phases above: hold 1.5x `--load` for this long and
    /// print pickup latency and the table's size per `--window`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub soak: Option<Duration>,
    /// The load a soak is sized from, in jobs per second (it runs at 1.5x).
    #[arg(long, default_value_t = 200.0)]
    pub load: f64,
    /// A soak's reporting window.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    pub window: Duration,
}

pub async fn run(settings: &Settings, args: BenchArgs) -> Result<()> {
    let (admin, name, scratch) = scratch_database(settings, "docworker_bench").await?;
    let result = measure(settings, &scratch, &args).await;
    if !args.keep {
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
    }
    result
}

async fn measure(
    settings: &Settings,
    db_settings: &DatabaseSettings,
    args: &BenchArgs,
) -> Result<()> {
    let mut client = db::connect(db_settings, "docworker bench").await?;
    schema::migrate(&mut client).await?;
    println!("PostgreSQL {}", sql::server_description(&client).await?);
    if let Some(duration) = args.soak {
        return soak::run(
            db_settings,
            &client,
            args.load * 1.5,
            duration,
            args.window,
            args.concurrency,
        )
        .await;
    }

    // Phase 1: throughput. Cold statistics stay cold: autovacuum could
    // analyze the table halfway through otherwise.
    sql::insert_noops(&client, args.jobs).await?;
    if args.analyze {
        sql::analyze(&client).await?;
    } else {
        sql::set_autovacuum(&client, false).await?;
    }
    let wall = Instant::now();
    let mut daemon = spawn_daemon(&db_settings.url, args.concurrency)?;
    wait_until_completed(&client, Duration::from_secs(600)).await?;
    let wall = wall.elapsed();
    let (drain, not_once) = sql::drain_span(&client).await?;
    let drain = drain.as_secs_f64();
    if not_once != 0 {
        bail!("{not_once} jobs ran more than once");
    }
    let stats = if args.analyze {
        "analyzed"
    } else {
        "never analyzed"
    };
    let jobs_per_s = args.jobs as f64 / drain;
    println!(
        "throughput ({stats}): {} noop jobs at concurrency {} drained in {:.3} s = {jobs_per_s:.0} jobs/s (first claim to last completion; {:.2} s wall including daemon start)",
        args.jobs,
        args.concurrency,
        drain,
        wall.as_secs_f64()
    );
    daemon.start_kill().ok();
    daemon.wait().await.ok();

    if !args.pgbench.is_zero() {
        match pgbench::update_tps(settings, args.concurrency, args.pgbench).await? {
            Some(tps) => println!(
                "pgbench, one-statement UPDATE of a random row, {} clients, {}: {tps:.0} TPS; the drain above is {:.2}x that",
                args.concurrency,
                humantime::format_duration(args.pgbench),
                jobs_per_s / tps
            ),
            None => println!("pgbench: not installed here; no reference figure"),
        }
    }

    if !args.backlogs.is_empty() {
        sql::set_autovacuum(&client, false).await?;
        let rows = backlog::measure(db_settings, &client, &args.backlogs, args.concurrency).await?;
        println!(
            "claim cost by backlog (bulk insert, no ANALYZE, autovacuum off the table: never analyzed at the first size; at the later ones the statistics the previous size's daemon left, stale):"
        );
        println!("  pending     write cycle p50   p99 (record 10 + claim 10)   daemon jobs/s");
        for r in &rows {
            println!(
                "  {:>9}   {:>8.3} ms   {:>8.3} ms                  {:>12.0}",
                r.pending, r.cycle_p50_ms, r.cycle_p99_ms, r.daemon_jobs_per_s
            );
        }
        if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
            println!(
                "  p99 at {} pending is {:.2}x p99 at {}",
                last.pending,
                last.cycle_p99_ms / first.cycle_p99_ms,
                first.pending
            );
        }
        sql::truncate(&client).await?;
        sql::set_autovacuum(&client, true).await?;
    }

    // The latency phase's own daemon, idle.
    let mut daemon = spawn_daemon(&db_settings.url, args.concurrency)?;

    // Phase 2: pickup latency on an idle daemon, once it listens.
    sql::truncate(&client).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let insert = sql::NoopInsert::prepare(&client).await?;
    let mut sent = Vec::with_capacity(args.latency_jobs);
    for _ in 0..args.latency_jobs {
        let t = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
        let id = insert.insert(&client, "latency").await?;
        sent.push((id, t));
        tokio::time::sleep(args.interval).await;
    }
    wait_until_completed(&client, Duration::from_secs(60)).await?;
    let mut pickup = Vec::new();
    let mut done = Vec::new();
    for (id, t) in &sent {
        let (started, finished) = sql::claim_and_finish_epochs(&client, *id).await?;
        pickup.push((started - t) * 1000.0);
        done.push((finished - t) * 1000.0);
    }
    let (p50, p95, p99) = percentiles(&mut pickup);
    println!(
        "pickup latency (insert sent -> claim), {} jobs {} apart: p50 {p50:.2} ms, p95 {p95:.2} ms, p99 {p99:.2} ms",
        args.latency_jobs,
        humantime::format_duration(args.interval)
    );
    let (p50, p95, p99) = percentiles(&mut done);
    println!(
        "insert sent -> completion recorded: p50 {p50:.2} ms, p95 {p95:.2} ms, p99 {p99:.2} ms"
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss, hwm) = memory_kib(daemon.id().unwrap_or(0));
    println!(
        "daemon memory: idle RSS {:.1} MB, peak RSS {:.1} MB",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    daemon.start_kill().ok();
    daemon.wait().await.ok();
    Ok(())
}

pub(super) fn spawn_daemon(url: &str, concurrency: usize) -> Result<tokio::process::Child> {
    spawn_daemon_with(url, concurrency, &[])
}

/// `worker run` with `env` on top of the benchmark's settings.
pub(super) fn spawn_daemon_with(
    url: &str,
    concurrency: usize,
    env: &[(&str, &str)],
) -> Result<tokio::process::Child> {
    let exe = std::env::current_exe()?;
    tokio::process::Command::new(exe)
        .arg("run")
        .envs(env.iter().copied())
        .env("DATABASE_URL", url)
        .env("DOCWORKER__FILES__UPLOAD_ROOT", std::env::temp_dir())
        .env("DOCWORKER__WORKER__CONCURRENCY", concurrency.to_string())
        // The benchmark has no embedder or Chroma: say nothing of them.
        .env("DOCWORKER__LOG__LEVEL", "warn,docworker::pipeline=error")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the worker daemon")
}

async fn wait_until_completed(client: &Client, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let n = sql::not_completed(client).await?;
        if n == 0 {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("timed out waiting for every job to complete ({n} not completed)");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(super) fn percentiles(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    (at(0.50), at(0.95), at(0.99))
}
