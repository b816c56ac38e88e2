//! What a job is once claimed, and how a job can fail.
//!
//! A claimed row is decoded leniently (anything the app could have written
//! must decode) and then validated into a [`JobSpec`]; a row that does not
//! validate fails permanently with a sentence saying what to fix.

use std::fmt;
use std::time::Duration;

use serde_json::Value;
use tokio_postgres::Row;
use uuid::Uuid;

/// Identifies one attempt of one job: the fencing token of every write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Attempt {
    pub id: Uuid,
    pub attempt: i32,
}

/// A row as claimed, before validation.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub key: Attempt,
    pub max_attempts: i32,
    pub task_type: String,
    pub filename: String,
    pub file_path: Option<String>,
    pub document_id: Uuid,
    pub options: Value,
    pub batch_id: Option<Uuid>,
    /// How long it had been due when it was claimed (its pickup latency).
    pub waited: Duration,
}

impl ClaimedJob {
    /// Reads the columns of `producer::claim_columns`, starting at `at`.
    pub fn from_row_at(row: &Row, at: usize) -> ClaimedJob {
        ClaimedJob {
            key: Attempt {
                id: row.get(at),
                attempt: row.get(at + 1),
            },
            max_attempts: row.get(at + 2),
            task_type: row.get(at + 3),
            filename: row.get(at + 4),
            file_path: row.get(at + 5),
            document_id: row.get(at + 6),
            options: row.get(at + 7),
            batch_id: row.get(at + 8),
            waited: Duration::from_secs_f64(row.get(at + 9)),
        }
    }
}

/// The kinds of work a job can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskType {
    Ingest,
    Delete,
    Noop,
}

impl TaskType {
    pub fn parse(s: &str) -> Option<TaskType> {
        match s {
            "ingest" => Some(TaskType::Ingest),
            "delete" => Some(TaskType::Delete),
            "noop" => Some(TaskType::Noop),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskType::Ingest => "ingest",
            TaskType::Delete => "delete",
            TaskType::Noop => "noop",
        }
    }
}

/// A claimed job that passed validation: what the task handlers receive.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub key: Attempt,
    pub max_attempts: i32,
    pub task_type: TaskType,
    pub filename: String,
    /// Present (non-empty) for every `ingest` job.
    pub file_path: Option<String>,
    pub document_id: Uuid,
    /// Always a JSON object.
    pub options: serde_json::Map<String, Value>,
}

impl JobSpec {
    /// Checks what every task type needs; the error is the row's error message.
    pub fn validate(job: &ClaimedJob) -> Result<JobSpec, JobError> {
        let task_type = TaskType::parse(&job.task_type).ok_or_else(|| {
            JobError::permanent(format!(
                "Unknown task_type {:?}: use one of \"ingest\", \"delete\" or \"noop\".",
                job.task_type
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
        if task_type == TaskType::Ingest && file_path.is_none() {
            return Err(JobError::permanent(
                "This ingest job has no file_path: set it to the uploaded file's path.",
            ));
        }
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

/// Whether trying again later can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A dependency was down, slow or overloaded: retry with backoff.
    Transient,
    /// Retrying cannot help (bad input, missing model, ...): fail now.
    Permanent,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
        }
    }
}

/// A job body's failure. `message` goes to `error_message`, so it is written
/// for the person reading the app's UI: what went wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub kind: ErrorKind,
    pub message: String,
}

impl JobError {
    pub fn transient(message: impl Into<String>) -> JobError {
        JobError {
            kind: ErrorKind::Transient,
            message: message.into(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> JobError {
        JobError {
            kind: ErrorKind::Permanent,
            message: message.into(),
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
        let err = JobSpec::validate(&claimed("resize", None, json!({}))).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Permanent);
        assert!(err.message.contains("\"resize\""), "{}", err.message);
        assert!(err.message.contains("noop"), "{}", err.message);
    }

    #[test]
    fn options_must_be_an_object() {
        let err = JobSpec::validate(&claimed("noop", None, json!([1, 2]))).unwrap_err();
        assert!(err.message.contains("an array"), "{}", err.message);
        assert!(JobSpec::validate(&claimed("noop", None, Value::Null)).is_ok());
    }

    #[test]
    fn ingest_needs_a_file_path() {
        let err = JobSpec::validate(&claimed("ingest", Some("  "), json!({}))).unwrap_err();
        assert!(err.message.contains("file_path"), "{}", err.message);
        assert!(JobSpec::validate(&claimed("delete", None, json!({}))).is_ok());
    }
}
