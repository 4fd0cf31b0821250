"""Provider capacity: how many prompt tokens of one (provider, model) may sit in open batches.

OpenAI refuses a batch whose prompt tokens, added to those of the model's batches still in
progress, pass the organisation's enqueued-token limit: the batch fails as a whole with
`token_limit_exceeded` ("… Limit: N enqueued tokens."). The scheduler keeps an estimate of
that limit per (provider, model):

- the configured value (`inflight_token_budget[model]`, else `default_inflight_token_budget`
  when it is not 0), else the documented tier default (`TIER_DEFAULTS`), else no limit;
- lowered when the provider refuses a batch: to the limit its message names, else to half of
  what was open with the refused batch;
- raised again slowly after batches the provider took: a guessed limit by a quarter per
  success, one the provider named by a tenth an hour (a tier
  upgrade is found at the cost of one refusal), never past the configured or default value.

The decisions are pure functions over values (`ceiling`, `learn_refusal`, `learn_success`,
`room`, `creation_hold`); `load`, `observe_end` and `observe_create_refusal` apply them to
the estimates kept in the store (`store/capacity.py`: rows of `store_meta`, so every process,
Celery workers included, shares them and they survive restarts).

After a refusal the model waits: with nothing else of it open and the refused batch bigger
than the new estimate, it is split at once (the packer cuts batches to the estimate); when
other batches of it were open, or splitting cannot help (one request, or a batch already under
the estimate), the model waits, with exponential backoff (`BACKOFF_S` doubled per refusal in a
row, up to `MAX_BACKOFF_S`), until the wait is over or some of its open work has finished.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from batchwise.config import Settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from batchwise.store.engine import Store

#: the error code of a batch refused because the model's enqueued tokens are full
TOKEN_LIMIT = "token_limit_exceeded"
#: documented per-model enqueued-token limits at OpenAI's usage tier 1 (the lowest paid tier;
#: https://platform.openai.com/docs/guides/rate-limits, "Batch queue limit"); a model not
#: listed has no default and is learned from refusals
TIER_DEFAULTS: Mapping[tuple[str, str], int] = {
    ("openai", "gpt-4o"): 90_000,
    ("openai", "gpt-4o-mini"): 2_000_000,
    ("openai", "gpt-4.1"): 900_000,
    ("openai", "gpt-4.1-mini"): 2_000_000,
    ("openai", "gpt-4.1-nano"): 2_000_000,
}
#: the first wait after a refusal, doubled per refusal in a row (seconds)
BACKOFF_S = 30.0
MAX_BACKOFF_S = 3600.0
#: a limit the provider named is trusted this long before successes raise it (seconds)
EXACT_HOLD_S = 3600.0
#: provider batch creations allowed per batch row in `CREATION_WINDOW_S`
MAX_CREATIONS = 5
CREATION_WINDOW_S = 3600.0
_LIMIT = re.compile(r"Limit:\s*([\d,_ ]+?)\s*enqueued tokens", re.IGNORECASE)


@dataclass(frozen=True)
class Estimate:
    """What is known of one (provider, model)'s enqueued-token limit."""

    provider: str
    model: str
    #: the limit learned from refusals (None: never refused, the ceiling applies)
    learned_tokens: int | None = None
    #: the provider named `learned_tokens` itself (not a guess)
    exact: bool = False
    learned_at: datetime | None = None
    #: refusals in a row (the backoff exponent); 0 after a success
    refusals: int = 0
    #: no batch of the model is packed before this, unless open work finished meanwhile
    wait_until: datetime | None = None
    #: the model's open tokens when it was refused: the wait ends once they drop below it
    open_at_refusal: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "learned_tokens": self.learned_tokens,
            "exact": self.exact,
            "learned_at": _iso(self.learned_at),
            "refusals": self.refusals,
            "wait_until": _iso(self.wait_until),
            "open_at_refusal": self.open_at_refusal,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Estimate:
        return cls(
            provider=str(data["provider"]),
            model=str(data["model"]),
            learned_tokens=data.get("learned_tokens"),
            exact=bool(data.get("exact")),
            learned_at=_time(data.get("learned_at")),
            refusals=int(data.get("refusals") or 0),
            wait_until=_time(data.get("wait_until")),
            open_at_refusal=int(data.get("open_at_refusal") or 0),
        )


@dataclass(frozen=True)
class Room:
    """What one (provider, model) may add to its open batches now."""

    #: the estimated limit (None: no limit known)
    limit_tokens: int | None
    #: where the limit comes from: configured | tier default | learned | provider | none
    source: str
    #: tokens of the model in open batches
    open_tokens: int
    #: tokens a new batch may hold now (None: no limit); 0 while waiting or full
    free_tokens: int | None
    #: the model waits for capacity until then (or until open work finishes)
    wait_until: datetime | None = None
    #: nothing is open, so a single request bigger than the limit may go alone
    alone: bool = False


