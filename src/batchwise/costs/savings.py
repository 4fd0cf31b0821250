"""The savings ledger, read side: what the work cost, what realtime would have cost, by any tag.

Every figure is one set-based `GROUP BY` over `ledger` (the queries are `store.reports`'), so a
report is as cheap for a million entries as for ten, and its total is the plain sum of the rows
(a test holds it to that). The
saving is computed here as realtime-equivalent minus actual and never stored. Unpriced entries
(a model with no known price) are counted apart: their cost is unknown, which is not $0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING, Any

from batchwise.costs.pricing import format_usd
from batchwise.store import reports as store_reports
from batchwise.store.reports import GROUP_KEYS as GROUP_KEYS  # the keys a report groups by
from batchwise.text import visible

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from batchwise.store.engine import Store

_PCT = Decimal("0.01")


def usd(nusd: int | None) -> str | None:
    """Nano-USD as an exact decimal string; None (unpriced) stays None, never "0"."""
    return None if nusd is None else format_usd(nusd)


def saving_pct(actual_nusd: int | None, realtime_nusd: int | None) -> Decimal | None:
    """Saving as a percentage of the realtime-equivalent cost, to 0.01; None when that is 0."""
    if actual_nusd is None or not realtime_nusd:
        return None
    return (Decimal(100 * (realtime_nusd - actual_nusd)) / realtime_nusd).quantize(
        _PCT, rounding=ROUND_HALF_EVEN
    )


@dataclass(frozen=True, slots=True)
class Totals:
    """Sums over a set of ledger entries; money over priced entries only."""

    requests: int
    entries: int
    unpriced_entries: int
    input_tokens: int
    output_tokens: int
    #: sums over the priced entries only
    priced_actual_nusd: int
    priced_realtime_nusd: int

    @property
    def priced(self) -> bool:
        """False when every entry is unpriced: then the cost is unknown, not zero."""
        return self.entries == 0 or self.unpriced_entries < self.entries

    @property
    def actual_nusd(self) -> int | None:
        return self.priced_actual_nusd if self.priced else None

    @property
    def realtime_nusd(self) -> int | None:
        return self.priced_realtime_nusd if self.priced else None

    @property
    def saving_nusd(self) -> int | None:
        return self.priced_realtime_nusd - self.priced_actual_nusd if self.priced else None

    @property
    def saving_pct(self) -> Decimal | None:
        return saving_pct(self.actual_nusd, self.realtime_nusd)

    def as_dict(self) -> dict[str, Any]:
        pct = self.saving_pct
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "actual_cost_usd": usd(self.actual_nusd),
            "realtime_cost_usd": usd(self.realtime_nusd),
            "saving_usd": usd(self.saving_nusd),
            "saving_pct": None if pct is None else str(pct),
            "entries": self.entries,
            "unpriced_entries": self.unpriced_entries,
        }


@dataclass(frozen=True, slots=True)
class Group:
    """One row of a grouped report: its key values (None for an untagged entry) and sums."""

    keys: dict[str, str | None]
    totals: Totals

    def as_dict(self) -> dict[str, Any]:
        return {**self.keys, **self.totals.as_dict()}


@dataclass(frozen=True, slots=True)
class SavingsReport:
    """The ledger between `since` (inclusive) and `until` (exclusive), grouped by `by`."""

    by: tuple[str, ...]
    since: datetime | None
    until: datetime | None
    total: Totals
    groups: list[Group]

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total.as_dict(), "groups": [g.as_dict() for g in self.groups]}


def _totals(row: Any) -> Totals:
    # PostgreSQL sums bigints as numeric (Decimal); the figures are integers either way.
    return Totals(
        requests=int(row.requests),
        entries=int(row.entries),
        unpriced_entries=int(row.unpriced_entries),
        input_tokens=int(row.input_tokens),
        output_tokens=int(row.output_tokens),
        priced_actual_nusd=int(row.actual_nusd),
        priced_realtime_nusd=int(row.realtime_nusd),
    )


def _sort_key(keys: dict[str, str | None]) -> tuple[tuple[bool, str], ...]:
    return tuple((v is None, v or "") for v in keys.values())


def totals(
    conn: Connection, *, since: datetime | None = None, until: datetime | None = None
) -> Totals:
    """The sums over every entry in the window."""
    return _totals(store_reports.ledger_totals(conn, since=since, until=until))


def grouped(
    conn: Connection,
    by: Sequence[str],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> tuple[Totals, list[Group]]:
    """The total and one `Group` per distinct combination of `by`, sorted by key.

    Both come from one statement (`UNION ALL`), so they describe the same entries even under
    PostgreSQL's read committed, where two statements may see different commits.
    """
    if not by:
        return totals(conn, since=since, until=until), []
    total, rows = store_reports.ledger_grouped(conn, by, since=since, until=until)
    found = [Group({k: row._mapping[k] for k in by}, _totals(row)) for row in rows]
    return _totals(total), sorted(found, key=lambda g: _sort_key(g.keys))


def savings_report(
    store: Store,
    *,
    by: Iterable[str] = ("kind",),
    since: datetime | None = None,
    until: datetime | None = None,
) -> SavingsReport:
    """What the ledger says between `since` and `until`, grouped by `by` (any of GROUP_KEYS)."""
    keys = tuple(dict.fromkeys(by))
    for key in keys:
        store_reports.check_group_key(key)  # before touching the database
    with store.read() as conn:
        total, groups = grouped(conn, keys, since=since, until=until)
    return SavingsReport(keys, since, until, total, groups)


# --- cost per task -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskCost:
    """Everything a task's requests cost, retries, rescues and failures included."""

    task_id: str
    requests: int
    succeeded: int
    failed: int
    #: requests not yet in a terminal state
    live: int
    totals: Totals
    #: the use case of its requests (the first by name if they differ)
    use_case: str | None = None
    #: when its last request finished (None while one is live)
    finished_at: datetime | None = None

    @property
    def complete(self) -> bool:
        return self.live == 0

    def as_dict(self) -> dict[str, Any]:
        money = self.totals.as_dict()
        return {
            "task_id": self.task_id,
            "use_case": self.use_case,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "requests": self.requests,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "complete": self.complete,
            **{k: money[k] for k in ("actual_cost_usd", "realtime_cost_usd", "saving_usd")},
            "saving_pct": money["saving_pct"],
            "unpriced_entries": self.totals.unpriced_entries,
        }


