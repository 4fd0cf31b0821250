"""The `batchwise` command group: global options, the table of commands, `main`.

Commands live one module per group (`requests`, `submissions`, `run`, `events`, `jobs`,
`reports`, `worker`); each parses, calls the library, prints. The request and run commands
import only click and are added at once; the other groups are imported on first use, and
every module imports the library inside its commands, so that `batchwise submit` starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

import batchwise.cli.requests as requests
import batchwise.cli.run as run
from batchwise.cli.context import Context, pass_ctx

__all__ = [
    "LAZY_COMMANDS",
    "Context",
    "LazyGroup",
    "cli",
    "main",
    "pass_ctx",
    "with_global_options",
]

#: commands that live in their own modules, imported only when used (start-up stays fast)
LAZY_COMMANDS = {
    "savings": "batchwise.cli.reports:savings",
    "tasks": "batchwise.cli.reports:tasks",
    "forecast": "batchwise.cli.reports:forecast",
    "purge": "batchwise.cli.reports:purge",
    "metrics": "batchwise.cli.reports:metrics",
    "dashboard": "batchwise.cli.dashboard:dashboard",
    "worker": "batchwise.cli.worker:worker",
    "beat": "batchwise.cli.worker:beat",
    "jobs": "batchwise.cli.jobs:jobs",
    "events": "batchwise.cli.events:events",
    "submissions": "batchwise.cli.submissions:submissions",
    "wait": "batchwise.cli.submissions:wait",
    "serve": "batchwise.cli.gateway:serve",
    "keys": "batchwise.cli.gateway:keys",
}


def _db_after_the_command(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """`batchwise status --db URL`: the global option given after the command wins."""
    if value is not None:
        obj = ctx.find_object(Context)
        if obj is None:
            ctx.obj = obj = Context(None)
        obj.db = value


def with_global_options(command: click.Command) -> click.Command:
    """Give `command` (and, for a group, every command under it) the global options, so they
    work after the command as well as before it. Idempotent."""
    if not any(getattr(p, "global_option", False) for p in command.params):
        option = click.Option(
            ["--db"],
            metavar="URL",
            expose_value=False,
            callback=_db_after_the_command,
            help="Database URL; the same as `batchwise --db URL COMMAND`.",
        )
        option.global_option = True  # type: ignore[attr-defined]
        command.params.append(option)
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            with_global_options(sub)
    return command


class LazyGroup(click.Group):
    """A group whose heavier commands are imported on first use, whose global options also
    work after the command (`batchwise status --db URL`), and whose commands never show a
    traceback: what escapes one becomes a one-line error (`cli.failures`)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            from batchwise.cli.failures import passes_through, to_click

            if passes_through(exc):
                raise
            raise to_click(exc, ctx) from exc

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = LAZY_COMMANDS.get(cmd_name)
        if target is None:
            found = super().get_command(ctx, cmd_name)
            return None if found is None else with_global_options(found)
        module, _, name = target.partition(":")
        command = getattr(importlib.import_module(module), name)
        assert isinstance(command, click.Command)
        return with_global_options(command)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    envvar="BATCHWISE_DATABASE_URL",
    metavar="URL",
    help="Database URL (default: SQLite in $BATCHWISE_HOME). Overrides BATCHWISE_DATABASE_URL. "
    "Also accepted after the command.",
)
@click.version_option(package_name="batchwise")
@click.pass_context
def cli(ctx: click.Context, db: str | None) -> None:
    """batchwise: run deferrable LLM work through provider batch APIs at half price."""
    ctx.obj = Context(db)


for _command in (*requests.COMMANDS, *run.COMMANDS):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="batchwise")


if __name__ == "__main__":  # pragma: no cover
    main()
