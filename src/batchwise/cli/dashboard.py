"""`batchwise dashboard`: the live dashboard in a browser, read-only.

It parses, opens the store, builds the app (`batchwise.dashboard`) and serves it on uvicorn
until SIGTERM or Ctrl-C. Loopback needs no key; another address needs `--expose`, and the
command says what that shows to whoever can reach it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from batchwise.cli.context import open_store

if TYPE_CHECKING:
    from batchwise.cli.context import Context

__all__ = ["dashboard"]


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8090,
    show_default=True,
    help="Port to bind (0 picks a free one).",
)
@click.option(
    "--expose",
    is_flag=True,
    help="Allow a --host other than loopback: anyone who reaches it sees every figure, "
    "with no key.",
)
@click.option(
    "--refresh",
    "refresh_s",
    type=click.FloatRange(1, 3600),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="How often the page fetches new figures.",
)
@click.pass_obj
def dashboard(obj: Context, host: str, port: int, expose: bool, refresh_s: float) -> None:
    """Serve the live dashboard: saving, queue, cost per task, alerts, forecast.

    Read-only. On loopback (the default) no key is needed; binding another address needs
    --expose. Stops on Ctrl-C or SIGTERM within a few seconds.
    """
    from batchwise.dashboard.serve import EXPOSES, bind, is_loopback, serve

    local = is_loopback(host)
    if not local and not expose:
        raise click.UsageError(
            f"--host {host} is not loopback: the dashboard has no key, so anyone who reaches "
            f"it would see {EXPOSES}.\nhint: keep the default 127.0.0.1 (and use an SSH "
            "tunnel), or pass --expose if that is what you want"
        )
    try:
        sock = bind(host, port)
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {exc}\nhint: pick another --port"
        ) from exc
    from batchwise.dashboard.app import LOOPBACK_HOSTS, create_app

    # On loopback, refuse other Host names: a web page elsewhere cannot read it by rebinding
    allowed = (*LOOPBACK_HOSTS, host) if local else None
    with open_store(obj) as store:
        app = create_app(store, refresh_s=refresh_s, allowed_hosts=allowed, settings=obj.settings())
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
        click.echo(f"dashboard on http://{shown}:{bound_port}/ (Ctrl-C to stop)", err=True)
        if not local:
            click.echo(f"warning: exposed without a key: {EXPOSES}", err=True)
        serve(app, sock)
