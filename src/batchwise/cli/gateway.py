"""`batchwise serve` (the OpenAI-compatible gateway) and `batchwise keys` (its keys).

`serve` binds, says where, and runs `gateway.serve.run_gateway` until SIGTERM or Ctrl-C.
`keys create` prints a new key once (only its sha256 is stored), `keys list` shows names and
tags, `keys revoke` ends a key at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from batchwise.cli.context import open_store

if TYPE_CHECKING:
    from batchwise.cli.context import Context

__all__ = ["keys", "serve"]


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Port to bind (0 picks a free one).",
)
@click.option(
    "--queue",
    "-Q",
    envvar="BATCHWISE_QUEUE",
    default="batchwise",
    show_default=True,
    metavar="NAME",
    help="With a broker: the queue-name prefix the workers listen on (as `worker -Q`).",
)
@click.pass_obj
def serve(obj: Context, host: str, port: int, queue: str) -> None:
    """Serve the OpenAI-compatible gateway (Files, Batches, chat completions, embeddings).

    Every call needs a key from `batchwise keys create`. Without a broker the scheduler runs
    in this process too; with one (BATCHWISE_BROKER_URL) this process only takes requests in
    and `batchwise worker` and `batchwise beat` do the work. Stops on Ctrl-C or SIGTERM
    within a few seconds.
    """
    from batchwise.dashboard.serve import bind, is_loopback

    try:
        sock = bind(host, port)
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {exc}\nhint: pick another --port"
        ) from exc
    from batchwise.gateway.serve import run_gateway

    settings = obj.settings()
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    mode = "workers do the work" if settings.broker_url else "scheduler in this process"
    click.echo(f"gateway on http://{shown}:{bound_port}/v1 ({mode}; Ctrl-C to stop)", err=True)
    if not is_loopback(host):
        click.echo("note: reachable beyond this machine; every call still needs a key", err=True)
    run_gateway(settings, sock, queue=queue)


@click.group()
def keys() -> None:
    """Keys for `batchwise serve`: create, list, revoke."""


def _tags(values: Sequence[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for value in values:
        name, sep, tag = value.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{value!r} is not k=v", param_hint="--tag")
        tags[name] = tag
    return tags


@keys.command("create")
@click.argument("name")
@click.option(
    "--tag", "tag_values", multiple=True, metavar="K=V", help="Tag added to all it submits."
)
@click.option("--json", "as_json", is_flag=True, help='Print {"name", "key"} as JSON.')
@click.pass_obj
def create(obj: Context, name: str, tag_values: tuple[str, ...], as_json: bool) -> None:
    """Make a key named NAME and print it, once: only its hash is kept."""
    import orjson

    from batchwise.clock import system_clock
    from batchwise.gateway.keys import create_key

    tags = _tags(tag_values)
    with open_store(obj) as store:
        made = create_key(store, name, tags=tags, at=system_clock())
    if as_json:
        click.echo(orjson.dumps({"name": made.name, "key": made.key}).decode())
        return
    click.echo(made.key)
    click.echo(f"key {name!r} created; it is shown only now: keep it somewhere safe", err=True)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def list_(obj: Context, as_json: bool) -> None:
    """Every key's name, tags and times (never the key)."""
    import orjson

    from batchwise.store.keys import list_keys
    from batchwise.text import visible

    with open_store(obj) as store:
        found = list_keys(store)
    if as_json:
        click.echo(orjson.dumps([k.as_dict() for k in found]).decode())
        return
    if not found:
        click.echo("no keys yet: `batchwise keys create NAME`")
    for k in found:
        tags = ",".join(f"{n}={v}" for n, v in sorted(k.tags.items()))
        state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
        click.echo(visible(f"{k.name}\t{state}\tcreated {k.created_at:%Y-%m-%d %H:%M}\t{tags}"))


@keys.command("revoke")
@click.argument("name")
@click.pass_obj
def revoke(obj: Context, name: str) -> None:
    """Revoke the key named NAME: its next call gets a 401."""
    from batchwise.clock import system_clock
    from batchwise.store.keys import revoke_key

    with open_store(obj) as store:
        revoke_key(store, name, at=system_clock())
    click.echo(f"key {name!r} revoked")
