//! Operating the worker: the HTTP listener (`/healthz`, `/readyz`,
//! `/metrics`), `worker health` and `worker stats` (`probe`), systemd's
//! notify protocol and watchdog, and the operator commands (`admin`).
//! It reads the queue's state; the queue never calls into it.

pub mod admin;
pub mod http;
pub mod probe;
pub mod systemd;
