"""The store on SQLite and on the real PostgreSQL: schema, migrations, transitions, and several
producer processes writing at once."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

import batchwise.store.schema
from batchwise.api import Client
from batchwise.config import Settings
from batchwise.errors import SchemaError, TransitionError
from batchwise.states import TERMINAL_REQUEST_STATES, TRANSITIONS, RequestState
from batchwise.store import dbapi, sqlite_schema
from batchwise.store.engine import BULK_CACHE_KIB, Store, bulk_cache, ensure_schema, requests_t
from batchwise.store.intake_rows import body_key
from batchwise.store.sinks import open_sink
from batchwise.store.transitions import transition_requests


def test_schema_is_created_on_first_use(db_url: str) -> None:
    store = Store(db_url)
    with store.read() as conn:
        names = set(sa.inspect(conn).get_table_names())
        revision = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    assert {"requests", "batches", "responses", "events"} <= names
    assert revision == dbapi.SCHEMA_REVISION
    ensure_schema(store.engine)  # a second time is a no-op
    store.close()


def test_migrations_produce_exactly_the_models(db_url: str) -> None:
    store = Store(db_url)
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    store.close()
    assert diff == []


def test_schema_revision_constant_is_the_alembic_head() -> None:
    config = Config()
    config.set_main_option(
        "script_location", str(Path(batchwise.store.schema.__file__).parent / "migrations")
    )
    assert ScriptDirectory.from_config(config).get_current_head() == dbapi.SCHEMA_REVISION


def test_unknown_newer_schema_is_refused(sqlite_url: str) -> None:
    Store(sqlite_url).close()
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(SchemaError, match="upgrade batchwise"):
        Store(sqlite_url)


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(sqlite_url: str) -> None:
    store = Store(sqlite_url)
    with store.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == dbapi.SQLITE_BUSY_TIMEOUT_MS
    store.close()


def test_a_bulk_chunk_widens_the_page_cache_of_its_connection_only(db_url: str) -> None:
    store = Store(db_url)
    sqlite = db_url.startswith("sqlite")
    with store.write() as conn:
        before = conn.exec_driver_sql("PRAGMA cache_size").scalar() if sqlite else None
        bulk_cache(conn)
        bulk_cache(conn)  # once is enough; again changes nothing
        if sqlite:
            assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -BULK_CACHE_KIB
    if sqlite:  # a connection that ran no bulk chunk keeps SQLite's default
        assert before == -2000
        raw = dbapi.connect_sqlite(db_url.removeprefix("sqlite:///"))
        assert raw.execute("PRAGMA cache_size").fetchone()[0] == -2000
        raw.close()
    store.close()


def test_opening_a_new_database_waits_for_its_first_writer_instead_of_failing(
    tmp_path: Path,
) -> None:
    """Processes opening a new file at once: one writes the file's first transaction (in
    rollback mode, holding RESERVED), another asks for WAL. SQLite fails that switch at once
    without calling the busy handler; the open must wait like every other lock wait."""
    path = tmp_path / "new.db"
    first = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    first.execute("BEGIN IMMEDIATE")
    first.execute("CREATE TABLE t (x INTEGER)")
    opened: list[sqlite3.Connection | BaseException] = []

    def open_it() -> None:
        try:
            opened.append(dbapi.connect_sqlite(str(path)))
        except BaseException as exc:
            opened.append(exc)

    thread = threading.Thread(target=open_it)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and not opened, f"did not wait for the writer: {opened}"
    first.execute("COMMIT")
    thread.join(30)
    first.close()
    [conn] = opened
    assert isinstance(conn, sqlite3.Connection), conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    conn.close()


def test_several_processes_opening_one_new_database_at_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(6) as pool:
        for attempt in range(8):
            path = str(tmp_path / f"cold{attempt}.db")
            barrier = manager.Barrier(6)
            outcomes = pool.starmap(_open_and_write, [(path, barrier)] * 6)
            assert outcomes == ["wal"] * 6, f"attempt {attempt}: {outcomes}"
            check = sqlite3.connect(path)
            assert check.execute("SELECT count(*) FROM t").fetchone()[0] == 6
            check.close()


def _open_and_write(path: str, barrier: threading.Barrier) -> str:
    barrier.wait()
    try:
        conn = dbapi.connect_sqlite(path)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        return repr(exc)
    mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    conn.close()
    return mode


def test_datetimes_come_back_aware_utc(db_url: str) -> None:
    client = Client(db_url, settings=Settings(timezone="UTC"))
    handle = client.enqueue(model="gpt-4o-mini", prompt="x", tolerance="2030-01-01T09:00:00+02:00")
    view = client.get(handle.id)
    assert view.deadline == datetime(2030, 1, 1, 7, 0, tzinfo=UTC)
    assert view.created_at.tzinfo is not None
    client.close()


def test_transition_is_compare_and_set(db_url: str) -> None:
    client = Client(db_url, settings=Settings(timezone="UTC"))
    ids = [
        h.id
        for h in client.enqueue_many(
            [{"model": "gpt-4o-mini", "prompt": str(i), "tolerance": "2d"} for i in range(3)]
        )
    ]
    now = datetime.now(UTC)
    with client.store.write() as conn:
        moved = transition_requests(
            conn, ids, src=RequestState.QUEUED, dst=RequestState.PACKED, now=now
        )
    assert sorted(moved) == sorted(ids)
    with client.store.write() as conn:  # a second, racing worker wins nothing
        assert (
            transition_requests(
                conn, ids, src=RequestState.QUEUED, dst=RequestState.PACKED, now=now
            )
            == []
        )
    with pytest.raises(TransitionError):
        transition_requests_illegal(client)
    client.close()


def transition_requests_illegal(client: Client) -> None:
    with client.store.write() as conn:
        transition_requests(
            conn, [1], src=RequestState.SUCCEEDED, dst=RequestState.QUEUED, now=datetime.now(UTC)
        )


def test_transition_table_is_consistent() -> None:
    for state in RequestState:
        assert state in TRANSITIONS
        if state in TERMINAL_REQUEST_STATES:
            assert TRANSITIONS[state] == frozenset(), f"{state} is terminal"
        else:
            assert TRANSITIONS[state] & TERMINAL_REQUEST_STATES, f"{state} can never finish"


def _produce(url: str, worker: int, count: int) -> None:
    client = Client(url, settings=Settings(timezone="UTC"))
    for start in range(0, count, 50):
        client.enqueue_many(
            [
                {
                    "model": "gpt-4o-mini",
                    "prompt": f"{worker}-{i}",
                    "custom_id": f"w{worker}-{i}",
                    "tolerance": "4h" if i % 2 else "realtime",
                }
                for i in range(start, start + 50)
            ]
        )
    client.close()


@pytest.mark.slow
def test_several_producer_processes_lose_nothing(db_url: str) -> None:
    Store(db_url).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_produce, args=(db_url, w, 300)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = Store(db_url)
    with store.read() as conn:
        ids = conn.execute(sa.select(requests_t.c.custom_id)).scalars().all()
        distinct_ids = conn.execute(sa.select(sa.func.count(sa.distinct(requests_t.c.id)))).scalar()
    store.close()
    assert len(ids) == 1200 == distinct_ids
    assert set(ids) == {f"w{w}-{i}" for w in range(4) for i in range(300)}


@pytest.mark.slow
def test_producer_processes_submitting_files_at_once(tmp_path: Path) -> None:
    """The sqlite3 fast path under contention: four whole-file transactions queue, none fails."""
    import subprocess
    import sys

    import orjson

    url = f"sqlite:///{tmp_path / 'x.db'}"
    Store(url).close()
    files = []
    for w in range(4):
        path = tmp_path / f"in{w}.jsonl"
        path.write_bytes(
            b"".join(
                orjson.dumps(
                    {"model": "gpt-4o-mini", "prompt": f"{w}:{i}", "custom_id": f"f{w}-{i}"}
                )
                + b"\n"
                for i in range(2000)
            )
        )
        files.append(path)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "batchwise", "--db", url, "submit", str(f), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for f in files
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1] for o in outputs]
    assert all(orjson.loads(o[0])["accepted"] == 2000 for o in outputs)
    store = Store(url)
    with store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(requests_t)).scalar() == 8000
    store.close()


def test_upgrade_from_0001_moves_bodies_into_their_own_table(db_url: str) -> None:
    """A store written by 0001 (bodies inside `requests`) keeps every body after the upgrade,
    and its partial indexes."""
    config = Config()
    config.set_main_option(
        "script_location", str(Path(batchwise.store.schema.__file__).parent / "migrations")
    )
    engine = sa.create_engine(db_url)
    at = "2026-11-29 12:00:00.000000" if db_url.startswith("sqlite") else "2026-11-29 12:00Z"
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        rows = (
            (1, '{"a":1}', "ab" * 32),
            (2, None, "cd" * 32),
            (3, '{"c":3}', "ef" * 32),
            (4, '{"d":4}', "17" * 32),  # a positive key (the others are negative)
        )
        for rid, body, hex_hash in rows:
            conn.execute(
                sa.text(
                    "INSERT INTO requests (id, custom_id, provider, endpoint, model, body, "
                    "body_hash, tolerance, deadline, lane, reason, state, attempts, tags, "
                    "size_bytes, est_input_tokens, created_at, updated_at) VALUES (:id, :cid, "
                    "'openai', '/v1/chat/completions', 'gpt-4o-mini', :body, :hash, '24h', :at, "
                    "'deferred', 'r', 'queued', 0, '{}', 7, 1, :at, :at)"
                ),
                {"id": rid, "cid": f"c{rid}", "body": body, "at": at, "hash": hex_hash},
            )
    engine.dispose()
    store = Store(db_url)  # upgrades to the head
    with store.read() as conn:
        bodies = dict(conn.execute(sa.text("SELECT id, body FROM request_bodies")).all())
        keys = dict(conn.execute(sa.text("SELECT id, body_key FROM requests")).all())
        columns = {c["name"] for c in sa.inspect(conn).get_columns("requests")}
        indexes = {i["name"] for i in sa.inspect(conn).get_indexes("requests")}
    store.close()
    assert bodies == {1: '{"a":1}', 3: '{"c":3}', 4: '{"d":4}'}
    assert "body" not in columns
    assert {"ix_requests_queued", "ix_requests_batch", "uq_requests_live_custom_id"} <= indexes
    assert keys == {rid: body_key(hex_hash) for rid, _, hex_hash in rows}


def test_downgrade_to_0001_puts_bodies_back(db_url: str) -> None:
    client = Client(db_url, settings=Settings(timezone="UTC"))
    handle = client.enqueue(model="gpt-4o-mini", prompt="kept", tolerance="24h")
    client.close()
    config = Config()
    config.set_main_option(
        "script_location", str(Path(batchwise.store.schema.__file__).parent / "migrations")
    )
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0001")
        body = conn.execute(
            sa.text("SELECT body FROM requests WHERE id = :id"), {"id": handle.id}
        ).scalar_one()
        command.upgrade(config, "head")
        key = conn.execute(
            sa.text("SELECT body_key FROM requests WHERE id = :id"), {"id": handle.id}
        ).scalar_one()
    engine.dispose()
    assert "kept" in body
    assert key == body_key(hashlib.sha256(body.encode()).hexdigest())


def test_an_id_list_finds_the_same_rows_and_on_sqlite_keeps_one_statement_text(
    db_url: str,
) -> None:
    # Given a store with a few requests …
    from batchwise.store.engine import driver_sql, in_ids

    client = Client(settings=Settings(database_url=db_url))
    ids = [
        h.id
        for h in client.enqueue_many(
            [{"model": "gpt-4o-mini", "prompt": f"q{i}", "tolerance": "24h"} for i in range(7)]
        )
    ]
    client.close()
    store = Store(db_url)
    texts = set()
    with store.read() as conn:
        for count in (1, 3, 7):
            # … when lists of different lengths (one id unknown) are looked up …
            where, params = in_ids(conn, [*ids[:count], 10**9])
            texts.add(where)
            sql = driver_sql(conn, f"SELECT id FROM requests WHERE id {where} ORDER BY id")
            # … then each finds exactly its rows,
            assert [r[0] for r in conn.exec_driver_sql(sql, params)] == ids[:count]
        sqlite = conn.dialect.name == "sqlite"
    store.close()
    # and on SQLite the statement text never changes (each text is a prepared statement the
    # driver caches; one per length made the process grow with the workload).
    assert len(texts) == (1 if sqlite else 3)


def test_shipped_sqlite_schema_is_what_the_migrations_make() -> None:
    """A new migration without `python scripts/make_sqlite_schema.py` fails here."""
    spec = importlib.util.spec_from_file_location(
        "make_sqlite_schema", Path(__file__).parent.parent / "scripts/make_sqlite_schema.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    head, statements = script.migrated_ddl()
    assert (sqlite_schema.REVISION, list(sqlite_schema.STATEMENTS)) == (head, statements)
    assert sqlite_schema.REVISION == dbapi.SCHEMA_REVISION


def test_a_new_sqlite_store_is_created_without_alembic_or_sqlalchemy(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    code = (
        "import sys; from batchwise.store.sinks import open_sink; "
        f"sink = open_sink('sqlite:///{db}'); sink.rollback(); "
        "print(sorted({'alembic', 'sqlalchemy', 'sqlmodel'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    # the same schema as the migrations make, stamped with the head
    store = Store(f"sqlite:///{db}")
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
        revision = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    store.close()
    assert diff == [] and revision == dbapi.SCHEMA_REVISION


def test_an_older_store_is_still_upgraded_by_the_migrations(sqlite_url: str) -> None:
    config = Config()
    config.set_main_option(
        "script_location", str(Path(batchwise.store.schema.__file__).parent / "migrations")
    )
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0003")
    engine.dispose()
    sink = open_sink(sqlite_url)
    sink.rollback()
    store = Store(sqlite_url, create_schema=False)
    with store.read() as conn:
        revision = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        columns = {c["name"] for c in sa.inspect(conn).get_columns("requests")}
    store.close()
    assert revision == dbapi.SCHEMA_REVISION and "loop_key" in columns


@pytest.mark.postgres
def test_submit_into_postgres_does_not_import_sqlalchemy(postgres_url: str, tmp_path: Path) -> None:
    """`batchwise submit` into a PostgreSQL store at this revision talks psycopg only: the
    SQLAlchemy stack is most of a small file's time."""
    Store(postgres_url).close()
    data = tmp_path / "one.jsonl"
    data.write_text(
        '{"model": "gpt-4o-mini", "prompt": "hi"}\n{"model": "gpt-4o-mini", "prompt": "yo"}\n'
    )
    code = (
        "import sys\n"
        "from batchwise.cli.main import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print(sorted({'alembic', 'sqlalchemy', 'sqlmodel'} & set(sys.modules)))\n"
    )
    args = ["--db", postgres_url, "submit", "--json", str(data)]
    env = {**os.environ, "BATCHWISE_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, env=env
    )
    result, modules = out.stdout.strip().splitlines()
    assert json.loads(result)["accepted"] == 2 and modules == "[]"
    store = Store(postgres_url)
    with store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(requests_t)).scalar() == 2
    store.close()


