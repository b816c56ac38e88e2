//! Phases 2 and 3 of `worker bench-pipeline`: a real `worker run` child
//! process draining ingest jobs against the services, its CPU time and
//! memory, and whether the embedder was kept busy.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::Args;
use crate::bench::corpus::{text_docs, Prose};
use crate::bench::procfs::{
    busiest_processes, children_of, cpu_by_process, machine_cpu, memory_kib, process_cpu_seconds,
};
use crate::config::{DatabaseSettings, Provider, Settings};
use crate::db;
use crate::pipeline::embed::Embedder;
use crate::store::{bench as sql, schema};

/// The services of the end-to-end phases, checked to be up.
pub(crate) struct Services {
    pub(crate) http: reqwest::Client,
    pub(crate) embed_url: String,
    pub(crate) real_embed_url: Option<String>,
    pub(crate) chroma_url: String,
    pub(crate) model: String,
    pub(crate) provider: &'static str,
    pub(crate) tenant: String,
    pub(crate) database: String,
    pub(crate) collections: std::sync::Mutex<Vec<String>>,
}

impl Services {
    pub(crate) async fn check(settings: &Settings, args: &Args) -> Result<Services> {
        let services = Services {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            embed_url: args
                .embed_url
                .clone()
                .unwrap_or_else(|| settings.embed.url.clone()),
            real_embed_url: args.real_embed_url.clone(),
            chroma_url: args
                .chroma_url
                .clone()
                .unwrap_or_else(|| settings.chroma.url.clone()),
            model: args
                .model
                .clone()
                .unwrap_or_else(|| settings.embed.model.clone()),
            provider: match settings.embed.provider {
                Provider::Ollama => "ollama",
                Provider::OpenAi => "openai",
            },
            tenant: settings.chroma.tenant.clone(),
            database: settings.chroma.database.clone(),
            collections: std::sync::Mutex::new(Vec::new()),
        };
        let heartbeat = format!(
            "{}/api/v2/heartbeat",
            services.chroma_url.trim_end_matches('/')
        );
        match services.http.get(&heartbeat).send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => bail!(
                "Chroma at {} answered GET /api/v2/heartbeat with HTTP {}: is it a ChromaDB (v2 API) server? Give --chroma-url.",
                services.chroma_url,
                r.status()
            ),
            Err(e) => bail!(
                "Chroma at {} is unreachable ({}). Start it (`chroma run`) or give --chroma-url.",
                services.chroma_url,
                crate::pipeline::embed::source_chain(&e)
            ),
        }
        let mut urls = vec![("--embed-url", services.embed_url.clone())];
        if let Some(u) = &services.real_embed_url {
            urls.push(("--real-embed-url", u.clone()));
        }
        for (flag, url) in urls {
            let mut embed = settings.embed.clone();
            embed.url = url.clone();
            embed.model = services.model.clone();
            embed.tries = 1;
            match Embedder::new(&embed)?.model().await {
                Ok(_) => {}
                Err(e) => {
                    let e = e.message();
                    bail!("the embedding server given by {flag} ({url}) is not usable: {e}")
                }
            }
        }
        Ok(services)
    }

    /// The embedding server's counters, when it has `/_stats` (the test
    /// server does; Ollama does not).
    /// With several servers (`url` a comma-separated list, as embed.url
    /// takes it): the counters summed, the most in flight at once the
    /// largest of them.
    pub(crate) async fn embed_stats(&self, url: &str) -> Option<EmbedStats> {
        let mut total = EmbedStats::default();
        for url in url.split(',') {
            let r = self
                .http
                .get(format!("{}/_stats", url.trim().trim_end_matches('/')))
                .send()
                .await
                .ok()?;
            if !r.status().is_success() {
                return None;
            }
            let v: Value = r.json().await.ok()?;
            let int = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
            total.requests += int("embed_requests");
            total.inputs += int("inputs");
            total.busy += v.get("busy_seconds").and_then(Value::as_f64).unwrap_or(0.0);
            total.max_in_flight = total.max_in_flight.max(int("max_in_flight"));
        }
        Some(total)
    }

    pub(crate) async fn reset_embed_stats(&self, url: &str) {
        for url in url.split(',') {
            let _ = self
                .http
                .post(format!("{}/_stats/reset", url.trim().trim_end_matches('/')))
                .send()
                .await;
        }
    }

    pub(crate) fn new_collection(&self, label: &str) -> String {
        let name = format!("docworker_bench_{}_{label}", std::process::id());
        self.collections.lock().unwrap().push(name.clone());
        name
    }

    pub(crate) async fn drop_collections(&self) {
        let names = std::mem::take(&mut *self.collections.lock().unwrap());
        for name in names {
            let url = format!(
                "{}/api/v2/tenants/{}/databases/{}/collections/{name}",
                self.chroma_url.trim_end_matches('/'),
                self.tenant,
                self.database
            );
            let _ = self.http.delete(url).send().await;
        }
    }
}

