"""No traceback reaches a user: every error a command lets escape becomes one short message.

`to_click(exc)` turns what escaped a command into a `click.ClickException` (exit 1):

- a `BatchwiseError` (bad settings, a refused change, a provider that failed…) prints its own
  message, which names the value, and a hint on how to fix it where there is a usual fix;
- an operating-system error (a missing or unreadable file, a full disk) prints the path and
  the reason;
- a database error (connection refused, a locked or corrupt file) prints the driver's first
  line and the URL, with its password masked;
- anything else is a bug: the full traceback goes to a log file in the home folder and the
  user sees one line saying so, and where.

Bad usage (options and arguments) is click's own `UsageError`, exit 2, raised by the commands.
Nothing here imports the library at import time.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import traceback
from datetime import UTC, datetime
from pathlib import Path

import click

__all__ = ["crash_log", "to_click"]

#: longest message shown for an unexpected error (the log file has all of it)
_SHORT = 200


def _visible(text: str) -> str:
    from batchwise.text import visible

    return visible(text, keep_lines=True)


def _hint(exc: BaseException) -> str | None:
    from batchwise.errors import ConfigError, JobLoadError, SchemaError, ToleranceError

    if isinstance(exc, JobLoadError):
        return "fix the job module named above, or move it out of the jobs folder"
    if isinstance(exc, ConfigError):
        return (
            "fix the setting named above: in the settings file ($BATCHWISE_CONFIG, else "
            "$BATCHWISE_HOME/config.toml) or the environment variable"
        )
    if isinstance(exc, SchemaError):
        return "point --db (or BATCHWISE_DATABASE_URL) at a batchwise database"
    if isinstance(exc, ToleranceError):
        return "zones are IANA names like Europe/Paris (BATCHWISE_TIMEZONE)"
    return None


def _database_url(ctx: click.Context | None) -> str:
    from batchwise.store.dbapi import masked_url

    obj = ctx.find_root().obj if ctx is not None else None
    db = getattr(obj, "db", None)
    if isinstance(db, str) and db:
        return masked_url(db)
    return "the default SQLite store in $BATCHWISE_HOME"


def to_click(exc: Exception, ctx: click.Context | None = None) -> click.ClickException:
    """The one-line error for an exception that escaped a command (see the module docstring)."""
    from batchwise.errors import BatchwiseError

    if isinstance(exc, BatchwiseError):
        hint = _hint(exc)
        return click.ClickException(_visible(str(exc)) + (f"\nhint: {hint}" if hint else ""))
    if "sqlite3" in sys.modules or "sqlalchemy" in sys.modules or "psycopg" in sys.modules:
        from batchwise.store.dbapi import database_error

        described = database_error(exc)
        if described is not None:
            return click.ClickException(
                f"database error: {_visible(described)}\nhint: check the database "
                f"({_database_url(ctx)}): set it with --db or BATCHWISE_DATABASE_URL"
            )
    if isinstance(exc, ValueError) and "null byte" in str(exc):  # os.* on a path holding \0
        return click.UsageError("a path given holds a NUL character (\\x00): remove it")
    if isinstance(exc, OSError) and exc.errno is not None:
        where = exc.filename if exc.filename is not None else ""
        reason = exc.strerror or str(exc)
        shown = f"{reason}: {where}" if where != "" else reason
        return click.ClickException(_visible(shown))
    path = crash_log(exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    if len(first) > _SHORT:
        first = first[:_SHORT] + "…"
    return click.ClickException(
        f"unexpected {type(exc).__name__}: {_visible(first)}\n"
        f"this is a bug in batchwise; the full traceback is in {path} (please attach it to a "
        "bug report)"
    )


def passes_through(exc: BaseException) -> bool:
    """Whether click should see `exc` as it is: its own exits and errors, a closed pipe."""
    if isinstance(exc, click.exceptions.ClickException | click.exceptions.Exit):
        return True
    if isinstance(exc, click.exceptions.Abort):
        return True
    return isinstance(exc, OSError) and exc.errno == errno.EPIPE


def crash_log(exc: BaseException) -> Path:
    """Write `exc`'s traceback to `$BATCHWISE_HOME/logs/crash-….log` (0600) and return the
    path; to the temporary folder if the home folder cannot be written."""
    from batchwise.store.dbapi import private_dir

    text = "".join(traceback.format_exception(exc))
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{os.getpid()}"
    home = Path(os.environ.get("BATCHWISE_HOME") or Path.home() / ".batchwise").expanduser()
    # no command line in the log: it may hold a database password
    header = f"batchwise crashed at {datetime.now(UTC).isoformat()}\n"
    try:
        folder = home / "logs"
        private_dir(folder)
        path = folder / f"crash-{stamp}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError:
        fd, name = tempfile.mkstemp(prefix=f"batchwise-crash-{stamp}-", suffix=".log")
        path = Path(name)
    with os.fdopen(fd, "w", encoding="utf-8") as stream:
        stream.write(header + text)
    return path
