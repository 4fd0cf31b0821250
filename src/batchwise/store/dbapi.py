"""Raw DBAPI connections, shared by the SQLAlchemy engine and the bulk paths.

The bulk intake path talks to SQLite through `sqlite3` directly so that `batchwise submit`
does not pay SQLAlchemy's import time; the engine is built on the same `connect_sqlite`, so
both see identical pragmas. Nothing here imports SQLAlchemy.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import sqlite3
import stat
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote

#: the schema revision this code expects (the Alembic head); a test keeps them equal
SCHEMA_REVISION = "0006"
#: how SQLite stores datetimes: UTC, fixed width, so text comparison is time comparison
SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
#: long enough to ride out another producer's whole-file transaction
SQLITE_BUSY_TIMEOUT_MS = 120_000
#: the store holds request and response bodies: its folder and files are the owner's only
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def sqlite_time(value: datetime) -> str:
    """The text SQLite stores for an aware datetime."""
    return value.astimezone(UTC).strftime(SQLITE_TIME_FORMAT)


def as_datetime(value: object) -> datetime:
    """An aware datetime from a raw driver value (SQLite text or a PostgreSQL timestamp)."""
    if isinstance(value, str):
        return datetime.strptime(value, SQLITE_TIME_FORMAT).replace(tzinfo=UTC)
    assert isinstance(value, datetime)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def is_postgres(url: str) -> bool:
    """`postgresql://`, `postgres://`, or either with a SQLAlchemy `+driver`."""
    return url.split("://", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def sqlite_path(url: str) -> str:
    """The file of a `sqlite:///relative`, `sqlite:////absolute` or `sqlite://` (memory) URL."""
    if not url.startswith("sqlite://"):
        raise ValueError(f"not a SQLite URL: {url!r}")
    rest = url[len("sqlite://") :]
    if rest in ("", "/", "/:memory:"):
        return ":memory:"
    if not rest.startswith("/"):
        raise ValueError(f"invalid SQLite URL {url!r}: expected sqlite:///path/to/file.db")
    path = unquote(rest[1:].split("?", 1)[0])
    return path


def connect_sqlite(path: str) -> sqlite3.Connection:
    """A SQLite connection set up for several processes at once.

    WAL lets readers run beside one writer; the busy timeout makes writers queue instead of
    failing; autocommit mode (isolation_level None) leaves BEGIN to us, so write transactions
    can start with BEGIN IMMEDIATE and never hit a lock upgrade deadlock.
    """
    if path != ":memory:":
        private_dir(Path(path).parent)
        private_file(Path(path))
    conn = sqlite3.connect(
        path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    if path != ":memory:":
        _switch_to_wal(conn, path)
    # NORMAL is durable against process crashes in WAL mode; only an OS crash can lose
    # the last transactions, and the store recovers from that like from any crash.
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    # Checkpoint the WAL every ~40 MB rather than every 4 MB: bulk chunks are several MB each.
    conn.execute("PRAGMA wal_autocheckpoint = 10000")
    return conn


def private_dir(folder: Path) -> None:
    """Create `folder` and its missing parents as 0700, whatever the umask.

    Folders that already exist are left as they are: the store may live in a shared or
    project folder the user chose, whose mode is theirs to set.
    """
    missing = []
    here = folder
    while not here.exists() and here != here.parent:
        missing.append(here)
        here = here.parent
    for created in reversed(missing):
        try:
            created.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:  # another process made it first: it set the mode too
            continue
        os.chmod(created, PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask


def private_file(path: Path) -> None:
    """Make the SQLite file and its -wal/-shm companions 0600, whatever the umask.

    A new database file is created 0600 before SQLite opens it (SQLite then gives its -wal
    and -shm files the database file's mode). Existing files that others can read are
    tightened to 0600 when we own them; files of another user are left alone.

    An existing database file is never opened here: closing any descriptor of it drops every
    POSIX lock this process holds on it, those of its open SQLite connections included, and
    another process closing its last connection would then delete the WAL under them (their
    later writes lost, keys made elsewhere never seen). Only a file this call creates (O_EXCL,
    so no connection can hold it yet) is opened, to give it its mode.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
        except FileExistsError:  # another process made it first
            info = path.stat()
        else:
            info = None
    if info is not None and stat.S_IMODE(info.st_mode) & 0o077 and info.st_uid == os.geteuid():
        with contextlib.suppress(OSError):  # removed or handed over meanwhile
            os.chmod(path, stat.S_IMODE(info.st_mode) & ~0o077 | 0o600)
    for suffix in ("-wal", "-shm", "-journal"):
        companion = Path(f"{path}{suffix}")
        try:
            info = companion.stat()
        except OSError:
            continue
        if stat.S_IMODE(info.st_mode) & 0o077 and info.st_uid == os.geteuid():
            # suppress: removed or handed over meanwhile
            with contextlib.suppress(OSError):
                os.chmod(companion, stat.S_IMODE(info.st_mode) & ~0o077 | 0o600)


#: user:password@ in a URL, to mask the password before a URL is shown
_URL_PASSWORD = re.compile(r"(://[^/:@]*:)[^/@]*@")


def masked_url(url: str) -> str:
    """`url` with its password, if any, replaced by ***."""
    return _URL_PASSWORD.sub(r"\1***@", url)


def _raised_by(exc: BaseException, package: str) -> bool:
    return any(
        cls.__module__ == package or cls.__module__.startswith(package + ".")
        for cls in type(exc).__mro__
    )


def database_error(exc: BaseException) -> str | None:
    """One line describing a database driver error (SQLite, PostgreSQL, or SQLAlchemy around
    them), or None when `exc` is not one. The SQL and its parameters are left out: they may
    hold request bodies."""
    if _raised_by(exc, "sqlalchemy"):
        orig = getattr(exc, "orig", None)
        exc = orig if isinstance(orig, BaseException) else exc
    elif not (_raised_by(exc, "sqlite3") or _raised_by(exc, "psycopg")):
        return None
    text = str(exc).strip()
    if _raised_by(exc, "sqlalchemy"):  # no driver error inside: drop SQLAlchemy's [SQL: …]
        text = text.split("[SQL:", 1)[0].split("(Background on this error", 1)[0].strip()
    first = text.splitlines()[0].strip() if text else type(exc).__name__
    return first[:300]


def _switch_to_wal(conn: sqlite3.Connection, path: str) -> None:
    """Put a new database in WAL mode (it stays so; later opens find it already done).

    While another connection writes the file's first transaction (still in rollback mode),
    SQLite refuses the switch at once without calling the busy handler, so several processes
    opening a new file together failed with "database is locked". Wait here instead, up to
    the busy timeout, as every other lock wait does.
    """
    give_up = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    pause = 0.001
    while True:
        try:
            mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > give_up:
                raise
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, 0.1)
            continue
        if mode != "wal":  # pragma: no cover - only on a filesystem without WAL
            raise sqlite3.OperationalError(f"cannot switch {path} to WAL mode (got {mode})")
        return