@pytest.mark.postgres
@pytest.mark.parametrize("start", [None, "0003"], ids=["empty", "older"])
def test_the_postgres_sink_creates_or_upgrades_the_schema(
    postgres_url: str, settings: Settings, start: str | None
) -> None:
    """A schema with no tables gets them, an older one is upgraded by the migrations, and the
    submission then goes in (through psycopg, on the same connection settings)."""
    if start is not None:
        config = Config()
        config.set_main_option(
            "script_location", str(Path(batchwise.store.schema.__file__).parent / "migrations")
        )
        engine = sa.create_engine(postgres_url)
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, start)
        engine.dispose()
    with Client(postgres_url, settings=settings) as client:
        made = client.submit_file(io.BytesIO(b'{"model": "gpt-4o-mini", "prompt": "hi"}\n'))
        assert made.intake.accepted == 1
    store = Store(postgres_url, create_schema=False)
    with store.read() as conn:
        revision = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        columns = {c["name"] for c in sa.inspect(conn).get_columns("requests")}
        count = conn.execute(sa.select(sa.func.count()).select_from(requests_t)).scalar()
    store.close()
    assert revision == dbapi.SCHEMA_REVISION and "loop_key" in columns and count == 1


@pytest.mark.postgres
def test_a_postgres_sink_error_does_not_show_the_password(postgres_url: str) -> None:
    secret = "s3cr3t-pass"
    url = f"postgresql://nobody:{secret}@" + postgres_url.split("://", 1)[1]  # no such role
    with pytest.raises(Exception) as info:
        open_sink(url)
    assert secret not in str(info.value) and secret not in repr(info.value)


