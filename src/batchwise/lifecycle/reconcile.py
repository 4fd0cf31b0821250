"""The reconciler: provider results back into the store, idempotently and in bulk.

Results are streamed and joined on `custom_id` (never line order); each chunk is applied in one
transaction: responses stored, requests moved by compare-and-set, and the ledger written beside
them. A response is stored once per (request, batch), so applying the same results twice
changes nothing (invariant 4). Lines that finished in an expired or cancelled batch are kept
(salvage); the rest go back to the queue. A batch becomes `reconciled` only after its whole
result stream was read; a stream that breaks midway is picked up again on the next tick.

Each line is read on its own: a line that cannot be read (not JSON, no `custom_id`, a shape
we do not know) is recorded as a `bad_result_line` event naming the batch, the file, the line
and an excerpt, and the reading goes on. The requests a batch left unanswered, whatever the
reason (an unreadable line, a missing line, an expired or cancelled one), go back to the queue
without spending an attempt: only an answer from the provider counts as one.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import islice
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import orjson

from batchwise.costs import ledger
from batchwise.costs.pricing import PriceBook, TokenUsage, UsageReader, usage_of
from batchwise.errors import ProviderError
from batchwise.faults import crashpoint
from batchwise.intake.classify import human_s
from batchwise.lifecycle import capacity
from batchwise.lifecycle.packer import batch_request_ids, parse_custom_id
from batchwise.providers.base import (
    BatchInfo,
    BatchStatus,
    LineOutcome,
    OutcomeKind,
    Provider,
    RequestCounts,
)
from batchwise.providers.error_kinds import batch_error_is_final
from batchwise.states import BatchState, RequestState
from batchwise.store import batches, responses
from batchwise.store import ledger as ledger_table
from batchwise.store.dbapi import as_datetime
from batchwise.store.engine import bulk_cache, db_time
from batchwise.store.events import batch_event_data, record_event

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from batchwise.clock import Clock
    from batchwise.config import Settings
    from batchwise.store.engine import Store

log = logging.getLogger(__name__)

CHUNK_LINES = 5000
#: wait before reading the results of a batch again after a broken stream
RETRY_READ_S = 30.0
TOKEN_LIMIT = capacity.TOKEN_LIMIT
#: one event per unreadable result line, up to this many per batch; past it, one per chunk
BAD_LINE_EVENTS = 100
BAD_LINE, BAD_LINES = "bad_result_line", "bad_result_lines"
_S = RequestState
_STATE_TO_STATUS = {
    BatchState.COMPLETED.value: BatchStatus.COMPLETED,
    BatchState.EXPIRED.value: BatchStatus.EXPIRED,
    BatchState.CANCELLED.value: BatchStatus.CANCELLED,
    BatchState.FAILED.value: BatchStatus.FAILED,
}
#: plain strings for the hot loop: an enum's `.value` is a Python-level property call
_SUCCEEDED, _ERRORED = OutcomeKind.SUCCEEDED, OutcomeKind.ERRORED
_UNREADABLE = OutcomeKind.UNREADABLE
_OUTCOME_VALUES = {kind: kind.value for kind in OutcomeKind}
_SUBMITTED, _RESCUED = _S.SUBMITTED.value, _S.RESCUED.value
#: per target state: its value and whether it is terminal
_TARGETS = {state: (state.value, state.terminal) for state in RequestState}


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
    #: coalesced duplicates answered by their leader's line
    deduplicated: int = 0
    #: result lines that could not be read (each recorded once as an event)
    bad_lines: int = 0
    #: requests of this batch named by an unreadable line: what was wrong with it
    unreadable: dict[int, str] = field(default_factory=dict)
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
        keeper = batches.keep_lease(
            store, batch.id, worker, lease_s=settings.lease_s, clock=clock or (lambda: now)
        )
        with keeper:
            reports.append(
                reconcile_batch(
                    store, provider_for(batch.provider), book, batch, now=now, settings=settings
                )
            )
    return reports


def _claim_next(store: Store, *, now: datetime, settings: Settings, worker: str) -> _Batch | None:
    row = batches.claim_for_reconcile(store, now=now, lease_s=settings.lease_s, worker=worker)
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
            seen = responses.answered_ids(conn, batch.id)
            recorded = _recorded_bad_lines(conn, batch.id)
        try:
            with gc_paused():
                for chunk in _chunks(provider.fetch_results(batch.info()), CHUNK_LINES):
                    _apply_chunk(
                        store,
                        book,
                        batch,
                        chunk,
                        (seen, recorded),
                        report,
                        now=now,
                        settings=settings,
                    )
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
                batches.results_unreadable(
                    conn,
                    batch.id,
                    error=str(exc),
                    retry_at=now + timedelta(seconds=exc.retry_after_s or RETRY_READ_S),
                    now=now,
                )
            return report
    crashpoint("before_reconcile_finish")
    _finish(store, batch, report, now=now, settings=settings)
    report.complete = True
    return report


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a bulk loop.

    Reading results allocates a few containers per line that reference counting frees (the
    parsed JSON holds no cycles), but the allocation count alone sets the collector off over
    and over, each pass scanning every live object: about a third of the reconciler's time.
    The collector is process-wide, so this is kept to the loop and restored after it.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _chunks(items: Iterable[LineOutcome], size: int) -> Iterator[list[LineOutcome]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _usage(read: UsageReader, outcome: LineOutcome) -> TokenUsage | None:
    """The line's usage, read by `read` (`PriceBook.usage_reader` of the batch's provider and
    endpoint); None if it has none, or none that can be read (with a warning)."""
    if outcome.kind is _SUCCEEDED:
        body = outcome.body  # as `LineOutcome.usage` reads it, without the property call
        raw = usage_of(body) if body is not None else None
        if not isinstance(raw, dict):
            return None
    else:
        raw = _error_usage(outcome)
        if raw is None:
            return None
    try:
        return read(raw)
    except (ProviderError, ValueError) as exc:
        log.warning("unreadable usage on line %s: %s", outcome.line, exc)
        return None


def _error_usage(outcome: LineOutcome) -> dict[str, Any] | None:
    """An errored line is billed only if the provider reported usage for it."""
    usage = usage_of(outcome.body) if isinstance(outcome.body, dict) else None
    return usage if isinstance(usage, dict) else None


def _error_text(outcome: LineOutcome) -> str:
    text = outcome.error_message or outcome.kind.value
    return f"{outcome.error_code}: {text}" if outcome.error_code else text


def _apply_chunk(
    store: Store,
    book: PriceBook,
    batch: _Batch,
    chunk: list[LineOutcome],
    seen: tuple[set[int], set[tuple[str, int]]],
    report: ReconcileReport,
    *,
    now: datetime,
    settings: Settings,
) -> None:
    """Apply one chunk of result lines; `seen` holds the requests already answered by this
    batch and the unreadable lines already recorded, both updated here."""
    answered, recorded = seen
    report.lines += len(chunk)
    lines: list[tuple[int, LineOutcome]] = []
    unknown: list[LineOutcome] = []
    bad: list[LineOutcome] = []
    store_id = store.store_id
    request_of = batch_request_ids(store_id, batch.id)
    for outcome in chunk:
        if outcome.kind is _UNREADABLE:
            bad.append(outcome)
            continue
        request_id = request_of(outcome.custom_id)
        if request_id is None:
            unknown.append(outcome)
        elif request_id in answered:
            report.duplicates += 1
        else:
            answered.add(request_id)
            lines.append((request_id, outcome))
    # Providers return lines in any order. Applied in request order, the rows written (request
    # updates, responses, ledger entries and their indexes) land in neighbouring pages: in line
    # order every chunk would touch, and write back, pages all over the tables.
    lines.sort(key=_REQUEST_ID)
    with store.write() as conn:
        bulk_cache(conn)
        requests = responses.read_requests(conn, [rid for rid, _ in lines])
        unknown.extend(o for rid, o in lines if rid not in requests)
        lines = [(rid, o) for rid, o in lines if rid in requests]
        step = _Step(book, batch, report, settings, now, db_time(conn, now))
        for (rid, outcome), response_id in zip(
            lines, responses.reserve_response_ids(conn, len(lines)), strict=True
        ):
            step.apply(requests[rid], outcome, response_id)
        # The requests first, while the pages just read are still in the cache.
        responses.apply_answers(conn, step.answers, batch.id)
        responses.apply_updates(conn, step.updates, batch.id)
        responses.insert(conn, step.responses)
        ledger_table.record(conn, step.entries)
        if unknown:
            report.unknown += len(unknown)
            _report_unknown(conn, batch, unknown, now)
        if bad:
            _report_bad(conn, store_id, batch, bad, recorded, report, now)


_REQUEST_ID = itemgetter(0)


class _Step:
    """What one chunk's lines mean for their requests and for the ledger, as rows to write."""

    def __init__(
        self,
        book: PriceBook,
        batch: _Batch,
        report: ReconcileReport,
        settings: Settings,
        now: datetime,
        stored_now: Any,
    ) -> None:
        self.book, self.batch, self.report, self.settings = book, batch, report, settings
        self.now, self.stored_now = now, stored_now
        self.pricer = ledger.Pricer(book, at=now, stored_at=stored_now, batch_id=batch.id)
        self.read_usage = book.usage_reader(batch.provider, batch.endpoint)
        self.responses: list[tuple[Any, ...]] = []
        self.entries: list[tuple[Any, ...]] = []
        self.updates: list[tuple[Any, ...]] = []
        #: `responses.ANSWER_SQL` rows: the common case, a request its own batch answered
        self.answers: list[tuple[Any, ...]] = []

    def apply(self, request: dict[str, Any], outcome: LineOutcome, response_id: int) -> None:
        batch, report, now, stored_now = self.batch, self.report, self.now, self.stored_now
        batch_id, kind, body = batch.id, outcome.kind, outcome.body
        usage = _usage(self.read_usage, outcome)
        self.responses.append((
            response_id, request["id"], batch_id, "batch", _OUTCOME_VALUES[kind],
            outcome.status_code, orjson.dumps(body).decode() if body is not None else None,
            outcome.error_code, outcome.error_message, outcome.retryable,
            outcome.provider_request_id, 0 if usage is None else usage.input_tokens,
            0 if usage is None else usage.output_tokens, stored_now,
        ))  # fmt: skip
        state = request["state"]  # a plain str
        same_batch = request["batch_id"] == batch_id
        ours = same_batch and state == _SUBMITTED
        if kind is _SUCCEEDED:
            if ours or (same_batch and state == _RESCUED):
                self.entries.append(
                    self.pricer.entry(ledger.Kind.BATCH, request, usage, response_id)
                )
                self.answers.append(answer_row(request, response_id, now, stored_now))
                report.succeeded += 1
            else:
                self.entries.append(
                    self.pricer.entry(ledger.Kind.LATE_BATCH, request, usage, response_id)
                )
                report.late += 1
            return
        if kind is _ERRORED and usage is not None:
            self.entries.append(self.pricer.entry(ledger.Kind.RETRY, request, usage, response_id))
        if not ours:
            return
        error = _error_text(outcome)
        if kind is _ERRORED:
            attempts = request["attempts"] + 1
            if outcome.retryable and attempts < self.settings.max_attempts:
                self._update(
                    request,
                    _S.QUEUED,
                    attempts=attempts,
                    error=error,
                    error_code=outcome.error_code,
                )
                report.retried += 1
            else:
                why = (
                    error
                    if not outcome.retryable
                    else f"gave up after {attempts} attempts: {error}"
                )
                self._update(
                    request,
                    _S.FAILED,
                    attempts=attempts,
                    error=why,
                    error_code=outcome.error_code,
                    batch_id=batch_id,
                    miss="failed",
                )
                report.failed += 1
        else:  # expired or cancelled before it ran: not the request's fault, back to the queue
            self._update(request, _S.QUEUED, error=error, error_code=kind.value)
            report.requeued += 1

    def _update(self, request: dict[str, Any], state: RequestState, **changes: Any) -> None:
        self.updates.append(update_row(request, state, self.now, self.stored_now, **changes))


