//! The store: every statement that reads or writes the queue's tables
//! (`job_tasks`, `job_batches`, `docworker_migrations`), as named functions
//! with typed inputs and results. Nothing outside this folder writes SQL
//! against them (River's `riverdriver` is the model).
//!
//! - `state`: status, stage and error kind, and their database words;
//! - `claim`: the claimed row, its column list, the claim of one named job;
//! - `cycle`: the write cycle (outcomes recorded + replacements claimed);
//! - `fence`: fenced progress writes and lease renewal;
//! - `sweep`: the lease rescue and pruning;
//! - `stats`: the queue snapshot;
//! - `admin`: the operator's statements;
//! - `dashboard`: what the web dashboard reads, and its batch retry;
//! - `schema`: migrations (the SQL itself is in `sql/`);
//! - `bench`: the benchmarks' statements.
//!
//! The store knows the table's vocabulary (a job's exclusivity key is
//! `coalesce(document_id, id)`, its progress is a stage and two counters)
//! but no rule about documents: which task types are exempt from
//! exclusivity is the caller's to say.

pub mod admin;
pub mod bench;
pub mod claim;
pub mod cycle;
pub mod dashboard;
pub mod fence;
pub mod schema;
pub mod state;
pub mod stats;
pub mod sweep;

pub use claim::{Attempt, ClaimedJob};
pub use cycle::{Backoff, Cycle, Ended, Ending, WriteCycle, Written};
pub use state::{ErrorKind, JobStatus, Stage};
