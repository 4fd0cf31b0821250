"""The row layout intake builds and the sinks store, and the interface every sink offers.

Intake (`intake.ingest`, `intake.guarding`) builds one tuple per line in `REQUEST_COLUMNS`
order and hands chunks of them to a sink; the sinks (`store.sinks`) store them as they are.
Both sides import this module, so it imports nothing heavy (no SQLAlchemy, no sqlite3):
`batchwise submit` on SQLite never loads SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from datetime import datetime
from typing import Any, Protocol

#: the columns intake writes, in the order of the row tuples it builds
REQUEST_COLUMNS = (
    "id",
    "custom_id",
    "provider",
    "endpoint",
    "model",
    "body",
    "body_hash",
    "body_key",
    "tolerance",
    "deadline",
    "lane",
    "reason",
    "state",
    "attempts",
    "use_case",
    "step",
    "business_unit",
    "task_id",
    "tags",
    "size_bytes",
    "est_input_tokens",
    "input_format",
    "created_at",
    "updated_at",
    "job_run_id",
    "submission_id",
    "loop_key",
)

#: position of each column in a row tuple
ROW = {name: i for i, name in enumerate(REQUEST_COLUMNS)}
_BODY = ROW["body"]
#: the `requests` columns of an intake row: all but the body, which has its own table
STORED_COLUMNS = REQUEST_COLUMNS[:_BODY] + REQUEST_COLUMNS[_BODY + 1 :]
#: how many of a (provider, model)'s latest batch turnarounds a sink reads for its forecast
TURNAROUND_HISTORY = 500

#: the tag columns a budget can be kept for (`spent_nusd`, `unfinished_estimates`)
BUDGET_TAGS = frozenset({"use_case", "step", "business_unit", "task_id"})

#: a stored answer a dedupe guard may reuse: (body_hash, request id, response id,
#: finished_at, realtime-equivalent nano-USD, input tokens, output tokens)
Answer = tuple[str, int, int, datetime, int | None, int | None, int | None]


def body_key(body_hash: str) -> int:
    """The first 64 bits of a body's sha256 (hex) as a signed integer, the dedupe index's key:
    an index on it is a fraction of the size of one on the hash, and the full hash is compared
    after the lookup."""
    return int.from_bytes(bytes.fromhex(body_hash[:16]), "big", signed=True)


def stored_rows(rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Intake rows as `requests` rows (without the body)."""
    b = _BODY
    return [row[:b] + row[b + 1 :] for row in rows]


def body_rows(rows: Sequence[tuple[Any, ...]], refused: Sequence[int]) -> list[tuple[Any, Any]]:
    """(id, body) of the rows that were stored, for `request_bodies`."""
    b = _BODY
    if not refused:
        return [(row[0], row[b]) for row in rows]
    skip = set(refused)
    return [(row[0], row[b]) for i, row in enumerate(rows) if i not in skip]


def is_custom_id_conflict(exc: BaseException) -> bool:
    """Whether a driver's integrity error is the live custom_id index refusing a row (the
    PostgreSQL index's name, or the SQLite columns it lists)."""
    text = str(exc)
    return "uq_requests_live_custom_id" in text or "requests.custom_id" in text


def set_aside(
    rows: Sequence[tuple[Any, ...]], pending: Sequence[int], taken: Container[str]
) -> tuple[list[int], list[int]]:
    """After a chunk was refused for a custom_id: the positions among `pending` to set aside
    (their custom_id is `taken` by a live request, or by an earlier row of the chunk) and
    those to insert again. A conflict that no row explains is an error, never a loop."""
    refused: list[int] = []
    keep: list[int] = []
    seen: set[str] = set()
    for i in pending:
        custom_id = rows[i][1]
        if custom_id in taken or custom_id in seen:
            refused.append(i)
        else:
            seen.add(custom_id)
            keep.append(i)
    if not refused:
        from batchwise.errors import StoreError

        raise StoreError("custom_id conflict that no row of the chunk explains")
    return refused, keep


