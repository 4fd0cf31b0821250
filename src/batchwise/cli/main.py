"""The `batchwise` command: a thin click layer over the library.

Each command parses, calls the library, prints. Heavy modules are imported inside commands so
that `batchwise submit` starts fast.
"""

from __future__ import annotations

import sys
from typing import Any

import click


class Context:
    """Options shared by every command (the global `--db`)."""

    def __init__(self, db: str | None) -> None:
        self.db = db

    def settings(self) -> Any:
        from batchwise.config import Settings

        return Settings.from_env().with_overrides(database_url=self.db)


pass_ctx = click.make_pass_decorator(Context)

#: commands that live in their own modules, imported only when used (start-up stays fast)
LAZY_COMMANDS = {
    "savings": "batchwise.cli.reports:savings",
    "tasks": "batchwise.cli.reports:tasks",
    "forecast": "batchwise.cli.reports:forecast",
    "purge": "batchwise.cli.reports:purge",
    "metrics": "batchwise.cli.reports:metrics",
    "worker": "batchwise.cli.worker:worker",
    "beat": "batchwise.cli.worker:beat",
    "jobs": "batchwise.cli.jobs:jobs",
    "events": "batchwise.cli.events:events",
}


class LazyGroup(click.Group):
    """A group whose heavier commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = LAZY_COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        import importlib

        module, _, name = target.partition(":")
        command = getattr(importlib.import_module(module), name)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    envvar="BATCHWISE_DATABASE_URL",
    metavar="URL",
    help="Database URL (default: SQLite in $BATCHWISE_HOME). Overrides BATCHWISE_DATABASE_URL.",
)
@click.version_option(package_name="batchwise")
@click.pass_context
def cli(ctx: click.Context, db: str | None) -> None:
    """batchwise: run deferrable LLM work through provider batch APIs at half price."""
    ctx.obj = Context(db)


def _parse_duration_option(value: str, option: str) -> float:
    from batchwise.intake.tolerance import parse_duration

    try:
        return parse_duration(value).total_seconds()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


def _parse_tags(values: tuple[str, ...]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected NAME=VALUE, got {value!r}", param_hint="--tag")
        tags[key] = text
    return tags


def _client(obj: Context) -> Any:
    from batchwise.api import Client

    return Client(settings=obj.settings())


def _fail(exc: Exception, hint: str | None = None) -> click.ClickException:
    message = str(exc) + (f"\nhint: {hint}" if hint else "")
    return click.ClickException(message)


@cli.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@click.option(
    "--tolerance",
    "-t",
    default=None,
    metavar="T",
    help="Default latency tolerance: realtime, 15m, 4h, 24h, 2d, by 07:00, or an "
    "ISO datetime. Lines may carry their own. [default: 24h]",
)
@click.option(
    "--provider",
    "-p",
    type=click.Choice(["openai", "anthropic"]),
    default=None,
    help="Default provider (else inferred from the line's shape or model).",
)
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="NAME=VALUE",
    help="Tag every request (use_case, step, business_unit, task_id, or any name).",
)
@click.option(
    "--skip-invalid",
    is_flag=True,
    help="Store the valid lines and list the rest (default: refuse the whole file).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--model", "-m", default=None, help="Submit one request for this model.")
@click.option("--prompt", default=None, help="The prompt of the single request.")
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Output cap of the single request.",
)
@pass_ctx
def submit(
    obj: Context,
    file: str | None,
    tolerance: str | None,
    provider: str | None,
    tags: tuple[str, ...],
    skip_invalid: bool,
    as_json: bool,
    model: str | None,
    prompt: str | None,
    max_tokens: int | None,
) -> None:
    """Submit requests from a JSONL FILE (or - for stdin), or one prompt with --model/--prompt.

    Lines may be OpenAI batch lines, Anthropic batch lines, or simple lines
    {"model", "messages" | "prompt", ...}. A file with any invalid line is refused whole
    (exit code 2) unless --skip-invalid.
    """
    from batchwise.errors import BatchwiseError, IntakeError

    tag_map = _parse_tags(tags)
    if (model is None) != (prompt is None):
        raise click.UsageError("--model and --prompt go together")
    if model is not None:
        if file is not None:
            raise click.UsageError("give either FILE or --model/--prompt, not both")
        with _client(obj) as client:
            try:
                handle = client.enqueue(
                    model=model,
                    prompt=prompt,
                    provider=provider,
                    tolerance=tolerance,
                    tags=tag_map,
                    max_tokens=max_tokens,
                )
            except IntakeError as exc:
                raise click.ClickException("; ".join(str(e) for e in exc.errors)) from exc
            except BatchwiseError as exc:
                raise _fail(exc) from exc
        if as_json:
            click.echo(_dumps({"id": handle.id, "lane": handle.lane, "state": handle.state}))
        else:
            click.echo(handle.id)
        return
    if file is None:
        raise click.UsageError("give a FILE (or - for stdin), or --model and --prompt")
    from batchwise.reports import progress

    with _client(obj) as client, progress.file_reader(file, show=not as_json) as stream:
        try:
            result = client.submit_file(
                stream,
                tolerance=tolerance,
                provider=provider,
                tags=tag_map,
                skip_invalid=skip_invalid,
            )
        except IntakeError as exc:
            if as_json:
                rejected = [
                    {"line": e.line, "error": e.error, **({"field": e.field} if e.field else {})}
                    for e in exc.errors
                ]
                click.echo(
                    _dumps({"accepted": 0, "realtime": 0, "deferred": 0, "rejected": rejected})
                )
            else:
                click.echo(f"refused: {exc}", err=True)
            sys.exit(2)
        except BatchwiseError as exc:
            raise _fail(exc) from exc
    if as_json:
        click.echo(_dumps(result.as_dict()))
        return
    extra = f", answered from the store {result.deduplicated}" if result.deduplicated else ""
    extra += f", refused by cost guards {len(result.refused)}" if result.refused else ""
    click.echo(
        f"accepted {result.accepted} (realtime {result.realtime}, deferred {result.deferred}"
        f"{extra})"
    )
    if result.refused:
        click.echo(f"refused by cost guards ({len(result.refused)}, stored as rejected):", err=True)
        for error in result.refused[:50]:
            click.echo(f"  line {error.line}: {error.error}", err=True)
    if result.rejected:
        click.echo(f"skipped {len(result.rejected)} invalid line(s):", err=True)
        for error in result.rejected:
            click.echo(f"  {error}", err=True)


@cli.command()
@click.argument("ids", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def status(obj: Context, ids: tuple[str, ...], as_json: bool) -> None:
    """Counts by lane and state, or the detail of requests by id or custom_id."""
    from batchwise.errors import NotFoundError
    from batchwise.reports import tables as report

    with _client(obj) as client:
        if not ids:
            counts = client.status()
            if as_json:
                click.echo(_dumps(counts))
            else:
                report.print_status(counts)
            return
        try:
            views = [client.get(i) for i in ids]
        except NotFoundError as exc:
            raise _fail(
                exc, "ids are numbers shown by `batchwise submit`; custom_ids work too"
            ) from exc
    if as_json:
        click.echo(_dumps([v.as_dict() for v in views]))
    else:
        for view in views:
            report.print_request(view)


@cli.command()
@click.option(
    "--until-idle",
    is_flag=True,
    help="Flush every group at once and exit 0 when every request is terminal.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05),
    default=None,
    metavar="S",
    help="Seconds between ticks; also caps the poll backoff. [default: 30]",
)
@pass_ctx
def run(obj: Context, until_idle: bool, interval: float | None) -> None:
    """Run the scheduler in this process (embedded mode: SQLite, no servers).

    Ctrl-C finishes the current step and exits; nothing is lost.
    """
    from batchwise.errors import BatchwiseError
    from batchwise.lifecycle.runner import run_embedded

    try:
        totals = run_embedded(obj.settings(), until_idle=until_idle, interval_s=interval)
    except BatchwiseError as exc:
        raise _fail(exc) from exc
    click.echo(
        f"{'stopped' if totals.stopped else 'idle'} after {totals.ticks} tick(s): "
        f"{totals.batches_submitted} batch(es) submitted, {totals.lines_reconciled} line(s) "
        f"reconciled, {sum(totals.realtime.values())} realtime call(s), {totals.rescued} rescue(s)",
        err=True,
    )


@cli.command()
@click.option("--turnaround", default="2s", show_default=True, help="Emulated batch turnaround.")
@pass_ctx
def demo(obj: Context, turnaround: str) -> None:
    """Run a sample day of LLM work through batchwise against the local emulator.

    No keys or network needed. Uses a fresh database unless --db is given.
    """
    from batchwise.demo import run_demo

    settings = obj.settings()
    run_demo(
        settings,
        database_url=obj.db,
        turnaround_s=_parse_duration_option(turnaround, "--turnaround"),
    )


@cli.command()
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, writable=True),
    default="-",
    show_default=True,
    help="File to write (- for stdout).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["openai", "anthropic"]),
    default=None,
    help="Output format (default: each request in its own provider's format).",
)
@click.option(
    "--provider",
    type=click.Choice(["openai", "anthropic"]),
    default=None,
    help="Only requests sent to this provider.",
)
@pass_ctx
def results(obj: Context, out: str, fmt: str | None, provider: str | None) -> None:
    """Export finished results as JSONL keyed by custom_id, in the provider's output format."""
    from batchwise.reports.results import export
    from batchwise.store.engine import Store

    store = Store(obj.settings().resolved_database_url)
    try:
        if out == "-":
            count = export(store, sys.stdout.buffer, fmt=fmt, provider=provider)
            sys.stdout.buffer.flush()
        else:
            with open(out, "wb") as stream:
                count = export(store, stream, fmt=fmt, provider=provider)
    finally:
        store.close()
    click.echo(f"exported {count} result(s)", err=True)


