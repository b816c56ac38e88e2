//! The `worker` command line: the daemon, single-job debugging, and the
//! operator commands. Exit codes: 0 success, 1 error (or an unhealthy
//! `health`), 2 usage, 3 the job `--once` ran failed, 4 `--once` found
//! nothing to do.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use docworker::config::{LogFormat, Settings};
use docworker::observe::telemetry;
use docworker::ops::reload::ConfigSource;
use docworker::ops::{admin, probe};
use docworker::pipeline::parser_process;
use docworker::queue::shutdown::Shutdown;
use docworker::store::{self, schema, JobStatus, Written};
use docworker::worker::OnceResult;
use docworker::{bench, db, worker};
use uuid::Uuid;

const EXIT_JOB_FAILED: u8 = 3;
const EXIT_NOTHING_TO_DO: u8 = 4;

#[derive(Parser)]
#[command(
    name = "worker",
    version,
    about = "docworker: runs document-ingestion jobs from PostgreSQL"
)]
struct Cli {
    /// A TOML file layered over the defaults (see config/default.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Claim one due job, run it in the foreground with verbose logs, print the outcome.
    #[arg(long)]
    once: bool,
    /// With --once: run this job (whatever its state) instead of the next due one.
    #[arg(long, requires = "once", value_name = "ID")]
    job: Option<Uuid>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run {
        /// Jobs run at once (overrides worker.concurrency).
        #[arg(long)]
        concurrency: Option<usize>,
    },
    /// Create or upgrade the schema; safe to run from several replicas at once.
    Migrate,
    /// Enqueue files as the app does: one batch, one task per file.
    Enqueue {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// ingest, delete or noop.
        #[arg(long = "type", default_value = "ingest")]
        task_type: String,
        /// A JSON object stored in the tasks' options.
        #[arg(long, default_value = "{}")]
        options: String,
    },
    /// Show recent jobs.
    Jobs {
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Only jobs with this status.
        #[arg(long)]
        status: Option<String>,
    },
    /// Run a finished job again.
    Retry { id: Uuid },
    /// Cancel a pending or running job.
    Cancel { id: Uuid },
    /// Exit 0 if this host's worker answers its health check (needs http.enabled).
    Health {
        /// Check readiness instead: database, LISTEN, embedder and Chroma reachable.
        #[arg(long, conflicts_with = "database")]
        ready: bool,
        /// Alive and PostgreSQL answers (the image's HEALTHCHECK).
        #[arg(long)]
        database: bool,
    },
    /// Print the queue's numbers and, if it answers, this host's worker's.
    Stats,
    /// Enqueue a noop job and time how long a worker takes to complete it.
    Ping {
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Measure throughput and pickup latency against a scratch database.
    Bench(bench::queue::BenchArgs),
    /// Measure parsing, chunking and a real worker's end-to-end pipeline on a generated corpus.
    BenchPipeline(bench::pipeline::Args),
}

fn main() -> ExitCode {
    // A parser child (see pipeline::parser_process) reads no configuration
    // and starts no runtime.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args
        .first()
        .is_some_and(|a| a == parser_process::CHILD_COMMAND)
    {
        return parser_process::child_main(&args[1..]);
    }
    let cli = Cli::parse();
    let mut settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("worker: {e:#}");
            return ExitCode::from(1);
        }
    };
    if let Some(Command::Run {
        concurrency: Some(n),
    }) = &cli.command
    {
        settings.worker.concurrency = *n;
        if let Err(e) = settings.validate() {
            eprintln!("worker: {e:#}");
            return ExitCode::from(1);
        }
    }
    let verbose = cli.once.then_some("info,docworker=debug");
    telemetry::init(&settings.log, verbose);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("worker: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let json = settings.log.format == LogFormat::Json;
    match runtime.block_on(dispatch(cli, settings)) {
        Ok(code) => code,
        Err(e) => {
            // Once: as a structured line for log shippers, else plainly.
            if json {
                tracing::error!("{e:#}");
            } else {
                eprintln!("worker: {e:#}");
            }
            ExitCode::from(1)
        }
    }
}

