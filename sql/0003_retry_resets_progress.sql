-- docworker migration 3: docworker_retry starts the row's progress afresh.
--
-- A retried job is `pending` until a worker claims it (which resets the
-- counters anyway); until then the app's poll must not show the previous
-- run's "4/4 chunks" or its result beside a pending status.
CREATE OR REPLACE FUNCTION docworker_retry(p_task uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE job_tasks
       SET status = 'pending', run_at = now(), finished_at = NULL, stage = NULL,
           total_chunks = 0, completed_chunks = 0, result = NULL,
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
