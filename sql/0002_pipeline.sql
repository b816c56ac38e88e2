-- docworker migration 2: what an ingest or delete job produced.
--
-- `result` is written by the job body just before it completes (chunk
-- count, whether the file was skipped as unchanged, stale chunks removed)
-- and cleared by every new claim, so it always describes the latest attempt.
ALTER TABLE job_tasks ADD COLUMN IF NOT EXISTS result jsonb;

COMMENT ON COLUMN job_tasks.result IS
  'docworker: what the latest attempt produced, e.g. {"chunks": 12, "unchanged": false}';
