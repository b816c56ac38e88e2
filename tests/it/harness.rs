//! Test harness: real PostgreSQL, one database per test, real worker processes.
//!
//! `TEST_DATABASE_URL` (a superuser URL) is used when set. Otherwise the
//! harness starts a throwaway cluster from the PostgreSQL server binaries on
//! this machine (initdb + pg_ctl, as the `postgres` user when run as root),
//! shared by every test of this run and stopped when the test process exits.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

pub const WORKER: &str = env!("CARGO_BIN_EXE_worker");

/// How long a one-shot `worker` command (`--once`, `migrate`, ...) may take
/// before the harness kills it and fails the test.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(120);

/// Keeps heavy tests and timing-sensitive tests apart. cargo runs tests on
/// several threads; a test that saturates the machine (a million-row insert,
/// thousands of jobs across several workers) makes tight timing bounds in the
/// test running beside it fail for reasons that have nothing to do with the
/// code under test.
static LOAD_GATE: RwLock<()> = RwLock::const_new(());

/// For heavy tests: runs alone among the tests that take [`timed`] (and
/// other heavy ones). Hold the guard for the whole test.
pub async fn exclusive() -> RwLockWriteGuard<'static, ()> {
    LOAD_GATE.write().await
}

/// For tests with tight timing bounds: never runs beside an [`exclusive`]
/// test (timed tests may run beside each other). Hold the guard for the
/// whole test.
pub async fn timed() -> RwLockReadGuard<'static, ()> {
    LOAD_GATE.read().await
}

/// A PostgreSQL server to create test databases in.
pub struct Cluster {
    /// URL of the maintenance database, e.g. postgres://postgres@127.0.0.1:5433/postgres
    admin_url: String,
    /// Set when this harness started the server (and may restart it).
    owned: Option<OwnedServer>,
}

struct OwnedServer {
    bindir: PathBuf,
    data: PathBuf,
    root: PathBuf,
    port: u16,
}

static SHARED: OnceLock<Cluster> = OnceLock::new();

/// The cluster every test shares.
pub fn shared() -> &'static Cluster {
    SHARED.get_or_init(|| match std::env::var("TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Cluster {
            admin_url: url,
            owned: None,
        },
        _ => Cluster::start_throwaway(true),
    })
}

fn postgres_bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.sort();
    candidates
        .into_iter()
        .rev()
        .find(|d| d.join("initdb").exists())
        .unwrap_or_else(|| {
            panic!(
                "no PostgreSQL server binaries found (looked for initdb via pg_config and in /usr/lib/postgresql/*/bin). \
                 Install PostgreSQL (e.g. `apt-get install postgresql`) or set TEST_DATABASE_URL to a superuser URL."
            )
        })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a server binary, as `postgres` when we are root (initdb refuses root).
