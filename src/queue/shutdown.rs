//! Shutdown, in two phases, as an explicit value passed to whatever must
//! react to it.
//!
//! The first SIGTERM or SIGINT begins a graceful shutdown: stop claiming,
//! let running jobs finish within the grace period, hand back the rest. A
//! second signal exits at once; jobs it interrupts come back by lease expiry.

use anyhow::Result;
use futures_util::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    begun: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Starts a graceful shutdown (also what the first signal does).
    pub fn begin(&self) {
        self.begun.cancel();
    }

    /// Resolves once shutdown has begun.
    pub async fn begun(&self) {
        self.begun.cancelled().await
    }

    /// A token that fires when shutdown begins, for tasks that take tokens.
    pub fn token(&self) -> CancellationToken {
        self.begun.clone()
    }

    /// Routes SIGTERM and SIGINT here: the first begins a graceful shutdown,
    /// the second exits the process immediately with 128 + the signal number.
    pub fn on_signals(&self) -> Result<()> {
        let mut signals = Signals::new([SIGTERM, SIGINT])?;
        let shutdown = self.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            while let Some(signal) = signals.next().await {
                seen += 1;
                if seen == 1 {
                    tracing::info!(signal, "shutting down: no new jobs; running jobs may finish within the grace period (signal again to exit at once)");
                    shutdown.begin();
                } else {
                    tracing::warn!(signal, "second signal: exiting now; interrupted jobs run again after their leases expire");
                    std::process::exit(128 + signal);
                }
            }
        });
        Ok(())
    }
}
