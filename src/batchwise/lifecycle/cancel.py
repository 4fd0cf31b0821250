"""Cancelling requests, and whole batches at the provider.

A cancelled request is terminal at once. If it sits in a provider batch, the batch runs on; a
line that comes back for it later is recorded for its cost only, like any late line.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa

from batchwise.errors import NotFoundError
from batchwise.lifecycle.packer import batch_members
from batchwise.providers.base import Provider
from batchwise.states import LIVE_BATCH_STATES, LIVE_REQUEST_STATES, BatchState, RequestState
from batchwise.store.engine import Store, batches_t, requests_t
from batchwise.store.events import record_event
from batchwise.store.transitions import transition_requests


def cancel_requests(
    store: Store, ids: Sequence[int], *, now: datetime, why: str = "cancelled by the user"
) -> list[int]:
    """Cancel live requests; returns the ids cancelled (finished ones are left alone)."""
    cancelled: list[int] = []
    with store.write() as conn:
        for state in LIVE_REQUEST_STATES:
            cancelled += transition_requests(
                conn,
                ids,
                src=state,
                dst=RequestState.CANCELLED,
                now=now,
                values={
                    "error": why,
                    "error_code": "cancelled",
                    "lease_owner": None,
                    "lease_expires_at": None,
                },
            )
        if cancelled:
            record_event(
                conn,
                at=now,
                kind="cancel",
                message=f"{len(cancelled)} request(s) {why}",
                data={"request_ids": cancelled[:1000]},
            )
    return sorted(cancelled)


def cancel_batch(store: Store, provider: Provider, batch_id: int, *, now: datetime) -> list[int]:
    """Cancel a batch at the provider and every live request in it."""
    b = batches_t
    with store.read() as conn:
        row = conn.execute(
            sa.select(b.c.state, b.c.provider_batch_id).where(b.c.id == batch_id)
        ).first()
        if row is None:
            raise NotFoundError(f"no batch with id {batch_id}")
        ids = list(
            conn.execute(
                sa.select(requests_t.c.id).where(requests_t.c.batch_id == batch_id)
            ).scalars()
        )
        ids += batch_members(conn, batch_id)  # packed, not linked yet
    state, provider_batch_id = row
    if provider_batch_id and BatchState(state) in LIVE_BATCH_STATES:
        info = provider.cancel(provider_batch_id)
        with store.write() as conn:
            conn.execute(
                sa.update(b)
                .where(b.c.id == batch_id, b.c.state.in_([s.value for s in LIVE_BATCH_STATES]))
                .values(
                    state=BatchState.CANCELLING.value,
                    provider_status=info.provider_status,
                    updated_at=now,
                    next_poll_at=now,
                )
            )
    return cancel_requests(store, ids, now=now, why=f"cancelled with batch {batch_id}")
