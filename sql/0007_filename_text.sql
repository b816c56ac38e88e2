-- docworker migration 7: file names of any length.
--
-- The app's legacy table has `filename varchar(255)`; an upload whose name
-- is longer (UTF-8 names of 300 characters exist) made the app's own INSERT
-- fail and abort its upload transaction. varchar(n) to text needs no table
-- rewrite and no index rebuild, only a brief exclusive lock.
--
-- A view or rule of the app's own that reads the column forbids the change;
-- then the migration goes on without it and says how to do it by hand,
-- rather than fail the whole upgrade for one column.
DO $$
BEGIN
    IF (SELECT data_type FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = 'job_tasks'
           AND column_name = 'filename') <> 'text' THEN
        ALTER TABLE job_tasks ALTER COLUMN filename TYPE text;
    END IF;
EXCEPTION WHEN feature_not_supported OR dependent_objects_still_exist THEN
    RAISE WARNING 'job_tasks.filename stays %: %. Drop the views that use it, run ALTER TABLE job_tasks ALTER COLUMN filename TYPE text, and create them again.',
        (SELECT format_type(atttypid, atttypmod) FROM pg_attribute
          WHERE attrelid = 'job_tasks'::regclass AND attname = 'filename'),
        SQLERRM;
END
$$;
