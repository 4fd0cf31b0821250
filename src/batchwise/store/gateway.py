"""The SQL of the gateway's files and batches (the OpenAI Files and Batches API objects).

A file row names the bytes kept under the home folder; a batch row ties an OpenAI-style batch
to the submission its lines became (its counts and results are the submission's, read through
`store.submissions`), with what the caller asked: endpoint, completion window, metadata. An
Anthropic Message Batch is a batch row too: its endpoint is `/v1/messages` (no OpenAI batch
names it) and it has no input file (`NO_FILE`), its requests having come inline.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa

from batchwise.states import RequestState
from batchwise.store.engine import Store, requests_t, submissions_t
from batchwise.store.schema import GatewayBatch, GatewayFile

#: the endpoint of every Anthropic Message Batch; OpenAI batches name one of theirs
MESSAGES_ENDPOINT = "/v1/messages"
#: the input file id of a batch whose requests came inline (an Anthropic Message Batch)
NO_FILE = 0

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


def list_batches(
    store: Store,
    *,
    limit: int,
    after: int | None = None,
    before: int | None = None,
    anthropic: bool = False,
) -> list[BatchRow]:
    """One family's batches (OpenAI's, or Anthropic's Message Batches), newest first; `after`
    pages on from that id to older ones, `before` back to the newer ones just before it."""
    t = gateway_batches_t
    family = t.c.endpoint == MESSAGES_ENDPOINT
    query = sa.select(t).where(family if anthropic else ~family).limit(limit)
    if before is not None:
        query = query.where(t.c.id > before).order_by(t.c.id.asc())
    else:
        query = query.order_by(t.c.id.desc())
    if after is not None:
        query = query.where(t.c.id < after)
    with store.read() as conn:
        rows = conn.execute(query).mappings().all()
    found = [_batch(row) for row in rows]
    return found[::-1] if before is not None else found


def mark_batch_cancelled(store: Store, batch_id: int, *, at: datetime) -> None:
    """Record that a cancel was asked, once."""
    t = gateway_batches_t
    with store.write() as conn:
        conn.execute(
            sa.update(t)
            .where(t.c.id == batch_id, t.c.cancelled_at.is_(None))
            .values(cancelled_at=at)
        )


def failure_codes(store: Store, submission_id: int) -> dict[str, int]:
    """A submission's requests that ended failed or rejected, counted by their error code (the
    state when they have none): what an Anthropic batch's `errored` and `expired` counts read."""
    r, s = requests_t, submissions_t
    failed = (RequestState.FAILED.value, RequestState.REJECTED.value)
    with store.read() as conn:
        span = conn.execute(
            sa.select(s.c.first_request_id, s.c.last_request_id).where(s.c.id == submission_id)
        ).first()
        if span is None or span[0] is None:
            return {}
        rows = conn.execute(
            sa.select(sa.func.coalesce(r.c.error_code, r.c.state), sa.func.count())
            .where(
                r.c.id.between(span[0], span[1]),
                r.c.submission_id == submission_id,
                r.c.state.in_(failed),
            )
            .group_by(sa.func.coalesce(r.c.error_code, r.c.state))
        )
        return {str(code): int(count) for code, count in rows}


def delete_batch(store: Store, batch_id: int) -> bool:
    """Forget a batch row (its submission and requests stay, with their costs); False if there
    was none."""
    t = gateway_batches_t
    with store.write() as conn:
        return bool(conn.execute(sa.delete(t).where(t.c.id == batch_id)).rowcount)
