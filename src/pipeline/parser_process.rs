//! Parsing in a child process that can be stopped.
//!
//! A parser thread that outruns its time limit cannot be killed: a
//! pathological file (html5ever is quadratic on some inputs, a PDF's
//! content stream can loop) would keep a core busy after its job has
//! failed, and enough of them starve the worker. So a file is parsed by a
//! child process, this same binary run as `worker __parse-child`, which
//! the worker kills when the job's `files.parse_timeout` passes. The child
//! also limits itself: address space to `files.parse_memory_mb` (an
//! allocation beyond it fails the parse, not the host), CPU time to the
//! time limit plus a second (in case the worker itself is gone), and it
//! dies with its parent.
//!
//! The child gets the file's bytes on stdin, never a path (the worker has
//! already opened the file safely beneath the upload root and checked its
//! size), and an empty environment. It answers on stdout with one JSON line (the format, encoding and
//! page starts, or the error) followed by the text.
//!
//! Text formats under [`INLINE_BELOW`] bytes are parsed in the worker on a
//! blocking thread instead: starting a process costs more than parsing them,
//! and no parser can run away for long on so little input (the time limit
//! still applies to them, as before). PDFs and .docx files always go to a
//! child, whatever their size: both decompress (a few KB can inflate to tens
//! of MB), and their parsers are the ones with known panics.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::parse::{self, Format, Limits, Page, Parsed};
use crate::queue::JobError;

/// The hidden subcommand the child runs.
pub const CHILD_COMMAND: &str = "__parse-child";

/// Files smaller than this are parsed in process. Measured in `worker
/// bench-pipeline`: a child costs about 4 ms a document (more than parsing
/// 64 KB of anything but PDF takes; embedding that much takes a second), and
/// the worst HTML of this size (unclosed `<div>`s, quadratic in html5ever)
/// parses in about half a second.
pub const INLINE_BELOW: usize = 64 * 1024;

/// How the worker runs parsers.
#[derive(Debug, Clone)]
pub struct ParserProcess {
    pub limits: Limits,
    pub timeout: Duration,
    pub memory_bytes: u64,
}

/// The binary the child runs: this one. /proc/self/exe rather than the path
/// the worker was started from: it is this very binary even after a package
/// upgrade replaced the file on disk.
fn program() -> PathBuf {
    if cfg!(target_os = "linux") {
        PathBuf::from("/proc/self/exe")
    } else {
        std::env::current_exe().unwrap_or_else(|_| PathBuf::from("worker"))
    }
}

impl ParserProcess {
    /// Parses a file: in process if it is a small text file, in a child
    /// otherwise.
    pub async fn parse(&self, bytes: Vec<u8>, filename: String) -> Result<Parsed, JobError> {
        if in_process(&bytes, &filename) {
            let limits = self.limits;
            return super::blocking("parsing", self.timeout, move || {
                parse::parse(&bytes, &filename, &limits).map_err(|e| JobError::permanent(e.message))
            })
            .await;
        }
        self.parse_in_child(bytes, &filename).await
    }

