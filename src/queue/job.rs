//! What a task handler receives, and how a job can fail.
//!
//! A claimed row ([`ClaimedJob`], decoded leniently by the store) is
//! validated into a [`JobSpec`]; a row that does not validate fails
//! permanently with a sentence saying what to fix. What the queue checks is
//! what every task needs (a task type some handler runs, options that are
//! an object); each task checks the rest itself.

use std::fmt;

use serde_json::Value;
use uuid::Uuid;

pub use crate::store::{Attempt, ClaimedJob, ErrorKind};

/// A claimed job that passed validation: what the task handlers receive.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub key: Attempt,
    pub max_attempts: i32,
    /// One of the task types the handler runs.
    pub task_type: &'static str,
    pub filename: String,
    /// Absent when empty or blank.
    pub file_path: Option<String>,
    pub document_id: Uuid,
    /// Always a JSON object.
    pub options: serde_json::Map<String, Value>,
}

impl JobSpec {
    /// Checks what every task type needs; `known` are the task types the
    /// handler runs. The error is the row's error message.
    pub fn validate(job: &ClaimedJob, known: &[&'static str]) -> Result<JobSpec, JobError> {
        let task_type = known
            .iter()
            .find(|t| **t == job.task_type)
            .copied()
            .ok_or_else(|| {
                JobError::permanent(format!(
                    "Unknown task_type {:?}: use one of {}.",
                    job.task_type,
                    one_of(known)
                ))
            })?;
        let options = match &job.options {
            Value::Object(map) => map.clone(),
            Value::Null => serde_json::Map::new(),
            other => {
                return Err(JobError::permanent(format!(
                    "The options column must be a JSON object, but it holds {}: write e.g. '{{}}'.",
                    json_kind(other)
                )))
            }
        };
        let file_path = job.file_path.clone().filter(|p| !p.trim().is_empty());
        Ok(JobSpec {
            key: job.key,
            max_attempts: job.max_attempts,
            task_type,
            filename: job.filename.clone(),
            file_path,
            document_id: job.document_id,
            options,
        })
    }
}

/// `"a"`, `"a" or "b"`, `"a", "b" or "c"`.
fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    match quoted.split_last() {
        None => "(none)".into(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A job body's failure. `message` goes to `error_message`, so it is written
/// for the person reading the app's UI: what went wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub kind: ErrorKind,
    pub message: String,
    /// Set when the failure is a dependency that did not answer (refused,
    /// timed out, 429, 5xx): the name the handler's
    /// [`dependencies`](super::TaskHandler::dependencies) use. The queue
    /// then asks whether the dependency is down for everyone (see
    /// `outage`), and if so waits for it instead of spending the attempt.
    pub dependency: Option<&'static str>,
}

impl JobError {
    pub fn transient(message: impl Into<String>) -> JobError {
        JobError {
            kind: ErrorKind::Transient,
            message: message.into(),
            dependency: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> JobError {
        JobError {
            kind: ErrorKind::Permanent,
            message: message.into(),
            dependency: None,
        }
    }

    /// A transient failure because `dependency` did not answer.
    pub fn unavailable(dependency: &'static str, message: impl Into<String>) -> JobError {
        JobError {
            dependency: Some(dependency),
            ..JobError::transient(message)
        }
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {}", self.kind.as_str(), self.message)
    }
}

impl std::error::Error for JobError {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    const KNOWN: &[&str] = &["ingest", "delete", "noop"];

    fn claimed(task_type: &str, file_path: Option<&str>, options: Value) -> ClaimedJob {
        ClaimedJob {
            key: Attempt {
                id: Uuid::nil(),
                attempt: 1,
            },
            max_attempts: 5,
            task_type: task_type.into(),
            filename: "a.txt".into(),
            file_path: file_path.map(Into::into),
            document_id: Uuid::nil(),
            options,
            batch_id: None,
            waited: Duration::ZERO,
        }
    }

    #[test]
    fn unknown_task_type_is_permanent_and_names_the_choices() {
        let err = JobSpec::validate(&claimed("resize", None, json!({})), KNOWN).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Permanent);
        assert_eq!(
            err.message,
            "Unknown task_type \"resize\": use one of \"ingest\", \"delete\" or \"noop\"."
        );
    }

    #[test]
    fn options_must_be_an_object() {
        let err = JobSpec::validate(&claimed("noop", None, json!([1, 2])), KNOWN).unwrap_err();
        assert!(err.message.contains("an array"), "{}", err.message);
        assert!(JobSpec::validate(&claimed("noop", None, Value::Null), KNOWN).is_ok());
    }

    #[test]
    fn a_blank_file_path_is_none() {
        let spec = JobSpec::validate(&claimed("ingest", Some("  "), json!({})), KNOWN).unwrap();
        assert_eq!(spec.file_path, None);
    }
}
