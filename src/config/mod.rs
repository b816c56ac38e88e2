//! Settings: what can be configured, where it comes from, and what is valid.
//!
//! `config/default.toml` is compiled in, so the documented defaults and the
//! real ones can never drift apart. On top of it come the file given with
//! `--config`, then `DOCWORKER__SECTION__KEY` variables, then `DATABASE_URL`.
//! Every value is checked once at start; a bad one is refused with its key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

pub mod tls;

/// The documented defaults; also the reference for every key.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub worker: WorkerSettings,
    pub retry: RetrySettings,
    pub maintenance: MaintenanceSettings,
    pub log: LogSettings,
    pub files: FileSettings,
    pub chunk: ChunkSettings,
    pub embed: EmbedSettings,
    pub chroma: ChromaSettings,
    pub http: HttpSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: String,
    /// When set, the password is read from this file (a Docker secret, a
    /// systemd credential) instead of the URL.
    pub password_file: PathBuf,
    /// libpq's sslmode; the URL's `sslmode` wins.
    pub sslmode: String,
    /// PEM file of the CAs trusted with verify-ca and verify-full; the
    /// URL's `sslrootcert` wins.
    pub sslrootcert: PathBuf,
    pub pool_size: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub concurrency: usize,
    pub listen: bool,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub lease_duration: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub job_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    #[serde(with = "humantime_serde")]
    pub max_outage: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceSettings {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    pub prune_batch_size: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterSuccess {
    Keep,
    Delete,
    Move,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    pub upload_root: PathBuf,
    pub max_file_mb: u64,
    pub max_unpacked_mb: u64,
    pub max_text_mb: u64,
    #[serde(with = "humantime_serde")]
    pub parse_timeout: Duration,
    /// The address space a parser process may use.
    pub parse_memory_mb: u64,
    pub after_success: AfterSuccess,
    pub move_to: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkSettings {
    pub size: usize,
    pub overlap: usize,
    pub tokenizer: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Ollama,
    OpenAi,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedSettings {
    pub provider: Provider,
    pub url: String,
    pub model: String,
    pub api_key: String,
    pub batch_size: usize,
    pub batch_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub tries: u32,
    pub dimension: usize,
    pub context_length: usize,
}

impl EmbedSettings {
    /// The endpoints `url` lists, comma-separated, without trailing slashes.
    pub fn urls(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty())
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChromaSettings {
    pub url: String,
    pub tenant: String,
    pub database: String,
    pub collection: String,
    pub auth_header: String,
    pub token: String,
    pub batch_size: usize,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub enabled: bool,
    pub address: std::net::SocketAddr,
    /// The web dashboard under `/ui/`.
    pub dashboard: bool,
    /// Bearer token for the dashboard's actions; empty: read-only.
    pub dashboard_token: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

impl Settings {
    /// Loads the layered configuration and validates it.
    pub fn load(file: Option<&Path>) -> Result<Settings> {
        let mut builder = config::Config::builder().add_source(defaults());
        if let Some(path) = file {
            if !path.exists() {
                bail!("config file {} does not exist", path.display());
            }
            // Read it once here so that a syntax error names the file as the
            // operator gave it (the config crate prints a path relative to
            // the working directory).
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            let source = config::File::from_str(&text, config::FileFormat::Toml);
            config::Config::builder()
                .add_source(source.clone())
                .build()
                .with_context(|| format!("invalid config file {}", path.display()))?;
            builder = builder.add_source(source);
        }
        refuse_single_underscores(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()))?;
        builder = builder.add_source(
            config::Environment::with_prefix("DOCWORKER")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        if let Ok(url) = std::env::var("DATABASE_URL") {
            if !url.is_empty() {
                builder = builder.set_override("database.url", url)?;
            }
        }
        let merged = builder.build().context("invalid configuration")?;
        let settings: Settings = merged
            .clone()
            .try_deserialize()
            .map_err(|e| name_the_key(&merged, e))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Refuses values that would make the worker misbehave, naming the key.
    pub fn validate(&self) -> Result<()> {
        let w = &self.worker;
        check(
            (1..=1024).contains(&w.concurrency),
            "worker.concurrency",
            format!("must be between 1 and 1024 (got {})", w.concurrency),
        )?;
        check(
            self.database.pool_size >= 4,
            "database.pool_size",
            format!(
                "must be at least 4: the producer, completer, heartbeat and maintenance each need one (got {})",
                self.database.pool_size
            ),
        )?;
        check(
            !self.database.url.trim().is_empty(),
            "database.url",
            "must not be empty".into(),
        )?;
        let h = &self.http;
        check(
            !h.dashboard || h.enabled,
            "http.dashboard",
            "needs http.enabled = true: the dashboard is served by the HTTP listener".into(),
        )?;
        check(
            h.dashboard_token.is_empty() || h.dashboard_token.trim().len() >= 16,
            "http.dashboard_token",
            "must be at least 16 characters (or empty: a read-only dashboard)".into(),
        )?;
        check(
            self.database.password_file.as_os_str().is_empty()
                || self.database.password_file.is_absolute(),
            "database.password_file",
            format!(
                "must be an absolute path (got {:?})",
                self.database.password_file
            ),
        )?;
        let split = tls::split(&self.database.url);
        split
            .rest
            .parse::<tokio_postgres::Config>()
            .with_context(|| {
                "invalid value for database.url: not a PostgreSQL connection string"
            })?;
        tls::SslMode::parse(split.sslmode.as_deref().unwrap_or(&self.database.sslmode))
            .context("invalid value for database.sslmode (or the URL's sslmode)")?;
        check(
            w.poll_interval >= Duration::from_millis(10),
            "worker.poll_interval",
            "must be at least 10ms".into(),
        )?;
        check(
            w.lease_duration >= Duration::from_secs(1),
            "worker.lease_duration",
            "must be at least 1s".into(),
        )?;
        check(
            !w.heartbeat_interval.is_zero() && w.heartbeat_interval * 3 <= w.lease_duration,
            "worker.heartbeat_interval",
            format!(
                "must be non-zero and at most a third of worker.lease_duration ({:?}), so that two missed heartbeats do not lose the lease",
                w.lease_duration
            ),
        )?;
        check(
            !w.job_timeout.is_zero(),
            "worker.job_timeout",
            "must be greater than zero".into(),
        )?;
        check(
            !self.retry.base_delay.is_zero() && self.retry.base_delay <= self.retry.max_delay,
            "retry.base_delay",
            "must be greater than zero and not above retry.max_delay".into(),
        )?;
        check(
            !self.maintenance.interval.is_zero(),
            "maintenance.interval",
            "must be greater than zero".into(),
        )?;
        check(
            (1..=100_000).contains(&self.maintenance.prune_batch_size),
            "maintenance.prune_batch_size",
            "must be between 1 and 100000".into(),
        )?;
        self.validate_pipeline()?;
        check(
            tracing_subscriber::EnvFilter::try_new(&self.log.level).is_ok(),
            "log.level",
            format!("is not a valid tracing filter: {:?}", self.log.level),
        )?;
        Ok(())
    }
}

impl Settings {
    fn validate_pipeline(&self) -> Result<()> {
        let f = &self.files;
        check(
            f.upload_root.is_absolute(),
            "files.upload_root",
            format!("must be an absolute path (got {:?})", f.upload_root),
        )?;
        for (key, mb) in [
            ("files.max_file_mb", f.max_file_mb),
            ("files.max_unpacked_mb", f.max_unpacked_mb),
            ("files.max_text_mb", f.max_text_mb),
        ] {
            check(
                (1..=1 << 20).contains(&mb),
                key,
                format!("must be between 1 and 1048576 (got {mb})"),
            )?;
        }
        // Below this the parser process cannot even map itself and its
        // libraries.
        check(
            (256..=1 << 20).contains(&f.parse_memory_mb),
            "files.parse_memory_mb",
            format!(
                "must be between 256 and 1048576 (got {})",
                f.parse_memory_mb
            ),
        )?;
        check(
            !f.parse_timeout.is_zero(),
            "files.parse_timeout",
            "must be greater than zero".into(),
        )?;
        check(
            f.after_success != AfterSuccess::Move || f.move_to.is_absolute(),
            "files.move_to",
            "must be an absolute directory when files.after_success = \"move\"".into(),
        )?;
        let c = &self.chunk;
        check(
            (16..=100_000).contains(&c.size),
            "chunk.size",
            format!("must be between 16 and 100000 tokens (got {})", c.size),
        )?;
        check(
            c.overlap < c.size,
            "chunk.overlap",
            format!("must be smaller than chunk.size ({})", c.size),
        )?;
        let e = &self.embed;
        let urls = e.urls();
        check(
            !urls.is_empty(),
            "embed.url",
            "must name an embedding server (several: separate them with commas)".into(),
        )?;
        for url in &urls {
            check(
                url.starts_with("http://") || url.starts_with("https://"),
                "embed.url",
                format!("must be http:// or https:// URLs, separated by commas (got {url:?})"),
            )?;
            check(
                urls.iter().filter(|u| *u == url).count() == 1,
                "embed.url",
                format!("names {url} twice"),
            )?;
        }
        check(
            !e.model.trim().is_empty(),
            "embed.model",
            "must not be empty".into(),
        )?;
        check(
            (1..=4096).contains(&e.batch_size),
            "embed.batch_size",
            "must be between 1 and 4096".into(),
        )?;
        check(
            e.batch_bytes >= 1024,
            "embed.batch_bytes",
            "must be at least 1024".into(),
        )?;
        check(
            !e.timeout.is_zero(),
            "embed.timeout",
            "must be greater than zero".into(),
        )?;
        check(
            (1..=20).contains(&e.tries),
            "embed.tries",
            "must be between 1 and 20".into(),
        )?;
        let ch = &self.chroma;
        check(
            ch.url.starts_with("http://") || ch.url.starts_with("https://"),
            "chroma.url",
            format!("must be an http:// or https:// URL (got {:?})", ch.url),
        )?;
        check(
            ch.database.len() >= 3,
            "chroma.database",
            "must be at least 3 characters (a ChromaDB rule)".into(),
        )?;
        check(
            (3..=512).contains(&ch.collection.len()),
            "chroma.collection",
            "must be 3 to 512 characters (a ChromaDB rule)".into(),
        )?;
        check(
            (1..=100_000).contains(&ch.batch_size),
            "chroma.batch_size",
            "must be between 1 and 100000".into(),
        )?;
        check(
            ch.token.is_empty() || !ch.auth_header.trim().is_empty(),
            "chroma.auth_header",
            "must name a header when chroma.token is set".into(),
        )?;
        check(
            !ch.timeout.is_zero(),
            "chroma.timeout",
            "must be greater than zero".into(),
        )?;
        Ok(())
    }
}

/// The config crate names the key only in some of its errors: not for an
/// unknown key, nor for a value its type refuses with a message of its own
/// (a bad duration). Find the key by putting each value that is set, alone,
/// on top of the defaults and seeing which one the defaults do not accept.
fn name_the_key(merged: &config::Config, err: config::ConfigError) -> anyhow::Error {
    let named = matches!(err, config::ConfigError::Type { key: Some(_), .. });
    if !named {
        let mut leaves = Vec::new();
        if let Ok(table) = config::Source::collect(merged) {
            leaf_values("", table, &mut leaves);
        }
        for (key, value) in leaves {
            let alone = config::Config::builder()
                .add_source(defaults())
                .set_override(&key, value)
                .and_then(|b| b.build())
                .and_then(|c| c.try_deserialize::<Settings>());
            if let Err(e) = alone {
                return anyhow::anyhow!("invalid configuration: {key}: {e}");
            }
        }
    }
    anyhow::Error::new(err).context("invalid configuration")
}

/// Every non-table value under `table`, with its dotted key.
fn leaf_values(
    prefix: &str,
    table: config::Map<String, config::Value>,
    out: &mut Vec<(String, config::Value)>,
) {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}.{name}")
        };
        match value.clone().into_table() {
            Ok(inner) => leaf_values(&key, inner, out),
            Err(_) => out.push((key, value)),
        }
    }
}

/// The compiled-in defaults as a configuration source.
/// Every setting's key (`worker.concurrency`), from the defaults.
fn known_keys() -> Vec<String> {
    use config::Source;
    fn walk(prefix: &str, table: config::Map<String, config::Value>, out: &mut Vec<String>) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key
            } else {
                format!("{prefix}.{key}")
            };
            match value.clone().into_table() {
                Ok(inner) if !inner.is_empty() => walk(&path, inner, out),
                _ => out.push(path),
            }
        }
    }
    let mut keys = Vec::new();
    if let Ok(table) = config::Config::builder()
        .add_source(defaults())
        .build()
        .and_then(|c| c.collect())
    {
        walk("", table, &mut keys);
    }
    keys.sort();
    keys
}

