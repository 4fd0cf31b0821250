"""The SQL store: engine set-up, schema, transactions, compare-and-set transitions and claims.

SQLite (embedded default) and PostgreSQL run through the same code. Write transactions on
SQLite start with BEGIN IMMEDIATE, so concurrent writers queue on the busy timeout instead of
failing on a lock upgrade; on PostgreSQL work is claimed with FOR UPDATE SKIP LOCKED.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import QueuePool, StaticPool

from batchwise.errors import SchemaError
from batchwise.store import dbapi
from batchwise.store.schema import (
    Batch,
    Event,
    JobRun,
    LedgerEntry,
    Request,
    RequestBody,
    Response,
    StoreMeta,
    Submission,
)

_READONLY = "batchwise_readonly"
#: PostgreSQL advisory lock key that serialises schema creation across processes
_SCHEMA_LOCK_KEY = 0x62617463  # "batc"

requests_t: sa.Table = Request.__table__  # type: ignore[attr-defined]
bodies_t: sa.Table = RequestBody.__table__  # type: ignore[attr-defined]
batches_t: sa.Table = Batch.__table__  # type: ignore[attr-defined]
responses_t: sa.Table = Response.__table__  # type: ignore[attr-defined]
events_t: sa.Table = Event.__table__  # type: ignore[attr-defined]
ledger_t: sa.Table = LedgerEntry.__table__  # type: ignore[attr-defined]
meta_t: sa.Table = StoreMeta.__table__  # type: ignore[attr-defined]
job_runs_t: sa.Table = JobRun.__table__  # type: ignore[attr-defined]
submissions_t: sa.Table = Submission.__table__  # type: ignore[attr-defined]


def make_engine(url: str) -> Engine:
    """An engine for `url`, with SQLite set up for several processes (see `dbapi`)."""
    if dbapi.is_sqlite(url):
        path = dbapi.sqlite_path(url)
        memory = path == ":memory:"
        # The URL given to SQLAlchemy is a stand-in (the creator opens the real file); name
        # the pool explicitly, since for "sqlite://" it would pick a per-thread pool.
        engine = sa.create_engine(
            "sqlite://",
            creator=lambda: dbapi.connect_sqlite(path),
            poolclass=StaticPool if memory else QueuePool,
            # Last in, first out: the connection used last is used next, and its page cache is
            # still valid (SQLite drops a connection's whole cache when another one has written
            # since). Taken in turn, every transaction of a bulk loop started cold.
            **({} if memory else {"pool_size": 10, "max_overflow": 30, "pool_use_lifo": True}),
        )

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            readonly = conn.get_execution_options().get(_READONLY, False)
            conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return sa.create_engine(url, pool_pre_ping=True)


class Store:
    """The database batchwise keeps everything in. Cheap to create; call `close()` when done."""

    def __init__(self, url: str, *, create_schema: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._store_id: str | None = None
        if create_schema:
            ensure_schema(self.engine)

    @property
    def store_id(self) -> str:
        """A random identity of this database (8 hex digits), carried in what we send to
        providers so that our batches can never be mistaken for another deployment's."""
        if self._store_id is None:
            with self.read() as conn:
                value = conn.execute(
                    sa.select(meta_t.c.value).where(meta_t.c.key == "store_id")
                ).scalar()
            if value is None:
                with self.write() as conn:
                    value = conn.execute(
                        sa.select(meta_t.c.value).where(meta_t.c.key == "store_id")
                    ).scalar()
                    if value is None:
                        value = uuid.uuid4().hex[:8]
                        conn.execute(sa.insert(meta_t).values(key="store_id", value=value))
            self._store_id = str(value)
        return self._store_id

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)!r})"

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction, committed on success and rolled back on any error."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (on SQLite, one that takes no write lock)."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(**{_READONLY: True})
            with conn.begin():
                yield conn

    def close(self) -> None:
        self.engine.dispose()


def ensure_schema(engine: Engine) -> None:
    """Create or upgrade the schema to this code's revision, once, whoever races for it."""
    with engine.connect() as conn:
        conn = conn.execution_options(**{_READONLY: True})
        with conn.begin():
            if _current_revision(conn) == dbapi.SCHEMA_REVISION:
                return
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
        revision = _current_revision(conn)
        if revision is None and conn.dialect.name == "sqlite":
            revision = _create_sqlite(conn)
        if revision == dbapi.SCHEMA_REVISION:
            return
        _upgrade(conn, revision)


def _create_sqlite(conn: Connection) -> str | None:
    """A new SQLite file gets the shipped DDL (`dbapi.create_sqlite_schema`), not a run of
    every migration; a file holding tables without a revision is left to the migrations."""
    from batchwise.store.sqlite_schema import REVISION, STATEMENTS

    if sa.inspect(conn).get_table_names():
        return None
    for statement in STATEMENTS:
        conn.exec_driver_sql(statement)
    conn.execute(sa.text("INSERT INTO alembic_version (version_num) VALUES (:v)"), {"v": REVISION})
    return REVISION