_EMPTY = Totals(0, 0, 0, 0, 0, 0, 0)


def task_costs(store: Store) -> list[TaskCost]:
    """Per `task_id`: request counts by outcome (from `requests`) and costs (from `ledger`)."""
    with store.read() as conn:
        # States first: a request's last entry commits with its terminal state, so a task
        # read as complete here already has all its entries when the ledger is read next.
        states = store_reports.task_request_counts(conn)
        money = {row.task_id: _totals(row) for row in store_reports.task_ledger_totals(conn)}
    tasks = [
        TaskCost(
            row.task_id,
            int(row.requests),
            int(row.ok),
            int(row.failed),
            int(row.live),
            money.pop(row.task_id, _EMPTY),
            row.use_case,
            row.finished_at if int(row.live) == 0 else None,
        )
        for row in states
    ]
    # Entries whose request rows are gone still cost money; show them, never drop them.
    tasks += [TaskCost(task, 0, 0, 0, 0, m) for task, m in money.items()]
    return sorted(tasks, key=lambda t: t.task_id)


def task_summary(tasks: Sequence[TaskCost]) -> dict[str, Any]:
    """What completing a task costs: totals and averages over the complete tasks whose every
    entry is priced. A task with an unpriced entry has an unknown cost, so it is counted in
    `unpriced_complete` rather than averaged in as if it were cheap."""
    done = [t for t in tasks if t.complete]
    priced = [t for t in done if t.totals.unpriced_entries == 0]
    actual = sum(t.totals.priced_actual_nusd for t in priced)
    realtime = sum(t.totals.priced_realtime_nusd for t in priced)

    def average(total: int) -> str | None:
        return format_usd(round(Decimal(total) / len(priced))) if priced else None

    pct = saving_pct(actual, realtime)
    return {
        "tasks": len(tasks),
        "complete": len(done),
        "unpriced_complete": len(done) - len(priced),
        "actual_cost_usd": format_usd(actual),
        "realtime_cost_usd": format_usd(realtime),
        "saving_usd": format_usd(realtime - actual),
        "saving_pct": None if pct is None else str(pct),
        "avg_actual_cost_usd": average(actual),
        "avg_realtime_cost_usd": average(realtime),
    }


# --- rendering -----------------------------------------------------------------------------

#: rich assumes 80 columns when not writing to a terminal, too narrow for these tables
PIPE_WIDTH = 160


def wide_console() -> Any:
    """A rich console: the terminal's width, or PIPE_WIDTH when output goes to a pipe or file."""
    from rich.console import Console

    out = Console()
    return out if out.is_terminal else Console(width=max(out.width, PIPE_WIDTH))


def money(nusd: int | None) -> str:
    """Nano-USD for people: cents from $1 up, else three significant digits ($0.00435); the
    JSON keeps all nine decimals."""
    if nusd is None:
        return "unpriced"
    amount = abs(Decimal(nusd).scaleb(-9))
    places = 2 if amount >= 1 or amount == 0 else min(9, 2 - amount.adjusted())
    shown = amount.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN)
    if shown >= 1 and places > 2:  # 0.999996 rounds up to a whole dollar: show cents
        shown = amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)
    return f"{'-' if nusd < 0 else ''}${shown:,f}"


