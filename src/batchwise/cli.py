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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    from batchwise.tolerance import parse_duration

    try:
        return parse_duration(value).total_seconds()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8900, show_default=True, type=int, help="Port (0 = any free).")
@click.option("--turnaround", default="2s", show_default=True, help="Batch turnaround (e.g. 2s, 1m).")
@click.option("--error-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Share of batch lines and calls that fail with a provider error.")
@click.option("--expire-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Share of batches that expire with partial output.")
@click.option("--rate-limit-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Share of HTTP calls answered 429 with retry-after.")
@click.option("--server-error-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Share of HTTP calls answered 500.")
@click.option("--latency", default="0s", show_default=True, help="Added latency per realtime call.")
@click.option("--enqueued-token-limit", type=int, default=None,
              help="Per-model enqueued-token limit; OpenAI batches over it fail "
                   "with token_limit_exceeded.")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="Keep state on disk here so a restart continues (default: in memory).")
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

    from batchwise.providers.emulator import EmulatorConfig, run_server

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
    sys.exit(main())
