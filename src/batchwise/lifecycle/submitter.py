"""The submitter: batch rows in `building` become provider batches, exactly once.

The batch row exists before any provider call, and its id travels in the provider batch's
metadata. A submitter that takes over a batch someone else started (a crash, an expired lease)
first looks for a provider batch carrying that id and adopts it, so no batch row is ever
submitted twice (invariant 3).
"""

from __future__ import annotations

import logging
import random
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from batchwise.errors import ProviderError
from batchwise.faults import crashpoint
from batchwise.lifecycle import batch_files, capacity
from batchwise.lifecycle.packer import write_batch_file
from batchwise.providers.base import BatchInfo, BatchStatus, Provider
from batchwise.states import BatchState
from batchwise.store import batches
from batchwise.store.batches import Claimed
from batchwise.store.events import record_event

if TYPE_CHECKING:
    from batchwise.clock import Clock
    from batchwise.config import Settings
    from batchwise.store.engine import Store

log = logging.getLogger(__name__)

METADATA_KEY = "batchwise_batch"
#: how far the provider's clock may be from ours when matching a batch by creation time
_CLOCK_SKEW = timedelta(seconds=30)
#: longest wait between submit attempts after transient failures (seconds)
MAX_SUBMIT_DELAY_S = 600.0
#: error codes of a failure that never reached the provider (see `providers.http`)
_NOT_ANSWERED = frozenset({"connection_error", "timeout", "unreadable_answer"})
#: submit attempts (claims that may create a provider batch) per batch row and hour
MAX_SUBMIT_ATTEMPTS = capacity.MAX_CREATIONS

STATUS_TO_STATE = {
    BatchStatus.VALIDATING: BatchState.SUBMITTED,
    BatchStatus.IN_PROGRESS: BatchState.IN_PROGRESS,
    BatchStatus.FINALIZING: BatchState.FINALIZING,
    BatchStatus.CANCELLING: BatchState.CANCELLING,
    BatchStatus.COMPLETED: BatchState.COMPLETED,
    BatchStatus.FAILED: BatchState.FAILED,
    BatchStatus.EXPIRED: BatchState.EXPIRED,
    BatchStatus.CANCELLED: BatchState.CANCELLED,
}


def metadata_value(store_id: str, batch_id: int) -> str:
    """Names one batch row of one store: the id alone could repeat across deployments."""
    return f"{store_id}:{batch_id}"


def claim_next_batch(
    store: Store, *, now: datetime, settings: Settings, worker: str
) -> Claimed | None:
    """Take the next batch that needs submitting and is not held by a live lease.

    One at a time: a worker holds the lease only on the batch it is working on, so a slow
    upload never lets someone else's lease on a waiting batch lapse.
    """
    return batches.claim_for_upload(store, now=now, lease_s=settings.lease_s, worker=worker)


def submit_batch(
    store: Store,
    provider: Provider,
    batch: Claimed,
    *,
    clock: Clock,
    settings: Settings,
    worker: str,
) -> BatchInfo | None:
    """Submit (or adopt) one claimed batch; returns the provider batch, or None if it is
    left for a later attempt or failed. The lease is kept alive while it works."""
    with batches.keep_lease(store, batch.id, worker, lease_s=settings.lease_s, clock=clock):
        key = metadata_value(store.store_id, batch.id)
        if batch.create_started_at is not None:
            # An earlier attempt started the create call: the batch may exist. Look first;
            # a provider that cannot say now is a failed attempt like any other.
            try:
                adopted = _find_existing(store, provider, batch, key, batch.create_started_at)
            except ProviderError as exc:
                _submit_failed(store, batch, exc, now=clock(), settings=settings, worker=worker)
                return None
            if adopted is not None:
                log.warning(
                    "batch %s: adopting provider batch %s created by an earlier attempt",
                    batch.id,
                    adopted.id,
                )
                _record(store, batch, adopted, now=clock(), worker=worker)
                return adopted
        # A name of our own: after a takeover two workers may build the same batch's file.
        path = batch_files.private_path(settings, store.store_id, batch.id)
        try:
            taken = _take_packed_file(store, batch, settings, path)
            if taken is not None:
                lines, size = taken
            else:
                lines, size = write_batch_file(
                    store, batch_id=batch.id, provider=provider, endpoint=batch.endpoint, path=path
                )
            if lines == 0:  # every request was cancelled or rescued while packed
                _finish_empty(store, batch, now=clock(), worker=worker)
                return None
            crashpoint("before_submit")
            if not _mark_create_started(store, batch, now=clock(), worker=worker):
                return None
            try:
                info = provider.submit_batch(
                    path, endpoint=batch.endpoint, metadata={METADATA_KEY: key}
                )
            except ProviderError as exc:
                _submit_failed(store, batch, exc, now=clock(), settings=settings, worker=worker)
                return None
            crashpoint("after_create")
            _record(store, batch, info, now=clock(), worker=worker, size_bytes=size)
            return info
        finally:
            path.unlink(missing_ok=True)


def _take_packed_file(
    store: Store, batch: Claimed, settings: Settings, path: Path
) -> tuple[int, int] | None:
    """The file the packer wrote for this batch, moved to `path` (so only one submitter takes
    it), if every member it lists is still waiting; (lines, bytes), or None to build one."""
    packed = batch_files.packed_file_path(settings, store.store_id, batch.id)
    if not packed.exists():
        return None
    with store.read() as conn:
        members = batches.batch_members(conn, batch.id)
        waiting = batches.count_waiting(conn, members)
    if not members or waiting != len(members):
        packed.unlink(missing_ok=True)  # one was cancelled or rescued meanwhile: rebuild
        return None
    try:
        packed.replace(path)
    except FileNotFoundError:  # another submitter took it first
        return None
    return len(members), path.stat().st_size