def _pct(value: Decimal | None) -> str:
    return "—" if value is None else f"{value}%"


def rich_table(title: str, keys: Sequence[str], numbers: Sequence[str]) -> Any:
    """A compact table: key columns fold long values, number columns never wrap."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for key in keys:
        table.add_column(key, overflow="fold", min_width=8)
    for name in numbers:
        table.add_column(name, justify="right", no_wrap=True)
    return table


def _row(totals: Totals, unpriced: bool, tokens: bool) -> list[str]:
    cells = [f"{totals.requests:,}"]
    if tokens:
        cells += [f"{totals.input_tokens:,}", f"{totals.output_tokens:,}"]
    cells += [
        money(totals.actual_nusd),
        money(totals.realtime_nusd),
        money(totals.saving_nusd),
        _pct(totals.saving_pct),
    ]
    if unpriced:
        cells.append(f"{totals.unpriced_entries:,}" if totals.unpriced_entries else "")
    return cells


def savings_table(report: SavingsReport, *, title: str | None = None, tokens: bool = True) -> Any:
    """A rich table: one row per group, then the total; unpriced entries in their own column
    (shown only when there are any)."""
    from rich.markup import escape

    by, total = report.by, report.total
    unpriced = total.unpriced_entries > 0
    numbers = ["requests", *(["input tok", "output tok"] * tokens), "actual", "realtime"]
    numbers += ["saving", "saving %"]
    table = rich_table(
        title or ("savings by " + ", ".join(by) if by else "savings"),
        by,
        numbers + ["unpriced"] * unpriced,
    )
    for group in report.groups:
        keys = (escape(visible(str(v))) if v is not None else "—" for v in group.keys.values())
        table.add_row(*keys, *_row(group.totals, unpriced, tokens))
    table.add_section()
    labels = (["total"] + [""] * len(by))[: len(by)]
    table.add_row(*labels, *_row(total, unpriced, tokens), style="bold")
    table.caption = "realtime: the same usage at realtime prices; saving = realtime − actual."
    if unpriced:
        n = total.unpriced_entries
        table.caption += escape(
            f" {n:,} unpriced {'entry is' if n == 1 else 'entries are'} left out of the costs "
            "(no price for the model; tokens are counted): add a [prices] override."
        )
    if not tokens:
        table.caption += " Token columns hidden for width: see --json or --csv."
    return table


def print_savings(console: Any, report: SavingsReport, *, title: str | None = None) -> None:
    """Print the table, dropping the token columns rather than truncating money to fit."""
    from rich.measure import Measurement

    table = savings_table(report, title=title)
    if (
        Measurement.get(console, console.options.update_width(10_000), table).maximum
        > console.width
    ):
        table = savings_table(report, title=title, tokens=False)
    console.print(table)


def tasks_table(tasks: Sequence[TaskCost], summary: dict[str, Any]) -> Any:
    """A rich table of cost per task, with the average cost of completing one below it."""
    from rich.markup import escape

    table = rich_table(
        f"{summary['complete']:,} of {summary['tasks']:,} task(s) complete",
        ["task"],
        ["requests", "succeeded", "failed", "actual", "realtime", "saving", "complete"],
    )
    for task in tasks:
        t = task.totals
        table.add_row(
            escape(visible(task.task_id)),
            f"{task.requests:,}",
            f"{task.succeeded:,}",
            f"{task.failed:,}",
            money(t.actual_nusd),
            money(t.realtime_nusd),
            money(t.saving_nusd),
            "yes" if task.complete else "no",
        )
    if summary["avg_actual_cost_usd"] is not None:
        average, realtime = (
            money(int(Decimal(summary[k]).scaleb(9)))
            for k in ("avg_actual_cost_usd", "avg_realtime_cost_usd")
        )
        table.caption = (
            f"completing a task costs {average} on average ({realtime} at realtime prices)"
        )
    if summary["unpriced_complete"]:
        table.caption = (table.caption or "") + (
            f"; {summary['unpriced_complete']:,} complete task(s) with unpriced entries "
            "are left out of the average"
        )
    return table


def print_summary(
    store: Store, by: Sequence[str] = ("lane", "use_case"), *, console: Any = None
) -> None:
    """Print the savings (actual vs realtime-equivalent cost, saving %) once per key in `by`;
    the demo ends with this."""
    out = console if console is not None else wide_console()
    for key in by:
        print_savings(out, savings_report(store, by=(key,)), title=f"savings by {key}")
