"""The reconciler: provider results back into the store, idempotently and in bulk.

Results are streamed and joined on `custom_id` (never line order); each chunk is applied in one
transaction: responses stored, requests moved by compare-and-set, and the ledger written beside
them. A response is stored once per (request, batch), so applying the same results twice
changes nothing (invariant 4). Lines that finished in an expired or cancelled batch are kept
(salvage); the rest go back to the queue. A batch becomes `reconciled` only after its whole
result stream was read; a stream that breaks midway is picked up again on the next tick.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import islice
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from batchwise import ledger
from batchwise.classify import human_s
from batchwise.clock import Clock
from batchwise.config import Settings
from batchwise.errors import ProviderError
from batchwise.faults import crashpoint
from batchwise.packer import parse_custom_id
from batchwise.pricing import PriceBook, TokenUsage, normalise_usage
from batchwise.providers.base import (
    BatchInfo,
    BatchStatus,
    LineOutcome,
    OutcomeKind,
    Provider,
    RequestCounts,
)
from batchwise.states import ENDED_BATCH_STATES, BatchState, RequestState
from batchwise.store import (
    LeaseKeeper,
    Store,
    batches_t,
    check_transition,
    lease_until,
    record_event,
    requests_t,
    reserve_ids,
    responses_t,
)

log = logging.getLogger(__name__)

CHUNK_LINES = 2000
#: wait before reading the results of a batch again after a broken stream
RETRY_READ_S = 30.0
TOKEN_LIMIT = "token_limit_exceeded"
_S = RequestState
_STATE_TO_STATUS = {
    BatchState.COMPLETED.value: BatchStatus.COMPLETED,
    BatchState.EXPIRED.value: BatchStatus.EXPIRED,
    BatchState.CANCELLED.value: BatchStatus.CANCELLED,
    BatchState.FAILED.value: BatchStatus.FAILED,
}
_t = requests_t
_REQUEST_COLUMNS = (
    _t.c.id,
    _t.c.state,
    _t.c.batch_id,
    _t.c.attempts,
    _t.c.lane,
    _t.c.provider,
    _t.c.model,
    _t.c.endpoint,
    _t.c.use_case,
    _t.c.step,
    _t.c.business_unit,
    _t.c.task_id,
    _t.c.deadline,
)
_UPDATE = (
    sa.update(_t)
    .where(_t.c.id == sa.bindparam("b_id"), _t.c.state == sa.bindparam("b_expected"))
    .values(
        state=sa.bindparam("b_state"),
        response_id=sa.bindparam("b_response_id"),
        attempts=sa.bindparam("b_attempts"),
        batch_id=sa.bindparam("b_batch_id"),
        error=sa.bindparam("b_error"),
        error_code=sa.bindparam("b_error_code"),
        finished_at=sa.bindparam("b_finished_at"),
        deadline_miss=sa.bindparam("b_miss"),
        updated_at=sa.bindparam("b_now"),
    )
)


@dataclass
class ReconcileReport:
    """What one reconcile pass over a batch did."""

    batch_id: int
    lines: int = 0
    succeeded: int = 0
    #: answers for requests already answered (a rescue won); billed, kept, not used
    late: int = 0
    #: retryable errors sent back to the queue
    retried: int = 0
    failed: int = 0
    #: expired, cancelled or missing lines sent back to the queue
    requeued: int = 0
    unknown: int = 0
    #: lines already applied by an earlier pass
    duplicates: int = 0
    complete: bool = False
    error: str | None = None


@dataclass(frozen=True)
class _Batch:
    id: int
    provider: str
    endpoint: str
    state: str
    provider_batch_id: str | None
    provider_status: str | None
    result_refs: str
    error_code: str | None
    last_error: str | None

    def info(self) -> BatchInfo:
        return BatchInfo(
            id=self.provider_batch_id or "",
            status=_STATE_TO_STATUS[self.state],
            provider_status=self.provider_status or self.state,
            counts=RequestCounts(),
            result_refs=orjson.loads(self.result_refs or "{}"),
            endpoint=self.endpoint,
        )


def reconcile_due(
    store: Store,
    provider_for: Callable[[str], Provider],
    book: PriceBook,
    *,
    now: datetime,
    settings: Settings,
    worker: str,
    clock: Clock | None = None,
) -> list[ReconcileReport]:
    """Reconcile ended batches one claim at a time, each under a lease kept alive while its
    results stream in; a batch whose results could not be read waits before the next try."""
    reports: list[ReconcileReport] = []
    while (batch := _claim_next(store, now=now, settings=settings, worker=worker)) is not None:
        keeper = LeaseKeeper(
            store,
            batches_t,
            batch.id,
            worker,
            lease_s=settings.lease_s,
            clock=clock or (lambda: now),
        )
        with keeper:
            reports.append(
                reconcile_batch(
                    store, provider_for(batch.provider), book, batch, now=now, settings=settings
                )
            )
    return reports


def _claim_next(store: Store, *, now: datetime, settings: Settings, worker: str) -> _Batch | None:
    b = batches_t
    ended = [s.value for s in ENDED_BATCH_STATES]
    claimable = sa.and_(
        b.c.state.in_(ended),
        sa.or_(b.c.lease_expires_at.is_(None), b.c.lease_expires_at < now),
        sa.or_(b.c.next_poll_at.is_(None), b.c.next_poll_at <= now),
    )
    pick = sa.select(b.c.id).where(claimable).order_by(b.c.id).limit(1)
    if store.is_postgres:
        pick = pick.with_for_update(skip_locked=True)
    with store.write() as conn:
        batch_id = conn.execute(pick).scalar()
        if batch_id is None:
            return None
        row = conn.execute(
            sa.update(b)
            .where(b.c.id == batch_id, claimable)
            .values(lease_owner=worker, lease_expires_at=lease_until(now, settings.lease_s))
            .returning(
                b.c.id,
                b.c.provider,
                b.c.endpoint,
                b.c.state,
                b.c.provider_batch_id,
                b.c.provider_status,
                b.c.result_refs,
                b.c.error_code,
                b.c.last_error,
            )
        ).first()
    return None if row is None else _Batch(*row)


def reconcile_batch(
    store: Store,
    provider: Provider,
    book: PriceBook,
    batch: _Batch,
    *,
    now: datetime,
    settings: Settings,
) -> ReconcileReport:
    """Apply every result line of one ended batch, then close it."""
    report = ReconcileReport(batch.id)
    if batch.state != BatchState.FAILED.value:
        with store.read() as conn:
            seen = set(
                conn.execute(
                    sa.select(responses_t.c.request_id).where(responses_t.c.batch_id == batch.id)
                ).scalars()
            )
        try:
            for chunk in _chunks(provider.fetch_results(batch.info()), CHUNK_LINES):
                _apply_chunk(store, book, batch, chunk, seen, report, now=now, settings=settings)
                crashpoint("mid_reconcile")
        except ProviderError as exc:
            report.error = str(exc)
            log.error("batch %s: reading results failed, will retry: %s", batch.id, exc)
            with store.write() as conn:
                record_event(
                    conn,
                    at=now,
                    kind="results_error",
                    severity="warning",
                    batch_id=batch.id,
                    message=f"reading results of batch {batch.id} "
                    f"failed (the batch stays open and is read again): {exc}",
                )
                conn.execute(
                    sa.update(batches_t)
                    .where(batches_t.c.id == batch.id)
                    .values(
                        last_error=str(exc),
                        lease_owner=None,
                        lease_expires_at=None,
                        next_poll_at=now + timedelta(seconds=exc.retry_after_s or RETRY_READ_S),
                        updated_at=now,
                    )
                )
            return report
    crashpoint("before_reconcile_finish")
    _finish(store, batch, report, now=now, settings=settings)
    report.complete = True
    return report


def _chunks(items: Iterable[LineOutcome], size: int) -> Iterator[list[LineOutcome]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _usage(provider: str, endpoint: str, outcome: LineOutcome) -> TokenUsage | None:
    raw = outcome.usage if outcome.kind is OutcomeKind.SUCCEEDED else _error_usage(outcome)
    if raw is None:
        return None
    try:
        return normalise_usage(provider, endpoint, raw)
    except (ProviderError, ValueError) as exc:
        log.warning("unreadable usage on line %s: %s", outcome.line, exc)
        return None


def _error_usage(outcome: LineOutcome) -> dict[str, Any] | None:
    """An errored line is billed only if the provider reported usage for it."""
    usage = outcome.body.get("usage") if isinstance(outcome.body, dict) else None
    return usage if isinstance(usage, dict) else None


def _miss(deadline: datetime, now: datetime, how: str) -> str | None:
    if now <= deadline:
        return None
    return f"{how} {human_s((now - deadline).total_seconds())} after the deadline"


def _error_text(outcome: LineOutcome) -> str:
    text = outcome.error_message or outcome.kind.value
    return f"{outcome.error_code}: {text}" if outcome.error_code else text


def _apply_chunk(
    store: Store,
    book: PriceBook,
    batch: _Batch,
    chunk: list[LineOutcome],
    seen: set[int],
    report: ReconcileReport,
    *,
    now: datetime,
    settings: Settings,
) -> None:
    report.lines += len(chunk)
    lines: list[tuple[int, LineOutcome]] = []
    unknown: list[LineOutcome] = []
    store_id = store.store_id
    for outcome in chunk:
        ids = parse_custom_id(outcome.custom_id, store_id)
        if ids is None or ids[0] != batch.id:
            unknown.append(outcome)
        elif ids[1] in seen:
            report.duplicates += 1
        else:
            seen.add(ids[1])
            lines.append((ids[1], outcome))
    with store.write() as conn:
        query = sa.select(*_REQUEST_COLUMNS).where(_t.c.id.in_([rid for rid, _ in lines]))
        if store.is_postgres:
            query = query.with_for_update()
        requests = {row["id"]: dict(row) for row in conn.execute(query).mappings()} if lines else {}
        unknown.extend(o for rid, o in lines if rid not in requests)
        lines = [(rid, o) for rid, o in lines if rid in requests]
        response_ids = reserve_ids(conn, responses_t, len(lines))
        responses: list[dict[str, Any]] = []
        entries: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        for (rid, outcome), response_id in zip(lines, response_ids, strict=True):
            request = requests[rid]
            usage = _usage(batch.provider, batch.endpoint, outcome)
            responses.append(_response_row(response_id, rid, batch.id, outcome, usage, now))
            _decide(
                book,
                batch,
                request,
                outcome,
                usage,
                response_id,
                entries,
                updates,
                report,
                now=now,
                settings=settings,
            )
        if responses:
            conn.execute(sa.insert(responses_t), responses)
        ledger.record(conn, entries)
        if updates:
            matched = conn.execute(_UPDATE, updates).rowcount
            if matched != len(updates):  # the rows are locked: this is a bug, not a race
                raise RuntimeError(
                    f"batch {batch.id}: {len(updates) - matched} request(s) moved under a lock"
                )
        if unknown:
            report.unknown += len(unknown)
            _report_unknown(conn, batch, unknown, now)


def _response_row(
    response_id: int,
    request_id: int,
    batch_id: int,
    outcome: LineOutcome,
    usage: TokenUsage | None,
    now: datetime,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "request_id": request_id,
        "batch_id": batch_id,
        "kind": "batch",
        "outcome": outcome.kind.value,
        "status_code": outcome.status_code,
        "body": orjson.dumps(outcome.body).decode() if outcome.body is not None else None,
        "error_code": outcome.error_code,
        "error_message": outcome.error_message,
        "retryable": outcome.retryable,
        "provider_request_id": outcome.provider_request_id,
        "input_tokens": usage.input_tokens if usage else 0,
        "output_tokens": usage.output_tokens if usage else 0,
        "created_at": now,
    }


def _decide(
    book: PriceBook,
    batch: _Batch,
    request: dict[str, Any],
    outcome: LineOutcome,
    usage: TokenUsage | None,
    response_id: int,
    entries: list[dict[str, Any]],
    updates: list[dict[str, Any]],
    report: ReconcileReport,
    *,
    now: datetime,
    settings: Settings,
) -> None:
    """What one line means for its request and for the ledger."""
    state = RequestState(request["state"])
    ours = request["batch_id"] == batch.id and state is _S.SUBMITTED

    def price(kind: ledger.Kind) -> None:
        entries.append(
            ledger.entry(
                book,
                kind=kind,
                request=request,
                usage=usage,
                at=now,
                response_id=response_id,
                batch_id=batch.id,
            )
        )

    if outcome.kind is OutcomeKind.SUCCEEDED:
        if ours or (state is _S.RESCUED and request["batch_id"] == batch.id):
            price(ledger.Kind.BATCH)
            updates.append(
                _update(
                    request,
                    _S.SUCCEEDED,
                    now,
                    response_id=response_id,
                    batch_id=batch.id,
                    miss=_miss(request["deadline"], now, "answered by its batch"),
                )
            )
            report.succeeded += 1
        else:
            price(ledger.Kind.LATE_BATCH)
            report.late += 1
        return
    if outcome.kind is OutcomeKind.ERRORED and usage is not None:
        price(ledger.Kind.RETRY)
    if not ours:
        return
    error = _error_text(outcome)
    if outcome.kind is OutcomeKind.ERRORED:
        attempts = request["attempts"] + 1
        if outcome.retryable and attempts < settings.max_attempts:
            updates.append(
                _update(
                    request,
                    _S.QUEUED,
                    now,
                    attempts=attempts,
                    error=error,
                    error_code=outcome.error_code,
                )
            )
            report.retried += 1
        else:
            why = error if not outcome.retryable else f"gave up after {attempts} attempts: {error}"
            updates.append(
                _update(
                    request,
                    _S.FAILED,
                    now,
                    attempts=attempts,
                    error=why,
                    error_code=outcome.error_code,
                    batch_id=batch.id,
                    miss=_miss(request["deadline"], now, "failed"),
                )
            )
            report.failed += 1
    else:  # expired or cancelled before it ran: not the request's fault, back to the queue
        updates.append(_update(request, _S.QUEUED, now, error=error, error_code=outcome.kind.value))
        report.requeued += 1


def _update(
    request: dict[str, Any],
    state: RequestState,
    now: datetime,
    *,
    response_id: int | None = None,
    attempts: int | None = None,
    error: str | None = None,
    error_code: str | None = None,
    batch_id: int | None = None,
    miss: str | None = None,
) -> dict[str, Any]:
    expected = RequestState(request["state"])
    check_transition(expected, state)
    return {
        "b_id": request["id"],
        "b_expected": expected.value,
        "b_state": state.value,
        "b_response_id": response_id,
        "b_attempts": request["attempts"] if attempts is None else attempts,
        "b_batch_id": batch_id,
        "b_error": error,
        "b_error_code": error_code,
        "b_finished_at": now if state.terminal else None,
        "b_miss": miss,
        "b_now": now,
    }


def _report_unknown(
    conn: Connection, batch: _Batch, unknown: list[LineOutcome], now: datetime
) -> None:
    shown = ", ".join(f"{o.custom_id!r} (line {o.line})" for o in unknown[:10])
    more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
    record_event(
        conn,
        at=now,
        kind="unknown_result_line",
        severity="warning",
        batch_id=batch.id,
        message=f"batch {batch.id}: {len(unknown)} result line(s) match no request of this "
        f"batch: {shown}{more}",
        data={"custom_ids": [o.custom_id for o in unknown[:100]]},
    )


def _finish(
    store: Store, batch: _Batch, report: ReconcileReport, *, now: datetime, settings: Settings
) -> None:
    """Requests of the batch that got no line go back to the queue; the batch is closed."""
    live = [_S.PACKED.value, _S.SUBMITTED.value]
    with store.write() as conn:
        query = sa.select(*_REQUEST_COLUMNS).where(_t.c.batch_id == batch.id, _t.c.state.in_(live))
        if store.is_postgres:
            query = query.with_for_update()
        leftovers = [dict(row) for row in conn.execute(query).mappings()]
        updates = []
        for request in leftovers:
            if batch.state == BatchState.FAILED.value:
                capacity = batch.error_code == TOKEN_LIMIT
                attempts = request["attempts"] + (0 if capacity else 1)
                reason = batch.last_error or batch.error_code or "no reason given"
                error = f"batch {batch.id} failed: {reason}"
            elif batch.state == BatchState.COMPLETED.value:
                attempts, error = (
                    request["attempts"] + 1,
                    f"missing from the results of batch {batch.id}",
                )
            else:
                attempts, error = (
                    request["attempts"],
                    f"batch {batch.id} {batch.state} before it ran",
                )
            if attempts >= settings.max_attempts:
                updates.append(
                    _update(
                        request,
                        _S.FAILED,
                        now,
                        attempts=attempts,
                        batch_id=batch.id,
                        error=f"gave up after {attempts} attempts: {error}",
                        error_code=batch.error_code,
                        miss=_miss(request["deadline"], now, "failed"),
                    )
                )
                report.failed += 1
            else:
                updates.append(
                    _update(
                        request,
                        _S.QUEUED,
                        now,
                        attempts=attempts,
                        error=error,
                        error_code=batch.error_code,
                    )
                )
                report.requeued += 1
        if updates:
            conn.execute(_UPDATE, updates)
        if leftovers and batch.state == BatchState.COMPLETED.value:
            record_event(
                conn,
                at=now,
                kind="missing_result_lines",
                severity="warning",
                batch_id=batch.id,
                message=f"batch {batch.id} completed without a result "
                f"for {len(leftovers)} request(s); they were queued again",
            )
        if batch.state == BatchState.FAILED.value and leftovers:
            record_event(
                conn,
                at=now,
                kind="batch_failed",
                severity="warning",
                batch_id=batch.id,
                message=f"batch {batch.id} failed ({batch.last_error or batch.error_code}); "
                f"{len(leftovers)} request(s) re-queued or failed",
            )
        conn.execute(
            sa.update(batches_t)
            .where(batches_t.c.id == batch.id)
            .values(
                state=BatchState.RECONCILED.value,
                reconciled_at=now,
                updated_at=now,
                lease_owner=None,
                lease_expires_at=None,
            )
        )
