-- docworker schema, version 1: job_tasks as a job queue.
--
-- Written to ADOPT the app's existing tables: every statement is idempotent
-- (IF NOT EXISTS / OR REPLACE), adds what is missing and keeps every row.
-- Applied by `worker migrate` inside one transaction under an advisory lock.

-- Batches ------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS job_batches (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    total_tasks     int NOT NULL DEFAULT 0,
    completed_tasks int DEFAULT 0,
    status          varchar(30) DEFAULT 'pending',
    created_at      timestamptz DEFAULT now()
);
ALTER TABLE job_batches ALTER COLUMN id SET DEFAULT gen_random_uuid();
ALTER TABLE job_batches ADD COLUMN IF NOT EXISTS failed_tasks int NOT NULL DEFAULT 0;
ALTER TABLE job_batches ADD COLUMN IF NOT EXISTS finished_at timestamptz;
ALTER TABLE job_batches ADD COLUMN IF NOT EXISTS updated_at timestamptz NOT NULL DEFAULT now();

-- Tasks --------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS job_tasks (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    batch_id         uuid REFERENCES job_batches(id) ON DELETE CASCADE,
    filename         varchar(255) NOT NULL DEFAULT '',
    status           varchar(30) DEFAULT 'pending',
    total_chunks     int DEFAULT 0,
    completed_chunks int DEFAULT 0,
    error_message    text,
    file_path        text,
    attempt          int DEFAULT 0,
    created_at       timestamptz DEFAULT now(),
    started_at       timestamptz
);
ALTER TABLE job_tasks ALTER COLUMN id SET DEFAULT gen_random_uuid();
-- A plain `INSERT INTO job_tasks (filename, file_path)` must work, and noop or
-- delete jobs need no file: relax the legacy NOT NULLs.
ALTER TABLE job_tasks ALTER COLUMN batch_id DROP NOT NULL;
ALTER TABLE job_tasks ALTER COLUMN file_path DROP NOT NULL;
ALTER TABLE job_tasks ALTER COLUMN filename SET DEFAULT '';

UPDATE job_tasks SET status = 'pending' WHERE status IS NULL;
UPDATE job_tasks SET attempt = 0 WHERE attempt IS NULL;
UPDATE job_tasks SET total_chunks = 0 WHERE total_chunks IS NULL;
UPDATE job_tasks SET completed_chunks = 0 WHERE completed_chunks IS NULL;
ALTER TABLE job_tasks ALTER COLUMN status SET DEFAULT 'pending';
ALTER TABLE job_tasks ALTER COLUMN status SET NOT NULL;
ALTER TABLE job_tasks ALTER COLUMN attempt SET NOT NULL;
ALTER TABLE job_tasks ALTER COLUMN total_chunks SET NOT NULL;
ALTER TABLE job_tasks ALTER COLUMN completed_chunks SET NOT NULL;

-- task_type and options stay unconstrained on purpose: a bad value must not
-- make the app's INSERT fail, it must end as a job in `error` with a reason.
ALTER TABLE job_tasks ADD COLUMN IF NOT EXISTS task_type text NOT NULL DEFAULT 'ingest';
ALTER TABLE job_tasks ADD COLUMN IF NOT EXISTS document_id uuid;  -- NULL means "the task id"
ALTER TABLE job_tasks ADD COLUMN IF NOT EXISTS options jsonb NOT NULL DEFAULT '{}';
ALTER TABLE job_tasks ADD COLUMN IF NOT EXISTS priority smallint NOT NULL DEFAULT 0;
ALTER TABLE job_tasks ADD COLUMN IF NOT EXISTS run_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE job_tasks ADD COLUMN IF NOT EXISTS max_attempts int NOT NULL DEFAULT 5;
ALTER TABLE job_tasks ADD COLUMN IF NOT EXISTS locked_by text;
ALTER TABLE job_tasks ADD COLUMN IF NOT EXISTS locked_until timestamptz;
ALTER TABLE job_tasks ADD COLUMN IF NOT EXISTS heartbeat_at timestamptz;
ALTER TABLE job_tasks ADD COLUMN IF NOT EXISTS stage text;
ALTER TABLE job_tasks ADD COLUMN IF NOT EXISTS errors jsonb NOT NULL DEFAULT '[]';
ALTER TABLE job_tasks ADD COLUMN IF NOT EXISTS finished_at timestamptz;
ALTER TABLE job_tasks ADD COLUMN IF NOT EXISTS updated_at timestamptz NOT NULL DEFAULT now();