def ceiling(settings: Settings, provider: str, model: str) -> tuple[int | None, str]:
    """The configured limit, else the documented tier default, else None; and its source."""
    configured = settings.inflight_token_budget.get(model)
    if configured is None and settings.default_inflight_token_budget:
        configured = settings.default_inflight_token_budget
    if configured is not None:
        return configured, "configured"
    default = TIER_DEFAULTS.get((provider, model))
    return (default, "tier default") if default is not None else (None, "none")


def limit_named(message: str | None) -> int | None:
    """The limit an OpenAI `token_limit_exceeded` message names ("Limit: 90,000 enqueued
    tokens."), or None."""
    match = _LIMIT.search(message or "")
    if match is None:
        return None
    digits = re.sub(r"[,_ ]", "", match[1])
    return int(digits) if digits.isdigit() and int(digits) > 0 else None


def room(
    estimate: Estimate | None,
    settings: Settings,
    *,
    provider: str,
    model: str,
    open_tokens: int,
    now: datetime,
) -> Room:
    """How much of (provider, model) may be packed now. Pure."""
    top, source = ceiling(settings, provider, model)
    limit = top
    learned = None if estimate is None else estimate.learned_tokens
    if learned is not None and (top is None or learned < top):
        limit = learned
        source = "provider" if estimate is not None and estimate.exact else "learned"
    wait = None
    if (
        estimate is not None
        and estimate.wait_until is not None
        and now < estimate.wait_until
        and (estimate.open_at_refusal == 0 or open_tokens >= estimate.open_at_refusal)
    ):
        wait = estimate.wait_until
    free = None
    if limit is not None:
        free = 0 if wait is not None else max(0, limit - open_tokens)
    return Room(limit, source, open_tokens, free, wait, alone=wait is None and open_tokens == 0)