def schema_revision(cursor: object) -> str | None:
    """The Alembic revision stamped in the database, or None when there is no schema yet."""
    execute = cursor.execute  # type: ignore[attr-defined]
    try:
        execute("SELECT version_num FROM alembic_version")
    except Exception:
        return None
    row = cursor.fetchone()  # type: ignore[attr-defined]
    return str(row[0]) if row else None


def create_sqlite_schema(conn: sqlite3.Connection) -> str | None:
    """Give a new SQLite file the schema, from the DDL shipped in `store.sqlite_schema`
    (generated from the migrations), stamped with its revision: milliseconds, with neither
    Alembic nor SQLAlchemy imported. Returns the revision the file is at afterwards.

    Under BEGIN IMMEDIATE, so of several processes opening one new file the first creates
    the schema and the others find it. A file that already holds tables without a revision
    is left alone (None): the migrations decide what to do with it.
    """
    from batchwise.store.sqlite_schema import REVISION, STATEMENTS

    conn.execute("BEGIN IMMEDIATE")
    try:
        revision = schema_revision(conn.cursor())
        if revision is None:
            (tables,) = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
            ).fetchone()
            if not tables:
                for statement in STATEMENTS:
                    conn.execute(statement)
                conn.execute("INSERT INTO alembic_version (version_num) VALUES (?)", (REVISION,))
                revision = REVISION
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return revision
