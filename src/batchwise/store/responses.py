"""Answers coming back from batches: the responses table, and the request rows the reconciler
reads and moves while storing them.

These are the reconciler's hot path: hand-written statements run as one executemany per chunk.
Its request moves are compare-and-set (`WHERE id = ? AND state = ?`); the answer statement's
fixed moves are checked against `states.TRANSITIONS` at import, and every row of the general
statement is checked before it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from batchwise.states import TRANSITIONS, RequestState
from batchwise.store.engine import driver_sql, in_ids, insert_many, reserve_ids, responses_t
from batchwise.store.transitions import check_transition

#: what the reconciler reads of each request, the keys of the dicts below
REQUEST_FIELDS = (
    "id", "state", "batch_id", "attempts", "lane", "provider", "model", "endpoint", "use_case",
    "step", "business_unit", "task_id", "deadline", "dedupe_of",
)  # fmt: skip
_FIELDS = ", ".join(REQUEST_FIELDS)
#: the columns of a response row, in the order `insert` takes them
RESPONSE_COLUMNS = (
    "id", "request_id", "batch_id", "kind", "outcome", "status_code", "body", "error_code",
    "error_message", "retryable", "provider_request_id", "input_tokens", "output_tokens",
    "created_at",
)  # fmt: skip
#: allowed moves as (from, to) strings, for the per-row check
_ALLOWED = frozenset((src.value, dst.value) for src, dsts in TRANSITIONS.items() for dst in dsts)
check_transition(RequestState.SUBMITTED, RequestState.SUCCEEDED)
check_transition(RequestState.RESCUED, RequestState.SUCCEEDED)
#: a request answered by its own batch (submitted, or rescued meanwhile); parameters:
#: (response_id, finished_at, deadline_miss, updated_at, id, expected state)
ANSWER_SQL = (
    "UPDATE requests SET state = 'succeeded', response_id = ?, error = NULL, "
    "error_code = NULL, finished_at = ?, deadline_miss = ?, updated_at = ?, dedupe_of = NULL "
    "WHERE id = ? AND state = ?"
)
_SUCCEEDED = RequestState.SUCCEEDED.value
#: any other move; parameters: (state, response_id, attempts, batch_id, error, error_code,
#: finished_at, deadline_miss, updated_at, dedupe_of, id, expected state)
UPDATE_SQL = (
    "UPDATE requests SET state = ?, response_id = ?, attempts = ?, batch_id = ?, error = ?, "
    "error_code = ?, finished_at = ?, deadline_miss = ?, updated_at = ?, dedupe_of = ? "
    "WHERE id = ? AND state = ?"
)


def answered_ids(conn: Connection, batch_id: int) -> set[int]:
    """Requests that already have a response from this batch (an earlier pass stored it)."""
    return set(
        conn.execute(
            sa.select(responses_t.c.request_id).where(responses_t.c.batch_id == batch_id)
        ).scalars()
    )


def read_requests(conn: Connection, ids: list[int]) -> dict[int, dict[str, Any]]:
    """The requests of a chunk by id, as `REQUEST_FIELDS` dicts, locked on PostgreSQL (SQLite
    holds the write lock already)."""
    if not ids:
        return {}
    where, params = in_ids(conn, ids)
    sql = f"SELECT {_FIELDS} FROM requests WHERE id {where}"
    if conn.dialect.name == "sqlite":
        # straight from a cursor of the same connection (the read is in the writer's
        # transaction): SQLAlchemy's result rows cost a third of the read
        driver = conn.connection.driver_connection
        assert driver is not None
        rows = driver.execute(sql, params).fetchall()
    else:
        rows = conn.exec_driver_sql(driver_sql(conn, sql + " FOR UPDATE"), params).fetchall()
    fields = REQUEST_FIELDS
    return {row[0]: dict(zip(fields, row, strict=True)) for row in rows}


def unanswered(conn: Connection, batch_id: int) -> list[dict[str, Any]]:
    """The live requests still in a batch (`packed` or `submitted`) as `REQUEST_FIELDS`
    dicts, locked on PostgreSQL."""
    sql = (
        f"SELECT {', '.join(REQUEST_FIELDS)} FROM requests WHERE batch_id = ? "
        "AND finished_at IS NULL AND (state = 'packed' OR state = 'submitted')"
        + (" FOR UPDATE" if conn.dialect.name == "postgresql" else "")
    )
    return [
        dict(zip(REQUEST_FIELDS, row, strict=True))
        for row in conn.exec_driver_sql(driver_sql(conn, sql), (batch_id,))
    ]


def leader_answers(
    conn: Connection, leaders: Sequence[int]
) -> dict[int, tuple[int, int | None, int | None, int | None]]:
    """For each of these requests that succeeded: (response id, and from its ledger entry the
    realtime price in nano-USD, input and output tokens; None where it has none)."""
    where, params = in_ids(conn, leaders)
    return {
        rid: (response_id, realtime, tokens_in, tokens_out)
        for rid, response_id, realtime, tokens_in, tokens_out in conn.exec_driver_sql(
            driver_sql(
                conn,
                "SELECT r.id, r.response_id, l.realtime_nusd, l.input_tokens, l.output_tokens "
                "FROM requests r LEFT JOIN ledger l ON l.response_id = r.response_id "
                f"WHERE r.id {where} AND r.state = 'succeeded'",
            ),
            params,
        )
    }


def reserve_response_ids(conn: Connection, count: int) -> list[int]:
    """Ids for `count` new responses, so the rows pointing at them can be written first."""
    return reserve_ids(conn, responses_t, count)


def insert(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Store responses, `RESPONSE_COLUMNS` tuples, in one executemany."""
    insert_many(conn, responses_t, RESPONSE_COLUMNS, rows)


def apply_answers(conn: Connection, rows: list[tuple[Any, ...]], batch_id: int) -> None:
    """Run `ANSWER_SQL` for each row (requests answered by their own batch `batch_id`), after
    checking each row's move."""
    for row in rows:
        if (row[-1], _SUCCEEDED) not in _ALLOWED:
            check_transition(RequestState(row[-1]), RequestState.SUCCEEDED)  # raises, naming both
    _run(conn, rows, batch_id, ANSWER_SQL)


def apply_updates(conn: Connection, rows: list[tuple[Any, ...]], batch_id: int) -> None:
    """Run `UPDATE_SQL` for each row, after checking each row's move."""
    for row in rows:
        if (row[-1], row[0]) not in _ALLOWED:
            check_transition(RequestState(row[-1]), RequestState(row[0]))  # raises, naming both
    _run(conn, rows, batch_id, UPDATE_SQL)


def _run(conn: Connection, rows: list[tuple[Any, ...]], batch_id: int, sql: str) -> None:
    if not rows:
        return
    matched = conn.exec_driver_sql(driver_sql(conn, sql), rows).rowcount
    if matched != len(rows):  # the rows are locked: this is a bug, not a race
        raise RuntimeError(f"batch {batch_id}: {len(rows) - matched} request(s) moved under a lock")
