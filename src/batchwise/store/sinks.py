"""Bulk request writers ("sinks") for intake: one open write transaction each.

Three interchangeable backends pass the same tests: `SQLiteSink` on the plain `sqlite3` module
(the embedded default) and `PostgresSink` (store.pg_sink) on plain psycopg, neither importing
SQLAlchemy, so `batchwise submit` starts fast; and `EngineSink` on a SQLAlchemy connection,
for writing inside a caller's open transaction (a cron job run's) or on an in-memory SQLite
store. All answer the cost guards through `GuardQueries` (store.guard_state), on their own
raw driver.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from batchwise.store import dbapi
from batchwise.store.guard_state import GuardQueries
from batchwise.store.intake_rows import (
    ROW,
    STORED_COLUMNS,
    TURNAROUND_HISTORY,
    RequestSink,
    body_rows,
    is_custom_id_conflict,
    set_aside,
    stored_rows,
)
from batchwise.store.submissions import SubmissionWrites

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from batchwise.store.engine import Store

_BODY = ROW["body"]
_SUBMISSION = ROW["submission_id"]
# SQLite statements take whole intake rows as they are, with no per-row copy: numbered
# parameters (?N) pick each column's place in the row, and the ones a statement leaves out
# are bound and ignored.
_INSERT_SQL = (
    f"INSERT INTO requests ({', '.join(STORED_COLUMNS)}) VALUES ("
    + ", ".join(f"?{ROW[c] + 1}" for c in STORED_COLUMNS)
    + f") /* ?{_BODY + 1} is the body: request_bodies */"
)
_BODY_SQL = "INSERT INTO request_bodies (id, body) VALUES (?, ?)"


def plain_sink(url: str) -> RequestSink | None:
    """A sink on the database's own driver (no SQLAlchemy import): a SQLite file through
    `sqlite3`, PostgreSQL through psycopg; None for other URLs (an in-memory SQLite database
    lives in its engine's connection, so only `EngineSink` on that store can reach it)."""
    if dbapi.is_sqlite(url):
        return SQLiteSink(url) if dbapi.sqlite_path(url) != ":memory:" else None
    if dbapi.is_postgres(url):
        from batchwise.store.pg_sink import PostgresSink

        return PostgresSink(url)
    return None


def open_sink(url: str) -> RequestSink:
    """The fastest sink for this database URL."""
    sink = plain_sink(url)
    if sink is not None:
        return sink
    from batchwise.store.engine import Store

    return EngineSink(Store(url), owns_store=True)


class SQLiteSink(SubmissionWrites, GuardQueries):
    """Writes to a SQLite file through `sqlite3`, inside one BEGIN IMMEDIATE transaction."""

    def __init__(self, url: str) -> None:
        path = dbapi.sqlite_path(url)
        conn = dbapi.connect_sqlite(path)
        revision = dbapi.schema_revision(conn.cursor())
        if revision is None:  # a new file: the shipped DDL, no Alembic, no SQLAlchemy
            revision = dbapi.create_sqlite_schema(conn)
        if revision != dbapi.SCHEMA_REVISION:
            conn.close()
            from batchwise.store.engine import Store

            Store(url).close()  # upgrades the schema with the migrations, once
            conn = dbapi.connect_sqlite(path)
        self.conn = conn
        conn.execute("BEGIN IMMEDIATE")
        self._next_id = (
            int(conn.execute("SELECT coalesce(max(id), 0) FROM requests").fetchone()[0]) + 1
        )
        self._open = True

    def time_value(self, moment: datetime) -> Any:
        return dbapi.sqlite_time(moment)

    def reserve_ids(self, count: int) -> Sequence[int]:
        first = self._next_id
        self._next_id += count
        return range(first, first + count)

    defers_inserts = False

    def start_insert(self, rows: Sequence[tuple[Any, ...]]) -> Callable[[], Sequence[int]]:
        refused = self.insert(rows)  # stored now
        return lambda: refused

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> Sequence[int]:
        # No savepoint: in SQLite it journals every page the chunk touches, which costs more
        # than the inserts. A refused row aborts only its own statement; the rows before it
        # stay, so we count them (ids are consecutive) and carry on after the refused one.
        refused: list[int] = []
        start = 0
        while start < len(rows):
            part = rows if start == 0 else rows[start:]
            try:
                self.conn.executemany(_INSERT_SQL, part)
                break
            except sqlite3.IntegrityError as exc:
                if not is_custom_id_conflict(exc):
                    raise
                (done,) = self.conn.execute(
                    "SELECT count(*) FROM requests WHERE id BETWEEN ? AND ?",
                    (part[0][0], part[-1][0]),
                ).fetchone()
                refused.append(start + done)
                start += done + 1
        self.conn.executemany(_BODY_SQL, body_rows(rows, refused))
        return refused

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, tuple(params)).fetchall()

    def _execute_many(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        self.conn.executemany(sql, rows)

    def turnarounds(self, provider: str, model: str) -> list[float]:
        rows = self.conn.execute(
            "SELECT turnaround_s FROM batches WHERE provider = ? AND model = ? "
            "AND turnaround_s IS NOT NULL ORDER BY id DESC LIMIT ?",
            (provider, model, TURNAROUND_HISTORY),
        )
        return [float(r[0]) for r in rows]

    def commit(self) -> None:
        if self._open:
            self._open = False
            self.conn.execute("COMMIT")
            self.conn.close()

    def rollback(self) -> None:
        if self._open:
            self._open = False
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            self.conn.close()


class EngineSink(SubmissionWrites, GuardQueries):
    """Writes through a SQLAlchemy connection (PostgreSQL's path; SQLite works too)."""

    def __init__(
        self, store: Store, *, owns_store: bool = False, conn: Connection | None = None
    ) -> None:
        """With `conn`, write inside the caller's open transaction and leave committing (or
        rolling back) to the caller, so requests can be stored atomically with other rows."""
        import sqlalchemy as sa

        from batchwise.store.engine import bodies_t, requests_t

        self._sa = sa
        self._table = requests_t
        self._bodies = bodies_t
        self.store = store
        self._owns_store = owns_store
        self._external = conn is not None
        self.conn = conn if conn is not None else store.engine.connect()
        self.trans = None if conn is not None else self.conn.begin()
        self._next_id: int | None = None
        self._sequence: str | None = None
        self._copy_types: list[str] | None = None
        self._open = True
        if store.is_postgres:
            # The guards query rows this transaction is still adding, which the table's
            # statistics (taken before) do not count: a planner believing `requests` tiny
            # scans it whole for every chunk, quadratic in the file. The indexes serve them.
            self.conn.exec_driver_sql("SET LOCAL enable_seqscan = off")

    def time_value(self, moment: datetime) -> Any:
        return moment

    def reserve_ids(self, count: int) -> Sequence[int]:
        sa = self._sa
        if self.store.is_postgres:
            if self._sequence is None:  # looked up once: per row it costs 7× the nextval
                self._sequence = str(
                    self.conn.exec_driver_sql(
                        "SELECT pg_get_serial_sequence('requests', 'id')"
                    ).scalar_one()
                )
            rows = self.conn.exec_driver_sql(
                "SELECT nextval(%(seq)s::regclass) FROM generate_series(1, %(n)s)",
                {"seq": self._sequence, "n": count},
            ).all()
            return sorted(int(r[0]) for r in rows)
        if self._next_id is None:
            top = self.conn.execute(sa.text("SELECT coalesce(max(id), 0) FROM requests")).scalar()
            self._next_id = int(top or 0) + 1
        first = self._next_id
        self._next_id += count
        return range(first, first + count)

    defers_inserts = False

    def start_insert(self, rows: Sequence[tuple[Any, ...]]) -> Callable[[], Sequence[int]]:
        refused = self.insert(rows)  # stored now
        return lambda: refused

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> Sequence[int]:
        if self.store.is_postgres and rows:
            import psycopg

            try:
                with self.conn.begin_nested():
                    self._copy(rows)
                return []
            except psycopg.errors.UniqueViolation as exc:
                if not is_custom_id_conflict(exc):
                    raise
            # The savepoint undid the chunk: find the refused rows the slow way.
        return self._insert_checked(rows)

    def _copy(self, rows: Sequence[tuple[Any, ...]]) -> None:
        from batchwise.store.pg_sink import column_types, copy_chunk

        driver = self.conn.connection.driver_connection
        assert driver is not None, "an open connection"
        with driver.cursor() as cursor:
            if self._copy_types is None:
                self._copy_types = column_types(cursor)
            copy_chunk(cursor, rows, self._copy_types)

    def _insert_checked(self, rows: Sequence[tuple[Any, ...]]) -> Sequence[int]:
        """Insert a chunk, setting aside the rows whose custom_id is taken."""
        sa = self._sa
        refused: list[int] = []
        stored = stored_rows(rows)
        pending = list(range(len(rows)))
        while pending:
            try:
                with self.conn.begin_nested():
                    self.conn.execute(
                        sa.insert(self._table),
                        [dict(zip(STORED_COLUMNS, stored[i], strict=True)) for i in pending],
                    )
                break
            except sa.exc.IntegrityError as exc:
                if not is_custom_id_conflict(exc):
                    raise
            # The savepoint undid the chunk: set aside rows whose custom_id is held by a live
            # request or by an earlier row of the chunk, and insert the rest.
            taken = self.live_custom_ids(
                rows[pending[0]][_SUBMISSION], [rows[i][1] for i in pending]
            )
            aside, pending = set_aside(rows, pending, taken)
            refused += aside
        refused.sort()
        bodies = body_rows(rows, refused)
        if bodies:
            self.conn.execute(
                sa.insert(self._bodies), [{"id": rid, "body": body} for rid, body in bodies]
            )
        return refused

    def _driver(self, values: Sequence[Any]) -> tuple[Any, ...]:
        """Datetimes as this database stores them (these statements skip SQLAlchemy's types)."""
        from batchwise.store.engine import db_time

        return tuple(db_time(self.conn, v) if isinstance(v, datetime) else v for v in values)

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        from batchwise.store.engine import driver_sql

        rows = self.conn.exec_driver_sql(driver_sql(self.conn, sql), self._driver(params))
        return [tuple(r) for r in rows]

    def _execute_many(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        from batchwise.store.engine import driver_sql

        if rows:
            self.conn.exec_driver_sql(
                driver_sql(self.conn, sql), [self._driver(row) for row in rows]
            )

    def turnarounds(self, provider: str, model: str) -> list[float]:
        rows = self.conn.execute(
            self._sa.text(
                "SELECT turnaround_s FROM batches WHERE provider = :p AND model = :m "
                "AND turnaround_s IS NOT NULL ORDER BY id DESC LIMIT :n"
            ),
            {"p": provider, "m": model, "n": TURNAROUND_HISTORY},
        )
        return [float(r[0]) for r in rows]

    def _close(self) -> None:
        self._open = False
        if not self._external:
            self.conn.close()
        if self._owns_store:
            self.store.close()

    def commit(self) -> None:
        if self._open:
            if self.trans is not None:
                self.trans.commit()
            self._close()

    def rollback(self) -> None:
        if self._open:
            if self.trans is not None:
                self.trans.rollback()
            elif self.conn.in_transaction():
                # An invalid submission inside the caller's transaction: undo ours and theirs.
                self.conn.rollback()
            self._close()
