//! `worker bench-pipeline`: what the document pipeline costs, measured on a
//! generated corpus, so the figures in BENCHMARKS.md can be reproduced.
//!
//! This module owns the corpus generator (prose in each text format, plus
//! PDFs and .docx files built by [`crate::pipeline::samples`]) and three
//! phases:
//!
//! 1. **Parse + chunk**, in this process on one thread, per format: parsing
//!    alone, chunking alone and both, timed on the thread's own CPU clock
//!    (`/proc/thread-self/schedstat`), so a busy machine slows the wall
//!    clock but not the per-core figure. With the default chunk settings
//!    (characters, 500/50), and with the model's tokenizer when one is given.
//! 2. **End to end**: documents in a temporary upload directory, jobs in a
//!    scratch database, and a real `worker run` child process writing to
//!    its own Chroma collection. The child's CPU time (`/proc/PID/stat`)
//!    over the drain is the worker's own cost: embedding happens in the
//!    embedding server's process. The embedding server's `/_stats` (the
//!    test server has it) gives how much of the drain it spent in the
//!    model: with a real model that must be nearly all of it, or the worker
//!    is what keeps it waiting. Every process's CPU time is read before and
//!    after the drain too, to show which one was the limit.
//! 3. **Peak memory** of a child running several large PDFs at once
//!    (`VmHWM`, and its RSS sampled over the drain to show when).
//!
//! It only prints figures; it asserts nothing but that every job completed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::bench::{self, memory_kib};
use crate::config::{DatabaseSettings, Provider, Settings};
use crate::db;
use crate::pipeline::chunk::{Chunker, Sizer};
use crate::pipeline::embed::{EmbedError, Embedder};
use crate::pipeline::parse::{self, Limits};
use crate::pipeline::samples;
use crate::schema;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Size of each generated document in the parse+chunk phase, in MB
    /// (txt, md, html, csv, json; for docx, of its text).
    #[arg(long, default_value_t = 10.0)]
    pub mb: f64,
    /// Pages of the PDF in the parse+chunk phase.
    #[arg(long, default_value_t = 1000)]
    pub pdf_pages: usize,
    /// Parse and chunk each document at least this many times (and for at
    /// least a second of CPU time each) and report the mean.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// A Hugging Face tokenizer.json: chunk with it as well (as
    /// chunk.tokenizer would).
    #[arg(long, value_name = "PATH")]
    pub tokenizer: Option<PathBuf>,
    /// Text chunked with the tokenizer per format, in MB (it is slow): the
    /// start of each document, up to a paragraph break.
    #[arg(long, default_value_t = 1.0)]
    pub tokenizer_mb: f64,
    /// Only the in-process parse+chunk phase: no database, no services.
    #[arg(long, conflicts_with = "skip_parse")]
    pub parse_only: bool,
    /// Skip the in-process parse+chunk phase.
    #[arg(long)]
    pub skip_parse: bool,
    /// The embedding server for the end-to-end phases; an instant one (the
    /// test server's --instant) measures the worker rather than the model.
    /// Default: embed.url.
    #[arg(long)]
    pub embed_url: Option<String>,
    /// An embedding server running a real model: a smaller end-to-end run
    /// against it shows whether the worker keeps it busy.
    #[arg(long)]
    pub real_embed_url: Option<String>,
    /// Default: chroma.url.
    #[arg(long)]
    pub chroma_url: Option<String>,
    /// The embedding model to ask for. Default: embed.model.
    #[arg(long)]
    pub model: Option<String>,
    /// Documents in the end-to-end run with the instant embedder (txt and
    /// md, alternating).
    #[arg(long, default_value_t = 200)]
    pub docs: usize,
    /// Size of each of those documents, in KB.
    #[arg(long, default_value_t = 50)]
    pub doc_kb: usize,
    /// Documents in the run with the real model.
    #[arg(long, default_value_t = 16)]
    pub real_docs: usize,
    /// The child worker's concurrency in the end-to-end runs.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// PDFs run at once in the memory phase (0: skip it).
    #[arg(long, default_value_t = 4)]
    pub pdf_jobs: usize,
    /// Size of each of those PDFs, in MB.
    #[arg(long, default_value_t = 10.0)]
    pub pdf_mb: f64,
    /// Keep the scratch database, the upload directory and the collections.
    #[arg(long)]
    pub keep: bool,
}

