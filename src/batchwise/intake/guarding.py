"""The cost guards at work on one submission: shaping each request, then, per chunk, the
runaway-loop limits, dedupe and budgets.

Requests a guard refuses are still stored, as `rejected` with the reason (docs/architecture.md,
"Request life"), and every refusal or change is recorded as an event, so nothing disappears
silently. The checks read the store through the intake's sink, in set-based queries per chunk
(the SQL is the sink's: `store.guard_state`); every refusal or dedupe hit moves its request
through a sink method that checks the move against `states.TRANSITIONS`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from batchwise.config import Settings
from batchwise.costs.guards import (
    UNKEYED,
    Guards,
    Policy,
    loop_key,
    loop_refusal,
    near_repeat_refusal,
    period_starts,
    shape,
)
from batchwise.costs.repeats import RECENT_PER_TASK, Fingerprint, fingerprint, near_repeats
from batchwise.intake.lines import Invalid, infer_provider
from batchwise.states import RequestState
from batchwise.store.intake_rows import ROW

if TYPE_CHECKING:
    from batchwise.store.intake_rows import Answer, RequestSink

log = logging.getLogger(__name__)

_NUSD_PER_USD = 1_000_000_000
#: output tokens assumed for a budget estimate when a request sets no cap
_DEFAULT_OUTPUT_ESTIMATE = 512


@dataclass
class Outcome:
    """What the guards decided about one stored row."""

    #: the guard that refused it and why
    refused: tuple[str, str] | None = None
    #: the stored answer to reuse (see `store.intake_rows.Answer`)
    dedupe_of: Answer | None = None
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
        """The per-task limits, counted in the store per chunk (`task_counts`, from an index)
        and in this chunk as it goes: nothing is kept from one chunk to the next. Exact
        repeats count over the task's whole history; near repeats over its latest
        `RECENT_PER_TASK` requests, whose bodies are read once per chunk (`costs.repeats`).

        Only a task that may pass a limit on repeats is "watched": a task can repeat at most
        as often as it has requests. Rows are stored `UNKEYED`, and a watched task's requests
        get their loop keys here, stored ones and this chunk's alike (in place in `rows`):
        most tasks never come near a repeat limit, and never pay for a key."""
        task_at, key_at, use_case, body_at = (
            ROW["task_id"],
            ROW["loop_key"],
            ROW["use_case"],
            ROW["body"],
        )
        policy_of, refused = self.guards.policy, self._refused if self.outcomes else None
        checked = [
            (position, row, policy_of(row[use_case], row[use_case + 1], row[use_case + 2]))
            for position, row in enumerate(rows)
            if row[task_at] is not None and (refused is None or not refused(position))
        ]
        if not checked:
            return
        requests = self.sink.task_counts(list({row[task_at] for _, row, _ in checked}))
        totals = dict(requests)
        strictest: dict[str, int] = {}
        for _, row, policy in checked:
            task_id = row[task_at]
            totals[task_id] = totals.get(task_id, 0) + 1
            limit = min(policy.max_identical_per_task, policy.max_similar_per_task)
            if strictest.get(task_id, limit) >= limit:
                strictest[task_id] = limit
        watched = {t for t, total in totals.items() if total > strictest[t]}
        identical: dict[tuple[str, int], tuple[int, int]] = {}
        recent: dict[str, list[tuple[int, Fingerprint]]] = defaultdict(list)
        if watched:
            checked = self._key_watched(rows, checked, watched)
            keys = list({row[key_at] for _, row, _ in checked if row[task_at] in watched})
            identical = self.sink.task_key_counts(list(watched), keys)
            for task_id, rid, body in self.sink.recent_task_bodies(
                list(watched), per_task=RECENT_PER_TASK
            ):
                recent[task_id].append((rid, fingerprint(body)))
        for position, row, policy in checked:
            task_id = row[task_at]
            count = requests.get(task_id, 0)
            if task_id not in watched:  # only the count limit can apply
                if count < policy.max_requests_per_task:
                    requests[task_id] = count + 1
                else:
                    reason = loop_refusal(policy, task_id, count, 0)
                    self._outcome(position).refused = ("runaway_loop", str(reason))
                continue
            pair = (task_id, row[key_at])
            same, latest = identical.get(pair, (0, None))
            reason = loop_refusal(policy, task_id, count, same, earlier=latest)
            mark: Fingerprint | None = None
            if reason is None:
                mark = fingerprint(row[body_at])
                normalised, similar = near_repeats(
                    mark, recent[task_id], threshold=policy.similarity_threshold
                )
                reason = near_repeat_refusal(policy, task_id, normalised, similar)
            if reason is not None:
                self._outcome(position).refused = ("runaway_loop", reason)
                continue
            requests[task_id] = count + 1
            if mark is not None:
                identical[pair] = (same + 1, row[ROW["id"]])
                window = recent[task_id]
                window.insert(0, (row[ROW["id"]], mark))
                del window[RECENT_PER_TASK:]

    def _key_watched(
        self,
        rows: list[tuple[Any, ...]],
        checked: list[tuple[int, tuple[Any, ...], Policy]],
        watched: set[str],
    ) -> list[tuple[int, tuple[Any, ...], Policy]]:
        """Work out the loop keys of the watched tasks' requests: the stored ones still
        `UNKEYED` (in the store), and this chunk's (in `rows`, before they are inserted);
        returns `checked` with the keyed rows."""
        self.sink.set_loop_keys(
            [
                (loop_key(body.encode()), rid)
                for rid, body in self.sink.unkeyed_task_bodies(list(watched))
                if body is not None  # purged: it still counts, but repeats nothing
            ]
        )
        task_at, key_at, body_at = ROW["task_id"], ROW["loop_key"], ROW["body"]
        keyed = []
        for position, row, policy in checked:
            if row[task_at] in watched and row[key_at] == UNKEYED:
                row = (*row[:key_at], loop_key(row[body_at].encode()), *row[key_at + 1 :])
                rows[position] = row
            keyed.append((position, row, policy))
        return keyed

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
            best: dict[str, Answer] = {}
            for answer in self.sink.answers(provider, endpoint, list(by_hash)):
                best.setdefault(answer[0], answer)  # newest first
            for body_hash, positions in by_hash.items():
                found = best.get(body_hash)
                if found is None:
                    continue
                for position in positions:
                    if found[3] >= self.now - timedelta(seconds=windows[position]):
                        self._outcome(position).dedupe_of = found

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
        # a call now (realtime or flex) cannot wait for the next period: it is refused
        called_now = row[ROW["lane"]] != "deferred"
        if called_now or policy.budget_policy == "refuse":
            self._outcome(position).refused = ("budget", f"over {figures}")
        else:
            self._outcome(position).hold_until = until
            self._outcome(position).changes += (f"held until {until.isoformat()}: over {figures}",)

    def _spend(self, kind: str, name: str, period: str, start: datetime) -> int:
        key = (kind, name, period)
        if key not in self._spent:
            committed = self.sink.spent_nusd(kind, name, since=start)
            live = self.sink.unfinished_estimates(kind, name)
            self._spent[key] = committed + sum(
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
            config = parsed.get("generationConfig")  # a Gemini body's cap
            if isinstance(config, dict) and isinstance(config.get("maxOutputTokens"), int):
                output = config["maxOutputTokens"]
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

    def take_outcomes(self) -> dict[int, Outcome]:
        """The reviewed chunk's outcomes, handed over for `apply` once it is stored; the
        next chunk's shaping fills a fresh dict meanwhile."""
        outcomes, self.outcomes = self.outcomes, {}
        return outcomes

    def apply(
        self, rows: list[tuple[Any, ...]], stored: set[int], outcomes: dict[int, Outcome]
    ) -> dict[int, tuple[str, str | None]]:
        """Write a chunk's decisions (`outcomes`, from `take_outcomes`) for the rows that were
        stored; returns, by position, the state and refusal reason of each row a guard
        finished."""
        finished: dict[int, tuple[str, str | None]] = {}
        rejected: list[tuple[int, str, str, str]] = []
        deduped: list[tuple[int, str, int]] = []
        held: list[tuple[int, datetime]] = []
        routed: list[tuple[str, int]] = []
        events: list[tuple[str, str, str, int, str | None, str]] = []
        for position, outcome in sorted(outcomes.items()):
            if position not in stored:
                continue
            row = rows[position]
            rid, state, task_id = row[ROW["id"]], row[ROW["state"]], row[ROW["task_id"]]
            owner = self.policy(row[ROW["use_case"] : ROW["task_id"]]).owner
            owned = orjson.dumps({"owner": owner}).decode() if owner else "{}"
            if outcome.original_model:
                routed.append((outcome.original_model, rid))
            if outcome.refused:
                guard, reason = outcome.refused
                rejected.append((rid, state, guard, reason))
                finished[position] = (RequestState.REJECTED.value, reason)
                message = f"request {rid} refused by {guard}: {reason}"
                data = orjson.dumps(
                    {"guard": guard, **({"owner": owner} if owner else {})}
                ).decode()
                events.append(("guard", "alert", message, rid, task_id, data))
            elif outcome.dedupe_of:
                _, source_id, response_id, _, realtime, tokens_in, tokens_out = outcome.dedupe_of
                deduped.append((rid, state, response_id))
                finished[position] = (RequestState.DEDUPLICATED.value, None)
                message = f"request {rid} answered from request {source_id} at no cost"
                events.append(("dedupe", "info", message, rid, task_id, owned))
                self._dedupe_ledger.append((response_id, row, realtime, tokens_in, tokens_out))
            elif outcome.hold_until is not None:
                held.append((rid, outcome.hold_until))
            for change in outcome.changes:
                events.append(("guard", "info", f"request {rid}: {change}", rid, task_id, owned))
        self.sink.set_original_models(routed)
        self.sink.reject(rejected, at=self.now)
        if deduped:
            self.sink.deduplicate(deduped, at=self.now)
            self._write_dedupe_ledger()
        self.sink.hold(held)
        self.sink.record_events(events, at=self.now)
        return finished

    def _write_dedupe_ledger(self) -> None:
        """Each dedupe hit avoids what the original answer would cost in realtime."""
        from batchwise.costs import ledger

        now = self.sink.time_value(self.now)
        entries = []
        for response_id, row, realtime, tokens_in, tokens_out in self._dedupe_ledger:
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
        self.sink.record_ledger(entries)
        self._dedupe_ledger.clear()

    def _outcome(self, position: int) -> Outcome:
        return self.outcomes.setdefault(position, Outcome())

    def _refused(self, position: int) -> bool:
        outcome = self.outcomes.get(position)
        return outcome is not None and outcome.refused is not None
