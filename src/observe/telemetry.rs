//! Logging: tracing-subscriber as text for people or JSON for shippers.
//! Each job runs in a `job` span carrying its id, attempt and task type, so
//! every line a job logs can be traced back to its row.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Colour only for a person at a terminal: journald, files and pipes get
/// plain text. `NO_COLOR` (set and not empty) turns it off everywhere.
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber. `RUST_LOG` wins over the configured level.
pub fn init(log: &LogSettings, level_override: Option<&str>) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .or(level_override.map(str::to_owned))
        .unwrap_or_else(|| log.level.clone());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour())
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
