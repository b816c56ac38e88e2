//! `worker bench-pipeline`: what the document pipeline costs, measured on a
//! generated corpus, so the figures in BENCHMARKS.md can be reproduced.
//!
//! This module owns the corpus generator (prose in each text format, plus
//! PDFs and .docx files built by [`crate::samples`]) and three
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

mod corpus_stats;
mod end_to_end;
mod parse;

use std::path::PathBuf;

use anyhow::Result;

use super::scratch_database;
use crate::config::Settings;
use end_to_end::{end_to_end, E2eRun, Services};
use parse::{parse_and_chunk, ParseRow};

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
    /// against it shows whether the worker keeps it busy. Several,
    /// comma-separated: the run goes once on the first and once on all of
    /// them, to show what the others add.
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
    /// Instead of the benchmark: chunk every file under this directory (real
    /// documents) and measure the chunks with --tokenizer (required).
    #[arg(long, value_name = "DIR", requires = "tokenizer")]
    pub corpus: Option<PathBuf>,
    /// Keep the scratch database, the upload directory and the collections.
    #[arg(long)]
    pub keep: bool,
}

/// Chunk settings of config/default.toml, which the figures are for.
const CHUNK_SIZE: usize = 500;
const CHUNK_OVERLAP: usize = 50;

pub async fn run(settings: &Settings, args: Args) -> Result<()> {
    if let (Some(dir), Some(tokenizer)) = (args.corpus.clone(), args.tokenizer.clone()) {
        return tokio::task::spawn_blocking(move || corpus_stats::corpus_stats(&dir, &tokenizer))
            .await?;
    }
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
    if !args.skip_parse {
        parse::isolation_cost().await?;
    }
    if args.parse_only {
        print_targets(&parse_rows, &[], None);
        return Ok(());
    }

    let services = Services::check(settings, &args).await?;
    let (admin, name, scratch) = scratch_database(settings, "docworker_bench_pipeline").await?;
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
        let together = run.parsers_peak_kib.0 as f64 / 1024.0;
        println!(
            "  peak RSS < 100 MB with {} jobs of {:.0} MB PDFs at once: the worker {mb:.1} MB, {}; with its parser processes {together:.1} MB, {}",
            run.docs,
            run.mb() / run.docs as f64,
            verdict(mb < 100.0),
            verdict(together < 100.0)
        );
    }
    for run in runs.iter().filter(|r| r.embedder != "instant") {
        if let Some(u) = run.utilisation() {
            println!(
                "  embedder kept busy (>= 95% of the drain in the model, per server), {}: {:.1}%, {}",
                run.embedder,
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
