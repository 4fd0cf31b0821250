"""The poller: asks providers how live batches are doing, with a backoff suited to their age.

Young batches are polled often (small ones finish in minutes); old ones rarely. The interval is
capped by the scheduler's tick so a fast emulator is noticed at once. Polling is idempotent:
two pollers may poll the same batch, and state only moves forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from batchwise.errors import ProviderError
from batchwise.faults import crashpoint
from batchwise.lifecycle.submitter import STATUS_TO_STATE
from batchwise.providers.base import BatchInfo, BatchStatus, Provider
from batchwise.store import batches

if TYPE_CHECKING:
    from batchwise.store.engine import Store

log = logging.getLogger(__name__)

MIN_POLL_S = 5.0
MAX_POLL_S = 600.0


@dataclass(frozen=True)
class Polled:
    batch_id: int
    state: str
    ended: bool


def poll_interval_s(age_s: float, *, cap_s: float) -> float:
    """A tenth of the batch's age, between 5 s and 10 min, never above `cap_s`."""
    return max(0.0, min(max(MIN_POLL_S, age_s / 10), MAX_POLL_S, cap_s))


def poll_due(
    store: Store, provider_for: Callable[[str], Provider], *, now: datetime, cap_s: float
) -> list[Polled]:
    """Poll every live batch whose next poll is due."""
    with store.read() as conn:
        due = batches.due_for_poll(conn, now=now)
    polled = []
    for batch_id, provider, provider_batch_id, submitted_at in due:
        try:
            info = provider_for(provider).get_batch(provider_batch_id)
        except ProviderError as exc:
            # an outage is logged once per streak by the provider's client
            (log.info if exc.retryable else log.warning)("batch %s: poll failed: %s", batch_id, exc)
            _retry_later(store, batch_id, now=now, delay_s=exc.retry_after_s or cap_s or MIN_POLL_S)
            continue
        crashpoint("before_poll_record")
        polled.append(
            _apply(store, batch_id, info, now=now, submitted_at=submitted_at, cap_s=cap_s)
        )
    return polled


def _apply(
    store: Store,
    batch_id: int,
    info: BatchInfo,
    *,
    now: datetime,
    submitted_at: datetime,
    cap_s: float,
) -> Polled:
    state = STATUS_TO_STATE[info.status]
    turnaround_s: float | None = None
    # (code, text) of the batch-level errors the provider reported
    error: tuple[str | None, str] | None = None
    next_poll_at: datetime | None = None
    if info.status.terminal:
        if info.status in (BatchStatus.COMPLETED, BatchStatus.EXPIRED):
            # Only batches that ran count as turnaround history; a fast failure would bias it.
            turnaround_s = max(0.0, (now - submitted_at).total_seconds())
        if info.errors:
            error = (
                info.errors[0].code,
                "; ".join(
                    f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "")
                    for e in info.errors
                ),
            )
    else:
        age = (now - submitted_at).total_seconds()
        next_poll_at = now + timedelta(seconds=poll_interval_s(age, cap_s=cap_s))
    with store.write() as conn:
        batches.record_poll(
            conn,
            batch_id,
            state,
            now=now,
            provider_status=info.provider_status,
            counts=info.counts.__dict__,
            result_refs=info.result_refs,
            next_poll_at=next_poll_at,
            ended=info.status.terminal,
            turnaround_s=turnaround_s,
            error=error,
        )
    return Polled(batch_id, state.value, info.status.terminal)


def _retry_later(store: Store, batch_id: int, *, now: datetime, delay_s: float) -> None:
    with store.write() as conn:
        batches.poll_later(conn, batch_id, next_poll_at=now + timedelta(seconds=delay_s), now=now)