@cli.command()
@click.argument("ids", nargs=-1, type=int)
@click.option(
    "--batch", "batch_id", type=int, default=None, help="Cancel this batch and its requests."
)
@pass_ctx
def cancel(obj: Context, ids: tuple[int, ...], batch_id: int | None) -> None:
    """Cancel requests by id, or a whole batch with --batch."""
    from batchwise.clock import system_clock
    from batchwise.errors import BatchwiseError
    from batchwise.lifecycle.cancel import cancel_batch, cancel_requests
    from batchwise.lifecycle.scheduler import Providers
    from batchwise.store.engine import Store, batches_t

    if not ids and batch_id is None:
        raise click.UsageError("give request ids or --batch BATCH_ID")
    settings = obj.settings()
    store = Store(settings.resolved_database_url)
    providers = Providers(settings)
    try:
        done = cancel_requests(store, list(ids), now=system_clock()) if ids else []
        if batch_id is not None:
            import sqlalchemy as sa

            with store.read() as conn:
                name = conn.execute(
                    sa.select(batches_t.c.provider).where(batches_t.c.id == batch_id)
                ).scalar()
            if name is None:
                raise click.ClickException(f"no batch with id {batch_id}")
            done += cancel_batch(store, providers(name), batch_id, now=system_clock())
    except BatchwiseError as exc:
        raise _fail(exc) from exc
    finally:
        providers.close()
        store.close()
    click.echo(f"cancelled {len(done)} request(s)")


def _dumps(value: Any) -> str:
    import orjson

    return orjson.dumps(value).decode()


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8900, show_default=True, type=int, help="Port (0 = any free).")
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
    seed: int,
) -> None:
    """Serve the OpenAI and Anthropic batch and realtime APIs locally, for demos and tests.

    Point clients at it with OPENAI_BASE_URL=http://HOST:PORT/v1 and
    ANTHROPIC_BASE_URL=http://HOST:PORT (any non-empty API key works).
    """
    from pathlib import Path

    from batchwise.emulator.app import EmulatorConfig, run_server

    config = EmulatorConfig(
        turnaround_s=_parse_duration_option(turnaround, "--turnaround"),
        error_rate=error_rate,
        expire_rate=expire_rate,
        rate_limit_rate=rate_limit_rate,
        server_error_rate=server_error_rate,
        latency_s=_parse_duration_option(latency, "--latency"),
        enqueued_token_limit=enqueued_token_limit,
        state_dir=Path(state_dir) if state_dir else None,
        seed=seed,
    )
    run_server(host, port, config)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="batchwise")


if __name__ == "__main__":  # pragma: no cover
    main()