def test_a_new_sqlite_connection_keeps_the_locks_of_the_others(tmp_path: Path) -> None:
    """Opening a connection must not drop the POSIX locks of this process's other ones: if it
    did, another process closing its last connection would delete the WAL under them, and they
    would neither see its writes nor keep their own."""
    path = str(tmp_path / "locks.db")
    first = dbapi.connect_sqlite(path)
    first.execute("CREATE TABLE t (v INTEGER)")
    assert first.execute("SELECT count(*) FROM t").fetchone() == (0,)
    second = dbapi.connect_sqlite(path)  # a pool growing
    writer = (
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
        "c.execute('INSERT INTO t VALUES (1)'); c.commit(); c.close()"
    )
    subprocess.run([sys.executable, "-c", writer, path], check=True)
    assert first.execute("SELECT count(*) FROM t").fetchone() == (1,)
    assert Path(f"{path}-wal").exists()
    first.close()
    second.close()


def test_the_requests_riding_on_a_batch_are_found_by_the_batch_index(tmp_path: Path) -> None:
    # SQLite uses a partial index only for a query that implies its WHERE clause
    from batchwise.store.batches import riding_query

    store = Store(f"sqlite:///{tmp_path / 'plan.db'}")
    try:
        with store.read() as conn:
            sql = riding_query(7).compile(conn, compile_kwargs={"literal_binds": True})
            plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
    finally:
        store.close()
    assert "ix_requests_batch" in plan, plan