    /// Parses a file in a child process, whatever its size.
    pub async fn parse_in_child(&self, bytes: Vec<u8>, filename: &str) -> Result<Parsed, JobError> {
        let cpu_seconds = self.timeout.as_secs() + 2;
        let mut child = tokio::process::Command::new(program())
            .arg(CHILD_COMMAND)
            .arg(self.limits.max_unpacked_bytes.to_string())
            .arg(self.limits.max_text_bytes.to_string())
            .arg(self.memory_bytes.to_string())
            .arg(cpu_seconds.to_string())
            .arg(filename)
            // Nothing of the worker's environment (the database password
            // may be in it) for a process that reads hostile input.
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| JobError::transient(format!("could not start the parser process: {e}")))?;
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        // The answer is at most the text limit and its header line.
        let answer_cap = self.limits.max_text_bytes + 1_000_000;
        let exchange = async {
            let write = async move {
                // A child that died early closes its stdin; what it died of
                // is in its exit status.
                let _ = stdin.write_all(&bytes).await;
                drop(stdin);
                // The file is not needed once sent: freed now, not when the
                // text has come back.
                drop(bytes);
            };
            let mut answer = Vec::new();
            let mut errors = Vec::new();
            let mut stdout = (&mut stdout).take(answer_cap);
            let read = stdout.read_to_end(&mut answer);
            // Read to the end, keeping the start: a child that fills the
            // pipe must not block on it.
            let read_errors = async {
                let mut buffer = [0u8; 8192];
                while let Ok(n @ 1..) = stderr.read(&mut buffer).await {
                    if errors.len() < 64 * 1024 {
                        errors.extend_from_slice(&buffer[..n]);
                    }
                }
            };
            let ((), read, ()) = tokio::join!(write, read, read_errors);
            let status = child.wait().await;
            (read.map(|_| answer), errors, status)
        };
        let (answer, errors, status) = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(done) => done,
            Err(_) => {
                // Dropping the exchange dropped nothing of the child's but
                // its pipes; kill it and reap it now.
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(timed_out(self.timeout));
            }
        };
        let status =
            status.map_err(|e| JobError::transient(format!("the parser process was lost: {e}")))?;
        let answer =
            answer.map_err(|e| JobError::transient(format!("reading the parser's answer: {e}")))?;
        if answer.len() as u64 >= answer_cap {
            // The child enforces the text limit; an answer this long is not
            // one it wrote.
            return Err(JobError::permanent(
                "The parser's answer was longer than the extracted-text limit allows.",
            ));
        }
        if status.success() {
            if let Some(parsed) = decode(answer) {
                return parsed;
            }
        }
        Err(self.failure(status, &String::from_utf8_lossy(&errors)))
    }

    /// Why a child ended without an answer, for the job's row.
    fn failure(&self, status: std::process::ExitStatus, stderr: &str) -> JobError {
        use std::os::unix::process::ExitStatusExt;
        if stderr.contains("memory allocation of") {
            return JobError::permanent(format!(
                "Parsing this file needed more than files.parse_memory_mb ({} MB) of memory; \
                 the file is too large or too complex. Split it, or raise the setting.",
                self.memory_bytes / 1_000_000
            ));
        }
        match status.signal() {
            // SIGXCPU: the child's own CPU limit, the time limit's backstop.
            Some(24) => timed_out(self.timeout),
            // Nobody here sent it: the kernel's OOM killer, or an operator.
            Some(9) => JobError::transient(
                "The parser process was killed from outside (out of memory on the host?); \
                 the job will be tried again.",
            ),
            Some(signal) => JobError::permanent(format!(
                "This file could not be read: the parser crashed (signal {signal}). \
                 The file is probably damaged or in an unusual variant of its format."
            )),
            None => {
                let last = stderr.lines().last().unwrap_or("no message");
                JobError::transient(format!("The parser process failed ({status}): {last}"))
            }
        }
    }
}

/// Whether a file is parsed in the worker: a small file, not a PDF or a
/// .docx.
fn in_process(bytes: &[u8], filename: &str) -> bool {
    bytes.len() < INLINE_BELOW
        && !matches!(
            parse::detect(bytes, filename),
            Ok(Format::Pdf | Format::Docx)
        )
}

fn timed_out(limit: Duration) -> JobError {
    JobError::permanent(format!(
        "Parsing took longer than files.parse_timeout ({}); the file is too large or too complex.",
        humantime::format_duration(limit)
    ))
}

/// The child's answer, before the text.
#[derive(Serialize, Deserialize)]
struct Header {
    /// Set when the file could not be parsed: the message for the job.
    error: Option<String>,
    format: Option<String>,
    encoding: Option<String>,
    /// Page starts as (byte offset, page number).
    pages: Vec<(usize, u32)>,
}