-- Rows the previous worker left in `processing` have no lease: give them an
-- expired one so the first sweep hands them back instead of leaving them stuck.
UPDATE job_tasks SET locked_until = now()
 WHERE status = 'processing' AND locked_until IS NULL;
-- Legacy rows that already finished get a finish time so pruning can age them.
UPDATE job_tasks SET finished_at = coalesce(started_at, created_at, now())
 WHERE status IN ('completed', 'error', 'cancelled') AND finished_at IS NULL;

-- Indexes --------------------------------------------------------------------
-- The claim query reads only this partial index, so a million finished rows
-- cost it nothing. Its column order is the claim's ORDER BY.
DROP INDEX IF EXISTS idx_tasks_claimable;
CREATE INDEX IF NOT EXISTS job_tasks_claim_idx
    ON job_tasks (priority, run_at, id) WHERE status = 'pending';
-- The lease sweep looks for expired leases among running jobs only.
CREATE INDEX IF NOT EXISTS job_tasks_lease_idx
    ON job_tasks (locked_until) WHERE status = 'processing';
-- Batch rollup counts a batch's tasks by status. Tasks without a batch are
-- left out, so their claims and completions do not pay for this index.
CREATE INDEX IF NOT EXISTS job_tasks_batch_idx ON job_tasks (batch_id, status)
    WHERE batch_id IS NOT NULL;
-- Pruning walks finished rows by age.
CREATE INDEX IF NOT EXISTS job_tasks_finished_idx
    ON job_tasks (finished_at) WHERE status IN ('completed', 'error', 'cancelled');

-- A queue table churns: vacuum it sooner than the default 20% of dead rows.
ALTER TABLE job_tasks SET (autovacuum_vacuum_scale_factor = 0.02,
                           autovacuum_analyze_scale_factor = 0.02);

-- Wake-up notification ---------------------------------------------------------
-- Statement-level, so a multi-row INSERT sends one NOTIFY; PostgreSQL also
-- folds identical notifications within a transaction. Rows due later wake
-- nobody: the worker that scheduled them, or the poll, picks them up.
CREATE OR REPLACE FUNCTION docworker_notify_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows WHERE status = 'pending' AND run_at <= now()) THEN
        PERFORM pg_notify('docworker_jobs', '');
    END IF;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS docworker_notify_insert ON job_tasks;
CREATE TRIGGER docworker_notify_insert
    AFTER INSERT ON job_tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION docworker_notify_insert();

-- A running job cancelled from SQL: tell its worker at once (the heartbeat
-- would notice within a second anyway).
CREATE OR REPLACE FUNCTION docworker_notify_cancel() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('docworker_cancel', NEW.id::text);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS docworker_notify_cancel ON job_tasks;
CREATE TRIGGER docworker_notify_cancel
    AFTER UPDATE OF status ON job_tasks
    FOR EACH ROW
    WHEN (OLD.status = 'processing' AND NEW.status = 'cancelled')
    EXECUTE FUNCTION docworker_notify_cancel();

-- Batch rollup -----------------------------------------------------------------
-- Recomputed from all of the batch's tasks, in the transaction of the task
-- write that changed it, whoever wrote it (worker, app, operator).
--
-- The batch row is locked FIRST. Under READ COMMITTED each statement of a
-- volatile function takes a fresh snapshot, so the count that follows the
-- lock sees every task write committed by whoever held the lock before us:
-- two tasks finishing at once in different transactions cannot both count
-- the other as unfinished.
CREATE OR REPLACE FUNCTION docworker_refresh_batch(p_batch uuid) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n_tasks    int;
    n_done     int;
    n_failed   int;
BEGIN
    PERFORM 1 FROM job_batches WHERE id = p_batch FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT count(*),
           count(*) FILTER (WHERE status = 'completed'),
           count(*) FILTER (WHERE status IN ('error', 'cancelled'))
      INTO n_tasks, n_done, n_failed
      FROM job_tasks WHERE batch_id = p_batch;
    -- A batch is finished when every task it announced (total_tasks) or holds
    -- has finished, so tasks inserted in separate transactions cannot make a
    -- half-created batch look done.
    UPDATE job_batches b
       SET completed_tasks = n_done,
           failed_tasks    = n_failed,
           status = CASE
               WHEN n_done + n_failed < greatest(coalesce(b.total_tasks, 0), n_tasks) THEN 'pending'
               WHEN n_failed = 0 THEN 'completed'
               ELSE 'completed_with_errors' END,
           finished_at = CASE
               WHEN n_done + n_failed < greatest(coalesce(b.total_tasks, 0), n_tasks) THEN NULL
               ELSE coalesce(b.finished_at, now()) END,
           updated_at = now()
     WHERE b.id = p_batch;
