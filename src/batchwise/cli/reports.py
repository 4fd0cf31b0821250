"""The report commands: `savings`, `tasks`, `forecast`, `purge`, `metrics`.

Added to the `batchwise` group by `register(cli)`. Like the rest of the CLI they parse, call
the library, print; the library modules are imported inside the commands, so `batchwise
submit` does not pay for SQLAlchemy queries, rich tables or an HTTP server it never uses.
The group's `Context` (the global `--db`) arrives as the click context object.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from batchwise.cli.context import dumps, open_client

if TYPE_CHECKING:
    from batchwise.cli.context import Context
    from batchwise.costs.savings import SavingsReport
    from batchwise.store.engine import Store

_BY_HELP = (
    "Group by these, comma-separated: use_case, step, business_unit, model, provider, lane, "
    "kind (the cause: batch, realtime, flex, rescue, late_batch, retry, dedupe), day. "
    "Empty for the total only."
)
_TIME_HELP = "ISO date or datetime (UTC unless an offset is given), or a duration ago like 7d."
#: the largest volume `forecast` projects (a larger one is a typo)
MAX_VOLUME_PER_DAY = 10**12
TIME_BOUND_FORMS = (
    "an ISO date (2026-11-01), an ISO datetime (UTC if no offset) or a duration meaning "
    "that long ago (7d, 12h, 1d12h)"
)


def parse_time_bound(text: str, *, now: datetime) -> datetime:
    """A `--since`/`--until` value: an ISO date (midnight UTC) or datetime, or a duration
    meaning that long before `now`."""
    from batchwise.intake.tolerance import DurationTooLong, parse_duration

    value = text.strip()
    if value[:4].isdigit() and value[4:5] == "-":
        try:
            moment = datetime.fromisoformat(value)
            return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
        except ValueError as exc:
            raise ValueError(f"invalid time {text!r}: {exc}; expected {TIME_BOUND_FORMS}") from exc
        except OverflowError:  # an offset that takes it past year 1 or 9999
            raise ValueError(
                f"invalid time {text!r}: out of the calendar's range; expected {TIME_BOUND_FORMS}"
            ) from None
    try:
        return now - parse_duration(value)
    except DurationTooLong as exc:
        raise ValueError(str(exc).replace("duration", "time", 1)) from None
    except ValueError:
        raise ValueError(f"invalid time {text!r}: expected {TIME_BOUND_FORMS}") from None


@contextmanager
def _store(obj: Context) -> Iterator[Store]:
    with open_client(obj) as client:
        yield client.store


def _console() -> Any:
    from batchwise.costs.savings import wide_console

    return wide_console()


def _time_option(value: str | None, option: str, now: datetime) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time_bound(value, now=now)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


def _group_keys(value: str) -> tuple[str, ...]:
    from batchwise.costs.savings import GROUP_KEYS

    keys = tuple(dict.fromkeys(k.strip() for k in value.split(",") if k.strip()))
    unknown = [k for k in keys if k not in GROUP_KEYS]
    if unknown:
        raise click.BadParameter(
            f"cannot group by {', '.join(map(repr, unknown))}; expected some of "
            f"{', '.join(GROUP_KEYS)}, comma-separated (e.g. --by use_case,day)",
            param_hint="--by",
        )
    return keys


def _csv(by: tuple[str, ...], report: SavingsReport) -> str:
    """The report as CSV; the group keys (tags, models) with control characters escaped, so
    that the file printed or opened in a terminal cannot act on it."""
    import csv
    import io

    from batchwise.text import visible

    data = report.as_dict()
    columns = list(data["total"])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["scope", *by, *columns])
    for group in data["groups"]:
        keys = (visible(group[k]) if isinstance(group[k], str) else group[k] for k in by)
        writer.writerow(["group", *keys, *(group[c] for c in columns)])
    writer.writerow(["total", *("" for _ in by), *(data["total"][c] for c in columns)])
    return buf.getvalue()


@click.command()
@click.option("--by", default="kind", show_default=True, metavar="KEYS", help=_BY_HELP)
@click.option("--since", metavar="T", help="Entries at or after T. " + _TIME_HELP)
@click.option("--until", metavar="T", help="Entries before T (exclusive). " + _TIME_HELP)
@click.option("--json", "as_json", is_flag=True, help='Print {"total": …, "groups": […]}.')
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV (one row per group, then total).")
@click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False, writable=True),
    metavar="FILE",
    help="Also write a self-contained HTML report with charts to FILE.",
)
@click.pass_obj
def savings(
    obj: Context,
    by: str,
    since: str | None,
    until: str | None,
    as_json: bool,
    as_csv: bool,
    html_file: str | None,
) -> None:
    """Actual cost vs realtime-equivalent cost and the saving, from the ledger.

    Money is summed over priced entries; entries for models without a price are counted
    apart (unpriced), never as $0.
    """
    from batchwise.clock import system_clock
    from batchwise.costs.savings import print_savings, savings_report

    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    keys = _group_keys(by)
    now = system_clock()
    start, end = _time_option(since, "--since", now), _time_option(until, "--until", now)
    if start is not None and end is not None and start >= end:
        raise click.BadParameter("--since must be before --until", param_hint="--since")
    with _store(obj) as store:
        report = savings_report(store, by=keys, since=start, until=end)
        if html_file:
            from batchwise.reports.html import report_data, write_html

            write_html(html_file, report_data(store, by=keys, since=start, until=end, now=now))
    if as_json:
        click.echo(dumps(report.as_dict()))
    elif as_csv:
        click.echo(_csv(keys, report), nl=False)
    else:
        print_savings(_console(), report)
    if html_file:
        click.echo(f"wrote {html_file}", err=True)


@click.command()
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print {"summary": …, "by_use_case": […], "tasks": […]}.',
)
@click.pass_obj
def tasks(obj: Context, as_json: bool) -> None:
    """Cost per task: every request sharing a task_id (retries, rescues and failures
    included); a task is complete when all its requests have finished."""
    from batchwise.costs.savings import tasks_table
    from batchwise.costs.tasks import tasks_report, use_case_table

    with _store(obj) as store:
        report = tasks_report(store)
    if as_json:
        click.echo(dumps(report.as_dict()))
    else:
        console = _console()
        console.print(tasks_table(report.tasks, report.summary))
        if report.by_use_case:
            console.print(use_case_table(report))


@click.command()
@click.option(
    "--volume",
    metavar="N/day",
    help="Requests per day to project, e.g. 5000/day or 5k/day.",
)
@click.option(
    "--tasks",
    metavar="N/day",
    help="Completed tasks per day to project from the cost per completed task, e.g. 200/day.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Validate: split the window from --since to --until in halves, forecast the second "
    "from the first and compare with what the ledger recorded (error in %).",
)
@click.option("--use-case", metavar="U", help="With --tasks or --check: only this use case.")
@click.option(
    "--since",
    metavar="TIME",
    help="With --tasks: tasks completed since then (default 7d); with --check: the window "
    "to split (default 30d). " + _TIME_HELP,
)
@click.option("--until", metavar="TIME", help="With --tasks or --check: up to then (default now).")
@click.option(
    "--days",
    type=click.IntRange(1, 36500),
    default=30,
    show_default=True,
    help="Period length.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def forecast(
    obj: Context,
    volume: str | None,
    tasks: str | None,
    check: bool,
    use_case: str | None,
    since: str | None,
    until: str | None,
    days: int,
    as_json: bool,
) -> None:
    """Project monthly cost, with and without batching: from the recorded mix per request
    (--volume), or from the cost per completed task per use case (--tasks); --check measures
    how far such a forecast was from what then happened.

    --volume reads the mix (share of requests and average cost per request by provider, model
    and lane) from the whole ledger; "all realtime" prices the same work with no batch API.
    """
    if sum((volume is not None, tasks is not None, check)) != 1:
        raise click.UsageError("give one of --volume N/day, --tasks N/day or --check")
    if volume is not None:
        if use_case is not None or since is not None or until is not None:
            raise click.UsageError("--use-case, --since and --until go with --tasks or --check")
        _forecast_volume(obj, volume, days, as_json)
    else:
        window = (since, until)
        _forecast_tasks(obj, tasks, use_case=use_case, window=window, days=days, as_json=as_json)


def _forecast_volume(obj: Context, volume: str, days: int, as_json: bool) -> None:
    from batchwise.costs.forecast import forecast as project
    from batchwise.costs.forecast import forecast_table, parse_volume
    from batchwise.errors import ForecastError

    try:
        per_day = parse_volume(volume)
    except ForecastError as exc:
        raise click.BadParameter(str(exc), param_hint="--volume") from exc
    except ValueError:  # more digits than int() reads
        raise click.BadParameter(
            f"invalid volume {volume[:20]!r}…: {len(volume):,} characters, far too many",
            param_hint="--volume",
        ) from None
    if per_day > MAX_VOLUME_PER_DAY:
        raise click.BadParameter(
            f"{volume!r} is more than {MAX_VOLUME_PER_DAY:,} requests a day", param_hint="--volume"
        )
    with _store(obj) as store:
        try:
            result = project(store, volume_per_day=per_day, days=days)
        except ForecastError as exc:
            raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(dumps(result.as_dict()))
    else:
        _console().print(forecast_table(result))


def _forecast_tasks(
    obj: Context, tasks: str | None, *, use_case: str | None,
    window: tuple[str | None, str | None], days: int, as_json: bool,
) -> None:  # fmt: skip
    from batchwise.costs import task_forecast
    from batchwise.errors import ForecastError

    now = datetime.now(UTC)
    since, until = window
    start = _time_option(since or ("7d" if tasks is not None else "30d"), "--since", now)
    end = _time_option(until, "--until", now) or now
    assert start is not None
    per_day = None
    if tasks is not None:
        try:
            per_day = task_forecast.parse_tasks(tasks)
        except (ForecastError, ValueError) as exc:
            raise click.BadParameter(str(exc)[:300], param_hint="--tasks") from exc
        if per_day > MAX_VOLUME_PER_DAY:
            raise click.BadParameter(
                f"{tasks!r} is more than {MAX_VOLUME_PER_DAY:,} tasks a day", param_hint="--tasks"
            )
    with _store(obj) as store:
        try:
            if per_day is None:
                checked = task_forecast.check_forecast(
                    store, since=start, until=end, use_case=use_case
                )
            else:
                result = task_forecast.forecast_tasks(
                    store, tasks_per_day=per_day, days=days, since=start, until=end,
                    use_case=use_case,
                )  # fmt: skip
        except ForecastError as exc:
            raise click.ClickException(str(exc)) from exc
    if per_day is None:
        output = checked
        table = task_forecast.check_table(checked)
    else:
        output = result.as_dict()
        table = task_forecast.task_forecast_table(result)
    if as_json:
        click.echo(dumps(output))
    else:
        _console().print(table)


@click.command()
@click.option(
    "--older-than",
    required=True,
    metavar="AGE",
    help="Purge requests that finished longer ago than this, e.g. 30d or 12h.",
)
@click.option("--dry-run", is_flag=True, help="Count what would be purged; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def purge(obj: Context, older_than: str, dry_run: bool, as_json: bool) -> None:
    """Remove request and response bodies (they may hold personal data) of finished requests.

    The ledger, tags and token counts stay, so reports add up the same afterwards. Live
    requests are never touched.
    """
    from batchwise.clock import system_clock
    from batchwise.intake.tolerance import parse_duration
    from batchwise.lifecycle.purge import purge_bodies

    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from exc
    with _store(obj) as store:
        result = purge_bodies(store, older_than=age, now=system_clock(), dry_run=dry_run)
    if as_json:
        click.echo(dumps(result.as_dict()))
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(
        f"{verb} the bodies of {result.requests:,} request(s) and {result.responses:,} "
        f"response(s) finished before {result.cutoff.isoformat(timespec='seconds')}"
    )


@click.command()
@click.option(
    "--serve",
    "port",
    type=click.IntRange(0, 65535),
    default=None,
    metavar="PORT",
    help="Serve /metrics on PORT until interrupted, instead of printing once.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.pass_obj
def metrics(obj: Context, port: int | None, host: str) -> None:
    """Prometheus metrics: requests by lane and state, batches, cost and saving, ledger."""
    from batchwise.reports.metrics import exposition

    with _store(obj) as store:
        if port is None:
            click.echo(exposition(store), nl=False)
            return
        from batchwise.dashboard.serve import bind, serve

        try:
            sock = bind(host, port)
        except OSError as exc:
            raise click.ClickException(
                f"cannot listen on {host}:{port}: {exc}\nhint: pick another --serve PORT"
            ) from exc
        from batchwise.reports.metrics import create_app

        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
        click.echo(f"serving metrics on http://{shown}:{bound_port}/metrics", err=True)
        serve(create_app(store), sock)


COMMANDS = (savings, tasks, forecast, purge, metrics)


def register(cli: click.Group) -> None:
    """Add the report commands to the `batchwise` group."""
    for command in COMMANDS:
        cli.add_command(command)
