-- docworker migration 6: the claim passes over task types whose
-- dependencies are down.
--
-- While Chroma or the embedder is unreachable, a worker claims no job that
-- needs it (p_paused names those task types) and goes on with the rest;
-- the jobs wait `pending`, their attempts unspent, until it is back. The
-- walk is the same index-ordered one as migration 4's; rows of a paused
-- type are filtered as it goes, so during an outage a claim reads past the
-- paused backlog to reach other work.
--
-- Also, the walk is never JIT-compiled (below).
--
-- The three-argument form stays for workers of the previous version during
-- a rolling upgrade; it pauses nothing.
CREATE OR REPLACE FUNCTION docworker_claimable(p_limit int, p_unkeyed text[], p_exclude uuid[], p_paused text[])
RETURNS TABLE (id uuid)
LANGUAGE plpgsql VOLATILE ROWS 10
SET enable_bitmapscan = off
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
-- Never JIT-compile the walk. With statistics gone stale (analyzed while the
-- table held finished rows, then a bulk insert), the planner expects almost
-- no pending row and costs the walk as the whole index: 1.6 million at a
-- backlog of 1,000,000, over jit_above_cost, so every claim spent 200 ms
-- compiling a walk that then took 0.2 ms.
SET jit = off
AS $$
DECLARE
    r     record;
    taken uuid[] := '{}';
    n     int := 0;
BEGIN
    IF p_limit <= 0 THEN
        RETURN;
    END IF;
    FOR r IN
        SELECT t.id, coalesce(t.document_id, t.id) AS key,
               t.task_type = ANY (p_unkeyed) AS unkeyed
          FROM job_tasks t
         WHERE t.status = 'pending' AND t.run_at <= now()
           AND t.id <> ALL (p_exclude)
           AND t.task_type <> ALL (p_paused)
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

CREATE OR REPLACE FUNCTION docworker_claimable(p_limit int, p_unkeyed text[], p_exclude uuid[])
RETURNS TABLE (id uuid)
LANGUAGE sql VOLATILE ROWS 10
AS $$ SELECT id FROM docworker_claimable(p_limit, p_unkeyed, p_exclude, '{}'::text[]) $$;
