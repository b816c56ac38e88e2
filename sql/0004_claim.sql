-- docworker migration 4: the claim's choice of jobs, as a function.
--
-- Two things a single planned statement could not promise:
--
-- 1. A cost that does not depend on table statistics. After the app's bulk
--    INSERT, before autovacuum has analyzed the table, the planner believes
--    a handful of rows are pending and reads the whole backlog through a
--    bitmap scan, then sorts it: 20-30 ms per claim at 20,000 rows, growing
--    with the backlog. The function plans its scan with bitmap and
--    sequential scans disabled, which leaves one path: job_tasks_claim_idx
--    in the claim's order, stopping after the rows it needs. The plan is
--    generic, made once per session: it cannot depend on the statistics of
--    the moment either.
--
-- 2. One job per exclusivity key (document) at a time under any
--    interleaving. Checking "no job of this key is processing" races when two
--    workers check in the same instant. Here a worker takes a
--    transaction-scoped advisory lock on the key first and only then looks
--    (each statement of a volatile function takes a fresh snapshot), so the
--    second worker either fails to take the lock or sees the first one's
--    committed claim.
--
-- p_limit: jobs wanted; p_unkeyed: task types exempt from exclusivity;
-- p_exclude: jobs to leave alone (those whose outcomes the same statement
-- records). Returns the chosen ids, locked FOR UPDATE, in claim order.
CREATE OR REPLACE FUNCTION docworker_claimable(p_limit int, p_unkeyed text[], p_exclude uuid[])
RETURNS TABLE (id uuid)
LANGUAGE plpgsql VOLATILE ROWS 10
SET enable_bitmapscan = off
SET enable_seqscan = off
-- One plan per session, made once: re-planning on every call (which the
-- plan cache chooses here, the LIMIT being a parameter) cost 0.2 ms a claim.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    r     record;
    taken uuid[] := '{}';
    n     int := 0;
BEGIN
    IF p_limit <= 0 THEN
        RETURN;
    END IF;
    -- Rows are locked as the loop fetches them, and the loop stops once it
    -- has enough: the LIMIT only bounds the walk when many keys are busy.
    FOR r IN
        SELECT t.id, coalesce(t.document_id, t.id) AS key,
               t.task_type = ANY (p_unkeyed) AS unkeyed
          FROM job_tasks t
         WHERE t.status = 'pending' AND t.run_at <= now()
           AND t.id <> ALL (p_exclude)
           AND (t.task_type = ANY (p_unkeyed) OR NOT EXISTS (
                SELECT 1 FROM job_tasks busy
                 WHERE busy.status = 'processing'
                   AND coalesce(busy.document_id, busy.id) = coalesce(t.document_id, t.id)))
         ORDER BY t.priority, t.run_at, t.id
         LIMIT p_limit * 4 + 16
         FOR UPDATE OF t SKIP LOCKED
    LOOP
        IF NOT r.unkeyed THEN
            CONTINUE WHEN r.key = ANY (taken);
            -- 1685021472 = 'docu' in ASCII: docworker's key space.
            CONTINUE WHEN NOT pg_try_advisory_xact_lock(1685021472, hashtext(r.key::text));
            CONTINUE WHEN EXISTS (
                SELECT 1 FROM job_tasks p
                 WHERE p.status = 'processing'
                   AND coalesce(p.document_id, p.id) = r.key);
            taken := taken || r.key;
        END IF;
        id := r.id;
        RETURN NEXT;
        n := n + 1;
        EXIT WHEN n >= p_limit;
    END LOOP;
END
$$;
