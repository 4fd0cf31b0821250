"""The read side of the reports: savings, cost per task, the forecast's mix, the alerts'
hourly figures, Prometheus metrics and the results export, as named queries returning plain
rows and values.

Every figure is one set-based `GROUP BY` in the database, so a report costs the same for a
million ledger entries as for ten. What the figures mean (savings, averages, baselines,
projections) is worked out by the callers in `costs/` and `reports/`, which hold no SQL.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from batchwise.states import (
    LIVE_REQUEST_STATES,
    TERMINAL_REQUEST_STATES,
    BatchState,
    Lane,
    RequestState,
)
from batchwise.store.engine import (
    Store,
    batches_t,
    events_t,
    ledger_t,
    requests_t,
    responses_t,
)

#: the tags and columns a savings report can be grouped by
GROUP_KEYS = ("use_case", "step", "business_unit", "model", "provider", "lane", "kind", "day")


def _priced() -> Any:
    """Entries with both prices known; money sums count only these (unknown is not $0)."""
    return sa.and_(ledger_t.c.actual_nusd.is_not(None), ledger_t.c.realtime_nusd.is_not(None))


def _sum(expr: Any) -> Any:
    return sa.func.coalesce(sa.func.sum(expr), 0)


# --- savings -------------------------------------------------------------------------------


def _total_columns() -> list[Any]:
    """The aggregate columns of a savings row: requests, entries, unpriced_entries,
    input_tokens, output_tokens, actual_nusd and realtime_nusd (priced entries only)."""
    t, priced = ledger_t, _priced()
    return [
        sa.func.count(sa.distinct(t.c.request_id)).label("requests"),
        sa.func.count().label("entries"),
        _sum(sa.case((priced, 0), else_=1)).label("unpriced_entries"),
        _sum(t.c.input_tokens).label("input_tokens"),
        _sum(t.c.output_tokens).label("output_tokens"),
        _sum(sa.case((priced, t.c.actual_nusd))).label("actual_nusd"),
        _sum(sa.case((priced, t.c.realtime_nusd))).label("realtime_nusd"),
    ]


def check_group_key(key: str) -> None:
    """Refuse a group key that is not one of `GROUP_KEYS` (before touching the database)."""
    if key not in GROUP_KEYS:
        raise ValueError(f"cannot group by {key!r}: expected some of {', '.join(GROUP_KEYS)}")


def _key_column(key: str, dialect: str) -> Any:
    """The SQL expression for a group key; `day` is the UTC calendar day of the entry."""
    check_group_key(key)
    if key != "day":
        return ledger_t.c[key].label(key)
    at = ledger_t.c.at
    if dialect == "postgresql":
        day = sa.func.to_char(sa.func.timezone("UTC", at), "YYYY-MM-DD", type_=sa.String)
    else:  # stored as fixed-width UTC text, see models.UTCDateTime
        day = sa.func.substr(at, 1, 10, type_=sa.String)
    return day.label("day")


def _time_filter(query: Any, since: datetime | None, until: datetime | None) -> Any:
    if since is not None:
        query = query.where(ledger_t.c.at >= since)
    if until is not None:
        query = query.where(ledger_t.c.at < until)
    return query


def ledger_totals(
    conn: Connection, *, since: datetime | None = None, until: datetime | None = None
) -> Row[Any]:
    """The sums (see `_total_columns`) over every ledger entry in [since, until)."""
    return conn.execute(_time_filter(sa.select(*_total_columns()), since, until)).one()


def ledger_grouped(
    conn: Connection,
    by: Sequence[str],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> tuple[Row[Any], list[Row[Any]]]:
    """The total row and one row per distinct combination of `by` (unsorted), each with the
    key columns named as in `by` and the sums of `_total_columns`.

    Both come from one statement (`UNION ALL`), so they describe the same entries even under
    PostgreSQL's read committed, where two statements may see different commits.
    """
    keys = [_key_column(k, conn.dialect.name) for k in by]
    groups = _time_filter(
        sa.select(*keys, *_total_columns(), sa.literal(0).label("is_total")), since, until
    ).group_by(*keys)
    total = _time_filter(
        sa.select(
            *(sa.cast(sa.null(), sa.String).label(k) for k in by),
            *_total_columns(),
            sa.literal(1).label("is_total"),
        ),
        since,
        until,
    )
    found: list[Row[Any]] = []
    total_row: Row[Any] | None = None
    for row in conn.execute(sa.union_all(groups, total)):
        if row.is_total:
            total_row = row
        else:
            found.append(row)
    assert total_row is not None  # an aggregate without GROUP BY always yields one row
    return total_row, found


def task_request_counts(conn: Connection) -> list[Row[Any]]:
    """Per task_id: (task_id, requests, ok, failed, live, use_case, finished_at) from the
    `requests` table; `finished_at` is its last request's (meaningful once none is live)."""
    r = requests_t
    live = [s.value for s in LIVE_REQUEST_STATES]
    counts = (
        sa.select(
            r.c.task_id,
            sa.func.count().label("requests"),
            _sum(sa.case((r.c.state == RequestState.SUCCEEDED.value, 1), else_=0)).label("ok"),
            _sum(sa.case((r.c.state == RequestState.FAILED.value, 1), else_=0)).label("failed"),
            _sum(sa.case((r.c.state.in_(live), 1), else_=0)).label("live"),
            # a task belongs to the use case of its requests (the first by name, if several)
            sa.func.min(r.c.use_case).label("use_case"),
            sa.func.max(r.c.finished_at).label("finished_at"),
        )
        .where(r.c.task_id.is_not(None))
        .group_by(r.c.task_id)
    )
    return list(conn.execute(counts).all())