class RequestSink(Protocol):
    """Where intake writes: one open write transaction (see `store.sinks`).

    Besides storing rows, a sink answers the cost guards' questions and writes their
    decisions (the methods after `turnarounds`), inside the same transaction.
    """

    #: whether `start_insert` returns before the chunk is stored (intake then reads the next
    #: chunk meanwhile, and keeps the chunk's rows until it is); False: stored at once
    defers_inserts: bool

    def time_value(self, moment: datetime) -> Any:
        """The value this database stores for an aware datetime."""
        ...

    def reserve_ids(self, count: int) -> Sequence[int]:
        """A block of increasing ids for about `count` more rows (at least one; intake asks
        again when they run out, so a sink may hand out a block it fetched ahead)."""
        ...

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> Sequence[int]:
        """Insert the rows; return the positions of those refused because their custom_id is
        held by a live request of the same submission (or an earlier row); every other row is
        inserted."""
        ...

    def start_insert(self, rows: Sequence[tuple[Any, ...]]) -> Callable[[], Sequence[int]]:
        """Begin `insert`: the call returned waits until the rows are stored and returns the
        refused positions. A sink may store them meanwhile (the caller reads its next chunk);
        any other use of the sink waits for them first."""
        ...

    def live_custom_ids(self, submission_id: int, custom_ids: Sequence[str]) -> dict[str, int]:
        """Live requests of the submission already holding any of these custom_ids:
        custom_id -> request id."""
        ...

    def open_submission(
        self, *, name: str | None, source: str, job_run_id: int | None, at: datetime
    ) -> int:
        """Insert the submission's row (`store.submissions`); returns its id."""
        ...

    def close_submission(
        self, submission_id: int, *, fmt: str | None, first_id: int | None, last_id: int | None
    ) -> None:
        """Record the format its lines came in and the range of ids intake gave them."""
        ...

    def turnarounds(self, provider: str, model: str) -> list[float]: ...

    def task_counts(self, task_ids: Sequence[str]) -> dict[str, int]:
        """How many stored requests each of these tasks has, leaving out those a guard
        refused (tasks with none are left out)."""
        ...

    def task_key_counts(
        self, task_ids: Sequence[str], loop_keys: Sequence[int]
    ) -> dict[tuple[str, int], tuple[int, int]]:
        """How many stored requests (not refused) each (task, loop_key) pair among these has,
        and the latest one's id."""
        ...

    def recent_task_bodies(
        self, task_ids: Sequence[str], *, per_task: int
    ) -> list[tuple[str, int, str]]:
        """(task_id, request id, body) of each task's latest `per_task` stored requests (not
        refused, body not purged), latest first per task."""
        ...

    def unkeyed_task_bodies(self, task_ids: Sequence[str]) -> list[tuple[int, str | None]]:
        """(request id, body) of these tasks' stored requests whose loop_key is not worked
        out yet (`costs.guards.UNKEYED`); the body is None once purged."""
        ...

    def answers(self, provider: str, endpoint: str, body_hashes: Sequence[str]) -> list[Answer]:
        """Succeeded requests with one of these bodies whose answer is still stored, newest
        first."""
        ...

    def spent_nusd(self, tag: str, value: str, *, since: datetime) -> int:
        """Actual nano-USD in the ledger for entries tagged `tag` = `value` since `since`."""
        ...

    def unfinished_estimates(self, tag: str, value: str) -> list[tuple[int, str, str, str | None]]:
        """(est_input_tokens, provider, model, body) of the unfinished requests tagged
        `tag` = `value`: money in flight."""
        ...

    def set_original_models(self, rows: Sequence[tuple[str, int]]) -> None:
        """Record (original model, request id) for requests a routing rule sent elsewhere."""
        ...

    def set_loop_keys(self, rows: Sequence[tuple[int, int]]) -> None:
        """Record (loop_key, request id) for stored requests that were `UNKEYED`."""
        ...

    def reject(self, rows: Sequence[tuple[int, str, str, str]], *, at: datetime) -> None:
        """Move (request id, from state, guard, reason) to `rejected`, compare-and-set."""
        ...

    def deduplicate(self, rows: Sequence[tuple[int, str, int]], *, at: datetime) -> None:
        """Move (request id, from state, response id) to `deduplicated`, compare-and-set."""
        ...

    def hold(self, rows: Sequence[tuple[int, datetime]]) -> None:
        """Keep (request id, not before) requests back until that time."""
        ...

    def record_events(
        self, rows: Sequence[tuple[str, str, str, int, str | None, str]], *, at: datetime
    ) -> None:
        """Insert (kind, severity, message, request id, task id, data JSON) events."""
        ...

    def record_ledger(self, entries: Sequence[tuple[Any, ...]]) -> None:
        """Insert ledger entries laid out as `store.ledger.COLUMNS`."""
        ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...
