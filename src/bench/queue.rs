//! `worker bench`: the queue's throughput and pickup latency, measured on a
//! scratch database against a real `worker run` child process.
//!
//! Phase 1 enqueues N noop jobs in one INSERT (as the app's bulk upload does,
//! and like it leaving the table unanalyzed unless `--analyze`), starts the
//! daemon and times the drain on the
//! database clock (first claim to last completion). Phase 2 inserts jobs one
//! at a time into the now idle daemon and measures, per job, the time from
//! just before the INSERT is sent to the start of the claim statement that
//! picked it up (`started_at`) and to its completion (`finished_at`). The
//! daemon's resident memory is read from /proc while it idles.

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;

use super::procfs::memory_kib;
use super::scratch_database;
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
}

pub async fn run(settings: &Settings, args: BenchArgs) -> Result<()> {
    let (admin, name, scratch) = scratch_database(settings, "docworker_bench").await?;
    let result = measure(&scratch, &args).await;
    if !args.keep {
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
    }
    result
}

async fn measure(db_settings: &DatabaseSettings, args: &BenchArgs) -> Result<()> {
    let mut client = db::connect(db_settings, "docworker bench").await?;
    schema::migrate(&mut client).await?;
    println!("PostgreSQL {}", sql::server_description(&client).await?);

    // Phase 1: throughput.
    sql::insert_noops(&client, args.jobs).await?;
    if args.analyze {
        sql::analyze(&client).await?;
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
    println!(
        "throughput ({stats}): {} noop jobs at concurrency {} drained in {:.3} s = {:.0} jobs/s (first claim to last completion; {:.2} s wall including daemon start)",
        args.jobs,
        args.concurrency,
        drain,
        args.jobs as f64 / drain,
        wall.as_secs_f64()
    );

    // Phase 2: pickup latency on an idle daemon.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sql::truncate(&client).await?;
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

fn spawn_daemon(url: &str, concurrency: usize) -> Result<tokio::process::Child> {
    let exe = std::env::current_exe()?;
    tokio::process::Command::new(exe)
        .arg("run")
        .env("DATABASE_URL", url)
        .env("DOCWORKER__WORKER__CONCURRENCY", concurrency.to_string())
        .env("DOCWORKER__LOG__LEVEL", "warn")
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

fn percentiles(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    (at(0.50), at(0.95), at(0.99))
}
