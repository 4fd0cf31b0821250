"""`batchwise jobs …`: list cron jobs, run one now, show when one runs next.

Registered onto the main group by `register(cli)` (or found there through its table of lazy
commands). Commands parse, call `batchwise.jobs.runs`, print. The group's `Context` (the global
`--db`) arrives as the click context object.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from batchwise.cli.context import dumps, fail

if TYPE_CHECKING:
    from batchwise.cli.context import Context
    from batchwise.config import Settings
    from batchwise.jobs.runs import Job, LoadedJobs
    from batchwise.store.engine import Store


class JobsContext:
    """The main command's context plus the jobs folder."""

    def __init__(self, parent: Context | None, jobs_dir: Path | None) -> None:
        self.parent = parent
        self.jobs_dir = jobs_dir

    def settings(self) -> Settings:
        from batchwise.config import Settings

        if self.parent is None:  # the group used on its own
            return Settings.from_env()
        settings: Settings = self.parent.settings()
        return settings

    def load(self) -> LoadedJobs:
        from batchwise.jobs.runs import jobs_folder, load_folder

        if self.jobs_dir is not None:
            return load_folder(self.jobs_dir, required=True)
        folder, required = jobs_folder(self.settings())
        return load_folder(folder, required=required)

    def job(self, name: str) -> Job:
        from batchwise.errors import NotFoundError

        loaded = self.load()
        try:
            return loaded.get(name)
        except NotFoundError as exc:
            broken = "; ".join(str(e) for e in loaded.errors)
            raise fail(exc, f"some job files did not load: {broken}" if broken else None) from exc

    @contextmanager
    def store(self) -> Iterator[Store]:
        from batchwise.store.engine import Store

        store = Store(self.settings().resolved_database_url)
        try:
            yield store
        finally:
            store.close()


pass_jobs = click.make_pass_decorator(JobsContext)


@click.group("jobs")
@click.option(
    "--jobs-dir",
    envvar="BATCHWISE_JOBS_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of job modules (default: [jobs] folder of the settings file, else ./jobs).",
)
@click.pass_context
def jobs(ctx: click.Context, jobs_dir: Path | None) -> None:
    """Cron jobs: Python modules in the jobs folder that enqueue work on a schedule."""
    ctx.obj = JobsContext(ctx.obj, jobs_dir)


def _when(moment: datetime, job: Job) -> str:
    local = moment.astimezone(job.zone)
    return f"{local:%Y-%m-%d %H:%M} {local.tzname()}"


@jobs.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_jobs
def list_jobs(obj: JobsContext, as_json: bool) -> None:
    """Every job: schedule, time zone, next run, last run and its outcome."""
    from batchwise.jobs.runs import last_runs
    from batchwise.jobs.schedule import next_times

    loaded = obj.load()
    now = datetime.now(UTC)
    with obj.store() as store:
        last = last_runs(store, [j.name for j in loaded.jobs])
    rows: list[dict[str, Any]] = []
    for job in loaded.jobs:
        upcoming = next_times(job.cron, job.zone, now, 1)[0]
        run = last.get(job.name)
        rows.append(
            {
                "name": job.name,
                "schedule": job.schedule,
                "timezone": job.timezone,
                "deadline": job.deadline,
                "catch_up": job.catch_up,
                "source": str(job.source) if job.source else None,
                "next_run": upcoming.astimezone(job.zone).isoformat(),
                "next_run_utc": upcoming.isoformat(),
                "last_run": run.as_dict() if run else None,
            }
        )
    if as_json:
        click.echo(dumps({"jobs": rows, "errors": [str(e) for e in loaded.errors]}))
    else:
        table = [("NAME", "SCHEDULE", "TIME ZONE", "NEXT RUN", "LAST RUN")]
        for job, row in zip(loaded.jobs, rows, strict=True):
            run = last.get(job.name)
            shown = f"{_when(run.scheduled_for, job)} {run.state} (run {run.id})" if run else "—"
            next_run = _when(datetime.fromisoformat(row["next_run_utc"]), job)
            table.append((job.name, job.schedule, job.timezone, next_run, shown))
        if not loaded.jobs:
            click.echo("no jobs found", err=True)
        else:
            widths = [max(len(r[i]) for r in table) for i in range(4)]
            for r in table:
                click.echo("  ".join([*(r[i].ljust(widths[i]) for i in range(4)), r[4]]))
    for error in loaded.errors:
        click.echo(f"error: {error}", err=True)


def _parse_at(value: str, job: Job) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(
            f"{value!r} is not an ISO datetime: expected e.g. 2026-11-30T01:00 (in the job's "
            "time zone) or 2026-11-30T01:00+00:00",
            param_hint="--at",
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=job.zone)
    return moment.astimezone(UTC)


@jobs.command("run")
@click.argument("name")
@click.option(
    "--at",
    metavar="TIME",
    default=None,
    help="Run as if scheduled at TIME (ISO datetime; the job's zone unless it has an offset). "
    "Still at most once per (job, time); a skipped occurrence may be run this way.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_jobs
def run_job(obj: JobsContext, name: str, at: str | None, as_json: bool) -> None:
    """Run job NAME now: store its requests (the scheduler sends them and delivers the results).

    A job that makes no requests delivers at once.
    """
    from batchwise.errors import BatchwiseError
    from batchwise.jobs.runs import RunState, run_now

    job = obj.job(name)
    moment = _parse_at(at, job) if at is not None else None
    with obj.store() as store:
        try:
            record = run_now(store, job, settings=obj.settings(), now=datetime.now(UTC), at=moment)
        except BatchwiseError as exc:
            raise fail(exc, "see earlier runs with `batchwise jobs list`") from exc
    if as_json:
        click.echo(dumps(record.as_dict()))
    else:
        line = f"run {record.id}: {record.requests} request(s), {record.state}"
        if record.output:
            line += f"; output: {record.output}"
        click.echo(line)
    if record.state == RunState.FAILED:
        raise click.ClickException(f"job {name} run {record.id} failed:\n{record.error}")


@jobs.command("next")
@click.argument("name")
@click.option("-n", "count", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_jobs
def next_runs(obj: JobsContext, name: str, count: int, as_json: bool) -> None:
    """The next run times of job NAME, in its time zone and in UTC."""
    from batchwise.jobs.schedule import next_times

    job = obj.job(name)
    times = next_times(job.cron, job.zone, datetime.now(UTC), count)
    if as_json:
        click.echo(
            dumps(
                [{"local": t.astimezone(job.zone).isoformat(), "utc": t.isoformat()} for t in times]
            )
        )
        return
    for moment in times:
        click.echo(f"{_when(moment, job)}  ({moment:%Y-%m-%d %H:%M} UTC)")


def register(cli: click.Group) -> None:
    """Add the `jobs` group to the main command."""
    cli.add_command(jobs)
