"""Forgetting bodies: the statements that find finished requests with a body left and remove
their request and response bodies, a chunk of ids at a time (see `lifecycle.purge`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from batchwise.states import TERMINAL_REQUEST_STATES
from batchwise.store.engine import bodies_t, requests_t, responses_t


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


def count_bodies(conn: Connection, cutoff: datetime) -> tuple[int, int]:
    """(request bodies, response bodies) of requests finished before `cutoff`."""
    old = _finished_before(cutoff)
    r, resp = requests_t, responses_t
    requests = conn.execute(
        sa.select(sa.func.count()).select_from(bodies_t.join(r, _request_body())).where(old)
    ).scalar_one()
    responses = conn.execute(
        sa.select(sa.func.count())
        .select_from(resp.join(r, resp.c.request_id == r.c.id))
        .where(old, resp.c.body.is_not(None))
    ).scalar_one()
    return int(requests), int(responses)


def with_bodies(conn: Connection, cutoff: datetime, *, after_id: int, limit: int) -> list[int]:
    """The next `limit` ids above `after_id` of requests finished before `cutoff` that still
    have a request or response body, in id order."""
    r = requests_t
    has_body = sa.or_(sa.exists().where(_request_body()), sa.exists().where(_response_bodies()))
    return list(
        conn.execute(
            sa.select(r.c.id)
            .where(_finished_before(cutoff), has_body, r.c.id > after_id)
            .order_by(r.c.id)
            .limit(limit)
        ).scalars()
    )


def remove_bodies(conn: Connection, ids: list[int], cutoff: datetime) -> tuple[int, int]:
    """Remove the bodies of these requests and of their responses; (requests, responses)
    whose body went."""
    r, resp = requests_t, responses_t
    # The terminal-state condition again: the rows are matched by state, not trusted.
    terminal = sa.select(r.c.id).where(r.c.id.in_(ids), _finished_before(cutoff))
    requests = conn.execute(sa.delete(bodies_t).where(bodies_t.c.id.in_(terminal))).rowcount
    responses = conn.execute(
        sa.update(resp)
        .where(resp.c.request_id.in_(ids), resp.c.body.is_not(None))
        .values(body=None)
    ).rowcount
    return requests, responses