async fn dispatch(cli: Cli, settings: Settings) -> Result<ExitCode> {
    if cli.once {
        return once(&settings, cli.job).await;
    }
    match cli.command.unwrap_or(Command::Run { concurrency: None }) {
        Command::Run { concurrency } => {
            let shutdown = Shutdown::new();
            shutdown.on_signals()?;
            let source = ConfigSource {
                file: cli.config.clone(),
                concurrency_override: concurrency,
            };
            worker::run(&settings, source, shutdown).await?;
        }
        Command::Migrate => {
            let mut client = db::connect(&settings.database, "docworker migrate").await?;
            let applied = schema::migrate(&mut client).await?;
            if applied.is_empty() {
                println!("schema is up to date (version {})", schema::CURRENT_VERSION);
            } else {
                println!(
                    "applied migrations {applied:?}; schema is at version {}",
                    schema::CURRENT_VERSION
                );
            }
        }
        Command::Enqueue {
            files,
            task_type,
            options,
        } => {
            let options: serde_json::Value =
                serde_json::from_str(&options).context("--options is not valid JSON")?;
            let client = db::connect(&settings.database, "docworker enqueue").await?;
            admin::enqueue(&client, &files, &task_type, &options).await?;
        }
        Command::Jobs { limit, status } => {
            let client = db::connect(&settings.database, "docworker jobs").await?;
            admin::jobs(&client, limit, status.as_deref()).await?;
        }
        Command::Retry { id } => {
            let client = db::connect(&settings.database, "docworker retry").await?;
            admin::retry(&client, id).await?;
        }
        Command::Cancel { id } => {
            let client = db::connect(&settings.database, "docworker cancel").await?;
            admin::cancel(&client, id).await?;
        }
        Command::Health { ready, database } => {
            let check = match (ready, database) {
                (true, _) => probe::HealthCheck::Ready,
                (false, true) => probe::HealthCheck::Database,
                (false, false) => probe::HealthCheck::Live,
            };
            if !probe::health(&settings.http, check).await? {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Stats => {
            let client = db::connect(&settings.database, "docworker stats").await?;
            probe::stats(&settings, &client).await?;
        }
        Command::Ping { timeout } => {
            let client = db::connect(&settings.database, "docworker ping").await?;
            admin::ping(&client, timeout).await?;
        }
        Command::Bench(args) => bench::queue::run(&settings, args).await?,
        Command::BenchPipeline(args) => bench::pipeline::run(&settings, args).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn once(settings: &Settings, job: Option<Uuid>) -> Result<ExitCode> {
    let shutdown = Shutdown::new();
    shutdown.on_signals()?;
    let result = worker::run_once(settings, job, shutdown).await?;
    Ok(match result {
        OnceResult::NothingToDo => {
            match job {
                Some(id) => {
                    println!("nothing to do: job {id} does not exist or another worker holds it")
                }
                None => println!("nothing to do: no job is due"),
            }
            ExitCode::from(EXIT_NOTHING_TO_DO)
        }
        OnceResult::Stopped { job } => {
            println!(
                "job {} stopped before it finished (cancelled, or its lease was lost)",
                job.key.id
            );
            ExitCode::from(EXIT_JOB_FAILED)
        }
        OnceResult::Finished { job, written } => {
            let client = db::connect(&settings.database, "docworker once").await?;
            let (status, message) = store::admin::outcome_of(&client, job.key.id).await?;
            println!("job {} attempt {}: {status}", job.key.id, job.key.attempt);
            if !message.is_empty() {
                println!("  {message}");
            }
            match written {
                Written::Applied {
                    status: JobStatus::Completed,
                    ..
                } => ExitCode::SUCCESS,
                _ => ExitCode::from(EXIT_JOB_FAILED),
            }
        }
    })
}