/// Chunk settings of config/default.toml, which the figures are for.
const CHUNK_SIZE: usize = 500;
const CHUNK_OVERLAP: usize = 50;

pub async fn run(settings: &Settings, args: Args) -> Result<()> {
    println!("{}", machine());
    let tokenizer = args.tokenizer.clone();
    let (mb, pdf_pages, repeat) = (args.mb, args.pdf_pages, args.repeat.max(1));
    let tokenizer_bytes = (args.tokenizer_mb * 1e6) as usize;
    let parse_rows = if args.skip_parse {
        Vec::new()
    } else {
        tokio::task::spawn_blocking(move || {
            parse_and_chunk(mb, pdf_pages, repeat, tokenizer.as_deref(), tokenizer_bytes)
        })
        .await??
    };
    if args.parse_only {
        print_targets(&parse_rows, &[], None);
        return Ok(());
    }

    let services = Services::check(settings, &args).await?;
    let (admin, name, scratch) =
        bench::scratch_database(settings, "docworker_bench_pipeline").await?;
    let root =
        std::env::temp_dir().join(format!("docworker-bench-pipeline-{}", std::process::id()));

    let result = end_to_end(&scratch, &services, &args, &root).await;

    if args.keep {
        println!(
            "kept: database {name}, upload directory {}, Chroma collections docworker_bench_{}_*",
            root.display(),
            std::process::id()
        );
    } else {
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        let _ = std::fs::remove_dir_all(&root);
        services.drop_collections().await;
    }
    let runs = result?;
    let pdf_run = runs.iter().find(|r| r.label.starts_with("pdf"));
    print_targets(&parse_rows, &runs, pdf_run);
    Ok(())
}

// ---------------------------------------------------------------------------
// Phase 1: parse + chunk in process

struct ParseRow {
    format: &'static str,
    file_bytes: usize,
    text_bytes: usize,
    pages: usize,
    chunks: usize,
    parse_cpu: f64,
    chunk_cpu: f64,
    /// Wall over CPU time of both, to show how busy the machine was.
    wall_per_cpu: f64,
    /// With the tokenizer, on the start of the text: (text bytes chunked,
    /// chunks, CPU seconds).
    tokenizer: Option<(usize, usize, f64)>,
}

impl ParseRow {
    fn file_mb(&self) -> f64 {
        self.file_bytes as f64 / 1e6
    }
    fn parse_rate(&self) -> f64 {
        self.file_mb() / self.parse_cpu
    }
    fn chunk_rate(&self) -> f64 {
        self.file_mb() / self.chunk_cpu
    }
    fn both_rate(&self) -> f64 {
        self.file_mb() / (self.parse_cpu + self.chunk_cpu)
    }
    fn pages_rate(&self) -> Option<f64> {
        (self.pages > 0).then(|| self.pages as f64 / (self.parse_cpu + self.chunk_cpu))
    }
}

