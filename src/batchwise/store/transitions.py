"""The one state machine: every request and batch state change goes through these functions,
which check `states.TRANSITIONS` / `states.BATCH_TRANSITIONS` and move rows compare-and-set
(only rows still in the expected state move).

`check_transition` imports nothing heavy, so the SQLite intake sink (which never loads
SQLAlchemy) checks its guard moves with it too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from batchwise.errors import TransitionError
from batchwise.states import BATCH_TRANSITIONS, TRANSITIONS, BatchState, RequestState

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection


def check_transition(src: RequestState, dst: RequestState) -> None:
    if dst not in TRANSITIONS[src]:
        raise TransitionError(f"a request cannot move from {src.value} to {dst.value}")


def transition_requests(
    conn: Connection,
    ids: Sequence[int],
    *,
    src: RequestState | Iterable[RequestState],
    dst: RequestState,
    now: datetime,
    values: dict[str, Any] | None = None,
    extra_where: Any = None,
) -> list[int]:
    """Move requests from `src` to `dst`, compare-and-set: only rows still in `src` move.

    Returns the ids that moved, so a caller racing another worker knows exactly what it won.
    """
    import sqlalchemy as sa

    from batchwise.store.engine import chunked, requests_t

    sources = [src] if isinstance(src, RequestState) else list(src)
    for s in sources:
        check_transition(s, dst)
    moved: list[int] = []
    changes: dict[str, Any] = {"state": dst.value, "updated_at": now, **(values or {})}
    if dst.terminal and "finished_at" not in changes:
        changes["finished_at"] = now
    for chunk in chunked(ids, 5000):
        stmt = (
            sa.update(requests_t)
            .where(requests_t.c.id.in_(chunk))
            .where(requests_t.c.state.in_([s.value for s in sources]))
        )
        if extra_where is not None:
            stmt = stmt.where(extra_where)
        stmt = stmt.values(**changes).returning(requests_t.c.id)
        moved.extend(row[0] for row in conn.execute(stmt))
    return moved


def check_batch_transition(src: BatchState, dst: BatchState) -> None:
    if dst not in BATCH_TRANSITIONS[src]:
        raise TransitionError(f"a batch cannot move from {src.value} to {dst.value}")


def transition_batch(
    conn: Connection,
    batch_id: int,
    *,
    src: BatchState | Iterable[BatchState],
    dst: BatchState,
    now: datetime,
    values: dict[str, Any] | None = None,
    lease_owner: str | None = None,
) -> bool:
    """Move a batch from `src` to `dst`, compare-and-set: only a row still in `src` (and, given
    `lease_owner`, still held by that worker) moves. Returns whether it moved.

    `values` are further columns to set in the same statement; callers inside the store may
    pass SQL expressions (`poll_count + 1`)."""
    import sqlalchemy as sa

    from batchwise.store.engine import batches_t

    sources = [src] if isinstance(src, BatchState) else list(src)
    for s in sources:
        check_batch_transition(s, dst)
    b = batches_t
    stmt = sa.update(b).where(b.c.id == batch_id, b.c.state.in_([s.value for s in sources]))
    if lease_owner is not None:
        stmt = stmt.where(b.c.lease_owner == lease_owner)
    stmt = stmt.values(**{"updated_at": now, **(values or {}), "state": dst.value})
    return bool(conn.execute(stmt).rowcount)
