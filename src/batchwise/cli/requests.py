"""The request commands: `submit`, `status`, `results`, `cancel`.

Each parses its options, calls the library (`Client`, `reports.results.export`,
`lifecycle.cancel`), prints. Library modules are imported inside the commands, so that
`batchwise submit` starts fast.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from batchwise.cli.context import Context, dumps, fail, open_client, open_store, pass_ctx

__all__ = ["COMMANDS", "cancel", "results", "status", "submit"]

#: ids are 64-bit integers in the store
_ID = click.IntRange(1, 2**63 - 1)
#: the largest output cap any provider documents fits in 32 bits
MAX_TOKENS = 2**31 - 1


def _parse_tags(values: tuple[str, ...]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected NAME=VALUE, got {value!r}", param_hint="--tag")
        tags[key] = text
    return tags


@click.command()
@click.argument(
    "file", required=False, type=click.Path(exists=True, dir_okay=False, allow_dash=True)
)
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
    default=None,
    metavar="NAME",
    help="Default provider: openai, anthropic, gemini or one added by a [providers.NAME] table "
    "(else inferred from the line's shape or model).",
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
@click.option("--name", default=None, help="A name for this submission.")
@click.option("--model", "-m", default=None, help="Submit one request for this model.")
@click.option("--prompt", default=None, help="The prompt of the single request.")
@click.option(
    "--max-tokens",
    type=click.IntRange(1, MAX_TOKENS),
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
    name: str | None,
    model: str | None,
    prompt: str | None,
    max_tokens: int | None,
) -> None:
    """Submit requests from a JSONL FILE (or - for stdin), or one prompt with --model/--prompt.

    Lines may be OpenAI batch lines, Anthropic batch lines, or simple lines
    {"model", "messages" | "prompt", ...}. A file with any invalid line is refused whole
    (exit code 2) unless --skip-invalid. The lines form one submission (`--json` prints its
    id as "submission"): follow it with `batchwise wait ID`, read it back with
    `batchwise results --submission ID`.
    """
    from batchwise.errors import BatchwiseError, IntakeError

    tag_map = _parse_tags(tags)
    if (model is None) != (prompt is None):
        raise click.UsageError("--model and --prompt go together")
    if model is not None:
        if file is not None:
            raise click.UsageError("give either FILE or --model/--prompt, not both")
        from batchwise.api import request_item
        from batchwise.errors import GuardRefused

        item = request_item(
            model=model, prompt=prompt, provider=provider, tolerance=tolerance,
            tags=tag_map, max_tokens=max_tokens,
        )  # fmt: skip
        with open_client(obj) as client:
            try:
                one = client.enqueue_many([item], name=name, source="prompt")
                if one.refused:
                    raise GuardRefused("guard", one.refused[0].error)
            except IntakeError as exc:
                click.echo(f"refused: {'; '.join(str(e) for e in exc.errors)}", err=True)
                sys.exit(2)
            except BatchwiseError as exc:
                raise fail(exc) from exc
        handle = one[0]
        if as_json:
            made = {"id": handle.id, "lane": handle.lane, "state": handle.state}
            click.echo(dumps({**made, "submission": one.id, "warnings": list(handle.warnings)}))
        else:
            click.echo(handle.id)
            _print_warnings(handle.warnings)
        return
    if file is None:
        raise click.UsageError("give a FILE (or - for stdin), or --model and --prompt")
    from batchwise.reports import progress

    with open_client(obj) as client, progress.file_reader(file, show=not as_json) as stream:
        try:
            result = client.submit_file(
                stream,
                name=name,
                origin=file,
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
                nothing = {"submission": None, "accepted": 0, "realtime": 0, "deferred": 0}
                click.echo(dumps({**nothing, "rejected": rejected}))
            else:
                click.echo(f"refused: {exc}", err=True)
            sys.exit(2)
        except BatchwiseError as exc:
            raise fail(exc) from exc
    if not (result.accepted or result.rejected or result.refused):
        shown = "stdin" if file == "-" else click.format_filename(file)
        click.echo(
            f"refused: no requests in {shown} (it is empty or holds only blank lines)", err=True
        )
        sys.exit(2)
    if as_json:
        click.echo(dumps(result.as_dict()))
        return
    _print_warnings(result.warnings)
    extra = f", answered from the store {result.deduplicated}" if result.deduplicated else ""
    extra += f", refused by cost guards {len(result.refused)}" if result.refused else ""
    click.echo(
        f"submission {result.id}: accepted {result.accepted} (realtime {result.realtime}, "
        f"deferred {result.deferred}{extra})"
    )
    if result.refused:
        click.echo(f"refused by cost guards ({len(result.refused)}, stored as rejected):", err=True)
        for error in result.refused[:50]:
            click.echo(f"  line {error.line}: {error.error}", err=True)
    if result.rejected:
        click.echo(f"skipped {len(result.rejected)} invalid line(s):", err=True)
        for error in result.rejected:
            click.echo(f"  {error}", err=True)


def _print_warnings(warnings: Sequence[str]) -> None:
    """Warnings on stderr, one a line: the submission stood, but the user should know."""
    from batchwise.text import visible

    for warning in warnings:
        click.echo(f"warning: {visible(warning)}", err=True)


@click.command()
@click.argument("ids", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--submission",
    "submission_id",
    type=int,
    default=None,
    metavar="ID",
    help="Show this submission, or look IDS up as its custom_ids.",
)
@pass_ctx
def status(obj: Context, ids: tuple[str, ...], as_json: bool, submission_id: int | None) -> None:
    """Counts by lane and state, or the detail of requests by id or custom_id."""
    from batchwise.errors import NotFoundError
    from batchwise.reports import tables as report

    with open_client(obj) as client:
        if not ids and submission_id is not None:
            try:
                shown = client.submission_view(submission_id)
            except NotFoundError as exc:
                raise fail(exc, "`batchwise submissions` lists them") from exc
            if as_json:
                click.echo(dumps(shown.as_dict()))
            else:
                report.print_submission(shown)
            return
        if not ids:
            counts = client.status()
            if as_json:
                click.echo(dumps(counts))
            else:
                report.print_status(counts)
            return
        try:
            views = [client.get(i, submission=submission_id) for i in ids]
        except NotFoundError as exc:
            raise fail(
                exc, "ids are numbers shown by `batchwise submit`; custom_ids work too"
            ) from exc
    if as_json:
        click.echo(dumps([v.as_dict() for v in views]))
    else:
        for view in views:
            report.print_request(view)


@click.command()
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
    default=None,
    metavar="NAME",
    help="Only requests sent to this provider (openai, anthropic, gemini or a configured one).",
)
@click.option(
    "--submission",
    "submission_id",
    type=int,
    default=None,
    metavar="ID",
    help="Only this submission's lines, each in the shape it came in (unless --format).",
)
@pass_ctx
def results(
    obj: Context, out: str, fmt: str | None, provider: str | None, submission_id: int | None
) -> None:
    """Export finished results as JSONL keyed by custom_id, in the provider's output format.

    With --submission ID, one line per finished line of that submission, in input order and
    in the shape it came in (an OpenAI batch output line, an Anthropic results line, a simple
    result line); --format translates every answer to one provider's shape.
    """
    if submission_id is not None:
        from batchwise.cli.submissions import export_one

        export_one(obj, submission_id, out, fmt, provider)
        return
    from batchwise.reports.results import export

    with open_store(obj) as store:
        if out == "-":
            count = export(store, sys.stdout.buffer, fmt=fmt, provider=provider)
            sys.stdout.buffer.flush()
        else:
            with open(out, "wb") as stream:
                count = export(store, stream, fmt=fmt, provider=provider)
    click.echo(f"exported {count} result(s)", err=True)


@click.command()
@click.argument("ids", nargs=-1, type=_ID)
@click.option(
    "--batch", "batch_id", type=_ID, default=None, help="Cancel this batch and its requests."
)
@pass_ctx
def cancel(obj: Context, ids: tuple[int, ...], batch_id: int | None) -> None:
    """Cancel requests by id, or a whole batch with --batch."""
    from batchwise.clock import system_clock
    from batchwise.errors import BatchwiseError
    from batchwise.lifecycle.cancel import cancel_batch, cancel_requests
    from batchwise.lifecycle.scheduler import Providers
    from batchwise.store.engine import Store
    from batchwise.store.queries import batch_provider

    if not ids and batch_id is None:
        raise click.UsageError("give request ids or --batch BATCH_ID")
    settings = obj.settings()
    store = Store(settings.resolved_database_url)
    providers = Providers(settings)
    try:
        done = cancel_requests(store, list(ids), now=system_clock()) if ids else []
        if batch_id is not None:
            name = batch_provider(store, batch_id)
            if name is None:
                raise click.ClickException(f"no batch with id {batch_id}")
            done += cancel_batch(store, providers(name), batch_id, now=system_clock())
    except BatchwiseError as exc:
        raise fail(exc) from exc
    finally:
        providers.close()
        store.close()
    click.echo(f"cancelled {len(done)} request(s)")


COMMANDS = (submit, status, results, cancel)