fn parse_and_chunk(
    mb: f64,
    pdf_pages: usize,
    repeat: usize,
    tokenizer: Option<&Path>,
    tokenizer_bytes: usize,
) -> Result<Vec<ParseRow>> {
    let size = (mb * 1e6) as usize;
    let mut gen = Prose::new(1);
    let corpus: Vec<(&'static str, &'static str, Vec<u8>, usize)> = vec![
        ("txt", "corpus.txt", gen.text(size).into_bytes(), 0),
        ("md", "corpus.md", gen.markdown(size).into_bytes(), 0),
        ("html", "corpus.html", gen.html(size).into_bytes(), 0),
        ("csv", "corpus.csv", gen.csv(size).into_bytes(), 0),
        ("json", "corpus.json", gen.json(size).into_bytes(), 0),
        ("docx", "corpus.docx", gen.docx(size), 0),
        ("pdf", "corpus.pdf", gen.pdf_pages(pdf_pages), pdf_pages),
    ];
    let chars = Chunker {
        sizer: Sizer::Characters,
        size: CHUNK_SIZE,
        overlap: CHUNK_OVERLAP,
    };
    let tokens = match tokenizer {
        Some(path) => Some(Chunker {
            sizer: Sizer::load(path)?,
            size: CHUNK_SIZE,
            overlap: CHUNK_OVERLAP,
        }),
        None => None,
    };
    let limits = Limits::default();
    println!();
    println!(
        "Parse + chunk, in process on one thread (each step repeated for at least 1 s of CPU, mean); chunk size {CHUNK_SIZE}, overlap {CHUNK_OVERLAP}, \
         counting characters ({} per token). Rates are of input file MB (10^6 bytes) per second of this thread's CPU time.",
        crate::pipeline::chunk::CHARS_PER_TOKEN
    );
    println!(
        "{:<6} {:>8} {:>8} {:>6} {:>7} {:>11} {:>11} {:>11} {:>8} {:>9}",
        "format",
        "file MB",
        "text MB",
        "pages",
        "chunks",
        "parse MB/s",
        "chunk MB/s",
        "p+c MB/s",
        "pages/s",
        "wall/cpu"
    );
    let mut rows = Vec::new();
    for (format, filename, bytes, pages) in corpus {
        let (parsed, parse_cpu, parse_wall) = measure(repeat, || {
            parse::parse(&bytes, filename, &limits)
                .with_context(|| format!("parsing the generated {format} document"))
        });
        let parsed = parsed?;
        let (chunks, chunk_cpu, chunk_wall) =
            measure(repeat, || chars.chunk(&parsed, usize::MAX).len());
        let tokenizer = tokens.as_ref().map(|t| {
            let prefix = prefix_of(&parsed, tokenizer_bytes);
            let (n, cpu, _) = measure(1, || t.chunk(&prefix, usize::MAX).len());
            (prefix.text.len(), n, cpu)
        });
        let row = ParseRow {
            format,
            file_bytes: bytes.len(),
            text_bytes: parsed.text.len(),
            pages,
            chunks,
            parse_cpu,
            chunk_cpu,
            wall_per_cpu: (parse_wall + chunk_wall) / (parse_cpu + chunk_cpu),
            tokenizer,
        };
        println!(
            "{:<6} {:>8.2} {:>8.2} {:>6} {:>7} {:>11.1} {:>11.1} {:>11.1} {:>8} {:>9.2}",
            row.format,
            row.file_mb(),
            row.text_bytes as f64 / 1e6,
            if pages > 0 {
                pages.to_string()
            } else {
                "-".into()
            },
            row.chunks,
            row.parse_rate(),
            row.chunk_rate(),
            row.both_rate(),
            row.pages_rate().map_or("-".into(), |r| format!("{r:.1}")),
            row.wall_per_cpu
        );
        rows.push(row);
    }
    if let Some(path) = tokenizer {
        println!();
        println!(
            "Chunked with the tokenizer {} instead (sizes in its tokens), on the first {:.1} MB of each text, once; \
             p+c and pages/s are for the whole document, chunking time scaled to its length:",
            path.display(),
            tokenizer_bytes as f64 / 1e6
        );
        println!(
            "{:<6} {:>8} {:>7} {:>12} {:>16} {:>11} {:>8}",
            "format", "text MB", "chunks", "bytes/chunk", "chunk text MB/s", "p+c MB/s", "pages/s"
        );
        for row in &rows {
            let (text, n, cpu) = row.tokenizer.expect("tokenizer given");
            let both = row.parse_cpu + cpu * row.text_bytes as f64 / text.max(1) as f64;
            println!(
                "{:<6} {:>8.2} {:>7} {:>12.0} {:>16.2} {:>11.2} {:>8}",
                row.format,
                text as f64 / 1e6,
                n,
                text as f64 / n.max(1) as f64,
                text as f64 / 1e6 / cpu,
                row.file_mb() / both,
                if row.pages > 0 {
                    format!("{:.1}", row.pages as f64 / both)
                } else {
                    "-".into()
                }
            );
        }
    }
    Ok(rows)
}

/// The start of a parsed text, up to `bytes` (cut after a paragraph
/// break when there is one), with its pages.
fn prefix_of(parsed: &parse::Parsed, bytes: usize) -> parse::Parsed {
    let mut cut = bytes.min(parsed.text.len());
    while !parsed.text.is_char_boundary(cut) {
        cut -= 1;
    }
    if cut < parsed.text.len() {
        if let Some(i) = parsed.text[..cut].rfind("\n\n") {
            cut = i + 2;
        }
    }
    parse::Parsed {
        format: parsed.format,
        text: parsed.text[..cut].to_string(),
        pages: parsed
            .pages
            .iter()
            .filter(|p| p.start < cut)
            .copied()
            .collect(),
        encoding: parsed.encoding,
    }
}

