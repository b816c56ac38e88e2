-- docworker migration 5: a batch locked by someone else delays only itself.
--
-- The rollup trigger used to lock the task's batch and wait for it. An app
-- transaction holding a batch row (its own cancel, left open; a SELECT ...
-- FOR UPDATE) then stalled every worker write that finished a task of that
-- batch, and with it every other job in the same write. Now the trigger
-- only TRIES the lock: when it cannot have it at once, it notes the batch in
-- docworker_dirty_batches and moves on. Workers refresh noted batches as
-- soon as they can lock them (docworker_refresh_dirty_batches, about once a
-- second), recounting from the tasks, so the rollup is exact again once the
-- lock is released.

-- An append-only log, no unique key: an insert must never wait for another
-- transaction's insert of the same batch.
CREATE TABLE IF NOT EXISTS docworker_dirty_batches (
    batch_id uuid NOT NULL,
    noted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS docworker_dirty_batches_batch_idx
    ON docworker_dirty_batches (batch_id);

CREATE OR REPLACE FUNCTION docworker_rollup_batch() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM job_batches WHERE id = NEW.batch_id FOR NO KEY UPDATE SKIP LOCKED;
    IF FOUND THEN
        PERFORM docworker_refresh_batch(NEW.batch_id);
    ELSE
        -- Locked by another transaction (or gone, which the refresh notices).
        INSERT INTO docworker_dirty_batches (batch_id) VALUES (NEW.batch_id);
    END IF;
    RETURN NULL;
END
$$;

-- Refreshes up to p_limit noted batches that can be locked now; returns how
-- many it refreshed. Notes of batches still locked stay for the next call.
CREATE OR REPLACE FUNCTION docworker_refresh_dirty_batches(p_limit int) RETURNS int
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    b uuid;
    n int := 0;
BEGIN
    FOR b IN
        SELECT DISTINCT d.batch_id FROM docworker_dirty_batches d LIMIT p_limit
    LOOP
        PERFORM 1 FROM job_batches WHERE id = b FOR NO KEY UPDATE SKIP LOCKED;
        IF NOT FOUND AND EXISTS (SELECT 1 FROM job_batches WHERE id = b) THEN
            CONTINUE;  -- still locked: next time
        END IF;
        -- The notes go first, then the recount, which takes a later
        -- snapshot: every task write behind a deleted note is counted, and a
        -- note committed in between stays for next time.
        DELETE FROM docworker_dirty_batches WHERE batch_id = b;
        IF FOUND THEN
            PERFORM docworker_refresh_batch(b);
            n := n + 1;
        END IF;
    END LOOP;
    RETURN n;
END
$$;
