"""Human-readable output for the CLI: rich tables and panels.

Cells holding user or provider data (custom_ids, tags, errors, answers) are `Text`, never rich
markup, with control characters escaped (`batchwise.text.visible`): a tag cannot clear the
screen or restyle the table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from batchwise.reports.results import answer_text
from batchwise.text import visible

if TYPE_CHECKING:
    from batchwise.api import RequestView, SubmissionView

console = Console()


#: how the lanes are named for people: the deferred lane is the batch lane
LANE_LABELS = {"realtime": "realtime", "flex": "flex", "deferred": "deferred (batch)"}


def print_status(counts: dict[str, Any]) -> None:
    table = Table(title=f"{counts['total']} request(s)", title_justify="left")
    table.add_column("by lane")
    table.add_column("requests", justify="right")
    for lane, n in counts["by_lane"].items():
        table.add_row(Text(visible(LANE_LABELS.get(lane, str(lane)))), f"{n:,}")
    states = Table()
    states.add_column("by state")
    states.add_column("requests", justify="right")
    for state, n in counts["by_state"].items():
        states.add_row(Text(visible(str(state))), f"{n:,}")
    console.print(table)
    console.print(states)
    if counts.get("by_provider"):
        print_providers(counts["by_provider"], lanes=list(counts["by_lane"]))
    if counts.get("capacity"):
        print_capacity(counts["capacity"])


def print_providers(by_provider: dict[str, dict[str, Any]], *, lanes: list[str]) -> None:
    """Each provider (and the API it speaks) with its requests in each lane."""
    table = Table()
    table.add_column("by provider")
    table.add_column("api")
    for lane in lanes:
        table.add_column(LANE_LABELS.get(lane, lane), justify="right")
    table.add_column("total", justify="right")
    for name, figures in by_provider.items():
        table.add_row(
            Text(visible(name)),
            Text(visible(str(figures.get("api", name)))),
            *(f"{figures['by_lane'].get(lane, 0):,}" for lane in lanes),
            f"{figures['total']:,}",
        )
    console.print(table)


def print_capacity(rows: list[dict[str, Any]]) -> None:
    """Each model's tokens in open batches against its enqueued-token limit."""
    table = Table(title="capacity (enqueued tokens)", title_justify="left")
    for name in ("provider", "model", "open", "limit", "from", "waits until"):
        table.add_column(name, justify="right" if name in {"open", "limit"} else "left")
    for row in rows:
        limit = row["limit_tokens"]
        table.add_row(
            Text(visible(str(row["provider"]))),
            Text(visible(str(row["model"]))),
            f"{row['open_tokens']:,}",
            "—" if limit is None else f"{limit:,}",
            str(row["source"]),
            row["wait_until"] or "—",
        )
    console.print(table)


def print_request(view: RequestView) -> None:
    table = Table(show_header=False, title=f"request {view.id}", title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in view.as_dict().items():
        if key == "result":
            continue
        table.add_row(key, Text(visible(_text(value))))
    if view.result is not None:
        table.add_row("answer", Text(visible(answer_text(view.result), keep_lines=True)))
    console.print(table)


def _when(view: SubmissionView, finished: bool) -> str:
    moment = view.finished_at if finished else view.created_at
    return "—" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{state} {n:,}" for state, n in counts.items()) or "—"


def print_submissions(views: list[SubmissionView]) -> None:
    """The `batchwise submissions` table, newest first."""
    table = Table(title=f"{len(views)} submission(s), newest first", title_justify="left")
    for name, justify in (
        ("id", "right"), ("name", "left"), ("source", "left"), ("format", "left"),
        ("lines", "right"), ("by state", "left"), ("created", "left"), ("finished", "left"),
    ):  # fmt: skip
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for view in views:
        table.add_row(
            str(view.id), view.name or "—", view.source, view.format or "—", f"{view.total:,}",
            _counts(view.counts), _when(view, False), _when(view, True),
        )  # fmt: skip
    console.print(table)


def print_submission(view: SubmissionView) -> None:
    """One submission: `batchwise status --submission ID`."""
    table = Table(show_header=False, title=f"submission {view.id}", title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in (
        ("name", view.name), ("source", view.source), ("format", view.format),
        ("lines", f"{view.total:,}"), ("unfinished", f"{view.unfinished:,}"),
        ("by state", _counts(view.counts)), ("created", _when(view, False)),
        ("finished", _when(view, True)),
    ):  # fmt: skip
        table.add_row(key, _text(value))
    console.print(table)


def _text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "—"
    return str(value)
