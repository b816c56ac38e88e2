//! Integration tests against a real PostgreSQL and real `worker` processes.
//! One binary, so the throwaway cluster is started once per run.

mod fixtures;
mod harness;
mod services;
mod stack;
mod support;

mod architecture;
mod chaos;
mod cli;
mod conditions;
mod dashboard;
mod examples;
mod faults;
mod inputs;
mod operate;
mod pipeline;
mod providers;
mod reload;
mod scale_out;
mod schema;
mod semantics;
mod smoke;
mod tls;
