"""Progress display for long CLI work, shown only on a terminal (rich is imported lazily)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


def interactive() -> bool:
    return sys.stderr.isatty()


@contextmanager
def file_reader(path: str, *, show: bool = True) -> Iterator[IO[bytes]]:
    """Open `path` (or `-` for stdin) for binary line reading, with a progress bar by bytes
    when stderr is a terminal and the size is known."""
    if path == "-":
        yield sys.stdin.buffer
        return
    if not (show and interactive()):
        with open(path, "rb") as stream:
            yield stream
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("[bold]submitting[/]"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with (
        Progress(*columns, transient=True, console=_stderr_console()) as bar,
        bar.open(path, "rb") as stream,
    ):
        yield stream


def _stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


@contextmanager
def counter(label: str, *, show: bool = True) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar of items done out of a total, on stderr when it is a terminal; yields
    `update(done, total, detail)`. Off a terminal, updates are dropped."""
    if not (show and interactive()):
        yield lambda done, total, detail: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, transient=True, console=_stderr_console()) as bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, detail: str) -> None:
            bar.update(task, completed=done, total=total, description=detail)

        yield update