fn pg_command(bin: &Path, args: &[&str]) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin).args(args);
        c
    } else {
        let mut c = Command::new(bin);
        c.args(args);
        c
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// Starts a private server. `reap_with_process` makes it stop when this
    /// test process exits (for the shared one, which is never dropped).
    pub fn start_throwaway(reap_with_process: bool) -> Cluster {
        Self::start_throwaway_with(reap_with_process, None)
    }

    /// A private server with `ssl = on`, serving this certificate and key
    /// (PEM files); it still accepts connections without TLS.
    pub fn start_with_tls(cert: &Path, key: &Path) -> Cluster {
        Self::start_throwaway_with(false, Some((cert, key)))
    }

    fn start_throwaway_with(reap_with_process: bool, tls: Option<(&Path, &Path)>) -> Cluster {
        let bindir = postgres_bindir();
        let root = std::env::temp_dir().join(format!("docworker-test-pg-{}", Uuid::new_v4()));
        let data = root.join("data");
        std::fs::create_dir_all(&root).unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&root)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the test cluster directory failed");
        }
        let initdb = pg_command(
            &bindir.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )
        .stdout(Stdio::null())
        .output()
        .expect("running initdb");
        assert!(
            initdb.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        if let Some((cert, key)) = tls {
            for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
                let target = data.join(to);
                std::fs::copy(from, &target).unwrap();
                let mode = std::os::unix::fs::PermissionsExt::from_mode(0o600);
                std::fs::set_permissions(&target, mode).unwrap();
                if is_root() {
                    let ok = Command::new("chown")
                        .arg("postgres:postgres")
                        .arg(&target)
                        .status()
                        .unwrap()
                        .success();
                    assert!(ok, "chown of {to} failed");
                }
            }
            let conf = data.join("postgresql.conf");
            let mut text = std::fs::read_to_string(&conf).unwrap();
            text.push_str(
                "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            );
            std::fs::write(&conf, text).unwrap();
        }
        let port = free_port();
        let server = OwnedServer {
            bindir,
            data,
            root,
            port,
        };
        server.start();
        if reap_with_process {
            // Stop the server and delete its files once this process is gone.
            let script = format!(
                "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop}; rm -rf '{root}'",
                pid = std::process::id(),
                stop = server.stop_command_line(),
                root = server.root.display()
            );
            // Deliberately never waited for: it must outlive this process.
            #[allow(clippy::zombie_processes)]
            Command::new("sh")
                .args(["-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawning the cluster reaper");
        }
        Cluster {
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            owned: Some(server),
        }
    }

    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// A URL for database `name` on this server.
    pub fn url_for(&self, name: &str) -> String {
        let mut cfg: tokio_postgres::Config = self.admin_url.parse().unwrap();
        cfg.dbname(name);
        let host = match &cfg.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg.get_user().unwrap_or("postgres");
        match cfg.get_password() {
            Some(pw) => format!(
                "postgres://{user}:{}@{host}:{port}/{name}",
                String::from_utf8_lossy(pw)
            ),
            None => format!("postgres://{user}@{host}:{port}/{name}"),
        }
    }

    /// Creates an empty database; `migrate` also applies docworker's schema.
    pub async fn database(&self, migrate: bool) -> TestDb {
        let name = format!("dw_test_{}", Uuid::new_v4().simple());
        let admin = connect(&self.admin_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let url = self.url_for(&name);
        // Only a server this harness did not start outlives the run: drop the
        // database there when the test is done. A throwaway cluster goes away
        // with all its databases anyway.
        let drop_on = self.owned.is_none().then(|| DropOnExit {
            admin_url: self.admin_url.clone(),
            name: name.clone(),
        });
        let mut client = connect(&url).await;
        if migrate {
            docworker::store::schema::migrate(&mut client)
                .await
                .unwrap();
        }
        TestDb {
            url,
            client,
            drop_on,
        }
    }

    /// Restarts the server (fast shutdown: every connection is cut).
    pub fn restart(&self) {
        let server = self
            .owned
            .as_ref()
            .expect("only a harness-started server can be restarted");
        server.stop();
        server.start();
    }
}

impl OwnedServer {
    fn start(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=400 -c shared_buffers=128MB",
            self.port,
            self.root.display()
        );
        let log = self.root.join("server.log");
        let out = pg_command(
            &self.bindir.join("pg_ctl"),
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .stdout(Stdio::null())
        .output()
        .expect("running pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn stop(&self) {
        let out = pg_command(
            &self.bindir.join("pg_ctl"),
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        )
        .stdout(Stdio::null())
        .output()
        .expect("running pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn stop_command_line(&self) -> String {
        let pg_ctl = self.bindir.join("pg_ctl");
        let data = self.data.display();
        if is_root() {
            format!(
                "runuser -u postgres -- {} -D '{data}' -m immediate stop",
                pg_ctl.display()
            )
        } else {
            format!("{} -D '{data}' -m immediate stop", pg_ctl.display())
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(server) = &self.owned {
            let _ = Command::new("sh")
                .args(["-c", &server.stop_command_line()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(&server.root);
        }
    }
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// One test's own database.
pub struct TestDb {
    pub url: String,
    pub client: Client,
    /// Set when the database lives on an external server (TEST_DATABASE_URL).
    drop_on: Option<DropOnExit>,
}

/// A database to drop from an external server once its test is over.
struct DropOnExit {
    admin_url: String,
    name: String,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(target) = self.drop_on.take() else {
            return;
        };
        // Drop may run inside the test's runtime (where blocking on another
        // future is not allowed) or during a panic: use a thread with its own
        // small runtime, wait for it, and ignore every error.
        let dropper = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let _ = tokio::time::timeout(Duration::from_secs(30), async {
                    let Ok((client, conn)) =
                        tokio_postgres::connect(&target.admin_url, NoTls).await
                    else {
                        return;
                    };
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    let _ = client
                        .batch_execute(&format!(
                            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                            target.name
                        ))
                        .await;
                })
                .await;
            });
        });
        let _ = dropper.join();
    }
}

impl TestDb {
    /// Inserts `n` noop jobs with `options`; returns their ids.
    pub async fn noop_jobs(&self, n: usize, options: serde_json::Value) -> Vec<Uuid> {
        self.client
            .query(
                "INSERT INTO job_tasks (filename, task_type, options)
                 SELECT 'job-' || g, 'noop', $2 FROM generate_series(1, $1) g
                 RETURNING id",
                &[&(n as i32), &options],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    pub async fn noop_job(&self, options: serde_json::Value) -> Uuid {
        self.noop_jobs(1, options).await[0]
    }

    pub async fn status(&self, id: Uuid) -> String {
        self.client
            .query_one("SELECT status::text FROM job_tasks WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0)
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.client.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Waits until `sql` (returning one bigint) reaches `want`, or panics.
    pub async fn wait_count(&self, sql: &str, want: i64, timeout: Duration) {
        let start = Instant::now();
        loop {
            let got = self.count(sql).await;
            if got == want {
                return;
            }
            if start.elapsed() > timeout {
                panic!("waited {timeout:?} for `{sql}` to be {want}; it is {got}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the job has `status`; returns how long that took.
    pub async fn wait_status(&self, id: Uuid, status: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let got = self.status(id).await;
            if got == status {
                return start.elapsed();
            }
            if start.elapsed() > timeout {
                panic!("waited {timeout:?} for job {id} to be {status}; it is {got}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Settings tuned so that leases, sweeps and retries happen in test time.
pub const FAST: &[(&str, &str)] = &[
    ("DOCWORKER__WORKER__LEASE_DURATION", "3s"),
    ("DOCWORKER__WORKER__HEARTBEAT_INTERVAL", "500ms"),
    ("DOCWORKER__WORKER__POLL_INTERVAL", "1s"),
    ("DOCWORKER__WORKER__SHUTDOWN_GRACE", "2s"),
    ("DOCWORKER__MAINTENANCE__INTERVAL", "500ms"),
    ("DOCWORKER__RETRY__BASE_DELAY", "200ms"),
    ("DOCWORKER__RETRY__MAX_DELAY", "2s"),
    // Ingest jobs wait while the upload root is missing; tests without
    // files of their own still want a present one.
    ("DOCWORKER__FILES__UPLOAD_ROOT", "/tmp"),
];

/// A `worker` process; killed on drop. Its log goes to a file.
pub struct WorkerProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl WorkerProcess {
    /// `worker run` against `url` with [`FAST`] settings, then `env` on top.
    pub fn spawn(url: &str, env: &[(&str, &str)]) -> WorkerProcess {
        Self::spawn_args(url, &["run"], env)
    }

    pub fn spawn_args(url: &str, args: &[&str], env: &[(&str, &str)]) -> WorkerProcess {
        let log =
            std::env::temp_dir().join(format!("docworker-test-worker-{}.log", Uuid::new_v4()));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(WORKER);
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", url)
            .env("DOCWORKER__LOG__LEVEL", "info,docworker=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        for (k, v) in FAST.iter().chain(env) {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawning worker");
        WorkerProcess { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} failed");
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit; returns its exit code (None: signal).
    /// Inside a multi-thread runtime the wait moves off the runtime's
    /// threads (`block_in_place`), so tasks such as database connections
    /// keep running meanwhile.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            tokio::task::block_in_place(|| self.wait_exit_blocking(timeout))
        } else {
            self.wait_exit_blocking(timeout)
        }
    }

    fn wait_exit_blocking(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if start.elapsed() > timeout {
                panic!(
                    "worker {} did not exit within {timeout:?}; log:\n{}",
                    self.pid(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the worker logged `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.logs().contains(needle) {
            if start.elapsed() > timeout {
                panic!(
                    "worker never logged {needle:?} within {timeout:?}; log:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!(
                "worker {} log kept at {}",
                self.child.id(),
                self.log.display()
            );
        }
    }
}

/// Runs the worker binary to completion; returns (exit code, stdout, stderr).
/// Panics (after killing it) if it runs longer than [`COMMAND_DEADLINE`].
pub fn run_worker(url: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(WORKER);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", url);
    for (k, v) in FAST.iter().chain(env) {
        cmd.env(k, v);
    }
    run_command(cmd, COMMAND_DEADLINE)
}

/// Runs `cmd` (stdin closed, stdout and stderr captured) and waits at most
/// `deadline` for it; returns (exit code or -1 for a signal, stdout, stderr).
/// A command still running at the deadline is killed and the test fails with
/// what it printed. Blocking: call it off the async threads.
pub fn run_command(mut cmd: Command, deadline: Duration) -> (i32, String, String) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
    // Read both pipes while waiting, so a chatty process never blocks on a
    // full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the command") {
            break Some(status);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = stdout.join().unwrap_or_default();
    let err = stderr.join().unwrap_or_default();
    match status {
        Some(status) => (status.code().unwrap_or(-1), out, err),
        None => panic!(
            "{what} did not finish within {deadline:?} and was killed\nstdout:\n{out}\nstderr:\n{err}"
        ),
    }
}

#[test]
fn run_command_captures_output_and_exit_code() {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
    let got = run_command(cmd, Duration::from_secs(10));
    assert_eq!(got, (3, "out\n".to_string(), "err\n".to_string()));
}

#[test]
#[should_panic(expected = "did not finish within")]
fn run_command_kills_a_command_past_its_deadline() {
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    run_command(cmd, Duration::from_millis(200));
}

/// A connection pool like the daemon's, for driving its code in-process.
pub fn pool(url: &str) -> deadpool_postgres::Pool {
    let settings = docworker::config::DatabaseSettings {
        url: url.to_owned(),
        password_file: Default::default(),
        sslmode: "prefer".into(),
        sslrootcert: Default::default(),
        pool_size: 4,
        connect_timeout: Duration::from_secs(5),
    };
    docworker::db::pool(&settings, "docworker test").unwrap()
}

/// The daemon's own write-cycle statement run in-process under a chosen
/// worker id: claims as that worker would and records outcomes as it would
/// (a late one included).
pub struct ActingWorker {
    completer: docworker::queue::completer::Completer,
    pool: deadpool_postgres::Pool,
}

impl ActingWorker {
    pub fn new(url: &str, worker_id: &str) -> ActingWorker {
        ActingWorker {
            completer: docworker::queue::completer::Completer::new(
                worker_id,
                tokio::sync::watch::channel(docworker::queue::retry::RetryPolicy {
                    base_delay: Duration::from_millis(200),
                    max_delay: Duration::from_secs(2),
                })
                .1,
                Duration::from_secs(30),
                &[docworker::tasks::NOOP],
            ),
            pool: pool(url),
        }
    }

    /// Claims up to `limit` due jobs.
    pub async fn claim(&self, limit: i64) -> Vec<docworker::store::ClaimedJob> {
        self.completer
            .write(&self.pool, &[], limit, &[])
            .await
            .unwrap()
            .claimed
    }

    /// Records one outcome (claiming nothing); returns what became of it.
    pub async fn record(
        &self,
        finished: docworker::queue::completer::Finished,
    ) -> Option<docworker::store::Written> {
        let mut cycle = self
            .completer
            .write(&self.pool, std::slice::from_ref(&finished), 0, &[])
            .await
            .unwrap();
        assert!(cycle.claimed.is_empty());
        cycle.written.pop()
    }
}
