#!/bin/sh
# Run once by the postgres image's entrypoint when it initialises an empty
# data volume (/docker-entrypoint-initdb.d/): creates docworker's runtime
# role. The owner role ($POSTGRES_USER, docworker) runs `worker migrate`;
# the worker itself connects as docworker_worker, which may read and write
# the rows of the tables the owner creates and nothing else (no DDL).
# See README, "Database roles", for the same on an existing database.
set -eu
password="$(tr -d '\r\n' < "${WORKER_DB_PASSWORD_FILE:-/run/secrets/worker_db_password}")"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v owner="$POSTGRES_USER" -v password="$password" <<'SQL'
CREATE ROLE docworker_worker LOGIN PASSWORD :'password';
GRANT USAGE ON SCHEMA public TO docworker_worker;
-- The tables do not exist yet: `migrate` creates them as the owner later.
-- Rows only: job_tasks and job_batches need SELECT, INSERT, UPDATE and
-- DELETE, docworker_migrations SELECT (default privileges cannot tell the
-- tables apart; the README's exact grants can).
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO docworker_worker;
SQL
