//! `ingest`: turn an uploaded file into chunks in the vector store.
//!
//! This is where the document pipeline (parse, chunk, embed, store) plugs in.
//! Until it lands, an ingest job fails permanently and says so.

use crate::job::{JobError, JobSpec};
use crate::progress::JobContext;

pub async fn run(_job: &JobSpec, _ctx: &JobContext) -> Result<(), JobError> {
    Err(JobError::permanent(
        "Task type \"ingest\" is not implemented yet in this docworker version: the document pipeline ships in a later release.",
    ))
}
