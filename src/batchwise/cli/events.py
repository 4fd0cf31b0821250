"""`batchwise events`: what batchwise wanted a person to know, newest first.

The `events` table holds rescues, missed deadlines, guard refusals, failed jobs and batches,
anomaly alerts and the like. `batchwise.store.events.list_events` is the read side (usable
without click); the command parses, calls it, prints a rich table or JSON. `events ack ID`
acknowledges one (`store.events.ack_event`): a triggered safeguard is handled, not forgotten.
Heavy modules are imported inside the commands so that loading the CLI stays fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from batchwise.cli.context import Context
    from batchwise.store.events import EventView

__all__ = ["events"]

_SEVERITY_STYLE = {"alert": "bold red", "warning": "yellow"}


def _table(rows: Sequence[EventView], *, more: bool) -> Any:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from batchwise.text import visible

    caption = "older events not shown: raise --limit or narrow with --since" if more else None
    table = Table(
        title="events, newest first", title_justify="left", box=box.SIMPLE_HEAD, caption=caption
    )
    table.add_column("id", no_wrap=True, justify="right")
    table.add_column("at (UTC)", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("severity", no_wrap=True)
    table.add_column("message", overflow="fold", ratio=1)
    for name in ("request", "batch", "task", "owner", "acked"):
        table.add_column(name, overflow="fold")
    for row in rows:
        # Text cells: a message holding "[…]" must print as written, not as rich markup
        table.add_row(
            Text(str(row.id)),
            Text(f"{row.at:%Y-%m-%d %H:%M:%S}"),
            Text(visible(row.kind)),
            Text(row.severity, style=_SEVERITY_STYLE.get(row.severity, "")),
            Text(visible(row.message, keep_lines=True)),
            Text("" if row.request_id is None else str(row.request_id)),
            Text("" if row.batch_id is None else str(row.batch_id)),
            Text(visible(row.task_id or "")),
            Text(visible(row.owner or "")),
            Text(_acked(row)),
        )
    return table


def _acked(row: EventView) -> str:
    from batchwise.text import visible

    if row.acknowledged_at is None:
        return "no"
    note = f": {row.ack_note}" if row.ack_note else ""
    return visible(f"{row.acknowledged_at:%Y-%m-%d %H:%M} by {row.acknowledged_by}{note}")


@click.group(invoke_without_command=True)
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    metavar="K",
    help="Only events of this kind (repeat, or comma-separate), e.g. anomaly, rescue, "
    "deadline_missed, batch_failed, job_failed.",
)
@click.option(
    "--since",
    metavar="T",
    help="Events at or after T: an ISO date or datetime (UTC unless an offset is given), "
    "or a duration ago like 7d.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 1_000_000_000),
    default=50,
    show_default=True,
    help="Show at most N events.",
)
@click.option("--owner", metavar="NAME", help="Only events whose guard or alert names this owner.")
@click.option("--unacked", is_flag=True, help="Only events nobody has acknowledged yet.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of event objects.")
@click.pass_context
def events(
    ctx: click.Context,
    kinds: tuple[str, ...],
    since: str | None,
    limit: int,
    owner: str | None,
    unacked: bool,
    as_json: bool,
) -> None:
    """Guard events and alerts (rescues, missed deadlines, refusals, anomalies), newest first;
    `events ack ID --note TEXT` acknowledges one."""
    if ctx.invoked_subcommand is not None:
        return
    import orjson

    from batchwise.cli.context import open_client
    from batchwise.cli.reports import parse_time_bound
    from batchwise.clock import system_clock
    from batchwise.costs.savings import wide_console
    from batchwise.store.events import list_events

    wanted = tuple(dict.fromkeys(k.strip() for v in kinds for k in v.split(",") if k.strip()))
    start = None
    if since is not None:
        try:
            start = parse_time_bound(since, now=system_clock())
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--since") from exc
    with open_client(ctx.obj) as client:
        # one more than asked, to tell the reader whether older events were left out
        rows = list_events(
            client.store, kinds=wanted, since=start, owner=owner, unacked=unacked, limit=limit + 1
        )
    more, rows = len(rows) > limit, rows[:limit]
    if as_json:
        click.echo(orjson.dumps([row.as_dict() for row in rows]).decode())
    elif not rows:
        click.echo("no events" + (" match" if wanted or start or owner or unacked else " yet"))
    else:
        wide_console().print(_table(rows, more=more))


@events.command("ack")
@click.argument("event_id", metavar="ID", type=click.IntRange(1))
@click.option("--note", required=True, help="What was done about it, e.g. a ticket or a fix.")
@click.option(
    "--by",
    metavar="NAME",
    help="Who acknowledges it (default: the login name of whoever runs the command).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the acknowledged event as JSON.")
@click.pass_obj
def ack(obj: Context, event_id: int, note: str, by: str | None, as_json: bool) -> None:
    """Acknowledge event ID, once: who, when and a note are recorded; a second ack is refused
    and the first one stands."""
    import getpass

    import orjson

    from batchwise.cli.context import open_client
    from batchwise.clock import system_clock
    from batchwise.errors import AlreadyAcknowledged, NotFoundError
    from batchwise.store.events import ack_event

    if by is None:
        try:
            by = getpass.getuser()
        except (OSError, KeyError):
            by = "unknown"
    with open_client(obj) as client:
        try:
            event = ack_event(client.store, event_id, at=system_clock(), by=by, note=note)
        except (AlreadyAcknowledged, NotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(orjson.dumps(event.as_dict()).decode())
    else:
        click.echo(f"acknowledged event {event.id} ({event.kind}) as {by}: {note}")
