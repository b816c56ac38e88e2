//! docworker: a PostgreSQL table (`job_tasks`) as a document-ingestion job
//! queue. See ARCHITECTURE.md for the map of modules and one job's path.

pub mod admin;
pub mod bench;
pub mod bench_pipeline;
pub mod completer;
pub mod config;
pub mod db;
pub mod executor;
pub mod health;
pub mod heartbeat;
pub mod http;
pub mod job;
pub mod maintenance;
pub mod metrics;
pub mod notifier;
pub mod pipeline;
pub mod probe;
pub mod producer;
pub mod progress;
pub mod retry;
pub mod running;
pub mod schema;
pub mod shutdown;
pub mod stats;
pub mod systemd;
pub mod tasks;
pub mod telemetry;
pub mod worker;
