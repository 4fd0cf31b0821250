"""Cancelling requests, and whole batches at the provider.

A cancelled request is terminal at once. If it sits in a provider batch, the batch runs on; a
line that comes back for it later is recorded for its cost only, like any late line.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from batchwise.errors import NotFoundError
from batchwise.states import LIVE_BATCH_STATES, LIVE_REQUEST_STATES, RequestState
from batchwise.store import batches
from batchwise.store.events import record_event
from batchwise.store.transitions import transition_requests

if TYPE_CHECKING:
    from batchwise.providers.base import Provider
    from batchwise.store.engine import Store


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
    with store.read() as conn:
        found = batches.find(conn, batch_id)
        if found is None:
            raise NotFoundError(f"no batch with id {batch_id}")
        ids = batches.request_ids(conn, batch_id)  # linked, and listed but not linked yet
    state, provider_batch_id = found
    if provider_batch_id and state in LIVE_BATCH_STATES:
        info = provider.cancel(provider_batch_id)
        with store.write() as conn:
            batches.mark_cancelling(conn, batch_id, provider_status=info.provider_status, now=now)
    return cancel_requests(store, ids, now=now, why=f"cancelled with batch {batch_id}")
