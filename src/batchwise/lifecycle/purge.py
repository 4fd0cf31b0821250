"""Forgetting what requests said: request and response bodies may hold personal data.

A purge deletes the `request_bodies` rows and sets `responses.body` to NULL for requests that
finished (reached a terminal state) before a cutoff. Everything reports need stays: the ledger,
with its tags and token counts copied in, and the request rows themselves, so totals add up the
same afterwards.
The work runs in chunks of request ids, one short transaction each, so a purge of millions of
rows never holds SQLite's write lock for long and can be interrupted and run again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from batchwise.states import TERMINAL_REQUEST_STATES
from batchwise.store.engine import Store, bodies_t, requests_t, responses_t

DEFAULT_CHUNK = 5000


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """How many bodies a purge removed (or, in a dry run, would remove)."""

    cutoff: datetime
    dry_run: bool
    #: requests whose body was removed
    requests: int
    #: responses whose body was removed
    responses: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "cutoff": self.cutoff.isoformat(),
            "dry_run": self.dry_run,
            "requests": self.requests,
            "responses": self.responses,
        }


def _finished_before(cutoff: datetime) -> Any:
    r = requests_t
    # finished_at is set on every terminal transition; updated_at covers rows written terminal.
    return sa.and_(
        r.c.state.in_(sorted(s.value for s in TERMINAL_REQUEST_STATES)),
        sa.func.coalesce(r.c.finished_at, r.c.updated_at) < cutoff,
    )


def _request_body() -> Any:
    return bodies_t.c.id == requests_t.c.id


def _response_bodies() -> Any:
    return sa.and_(responses_t.c.request_id == requests_t.c.id, responses_t.c.body.is_not(None))


def purge_bodies(
    store: Store,
    *,
    older_than: timedelta,
    now: datetime,
    dry_run: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
) -> PurgeResult:
    """Remove the bodies of requests finished more than `older_than` before `now`, and of their
    responses; live requests are never touched, whatever their age."""
    if older_than < timedelta(0):
        raise ValueError("older_than must not be negative")
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    cutoff = now - older_than
    old = _finished_before(cutoff)
    r, resp = requests_t, responses_t
    if dry_run:
        with store.read() as conn:
            requests = conn.execute(
                sa.select(sa.func.count()).select_from(bodies_t.join(r, _request_body())).where(old)
            ).scalar_one()
            responses = conn.execute(
                sa.select(sa.func.count())
                .select_from(resp.join(r, resp.c.request_id == r.c.id))
                .where(old, resp.c.body.is_not(None))
            ).scalar_one()
        return PurgeResult(cutoff, True, int(requests), int(responses))

    has_body = sa.or_(sa.exists().where(_request_body()), sa.exists().where(_response_bodies()))
    requests = responses = 0
    last_id = 0
    while True:
        with store.write() as conn:
            ids = list(
                conn.execute(
                    sa.select(r.c.id)
                    .where(old, has_body, r.c.id > last_id)
                    .order_by(r.c.id)
                    .limit(chunk_size)
                ).scalars()
            )
            if not ids:
                break
            # The terminal-state condition again: the rows are matched by state, not trusted.
            terminal = sa.select(r.c.id).where(r.c.id.in_(ids), old)
            requests += conn.execute(
                sa.delete(bodies_t).where(bodies_t.c.id.in_(terminal))
            ).rowcount
            responses += conn.execute(
                sa.update(resp)
                .where(resp.c.request_id.in_(ids), resp.c.body.is_not(None))
                .values(body=None)
            ).rowcount
            last_id = ids[-1]
    return PurgeResult(cutoff, False, requests, responses)
