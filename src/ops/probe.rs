//! `worker health` and `worker stats`: asking a running worker how it is,
//! for a container healthcheck or a person.
//!
//! Both ask the daemon on this host through its HTTP listener
//! (`http.address`), because only the daemon knows whether its own main
//! loop turns and what it has done. `stats` also reads the queue from the
//! database itself, so it is useful with no daemon running.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::config::{HttpSettings, Settings};
use crate::store::stats::QueueSnapshot;

/// `/readyz` runs checks of up to 3 s each, concurrently.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where this host's daemon answers: a wildcard listen address is asked on
/// loopback.
fn daemon_url(http: &HttpSettings) -> Result<String> {
    if !http.enabled {
        bail!(
            "the worker's HTTP listener is off (http.enabled = false); \
             set DOCWORKER__HTTP__ENABLED=true for the daemon and this command"
        );
    }
    let mut address = http.address;
    if address.ip().is_unspecified() {
        address.set_ip(match address {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(format!("http://{address}"))
}

async fn get(url: &str) -> Result<(u16, String)> {
    let client = reqwest::Client::builder().timeout(PROBE_TIMEOUT).build()?;
    let response = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("no worker answered at {url}"))?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

/// Which of the daemon's checks `worker health` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthCheck {
    /// `/healthz`: the main loop turns.
    Live,
    /// `/healthz?with=database`: and PostgreSQL answers.
    Database,
    /// `/readyz`: every dependency answers.
    Ready,
}

/// True when the daemon answers the check with 200. Prints what it said.
pub async fn health(http: &HttpSettings, check: HealthCheck) -> Result<bool> {
    let path = match check {
        HealthCheck::Live => "/healthz",
        HealthCheck::Database => "/healthz?with=database",
        HealthCheck::Ready => "/readyz",
    };
    let (status, body) = get(&format!("{}{path}", daemon_url(http)?)).await?;
    print!("{body}");
    Ok(status == 200)
}

/// Prints the queue (from the database) and, when this host's daemon
/// answers, its readiness and what it has done since it started.
pub async fn stats(settings: &Settings, client: &tokio_postgres::Client) -> Result<()> {
    let q = QueueSnapshot::read(client).await?;
    println!("queue (whole table):");
    for (status, n) in &q.by_status {
        println!("  {status:<12} {n:>8}");
    }
    println!(
        "  due now {}, waiting for a retry or run_at {}, oldest due job waiting {:.1}s",
        q.due,
        q.scheduled,
        q.oldest_due_age.as_secs_f64()
    );
    let base = match daemon_url(&settings.http) {
        Ok(base) => base,
        Err(e) => {
            println!("this host's worker: not asked ({e})");
            return Ok(());
        }
    };
    let (ready, metrics) = match (
        get(&format!("{base}/readyz")).await,
        get(&format!("{base}/metrics")).await,
    ) {
        (Ok(ready), Ok((_, metrics))) => (ready, metrics),
        (Err(e), _) | (_, Err(e)) => {
            println!("this host's worker: {e:#}");
            return Ok(());
        }
    };
    let verdict = if ready.0 == 200 { "ready" } else { "NOT READY" };
    println!("this host's worker ({base}): {verdict}");
    for line in ready.1.lines() {
        println!("  {line}");
    }
    println!("since it started:");
    for line in summarize(&metrics) {
        println!("  {line}");
    }
    Ok(())
}

/// The daemon's own counters and histograms from its Prometheus text, one
/// line per series that has seen anything: counters as they are,
/// histograms as count and mean.
/// The queue gauges are left out (printed above from the database).
fn summarize(exposition: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut sums = std::collections::HashMap::new();
    for line in exposition.lines() {
        if line.starts_with('#') || line.contains("_bucket{") {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if value == 0.0 {
            // Nothing happened there yet: not worth a person's line.
            continue;
        }
        if let Some(name) = without(series, "_sum") {
            sums.insert(name, value);
        } else if let Some(name) = without(series, "_count") {
            let sum = sums.get(&name).copied().unwrap_or(0.0);
            let mean = if value > 0.0 { sum / value } else { 0.0 };
            lines.push(format!("{name}  count {value}  mean {mean:.3}s"));
        } else if without(series, "_total").is_some() {
            lines.push(format!("{series}  {value}"));
        }
    }
    lines
}

/// `name<suffix>{labels}` (or without labels) → `name{labels}`.
fn without(series: &str, suffix: &str) -> Option<String> {
    let (name, labels) = series.split_at(series.find('{').unwrap_or(series.len()));
    name.strip_suffix(suffix)
        .map(|name| format!("{name}{labels}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarize_keeps_counters_and_folds_histograms() {
        let text = "\
# TYPE docworker_retries_total counter
docworker_retries_total 3
docworker_listener_reconnects_total 0
docworker_stage_duration_seconds_sum{stage=\"parsing\"} 0
docworker_stage_duration_seconds_count{stage=\"parsing\"} 0
docworker_requests_total{service=\"chroma\",op=\"upsert\"} 7
docworker_queue_depth 12
docworker_pickup_latency_seconds_bucket{le=\"0.01\"} 1
docworker_pickup_latency_seconds_sum 0.5
docworker_pickup_latency_seconds_count 2
docworker_job_duration_seconds_sum{task_type=\"noop\",outcome=\"completed\"} 3
docworker_job_duration_seconds_count{task_type=\"noop\",outcome=\"completed\"} 4
";
        assert_eq!(
            summarize(text),
            vec![
                "docworker_retries_total  3",
                "docworker_requests_total{service=\"chroma\",op=\"upsert\"}  7",
                "docworker_pickup_latency_seconds  count 2  mean 0.250s",
                "docworker_job_duration_seconds{task_type=\"noop\",outcome=\"completed\"}  count 4  mean 0.750s",
            ]
        );
    }

    #[test]
    fn a_wildcard_listener_is_asked_on_loopback() {
        let http = HttpSettings {
            enabled: true,
            address: "0.0.0.0:9187".parse().unwrap(),
            dashboard: false,
            dashboard_token: String::new(),
        };
        assert_eq!(daemon_url(&http).unwrap(), "http://127.0.0.1:9187");
        let off = HttpSettings {
            enabled: false,
            ..http
        };
        assert!(daemon_url(&off)
            .unwrap_err()
            .to_string()
            .contains("http.enabled"));
    }
}
