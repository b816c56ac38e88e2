//! Sample documents for the tests: see `docworker::samples`.

pub use docworker::samples::*;
