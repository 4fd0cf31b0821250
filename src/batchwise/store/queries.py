"""Read-side queries for the API and the CLI: status counts, what a run finished, request
views, a realtime request's stored answer (the gateway's), a batch's provider, and the check that
a database opens."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa

from batchwise.errors import AmbiguousIdError, StoreError
from batchwise.states import Lane
from batchwise.store.engine import Store, batches_t, requests_t, responses_t
from batchwise.store.views import RequestView

_NAMED = ("use_case", "step", "business_unit", "task_id")


def status_counts(store: Store) -> dict[str, Any]:
    """{"total": N, "by_lane": {lane: N}, "by_state": {state: N}, "by_provider": {provider:
    {"total": N, "by_lane": {lane: N}}}}; every lane is listed (realtime, flex, deferred), with
    0 when it holds nothing."""
    t = requests_t
    lanes = [lane.value for lane in Lane]
    by_lane: dict[str, int] = dict.fromkeys(lanes, 0)
    by_state: dict[str, int] = {}
    by_provider: dict[str, dict[str, Any]] = {}
    total = 0
    with store.read() as conn:
        rows = conn.execute(
            sa.select(t.c.provider, t.c.lane, t.c.state, sa.func.count()).group_by(
                t.c.provider, t.c.lane, t.c.state
            )
        )
        for provider, lane, state, count in rows:
            by_lane[lane] = by_lane.get(lane, 0) + count
            by_state[state] = by_state.get(state, 0) + count
            own = by_provider.setdefault(provider, {"total": 0, "by_lane": dict.fromkeys(lanes, 0)})
            own["total"] += count
            own["by_lane"][lane] = own["by_lane"].get(lane, 0) + count
            total += count
    return {
        "total": total,
        "by_lane": by_lane,
        "by_state": dict(sorted(by_state.items())),
        "by_provider": dict(sorted(by_provider.items())),
    }


def finished_since(store: Store, since: datetime) -> dict[str, Any]:
    """What became of the requests since `since` (a run's start):
    {"by_state": {state: N} of those finished at or after it, "failed_by": {reason: N} (the
    error code, else "no error code"), "rescued": N rescued at or after it, "waiting": N not
    finished now}."""
    t = requests_t
    done = t.c.finished_at >= since
    with store.read() as conn:
        by_state: dict[str, int] = dict(
            conn.execute(
                sa.select(t.c.state, sa.func.count()).where(done).group_by(t.c.state)
            ).all()
        )
        failed_by: dict[str, int] = {}
        for code, count in conn.execute(
            sa.select(t.c.error_code, sa.func.count())
            .where(done, t.c.state == "failed")
            .group_by(t.c.error_code)
        ):
            reason = code or "no error code"
            failed_by[reason] = failed_by.get(reason, 0) + count
        rescued = conn.execute(
            sa.select(sa.func.count()).where(t.c.rescued_at >= since)
        ).scalar_one()
        waiting = conn.execute(
            sa.select(sa.func.count()).where(t.c.finished_at.is_(None))
        ).scalar_one()
    return {
        "by_state": dict(sorted(by_state.items())),
        "failed_by": dict(sorted(failed_by.items(), key=lambda item: (-item[1], item[0]))),
        "rescued": rescued,
        "waiting": waiting,
    }


def request_view(
    store: Store, request: int | str, *, submission_id: int | None = None
) -> RequestView | None:
    """One request by id, or by custom_id (the most recent with it). A custom_id used in several
    submissions needs `submission_id` (else `AmbiguousIdError` lists them); with it, a number
    is tried as a custom_id of that submission first, then as a request id."""
    from batchwise.store.submissions import get_submission, requests_by_custom_id

    t = requests_t
    query = sa.select(t)
    # a number past 64 bits is no id: it can only be a custom_id
    by_id = isinstance(request, int) or (
        request.isascii() and request.isdigit() and len(request) < 20 and int(request) < 2**63
    )
    rid: int | None = int(request) if by_id else None
    if rid is not None and not 0 < rid < 2**63:
        return None
    if not isinstance(request, int) and (not by_id or submission_id is not None):
        found = requests_by_custom_id(store, request, submission_id=submission_id)
        if len(found) > 1:
            named = [get_submission(store, sid) for _, sid in found if sid is not None]
            raise AmbiguousIdError(
                request, [(s.id, s.name, s.source) for s in named if s is not None]
            )
        if found:
            rid = found[0][0]
        elif not by_id:
            return None
    query = query.where(t.c.id == rid)
    if submission_id is not None:
        query = query.where(t.c.submission_id == submission_id)
    with store.read() as conn:
        row = conn.execute(query).mappings().first()
        if row is None:
            return None
        result = None
        if row["response_id"] is not None:
            body = conn.execute(
                sa.select(responses_t.c.body).where(responses_t.c.id == row["response_id"])
            ).scalar()
            result = orjson.loads(body) if body else None
    tags = {k: row[k] for k in _NAMED if row[k] is not None}
    tags.update(orjson.loads(row["tags"] or "{}"))
    return RequestView(
        id=row["id"],
        custom_id=row["custom_id"],
        submission_id=row["submission_id"],
        provider=row["provider"],
        endpoint=row["endpoint"],
        model=row["model"],
        lane=row["lane"],
        state=row["state"],
        reason=row["reason"],
        tolerance=row["tolerance"],
        deadline=row["deadline"],
        attempts=row["attempts"],
        tags=tags,
        created_at=row["created_at"],
        finished_at=row["finished_at"],
        batch_id=row["batch_id"],
        error=row["error"],
        result=result,
    )


def batch_provider(store: Store, batch_id: int) -> str | None:
    """The provider a batch was sent to (to build its adapter), or None if no such batch."""
    with store.read() as conn:
        name: str | None = conn.execute(
            sa.select(batches_t.c.provider).where(batches_t.c.id == batch_id)
        ).scalar()
    return name


def check_database(url: str) -> None:
    """Open the database at `url` (creating or upgrading its schema) and close it again.

    A worker calls this once at start-up, so a bad URL fails there with the URL in the
    message rather than in every task, and the schema is made once, not by every pool process
    at the same moment. Raises `StoreError` when the database cannot be opened.
    """
    try:
        store = Store(url)
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(str(exc)) from exc
    store.close()


@dataclass(frozen=True)
class Answer:
    """Where a realtime request stands, as the gateway answers its caller."""

    state: str
    error: str | None
    #: the provider's response body as stored (JSON), once there is one
    body: bytes | None


#: built once: a caller waiting on a realtime call runs it at least once per call
_ANSWER = (
    sa.select(requests_t.c.state, requests_t.c.error, responses_t.c.body)
    .select_from(requests_t.outerjoin(responses_t, responses_t.c.id == requests_t.c.response_id))
    .where(requests_t.c.id == sa.bindparam("request_id"))
)


def answer(store: Store, request_id: int) -> Answer | None:
    """A request's state and stored answer, in one read (a caller waiting on a realtime call
    asks this until it is terminal); None if there is no such request."""
    with store.read() as conn:
        row = conn.execute(_ANSWER, {"request_id": request_id}).first()
    if row is None:
        return None
    body = row.body.encode() if isinstance(row.body, str) else row.body
    return Answer(row.state, row.error, body or None)