/// Runs `f` at least `runs` times and until it has used a second of CPU
/// time, and returns its last result and the mean CPU and wall seconds of
/// one run. The thread's CPU clock advances in scheduler ticks, so short
/// runs are only measured well in bulk.
fn measure<T>(runs: usize, mut f: impl FnMut() -> T) -> (T, f64, f64) {
    let cpu = thread_cpu_ns();
    let wall = Instant::now();
    let mut n = 0;
    loop {
        let value = f();
        n += 1;
        let used = thread_cpu_ns().saturating_sub(cpu) as f64 / 1e9;
        if n >= runs && used >= 1.0 {
            return (
                value,
                used / n as f64,
                wall.elapsed().as_secs_f64() / n as f64,
            );
        }
    }
}

/// This thread's CPU time in nanoseconds (the first field of its
/// schedstat), or 0 where /proc does not say.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Phases 2 and 3: a real worker

/// The services of the end-to-end phases, checked to be up.
struct Services {
    http: reqwest::Client,
    embed_url: String,
    real_embed_url: Option<String>,
    chroma_url: String,
    model: String,
    provider: &'static str,
    tenant: String,
    database: String,
    collections: std::sync::Mutex<Vec<String>>,
}

impl Services {
    async fn check(settings: &Settings, args: &Args) -> Result<Services> {
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
                Err(
                    EmbedError::Transient(e) | EmbedError::Permanent(e) | EmbedError::TooLong(e),
                ) => {
                    bail!("the embedding server given by {flag} ({url}) is not usable: {e}")
                }
            }
        }
        Ok(services)
    }

    /// The embedding server's counters, when it has `/_stats` (the test
    /// server does; Ollama does not).
    async fn embed_stats(&self, url: &str) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}/_stats", url.trim_end_matches('/')))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    async fn reset_embed_stats(&self, url: &str) {
        let _ = self
            .http
            .post(format!("{}/_stats/reset", url.trim_end_matches('/')))
            .send()
            .await;
    }

    fn new_collection(&self, label: &str) -> String {
        let name = format!("docworker_bench_{}_{label}", std::process::id());
        self.collections.lock().unwrap().push(name.clone());
        name
    }

    async fn drop_collections(&self) {
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

/// One end-to-end run's figures.
struct E2eRun {
    label: String,
    embedder: &'static str,
    docs: usize,
    bytes: usize,
    chunks: i64,
    wall: f64,
    worker_cpu: f64,
    peak_rss_kib: u64,
    /// (requests, inputs, busy seconds, most requests in flight at once).
    embed: Option<(u64, u64, f64, u64)>,
}

impl E2eRun {
    fn mb(&self) -> f64 {
        self.bytes as f64 / 1e6
    }
    fn utilisation(&self) -> Option<f64> {
        self.embed.map(|(_, _, busy, _)| busy / self.wall)
    }
}

async fn end_to_end(
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
                    embedder: "instant",
                    embed_url: &services.embed_url,
                    concurrency: args.concurrency,
                    docs,
                },
            )
            .await?,
        );
    }

    if let Some(url) = services
        .real_embed_url
        .as_ref()
        .filter(|_| args.real_docs > 0)
    {
        let docs = text_docs(&mut gen, args.real_docs, args.doc_kb * 1000);
        runs.push(
            drain(
                &client,
                db_settings,
                services,
                root,
                Drain {
                    label: "text",
                    embedder: "real model",
                    embed_url: url,
                    concurrency: args.concurrency,
                    docs,
                },
            )
            .await?,
        );
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
                    embedder: "instant",
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
            (Some((req, _, _, _)), Some(u)) if r.embedder != "instant" => {
                (req.to_string(), format!("{:.0}%", u * 100.0))
            }
            (Some((req, _, _, _)), _) => (req.to_string(), "n/a".into()),
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
         emb busy: the embedding server's time in the model over the drain, n/a for the instant embedder)"
    );
    Ok(runs)
}