def _mark_create_started(store: Store, batch: Claimed, *, now: datetime, worker: str) -> bool:
    """Commit that a create call is about to be made; False if our lease was lost."""
    with store.write() as conn:
        return batches.mark_create_started(conn, batch.id, worker=worker, now=now)


def _find_existing(
    store: Store, provider: Provider, batch: Claimed, key: str, create_started_at: datetime
) -> BatchInfo | None:
    with store.read() as conn:
        known = batches.known_provider_batch_ids(conn, batch.provider)
    found = [
        info
        for info in provider.find_batches(
            METADATA_KEY,
            key,
            created_after=create_started_at - _CLOCK_SKEW,
            request_count=batch.request_count,
        )
        if info.id not in known
    ]
    if not found:
        return None
    # Metadata matches are exact; size-and-time candidates (Anthropic) are ranked by how close
    # their creation is to our create call.
    return min(
        found,
        key=lambda info: (
            abs(((info.created_at or create_started_at) - create_started_at).total_seconds()),
            info.id,
        ),
    )


def _record(
    store: Store,
    batch: Claimed,
    info: BatchInfo,
    *,
    now: datetime,
    worker: str,
    size_bytes: int | None = None,
) -> None:
    with store.write() as conn:
        recorded = batches.record_submitted(
            conn,
            batch.id,
            worker=worker,
            state=STATUS_TO_STATE[info.status],
            provider_batch_id=info.id,
            provider_status=info.provider_status,
            result_refs=info.result_refs,
            now=now,
            size_bytes=size_bytes,
        )
    if not recorded:
        # Someone took the batch over; they will find this provider batch by its metadata.
        log.warning("batch %s: lease lost before recording provider batch %s", batch.id, info.id)


def _finish_empty(store: Store, batch: Claimed, *, now: datetime, worker: str) -> None:
    with store.write() as conn:
        batches.finish_empty(conn, batch.id, worker=worker, now=now)


def _submit_failed(
    store: Store,
    batch: Claimed,
    exc: ProviderError,
    *,
    now: datetime,
    settings: Settings,
    worker: str,
) -> None:
    """A transient failure (an outage, a timeout, a page from a proxy) waits, with backoff and
    jitter, and tries again (looking for the batch first), at most `capacity.MAX_CREATIONS`
    times an hour (`_hold`: then the batch is held, with an event, until the hour is over); the
    rescue takes requests whose deadline is at risk meanwhile. A final failure, or a refusal
    for capacity, fails the batch and the reconciler puts its requests back in the queue, or
    fails them if the error dooms them (a capacity refusal spends no attempt and teaches the
    packer the limit). The provider's HTTP client logs an outage once per streak, so a retry is
    only noted."""
    give_up = not exc.retryable or exc.code == capacity.TOKEN_LIMIT
    backoff = min(MAX_SUBMIT_DELAY_S, 5.0 * 2 ** min(max(batch.attempts - 1, 0), 10))
    delay = exc.retry_after_s or backoff * (0.75 + 0.5 * random.random())
    # the bound is on answers from the provider: an outage (no connection, a timeout, a page
    # from a proxy) created nothing there, and waits out with backoff however long it lasts
    answered = exc.code is not None and exc.code not in _NOT_ANSWERED
    if not give_up and answered and _hold(store, batch, exc, now=now, worker=worker):
        return
    if give_up:
        log.error("batch %s: submit failed for good: %s", batch.id, exc)
    else:
        log.info(
            "batch %s: submit failed (attempt %s), retrying in %.0fs: %s",
            batch.id,
            batch.attempts,
            delay,
            exc,
        )
    with store.write() as conn:
        if give_up:
            batches.fail_submit(
                conn, batch.id, worker=worker, error=str(exc), error_code=exc.code, now=now
            )
        else:
            batches.retry_submit_later(
                conn,
                batch.id,
                worker=worker,
                error=str(exc),
                error_code=exc.code,
                retry_at=now + timedelta(seconds=delay),
                now=now,
            )


def _hold(store: Store, batch: Claimed, exc: ProviderError, *, now: datetime, worker: str) -> bool:
    """Past `capacity.MAX_CREATIONS` tries within the hour, the batch is held until the hour
    is over, with an event, instead of being tried again in a loop. False if it may retry."""
    until = capacity.creation_hold(batch.attempts, batch.upload_started_at, now=now)
    if until is None:
        return False
    log.error("batch %s: %s submit tries within the hour; held until %s", batch.id,
              batch.attempts, until.isoformat())  # fmt: skip
    with store.write() as conn:
        if batches.retry_submit_later(
            conn,
            batch.id,
            worker=worker,
            error=str(exc),
            error_code=exc.code,
            retry_at=until,
            now=now,
        ):
            record_event(
                conn,
                at=now,
                kind="batch_held",
                severity="warning",
                batch_id=batch.id,
                message=f"batch {batch.id} was tried {batch.attempts} times at "
                f"{batch.provider} within the hour ({exc.code or 'error'}: {exc}); "
                f"held until {until.isoformat()}",
                data={"until": until.isoformat(), "attempts": batch.attempts},
            )
    return True