def answer_row(
    request: dict[str, Any], response_id: int, now: datetime, stored_now: Any
) -> tuple[Any, ...]:
    """The `responses.ANSWER_SQL` parameters: `request` answered by its own batch (submitted, or
    rescued meanwhile); what `update_row(request, SUCCEEDED, ...)` would write, in fewer
    columns (the batch and the attempts stay as they are)."""
    missed = None
    if request["deadline"] < stored_now:
        late = (now - as_datetime(request["deadline"])).total_seconds()
        missed = f"answered by its batch {human_s(late)} after the deadline"
    return (response_id, stored_now, missed, stored_now, request["id"], request["state"])


def update_row(
    request: dict[str, Any],
    state: RequestState,
    now: datetime,
    stored_now: Any,
    *,
    response_id: int | None = None,
    attempts: int | None = None,
    error: str | None = None,
    error_code: str | None = None,
    batch_id: int | None = None,
    miss: str | None = None,
    dedupe_of: int | None = None,
) -> tuple[Any, ...]:
    """The `responses.UPDATE_SQL` parameters moving `request` to `state` (the store checks the
    move); `miss` names what finished late, and is recorded only if the deadline has passed."""
    expected = request["state"]
    value, terminal = _TARGETS[state]
    missed = None
    if miss is not None and request["deadline"] < stored_now:
        late = (now - as_datetime(request["deadline"])).total_seconds()
        missed = f"{miss} {human_s(late)} after the deadline"
    return (
        value, response_id, request["attempts"] if attempts is None else attempts,
        batch_id, error, error_code, stored_now if terminal else None, missed, stored_now,
        dedupe_of, request["id"], expected,
    )  # fmt: skip


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


