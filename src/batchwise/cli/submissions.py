"""The submission commands: `submissions` (list them) and `wait ID` (block until one is done).

`submit` prints a submission's id, `status --submission ID` shows one and `results
--submission ID` exports its lines (in `cli/requests.py`). Each command parses, calls the
library (`Client`), prints.
"""

from __future__ import annotations

import click

from batchwise.cli.context import Context, dumps, fail, open_client, pass_ctx

__all__ = ["COMMANDS", "export_one", "submissions", "wait"]

#: `wait`'s exit code when the timeout passes first (0: all answered, 1: some failed)
TIMED_OUT = 2


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="How many of the latest submissions to show.",
)
@pass_ctx
def submissions(obj: Context, as_json: bool, limit: int) -> None:
    """List the latest submissions: id, name, source, format, lines by state, created and
    finished times."""
    with open_client(obj) as client:
        views = client.submissions(limit=limit)
    if as_json:
        click.echo(dumps([v.as_dict() for v in views]))
        return
    from batchwise.reports import tables

    tables.print_submissions(views)


@click.command()
@click.argument("submission_id", metavar="ID", type=int)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=None,
    metavar="S",
    help=f"Give up after S seconds (exit code {TIMED_OUT}).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the final counts as JSON.")
@pass_ctx
def wait(obj: Context, submission_id: int, timeout: float | None, as_json: bool) -> None:
    """Wait until every line of submission ID is finished, with a progress bar.

    Exit code 0 when every line was answered, 1 when any failed, was refused or cancelled,
    2 when the timeout passed first. It only reads the store: `batchwise run` or workers do
    the work.
    """
    from batchwise.errors import NotFoundError, ResultTimeout
    from batchwise.reports import progress

    with open_client(obj) as client, progress.counter("waiting", show=not as_json) as update:
        try:
            submission = client.submission(submission_id)
            view = submission.wait(
                timeout,
                poll_s=1.0,
                on_poll=lambda v: update(
                    v.total - v.unfinished,
                    v.total,
                    ", ".join(f"{s} {n:,}" for s, n in v.counts.items()),
                ),
            )
        except NotFoundError as exc:
            raise fail(exc, "`batchwise submissions` lists them") from exc
        except ResultTimeout as exc:
            click.echo(str(exc), err=True)
            raise SystemExit(TIMED_OUT) from exc
    if as_json:
        click.echo(dumps(view.as_dict()))
    else:
        answered = view.total - view.failed
        click.echo(
            f"submission {view.id}: {view.total:,} line(s) finished, {answered:,} answered, "
            f"{view.failed:,} without an answer"
            + (
                f" ({', '.join(f'{s} {n:,}' for s, n in view.counts.items())}); "
                f"see `batchwise results --submission {view.id}`"
                if view.failed
                else ""
            )
        )
    if view.failed:
        raise SystemExit(1)


def export_one(
    obj: Context, submission_id: int, out: str, fmt: str | None, provider: str | None
) -> None:
    """`results --submission ID`: the submission's finished lines in their own shapes."""
    import sys

    from batchwise.errors import NotFoundError
    from batchwise.reports.results import export_submission

    if provider is not None:
        raise click.UsageError("--provider and --submission do not go together")
    with open_client(obj) as client:
        try:
            view = client.submission_view(submission_id)
        except NotFoundError as exc:
            raise fail(exc, "`batchwise submissions` lists them") from exc
        if out == "-":
            count = export_submission(client.store, submission_id, sys.stdout.buffer, fmt=fmt)
            sys.stdout.buffer.flush()
        else:
            with open(out, "wb") as stream:
                count = export_submission(client.store, submission_id, stream, fmt=fmt)
    click.echo(f"exported {count} result(s) of submission {submission_id}", err=True)
    if view.unfinished:
        click.echo(
            f"{view.unfinished:,} line(s) not finished yet: `batchwise wait {submission_id}`",
            err=True,
        )


COMMANDS = (submissions, wait)
