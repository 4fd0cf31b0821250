"""The emulator's state: files, batches, their lines, the prompt-prefix cache and counters.

One SQLite database (in memory, or `emulator.sqlite3` in the state dir) plus a directory of
blobs (uploaded files, Anthropic batch requests). Batch status is not stored: it is derived
from stored times and the clock, so a restarted emulator continues where it stopped.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from functools import partial
from itertools import repeat
from pathlib import Path
from typing import Any, NamedTuple, cast

import orjson

from batchwise.emulator.seeded import hex_id

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, purpose TEXT NOT NULL, filename TEXT NOT NULL,
    bytes INTEGER, created_at REAL NOT NULL, expires_at REAL, path TEXT,
    batch_id TEXT, kind TEXT, deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, provider TEXT NOT NULL, created_at REAL NOT NULL,
    turnaround_s REAL NOT NULL, endpoint TEXT, model TEXT, input_file_id TEXT,
    input_path TEXT NOT NULL, metadata TEXT, request_count INTEGER NOT NULL, errors TEXT,
    expires INTEGER NOT NULL, cancel_at REAL, ends_at REAL NOT NULL,
    output_file_id TEXT, error_file_id TEXT, prompt_tokens INTEGER NOT NULL,
    options TEXT, deleted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS batches_by_provider ON batches (provider, seq);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL, pos INTEGER NOT NULL, line_no INTEGER NOT NULL,
    custom_id TEXT NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
    status INTEGER NOT NULL, err_type TEXT, err_code TEXT, err_message TEXT, err_param TEXT,
    input_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
    cache_write_5m_tokens INTEGER NOT NULL, cache_write_1h_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    PRIMARY KEY (batch_id, pos)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS prefix_cache (
    key BLOB PRIMARY KEY, tokens INTEGER NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class FileRow:
    """An uploaded file, or a batch's output/error file (`batch_id` and `kind` set)."""

    id: str
    seq: int
    purpose: str
    filename: str
    bytes: int | None
    created_at: float
    expires_at: float | None
    path: str | None
    batch_id: str | None = None
    #: "output" or "error" for a batch's result files
    kind: str | None = None
    deleted: bool = False


@dataclass(frozen=True)
class BatchRow:
    """A batch as created; its status is derived from these times and the clock."""

    id: str
    seq: int
    provider: str
    created_at: float
    turnaround_s: float
    endpoint: str | None
    model: str | None
    input_file_id: str | None
    #: the blob holding one request per line (OpenAI input file, Anthropic params)
    input_path: str
    metadata: dict[str, str] | None
    request_count: int
    #: batch-level validation errors (OpenAI `errors.data`); non-empty means `failed`
    errors: list[dict[str, Any]] | None
    expires: bool
    cancel_at: float | None
    #: when the batch turns terminal, kept current on cancel (for in-flight token sums)
    ends_at: float
    output_file_id: str | None
    error_file_id: str | None
    prompt_tokens: int
    options: dict[str, Any] | None = None
    deleted: bool = False


class LineRow(NamedTuple):
    """One request of a batch, at position `pos` of the (shuffled) processing order.

    A tuple, not a dataclass: a batch stores up to 100,000 of them at once.
    """

    pos: int
    line_no: int
    custom_id: str
    offset: int
    length: int
    #: 200 for a line that succeeds, else the HTTP status of its error
    status: int
    err_type: str | None
    err_code: str | None
    err_message: str | None
    err_param: str | None
    input_tokens: int
    cached_tokens: int
    cache_write_5m_tokens: int
    cache_write_1h_tokens: int
    output_tokens: int
    reasoning_tokens: int

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass(frozen=True)
class LineSummary:
    """Counts and summed usage of the first `done` lines of a batch."""

    succeeded: int = 0
    errored: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0


#: a `LineRow` from a row of `_LINE_COLS`, as `LineRow._make` without a Python call per row
#: (a result file reads every line of its batch)
_line_row = cast(Callable[[Sequence[Any]], LineRow], partial(tuple.__new__, LineRow))

_JSON_FIELDS = {"metadata", "errors", "options"}
_BOOL_FIELDS = {"expires", "deleted"}


def _values(row: FileRow) -> tuple[Any, ...]:
    return tuple(getattr(row, f.name) for f in fields(row))


def _file_from_row(row: Sequence[Any]) -> FileRow:
    values = dict(zip((f.name for f in fields(FileRow)), row, strict=True))
    values["deleted"] = bool(values["deleted"])
    return FileRow(**values)


def _batch_from_row(row: Sequence[Any]) -> BatchRow:
    values: dict[str, Any] = {}
    for f, value in zip(fields(BatchRow), row, strict=True):
        if f.name in _JSON_FIELDS:
            value = None if value is None else orjson.loads(value)
        elif f.name in _BOOL_FIELDS:
            value = bool(value)
        values[f.name] = value
    return BatchRow(**values)