struct Drain<'a> {
    label: &'static str,
    embedder: &'static str,
    embed_url: &'a str,
    concurrency: usize,
    /// (file name, content).
    docs: Vec<(String, Vec<u8>)>,
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
    client.batch_execute("TRUNCATE job_tasks CASCADE").await?;
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
    client
        .execute(
            "INSERT INTO job_tasks (filename, task_type) VALUES ('ready?', 'noop')",
            &[],
        )
        .await?;
    wait_for_drain(client, &mut child, Duration::from_secs(60)).await?;
    client.batch_execute("TRUNCATE job_tasks CASCADE").await?;
    services.reset_embed_stats(run.embed_url).await;
    let stats_before = services.embed_stats(run.embed_url).await;
    let (idle_rss, _) = memory_kib(pid);
    let cpu_before = process_cpu_seconds(pid);
    let machine_before = machine_cpu();
    let processes_before = cpu_by_process();
    let wall = Instant::now();
    client
        .execute(
            "INSERT INTO job_tasks (filename, file_path, task_type)
             SELECT f, f, 'ingest' FROM unnest($1::text[]) AS f",
            &[&names],
        )
        .await?;
    let outcome = wait_for_drain(client, &mut child, Duration::from_secs(3600)).await;
    let wall = wall.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds(pid) - cpu_before;
    let rss = outcome
        .as_ref()
        .map_or(String::new(), |samples| rss_timeline(samples));
    let busiest = busiest_processes(&processes_before, &cpu_by_process(), pid);
    let machine = machine_cpu();
    let machine_busy = (machine.0 - machine_before.0) / (machine.1 - machine_before.1).max(1e-9);
    let (_, hwm) = memory_kib(pid);
    let stats_after = services.embed_stats(run.embed_url).await;
    child.start_kill().ok();
    child.wait().await.ok();
    outcome?;

    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE status <> 'completed'),
                    count(*) FILTER (WHERE attempt <> 1),
                    coalesce(sum(total_chunks), 0)::int8,
                    string_agg(DISTINCT error_message, ' | ')
               FROM job_tasks",
            &[],
        )
        .await?;
    let failed: i64 = row.get(0);
    let retried: i64 = row.get(1);
    let chunks: i64 = row.get(2);
    let errors: Option<String> = row.get(3);
    if failed != 0 || retried != 0 {
        bail!(
            "{label}: {failed} of {n_docs} jobs did not complete and {retried} needed more than one attempt: {}",
            errors.unwrap_or_default()
        );
    }
    let embed = match (stats_before, stats_after) {
        (Some(b), Some(a)) => {
            let int = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
            let float = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
            Some((
                int(&a, "embed_requests") - int(&b, "embed_requests"),
                int(&a, "inputs") - int(&b, "inputs"),
                float(&a, "busy_seconds") - float(&b, "busy_seconds"),
                int(&a, "max_in_flight"),
            ))
        }
        _ => None,
    };
    let result = E2eRun {
        label,
        embedder: run.embedder,
        docs: n_docs,
        bytes,
        chunks,
        wall,
        worker_cpu: cpu,
        peak_rss_kib: hwm,
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
    match result.embed {
        Some((requests, inputs, busy, in_flight)) => println!(
            "; embedder: {requests} requests, {inputs} inputs, {busy:.2} s in the model ({:.0}% of the drain), up to {in_flight} requests in flight",
            busy / wall * 100.0
        ),
        None => println!("; the embedding server has no /_stats"),
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

/// Waits until no job is pending or running; fails early if the worker
/// exits. Returns the worker's RSS (KiB) as sampled meanwhile, with the
/// seconds since the start.
async fn wait_for_drain(
    client: &tokio_postgres::Client,
    child: &mut tokio::process::Child,
    timeout: Duration,
) -> Result<Vec<(f64, u64)>> {
    let start = Instant::now();
    let pid = child.id().unwrap_or(0);
    let mut samples = Vec::new();
    loop {
        samples.push((start.elapsed().as_secs_f64(), memory_kib(pid).0));
        let open: i64 = client
            .query_one(
                "SELECT count(*) FROM job_tasks WHERE status NOT IN ('completed', 'error', 'cancelled')",
                &[],
            )
            .await?
            .get(0);
        if open == 0 {
            return Ok(samples);
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

/// A process's user + system CPU time in seconds, all threads, including
/// threads that have exited (/proc/PID/stat, in USER_HZ = 100 ticks).
fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may contain spaces: fields are counted after ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15; field 3 is fields[0].
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// (busy, total) CPU time of the whole machine in seconds, from /proc/stat.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0) as f64 / 100.0;
    let idle = at(3) + at(4);
    let total: f64 = (0..8).map(at).sum();
    (total - idle, total)
}

/// CPU seconds used so far by every process, by pid, with a name to group
/// them by: the command, or for Python the script and whether it is the
/// instant embedder.
fn cpu_by_process() -> std::collections::HashMap<u32, (String, f64)> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let comm = stat
            .split_once('(')
            .and_then(|(_, rest)| rest.rsplit_once(')'))
            .map_or("?", |(c, _)| c);
        let name = if comm.starts_with("python") {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let script = args
                .get(1)
                .and_then(|a| a.rsplit('/').next())
                .unwrap_or(comm);
            if args.iter().any(|a| a == "--instant") {
                format!("{script} --instant")
            } else {
                script.to_string()
            }
        } else {
            comm.to_string()
        };
        out.insert(pid, (name, process_cpu_seconds(pid)));
    }
    out
}

/// CPU seconds between two snapshots, summed by name, most first; the
/// worker under test is named "worker (bench child)".
fn busiest_processes(
    before: &std::collections::HashMap<u32, (String, f64)>,
    after: &std::collections::HashMap<u32, (String, f64)>,
    worker: u32,
) -> Vec<(String, f64)> {
    let mut by_name: std::collections::HashMap<String, f64> = std::collections::HashMap::new();
    for (pid, (name, seconds)) in after {
        let earlier = before.get(pid).map_or(0.0, |(_, s)| *s);
        let name = if *pid == worker {
            "worker (bench child)".to_string()
        } else if *pid == std::process::id() {
            "bench-pipeline".to_string()
        } else {
            name.clone()
        };
        *by_name.entry(name).or_default() += seconds - earlier;
    }
    let mut v: Vec<(String, f64)> = by_name.into_iter().filter(|(_, s)| *s >= 0.005).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

// ---------------------------------------------------------------------------
// The verdict

fn print_targets(parse: &[ParseRow], runs: &[E2eRun], pdf_run: Option<&E2eRun>) {
    let verdict = |ok: bool| if ok { "met" } else { "NOT MET" };
    println!();
    println!("Targets (this machine):");
    for row in parse
        .iter()
        .filter(|r| r.format == "txt" || r.format == "md")
    {
        let r = row.both_rate();
        println!(
            "  {} parse+chunk >= 50 MB/s per core: {r:.1} MB/s, {}",
            row.format,
            verdict(r >= 50.0)
        );
    }
    if let Some(r) = parse.iter().find_map(ParseRow::pages_rate) {
        println!(
            "  PDF >= 20 pages/s per core: {r:.1} pages/s, {}",
            verdict(r >= 20.0)
        );
    }
    if let Some(run) = pdf_run {
        let mb = run.peak_rss_kib as f64 / 1024.0;
        println!(
            "  peak RSS < 150 MB with {} jobs of {:.0} MB PDFs at once: {mb:.1} MB, {}",
            run.docs,
            run.mb() / run.docs as f64,
            verdict(mb < 150.0)
        );
    }
    for run in runs.iter().filter(|r| r.embedder != "instant") {
        if let Some(u) = run.utilisation() {
            println!(
                "  embedder kept busy (>= 95% of the drain in the model): {:.1}%, {}",
                u * 100.0,
                verdict(u >= 0.95)
            );
        }
    }
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "docworker {} bench-pipeline on {cpus} CPUs ({model}), load average {}",
        env!("CARGO_PKG_VERSION"),
        load.join(" ")
    )
}

// ---------------------------------------------------------------------------
// The corpus

/// `n` documents of about `bytes` each, plain text and Markdown alternating.
fn text_docs(gen: &mut Prose, n: usize, bytes: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                (format!("doc-{i:04}.txt"), gen.text(bytes).into_bytes())
            } else {
                (format!("doc-{i:04}.md"), gen.markdown(bytes).into_bytes())
            }
        })
        .collect()
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "system",
    "document",
    "process",
    "between",
    "information",
    "government",
    "development",
    "important",
    "however",
    "because",
    "through",
    "research",
    "different",
    "following",
    "example",
    "management",
    "analysis",
    "available",
    "particular",
    "education",
    "experience",
    "community",
    "energy",
    "measurement",
    "temperature",
    "agreement",
    "contract",
    "customer",
    "invoice",
    "quarterly",
    "revenue",
    "shipment",
    "warehouse",
    "pipeline",
    "network",
    "database",
    "protocol",
    "patient",
    "treatment",
    "clinical",
    "evidence",
    "vaccine",
    "antibody",
    "immune",
    "river",
    "mountain",
    "harbour",
    "village",
    "century",
    "emperor",
    "treaty",
    "café",
    "naïve",
    "Zürich",
    "façade",
    "résumé",
    "approximately",
    "notwithstanding",
    "responsibilities",
    "characteristics",
    "2024",
    "17",
    "3.5",
    "42%",
    "(see",
    "below)",
    "e.g.",
    "i.e.",
    "US$",
    "well-known",
];