def task_ledger_totals(conn: Connection) -> list[Row[Any]]:
    """Per task_id: its task_id and the sums of `_total_columns` over its ledger entries."""
    costs = (
        sa.select(ledger_t.c.task_id, *_total_columns())
        .where(ledger_t.c.task_id.is_not(None))
        .group_by(ledger_t.c.task_id)
    )
    return list(conn.execute(costs).all())


# --- forecast ------------------------------------------------------------------------------


def ledger_mix(
    conn: Connection, *, batch_kinds: Sequence[str], late_batch_kind: str
) -> list[Row[Any]]:
    """Per (provider, model, lane), sorted: requests, priced (requests), actual and realtime
    (nano-USD over priced entries), where `realtime` is what each entry would have cost had
    every request gone realtime: a `batch_kinds` entry (a batch line, a flex call) its
    realtime price, a `late_batch_kind` entry nothing (its request was answered realtime
    already), any other its actual cost."""
    t = ledger_t
    priced = _priced()
    all_realtime = sa.case(
        (t.c.kind.in_(batch_kinds), t.c.realtime_nusd),
        (t.c.kind == late_batch_kind, 0),
        else_=t.c.actual_nusd,
    )
    query = (
        sa.select(
            t.c.provider,
            t.c.model,
            t.c.lane,
            sa.func.count(sa.distinct(t.c.request_id)).label("requests"),
            sa.func.count(sa.distinct(sa.case((priced, t.c.request_id)))).label("priced"),
            _sum(sa.case((priced, t.c.actual_nusd))).label("actual"),
            _sum(sa.case((priced, all_realtime))).label("realtime"),
        )
        .group_by(t.c.provider, t.c.model, t.c.lane)
        .order_by(t.c.provider, t.c.model, t.c.lane)
    )
    return list(conn.execute(query).all())


def ledger_request_counts(conn: Connection) -> tuple[int, int, int]:
    """(requests with a ledger entry, of which deferred-lane, of which flex-lane)."""
    t = ledger_t
    overall = sa.select(
        sa.func.count(sa.distinct(t.c.request_id)),
        sa.func.count(sa.distinct(sa.case((t.c.lane == Lane.DEFERRED.value, t.c.request_id)))),
        sa.func.count(sa.distinct(sa.case((t.c.lane == Lane.FLEX.value, t.c.request_id)))),
    )
    recorded, deferred, flex = conn.execute(overall).one()
    return int(recorded), int(deferred), int(flex)


def task_mix(
    conn: Connection, *, batch_kinds: Sequence[str], late_batch_kind: str, dedupe_kind: str
) -> list[Row[Any]]:
    """Per task_id: calls (entries other than `dedupe_kind`), dedupe_hits, deferred_calls,
    flex_calls, tokens (input + output of the calls), unpriced (entries), actual, no_batching and
    dedupe_realtime (nano-USD over priced entries). `no_batching` is what the task would have
    cost with every request realtime (as in `ledger_mix`); `dedupe_realtime` is what its
    dedupe hits would have cost as realtime calls."""
    t = ledger_t
    priced = _priced()
    call = t.c.kind != dedupe_kind
    all_realtime = sa.case(
        (t.c.kind.in_(batch_kinds), t.c.realtime_nusd),
        (t.c.kind == late_batch_kind, 0),
        else_=t.c.actual_nusd,
    )
    query = (
        sa.select(
            t.c.task_id,
            _sum(sa.case((call, 1), else_=0)).label("calls"),
            _sum(sa.case((call, 0), else_=1)).label("dedupe_hits"),
            _sum(sa.case((sa.and_(call, t.c.lane == Lane.DEFERRED.value), 1), else_=0)).label(
                "deferred_calls"
            ),
            _sum(sa.case((sa.and_(call, t.c.lane == Lane.FLEX.value), 1), else_=0)).label(
                "flex_calls"
            ),
            _sum(sa.case((call, t.c.input_tokens + t.c.output_tokens), else_=0)).label("tokens"),
            _sum(sa.case((priced, 0), else_=1)).label("unpriced"),
            _sum(sa.case((priced, t.c.actual_nusd))).label("actual"),
            _sum(sa.case((priced, all_realtime))).label("no_batching"),
            _sum(sa.case((sa.and_(priced, sa.not_(call)), t.c.realtime_nusd))).label(
                "dedupe_realtime"
            ),
        )
        .where(t.c.task_id.is_not(None))
        .group_by(t.c.task_id)
    )
    # more columns than SQLAlchemy's typed Row spells out
    return cast("list[Row[Any]]", list(conn.execute(query).all()))


