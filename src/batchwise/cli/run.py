"""The commands that run something in this process: `run` (the embedded scheduler),
`demo` (a sample day against the emulator) and `emulator` (the local provider server)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import click

from batchwise.cli.context import Context, fail, parse_duration_option, pass_ctx

if TYPE_CHECKING:
    from datetime import datetime

__all__ = ["COMMANDS", "demo", "emulator", "run"]


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds")
    return value


@click.command()
@click.option(
    "--until-idle",
    is_flag=True,
    help="Flush every group at once and exit 0 when every request is terminal or held for a "
    "known reason and time (a budget period, a capacity wait); the last line says how many "
    "are held and until when.",
)
@click.option(
    "--include-held",
    is_flag=True,
    help="With --until-idle: keep waiting for held requests too, until every one is terminal.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05, max=86400),
    default=None,
    callback=_finite,
    metavar="S",
    help="Seconds between ticks; also caps the poll backoff. [default: 30]",
)
@pass_ctx
def run(obj: Context, until_idle: bool, include_held: bool, interval: float | None) -> None:
    """Run the scheduler in this process (embedded mode: SQLite, no servers).

    Ctrl-C or SIGTERM exits within seconds, abandoning provider calls in flight (their work
    is taken up on the next start); nothing is lost. Provider outages are retried, not fatal.
    """
    from batchwise.clock import system_clock
    from batchwise.errors import BatchwiseError
    from batchwise.lifecycle.runner import run_embedded

    settings = obj.settings()
    started = system_clock()
    try:
        totals = run_embedded(
            settings, until_idle=until_idle, include_held=include_held, interval_s=interval
        )
    except BatchwiseError as exc:
        raise fail(exc) from exc
    click.echo(
        f"after {totals.ticks} tick(s): "
        f"{totals.batches_submitted} batch(es) submitted, {totals.lines_reconciled} line(s) "
        f"reconciled, {sum(totals.realtime.values())} realtime call(s), {totals.rescued} rescue(s)",
        err=True,
    )
    _say_what_happened(settings.resolved_database_url, started, db=obj.db)
    # the last line says why the run ended
    if totals.stopped:
        last = f"stopped by {totals.reason}" + (
            " before everything was terminal" if until_idle else ""
        )
    elif totals.held is not None and totals.held.count:
        last = f"idle: {totals.held.line()}"
    else:
        last = "idle: every request is terminal" if until_idle else "idle"
    click.echo(last, err=True)


def _say_what_happened(url: str, since: datetime, *, db: str | None) -> None:
    """What became of the requests since `since`, and where to look closer (on stderr)."""
    from batchwise.reports.outcomes import describe
    from batchwise.store.engine import Store
    from batchwise.store.queries import finished_since
    from batchwise.text import visible

    store = Store(url)
    try:
        outcome = finished_since(store, since)
    finally:
        store.close()
    for line in describe(outcome, db=db):
        click.echo(visible(line), err=True)


@click.command()
@click.option("--turnaround", default="2s", show_default=True, help="Emulated batch turnaround.")
@click.option(
    "--keep",
    is_flag=True,
    help="Keep the demo's temporary folder (its database) to look closer afterwards.",
)
@pass_ctx
def demo(obj: Context, turnaround: str, keep: bool) -> None:
    """Run a sample day of LLM work through batchwise against the local emulator.

    No keys or network needed. Uses a fresh database in a temporary folder, removed at the
    end unless --keep (or --db is given).
    """
    from batchwise.demo import run_demo

    settings = obj.settings()
    run_demo(
        settings,
        database_url=obj.db,
        turnaround_s=parse_duration_option(turnaround, "--turnaround"),
        keep=keep,
    )


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port",
    default=8900,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port (0 = any free).",
)
@click.option(
    "--turnaround", default="2s", show_default=True, help="Batch turnaround (e.g. 2s, 1m)."
)
@click.option(
    "--error-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of batch lines and calls that fail with a provider error.",
)
@click.option(
    "--expire-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of batches that expire with partial output.",
)
@click.option(
    "--rate-limit-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of HTTP calls answered 429 with retry-after.",
)
@click.option(
    "--server-error-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of HTTP calls answered 500.",
)
@click.option("--latency", default="0s", show_default=True, help="Added latency per realtime call.")
@click.option(
    "--enqueued-token-limit",
    type=int,
    default=None,
    help="Per-model enqueued-token limit; OpenAI batches over it fail with token_limit_exceeded.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Keep state on disk here so a restart continues (default: in memory).",
)
@click.option(
    "--malformed-line-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of result-file lines that are not valid JSON or lack custom_id.",
)
# network faults (issue 12): what a flaky provider, or a proxy in front of it, does
@click.option(
    "--slow-response-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of API answers whose body drips a byte a second (never finishing in time).",
)
@click.option(
    "--outage",
    default="0s",
    show_default=True,
    metavar="DURATION",
    help="Refuse every connection for this long from start (e.g. 5s), then serve.",
)
@click.option(
    "--html-error-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of API calls answered by an HTML page, half with status 200 and half 502.",
)
@click.option(
    "--flex-latency",
    default="0s",
    show_default=True,
    metavar="DURATION",
    help='Added latency per flex-tier call (service_tier: "flex"), on top of --latency.',
)
@click.option(
    "--flex-refusal-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of flex-tier calls refused with 429 resource_unavailable.",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="NAME",
    help="A model name the OpenAI API answers beyond OpenAI's own, to play an OpenAI-compatible "
    "provider (e.g. --model llama-3.1-8b-instant for Groq). Repeatable.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for fault injection.")
def emulator(
    host: str,
    port: int,
    turnaround: str,
    error_rate: float,
    expire_rate: float,
    rate_limit_rate: float,
    server_error_rate: float,
    latency: str,
    enqueued_token_limit: int | None,
    state_dir: str | None,
    malformed_line_rate: float,
    slow_response_rate: float,
    outage: str,
    html_error_rate: float,
    flex_latency: str,
    flex_refusal_rate: float,
    models: tuple[str, ...],
    seed: int,
) -> None:
    """Serve the OpenAI, Anthropic and Gemini batch and realtime APIs locally, for demos and
    tests.

    Point clients at it with OPENAI_BASE_URL=http://HOST:PORT/v1,
    ANTHROPIC_BASE_URL=http://HOST:PORT and GOOGLE_GEMINI_BASE_URL=http://HOST:PORT (any
    non-empty API key works).
    """
    from pathlib import Path

    from batchwise.emulator import EmulatorConfig, run_server

    config = EmulatorConfig(
        turnaround_s=parse_duration_option(turnaround, "--turnaround"),
        error_rate=error_rate,
        expire_rate=expire_rate,
        rate_limit_rate=rate_limit_rate,
        server_error_rate=server_error_rate,
        latency_s=parse_duration_option(latency, "--latency"),
        enqueued_token_limit=enqueued_token_limit,
        state_dir=Path(state_dir) if state_dir else None,
        slow_response_rate=slow_response_rate,
        outage_s=parse_duration_option(outage, "--outage"),
        html_error_rate=html_error_rate,
        seed=seed,
        malformed_line_rate=malformed_line_rate,
        flex_latency_s=parse_duration_option(flex_latency, "--flex-latency"),
        flex_refusal_rate=flex_refusal_rate,
        models=frozenset(models),
    )
    run_server(host, port, config)


COMMANDS = (run, demo, emulator)
