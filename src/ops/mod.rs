//! Operating the worker: the HTTP listener (`/healthz`, `/readyz`,
//! `/metrics`), `worker health` and `worker stats` (`probe`), systemd's
//! notify protocol and watchdog, the operator commands (`admin`), and
//! configuration reloads on SIGHUP (`reload`).
//! It reads the queue's state; the queue never calls into it.

pub mod admin;
pub mod dashboard;
pub mod http;
pub mod probe;
pub mod reload;
pub mod systemd;
