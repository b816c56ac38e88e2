//! Reloading the configuration on SIGHUP (`systemctl reload`, `docker kill
//! -s HUP`), without dropping or re-running a job.
//!
//! The file and the environment are read again and validated as at start;
//! a configuration that does not load changes nothing. Of what changed,
//! what can change while jobs run is applied: the log level and format,
//! `worker.concurrency` (more slots are claimed at once; fewer, as running
//! jobs finish), `embed.url` (new requests go to the new servers), the
//! retry backoff (for failures from now on) and the dashboard's token. The database and the
//! listener are in use and keep their values, and so does everything else
//! (chunking, the model, leases...): each is named in the log as needing a
//! restart. The next reload compares against what is in force.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use futures_util::StreamExt;
use signal_hook::consts::SIGHUP;
use signal_hook_tokio::Signals;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::observe::telemetry;
use crate::ops::systemd;
use crate::pipeline::Pipeline;
use crate::queue::retry::RetryPolicy;

/// What a reload changes in the running worker.
pub struct Live {
    pub concurrency: watch::Sender<usize>,
    pub retry: watch::Sender<RetryPolicy>,
    pub pipeline: Arc<Pipeline>,
    pub dashboard_token: watch::Sender<String>,
}

/// Where the configuration came from, to read it again.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The `--config` file.
    pub file: Option<PathBuf>,
    /// `run --concurrency N`: it wins over the file at each reload too.
    pub concurrency_override: Option<usize>,
}

pub struct Reloader {
    pub source: ConfigSource,
    /// What is in force.
    pub current: Settings,
    pub live: Live,
}

/// A changed setting a reload does not apply, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub key: &'static str,
    pub why: &'static str,
}

/// The changed settings, sorted by what a reload does with them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub apply: Vec<&'static str>,
    pub keep: Vec<Kept>,
}

const IN_USE: &str = "in use by the running worker: restart to change it";
const RESTART: &str = "read at start only: restart to change it";

/// Compares two configurations, setting by setting for what a reload
/// applies, section by section for the rest.
pub fn plan(old: &Settings, new: &Settings) -> Plan {
    let mut plan = Plan::default();
    let mut apply = |changed: bool, key| {
        if changed {
            plan.apply.push(key);
        }
    };
    apply(old.log.level != new.log.level, "log.level");
    apply(old.log.format != new.log.format, "log.format");
    apply(
        old.worker.concurrency != new.worker.concurrency,
        "worker.concurrency",
    );
    apply(old.embed.urls() != new.embed.urls(), "embed.url");
    apply(
        old.retry.base_delay != new.retry.base_delay,
        "retry.base_delay",
    );
    apply(
        old.retry.max_delay != new.retry.max_delay,
        "retry.max_delay",
    );
    apply(
        old.http.dashboard_token != new.http.dashboard_token,
        "http.dashboard_token",
    );

    let differ =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let mut keep = |changed: bool, key, why| {
        if changed {
            plan.keep.push(Kept { key, why });
        }
    };
    keep(differ(&old.database, &new.database), "database", IN_USE);
    keep(old.http.enabled != new.http.enabled, "http.enabled", IN_USE);
    keep(old.http.address != new.http.address, "http.address", IN_USE);
    keep(
        old.http.dashboard != new.http.dashboard,
        "http.dashboard",
        RESTART,
    );
    // The rest of [worker] and [embed]: everything but what was applied.
    let mut worker = new.worker.clone();
    worker.concurrency = old.worker.concurrency;
    keep(differ(&old.worker, &worker), "worker", RESTART);
    let mut embed = new.embed.clone();
    embed.url = old.embed.url.clone();
    keep(differ(&old.embed, &embed), "embed", RESTART);
    keep(
        differ(&old.maintenance, &new.maintenance),
        "maintenance",
        RESTART,
    );
    keep(differ(&old.files, &new.files), "files", RESTART);
    keep(differ(&old.chunk, &new.chunk), "chunk", RESTART);
    keep(differ(&old.chroma, &new.chroma), "chroma", RESTART);
    plan
}

impl Reloader {
    /// Reloads on every SIGHUP until `stop`.
    pub fn on_sighup(mut self, stop: CancellationToken) -> Result<()> {
        let mut signals = Signals::new([SIGHUP])?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    signal = signals.next() => {
                        if signal.is_none() {
                            return;
                        }
                        systemd::reloading();
                        self.reload();
                        systemd::ready();
                    }
                }
            }
        });
        Ok(())
    }

    /// One reload: load, compare, apply what may change.
    pub fn reload(&mut self) {
        let loaded = Settings::load(self.source.file.as_deref()).and_then(|mut s| {
            if let Some(n) = self.source.concurrency_override {
                s.worker.concurrency = n;
            }
            s.validate()?;
            Ok(s)
        });
        let mut new = match loaded {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "configuration not reloaded: the one in force stays");
                return;
            }
        };
        let plan = plan(&self.current, &new);
        for kept in &plan.keep {
            tracing::warn!(
                setting = kept.key,
                "changed setting not applied: {}",
                kept.why
            );
        }
        if plan.apply.contains(&"log.level") || plan.apply.contains(&"log.format") {
            if let Err(e) = telemetry::reload(&new.log) {
                tracing::error!(error = %e, "log settings not reloaded");
                new.log = self.current.log.clone();
            }
        }
        self.live.concurrency.send_replace(new.worker.concurrency);
        self.live
            .retry
            .send_replace(RetryPolicy::from_settings(&new.retry));
        if plan.apply.contains(&"embed.url") {
            self.live.pipeline.set_embed_urls(new.embed.urls());
        }
        self.live
            .dashboard_token
            .send_replace(new.http.dashboard_token.clone());
        tracing::info!(
            applied = ?plan.apply,
            concurrency = new.worker.concurrency,
            "configuration reloaded"
        );
        // What stays in force for what was kept, so that the next reload
        // compares against the truth.
        let current = &self.current;
        new.database = current.database.clone();
        let token = new.http.dashboard_token.clone();
        new.http = current.http.clone();
        new.http.dashboard_token = token;
        let concurrency = new.worker.concurrency;
        new.worker = current.worker.clone();
        new.worker.concurrency = concurrency;
        let url = new.embed.url.clone();
        new.embed = current.embed.clone();
        new.embed.url = url;
        new.maintenance = current.maintenance.clone();
        new.files = current.files.clone();
        new.chunk = current.chunk.clone();
        new.chroma = current.chroma.clone();
        self.current = new;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_applies_what_may_change_and_names_the_rest() {
        let old = Settings::load(None).unwrap();
        let mut new = old.clone();
        assert_eq!(plan(&old, &new), Plan::default());
        new.worker.concurrency = 8;
        new.log.level = "debug".into();
        new.embed.url = "http://a:11434, http://b:11434".into();
        new.retry.max_delay = std::time::Duration::from_secs(60);
        new.database.url = "postgres://elsewhere/db".into();
        new.http.address = "127.0.0.1:1".parse().unwrap();
        new.chunk.size = 300;
        new.worker.lease_duration = std::time::Duration::from_secs(99);
        let p = plan(&old, &new);
        assert_eq!(
            p.apply,
            vec![
                "log.level",
                "worker.concurrency",
                "embed.url",
                "retry.max_delay"
            ]
        );
        let kept: Vec<_> = p.keep.iter().map(|k| k.key).collect();
        assert_eq!(kept, vec!["database", "http.address", "worker", "chunk"]);
        assert_eq!(p.keep[0].why, IN_USE);
        assert_eq!(p.keep[3].why, RESTART);
    }
}
