"""The SQL of submissions: the lines that came in together (one `submit`, `Client` call or cron
job run), and their requests read back by submission.

Intake writes a submission row in its own transaction through the sink (`SubmissionWrites`,
statements with `?` placeholders that every sink runs on its raw driver, so `batchwise submit`
never imports SQLAlchemy). The reads below are for the API, the CLI and the exports;
they import SQLAlchemy when called. Counts by state and the finish time are derived from
`requests`, never stored. A submission's requests all have ids between its
`first_request_id` and `last_request_id`, so a read scans that range of the primary key.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from batchwise.states import LIVE_SQL, TERMINAL_REQUEST_STATES
from batchwise.store.views import SubmissionView

if TYPE_CHECKING:
    from batchwise.store.engine import Store

_OPEN_SQL = (
    "INSERT INTO submissions (name, source, job_run_id, created_at) VALUES (?, ?, ?, ?) "
    "RETURNING id"
)
_CLOSE_SQL = (
    "UPDATE submissions SET format = ?, first_request_id = ?, last_request_id = ? WHERE id = ?"
)
_TERMINAL = tuple(sorted(s.value for s in TERMINAL_REQUEST_STATES))


class SubmissionWrites:
    """A submission's rows inside intake's transaction, for a sink that provides `_query`,
    `_execute_many` and `time_value` (see `store.guard_state.GuardQueries`)."""

    def time_value(self, moment: datetime) -> Any:  # pragma: no cover - sinks override
        raise NotImplementedError

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        raise NotImplementedError  # pragma: no cover - sinks override

    def _execute_many(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        raise NotImplementedError  # pragma: no cover - sinks override

    def open_submission(
        self, *, name: str | None, source: str, job_run_id: int | None, at: datetime
    ) -> int:
        """Insert the submission's row; returns its id."""
        params = (name, source, job_run_id, self.time_value(at))
        ((submission_id,),) = self._query(_OPEN_SQL, params)
        return int(submission_id)

    def close_submission(
        self, submission_id: int, *, fmt: str | None, first_id: int | None, last_id: int | None
    ) -> None:
        """Record the format its lines came in and the range of ids intake gave them."""
        self._execute_many(_CLOSE_SQL, [(fmt, first_id, last_id, submission_id)])

    def live_custom_ids(self, submission_id: int, custom_ids: Sequence[str]) -> dict[str, int]:
        """Live requests of the submission already holding any of these custom_ids."""
        found: dict[str, int] = {}
        for start in range(0, len(custom_ids), 500):
            part = list(custom_ids[start : start + 500])
            marks = ", ".join("?" for _ in part)
            for cid, rid in self._query(
                f"SELECT custom_id, id FROM requests WHERE submission_id = ? "
                f"AND custom_id IN ({marks}) AND {LIVE_SQL}",
                [submission_id, *part],
            ):
                found[cid] = rid
        return found


# --- reads ----------------------------------------------------------------------------------


def _view(conn: Any, row: Any) -> SubmissionView:
    import sqlalchemy as sa

    from batchwise.store.engine import requests_t as r

    counts: dict[str, int] = {}
    finished_at: datetime | None = None
    if row.first_request_id is not None:
        rows = conn.execute(
            sa.select(r.c.state, sa.func.count(), sa.func.max(r.c.finished_at))
            .where(
                r.c.id.between(row.first_request_id, row.last_request_id),
                r.c.submission_id == row.id,
            )
            .group_by(r.c.state)
        )
        for state, count, last in rows:
            counts[state] = count
            if last is not None and (finished_at is None or last > finished_at):
                finished_at = last
    view = SubmissionView(
        id=row.id,
        name=row.name,
        source=row.source,
        format=row.format,
        job_run_id=row.job_run_id,
        created_at=row.created_at,
        finished_at=None,
        counts=dict(sorted(counts.items())),
    )
    return replace(view, finished_at=finished_at) if view.done else view


def get_submission(store: Store, submission_id: int) -> SubmissionView | None:
    """One submission with its counts by state, or None."""
    import sqlalchemy as sa

    from batchwise.store.engine import submissions_t as s

    with store.read() as conn:
        row = conn.execute(sa.select(s).where(s.c.id == submission_id)).first()
        return None if row is None else _view(conn, row)


