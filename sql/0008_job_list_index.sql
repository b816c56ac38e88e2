-- docworker migration 8: the dashboard's job list, newest first.
--
-- The list pages by keyset on (created_at, id), so page 1,000 of a million
-- rows costs what page 1 does. created_at is the app's column and NULL in
-- some legacy rows: the index is on what the list orders by, with those
-- last. Nothing the worker updates is in it, so it costs one index entry
-- per INSERT and nothing per status change.
CREATE INDEX IF NOT EXISTS job_tasks_listing_idx
    ON job_tasks ((coalesce(created_at, '-infinity'::timestamptz)) DESC, id DESC);