def _current_revision(conn: Connection) -> str | None:
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    value = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    return None if value is None else str(value)


def _upgrade(conn: Connection, revision: str | None) -> None:
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["connection"] = conn
    known = {rev.revision for rev in ScriptDirectory.from_config(config).walk_revisions()}
    if revision is not None and revision not in known:
        raise SchemaError(
            f"the database is at schema revision {revision!r}, which this version of batchwise "
            f"does not know (it expects {dbapi.SCHEMA_REVISION!r}); upgrade batchwise"
        )
    command.upgrade(config, "head")


def chunked(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def reserve_ids(conn: Connection, table: sa.Table, count: int) -> list[int]:
    """Ids for `count` new rows of `table`, so a bulk insert knows them without RETURNING.

    On SQLite the caller holds the write lock (BEGIN IMMEDIATE), so max(id) + 1 … is ours;
    on PostgreSQL the table's sequence hands them out.
    """
    if count <= 0:
        return []
    if conn.dialect.name == "postgresql":
        rows = conn.execute(
            sa.text(
                f"SELECT nextval(pg_get_serial_sequence('{table.name}', 'id')) "
                "FROM generate_series(1, :n)"
            ),
            {"n": count},
        )
        return sorted(int(r[0]) for r in rows)
    top = conn.execute(_top_id(table)).scalar_one()
    return list(range(int(top) + 1, int(top) + 1 + count))


@functools.cache
def _top_id(table: sa.Table) -> sa.Select[tuple[Any]]:
    """`SELECT coalesce(max(id), 0)` of `table`, built once per table (a realtime call reserves
    an id for its answer; building the statement cost as much as running it)."""
    return sa.select(sa.func.coalesce(sa.func.max(table.c.id), 0))


# --- bulk writes on the driver, for the hot paths --------------------------------------------
# SQLAlchemy's per-row parameter processing costs more than the inserts themselves when a chunk
# holds thousands of rows; these helpers hand tuples straight to the driver's executemany.


#: the page cache, in KiB, of a SQLite connection that has run a bulk chunk (`bulk_cache`)
BULK_CACHE_KIB = 16 * 1024


def bulk_cache(conn: Connection) -> None:
    """Let this connection's page cache hold a bulk chunk's working set (on SQLite; elsewhere
    nothing).

    SQLite's default cache is 2 MB, less than the pages one reconcile chunk of 5,000 lines
    reads and writes: the request rows read were gone from it by the time they were updated,
    and dirty pages spilled to the WAL mid-transaction (a reconcile spent 10% more CPU in
    SQLite). Raised once per connection, and only on those that run bulk chunks, so a short
    process such as `batchwise submit` keeps the small default.
    """
    if conn.dialect.name != "sqlite":
        return
    info = conn.connection.info
    if info.get(_BULK_CACHE) != BULK_CACHE_KIB:
        conn.exec_driver_sql(f"PRAGMA cache_size = -{BULK_CACHE_KIB}")
        info[_BULK_CACHE] = BULK_CACHE_KIB


_BULK_CACHE = "batchwise_bulk_cache_kib"


def db_time(conn: Connection, moment: datetime) -> Any:
    """The value the database stores for an aware datetime (text on SQLite)."""
    return dbapi.sqlite_time(moment) if conn.dialect.name == "sqlite" else moment


def driver_sql(conn: Connection, sql: str) -> str:
    """SQL written with `?` placeholders, in the driver's own parameter style."""
    return sql if conn.dialect.name == "sqlite" else sql.replace("?", "%s")


def in_ids(conn: Connection, ids: Sequence[int]) -> tuple[str, tuple[Any, ...]]:
    """`IN (…)` over a list of ids, with its parameters, for SQL written with `?`.

    On SQLite the ids travel as one JSON array, so the statement's text is the same whatever
    their count: the driver keeps every distinct text it ran as a prepared statement (128 per
    connection), and one with 5,000 placeholders holds about a megabyte, so lists of varying
    length made the process grow with the workload. Elsewhere, one placeholder per id.
    """
    if conn.dialect.name == "sqlite":
        return "IN (SELECT value FROM json_each(?))", ("[" + ",".join(map(str, ids)) + "]",)
    return f"IN ({', '.join('?' for _ in ids)})", tuple(ids)


def insert_many(
    conn: Connection, table: sa.Table, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> None:
    """executemany an INSERT of value tuples in `columns` order."""
    if rows:
        marks = ", ".join("?" for _ in columns)
        sql = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({marks})"
        conn.exec_driver_sql(driver_sql(conn, sql), list(rows))