/// The test embedding servers' `/_stats`, summed over the servers.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct EmbedStats {
    pub(crate) requests: u64,
    pub(crate) inputs: u64,
    /// Seconds in the model.
    pub(crate) busy: f64,
    pub(crate) max_in_flight: u64,
}

/// One end-to-end run's figures.
pub(crate) struct E2eRun {
    pub(crate) label: String,
    pub(crate) embedder: String,
    /// Embedding servers the worker spread its requests over.
    pub(crate) servers: usize,
    pub(crate) docs: usize,
    pub(crate) bytes: usize,
    pub(crate) chunks: i64,
    pub(crate) wall: f64,
    pub(crate) worker_cpu: f64,
    pub(crate) peak_rss_kib: u64,
    /// The worker's RSS plus its parser processes', at the sample where the
    /// sum was highest (KiB), and the largest parser process's VmHWM.
    pub(crate) parsers_peak_kib: (u64, u64),
    /// What the embedding servers counted over the drain.
    pub(crate) embed: Option<EmbedStats>,
}

impl E2eRun {
    pub(crate) fn mb(&self) -> f64 {
        self.bytes as f64 / 1e6
    }
    /// The servers' time in the model over the drain, per server.
    pub(crate) fn utilisation(&self) -> Option<f64> {
        self.embed
            .map(|e| e.busy / self.wall / self.servers.max(1) as f64)
    }
}

pub(crate) async fn end_to_end(
    db_settings: &DatabaseSettings,
    services: &Services,
    args: &Args,
    root: &Path,
) -> Result<Vec<E2eRun>> {
    let mut client = db::connect(db_settings, "docworker bench-pipeline").await?;
    schema::migrate(&mut client).await?;
    let mut runs = Vec::new();

    println!();
    println!(
        "End to end: a `worker run --concurrency {}` child process, scratch database, Chroma at {}, model {:?}.",
        args.concurrency, services.chroma_url, services.model
    );
    let mut gen = Prose::new(2);
    if args.docs > 0 {
        let docs = text_docs(&mut gen, args.docs, args.doc_kb * 1000);
        runs.push(
            drain(
                &client,
                db_settings,
                services,
                root,
                Drain {
                    label: "text",
                    embedder: "instant".to_string(),
                    embed_url: &services.embed_url,
                    concurrency: args.concurrency,
                    docs,
                },
            )
            .await?,
        );
    }

    // The real model: on the first server, and then on all of them when
    // several are given (embed.url's comma-separated list), with the same
    // documents, so the two throughputs compare.
    if let Some(urls) = services
        .real_embed_url
        .as_ref()
        .filter(|_| args.real_docs > 0)
    {
        let servers: Vec<&str> = urls.split(',').map(str::trim).collect();
        let docs = text_docs(&mut gen, args.real_docs, args.doc_kb * 1000);
        let mut setups = vec![(servers[0].to_string(), 1)];
        if servers.len() > 1 {
            setups.push((servers.join(","), servers.len()));
        }
        for (embed_url, n) in setups {
            runs.push(
                drain(
                    &client,
                    db_settings,
                    services,
                    root,
                    Drain {
                        label: "text",
                        embedder: if n == 1 {
                            "real model".to_string()
                        } else {
                            format!("real x{n}")
                        },
                        embed_url: &embed_url,
                        concurrency: args.concurrency,
                        docs: docs.clone(),
                    },
                )
                .await?,
            );
        }
    }

    if args.pdf_jobs > 0 {
        let target = (args.pdf_mb * 1e6) as usize;
        let docs = (0..args.pdf_jobs)
            .map(|i| (format!("big-{i}.pdf"), gen.pdf_bytes(target)))
            .collect();
        runs.push(
            drain(
                &client,
                db_settings,
                services,
                root,
                Drain {
                    label: "pdf",
                    embedder: "instant".to_string(),
                    embed_url: &services.embed_url,
                    concurrency: args.pdf_jobs,
                    docs,
                },
            )
            .await?,
        );
    }

    println!();
    println!(
        "{:<16} {:<10} {:>5} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>9} {:>8} {:>8} {:>9} {:>9}",
        "run",
        "embedder",
        "docs",
        "MB",
        "chunks",
        "drain s",
        "docs/s",
        "MB/s",
        "chunks/s",
        "CPU s/MB",
        "CPU %",
        "peak MB",
        "embed req",
        "emb busy"
    );
    for r in &runs {
        let (requests, busy) = match (r.embed, r.utilisation()) {
            (Some(e), Some(u)) if r.embedder != "instant" => {
                (e.requests.to_string(), format!("{:.0}%", u * 100.0))
            }
            (Some(e), _) => (e.requests.to_string(), "n/a".into()),
            _ => ("?".into(), "?".into()),
        };
        println!(
            "{:<16} {:<10} {:>5} {:>7.2} {:>7} {:>7.2} {:>7.1} {:>7.2} {:>8.0} {:>9.3} {:>7.0}% {:>8.1} {:>9} {:>9}",
            r.label,
            r.embedder,
            r.docs,
            r.mb(),
            r.chunks,
            r.wall,
            r.docs as f64 / r.wall,
            r.mb() / r.wall,
            r.chunks as f64 / r.wall,
            r.worker_cpu / r.mb(),
            r.worker_cpu / r.wall * 100.0,
            r.peak_rss_kib as f64 / 1024.0,
            requests,
            busy
        );
    }
    println!(
        "(drain: from the INSERT of the jobs to the last completion; CPU: the worker process's user+system time over \
         the drain, which excludes embedding (another process); CPU %: of one core; peak: the worker's VmHWM; \
         emb busy: the embedding servers' time in the model over the drain, per server, n/a for the instant embedder; \
         real xN: the real model on N servers, embed.url listing them all)"
    );
    Ok(runs)
}