END
$$;

-- Batches created before docworker get the rollup's view of their tasks
-- (failed_tasks, finished_at, status), so they read right and can be pruned.
SELECT docworker_refresh_batch(id) FROM job_batches;

CREATE OR REPLACE FUNCTION docworker_rollup_batch() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM docworker_refresh_batch(NEW.batch_id);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS docworker_rollup_batch ON job_tasks;
-- Only transitions into or out of a finished state change a batch; claims
-- (pending -> processing) do not fire it.
CREATE TRIGGER docworker_rollup_batch
    AFTER UPDATE OF status ON job_tasks
    FOR EACH ROW
    WHEN (NEW.batch_id IS NOT NULL
          AND OLD.status IS DISTINCT FROM NEW.status
          AND (OLD.status IN ('completed', 'error', 'cancelled')
               OR NEW.status IN ('completed', 'error', 'cancelled')))
    EXECUTE FUNCTION docworker_rollup_batch();

-- Enqueue API for the app ------------------------------------------------------
-- One call creates a batch and its tasks:
--   SELECT * FROM docworker_enqueue_batch(
--     '[{"filename": "a.pdf", "file_path": "/uploads/a.pdf"}]');
-- Each element may also carry task_type, document_id, options, priority,
-- max_attempts and run_at.
CREATE OR REPLACE FUNCTION docworker_enqueue_batch(p_tasks jsonb)
RETURNS TABLE (batch_id uuid, task_id uuid, filename text)
LANGUAGE plpgsql AS $$
DECLARE
    v_batch uuid;
BEGIN
    IF jsonb_typeof(p_tasks) IS DISTINCT FROM 'array' OR jsonb_array_length(p_tasks) = 0 THEN
        RAISE EXCEPTION 'docworker_enqueue_batch expects a non-empty JSON array of tasks';
    END IF;
    INSERT INTO job_batches (total_tasks) VALUES (jsonb_array_length(p_tasks))
    RETURNING id INTO v_batch;
    RETURN QUERY
    INSERT INTO job_tasks AS t (batch_id, filename, file_path, task_type, document_id,
                                options, priority, max_attempts, run_at)
    SELECT v_batch,
           coalesce(e->>'filename', ''),
           e->>'file_path',
           coalesce(e->>'task_type', 'ingest'),
           (e->>'document_id')::uuid,
           coalesce(e->'options', '{}'::jsonb),
           coalesce((e->>'priority')::smallint, 0),
           coalesce((e->>'max_attempts')::int, 5),
           coalesce((e->>'run_at')::timestamptz, now())
      FROM jsonb_array_elements(p_tasks) WITH ORDINALITY AS x(e, n)
     ORDER BY x.n
    RETURNING t.batch_id, t.id, t.filename::text;
END
$$;

-- Operator API -----------------------------------------------------------------
-- Run a finished job again now, with a fresh budget of retries. The attempt
-- counter never goes back: it is the fencing token of every write.
CREATE OR REPLACE FUNCTION docworker_retry(p_task uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE job_tasks
       SET status = 'pending', run_at = now(), finished_at = NULL, stage = NULL,
           max_attempts = attempt + max_attempts, error_message = NULL,
           locked_by = NULL, locked_until = NULL, updated_at = now()
     WHERE id = p_task AND status IN ('error', 'cancelled', 'completed');
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pg_notify('docworker_jobs', '');
    RETURN true;
END
$$;

-- Cancel a job that has not finished. A running job's worker stops its body
-- within a second and its later writes are refused.
CREATE OR REPLACE FUNCTION docworker_cancel(p_task uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE job_tasks
       SET status = 'cancelled', finished_at = now(), locked_by = NULL, locked_until = NULL,
           error_message = 'Cancelled by request.', updated_at = now()
     WHERE id = p_task AND status IN ('pending', 'processing');
    RETURN FOUND;
END
$$;
