//! `delete`: remove every chunk of a document from the vector store.
//!
//! The vector-store client plugs in here with the document pipeline. Until
//! then a delete job fails permanently and says so.

use crate::job::{JobError, JobSpec};
use crate::progress::JobContext;

pub async fn run(_job: &JobSpec, _ctx: &JobContext) -> Result<(), JobError> {
    Err(JobError::permanent(
        "Task type \"delete\" is not implemented yet in this docworker version: the document pipeline ships in a later release.",
    ))
}
