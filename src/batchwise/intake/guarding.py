"""The cost guards at work on one submission: shaping each request, then, per chunk, the
runaway-loop limits, dedupe and budgets.

Requests a guard refuses are still stored, as `rejected` with the reason (DESIGN.md's request
life), and every refusal or change is recorded as an event, so nothing disappears silently.
The checks read the store through the intake's sink, in set-based queries per chunk.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson

from batchwise.config import Settings
from batchwise.costs.guards import (
    Guards,
    Policy,
    TaskCount,
    check_task,
    loose_key,
    period_starts,
    shape,
)
from batchwise.intake.ingest import ROW, Invalid, RequestSink, body_key, infer_provider
from batchwise.states import RequestState
from batchwise.store.dbapi import as_datetime

log = logging.getLogger(__name__)

_NUSD_PER_USD = 1_000_000_000
#: output tokens assumed for a budget estimate when a request sets no cap
_DEFAULT_OUTPUT_ESTIMATE = 512


@dataclass
class Outcome:
    """What the guards decided about one stored row."""

    #: the guard that refused it and why
    refused: tuple[str, str] | None = None
    #: (request id, response id, realtime-equivalent nano-USD, tokens…) of the answer to reuse
    dedupe_of: tuple[Any, ...] | None = None
    #: hold until this time (a budget with the "wait" policy)
    hold_until: datetime | None = None
    original_model: str | None = None
    changes: tuple[str, ...] = ()


@dataclass
class Keeper:
    """The guards for one submission."""

    guards: Guards
    sink: RequestSink
    now: datetime
    settings: Settings
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    tasks: dict[str, TaskCount] = field(default_factory=dict)
    _spent: dict[tuple[str, str, str], int] = field(default_factory=dict)
    _dedupe_ledger: list[tuple[Any, ...]] = field(default_factory=list)
    _book: Any = None

    def policy(self, tagged: Sequence[Any]) -> Policy:
        return self.guards.policy(tagged[0], tagged[1], tagged[2])

    def shape(
        self,
        position: int,
        tagged: Sequence[Any],
        provider: str,
        endpoint: str,
        model: str,
        body: dict[str, Any],
    ) -> tuple[str, dict[str, Any]]:
        """Routing, output caps and context budget for the row about to take `position`."""
        policy = self.policy(tagged)
        if not policy.shapes:
            return model, body
        shaped = shape(policy, provider, endpoint, model, body)
        if shaped.model != model and (infer_provider(shaped.model) or provider) != provider:
            raise Invalid(
                f"routing rule sends {model} to {shaped.model}, a model of another "
                f"provider; route within {provider}",
                "model",
            )
        if shaped.changes or shaped.refusal:
            self.outcomes[position] = Outcome(
                refused=("context_budget", shaped.refusal) if shaped.refusal else None,
                original_model=model if shaped.model != model else None,
                changes=shaped.changes,
            )
        return shaped.model, shaped.body

    # --- per chunk, before the insert ------------------------------------------------------

    def review(self, rows: list[tuple[Any, ...]]) -> None:
        """Runaway loops, dedupe and budgets for a chunk; fills `self.outcomes`. Checks that no
        setting turns on cost nothing per row."""
        self._loops(rows)
        if self.guards.dedupe_anywhere:
            self._dedupe(rows)
        if self.guards.budgets_anywhere:
            self._budgets(rows)

    def _loops(self, rows: list[tuple[Any, ...]]) -> None:
        task_at = ROW["task_id"]
        tasks = {row[task_at] for row in rows if row[task_at] is not None}
        missing = [t for t in tasks if t not in self.tasks]
        if missing:
            for task_id in missing:
                self.tasks[task_id] = TaskCount()
            marks = ", ".join("?" for _ in missing)
            for task_id, body in self.sink.query(
                "SELECT r.task_id, b.body FROM requests r "
                f"LEFT JOIN request_bodies b ON b.id = r.id WHERE r.task_id IN ({marks})",
                missing,
            ):
                seen = self.tasks[task_id]
                seen.requests += 1
                if body is not None:
                    key = loose_key(body)
                    seen.bodies[key] = seen.bodies.get(key, 0) + 1
        for position, row in enumerate(rows):
            task_id = row[task_at]
            if task_id is None or self._refused(position):
                continue
            policy = self.policy(row[ROW["use_case"] : ROW["task_id"]])
            reason = check_task(policy, task_id, self.tasks[task_id], row[ROW["body"]])
            if reason is not None:
                self._outcome(position).refused = ("runaway_loop", reason)

    def _dedupe(self, rows: list[tuple[Any, ...]]) -> None:
        wanted: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        windows: dict[int, float] = {}
        for position, row in enumerate(rows):
            window = self.policy(row[ROW["use_case"] : ROW["task_id"]]).dedupe_window_s
            if window and not self._refused(position):
                wanted[(row[ROW["provider"]], row[ROW["endpoint"]])][row[ROW["body_hash"]]].append(
                    position
                )
                windows[position] = window
        for (provider, endpoint), by_hash in wanted.items():
            hashes = list(by_hash)
            marks = ", ".join("?" for _ in hashes)
            found = self.sink.query(
                "SELECT r.body_hash, r.id, r.response_id, r.finished_at, l.realtime_nusd, "
                "l.input_tokens, l.output_tokens FROM requests r "
                "JOIN responses p ON p.id = r.response_id "
                "LEFT JOIN ledger l ON l.response_id = r.response_id "
                f"WHERE r.state = 'succeeded' AND r.body_key IN ({marks}) "
                f"AND r.body_hash IN ({marks}) AND r.provider = ? AND r.endpoint = ? "
                "AND p.body IS NOT NULL ORDER BY r.finished_at DESC",
                [*(body_key(h) for h in hashes), *hashes, provider, endpoint],
            )
            best: dict[str, tuple[Any, ...]] = {}
            for found_row in found:
                best.setdefault(found_row[0], tuple(found_row[1:]))
            for body_hash, positions in by_hash.items():
                answer = best.get(body_hash)
                if answer is None:
                    continue
                for position in positions:
                    finished = as_datetime(answer[2])
                    if finished >= self.now - timedelta(seconds=windows[position]):
                        self._outcome(position).dedupe_of = answer

    def _budgets(self, rows: list[tuple[Any, ...]]) -> None:
        for position, row in enumerate(rows):
            policy = self.policy(row[ROW["use_case"] : ROW["task_id"]])
            if (
                not policy.budgeted
                or self._refused(position)
                or self.outcomes.get(position, Outcome()).dedupe_of
            ):
                continue
            estimate = self._estimate(row)
            day, tomorrow, month, next_month = period_starts(self.now)
            for kind, name in policy.budget_tags:
                for period, start, until, cap in (
                    ("daily", day, tomorrow, policy.daily_budget_usd),
                    ("monthly", month, next_month, policy.monthly_budget_usd),
                ):
                    if cap is None:
                        continue
                    spent = self._spend(kind, name, period, start)
                    if spent + estimate > cap * _NUSD_PER_USD:
                        self._over_budget(
                            position, row, policy, kind, name, period, cap, spent, estimate, until
                        )
                        break
                else:
                    continue
                break
            else:
                for kind, name in policy.budget_tags:
                    for period in ("daily", "monthly"):
                        key = (kind, name, period)
                        if key in self._spent:
                            self._spent[key] += estimate

    def _over_budget(
        self,
        position: int,
        row: tuple[Any, ...],
        policy: Policy,
        kind: str,
        name: str,
        period: str,
        cap: float,
        spent: int,
        estimate: int,
        until: datetime,
    ) -> None:
        figures = (
            f"the {period} budget of ${cap:g} for {kind} {name!r}: ${spent / 1e9:.4f} spent "
            f"or in flight, this request about ${estimate / 1e9:.4f}"
        )
        realtime = row[ROW["lane"]] == "realtime"
        if realtime or policy.budget_policy == "refuse":
            self._outcome(position).refused = ("budget", f"over {figures}")
        else:
            self._outcome(position).hold_until = until
            self._outcome(position).changes += (f"held until {until.isoformat()}: over {figures}",)

    def _spend(self, kind: str, name: str, period: str, start: datetime) -> int:
        key = (kind, name, period)
        if key not in self._spent:
            (committed,) = self.sink.query(
                f"SELECT coalesce(sum(actual_nusd), 0) FROM ledger WHERE {kind} = ? AND at >= ?",
                [name, self.sink.time_value(start)],
            )[0]
            live = self.sink.query(
                "SELECT r.est_input_tokens, r.provider, r.model, b.body FROM requests r "
                "LEFT JOIN request_bodies b ON b.id = r.id "
                f"WHERE r.finished_at IS NULL AND r.{kind} = ?",
                [name],
            )
            self._spent[key] = int(committed) + sum(
                self._estimate_values(tokens, provider, model, body)
                for tokens, provider, model, body in live
            )
        return self._spent[key]

    def _estimate(self, row: tuple[Any, ...]) -> int:
        return self._estimate_values(
            row[ROW["est_input_tokens"]], row[ROW["provider"]], row[ROW["model"]], row[ROW["body"]]
        )

    def _estimate_values(
        self, input_tokens: int, provider: str, model: str, body: str | None
    ) -> int:
        """A conservative realtime price for a request not yet answered, in nano-USD."""
        if self._book is None:
            from batchwise.costs.pricing import PriceBook

            self._book = PriceBook.from_settings(self.settings)  # overrides and discounts apply
        from batchwise.costs.pricing import TokenUsage

        output = _DEFAULT_OUTPUT_ESTIMATE
        if body:
            parsed = orjson.loads(body)
            output = next(
                (
                    parsed[k]
                    for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")
                    if isinstance(parsed.get(k), int)
                ),
                output,
            )
        price = self._book.price(
            provider,
            model,
            TokenUsage(input_tokens=input_tokens, output_tokens=output),
            batch=False,
            at=self.now,
        )
        return int(price.realtime_nusd or 0)

    # --- after the insert ------------------------------------------------------------------

    def apply(
        self, rows: list[tuple[Any, ...]], stored: set[int]
    ) -> dict[int, tuple[str, str | None]]:
        """Write the chunk's decisions for the rows that were stored; returns, by position,
        the state and refusal reason of each row a guard finished."""
        finished: dict[int, tuple[str, str | None]] = {}
        now = self.sink.time_value(self.now)
        rejected, deduped, held, routed, events = [], [], [], [], []
        for position, outcome in sorted(self.outcomes.items()):
            if position not in stored:
                continue
            row = rows[position]
            rid, state = row[ROW["id"]], row[ROW["state"]]
            if outcome.original_model:
                routed.append((outcome.original_model, rid))
            if outcome.refused:
                guard, reason = outcome.refused
                rejected.append(("rejected", reason, guard, now, now, rid, state))
                finished[position] = (RequestState.REJECTED.value, reason)
                events.append(
                    (
                        now,
                        "guard",
                        "alert",
                        f"request {rid} refused by {guard}: {reason}",
                        rid,
                        row[ROW["task_id"]],
                        orjson.dumps({"guard": guard}).decode(),
                    )
                )
            elif outcome.dedupe_of:
                source_id, response_id, _, realtime, tokens_in, tokens_out = outcome.dedupe_of
                deduped.append(("deduplicated", response_id, now, now, rid, state))
                finished[position] = (RequestState.DEDUPLICATED.value, None)
                events.append(
                    (
                        now,
                        "dedupe",
                        "info",
                        f"request {rid} answered from request {source_id} at no cost",
                        rid,
                        row[ROW["task_id"]],
                        "{}",
                    )
                )
                self._dedupe_ledger.append((response_id, now, row, realtime, tokens_in, tokens_out))
            else:
                if outcome.hold_until is not None:
                    held.append((self.sink.time_value(outcome.hold_until), rid))
            for change in outcome.changes:
                events.append(
                    (
                        now,
                        "guard",
                        "info",
                        f"request {rid}: {change}",
                        rid,
                        row[ROW["task_id"]],
                        "{}",
                    )
                )
        if routed:
            self.sink.execute_many("UPDATE requests SET original_model = ? WHERE id = ?", routed)
        if rejected:
            self.sink.execute_many(
                "UPDATE requests SET state = ?, error = ?, error_code = ?, finished_at = ?, "
                "updated_at = ? WHERE id = ? AND state = ?",
                rejected,
            )
        if deduped:
            self.sink.execute_many(
                "UPDATE requests SET state = ?, response_id = ?, finished_at = ?, updated_at = ? "
                "WHERE id = ? AND state = ?",
                deduped,
            )
            self._write_dedupe_ledger()
        if held:
            self.sink.execute_many("UPDATE requests SET not_before = ? WHERE id = ?", held)
        if events:
            self.sink.execute_many(
                "INSERT INTO events (at, kind, severity, message, request_id, task_id, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                events,
            )
        self.outcomes.clear()
        return finished

    def _write_dedupe_ledger(self) -> None:
        """Each dedupe hit avoids what the original answer would cost in realtime."""
        from batchwise.costs import ledger
        from batchwise.store import ledger as ledger_table

        entries = []
        for response_id, now, row, realtime, tokens_in, tokens_out in self._dedupe_ledger:
            request = {name: row[i] for name, i in ROW.items()}
            entries.append(
                ledger.dedupe_entry(
                    request,
                    stored_at=now,
                    source_response_id=response_id,
                    realtime_nusd=realtime,
                    input_tokens=tokens_in or 0,
                    output_tokens=tokens_out or 0,
                )
            )
        marks = ", ".join("?" for _ in ledger_table.COLUMNS)
        self.sink.execute_many(
            f"INSERT INTO ledger ({', '.join(ledger_table.COLUMNS)}) VALUES ({marks})", entries
        )
        self._dedupe_ledger.clear()

    def _outcome(self, position: int) -> Outcome:
        return self.outcomes.setdefault(position, Outcome())

    def _refused(self, position: int) -> bool:
        outcome = self.outcomes.get(position)
        return outcome is not None and outcome.refused is not None