def _recorded_bad_lines(conn: Connection, batch_id: int) -> set[tuple[str, int]]:
    """(file, line) of every unreadable line of the batch an earlier pass recorded."""
    found: set[tuple[str, int]] = set()
    for data in batch_event_data(conn, batch_id, kinds=(BAD_LINE, BAD_LINES)):
        if "line" in data:
            found.add((str(data.get("source")), int(data["line"])))
        found.update((str(source), int(line)) for source, line in data.get("lines", ()))
    return found


def _report_bad(
    conn: Connection,
    store_id: str,
    batch: _Batch,
    bad: list[LineOutcome],
    recorded: set[tuple[str, int]],
    report: ReconcileReport,
    now: datetime,
) -> None:
    """Note each unreadable line: the request it names (if one of this batch's) for `_finish`,
    and an event the first time it is read (one per line, then one for the rest of a chunk
    once the batch has `BAD_LINE_EVENTS` of them)."""
    report.bad_lines += len(bad)
    rest: list[LineOutcome] = []
    for outcome in bad:
        ids = parse_custom_id(outcome.custom_id, store_id) if outcome.custom_id else None
        request_id = ids[1] if ids is not None and ids[0] == batch.id else None
        problem = outcome.error_message or "unreadable"
        if request_id is not None:
            report.unreadable.setdefault(request_id, problem)
        where = (outcome.source or "results", outcome.line or 0)
        if where in recorded:
            continue
        recorded.add(where)
        if len(recorded) > BAD_LINE_EVENTS:
            rest.append(outcome)
            continue
        named = (
            f"it names request {request_id}, which goes back to the queue"
            if request_id is not None
            else "no request of the batch can be named from it"
        )
        record_event(
            conn,
            at=now,
            kind=BAD_LINE,
            severity="warning",
            batch_id=batch.id,
            request_id=request_id,
            message=f"batch {batch.id}: unreadable result line ({problem}): "
            f"{outcome.excerpt}; {named}",
            data={
                "source": where[0],
                "line": where[1],
                "provider_batch_id": batch.provider_batch_id,
                "custom_id": outcome.custom_id,
                "problem": problem,
                "excerpt": outcome.excerpt,
            },
        )
    if rest:
        shown = ", ".join(f"{o.source} line {o.line}" for o in rest[:10])
        more = f" and {len(rest) - 10} more" if len(rest) > 10 else ""
        record_event(
            conn,
            at=now,
            kind=BAD_LINES,
            severity="warning",
            batch_id=batch.id,
            message=f"batch {batch.id}: {len(rest)} more unreadable result line(s): {shown}{more}",
            data={"lines": [[o.source or "results", o.line or 0] for o in rest]},
        )


