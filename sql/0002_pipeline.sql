-- docworker migration 2: what an ingest or delete job produced.
--
-- `result` is written by the job body just before it completes (chunk
-- count, whether the file was skipped as unchanged, stale chunks removed)
-- and cleared by every new claim, so it always describes the latest attempt.
ALTER TABLE job_tasks ADD COLUMN IF NOT EXISTS result jsonb;

COMMENT ON COLUMN job_tasks.result IS
  'docworker: what the latest attempt produced, e.g. {"chunks": 12, "unchanged": false}';

-- A document's jobs run one at a time: the claim skips a job whose document
-- already has a job processing, and looks that up here.
CREATE INDEX IF NOT EXISTS job_tasks_running_document_idx
    ON job_tasks ((coalesce(document_id, id)))
    WHERE status = 'processing';
