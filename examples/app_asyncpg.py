#!/usr/bin/env python3
"""docworker from the app's side, with asyncpg: everything is SQL on job_batches/job_tasks.

    python examples/app_asyncpg.py --database-url postgres://... --uploads /data/uploads

(or DATABASE_URL and UPLOAD_DIR in the environment). A `worker run` must be running
against the same database with files.upload_root at (or above) the upload directory.
Exits non-zero when anything does not behave as documented.
"""

import argparse
import asyncio
import json
import os
import uuid
from pathlib import Path

import asyncpg

DOCS = Path(__file__).resolve().parent / "docs"
FINISHED = {"completed", "error", "cancelled"}


async def enqueue_file(conn, filename: str, file_path: Path) -> tuple[uuid.UUID, uuid.UUID]:
    """What POST /upload does: one batch and its task row, in one transaction."""
    batch_id, task_id = uuid.uuid4(), uuid.uuid4()
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO job_batches (id, total_tasks) VALUES ($1, 1)", batch_id)
        await conn.execute(
            "INSERT INTO job_tasks (id, batch_id, filename, file_path) VALUES ($1, $2, $3, $4)",
            task_id, batch_id, filename, str(file_path))
    return batch_id, task_id


async def enqueue_batch(conn, tasks: list[dict]) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A batch and its tasks in one call. Each task: filename, file_path and optionally
    task_type, document_id, options, priority, max_attempts, run_at."""
    rows = await conn.fetch("SELECT * FROM docworker_enqueue_batch($1::jsonb)", json.dumps(tasks))
    return rows[0]["batch_id"], [r["task_id"] for r in rows]


async def batch_status(conn, batch_id: uuid.UUID) -> dict:
    """The body of GET /tasks/{batch_id}/status. One snapshot, so the batch row and
    its task rows agree with each other."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        batch = await conn.fetchrow(
            "SELECT status, completed_tasks, total_tasks FROM job_batches WHERE id = $1", batch_id)
        tasks = await conn.fetch(
            """SELECT id, filename, status, stage, completed_chunks, total_chunks, error_message
                 FROM job_tasks WHERE batch_id = $1 ORDER BY created_at, filename""", batch_id)
    return {
        "batch_id": str(batch_id),
        "status": batch["status"],
        "completed_tasks": batch["completed_tasks"],
        "total_tasks": batch["total_tasks"],
        "tasks": [
            {"task_id": str(t["id"]), "filename": t["filename"], "status": t["status"],
             "stage": t["stage"], "completed_chunks": t["completed_chunks"],
             "total_chunks": t["total_chunks"], "error_message": t["error_message"]}
            for t in tasks
        ],
    }


async def retry(conn, task_id: uuid.UUID) -> bool:
    """Run a finished task (error, cancelled or completed) again now, with a fresh
    retry budget. False when the task is not finished."""
    return await conn.fetchval("SELECT docworker_retry($1)", task_id)


async def cancel(conn, task_id: uuid.UUID) -> bool:
    """Cancel a pending or running task. False when it had already finished."""
    return await conn.fetchval("SELECT docworker_cancel($1)", task_id)


async def delete_document(conn, document_id: uuid.UUID) -> uuid.UUID:
    """Enqueue the removal of a document's chunks from Chroma; returns the task id.
    An uploaded file's document id is its ingest task's id."""
    return await conn.fetchval(
        "INSERT INTO job_tasks (task_type, document_id) VALUES ('delete', $1) RETURNING id",
        document_id)


# ---------------------------------------------------------------------------------
# The UI's side: poll, as it polls GET /tasks/{batch_id}/status.

def show(task: dict) -> str:
    line = (f"  {task['filename']:<22} {task['status']:<10} {task['stage'] or '-':<9} "
            f"{task['completed_chunks']}/{task['total_chunks']} chunks")
    return line + (f"  {task['error_message']}" if task["error_message"] else "")


async def wait_for_batch(conn, batch_id: uuid.UUID, timeout: float = 120) -> dict:
    """Polls until every task is completed, error or cancelled; prints each change."""
    seen = {}
    async with asyncio.timeout(timeout):
        while True:
            status = await batch_status(conn, batch_id)
            for task in status["tasks"]:
                line = show(task)
                if seen.get(task["task_id"]) != line:
                    seen[task["task_id"]] = line
                    print(line)
            if all(t["status"] in FINISHED for t in status["tasks"]):
                print(f"batch {status['status']}: "
                      f"{status['completed_tasks']}/{status['total_tasks']} tasks completed")
                return status
            await asyncio.sleep(0.2)


