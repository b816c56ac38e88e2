//! docworker: a PostgreSQL table (`job_tasks`) as a document-ingestion job
//! queue. See ARCHITECTURE.md for the map of wings and one job's path.
//!
//! Wings, and the only direction their imports go (each may use those
//! below it):
//!
//! ```text
//!   main.rs (the `worker` binary)
//!   worker           wiring: starts the queue with docworker's tasks
//!   bench | ops      benchmarks | HTTP, probes, systemd, operator commands
//!   tasks            the task handler: ingest, delete, noop
//!   pipeline         documents: source, parse, chunk, embed, store
//!   queue            the engine: claims, runs through a TaskHandler, records
//!   observe          metrics and logs
//!   store            every statement on the queue's tables
//!   db, config       connections, settings
//! ```
//!
//! `samples` (documents built in code for tests and benchmarks) stands
//! apart: nothing in the daemon's path uses it.

pub mod bench;
pub mod config;
pub mod db;
pub mod observe;
pub mod ops;
pub mod pipeline;
pub mod queue;
pub mod samples;
pub mod store;
pub mod tasks;
pub mod worker;
