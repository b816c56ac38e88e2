//! `noop`: does nothing and completes. Used by `worker ping`, benchmarks and
//! operators checking a deployment.
//!
//! For rehearsing failures it honours three options:
//! - `sleep_ms`: work this long first (cancellable like any body);
//! - `fail`: `"transient"` or `"permanent"`, fail with that kind of error,
//!   or `"panic"`, to rehearse a bug in a job body;
//! - `fail_attempts`: fail only while the attempt number is at most this.

use std::time::Duration;

use serde_json::Value;

use crate::queue::{JobContext, JobError, JobSpec};
use crate::store::Stage;

pub async fn run(job: &JobSpec, ctx: &JobContext) -> Result<(), JobError> {
    let sleep_ms = whole_number(job, "sleep_ms")?;
    let fail_attempts = whole_number(job, "fail_attempts")?;
    let fail = match job.options.get("fail") {
        None | Some(Value::Null) => None,
        Some(Value::String(kind))
            if ["transient", "permanent", "panic"].contains(&kind.as_str()) =>
        {
            Some(kind.as_str())
        }
        Some(other) => {
            return Err(JobError::permanent(format!(
                "options.fail must be \"transient\", \"permanent\" or \"panic\", not {other}."
            )))
        }
    };

    if let Some(ms) = sleep_ms.filter(|ms| *ms > 0) {
        ctx.set_stage(Stage::Sleeping).await?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let attempt = job.key.attempt as u64;
    match fail {
        Some(kind) if fail_attempts.is_none_or(|n| attempt <= n) => {
            let message = format!("noop job asked to fail on attempt {attempt} (options.fail).");
            match kind {
                "transient" => Err(JobError::transient(message)),
                "permanent" => Err(JobError::permanent(message)),
                _ => panic!("{message}"),
            }
        }
        _ => Ok(()),
    }
}

fn whole_number(job: &JobSpec, key: &str) -> Result<Option<u64>, JobError> {
    match job.options.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            JobError::permanent(format!(
                "options.{key} must be a whole number of at least 0, not {v}."
            ))
        }),
    }
}
