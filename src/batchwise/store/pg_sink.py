"""The PostgreSQL sink on plain psycopg: `batchwise submit` into PostgreSQL without SQLAlchemy.

Importing SQLAlchemy, SQLModel and the schema costs more than half a second, several times
what a small file's intake takes; this sink needs only psycopg (SQLAlchemy is loaded once,
through `Store`, when the schema has to be created or upgraded). Its chunks go in by binary
COPY, as `EngineSink`'s do on PostgreSQL: `copy_chunk` is shared by both.

A chunk's requests are still being stored while intake reads the next chunk (`start_insert`):
the server's work on a COPY (its indexes, its WAL) takes about as long as parsing a chunk, and
a client waiting for it at the end of each chunk left the other core idle. The requests' COPY
is left open, its rows sent, until intake flushes again; every other use of the connection
closes it first, so the transaction sees each chunk before the guards' next read, and the ids
of the next chunk are fetched before it opens. (100,000 agentic lines: 2.2 s -> 1.76 s, the
server's 1.05 CPU-seconds now beside the client's 1.1, not after them.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import psycopg

from batchwise.store import dbapi
from batchwise.store.guard_state import GuardQueries
from batchwise.store.intake_rows import (
    ROW,
    STORED_COLUMNS,
    TURNAROUND_HISTORY,
    is_custom_id_conflict,
    set_aside,
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
    with cursor.copy(_COPY_REQUESTS_SQL) as copy:
        write_requests(copy, rows, types)
    copy_bodies(cursor, rows)


def write_requests(copy: Any, rows: Sequence[tuple[Any, ...]], types: Sequence[str]) -> None:
    """Write a chunk's `requests` rows (all but the body) into an open binary COPY."""
    b = _BODY
    copy.set_types(types)
    write = copy.write_row
    for row in rows:
        write(row[:b] + row[b + 1 :])


