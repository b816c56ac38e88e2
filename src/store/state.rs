//! The words the queue's tables use: a job's status, its stage, the kind of
//! a failure. Each is an enum here and nowhere else is its database text
//! spelled out in Rust, so a typo is a compile error and the app-facing
//! vocabulary (the app polls `status` and `stage`) has one home.

use std::fmt;
use std::str::FromStr;

/// `job_tasks.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Pending,
    Processing,
    Completed,
    Error,
    Cancelled,
}

impl JobStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Pending,
        JobStatus::Processing,
        JobStatus::Completed,
        JobStatus::Error,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Processing => "processing",
            JobStatus::Completed => "completed",
            JobStatus::Error => "error",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the row has reached an end (only `docworker_retry` moves it on).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Error | JobStatus::Cancelled
        )
    }
}

/// `job_tasks.stage`: where a running job is, for the app's progress display.
/// The queue writes `started` at a claim and `done` at completion; task
/// bodies write the stages in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Started,
    Parsing,
    Chunking,
    Embedding,
    Storing,
    Deleting,
    Sleeping,
    Done,
}

impl Stage {
    pub const ALL: [Stage; 8] = [
        Stage::Started,
        Stage::Parsing,
        Stage::Chunking,
        Stage::Embedding,
        Stage::Storing,
        Stage::Deleting,
        Stage::Sleeping,
        Stage::Done,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Started => "started",
            Stage::Parsing => "parsing",
            Stage::Chunking => "chunking",
            Stage::Embedding => "embedding",
            Stage::Storing => "storing",
            Stage::Deleting => "deleting",
            Stage::Sleeping => "sleeping",
            Stage::Done => "done",
        }
    }
}

/// Whether trying again later can help; `errors[].kind` in the row.
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

/// A database text that names no known value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownWord(pub String);

impl fmt::Display for UnknownWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown value {:?}", self.0)
    }
}

impl std::error::Error for UnknownWord {}

macro_rules! parse_from_all {
    ($t:ty) => {
        impl FromStr for $t {
            type Err = UnknownWord;
            fn from_str(s: &str) -> Result<Self, UnknownWord> {
                <$t>::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| UnknownWord(s.to_owned()))
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}

parse_from_all!(JobStatus);
parse_from_all!(Stage);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_reads_back_as_itself() {
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>(), Ok(s));
        }
        for s in Stage::ALL {
            assert_eq!(s.as_str().parse::<Stage>(), Ok(s));
        }
        assert!("Pending".parse::<JobStatus>().is_err());
    }
}