def _batch_to_row(batch: BatchRow) -> tuple[Any, ...]:
    out: list[Any] = []
    for f in fields(BatchRow):
        value = getattr(batch, f.name)
        if f.name in _JSON_FIELDS:
            value = None if value is None else orjson.dumps(value)
        out.append(value)
    return tuple(out)


_BATCH_COLS = ", ".join(f.name for f in fields(BatchRow))
_FILE_COLS = ", ".join(f.name for f in fields(FileRow))
_LINE_COLS = ", ".join(LineRow._fields)
_INSERT_FILE = f"INSERT INTO files ({_FILE_COLS}) VALUES ({', '.join('?' * len(fields(FileRow)))})"
_INSERT_BATCH = (
    f"INSERT INTO batches ({_BATCH_COLS}) VALUES ({', '.join('?' * len(fields(BatchRow)))})"
)
_INSERT_LINE = (
    f"INSERT INTO lines (batch_id, {_LINE_COLS}) "
    f"VALUES (?, {', '.join('?' * len(LineRow._fields))})"
)


class State:
    """Thread-safe access to the emulator's SQLite database and blob directory."""

    def __init__(self, state_dir: Path | None, *, seed: int) -> None:
        self._seed = seed
        self._lock = threading.RLock()
        if state_dir is None:
            # blobs must be on disk even in memory mode: uploads may be hundreds of MB
            self.blob_dir = Path(tempfile.mkdtemp(prefix="batchwise-emulator-"))
            self._db = sqlite3.connect(":memory:", check_same_thread=False)
            self._cleanup = weakref.finalize(self, _discard, self._db, self.blob_dir)
        else:
            state_dir.mkdir(parents=True, exist_ok=True)
            self.blob_dir = state_dir / "blobs"
            self.blob_dir.mkdir(exist_ok=True)
            self._db = sqlite3.connect(state_dir / "emulator.sqlite3", check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._cleanup = weakref.finalize(self, _discard, self._db, None)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database (and delete the blobs of an in-memory state)."""
        with self._lock:
            self._cleanup()

    # -- ids and counters -------------------------------------------------------------------

    def next_seq(self, name: str) -> int:
        """The next number of sequence `name`, persisted so ids never repeat after a restart."""
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO counters VALUES (?, 1) "
                "ON CONFLICT (name) DO UPDATE SET value = value + 1",
                (f"seq.{name}",),
            )
            (value,) = self._db.execute(
                "SELECT value FROM counters WHERE name = ?", (f"seq.{name}",)
            ).fetchone()
        return int(value)

    def new_id(self, name: str, prefix: str, *, length: int = 24) -> tuple[str, int]:
        """A fresh id `prefix + hex` derived from the seed and the sequence, and its number."""
        seq = self.next_seq(name)
        return prefix + hex_id(self._seed, name, seq, length=length), seq

    def bump(self, name: str, n: int = 1) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO counters VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (name, n),
            )

    def counters(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT name, value FROM counters").fetchall()
        return {str(name): int(value) for name, value in rows}

    # -- files ------------------------------------------------------------------------------

    def insert_file(self, row: FileRow) -> None:
        with self._lock, self._db:
            self._db.execute(_INSERT_FILE, _values(row))

    def get_file(self, file_id: str) -> FileRow | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_FILE_COLS} FROM files WHERE id = ? AND deleted = 0", (file_id,)
            ).fetchone()
        return None if row is None else _file_from_row(row)

    def uploaded_files(self) -> list[FileRow]:
        """Uploaded (not result) files, newest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_FILE_COLS} FROM files WHERE deleted = 0 AND batch_id IS NULL "
                "ORDER BY seq DESC"
            ).fetchall()
        return [_file_from_row(row) for row in rows]

    def set_file_bytes(self, file_id: str, size: int) -> None:
        with self._lock, self._db:
            self._db.execute("UPDATE files SET bytes = ? WHERE id = ?", (size, file_id))

    def file_in_use(self, file_id: str) -> bool:
        """Whether a batch reads this file (its blob must stay until the state goes)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM batches WHERE input_file_id = ? LIMIT 1", (file_id,)
            ).fetchone()
        return row is not None

    def delete_file(self, file_id: str) -> bool:
        """Hide a file. Its blob stays while a batch reads it, as the provider keeps inputs."""
        with self._lock, self._db:
            cur = self._db.execute(
                "UPDATE files SET deleted = 1 WHERE id = ? AND deleted = 0", (file_id,)
            )
            return cur.rowcount == 1

    # -- batches ----------------------------------------------------------------------------

    def insert_batch(
        self, batch: BatchRow, lines: Iterable[LineRow], result_files: Sequence[FileRow] = ()
    ) -> None:
        """Store a batch with its lines and result-file rows in one transaction."""
        with self._lock, self._db:
            self._db.execute(_INSERT_BATCH, _batch_to_row(batch))
            # (batch id, *line) for each line, without a Python step per line
            self._db.executemany(_INSERT_LINE, map(tuple.__add__, repeat((batch.id,)), lines))
            self._db.executemany(_INSERT_FILE, (_values(row) for row in result_files))

    def get_batch(self, batch_id: str, *, provider: str) -> BatchRow | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_BATCH_COLS} FROM batches WHERE id = ? AND provider = ? AND deleted = 0",
                (batch_id, provider),
            ).fetchone()
        return None if row is None else _batch_from_row(row)

    def batches(
        self, provider: str | None = None, *, include_deleted: bool = False
    ) -> list[BatchRow]:
        """Batches newest first (all providers when `provider` is None)."""
        where = ["1 = 1"]
        args: list[Any] = []
        if provider is not None:
            where.append("provider = ?")
            args.append(provider)
        if not include_deleted:
            where.append("deleted = 0")
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_BATCH_COLS} FROM batches WHERE {' AND '.join(where)} ORDER BY seq DESC",
                args,
            ).fetchall()
        return [_batch_from_row(row) for row in rows]

    def set_cancel(self, batch_id: str, *, at: float, ends_at: float) -> bool:
        """Record a cancel request once (compare-and-set); False if one was already recorded."""
        with self._lock, self._db:
            cur = self._db.execute(
                "UPDATE batches SET cancel_at = ?, ends_at = ? WHERE id = ? AND cancel_at IS NULL",
                (at, ends_at, batch_id),
            )
            return cur.rowcount == 1

    def delete_batch(self, batch_id: str) -> None:
        with self._lock, self._db:
            self._db.execute("UPDATE batches SET deleted = 1 WHERE id = ?", (batch_id,))

    def inflight_prompt_tokens(self, provider: str, model: str, now: float) -> int:
        """Prompt tokens of accepted batches of `model` that have not ended by `now`."""
        with self._lock:
            (total,) = self._db.execute(
                "SELECT COALESCE(SUM(prompt_tokens), 0) FROM batches WHERE provider = ? "
                "AND model = ? AND errors IS NULL AND ends_at > ?",
                (provider, model, now),
            ).fetchone()
        return int(total)

    # -- lines ------------------------------------------------------------------------------

    def line_summary(self, batch_id: str, done: int) -> LineSummary:
        """Outcome counts and usage of the lines at positions `[0, done)`."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(status = 200), 0), COALESCE(SUM(status != 200), 0), "
                "COALESCE(SUM(CASE WHEN status = 200 THEN input_tokens END), 0), "
                "COALESCE(SUM(CASE WHEN status = 200 THEN cached_tokens END), 0), "
                "COALESCE(SUM(CASE WHEN status = 200 "
                "    THEN cache_write_5m_tokens + cache_write_1h_tokens END), 0), "
                "COALESCE(SUM(CASE WHEN status = 200 THEN output_tokens END), 0), "
                "COALESCE(SUM(CASE WHEN status = 200 THEN reasoning_tokens END), 0) "
                "FROM lines WHERE batch_id = ? AND pos < ?",
                (batch_id, done),
            ).fetchone()
        return LineSummary(*(int(v) for v in row))

    def iter_lines(
        self, batch_id: str, start: int, stop: int, *, chunk: int = 5000
    ) -> Iterator[LineRow]:
        """Lines at positions `[start, stop)` in order, read a chunk at a time."""
        pos = start
        while pos < stop:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT {_LINE_COLS} FROM lines WHERE batch_id = ? AND pos >= ? AND pos < ? "
                    "ORDER BY pos",
                    (batch_id, pos, min(stop, pos + chunk)),
                ).fetchall()
            if not rows:
                return
            yield from map(_line_row, rows)
            pos = rows[-1][0] + 1

    # -- prompt-prefix cache ----------------------------------------------------------------

    def cache_hits(self, keys: Sequence[bytes], now: float) -> set[bytes]:
        """Which of `keys` are cached and not yet expired at `now`."""
        if not keys:
            return set()
        hits: set[bytes] = set()
        with self._lock:
            for i in range(0, len(keys), 500):
                part = keys[i : i + 500]
                rows = self._db.execute(
                    f"SELECT key FROM prefix_cache WHERE expires_at > ? "
                    f"AND key IN ({', '.join('?' * len(part))})",
                    (now, *part),
                ).fetchall()
                hits.update(bytes(key) for (key,) in rows)
        return hits

    def cache_put(self, entries: Iterable[tuple[bytes, int, float]]) -> None:
        """Store or refresh `(key, tokens, expires_at)` entries."""
        with self._lock, self._db:
            self._db.executemany(
                "INSERT INTO prefix_cache VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                "expires_at = MAX(expires_at, excluded.expires_at)",
                entries,
            )


def _discard(db: sqlite3.Connection, blob_dir: Path | None) -> None:
    db.close()
    if blob_dir is not None:
        shutil.rmtree(blob_dir, ignore_errors=True)