/// Deterministic, vaguely English prose in the formats the parser reads.
struct Prose {
    rng: StdRng,
}

impl Prose {
    fn new(seed: u64) -> Prose {
        Prose {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn word(&mut self) -> &'static str {
        // Short words are common: bias towards the start of the list.
        let a = self.rng.gen_range(0..WORDS.len());
        let b = self.rng.gen_range(0..WORDS.len());
        WORDS[a.min(b)]
    }

    fn words(&mut self, n: usize) -> String {
        let mut s = String::new();
        for i in 0..n {
            if i > 0 {
                s.push(' ');
            }
            s.push_str(self.word());
        }
        s
    }

    fn sentence(&mut self) -> String {
        let n = self.rng.gen_range(6..24);
        let mut s = self.words(n);
        if let Some(first) = s.get(..1) {
            let upper = first.to_uppercase();
            s.replace_range(..1, &upper);
        }
        s.push(if self.rng.gen_ratio(1, 10) { '?' } else { '.' });
        s
    }

    fn paragraph(&mut self) -> String {
        let n = self.rng.gen_range(2..8);
        (0..n)
            .map(|_| self.sentence())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn text(&mut self, bytes: usize) -> String {
        let mut out = String::with_capacity(bytes + 2000);
        while out.len() < bytes {
            out.push_str(&self.paragraph());
            out.push_str("\n\n");
        }
        out
    }

    fn markdown(&mut self, bytes: usize) -> String {
        let mut out = String::with_capacity(bytes + 2000);
        let mut section = 0;
        while out.len() < bytes {
            section += 1;
            let level = if section % 5 == 1 { "#" } else { "##" };
            let n = self.rng.gen_range(2..7);
            out.push_str(&format!("{level} {section}. {}\n\n", self.words(n)));
            for _ in 0..self.rng.gen_range(1..5) {
                match self.rng.gen_range(0..10) {
                    0 | 1 => {
                        for _ in 0..self.rng.gen_range(2..6) {
                            out.push_str(&format!("- {}\n", self.sentence()));
                        }
                        out.push('\n');
                    }
                    2 => {
                        out.push_str("```rust\n");
                        for i in 0..self.rng.gen_range(2..8) {
                            out.push_str(&format!(
                                "let value_{i} = compute({i}, \"{}\");\n",
                                self.word()
                            ));
                        }
                        out.push_str("```\n\n");
                    }
                    3 => {
                        out.push_str("| item | amount | note |\n| --- | ---: | --- |\n");
                        for i in 0..self.rng.gen_range(2..6) {
                            let note = self.words(4);
                            out.push_str(&format!("| {} | {} | {note} |\n", self.word(), i * 17));
                        }
                        out.push('\n');
                    }
                    _ => {
                        let p = self.paragraph();
                        out.push_str(
                            &p.replacen(" the ", " **the** ", 1)
                                .replacen(" of ", " *of* ", 1),
                        );
                        out.push_str("\n\n");
                    }
                }
            }
        }
        out
    }

    fn html(&mut self, bytes: usize) -> String {
        let mut out = String::with_capacity(bytes + 2000);
        out.push_str(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Generated report</title>\n\
             <style>body { font-family: sans-serif; } .note { color: #555; }</style>\n\
             <script>window.analytics = { id: 42, track: function (e) { return e; } };</script>\n\
             </head><body>\n<nav><a href=\"/\">Home</a> | <a href=\"/docs\">Docs</a></nav>\n<main>\n",
        );
        let mut section = 0;
        while out.len() < bytes {
            section += 1;
            let n = self.rng.gen_range(2..7);
            out.push_str(&format!("<h2 id=\"s{section}\">{}</h2>\n", self.words(n)));
            for _ in 0..self.rng.gen_range(1..5) {
                if self.rng.gen_ratio(1, 5) {
                    out.push_str("<ul>\n");
                    for _ in 0..self.rng.gen_range(2..6) {
                        out.push_str(&format!("  <li>{}</li>\n", self.sentence()));
                    }
                    out.push_str("</ul>\n");
                } else {
                    let p = self.paragraph();
                    let p = p
                        .replacen(" the ", " <b>the</b> ", 1)
                        .replacen(" of ", " <a href=\"#top\">of</a> ", 1)
                        .replace('&', "&amp;");
                    out.push_str(&format!("<p class=\"note\">{p}</p>\n"));
                }
            }
        }
        out.push_str("</main>\n<footer>&copy; 2024 Example Ltd.</footer>\n</body></html>\n");
        out
    }

    fn csv(&mut self, bytes: usize) -> String {
        let mut out = String::with_capacity(bytes + 2000);
        out.push_str("id,customer,category,description,amount,date\n");
        let mut id = 0;
        while out.len() < bytes {
            id += 1;
            let description = self.sentence().replace('"', "\"\"");
            let customer = self.words(2);
            let category = self.word();
            out.push_str(&format!(
                "{id},{customer},{category},\"{description}, {}\",{}.{:02},2024-{:02}-{:02}\n",
                self.word(),
                self.rng.gen_range(1..100_000),
                self.rng.gen_range(0..100),
                self.rng.gen_range(1..13),
                self.rng.gen_range(1..29)
            ));
        }
        out
    }

    fn json(&mut self, bytes: usize) -> String {
        let mut items = Vec::new();
        let mut len = 0;
        while len < bytes {
            let n = self.rng.gen_range(2..6);
            let item = serde_json::json!({
                "id": items.len(),
                "title": self.words(n),
                "body": self.paragraph(),
                "tags": [self.word(), self.word()],
                "meta": {"author": self.words(2), "year": self.rng.gen_range(1990..2025), "draft": false},
            });
            let text = serde_json::to_string_pretty(&item).expect("json");
            len += text.len() + 2;
            items.push(item);
        }
        serde_json::to_string_pretty(&items).expect("json")
    }

    /// A .docx whose text is about `bytes`.
    fn docx(&mut self, bytes: usize) -> Vec<u8> {
        let mut paragraphs = Vec::new();
        let mut len = 0;
        while len < bytes {
            let p = self.paragraph();
            len += p.len() + 2;
            paragraphs.push(p);
        }
        let refs: Vec<&str> = paragraphs.iter().map(String::as_str).collect();
        samples::docx(&refs)
    }

    /// One page's worth of text: 46 lines of at most 80 characters, as a
    /// 12 pt page holds.
    fn page(&mut self) -> String {
        let mut lines: Vec<String> = Vec::new();
        let mut line = String::new();
        while lines.len() < 46 {
            let word = self.word();
            if line.len() + word.len() + 1 > 80 {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.join("\n")
    }

    fn pdf_pages(&mut self, pages: usize) -> Vec<u8> {
        let pages: Vec<String> = (0..pages).map(|_| self.page()).collect();
        let refs: Vec<&str> = pages.iter().map(String::as_str).collect();
        samples::pdf(&refs)
    }

    /// A PDF of about `bytes`.
    fn pdf_bytes(&mut self, bytes: usize) -> Vec<u8> {
        // Measure one page's cost in the file, then make that many.
        let probe = self.pdf_pages(20).len();
        let pages = (bytes * 20 / probe).max(1);
        self.pdf_pages(pages)
    }
}
