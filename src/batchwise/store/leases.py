"""Claims on rows (requests in a realtime call, batches being uploaded or reconciled): taken
by compare-and-set, held until `lease_expires_at`, renewed while the work runs."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from batchwise.store.engine import Store


def lease_until(now: datetime, lease_s: float) -> datetime:
    return now + timedelta(seconds=lease_s)


class LeaseKeeper:
    """Keeps this worker's lease on a row alive while slow work runs (an upload, a long
    result stream), so nobody takes the row over from a worker that is still busy with it.

    A background thread pushes `lease_expires_at` forward every third of the lease. If the
    process dies the renewals stop and the lease lapses as usual. `lost` turns True if the row
    is no longer ours.
    """

    def __init__(
        self,
        store: Store,
        table: sa.Table,
        row_id: int,
        worker: str,
        *,
        lease_s: float,
        clock: Callable[[], datetime],
    ) -> None:
        self.store, self.table, self.row_id, self.worker = store, table, row_id, worker
        self.lease_s, self.clock = lease_s, clock
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-{table.name}-{row_id}", daemon=True
        )

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(max(0.05, self.lease_s / 3)):
            self.renew()

    def renew(self) -> bool:
        t = self.table
        with self.store.write() as conn:
            kept = conn.execute(
                sa.update(t)
                .where(t.c.id == self.row_id, t.c.lease_owner == self.worker)
                .values(lease_expires_at=lease_until(self.clock(), self.lease_s))
            ).rowcount
        self.lost = self.lost or not kept
        return bool(kept)


def claim_one(
    store: Store,
    table: sa.Table,
    claimable: sa.ColumnElement[bool],
    *,
    values: dict[str, Any],
    returning: Sequence[sa.ColumnElement[Any]],
) -> tuple[Any, ...] | None:
    """Take the oldest row matching `claimable` by compare-and-set (skipping rows other
    workers hold on PostgreSQL, under the write lock on SQLite); the returned columns, or None."""
    pick = sa.select(table.c.id).where(claimable).order_by(table.c.id).limit(1)
    if store.is_postgres:
        pick = pick.with_for_update(skip_locked=True)
    with store.write() as conn:
        row_id = conn.execute(pick).scalar()
        if row_id is None:
            return None
        row = conn.execute(
            sa.update(table)
            .where(table.c.id == row_id, claimable)
            .values(**values)
            .returning(*returning)
        ).first()
    return None if row is None else tuple(row)
