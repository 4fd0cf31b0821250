"""What every command shares: the group's context object (the global `--db`) and the small
helpers that turn it into a client or a store, and errors into click messages.

Nothing here imports the library at import time, so loading a command module stays fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from batchwise.api import Client
    from batchwise.config import Settings
    from batchwise.store.engine import Store

__all__ = [
    "Context",
    "dumps",
    "fail",
    "open_client",
    "open_store",
    "parse_duration_option",
    "pass_ctx",
]


class Context:
    """Options shared by every command (the global `--db`)."""

    def __init__(self, db: str | None) -> None:
        self.db = db

    def settings(self) -> Settings:
        from batchwise.config import Settings

        return Settings.from_env().with_overrides(database_url=self.db)


pass_ctx = click.make_pass_decorator(Context)


def open_client(obj: Context) -> Client:
    """A `Client` on the group's settings; use it as a context manager."""
    from batchwise.api import Client

    return Client(settings=obj.settings())


@contextmanager
def open_store(obj: Context) -> Iterator[Store]:
    """A `Store` on the group's database, closed on the way out."""
    from batchwise.store.engine import Store

    opened = Store(obj.settings().resolved_database_url)
    try:
        yield opened
    finally:
        opened.close()


def fail(exc: Exception, hint: str | None = None) -> click.ClickException:
    """A click error from a library error, with a hint on how to fix it when there is one."""
    from batchwise.text import visible

    return click.ClickException(
        visible(str(exc), keep_lines=True) + (f"\nhint: {hint}" if hint else "")
    )


def dumps(value: Any) -> str:
    """JSON for `--json` output (orjson: datetimes and dataclasses as the library gives them)."""
    import orjson

    return orjson.dumps(value).decode()


def parse_duration_option(value: str, option: str) -> float:
    """Seconds from a duration option like `2s` or `1m`, or a usage error naming the option."""
    from batchwise.intake.tolerance import parse_duration

    try:
        return parse_duration(value).total_seconds()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc
