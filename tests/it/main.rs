//! Integration tests against a real PostgreSQL and real `worker` processes.
//! One binary, so the throwaway cluster is started once per run.

mod harness;

mod chaos;
mod cli;
mod schema;
mod semantics;
mod smoke;
