#!/usr/bin/env python3
"""docworker from the app's side, with SQLAlchemy 2 (async, asyncpg driver).

    python examples/app_sqlalchemy.py --database-url postgres://... --uploads /data/uploads

(or DATABASE_URL and UPLOAD_DIR in the environment). A `worker run` must be running
against the same database with files.upload_root at (or above) the upload directory.
The same steps as app_asyncpg.py, with ORM models for the two tables.
Exits non-zero when anything does not behave as documented.
"""

import argparse
import asyncio
import json
import os
import uuid
from datetime import datetime
from pathlib import Path

from sqlalchemy import ForeignKey, func, select, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, joinedload, mapped_column, relationship

DOCS = Path(__file__).resolve().parent / "docs"
FINISHED = {"completed", "error", "cancelled"}


class Base(DeclarativeBase):
    pass


class JobBatch(Base):
    __tablename__ = "job_batches"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    total_tasks: Mapped[int]
    completed_tasks: Mapped[int] = mapped_column(server_default="0")
    status: Mapped[str] = mapped_column(server_default="pending")
    tasks: Mapped[list["JobTask"]] = relationship(
        order_by=lambda: (JobTask.created_at, JobTask.filename))


class JobTask(Base):
    """The columns the app writes and reads; docworker owns the rest."""
    __tablename__ = "job_tasks"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    batch_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("job_batches.id"))
    filename: Mapped[str] = mapped_column(server_default="")
    file_path: Mapped[str | None]
    task_type: Mapped[str] = mapped_column(server_default="ingest")
    document_id: Mapped[uuid.UUID | None]  # NULL: the task's own id
    status: Mapped[str] = mapped_column(server_default="pending")
    stage: Mapped[str | None]
    completed_chunks: Mapped[int] = mapped_column(server_default="0")
    total_chunks: Mapped[int] = mapped_column(server_default="0")
    error_message: Mapped[str | None]
    result: Mapped[dict | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


# Each function runs in the caller's transaction: `async with Session.begin() as session:`
# commits at the end of the block (in FastAPI: at the end of the request).

async def enqueue_file(session: AsyncSession, filename: str, file_path: Path) -> tuple[uuid.UUID, uuid.UUID]:
    """What POST /upload does: one batch and its task row, in one transaction."""
    task = JobTask(filename=filename, file_path=str(file_path))
    batch = JobBatch(total_tasks=1, tasks=[task])
    session.add(batch)
    await session.flush()
    return batch.id, task.id


async def enqueue_batch(session: AsyncSession, tasks: list[dict]) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A batch and its tasks in one call. Each task: filename, file_path and optionally
    task_type, document_id, options, priority, max_attempts, run_at."""
    rows = (await session.execute(
        text("SELECT * FROM docworker_enqueue_batch(CAST(:tasks AS jsonb))"),
        {"tasks": json.dumps(tasks)})).all()
    return rows[0].batch_id, [r.task_id for r in rows]


async def batch_status(session: AsyncSession, batch_id: uuid.UUID) -> dict:
    """The body of GET /tasks/{batch_id}/status. One SELECT (batch joined with its
    tasks), so the batch and its tasks agree with each other."""
    batch = await session.get(JobBatch, batch_id, options=[joinedload(JobBatch.tasks)],
                              populate_existing=True)
    return {
        "batch_id": str(batch.id),
        "status": batch.status,
        "completed_tasks": batch.completed_tasks,
        "total_tasks": batch.total_tasks,
        "tasks": [
            {"task_id": str(t.id), "filename": t.filename, "status": t.status, "stage": t.stage,
             "completed_chunks": t.completed_chunks, "total_chunks": t.total_chunks,
             "error_message": t.error_message}
            for t in batch.tasks
        ],
    }


async def retry(session: AsyncSession, task_id: uuid.UUID) -> bool:
    """Run a finished task (error, cancelled or completed) again now, with a fresh
    retry budget. False when the task is not finished."""
    return await session.scalar(select(func.docworker_retry(task_id)))


async def cancel(session: AsyncSession, task_id: uuid.UUID) -> bool:
    """Cancel a pending or running task. False when it had already finished."""
    return await session.scalar(select(func.docworker_cancel(task_id)))


async def delete_document(session: AsyncSession, document_id: uuid.UUID) -> uuid.UUID:
    """Enqueue the removal of a document's chunks from Chroma; returns the task id.
    An uploaded file's document id is its ingest task's id."""
    task = JobTask(task_type="delete", document_id=document_id)
    session.add(task)
    await session.flush()
    return task.id


# ---------------------------------------------------------------------------------
# The UI's side: poll, as it polls GET /tasks/{batch_id}/status.

def show(task: dict) -> str:
    line = (f"  {task['filename']:<22} {task['status']:<10} {task['stage'] or '-':<9} "
            f"{task['completed_chunks']}/{task['total_chunks']} chunks")
    return line + (f"  {task['error_message']}" if task["error_message"] else "")


async def wait_for_batch(Session, batch_id: uuid.UUID, timeout: float = 120) -> dict:
    """Polls until every task is completed, error or cancelled; prints each change."""
    seen = {}
    async with asyncio.timeout(timeout):
        while True:
            async with Session() as session:  # one request to the status endpoint
                status = await batch_status(session, batch_id)
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


async def wait_for_task(Session, task_id: uuid.UUID, timeout: float = 120) -> JobTask:
    async with asyncio.timeout(timeout):
        while True:
            async with Session() as session:
                task = await session.get(JobTask, task_id)
            if task.status in FINISHED:
                return task
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
    engine = create_async_engine(make_url(database_url).set(drivername="postgresql+asyncpg"))
    Session = async_sessionmaker(engine, expire_on_commit=False)
    try:
        print("== one file, as POST /upload enqueues it")
        path = save_upload(uploads, "sourdough.md", (DOCS / "sourdough.md").read_bytes())
        async with Session.begin() as session:
            batch_id, doc_id = await enqueue_file(session, "sourdough.md", path)
        status = await wait_for_batch(Session, batch_id)
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
        async with Session.begin() as session:
            batch_id, task_ids = await enqueue_batch(session, tasks)
        status = await wait_for_batch(Session, batch_id)
        assert status["status"] == "completed_with_errors", status
        assert status["completed_tasks"] == 2 and status["total_tasks"] == 3, status
        notes = task(status, "notes.txt")
        assert notes["status"] == "error", notes
        assert "does not exist" in notes["error_message"], notes

        print("== the file turns up: retry notes.txt")
        missing.write_text("Notes from the harbour master: the east pier light is green.\n")
        async with Session.begin() as session:
            assert await retry(session, task_ids[2])
            # Before the commit no worker sees it: this is what docworker_retry wrote.
            status = await batch_status(session, batch_id)
            assert task(status, "notes.txt")["status"] == "pending", status
            assert task(status, "notes.txt")["error_message"] is None, status
            assert status["status"] == "pending", status
        status = await wait_for_batch(Session, batch_id)
        assert status["status"] == "completed", status
        assert status["completed_tasks"] == 3, status
        async with Session.begin() as session:
            assert not await retry(session, uuid.uuid4())  # no such task: nothing to retry

        print("== cancel a task scheduled for later")
        path = save_upload(uploads, "bicycle-care.txt", (DOCS / "bicycle-care.txt").read_bytes())
        async with Session.begin() as session:
            batch_id, (later,) = await enqueue_batch(session, [{
                "filename": "bicycle-care.txt", "file_path": str(path),
                "run_at": "2999-01-01T00:00:00Z"}])
        async with Session.begin() as session:
            assert await cancel(session, later)
        async with Session.begin() as session:
            assert not await cancel(session, later)  # already finished
        status = await wait_for_batch(Session, batch_id)
        assert task(status, "bicycle-care.txt")["status"] == "cancelled", status
        assert status["status"] == "completed_with_errors", status

        print("== delete sourdough.md's chunks")
        async with Session.begin() as session:
            delete_id = await delete_document(session, doc_id)
        done = await wait_for_task(Session, delete_id)
        assert done.status == "completed", (done.status, done.error_message)
        assert done.result["chunks_removed"] == sourdough["total_chunks"], done.result
        print(f"  delete {done.status}: {done.result}")
        print(f"OK  sourdough.md document_id={doc_id}")
    finally:
        await engine.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--uploads", type=Path, default=os.environ.get("UPLOAD_DIR"),
                        help="where uploads are saved (the worker's files.upload_root or below)")
    args = parser.parse_args()
    if not args.database_url or not args.uploads:
        parser.error("give --database-url and --uploads (or DATABASE_URL and UPLOAD_DIR)")
    asyncio.run(main(args.database_url, args.uploads))