# --- alerts --------------------------------------------------------------------------------


def hourly_usage(
    conn: Connection, *, start: datetime, end: datetime, skip_kind: str
) -> list[tuple[str | None, datetime, int, int]]:
    """(step, start of the UTC hour, tokens in + out, actual nano-USD) for ledger entries in
    [start, end), except those of `skip_kind`; unpriced entries count their tokens and no cost.
    """
    t = ledger_t
    # Constants are inlined so the GROUP BY repeats the SELECT expression verbatim (PostgreSQL
    # rejects the grouping when the two carry different bind parameters).
    if conn.dialect.name == "postgresql":
        # AT TIME ZONE 'UTC' first: date_trunc on a timestamptz would use the session's zone
        bucket: Any = sa.func.date_trunc(
            sa.literal_column("'hour'"),
            sa.func.timezone(sa.literal_column("'UTC'"), t.c.at),
            type_=sa.DateTime(),
        )
    else:  # SQLite keeps UTC text "YYYY-MM-DD HH:MM:SS.ffffff": the hour is its first 13 chars
        bucket = sa.func.substr(
            t.c.at, sa.literal_column("1"), sa.literal_column("13"), type_=sa.String()
        )
    query = (
        sa.select(
            t.c.step,
            bucket,
            sa.func.sum(t.c.input_tokens + t.c.output_tokens),
            sa.func.sum(sa.func.coalesce(t.c.actual_nusd, 0)),
        )
        .where(t.c.at >= start, t.c.at < end, t.c.kind != skip_kind)
        .group_by(t.c.step, bucket)
    )
    return [
        (step, _hour(hour), int(tokens or 0), int(cost or 0))
        for step, hour, tokens, cost in conn.execute(query)
    ]


def _hour(value: Any) -> datetime:
    if isinstance(value, str):
        return datetime.strptime(value, "%Y-%m-%d %H").replace(tzinfo=UTC)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC)