def _finish(
    store: Store, batch: _Batch, report: ReconcileReport, *, now: datetime, settings: Settings
) -> None:
    """Requests of the batch that got no line go back to the queue; the batch is closed."""
    with store.write() as conn:
        # Members still listed on a batch that ended before the provider had it (its submit
        # failed) join it as `packed`, so they leave it like any member below: queued again,
        # or failed after too many attempts. Only this rare path writes them one by one.
        batches.move_members(conn, batch.id, RequestState.PACKED, now=now)
        leftovers = responses.unanswered(conn, batch.id)
        stored_now = db_time(conn, now)
        updates: list[tuple[Any, ...]] = []
        followers = [r for r in leftovers if r["dedupe_of"] is not None]
        if followers:
            leftovers = [r for r in leftovers if r["dedupe_of"] is None]
            _fan_out(conn, batch, followers, updates, report, now=now, stored_now=stored_now)
        # a batch refused for a reason that dooms every member (model_not_found) fails them now
        doomed = batch.state == BatchState.FAILED.value and batch_error_is_final(batch.error_code)
        for request in leftovers:
            attempts, error = _leftover(batch, request, report)
            code = BAD_LINE if request["id"] in report.unreadable else batch.error_code
            if doomed or attempts >= settings.max_attempts:
                updates.append(
                    update_row(
                        request,
                        _S.FAILED,
                        now,
                        stored_now,
                        attempts=attempts,
                        batch_id=batch.id,
                        error=error if doomed else f"gave up after {attempts} attempts: {error}",
                        error_code=code,
                        miss="failed",
                    )
                )
                report.failed += 1
            else:
                updates.append(
                    update_row(
                        request,
                        _S.QUEUED,
                        now,
                        stored_now,
                        attempts=attempts,
                        error=error,
                        error_code=code,
                    )
                )
                report.requeued += 1
        responses.apply_updates(conn, updates, batch.id)
        if leftovers and batch.state == BatchState.COMPLETED.value:
            unreadable = sum(r["id"] in report.unreadable for r in leftovers)
            why = f" ({unreadable} named by an unreadable line)" if unreadable else ""
            record_event(
                conn,
                at=now,
                kind="missing_result_lines",
                severity="warning",
                batch_id=batch.id,
                message=f"batch {batch.id} completed without a readable result for "
                f"{len(leftovers)} request(s){why}; they were queued again",
                data={"request_ids": [r["id"] for r in leftovers[:1000]]},
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
        batches.mark_reconciled(conn, batch.id, src=BatchState(batch.state), now=now)
        # The batch no longer holds capacity: learn from how it ended (refused or taken).
        capacity.observe_end(
            conn,
            settings,
            batch_id=batch.id,
            state=batch.state,
            error_code=batch.error_code,
            error=batch.last_error,
            now=now,
        )


def _fan_out(
    conn: Connection,
    batch: _Batch,
    followers: list[dict[str, Any]],
    updates: list[tuple[Any, ...]],
    report: ReconcileReport,
    *,
    now: datetime,
    stored_now: Any,
) -> None:
    """Coalesced duplicates take their leader's answer at no cost, or queue again on their own
    if it has none (no penalty: nothing was tried for them)."""
    answers = responses.leader_answers(conn, sorted({r["dedupe_of"] for r in followers}))
    entries = []
    for request in followers:
        answer = answers.get(request["dedupe_of"])
        if answer is None or request["state"] != _S.SUBMITTED.value:
            updates.append(
                update_row(
                    request,
                    _S.QUEUED,
                    now,
                    stored_now,
                    error=f"the request it was coalesced with in batch {batch.id} was not answered",
                )
            )
            report.requeued += 1
            continue
        response_id, realtime, tokens_in, tokens_out = answer
        updates.append(
            update_row(
                request,
                _S.DEDUPLICATED,
                now,
                stored_now,
                response_id=response_id,
                batch_id=batch.id,
                dedupe_of=request["dedupe_of"],
                miss="answered",
            )
        )
        entries.append(
            ledger.dedupe_entry(
                request,
                stored_at=stored_now,
                source_response_id=response_id,
                realtime_nusd=realtime,
                input_tokens=tokens_in or 0,
                output_tokens=tokens_out or 0,
                batch_id=batch.id,
            )
        )
        report.deduplicated += 1
    ledger_table.record(conn, entries)


def _leftover(batch: _Batch, request: dict[str, Any], report: ReconcileReport) -> tuple[int, str]:
    """Attempts and error for a request its batch never answered. Only a failed batch spends
    an attempt (the provider refused the batch, unless it was full); a line that is missing or
    unreadable, like one that expired, is no answer from the provider and spends none."""
    if batch.state == BatchState.FAILED.value:
        capacity = batch.error_code == TOKEN_LIMIT  # the provider was full: not the request's fault
        reason = batch.last_error or batch.error_code or "no reason given"
        return request["attempts"] + (0 if capacity else 1), f"batch {batch.id} failed: {reason}"
    problem = report.unreadable.get(request["id"])
    if problem is not None:
        return request["attempts"], f"its result line in batch {batch.id} was unreadable: {problem}"
    if batch.state == BatchState.COMPLETED.value:
        bad = f" ({report.bad_lines} line(s) were unreadable)" if report.bad_lines else ""
        return request["attempts"], f"missing from the results of batch {batch.id}{bad}"
    return request["attempts"], f"batch {batch.id} {batch.state} before it ran"