def copy_bodies(cursor: Any, rows: Sequence[tuple[Any, ...]]) -> None:
    """COPY a chunk's bodies into `request_bodies`."""
    b = _BODY
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

    #: a chunk is still being stored when `start_insert` returns
    defers_inserts = True

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
        #: the chunk whose COPY is still open, if any
        self._storing: _OpenCopy | None = None
        #: a block of ids fetched ahead, for the chunk read while one is stored
        self._spare_ids: list[Sequence[int]] = []
        self._block = 0
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
        if self._spare_ids:
            return self._spare_ids.pop(0)  # fetched before the chunk being stored opened
        self._wait()
        self._block = count
        return self._fetch_ids(count)

    def _fetch_ids(self, count: int) -> Sequence[int]:
        if self._sequence is None:  # looked up once: per chunk it costs 7× the nextval
            row = self.conn.execute("SELECT pg_get_serial_sequence('requests', 'id')").fetchone()
            assert row is not None, "one row"
            self._sequence = str(row[0])
        rows = self.conn.execute(
            "SELECT nextval(%s::regclass) FROM generate_series(1, %s)", (self._sequence, count)
        ).fetchall()
        return sorted(int(r[0]) for r in rows)

    def start_insert(self, rows: Sequence[tuple[Any, ...]]) -> Callable[[], Sequence[int]]:
        self._wait()
        if not rows:
            return lambda: []
        if len(rows) >= self._block and not self._spare_ids:
            # a full chunk: more lines are likely, whose ids are fetched now, while the
            # connection is free (a partial chunk is the last: no ids are taken for nothing)
            self._spare_ids.append(self._fetch_ids(self._block))
        if self._copy_types is None:
            with self.conn.cursor() as cursor:
                self._copy_types = column_types(cursor)
        storing = _OpenCopy(self, rows, self._copy_types)
        self._storing = storing

        def stored() -> Sequence[int]:
            if self._storing is storing:
                self._wait()
            return storing.outcome()

        return stored

    def _wait(self) -> None:
        """Finish the chunk whose COPY is open; its error, if any, is raised here."""
        storing, self._storing = self._storing, None
        if storing is not None:
            storing.finish()
            storing.outcome()

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> Sequence[int]:
        self._wait()
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
            aside, pending = set_aside(rows, pending, taken)
            refused += aside
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
        self._wait()
        return self.conn.execute(sql.replace("?", "%s"), tuple(params)).fetchall()

    def _execute_many(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        self._wait()
        if rows:
            with self.conn.cursor() as cursor:
                cursor.executemany(sql.replace("?", "%s"), rows)

    def task_counts(self, task_ids: Sequence[str]) -> dict[str, int]:
        # GuardQueries' statement with one array parameter instead of a list of them: the
        # same text every chunk, so psycopg prepares it once (over 50 parameters it parses
        # the statement anew each time), and the server plans it once
        self._wait()
        return {
            task_id: int(count)
            for task_id, count in self.conn.execute(
                "SELECT task_id, count(loop_key) FROM requests "
                "WHERE task_id IS NOT NULL AND task_id = ANY(%s) GROUP BY task_id",
                (list(task_ids),),
            )
        }

    def turnarounds(self, provider: str, model: str) -> list[float]:
        self._wait()
        rows = self.conn.execute(
            "SELECT turnaround_s FROM batches WHERE provider = %s AND model = %s "
            "AND turnaround_s IS NOT NULL ORDER BY id DESC LIMIT %s",
            (provider, model, TURNAROUND_HISTORY),
        )
        return [float(r[0]) for r in rows]

    def commit(self) -> None:
        if self._open:
            try:
                self._wait()
            except BaseException:
                self.rollback()
                raise
            self._open = False
            try:
                self.conn.commit()
            finally:
                self.conn.close()

    def rollback(self) -> None:
        if self._open:
            self._open = False
            storing, self._storing = self._storing, None
            try:
                if storing is not None:  # all of it is undone: how it ended does not matter
                    storing.abandon()
                self.conn.rollback()
            finally:
                self.conn.close()


class _OpenCopy:
    """One chunk being stored: its bodies copied, its requests' COPY left open inside a
    savepoint while intake reads on. `finish` closes it (waiting for the server); a refused
    custom_id undoes the savepoint and the chunk goes in the slow way (`_insert_checked`)."""

    def __init__(
        self, sink: PostgresSink, rows: Sequence[tuple[Any, ...]], types: Sequence[str]
    ) -> None:
        self.sink, self.rows = sink, rows
        self.refused: Sequence[int] = ()
        self.error: BaseException | None = None
        self._savepoint = sink.conn.transaction()
        self._savepoint.__enter__()
        self._cursor = sink.conn.cursor()
        try:
            # the bodies first: nothing can refuse them (no key but the id), so their COPY
            # ends here, and the requests' COPY, which a taken custom_id can fail, stays open
            copy_bodies(self._cursor, rows)
            # rows are sent as they are written (psycopg's writer flushes every 32 KB), so
            # the server works on them while intake parses the next chunk
            self._open = self._cursor.copy(_COPY_REQUESTS_SQL)
            write_requests(self._open.__enter__(), rows, types)
        except BaseException as exc:
            self._close(exc)
            raise

    def finish(self) -> None:
        """Wait for the server to take the chunk; keep the refused positions or the error."""
        try:
            self._open.__exit__(None, None, None)
        except BaseException as exc:
            self._savepoint.__exit__(type(exc), exc, exc.__traceback__)
            self._cursor.close()
            if isinstance(exc, psycopg.errors.UniqueViolation) and is_custom_id_conflict(exc):
                try:
                    self.refused = self.sink._insert_checked(self.rows)
                except BaseException as again:
                    self.error = again
            else:
                self.error = exc
            return
        self._savepoint.__exit__(None, None, None)
        self._cursor.close()

    def abandon(self) -> None:
        """Stop the COPY (the transaction is being rolled back)."""
        # whatever it raises, the rollback that follows undoes everything all the same
        with contextlib.suppress(Exception):
            self._close(RuntimeError("intake rolled back"))

    def _close(self, exc: BaseException) -> None:
        opened = getattr(self, "_open", None)
        try:
            if opened is not None:
                opened.__exit__(type(exc), exc, exc.__traceback__)
        finally:
            self._savepoint.__exit__(type(exc), exc, exc.__traceback__)
            self._cursor.close()

    def outcome(self) -> Sequence[int]:
        """The refused positions; the chunk's error is raised instead, if it met one."""
        if self.error is not None:
            raise self.error
        return self.refused
