//! The queue engine: claims rows of `job_tasks`, runs each through the
//! [`TaskHandler`] it was given, and records what happened. It knows nothing
//! of documents; its SQL is the store's.
//!
//! Split by responsibility, as River's internals are:
//! - `notifier`: the LISTEN connection, turned into wake-ups;
//! - `producer` (+ `slots`): the bounded pool of job slots and the write-cycle loop;
//! - `executor`: one job, from claim to outcome, under a time limit and a stop signal;
//! - `completer`: outcomes into the store's write cycle; after-commit actions;
//! - `heartbeat`: lease renewal; stops jobs this process no longer owns;
//! - `maintenance`: the expired-lease rescue and pruning;
//! - `retry`: the backoff policy;
//! - `outage`: a dependency found down pauses the jobs that need it, and is
//!   probed until it is back;
//! - `running`: the jobs running here and their stop signals;
//! - `progress`: what a body may write to its own row ([`JobContext`]);
//! - `health`: liveness of the producer's loop, the LISTEN flag, readiness;
//! - `shutdown`: the two-phase shutdown value;
//! - `handler` and `job`: the door to the work, and what passes through it.

pub mod completer;
pub mod executor;
pub mod handler;
pub mod health;
pub mod heartbeat;
pub mod job;
pub mod maintenance;
pub mod notifier;
pub mod outage;
pub mod producer;
pub mod progress;
pub mod retry;
pub mod running;
pub mod shutdown;
pub mod slots;

pub use handler::{Check, TaskHandler};
pub use job::{JobError, JobSpec};
pub use progress::JobContext;