fn decode(mut answer: Vec<u8>) -> Option<Result<Parsed, JobError>> {
    let newline = answer.iter().position(|&b| b == b'\n')?;
    let header: Header = serde_json::from_slice(&answer[..newline]).ok()?;
    if let Some(message) = header.error {
        return Some(Err(JobError::permanent(message)));
    }
    let format = Format::from_name(header.format.as_deref()?)?;
    // The text in place, not copied: it is the largest thing a job holds.
    answer.drain(..=newline);
    let text = String::from_utf8(answer).ok()?;
    let encoding = match header.encoding {
        Some(label) => Some(encoding_rs::Encoding::for_label(label.as_bytes())?.name()),
        None => None,
    };
    let pages = header
        .pages
        .into_iter()
        .map(|(start, number)| Page { start, number })
        .collect();
    Some(Ok(Parsed {
        format,
        text,
        pages,
        encoding,
    }))
}

/// `worker __parse-child MAX_UNPACKED MAX_TEXT MEMORY CPU_SECONDS FILENAME`:
/// the child's whole life. Not for people; the worker runs it.
pub fn child_main(args: &[OsString]) -> ExitCode {
    let number = |i: usize| -> Option<u64> { args.get(i)?.to_str()?.parse().ok() };
    let (Some(max_unpacked), Some(max_text), Some(memory), Some(cpu)) =
        (number(0), number(1), number(2), number(3))
    else {
        eprintln!(
            "usage: worker {CHILD_COMMAND} MAX_UNPACKED MAX_TEXT MEMORY CPU_SECONDS FILENAME"
        );
        return ExitCode::from(2);
    };
    let filename = args
        .get(4)
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Err(e) = confine(memory, cpu) {
        eprintln!("parser process: cannot set its limits: {e}");
        return ExitCode::from(1);
    }
    let mut bytes = Vec::new();
    if let Err(e) = std::io::stdin().lock().read_to_end(&mut bytes) {
        eprintln!("parser process: reading the file: {e}");
        return ExitCode::from(1);
    }
    let limits = Limits {
        max_unpacked_bytes: max_unpacked,
        max_text_bytes: max_text,
    };
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        parse::parse(&bytes, &filename, &limits)
    }));
    drop(bytes);
    let (header, text) = match result {
        Ok(Ok(parsed)) => (
            Header {
                error: None,
                format: Some(parsed.format.as_str().to_string()),
                encoding: parsed.encoding.map(str::to_string),
                pages: parsed.pages.iter().map(|p| (p.start, p.number)).collect(),
            },
            parsed.text,
        ),
        Ok(Err(e)) => (error_header(e.message), String::new()),
        Err(panic) => {
            let why = super::panic_text(&*panic);
            (
                error_header(format!(
                    "This file could not be read: the parser failed while parsing ({why}). The file is probably damaged or in an unusual variant of its format."
                )),
                String::new(),
            )
        }
    };
    let mut out = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut out, &header)
        .map_err(std::io::Error::from)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.write_all(text.as_bytes()))
        .and_then(|()| out.flush());
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(1),
    }
}

fn error_header(message: String) -> Header {
    Header {
        error: Some(message),
        format: None,
        encoding: None,
        pages: Vec::new(),
    }
}

/// The child's own limits: address space, CPU time, and death with the
/// worker.
fn confine(memory: u64, cpu_seconds: u64) -> std::io::Result<()> {
    use rustix::process::{setrlimit, Resource, Rlimit};
    let limit = |current: u64, maximum: u64| Rlimit {
        current: Some(current),
        maximum: Some(maximum),
    };
    setrlimit(Resource::As, limit(memory, memory))?;
    // The soft limit sends SIGXCPU, the hard one SIGKILL a second later.
    setrlimit(Resource::Cpu, limit(cpu_seconds, cpu_seconds + 1))?;
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples;

    #[test]
    fn only_small_text_files_parse_in_the_worker() {
        assert!(in_process(b"Hello.", "a.txt"));
        assert!(in_process(b"<p>Hello.</p>", "a.html"));
        assert!(!in_process(&vec![b'a'; INLINE_BELOW], "a.txt"));
        let pdf = samples::pdf(&["Hello."]);
        let docx = samples::docx(&["Hello."]);
        assert!(pdf.len() < INLINE_BELOW && docx.len() < INLINE_BELOW);
        assert!(!in_process(&pdf, "a.pdf"));
        assert!(!in_process(&docx, "a.docx"));
    }
}
