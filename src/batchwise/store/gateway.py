"""The SQL of the gateway's files and batches (the OpenAI Files and Batches API objects).

A file row names the bytes kept under the home folder; a batch row ties an OpenAI-style batch
to the submission its lines became (its counts and results are the submission's, read through
`store.submissions`), with what the caller asked: endpoint, completion window, metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa

from batchwise.store.engine import Store
from batchwise.store.schema import GatewayBatch, GatewayFile

files_t: sa.Table = GatewayFile.__table__  # type: ignore[attr-defined]
gateway_batches_t: sa.Table = GatewayBatch.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class FileRow:
    """An uploaded file as stored."""

    id: int
    filename: str
    purpose: str
    bytes: int
    path: str
    key_name: str
    created_at: datetime


@dataclass(frozen=True)
class BatchRow:
    """A gateway batch as stored."""

    id: int
    submission_id: int
    input_file_id: int
    endpoint: str
    completion_window: str
    metadata: dict[str, Any]
    key_name: str
    created_at: datetime
    cancelled_at: datetime | None


def insert_file(
    store: Store,
    *,
    filename: str,
    purpose: str,
    size_bytes: int,
    path: str,
    key_name: str,
    at: datetime,
) -> FileRow:
    """Record an uploaded file; returns its row (with its new id)."""
    with store.write() as conn:
        file_id = conn.execute(
            sa.insert(files_t)
            .values(
                filename=filename,
                purpose=purpose,
                bytes=size_bytes,
                path=path,
                key_name=key_name,
                created_at=at,
            )
            .returning(files_t.c.id)
        ).scalar_one()
    return FileRow(int(file_id), filename, purpose, size_bytes, path, key_name, at)


def get_file(store: Store, file_id: int) -> FileRow | None:
    """A file not deleted, by id."""
    t = files_t
    with store.read() as conn:
        row = (
            conn.execute(sa.select(t).where(t.c.id == file_id, t.c.deleted_at.is_(None)))
            .mappings()
            .first()
        )
    if row is None:
        return None
    return FileRow(
        row["id"],
        row["filename"],
        row["purpose"],
        row["bytes"],
        row["path"],
        row["key_name"],
        row["created_at"],
    )


def delete_file(store: Store, file_id: int, *, at: datetime) -> bool:
    """Mark a file deleted, once; False if there was none to delete."""
    t = files_t
    with store.write() as conn:
        done = conn.execute(
            sa.update(t).where(t.c.id == file_id, t.c.deleted_at.is_(None)).values(deleted_at=at)
        ).rowcount
    return bool(done)


def insert_batch(
    store: Store,
    *,
    submission_id: int,
    input_file_id: int,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, Any],
    key_name: str,
    at: datetime,
) -> BatchRow:
    """Record a batch over a stored submission; returns its row."""
    with store.write() as conn:
        batch_id = conn.execute(
            sa.insert(gateway_batches_t)
            .values(
                submission_id=submission_id,
                input_file_id=input_file_id,
                endpoint=endpoint,
                completion_window=completion_window,
                metadata_json=orjson.dumps(metadata).decode(),
                key_name=key_name,
                created_at=at,
            )
            .returning(gateway_batches_t.c.id)
        ).scalar_one()
    return BatchRow(
        int(batch_id),
        submission_id,
        input_file_id,
        endpoint,
        completion_window,
        dict(metadata),
        key_name,
        at,
        None,
    )


def _batch(row: Any) -> BatchRow:
    return BatchRow(
        row["id"],
        row["submission_id"],
        row["input_file_id"],
        row["endpoint"],
        row["completion_window"],
        orjson.loads(row["metadata_json"] or "{}"),
        row["key_name"],
        row["created_at"],
        row["cancelled_at"],
    )


def get_batch(store: Store, batch_id: int) -> BatchRow | None:
    """A gateway batch by id."""
    t = gateway_batches_t
    with store.read() as conn:
        row = conn.execute(sa.select(t).where(t.c.id == batch_id)).mappings().first()
    return None if row is None else _batch(row)


def list_batches(store: Store, *, limit: int, after: int | None = None) -> list[BatchRow]:
    """Batches newest first; `after` pages on from that id (older ones)."""
    t = gateway_batches_t
    query = sa.select(t).order_by(t.c.id.desc()).limit(limit)
    if after is not None:
        query = query.where(t.c.id < after)
    with store.read() as conn:
        rows = conn.execute(query).mappings().all()
    return [_batch(row) for row in rows]


def mark_batch_cancelled(store: Store, batch_id: int, *, at: datetime) -> None:
    """Record that a cancel was asked, once."""
    t = gateway_batches_t
    with store.write() as conn:
        conn.execute(
            sa.update(t)
            .where(t.c.id == batch_id, t.c.cancelled_at.is_(None))
            .values(cancelled_at=at)
        )
