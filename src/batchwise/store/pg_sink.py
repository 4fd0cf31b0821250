"""The PostgreSQL sink on plain psycopg: `batchwise submit` into PostgreSQL without SQLAlchemy.

Importing SQLAlchemy, SQLModel and the schema costs more than half a second, several times
what a small file's intake takes; this sink needs only psycopg (SQLAlchemy is loaded once,
through `Store`, when the schema has to be created or upgraded). Its chunks go in by binary
COPY, as `EngineSink`'s do on PostgreSQL: `copy_chunk` is shared by both.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg

from batchwise.errors import StoreError
from batchwise.store import dbapi
from batchwise.store.guard_state import GuardQueries
from batchwise.store.intake_rows import (
    ROW,
    STORED_COLUMNS,
    TURNAROUND_HISTORY,
    is_custom_id_conflict,
)
from batchwise.store.submissions import SubmissionWrites

_BODY = ROW["body"]
_SUBMISSION = ROW["submission_id"]
_COPY_REQUESTS_SQL = f"COPY requests ({', '.join(STORED_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
_COPY_BODIES_SQL = "COPY request_bodies (id, body) FROM STDIN (FORMAT BINARY)"


def libpq_url(url: str) -> str:
    """The URL libpq takes for a SQLAlchemy one: `postgresql+psycopg://…` loses its `+driver`;
    host, credentials, database and query options (`?options=-csearch_path%3D…`) stay."""
    scheme, sep, rest = url.partition("://")
    if not sep or not dbapi.is_postgres(url):
        raise ValueError(f"not a PostgreSQL URL: {dbapi.masked_url(url)!r}")
    return scheme.split("+", 1)[0] + "://" + rest


def column_types(cursor: Any) -> list[str]:
    """The PostgreSQL type of each stored column, for a binary COPY (no text parsing of
    numbers and timestamps on either side)."""
    found = dict(
        cursor.execute(
            "SELECT column_name, udt_name FROM information_schema.columns "
            "WHERE table_name = 'requests' AND table_schema = current_schema()"
        ).fetchall()
    )
    return [found[column] for column in STORED_COLUMNS]


def copy_chunk(cursor: Any, rows: Sequence[tuple[Any, ...]], types: Sequence[str]) -> None:
    """PostgreSQL's bulk path: COPY a chunk's requests, then their bodies."""
    b = _BODY
    with cursor.copy(_COPY_REQUESTS_SQL) as copy:
        copy.set_types(types)
        write = copy.write_row
        for row in rows:
            write(row[:b] + row[b + 1 :])
    with cursor.copy(_COPY_BODIES_SQL) as copy:
        copy.set_types(["int4", "text"])
        write = copy.write_row
        for row in rows:
            write((row[0], row[b]))


def _connect(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    """A connection whose first statement opens the sink's transaction."""
    return psycopg.connect(libpq_url(url))


class PostgresSink(SubmissionWrites, GuardQueries):
    """Writes to PostgreSQL through psycopg, inside one transaction."""

    def __init__(self, url: str) -> None:
        conn = _connect(url)
        try:
            revision = dbapi.schema_revision(conn.cursor())
            conn.rollback()  # a missing table aborted the transaction; nothing else ran
        except BaseException:
            conn.close()
            raise
        if revision != dbapi.SCHEMA_REVISION:
            conn.close()
            from batchwise.store.engine import Store

            Store(url).close()  # creates or upgrades the schema with the migrations, once
            conn = _connect(url)
        self.conn = conn
        self._sequence: str | None = None
        self._copy_types: list[str] | None = None
        self._open = True
        try:
            # The guards query rows this transaction is still adding, which the table's
            # statistics (taken before) do not count: a planner believing `requests` tiny
            # scans it whole for every chunk, quadratic in the file. The indexes serve them.
            conn.execute("SET LOCAL enable_seqscan = off")
        except BaseException:
            self.rollback()
            raise

    def time_value(self, moment: datetime) -> Any:
        return moment

    def reserve_ids(self, count: int) -> Sequence[int]:
        if self._sequence is None:  # looked up once: per chunk it costs 7× the nextval
            row = self.conn.execute("SELECT pg_get_serial_sequence('requests', 'id')").fetchone()
            assert row is not None, "one row"
            self._sequence = str(row[0])
        rows = self.conn.execute(
            "SELECT nextval(%s::regclass) FROM generate_series(1, %s)", (self._sequence, count)
        ).fetchall()
        return sorted(int(r[0]) for r in rows)

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> Sequence[int]:
        if not rows:
            return []
        try:
            self._copy(rows)
            return []
        except psycopg.errors.UniqueViolation as exc:
            if not is_custom_id_conflict(exc):
                raise
        # The savepoint undid the chunk: find the refused rows, then COPY the others.
        return self._insert_checked(rows)

    def _copy(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """COPY the rows inside a savepoint, so a refused one undoes only this chunk."""
        with self.conn.transaction(), self.conn.cursor() as cursor:
            if self._copy_types is None:
                self._copy_types = column_types(cursor)
            copy_chunk(cursor, rows, self._copy_types)

    def _insert_checked(self, rows: Sequence[tuple[Any, ...]]) -> Sequence[int]:
        """Insert a chunk, setting aside the rows whose custom_id is taken: by a live request
        of the submission, or by an earlier row of the chunk."""
        refused: list[int] = []
        pending = list(range(len(rows)))
        while True:
            taken = self.live_custom_ids(
                rows[pending[0]][_SUBMISSION], [rows[i][1] for i in pending]
            )
            seen: set[str] = set()
            keep = []
            for i in pending:
                custom_id = rows[i][1]
                if custom_id in taken or custom_id in seen:
                    refused.append(i)
                else:
                    seen.add(custom_id)
                    keep.append(i)
            if len(keep) == len(pending):
                raise StoreError("custom_id conflict that no row of the chunk explains")
            pending = keep
            if not pending:
                break
            try:
                self._copy([rows[i] for i in pending])
                break
            except psycopg.errors.UniqueViolation as exc:
                if not is_custom_id_conflict(exc):
                    raise
        refused.sort()
        return refused

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql.replace("?", "%s"), tuple(params)).fetchall()

    def _execute_many(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        if rows:
            with self.conn.cursor() as cursor:
                cursor.executemany(sql.replace("?", "%s"), rows)

    def turnarounds(self, provider: str, model: str) -> list[float]:
        rows = self.conn.execute(
            "SELECT turnaround_s FROM batches WHERE provider = %s AND model = %s "
            "AND turnaround_s IS NOT NULL ORDER BY id DESC LIMIT %s",
            (provider, model, TURNAROUND_HISTORY),
        )
        return [float(r[0]) for r in rows]

    def commit(self) -> None:
        if self._open:
            self._open = False
            try:
                self.conn.commit()
            finally:
                self.conn.close()

    def rollback(self) -> None:
        if self._open:
            self._open = False
            try:
                self.conn.rollback()
            finally:
                self.conn.close()
