"""`batchwise worker` and `batchwise beat`: Celery's worker and beat, run for batchwise's app.

`register(cli)` adds both commands to the main group. Importing this module imports neither
Celery nor the store, so commands like `batchwise submit` keep starting fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from batchwise.config import Settings

#: the same value as `batchwise.worker.DEFAULT_QUEUE` (not imported: that module loads Celery)
DEFAULT_QUEUE = "batchwise"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_loglevel = click.option(
    "--loglevel",
    "-l",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Logging level.",
)
_queue = click.option(
    "--queue",
    "-Q",
    envvar="BATCHWISE_QUEUE",
    default=DEFAULT_QUEUE,
    show_default=True,
    metavar="NAME",
    help="Queue-name prefix; the producers, workers and beat of one deployment must share it.",
)


def register(cli: click.Group) -> None:
    """Add `worker` and `beat` to the `batchwise` command group."""
    cli.add_command(worker)
    cli.add_command(beat)


def _settings(ctx: click.Context) -> Settings:
    """Settings as the main group resolved them (its `--db` included), with a broker."""
    from batchwise.config import Settings
    from batchwise.errors import ConfigError

    obj = ctx.find_root().obj
    try:
        settings: Settings = obj.settings() if hasattr(obj, "settings") else Settings.from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if not settings.broker_url:
        raise click.ClickException(
            "no broker configured: set BATCHWISE_BROKER_URL, e.g. redis://localhost:6379/0\n"
            "hint: without a broker, `batchwise run` does all the work in one process"
        )
    return settings


def _check_store(settings: Settings) -> None:
    """Fail now, with the URL, rather than in every task: and create the schema once here,
    not in every pool process at the same moment."""
    from batchwise.errors import BatchwiseError
    from batchwise.store.queries import check_database

    try:
        check_database(settings.resolved_database_url)
    except BatchwiseError as exc:
        raise click.ClickException(
            f"cannot open the database: {exc}\n"
            "hint: set BATCHWISE_DATABASE_URL (e.g. postgresql+psycopg://user:pass@host/db) "
            "or pass --db"
        ) from exc


@click.command()
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=None,
    help="Processes (or threads) running tasks. [default: one per CPU]",
)
@_loglevel
@_queue
@click.option(
    "--pool",
    type=click.Choice(["prefork", "threads", "solo"]),
    default="prefork",
    show_default=True,
    help="How tasks run: forked processes, threads, or one at a time in this process.",
)
@click.option("--events", "-E", is_flag=True, help="Send task events (for monitors like Flower).")
@click.option("--hostname", "-n", default=None, help="Node name. [default: batchwise@HOST]")
@click.pass_context
def worker(
    ctx: click.Context,
    concurrency: int | None,
    loglevel: str,
    queue: str,
    pool: str,
    events: bool,
    hostname: str | None,
) -> None:
    """Run a Celery worker: realtime calls, and the steps beat sends (flush, submit, poll,
    reconcile, rescue, sweep). Run as many as you like, on any machines."""
    settings = _settings(ctx)
    _check_store(settings)
    from batchwise.worker import create_app, queue_names

    argv = [
        "worker",
        f"--loglevel={loglevel.upper()}",
        # the steps queue first: with Redis, workers drain it before taking new realtime work
        f"--queues={','.join(reversed(queue_names(queue)))}",
        f"--pool={pool}",
        f"--hostname={hostname or 'batchwise@%h'}",
        # batchwise revokes nothing and needs no clock sync between workers: skip the chatter
        "--without-mingle",
        "--without-gossip",
    ]
    if concurrency is not None:
        argv.append(f"--concurrency={concurrency}")
    if events:
        argv.append("--task-events")
    create_app(settings, queue=queue).worker_main(argv)


@click.command()
@_loglevel
@_queue
@click.option(
    "--schedule-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where beat keeps its state. [default: $BATCHWISE_HOME/celerybeat-schedule]",
)
@click.pass_context
def beat(ctx: click.Context, loglevel: str, queue: str, schedule_file: str | None) -> None:
    """Run Celery beat: sends the scheduler's steps to the workers every tick.

    Run one per deployment. A second one is harmless (every step is safe to run twice) but
    doubles the work.
    """
    settings = _settings(ctx)
    path = Path(schedule_file) if schedule_file else settings.home / "celerybeat-schedule"
    path.parent.mkdir(parents=True, exist_ok=True)
    from batchwise.worker import create_app

    create_app(settings, queue=queue).start(
        ["beat", f"--loglevel={loglevel.upper()}", f"--schedule={path}"]
    )
