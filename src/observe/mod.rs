//! What the process tells the outside while it runs: logs (`telemetry`)
//! and Prometheus metrics (`metrics`). Both are leaves: everything reports
//! to them, they call nothing back.

pub mod metrics;
pub mod telemetry;