def learn_refusal(
    estimate: Estimate | None,
    settings: Settings,
    *,
    provider: str,
    model: str,
    refused_tokens: int,
    refused_requests: int,
    open_tokens: int,
    message: str | None,
    now: datetime,
) -> Estimate:
    """The estimate after the provider refused a batch of `refused_tokens` while
    `open_tokens` of the model were in other open batches. Pure."""
    current = room(
        estimate, settings, provider=provider, model=model, open_tokens=open_tokens, now=now
    ).limit_tokens
    named = limit_named(message)
    tried = open_tokens + refused_tokens
    if named is not None and tried > named:
        learned, exact = named, True
    elif named is not None:
        # Refused though our count fits the named limit: our token estimates run low for this
        # model, so the limit in our units is below what was tried.
        learned, exact = max(1, tried * 9 // 10), True
    else:
        # Below what was open with the refused batch; half of it, to stop guessing soon.
        learned, exact = max(1, min(tried, current or tried) // 2), False
    refusals = (estimate.refusals if estimate is not None else 0) + 1
    split_helps = open_tokens == 0 and refused_requests > 1 and refused_tokens > learned
    wait = None
    if not split_helps:
        wait = now + timedelta(seconds=min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (refusals - 1)))
    return Estimate(
        provider,
        model,
        learned_tokens=learned,
        exact=exact,
        learned_at=now,
        refusals=refusals,
        wait_until=wait,
        open_at_refusal=open_tokens,
    )


def learn_success(estimate: Estimate, settings: Settings, *, now: datetime) -> Estimate:
    """The estimate after the provider took a batch: the wait is over, and the limit creeps
    back up towards the ceiling (a guess by a quarter, a named limit by a tenth once it is
    `EXACT_HOLD_S` old). Pure."""
    learned, learned_at = estimate.learned_tokens, estimate.learned_at
    if learned is not None:
        age_s = (now - (learned_at or now)).total_seconds()
        if not estimate.exact:
            learned += max(1, learned // 4)
        elif age_s >= EXACT_HOLD_S:
            learned, learned_at = learned + max(1, learned // 10), now  # one step an hour
        top, _ = ceiling(settings, estimate.provider, estimate.model)
        if top is not None and learned >= top:
            learned = None
    return replace(
        estimate,
        learned_tokens=learned,
        exact=estimate.exact and learned is not None,
        learned_at=learned_at,
        refusals=0,
        wait_until=None,
        open_at_refusal=0,
    )


def creation_hold(creations: int, first_at: datetime | None, *, now: datetime) -> datetime | None:
    """Until when a batch row must wait before another provider create call: None if it may
    go now. A row gets `MAX_CREATIONS` creations per `CREATION_WINDOW_S` since its first. Pure."""
    if first_at is None or creations < MAX_CREATIONS:
        return None
    windows = creations // MAX_CREATIONS
    until = first_at + timedelta(seconds=CREATION_WINDOW_S * windows)
    return until if until > now else None


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _time(text: Any) -> datetime | None:
    return None if not text else datetime.fromisoformat(str(text))


# --- applied to the store --------------------------------------------------------------------


def load(conn: Connection) -> dict[tuple[str, str], Estimate]:
    """Every stored estimate, by (provider, model)."""
    from batchwise.store import capacity as stored

    return {
        (e.provider, e.model): e for e in (Estimate.from_json(d) for d in stored.estimates(conn))
    }


class Rooms(dict[tuple[str, str], Room]):
    """The room of every (provider, model) with open batches or an estimate; any other one
    is computed when asked for (nothing open, nothing learned: its ceiling)."""

    def __init__(self, settings: Settings, now: datetime) -> None:
        super().__init__()
        self._settings, self._now = settings, now

    def __missing__(self, key: tuple[str, str]) -> Room:
        found = self[key] = room(
            None, self._settings, provider=key[0], model=key[1], open_tokens=0, now=self._now
        )
        return found


def rooms(conn: Connection, settings: Settings, *, now: datetime) -> Rooms:
    """The room of each (provider, model) now (see `Rooms`)."""
    from batchwise.store import batches

    open_tokens = batches.inflight_tokens(conn)
    estimates = load(conn)
    found = Rooms(settings, now)
    for p, m in sorted({*open_tokens, *estimates}):
        found[p, m] = room(
            estimates.get((p, m)),
            settings,
            provider=p,
            model=m,
            open_tokens=open_tokens.get((p, m), 0),
            now=now,
        )
    return found


def status(store: Store, settings: Settings, *, now: datetime) -> list[dict[str, Any]]:
    """Each model with open batches, an estimate or queued requests: its open tokens against
    its limit, where the limit comes from, and how long it waits after a refusal."""
    from batchwise.store import requests

    with store.read() as conn:
        found = rooms(conn, settings, now=now)
        for provider, _, model in requests.queued_groups(conn):
            found[provider, model]  # computed on first access
    return [
        {
            "provider": provider,
            "model": model,
            "open_tokens": r.open_tokens,
            "limit_tokens": r.limit_tokens,
            "source": r.source,
            "wait_until": _iso(r.wait_until),
        }
        for (provider, model), r in sorted(found.items())
    ]


def observe_end(
    conn: Connection,
    settings: Settings,
    *,
    batch_id: int,
    state: str,
    error_code: str | None,
    error: str | None,
    now: datetime,
) -> Estimate | None:
    """Learn from a batch that ended: refused for capacity, or taken by the provider (any end
    but `failed`). Returns the new estimate if it changed. Called in the reconcile's
    transaction, with the batch no longer open."""
    from batchwise.store import batches
    from batchwise.store import capacity as stored
    from batchwise.store.events import record_event

    facts = stored.batch_facts(conn, batch_id)
    if facts is None:
        return None
    provider, model, tokens, count, created = facts
    estimate = load(conn).get((provider, model))
    if state == "failed" and error_code == TOKEN_LIMIT:
        open_tokens = batches.inflight_tokens(conn).get((provider, model), 0)
        new = learn_refusal(
            estimate,
            settings,
            provider=provider,
            model=model,
            refused_tokens=tokens,
            refused_requests=count,
            open_tokens=open_tokens,
            message=error,
            now=now,
        )
        stored.save(conn, provider, model, new.as_json())
        r = room(new, settings, provider=provider, model=model, open_tokens=open_tokens, now=now)
        record_event(
            conn,
            at=now,
            kind="capacity_refused",
            severity="warning",
            batch_id=batch_id,
            message=refusal_message(
                provider, model, batch_id, tokens, open_tokens, r, split=new.wait_until is None
            ),
            data={
                "provider": provider,
                "model": model,
                "refused_tokens": tokens,
                "open_tokens": open_tokens,
                "limit_tokens": r.limit_tokens,
                "limit_source": r.source,
                "wait_until": _iso(new.wait_until),
                "created": created,
            },
        )
        return new
    if state == "failed" or estimate is None:
        return None
    new = learn_success(estimate, settings, now=now)
    if new != estimate:
        stored.save(conn, provider, model, new.as_json())
        return new
    return None


def refusal_message(
    provider: str,
    model: str,
    batch_id: int,
    tokens: int,
    open_tokens: int,
    r: Room,
    *,
    split: bool,
) -> str:
    limit = "unknown" if r.limit_tokens is None else f"{r.limit_tokens:,}"
    then = (
        "its requests are split into batches that fit"
        if split
        else f"{model} waits until {_iso(r.wait_until)} or until open work finishes"
    )
    return (
        f"{provider} refused batch {batch_id} of {model} for capacity ({tokens:,} tokens, "
        f"{open_tokens:,} already open): limit now {limit} tokens ({r.source}); {then}"
    )
