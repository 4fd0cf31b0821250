"""Human-readable output for the CLI: rich tables and panels."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from batchwise.reports.results import answer_text

if TYPE_CHECKING:
    from batchwise.api import RequestView

console = Console()


def print_status(counts: dict[str, Any]) -> None:
    table = Table(title=f"{counts['total']} request(s)", title_justify="left")
    table.add_column("by lane")
    table.add_column("requests", justify="right")
    for lane, n in counts["by_lane"].items():
        table.add_row(lane, f"{n:,}")
    states = Table()
    states.add_column("by state")
    states.add_column("requests", justify="right")
    for state, n in counts["by_state"].items():
        states.add_row(state, f"{n:,}")
    console.print(table)
    console.print(states)


def print_request(view: RequestView) -> None:
    table = Table(show_header=False, title=f"request {view.id}", title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in view.as_dict().items():
        if key == "result":
            continue
        table.add_row(key, _text(value))
    if view.result is not None:
        table.add_row("answer", answer_text(view.result))
    console.print(table)


def _text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "—"
    return str(value)