struct Drain<'a> {
    pub(crate) label: &'static str,
    pub(crate) embedder: String,
    pub(crate) embed_url: &'a str,
    pub(crate) concurrency: usize,
    /// (file name, content).
    pub(crate) docs: Vec<(String, Vec<u8>)>,
}

/// Writes the documents, starts a worker, enqueues one ingest job per
/// document and waits until all have completed.
async fn drain(
    client: &tokio_postgres::Client,
    db_settings: &DatabaseSettings,
    services: &Services,
    root: &Path,
    run: Drain<'_>,
) -> Result<E2eRun> {
    let label = format!("{}-{}", run.label, run.embedder.replace(' ', "-"));
    let dir = root.join(&label);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut names = Vec::new();
    let mut bytes = 0;
    for (name, content) in &run.docs {
        std::fs::write(dir.join(name), content)?;
        names.push(name.clone());
        bytes += content.len();
    }
    let n_docs = run.docs.len();
    drop(run.docs);
    sql::truncate(client).await?;
    let collection = services.new_collection(&label.replace('-', "_"));

    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .arg("run")
        .env("DATABASE_URL", &db_settings.url)
        .env(
            "DOCWORKER__WORKER__CONCURRENCY",
            run.concurrency.to_string(),
        )
        .env("DOCWORKER__LOG__LEVEL", "warn")
        .env("DOCWORKER__FILES__UPLOAD_ROOT", &dir)
        .env("DOCWORKER__FILES__AFTER_SUCCESS", "keep")
        .env("DOCWORKER__EMBED__PROVIDER", services.provider)
        .env("DOCWORKER__EMBED__URL", run.embed_url)
        .env("DOCWORKER__EMBED__MODEL", &services.model)
        .env("DOCWORKER__CHROMA__URL", &services.chroma_url)
        .env("DOCWORKER__CHROMA__COLLECTION", &collection)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the worker daemon")?;
    let pid = child.id().unwrap_or(0);

    // Ready when it has run a noop job; then start the clocks.
    sql::NoopInsert::prepare(client)
        .await?
        .insert(client, "ready?")
        .await?;
    wait_for_drain(client, &mut child, Duration::from_secs(60)).await?;
    sql::truncate(client).await?;
    services.reset_embed_stats(run.embed_url).await;
    let stats_before = services.embed_stats(run.embed_url).await;
    let (idle_rss, _) = memory_kib(pid);
    let cpu_before = process_cpu_seconds(pid);
    let machine_before = machine_cpu();
    let processes_before = cpu_by_process();
    let wall = Instant::now();
    sql::insert_ingests(client, &names).await?;
    let outcome = wait_for_drain(client, &mut child, Duration::from_secs(3600)).await;
    let wall = wall.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds(pid) - cpu_before;
    let rss = outcome
        .as_ref()
        .map_or(String::new(), |drain| rss_timeline(&drain.samples));
    let parsers_peak_kib = outcome
        .as_ref()
        .map_or((0, 0), |drain| (drain.with_parsers, drain.parser_hwm));
    let busiest = busiest_processes(&processes_before, &cpu_by_process(), pid);
    let machine = machine_cpu();
    let machine_busy = (machine.0 - machine_before.0) / (machine.1 - machine_before.1).max(1e-9);
    let (_, hwm) = memory_kib(pid);
    let stats_after = services.embed_stats(run.embed_url).await;
    child.start_kill().ok();
    child.wait().await.ok();
    outcome?;

    let sql::RunSummary {
        not_completed: failed,
        retried,
        chunks,
        errors,
    } = sql::run_summary(client).await?;
    if failed != 0 || retried != 0 {
        bail!(
            "{label}: {failed} of {n_docs} jobs did not complete and {retried} needed more than one attempt: {}",
            errors.unwrap_or_default()
        );
    }
    let embed = match (stats_before, stats_after) {
        (Some(b), Some(a)) => Some(EmbedStats {
            requests: a.requests - b.requests,
            inputs: a.inputs - b.inputs,
            busy: a.busy - b.busy,
            max_in_flight: a.max_in_flight,
        }),
        _ => None,
    };
    let result = E2eRun {
        label,
        embedder: run.embedder,
        servers: run.embed_url.split(',').count(),
        docs: n_docs,
        bytes,
        chunks,
        wall,
        worker_cpu: cpu,
        peak_rss_kib: hwm,
        parsers_peak_kib,
        embed,
    };
    print!(
        "  {}: {} documents, {:.2} MB, {} chunks in {:.2} s; worker CPU {:.2} s; RSS idle {:.1} MB, peak {:.1} MB",
        result.label,
        n_docs,
        result.mb(),
        chunks,
        wall,
        cpu,
        idle_rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    match (result.embed, result.utilisation()) {
        (Some(e), Some(u)) => println!(
            "; embedder: {} requests, {} inputs, {:.2} s in the model ({:.0}% of the drain per server), up to {} requests in flight",
            e.requests,
            e.inputs,
            e.busy,
            u * 100.0,
            e.max_in_flight
        ),
        _ => println!("; the embedding server has no /_stats"),
    }
    if parsers_peak_kib.1 > 0 {
        println!(
            "    with its parser processes (sampled every 50 ms): peak {:.1} MB together; the largest parser process's VmHWM {:.1} MB",
            parsers_peak_kib.0 as f64 / 1024.0,
            parsers_peak_kib.1 as f64 / 1024.0
        );
    }
    println!(
        "    RSS over the drain (s: MB): {rss}\n    machine CPU busy {:.0}% of {} cores; CPU seconds over the drain by process: {}",
        machine_busy * 100.0,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        busiest
            .iter()
            .take(6)
            .map(|(name, s)| format!("{name} {s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(result)
}

/// What [`wait_for_drain`] saw of memory.
struct DrainMemory {
    /// The worker's RSS (KiB) as sampled, with the seconds since the start.
    samples: Vec<(f64, u64)>,
    /// The highest sum of the worker's and its parser processes' RSS.
    with_parsers: u64,
    /// The largest VmHWM of a parser process seen.
    parser_hwm: u64,
}

/// Waits until no job is pending or running; fails early if the worker
/// exits. Samples the worker's memory and its parser processes' meanwhile.
async fn wait_for_drain(
    client: &tokio_postgres::Client,
    child: &mut tokio::process::Child,
    timeout: Duration,
) -> Result<DrainMemory> {
    let start = Instant::now();
    let pid = child.id().unwrap_or(0);
    let mut memory = DrainMemory {
        samples: Vec::new(),
        with_parsers: 0,
        parser_hwm: 0,
    };
    loop {
        let rss = memory_kib(pid).0;
        let mut together = rss;
        for parser in children_of(pid) {
            let (parser_rss, parser_hwm) = memory_kib(parser);
            together += parser_rss;
            memory.parser_hwm = memory.parser_hwm.max(parser_hwm);
        }
        memory.with_parsers = memory.with_parsers.max(together);
        memory.samples.push((start.elapsed().as_secs_f64(), rss));
        let open = sql::open_jobs(client).await?;
        if open == 0 {
            return Ok(memory);
        }
        if let Some(status) = child.try_wait()? {
            bail!("the worker exited ({status}) with {open} jobs still open");
        }
        if start.elapsed() > timeout {
            bail!("{open} jobs still open after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The largest RSS sample and when, then the RSS at ten even steps of the
/// drain: "peak 160.2 at 2.9; 0.0: 12.6, 15.1: 150.3, ...".
fn rss_timeline(samples: &[(f64, u64)]) -> String {
    let mb = |kib: u64| kib as f64 / 1024.0;
    let Some(&(end, _)) = samples.last() else {
        return String::new();
    };
    let (peak_at, peak) = samples
        .iter()
        .copied()
        .max_by_key(|&(_, rss)| rss)
        .unwrap_or_default();
    let mut out = format!("peak {:.1} at {peak_at:.1}", mb(peak));
    let mut next = 0.0;
    for &(t, rss) in samples {
        if t >= next {
            out.push_str(&format!("; {t:.1}: {:.1}", mb(rss)));
            next += end / 10.0;
        }
    }
    out
}