/// `DOCWORKER_WORKER_CONCURRENCY=0` (single underscores) would be ignored
/// without a word, the worker running on the default: refuse a variable
/// that reads as a setting written that way, naming the one it meant.
/// Other `DOCWORKER_` variables (`DOCWORKER_TAG`, Compose's image tag)
/// are not settings and pass.
fn refuse_single_underscores(names: impl Iterator<Item = String>) -> Result<()> {
    let keys = known_keys();
    for name in names {
        let Some(rest) = name.strip_prefix("DOCWORKER_") else {
            continue;
        };
        if rest.starts_with('_') {
            continue;
        }
        let flat = rest.to_ascii_lowercase();
        let meant = keys
            .iter()
            .filter(|key| {
                let section = key.split('.').next().unwrap_or_default();
                flat.starts_with(&format!("{section}_"))
            })
            .min_by_key(|key| edit_distance(&key.replace('.', "_"), &flat));
        if let Some(key) = meant {
            bail!(
                "environment variable {name} is not read: settings are DOCWORKER__SECTION__KEY, with double underscores; did you mean {}?",
                env_name(key)
            );
        }
    }
    Ok(())
}

/// The environment variable that sets `key`.
fn env_name(key: &str) -> String {
    format!("DOCWORKER__{}", key.to_ascii_uppercase().replace('.', "__"))
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

fn defaults() -> config::File<config::FileSourceString, config::FileFormat> {
    config::File::from_str(DEFAULT_TOML, config::FileFormat::Toml)
}

fn check(ok: bool, key: &str, why: String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        bail!("invalid value for {key}: {why}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_written_with_single_underscores_are_refused_by_name() {
        let refused = |name: &str| {
            super::refuse_single_underscores(std::iter::once(name.to_string()))
                .map_err(|e| e.to_string())
        };
        let err = refused("DOCWORKER_WORKER_CONCURRENCY").unwrap_err();
        assert!(
            err.contains("did you mean DOCWORKER__WORKER__CONCURRENCY?"),
            "{err}"
        );
        let err = refused("DOCWORKER_FILES_PARSE_TIMOUT").unwrap_err();
        assert!(err.contains("DOCWORKER__FILES__PARSE_TIMEOUT"), "{err}");
        let err = refused("DOCWORKER_DATABASE_URL").unwrap_err();
        assert!(err.contains("DOCWORKER__DATABASE__URL"), "{err}");
        // Not settings: Compose's image tag, the tests' own variables.
        for name in [
            "DOCWORKER_TAG",
            "DOCWORKER_TEST_VENV",
            "DOCWORKER__WORKER__CONCURRENCY",
            "HOME",
        ] {
            assert!(refused(name).is_ok(), "{name}");
        }
        assert!(super::known_keys().contains(&"worker.concurrency".to_string()));
    }

    fn defaults() -> Settings {
        config::Config::builder()
            .add_source(super::defaults())
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap()
    }

    #[test]
    fn documented_defaults_are_valid() {
        defaults().validate().unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut s = defaults();
        s.worker.concurrency = 0;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("worker.concurrency"), "{err}");

        let mut s = defaults();
        s.worker.heartbeat_interval = s.worker.lease_duration;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("worker.heartbeat_interval"), "{err}");
    }

    #[test]
    fn errors_the_config_crate_leaves_keyless_get_their_key() {
        for (key, value) in [("worker.poll_interval", "soon"), ("worker.bogus", "1")] {
            let merged = config::Config::builder()
                .add_source(super::defaults())
                .set_override(key, value)
                .unwrap()
                .build()
                .unwrap();
            let err = merged.clone().try_deserialize::<Settings>().unwrap_err();
            let err = name_the_key(&merged, err).to_string();
            assert!(err.contains(key), "{err}");
        }
    }
}
