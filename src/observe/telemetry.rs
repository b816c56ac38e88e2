//! Logging: tracing-subscriber as text for people or JSON for shippers.
//! Each job runs in a `job` span carrying its id, attempt and task type, so
//! every line a job logs can be traced back to its row. A reload (SIGHUP)
//! swaps the level and the format in place.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{filter, reload, EnvFilter, Layer, Registry};

use crate::config::{LogFormat, LogSettings};

/// Colour only for a person at a terminal: journald, files and pipes get
/// plain text. `NO_COLOR` (set and not empty) turns it off everywhere.
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Both formats are installed and one of them prints events: a reload
/// flips this. Both see every span, so each has the span's fields in its
/// own form whichever prints later (the JSON printer cannot print a span
/// it did not see opened: it panics).
static JSON: AtomicBool = AtomicBool::new(false);

/// The handle a reload swaps the level filter through.
struct Reload {
    filter: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` or the command line chose the filter: `log.level` does not.
    filter_pinned: bool,
}

static RELOAD: OnceLock<Reload> = OnceLock::new();

/// Installs the global subscriber. `RUST_LOG` wins over the configured level.
pub fn init(log: &LogSettings, level_override: Option<&str>) {
    let pinned = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .or(level_override.map(str::to_owned));
    let filter = pinned.clone().unwrap_or_else(|| log.level.clone());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, filter_handle) = reload::Layer::new(filter);
    JSON.store(log.format == LogFormat::Json, Ordering::Relaxed);
    let text = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour())
        .with_filter(filter::dynamic_filter_fn(|meta, _| {
            meta.is_span() || !JSON.load(Ordering::Relaxed)
        }));
    let json = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_filter(filter::dynamic_filter_fn(|meta, _| {
            meta.is_span() || JSON.load(Ordering::Relaxed)
        }));
    if tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .try_init()
        .is_ok()
    {
        let _ = RELOAD.set(Reload {
            filter: filter_handle,
            filter_pinned: pinned.is_some(),
        });
    }
}

/// Applies a reloaded `[log]`: the level (unless `RUST_LOG` pins it) and
/// the format. Lines already written stay as they were.
pub fn reload(log: &LogSettings) -> Result<(), String> {
    let Some(handles) = RELOAD.get() else {
        return Err("logging was not set up by this process".into());
    };
    if handles.filter_pinned {
        tracing::warn!("RUST_LOG (or --once) sets the log filter: log.level is not applied");
    } else {
        let filter = EnvFilter::try_new(&log.level).map_err(|e| e.to_string())?;
        handles.filter.reload(filter).map_err(|e| e.to_string())?;
    }
    JSON.store(log.format == LogFormat::Json, Ordering::Relaxed);
    Ok(())
}
