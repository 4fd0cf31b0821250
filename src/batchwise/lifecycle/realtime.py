"""The realtime lane: requests classified realtime, and rescued ones, are called now.

Work is claimed with a lease on the row (`SELECT … FOR UPDATE SKIP LOCKED` on PostgreSQL, the
write lock on SQLite), so any number of dispatchers can run; a dispatcher that dies leaves a
lease that expires and the request is taken up again. Calls run with bounded concurrency; a
provider that rate-limits is paused for the time it asks. The outcome is applied by
compare-and-set on the lease: if someone else answered first, this call is recorded as cost
only.

The flex lane goes the same way; only the call differs (`flex_tier`): a flex request is sent
with `service_tier: "flex"` (Batch API prices, slower) while more than `flex_fallback_s` is left
before its deadline, and at the standard tier after that; a flex call may take only the time
left before that point (`flex_timeout_s`), so a slow one still leaves the fallback its time. A
flex refusal (429 `resource_unavailable`) is retried with backoff and is not counted as an
attempt while the deadline leaves room.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from batchwise.clock import Clock
from batchwise.config import Settings
from batchwise.costs import ledger
from batchwise.costs.pricing import PriceBook, TokenUsage, usage_of
from batchwise.errors import ProviderError, RateLimited
from batchwise.faults import crashpoint
from batchwise.intake.classify import human_s
from batchwise.providers.base import CallResult, Provider
from batchwise.states import Lane, RequestState
from batchwise.store import ledger as ledger_table
from batchwise.store import requests
from batchwise.store.engine import Store, db_time

log = logging.getLogger(__name__)

_S = RequestState


@dataclass(frozen=True, eq=False)
class Claim:
    """A request this worker holds the lease on."""

    request: dict[str, Any]
    worker: str

    @property
    def id(self) -> int:
        return int(self.request["id"])


def claim(
    store: Store,
    *,
    now: datetime,
    settings: Settings,
    worker: str,
    limit: int,
    request_id: int | None = None,
    skip_providers: frozenset[str] = frozenset(),
) -> list[Claim]:
    """Lease up to `limit` requests waiting for a realtime call (or exactly `request_id`)."""
    claimed = requests.claim_realtime(
        store,
        now=now,
        worker=worker,
        lease_s=settings.lease_s,
        limit=limit,
        request_id=request_id,
        skip_providers=skip_providers,
    )
    return [Claim(request, worker) for request in claimed]


#: what OpenAI answers (429) when the flex tier has no capacity for a call now
FLEX_REFUSED = "resource_unavailable"


def flex_tier(request: dict[str, Any], *, now: datetime, settings: Settings) -> bool:
    """Whether this call of `request` goes at the flex tier: a flex-lane request (not a rescue)
    with more than `flex_fallback_s` left before its deadline."""
    if request["lane"] != Lane.FLEX.value or request["state"] != _S.DISPATCHING.value:
        return False
    deadline: datetime = request["deadline"]
    return (deadline - now).total_seconds() > settings.flex_fallback_s


def flex_timeout_s(request: dict[str, Any], *, now: datetime, settings: Settings) -> float:
    """How long a flex call of `request` may take, retries included: the realtime timeout, cut
    to the time left before its deadline less `flex_fallback_s`, which the standard-tier call
    after it needs. (A flex call is made only while more than that is left.)"""
    deadline: datetime = request["deadline"]
    left_s = (deadline - now).total_seconds() - settings.flex_fallback_s
    return max(min(settings.realtime_timeout_s, left_s), 0.001)


def call(
    provider: Provider, claim_: Claim, *, flex: bool = False, timeout_s: float | None = None
) -> CallResult | ProviderError:
    """Make the call (at the flex tier if `flex`), within `timeout_s` if given; a provider
    error is returned, not raised, so a pool can collect it."""
    body = orjson.loads(claim_.request["body"])
    if flex:
        body["service_tier"] = "flex"
    try:
        return provider.call(claim_.request["endpoint"], body, timeout_s=timeout_s)
    except ProviderError as exc:
        return exc


def _call_now(
    provider: Provider, claim_: Claim, *, now: datetime, settings: Settings
) -> tuple[bool, CallResult | ProviderError]:
    """Call `claim_` at the tier its deadline allows: (whether at the flex tier, outcome). A
    flex call is bounded so that a slow one leaves time for the standard-tier fallback."""
    flex = flex_tier(claim_.request, now=now, settings=settings)
    timeout_s = flex_timeout_s(claim_.request, now=now, settings=settings) if flex else None
    return flex, call(provider, claim_, flex=flex, timeout_s=timeout_s)


def apply_outcome(
    store: Store,
    book: PriceBook,
    claim_: Claim,
    outcome: CallResult | ProviderError,
    *,
    now: datetime,
    settings: Settings,
    flex: bool = False,
) -> str:
    """Record a call's outcome (`flex`: the call went at the flex tier); returns what happened:
    succeeded, late, retry, failed, lost."""
    request = claim_.request
    rid, state = claim_.id, RequestState(request["state"])
    kind = "rescue" if state is _S.RESCUED else "realtime"
    won_kind = ledger.Kind.FLEX if flex else _LEDGER_KINDS[kind]
    with store.write() as conn:
        if isinstance(outcome, CallResult):
            usage = _usage(book, request, outcome.body)
            response_id = requests.store_call_response(
                conn,
                rid,
                kind=kind,
                status_code=outcome.status_code,
                body=orjson.dumps(outcome.body).decode(),
                provider_request_id=outcome.provider_request_id,
                now=now,
                input_tokens=usage.input_tokens if usage else 0,
                output_tokens=usage.output_tokens if usage else 0,
            )
            won = requests.succeed_call(
                conn,
                rid,
                state=state,
                worker=claim_.worker,
                response_id=response_id,
                now=now,
                deadline_miss=_miss(request["deadline"], now, kind),
            )
            entry_kind = won_kind if won else ledger.Kind.RETRY
            ledger_table.record(
                conn,
                [
                    ledger.entry(
                        book,
                        kind=entry_kind,
                        request=request,
                        usage=usage,
                        at=now,
                        stored_at=db_time(conn, now),
                        response_id=response_id,
                    )
                ],
            )
            return "succeeded" if won else "late"
        error = str(outcome)
        # `max_attempts` counts answers (a 429 included), not outages: no connection, a
        # timeout, a 5xx or a garbage page is free while the deadline leaves room for a retry.
        # So is a flex refusal: the flex tier had no room now, the request did nothing wrong.
        refused = flex and outcome.code == FLEX_REFUSED
        if refused:
            delay = _flex_backoff_s(request, now=now, settings=settings)
        else:
            delay = outcome.retry_after_s or min(300.0, 2.0 ** request["attempts"]) * (
                0.5 + random.random()
            )
        retry_at = now + timedelta(seconds=delay)
        free = (refused or _outage(outcome)) and retry_at < request["deadline"]
        attempts = request["attempts"] + (0 if free else 1)
        if outcome.retryable and (free or attempts < settings.max_attempts):
            updated = requests.retry_call(
                conn,
                rid,
                state=state,
                worker=claim_.worker,
                attempts=attempts,
                error=error,
                error_code=outcome.code,
                now=now,
                not_before=retry_at,
            )
            return "retry" if updated else "lost"
        why = error if not outcome.retryable else f"gave up after {attempts} attempts: {error}"
        updated = requests.fail_call(
            conn,
            rid,
            state=state,
            worker=claim_.worker,
            attempts=attempts,
            error=why,
            error_code=outcome.code,
            now=now,
            deadline_miss=_miss(request["deadline"], now, f"{kind} call failed"),
        )
        return "failed" if updated else "lost"


_LEDGER_KINDS = {"rescue": ledger.Kind.RESCUE, "realtime": ledger.Kind.REALTIME}


def _flex_backoff_s(request: dict[str, Any], *, now: datetime, settings: Settings) -> float:
    """How long to wait after a flex refusal: backoff that grows as the deadline nears (a
    refusal is not an attempt, so attempts cannot measure it), from 5 s to 60 s with jitter,
    never past the moment the request falls back to the standard tier."""
    deadline: datetime = request["deadline"]
    left_s = (deadline - now).total_seconds() - settings.flex_fallback_s
    if left_s <= 0:
        return 0.0
    base = min(60.0, max(5.0, left_s / 20.0))
    return min(left_s, base * (0.5 + random.random()))


def _outage(error: ProviderError) -> bool:
    """Whether a failed call got no answer from the provider (as opposed to a refusal)."""
    status = error.status_code
    return error.retryable and (
        status is None or status >= 500 or error.code == "unreadable_answer"
    )


def _usage(book: PriceBook, request: dict[str, Any], body: dict[str, Any]) -> TokenUsage | None:
    raw = usage_of(body)
    if not isinstance(raw, dict):
        return None
    try:
        return book.usage(request["provider"], request["endpoint"], raw)
    except (ProviderError, ValueError) as exc:
        log.warning("request %s: unreadable usage: %s", request["id"], exc)
        return None


def _miss(deadline: datetime, now: datetime, how: str) -> str | None:
    if now <= deadline:
        return None
    return f"{how} finished {human_s((now - deadline).total_seconds())} after the deadline"


def fan_out(store: Store, leader: Claim, followers: list[Claim], *, now: datetime) -> list[str]:
    """Give a leader's answer to the identical requests that rode on its call, at no cost; if it
    has none, release them to be called on their own."""
    results = []
    with store.write() as conn:
        answer = requests.call_answer(conn, leader.id)
        stamp = db_time(conn, now)
        entries = []
        for follower in followers:
            state = RequestState(follower.request["state"])
            if answer is None:
                requests.release_call(conn, follower.id, state=state, worker=follower.worker)
                results.append("released")
                continue
            response_id, realtime, tokens_in, tokens_out = answer
            done = requests.deduplicate_call(
                conn,
                follower.id,
                state=state,
                worker=follower.worker,
                response_id=response_id,
                dedupe_of=leader.id,
                now=now,
            )
            if done:
                entries.append(
                    ledger.dedupe_entry(
                        follower.request,
                        stored_at=stamp,
                        source_response_id=response_id,
                        realtime_nusd=realtime,
                        input_tokens=tokens_in or 0,
                        output_tokens=tokens_out or 0,
                    )
                )
            results.append("deduplicated" if done else "lost")
        ledger_table.record(conn, entries)
    return results


class Dispatcher:
    """Runs realtime calls with bounded concurrency, for the embedded runner.

    Celery workers instead call `dispatch_one` for each request id they are sent.
    """

    def __init__(
        self,
        store: Store,
        provider_for: Callable[[str], Provider],
        book: PriceBook,
        *,
        settings: Settings,
        clock: Clock,
        worker: str,
        coalesce: Callable[[str | None, str | None, str | None], bool] | None = None,
        claim_lock: threading.Lock | None = None,
    ) -> None:
        self.store = store
        self.coalesce = coalesce
        #: held while claiming; the gateway holds it from storing a request to claiming it,
        #: so the call it makes itself is never taken by this pool first
        self.claim_lock = claim_lock
        self.provider_for = provider_for
        self.book = book
        self.settings = settings
        self.clock = clock
        self.worker = worker
        self._paused: dict[str, float] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=settings.realtime_concurrency, thread_name_prefix="batchwise-realtime"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _paused_providers(self) -> frozenset[str]:
        moment = time.monotonic()
        with self._lock:
            return frozenset(p for p, until in self._paused.items() if until > moment)

    def run_once(self) -> dict[str, int]:
        """Claim what is waiting (up to the concurrency × 4), call it all, apply outcomes."""
        counts: dict[str, int] = {}
        with self.claim_lock or nullcontext():
            claims = claim(
                self.store,
                now=self.clock(),
                settings=self.settings,
                worker=self.worker,
                limit=self.settings.realtime_concurrency * 4,
                skip_providers=self._paused_providers(),
            )
        calls, riders = self._coalesced(claims)
        for result in self._pool.map(self._one, calls):
            counts[result] = counts.get(result, 0) + 1
        for leader, followers in riders.items():
            for result in fan_out(self.store, leader, followers, now=self.clock()):
                counts[result] = counts.get(result, 0) + 1
        return counts

    def _coalesced(self, claims: list[Claim]) -> tuple[list[Claim], dict[Claim, list[Claim]]]:
        """One call per identical request (where dedupe is on); the others ride on it."""
        if self.coalesce is None:
            return claims, {}
        calls: list[Claim] = []
        leaders: dict[tuple[str, str, str], Claim] = {}
        riders: dict[Claim, list[Claim]] = {}
        for claim_ in claims:
            r = claim_.request
            if self.coalesce(r["use_case"], r["step"], r["business_unit"]):
                key = (r["provider"], r["endpoint"], r["body_hash"])
                leader = leaders.setdefault(key, claim_)
                if leader is not claim_:
                    riders.setdefault(leader, []).append(claim_)
                    continue
            calls.append(claim_)
        return calls, riders

    def _one(self, claim_: Claim) -> str:
        provider = self.provider_for(claim_.request["provider"])
        flex, outcome = _call_now(provider, claim_, now=self.clock(), settings=self.settings)
        crashpoint("after_realtime_call")
        # a flex refusal says the flex tier is full, not that the provider rate-limits us
        refused = flex and isinstance(outcome, ProviderError) and outcome.code == FLEX_REFUSED
        if isinstance(outcome, RateLimited) and outcome.retryable and not refused:
            with self._lock:
                self._paused[claim_.request["provider"]] = time.monotonic() + (
                    outcome.retry_after_s or 1.0
                )
        return apply_outcome(
            self.store,
            self.book,
            claim_,
            outcome,
            now=self.clock(),
            settings=self.settings,
            flex=flex,
        )


def dispatch_one(
    store: Store,
    provider_for: Callable[[str], Provider],
    book: PriceBook,
    request_id: int,
    *,
    settings: Settings,
    clock: Clock,
    worker: str,
) -> str:
    """Claim and call one request (a Celery task's body); 'skipped' if it is not claimable."""
    claims = claim(
        store, now=clock(), settings=settings, worker=worker, limit=1, request_id=request_id
    )
    if not claims:
        return "skipped"
    provider = provider_for(claims[0].request["provider"])
    flex, outcome = _call_now(provider, claims[0], now=clock(), settings=settings)
    return apply_outcome(store, book, claims[0], outcome, now=clock(), settings=settings, flex=flex)
