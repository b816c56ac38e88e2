//! Sample documents for the tests: see `docworker::pipeline::samples`.

pub use docworker::pipeline::samples::*;