async def wait_for_task(conn, task_id: uuid.UUID, timeout: float = 120) -> asyncpg.Record:
    async with asyncio.timeout(timeout):
        while True:
            row = await conn.fetchrow(
                "SELECT status, stage, error_message, result FROM job_tasks WHERE id = $1", task_id)
            if row["status"] in FINISHED:
                return row
            await asyncio.sleep(0.2)


def save_upload(uploads: Path, name: str, data: bytes | None = None) -> Path:
    """Saves an upload as the app does (a unique name under the upload directory).
    data=None: only picks the path, writes nothing (a file that goes missing)."""
    path = uploads / f"{uuid.uuid4().hex[:8]}-{name}"
    if data is not None:
        path.write_bytes(data)
    return path


def task(status: dict, filename: str) -> dict:
    return next(t for t in status["tasks"] if t["filename"] == filename)


async def main(database_url: str, uploads: Path) -> None:
    uploads.mkdir(parents=True, exist_ok=True)
    conn = await asyncpg.connect(database_url)
    try:
        print("== one file, as POST /upload enqueues it")
        path = save_upload(uploads, "sourdough.md", (DOCS / "sourdough.md").read_bytes())
        batch_id, doc_id = await enqueue_file(conn, "sourdough.md", path)
        status = await wait_for_batch(conn, batch_id)
        sourdough = task(status, "sourdough.md")
        assert status["status"] == "completed", status
        assert sourdough["stage"] == "done" and sourdough["total_chunks"] > 0, sourdough
        assert sourdough["completed_chunks"] == sourdough["total_chunks"], sourdough

        print("== a batch in one call; notes.txt is missing")
        files = ["lighthouses.pdf", "honeybees.html"]
        tasks = [{"filename": f, "file_path": str(save_upload(uploads, f, (DOCS / f).read_bytes()))}
                 for f in files]
        missing = save_upload(uploads, "notes.txt")
        tasks.append({"filename": "notes.txt", "file_path": str(missing)})
        batch_id, task_ids = await enqueue_batch(conn, tasks)
        status = await wait_for_batch(conn, batch_id)
        assert status["status"] == "completed_with_errors", status
        assert status["completed_tasks"] == 2 and status["total_tasks"] == 3, status
        notes = task(status, "notes.txt")
        assert notes["status"] == "error", notes
        assert "does not exist" in notes["error_message"], notes

        print("== the file turns up: retry notes.txt")
        missing.write_text("Notes from the harbour master: the east pier light is green.\n")
        async with conn.transaction():  # to see what docworker_retry wrote before a worker does
            assert await retry(conn, task_ids[2])
            row = await conn.fetchrow(
                """SELECT t.status, t.error_message, b.status AS batch_status
                     FROM job_tasks t JOIN job_batches b ON b.id = t.batch_id WHERE t.id = $1""",
                task_ids[2])
            assert tuple(row) == ("pending", None, "pending"), row
        status = await wait_for_batch(conn, batch_id)
        assert status["status"] == "completed", status
        assert status["completed_tasks"] == 3, status
        assert not await retry(conn, uuid.uuid4())  # no such task: nothing to retry

        print("== cancel a task scheduled for later")
        path = save_upload(uploads, "bicycle-care.txt", (DOCS / "bicycle-care.txt").read_bytes())
        batch_id, (later,) = await enqueue_batch(conn, [{
            "filename": "bicycle-care.txt", "file_path": str(path),
            "run_at": "2999-01-01T00:00:00Z"}])
        assert await cancel(conn, later)
        assert not await cancel(conn, later)  # already finished
        status = await wait_for_batch(conn, batch_id)
        assert task(status, "bicycle-care.txt")["status"] == "cancelled", status
        assert status["status"] == "completed_with_errors", status

        print("== delete sourdough.md's chunks")
        delete_id = await delete_document(conn, doc_id)
        row = await wait_for_task(conn, delete_id)
        assert row["status"] == "completed", dict(row)
        result = json.loads(row["result"])  # asyncpg hands jsonb over as text
        assert result["chunks_removed"] == sourdough["total_chunks"], result
        print(f"  delete {row['status']}: {result}")
        print(f"OK  sourdough.md document_id={doc_id}")
    finally:
        await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--uploads", type=Path, default=os.environ.get("UPLOAD_DIR"),
                        help="where uploads are saved (the worker's files.upload_root or below)")
    args = parser.parse_args()
    if not args.database_url or not args.uploads:
        parser.error("give --database-url and --uploads (or DATABASE_URL and UPLOAD_DIR)")
    asyncio.run(main(args.database_url, args.uploads))