def list_submissions(store: Store, *, limit: int = 50) -> list[SubmissionView]:
    """The latest submissions, newest first, with their counts by state."""
    import sqlalchemy as sa

    from batchwise.store.engine import submissions_t as s

    with store.read() as conn:
        rows = conn.execute(sa.select(s).order_by(s.c.id.desc()).limit(limit)).all()
        return [_view(conn, row) for row in rows]


def submission_ids_of_run(store: Store, job_run_id: int) -> list[int]:
    """The submission(s) a cron job run's requests came in with."""
    import sqlalchemy as sa

    from batchwise.store.engine import submissions_t as s

    with store.read() as conn:
        return list(conn.execute(sa.select(s.c.id).where(s.c.job_run_id == job_run_id)).scalars())


def result_rows(store: Store, submission_id: int) -> Iterator[dict[str, Any]]:
    """The finished requests of a submission in id order (the order its lines came in), with
    their answers: id, custom_id, provider, endpoint, model, input_format, state, error,
    error_code, finished_at, response_id, body, status_code, provider_request_id. Streamed in
    partitions inside one read transaction."""
    import sqlalchemy as sa

    from batchwise.store.engine import requests_t as r
    from batchwise.store.engine import responses_t as p
    from batchwise.store.engine import submissions_t as s

    with store.read() as conn:
        bounds = conn.execute(
            sa.select(s.c.first_request_id, s.c.last_request_id).where(s.c.id == submission_id)
        ).first()
        if bounds is None or bounds[0] is None:
            return
        query = (
            sa.select(
                r.c.id,
                r.c.custom_id,
                r.c.provider,
                r.c.endpoint,
                r.c.model,
                r.c.input_format,
                r.c.state,
                r.c.error,
                r.c.error_code,
                r.c.finished_at,
                p.c.id.label("response_id"),
                p.c.body,
                p.c.status_code,
                p.c.provider_request_id,
            )
            .select_from(r.outerjoin(p, p.c.id == r.c.response_id))
            .where(
                r.c.id.between(bounds[0], bounds[1]),
                r.c.submission_id == submission_id,
                r.c.state.in_(_TERMINAL),
            )
            .order_by(r.c.id)
            .execution_options(yield_per=2000)
        )
        for partition in conn.execute(query).mappings().partitions():
            for row in partition:
                yield dict(row)


def requests_by_custom_id(
    store: Store, custom_id: str, *, submission_id: int | None = None
) -> list[tuple[int, int | None]]:
    """(request id, submission id) of the requests carrying `custom_id`, newest first, one per
    submission (a store upgraded from before submissions may hold an id several times in one)."""
    import sqlalchemy as sa

    from batchwise.store.engine import requests_t as r

    query = sa.select(r.c.id, r.c.submission_id).where(r.c.custom_id == custom_id)
    if submission_id is not None:
        query = query.where(r.c.submission_id == submission_id)
    seen: set[int | None] = set()
    found: list[tuple[int, int | None]] = []
    with store.read() as conn:
        for rid, sid in conn.execute(query.order_by(r.c.id.desc())):
            if sid not in seen:
                seen.add(sid)
                found.append((rid, sid))
    return found


def request_submission(store: Store, request_id: int) -> int | None:
    """The submission a request came in with."""
    import sqlalchemy as sa

    from batchwise.store.engine import requests_t as r

    with store.read() as conn:
        value = conn.execute(sa.select(r.c.submission_id).where(r.c.id == request_id)).scalar()
    return None if value is None else int(value)


def request_states(store: Store, submission_id: int) -> list[tuple[int, str, str]]:
    """(request id, lane, state) of every request of a submission, in input order."""
    import sqlalchemy as sa

    from batchwise.store.engine import requests_t as r
    from batchwise.store.engine import submissions_t as s

    with store.read() as conn:
        bounds = conn.execute(
            sa.select(s.c.first_request_id, s.c.last_request_id).where(s.c.id == submission_id)
        ).first()
        if bounds is None or bounds[0] is None:
            return []
        rows = conn.execute(
            sa.select(r.c.id, r.c.lane, r.c.state)
            .where(r.c.id.between(bounds[0], bounds[1]), r.c.submission_id == submission_id)
            .order_by(r.c.id)
        )
        return [(rid, lane, state) for rid, lane, state in rows]