def serialise(conn: Connection, key: int) -> None:
    """Make this write transaction wait for any other holding `key` ("check, then insert"
    without a unique key to lean on). PostgreSQL takes a transaction-scoped advisory lock;
    a SQLite write transaction already starts with BEGIN IMMEDIATE, one writer at a time."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})


def event_data_since(conn: Connection, *, kind: str, since: datetime) -> list[dict[str, Any]]:
    """The decoded `data` of every `kind` event recorded at or after `since`."""
    rows = conn.execute(
        sa.select(events_t.c.data).where(events_t.c.kind == kind, events_t.c.at >= since)
    ).scalars()
    return [orjson.loads(raw or "{}") for raw in rows]


# --- metrics -------------------------------------------------------------------------------


def request_counts(conn: Connection) -> list[tuple[str, str, int]]:
    """(lane, state, requests), sorted."""
    r = requests_t
    query = (
        sa.select(r.c.lane, r.c.state, sa.func.count())
        .group_by(r.c.lane, r.c.state)
        .order_by(r.c.lane, r.c.state)
    )
    return [(lane, state, n) for lane, state, n in conn.execute(query)]


def batch_counts(conn: Connection) -> list[tuple[str, int]]:
    """(state, batches), sorted."""
    b = batches_t
    query = sa.select(b.c.state, sa.func.count()).group_by(b.c.state).order_by(b.c.state)
    return [(state, n) for state, n in conn.execute(query)]


def ledger_money(conn: Connection) -> list[tuple[str | None, str, Any, Any, int]]:
    """(use_case, model, actual nano-USD, realtime nano-USD, priced entries), sorted; the
    money sums cover priced entries only."""
    t, priced = ledger_t, _priced()
    query = (
        sa.select(
            t.c.use_case,
            t.c.model,
            _sum(sa.case((priced, t.c.actual_nusd))),
            _sum(sa.case((priced, t.c.realtime_nusd))),
            sa.func.count(sa.case((priced, 1))),
        )
        .group_by(t.c.use_case, t.c.model)
        .order_by(t.c.use_case, t.c.model)
    )
    return [(u, m, actual, realtime, int(n)) for u, m, actual, realtime, n in conn.execute(query)]


def ledger_kind_counts(conn: Connection) -> list[tuple[str, int]]:
    """(kind, entries), sorted."""
    t = ledger_t
    query = sa.select(t.c.kind, sa.func.count()).group_by(t.c.kind).order_by(t.c.kind)
    return [(kind, n) for kind, n in conn.execute(query)]


def unpriced_entries(conn: Connection) -> int:
    """Ledger entries whose cost is unknown (a model with no price)."""
    return int(conn.execute(sa.select(sa.func.count()).where(sa.not_(_priced()))).scalar_one())


# --- the queue, as the dashboard shows it ----------------------------------------------------

#: batch states the dashboard lists as open: everything before `reconciled`
_UNRECONCILED = [s.value for s in BatchState if s is not BatchState.RECONCILED]


def open_batches(conn: Connection, *, limit: int) -> tuple[int, list[Any]]:
    """(how many batches are not reconciled yet, the oldest `limit` of them): id, provider,
    model, state, request_count, counts (the provider's JSON), created_at, submitted_at."""
    b = batches_t
    where = b.c.state.in_(_UNRECONCILED)
    count = int(conn.execute(sa.select(sa.func.count()).where(where)).scalar_one())
    rows = conn.execute(
        sa.select(
            b.c.id,
            b.c.provider,
            b.c.model,
            b.c.state,
            b.c.request_count,
            b.c.counts,
            b.c.created_at,
            b.c.submitted_at,
        )
        .where(where)
        .order_by(b.c.created_at, b.c.id)
        .limit(limit)
    )
    return count, list(rows)


_WAITING_COLUMNS = (
    requests_t.c.id,
    requests_t.c.custom_id,
    requests_t.c.lane,
    requests_t.c.state,
    requests_t.c.use_case,
    requests_t.c.task_id,
    requests_t.c.created_at,
    requests_t.c.deadline,
)


def oldest_waiting(conn: Connection) -> Any:
    """The live request submitted first (id, custom_id, lane, state, use_case, task_id,
    created_at, deadline), or None when nothing waits."""
    r = requests_t
    return conn.execute(
        sa.select(*_WAITING_COLUMNS)
        .where(r.c.finished_at.is_(None))
        .order_by(r.c.created_at, r.c.id)
        .limit(1)
    ).first()


def deadlines_before(conn: Connection, before: datetime, *, limit: int) -> tuple[int, list[Any]]:
    """Live requests whose deadline falls before `before`: how many, and the `limit` nearest
    (same columns as `oldest_waiting`)."""
    r = requests_t
    where = sa.and_(r.c.finished_at.is_(None), r.c.deadline < before)
    count = int(conn.execute(sa.select(sa.func.count()).where(where)).scalar_one())
    rows = conn.execute(
        sa.select(*_WAITING_COLUMNS).where(where).order_by(r.c.deadline, r.c.id).limit(limit)
    )
    return count, list(rows)


def task_request_ids(conn: Connection, task_id: str, *, limit: int) -> list[int]:
    """The ids of a task's requests, oldest first, at most `limit`."""
    r = requests_t
    query = sa.select(r.c.id).where(r.c.task_id == task_id).order_by(r.c.id).limit(limit)
    return [int(i) for i in conn.execute(query).scalars()]


def ledger_first_at(conn: Connection, *, since: datetime | None = None) -> datetime | None:
    """When the first ledger entry (at or after `since`) was written, or None."""
    query = _time_filter(sa.select(sa.func.min(ledger_t.c.at)), since, None)
    first = conn.execute(query).scalar()
    if first is None or isinstance(first, datetime):
        return first  # min() keeps the column's type: an aware UTC datetime
    return datetime.fromisoformat(str(first)).replace(tzinfo=UTC)


# --- results export ------------------------------------------------------------------------


def finished_requests(store: Store, provider: str | None = None) -> Iterator[dict[str, Any]]:
    """Every finished request (of `provider`, if given) in id order, with its response: id,
    custom_id, provider, state, error, error_code, response_id, body, status_code and
    provider_request_id. Streamed in partitions inside one read transaction, so memory stays
    flat however many there are."""
    r, p = requests_t, responses_t
    query = (
        sa.select(
            r.c.id,
            r.c.custom_id,
            r.c.provider,
            r.c.state,
            r.c.error,
            r.c.error_code,
            p.c.id.label("response_id"),
            p.c.body,
            p.c.status_code,
            p.c.provider_request_id,
        )
        .select_from(r.outerjoin(p, p.c.id == r.c.response_id))
        .where(r.c.state.in_([s.value for s in TERMINAL_REQUEST_STATES]))
        .order_by(r.c.id)
        .execution_options(yield_per=2000)
    )
    if provider is not None:
        query = query.where(r.c.provider == provider)
    with store.read() as conn:
        for partition in conn.execute(query).mappings().partitions():
            for row in partition:
                yield dict(row)
