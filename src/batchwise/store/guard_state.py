"""The SQL of the intake cost guards: what they read (a task's requests, stored answers,
money spent and in flight) and what they write (refusals, dedupe hits, holds, events, ledger
entries), inside the intake's own transaction.

Every sink runs these statements through its own raw driver (`sqlite3` for `SQLiteSink`,
psycopg for `PostgresSink`, the SQLAlchemy connection's DBAPI cursor for `EngineSink`),
written once here with `?` placeholders; so the guards cost a few set-based statements per
chunk and `batchwise submit` never imports SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from batchwise.states import RequestState
from batchwise.store.dbapi import as_datetime
from batchwise.store.intake_rows import BUDGET_TAGS, Answer, body_key
from batchwise.store.transitions import check_transition

#: a refused request no longer counts toward its task's loop limits: its loop_key goes
_REJECT_SQL = (
    "UPDATE requests SET state = ?, error = ?, error_code = ?, finished_at = ?, "
    "updated_at = ?, loop_key = NULL WHERE id = ? AND state = ?"
)
_DEDUPLICATE_SQL = (
    "UPDATE requests SET state = ?, response_id = ?, finished_at = ?, updated_at = ? "
    "WHERE id = ? AND state = ?"
)
_EVENT_SQL = (
    "INSERT INTO events (at, kind, severity, message, request_id, task_id, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def _check_moves(sources: Sequence[str], dst: RequestState) -> None:
    """Every move a guard makes is one `states.TRANSITIONS` allows (a row leaves intake
    `queued` or `dispatching`, so this checks one or two pairs per chunk)."""
    for src in set(sources):
        check_transition(RequestState(src), dst)


class GuardQueries:
    """The guards' named statements, for a sink that provides the three primitives below."""

    def time_value(self, moment: datetime) -> Any:  # pragma: no cover - sinks override
        raise NotImplementedError

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Run a query written with `?` placeholders inside the transaction."""
        raise NotImplementedError  # pragma: no cover - sinks override

    def _execute_many(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """executemany a statement written with `?` placeholders inside the transaction."""
        raise NotImplementedError  # pragma: no cover - sinks override

    # --- reads ------------------------------------------------------------------------------

    def task_counts(self, task_ids: Sequence[str]) -> dict[str, int]:
        # count(loop_key): a refused request keeps its task_id but loses its loop_key. Both
        # read only the (task_id, loop_key) index.
        marks = ", ".join("?" for _ in task_ids)
        return {
            task_id: int(count)
            for task_id, count in self._query(
                "SELECT task_id, count(loop_key) FROM requests "
                f"WHERE task_id IS NOT NULL AND task_id IN ({marks}) GROUP BY task_id",
                task_ids,
            )
        }

    def task_key_counts(
        self, task_ids: Sequence[str], loop_keys: Sequence[int]
    ) -> dict[tuple[str, int], tuple[int, int]]:
        tasks = ", ".join("?" for _ in task_ids)
        keys = ", ".join("?" for _ in loop_keys)
        return {
            (task_id, int(key)): (int(count), int(latest))
            for task_id, key, count, latest in self._query(
                "SELECT task_id, loop_key, count(*), max(id) FROM requests "
                f"WHERE task_id IS NOT NULL AND task_id IN ({tasks}) AND loop_key IN ({keys}) "
                "GROUP BY task_id, loop_key",
                [*task_ids, *loop_keys],
            )
        }

    def recent_task_bodies(
        self, task_ids: Sequence[str], *, per_task: int
    ) -> list[tuple[str, int, str]]:
        # The (task_id, loop_key) index finds a task's rows (refused ones have no loop_key);
        # the window keeps the latest few per task, so the read is bounded by tasks, not rows.
        marks = ", ".join("?" for _ in task_ids)
        return [
            (task_id, int(rid), body)
            for task_id, rid, body in self._query(
                "SELECT task_id, id, body FROM (SELECT r.task_id, r.id, b.body, "
                "row_number() OVER (PARTITION BY r.task_id ORDER BY r.id DESC) AS n "
                "FROM requests r JOIN request_bodies b ON b.id = r.id "
                f"WHERE r.task_id IS NOT NULL AND r.task_id IN ({marks}) "
                "AND r.loop_key IS NOT NULL) recent "
                "WHERE n <= ? ORDER BY task_id, id DESC",
                [*task_ids, per_task],
            )
        ]

    def unkeyed_task_bodies(self, task_ids: Sequence[str]) -> list[tuple[int, str | None]]:
        # loop_key = 0 (`costs.guards.UNKEYED`): counted, key not worked out yet; the
        # (task_id, loop_key) index finds them.
        marks = ", ".join("?" for _ in task_ids)
        return [
            (int(rid), body)
            for rid, body in self._query(
                "SELECT r.id, b.body FROM requests r LEFT JOIN request_bodies b ON b.id = r.id "
                f"WHERE r.task_id IS NOT NULL AND r.task_id IN ({marks}) AND r.loop_key = 0",
                task_ids,
            )
        ]

    def answers(self, provider: str, endpoint: str, body_hashes: Sequence[str]) -> list[Answer]:
        marks = ", ".join("?" for _ in body_hashes)
        found = self._query(
            "SELECT r.body_hash, r.id, r.response_id, r.finished_at, l.realtime_nusd, "
            "l.input_tokens, l.output_tokens FROM requests r "
            "JOIN responses p ON p.id = r.response_id "
            "LEFT JOIN ledger l ON l.response_id = r.response_id "
            f"WHERE r.state = 'succeeded' AND r.body_key IN ({marks}) "
            f"AND r.body_hash IN ({marks}) AND r.provider = ? AND r.endpoint = ? "
            "AND p.body IS NOT NULL ORDER BY r.finished_at DESC",
            [*(body_key(h) for h in body_hashes), *body_hashes, provider, endpoint],
        )
        return [
            (body_hash, rid, response_id, as_datetime(finished), realtime, tokens_in, tokens_out)
            for body_hash, rid, response_id, finished, realtime, tokens_in, tokens_out in found
        ]

    def spent_nusd(self, tag: str, value: str, *, since: datetime) -> int:
        _check_tag(tag)
        ((committed,),) = self._query(
            f"SELECT coalesce(sum(actual_nusd), 0) FROM ledger WHERE {tag} = ? AND at >= ?",
            [value, self.time_value(since)],
        )
        return int(committed)

    def unfinished_estimates(self, tag: str, value: str) -> list[tuple[int, str, str, str | None]]:
        _check_tag(tag)
        return [
            (tokens, provider, model, body)
            for tokens, provider, model, body in self._query(
                "SELECT r.est_input_tokens, r.provider, r.model, b.body FROM requests r "
                "LEFT JOIN request_bodies b ON b.id = r.id "
                f"WHERE r.finished_at IS NULL AND r.{tag} = ?",
                [value],
            )
        ]

    # --- writes -----------------------------------------------------------------------------

    def set_original_models(self, rows: Sequence[tuple[str, int]]) -> None:
        if rows:
            self._execute_many("UPDATE requests SET original_model = ? WHERE id = ?", rows)

    def set_loop_keys(self, rows: Sequence[tuple[int, int]]) -> None:
        if rows:
            # `AND loop_key = 0`: a request refused meanwhile keeps its NULL
            self._execute_many(
                "UPDATE requests SET loop_key = ? WHERE id = ? AND loop_key = 0", rows
            )

    def reject(self, rows: Sequence[tuple[int, str, str, str]], *, at: datetime) -> None:
        if not rows:
            return
        _check_moves([src for _, src, _, _ in rows], RequestState.REJECTED)
        now = self.time_value(at)
        self._execute_many(
            _REJECT_SQL,
            [
                (RequestState.REJECTED.value, reason, guard, now, now, rid, src)
                for rid, src, guard, reason in rows
            ],
        )

    def deduplicate(self, rows: Sequence[tuple[int, str, int]], *, at: datetime) -> None:
        if not rows:
            return
        _check_moves([src for _, src, _ in rows], RequestState.DEDUPLICATED)
        now = self.time_value(at)
        self._execute_many(
            _DEDUPLICATE_SQL,
            [
                (RequestState.DEDUPLICATED.value, response_id, now, now, rid, src)
                for rid, src, response_id in rows
            ],
        )

    def hold(self, rows: Sequence[tuple[int, datetime]]) -> None:
        if rows:
            self._execute_many(
                "UPDATE requests SET not_before = ? WHERE id = ?",
                [(self.time_value(until), rid) for rid, until in rows],
            )

    def record_events(
        self, rows: Sequence[tuple[str, str, str, int, str | None, str]], *, at: datetime
    ) -> None:
        if rows:
            now = self.time_value(at)
            self._execute_many(_EVENT_SQL, [(now, *row) for row in rows])

    def record_ledger(self, entries: Sequence[tuple[Any, ...]]) -> None:
        if not entries:
            return
        # Only a dedupe hit gets here; store.ledger loads SQLAlchemy, so it waits until then.
        from batchwise.store.ledger import COLUMNS

        marks = ", ".join("?" for _ in COLUMNS)
        self._execute_many(f"INSERT INTO ledger ({', '.join(COLUMNS)}) VALUES ({marks})", entries)


def _check_tag(tag: str) -> None:
    """The tag is a column name in the SQL text, so only the known tag columns pass."""
    if tag not in BUDGET_TAGS:
        raise ValueError(f"not a budget tag: {tag!r}")
