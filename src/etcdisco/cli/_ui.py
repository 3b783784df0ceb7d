"""``etcdisco ui``: the operator's dashboard and Prometheus service discovery
(:mod:`etcdisco.ui`) served by uvicorn until SIGINT/SIGTERM.

It listens on loopback (``127.0.0.1:8500``) unless told otherwise, and is read-only
unless given an admin token (``--admin-token-file F`` or ``$ETCDISCO_UI_TOKEN``); the
page's script sends the token in a header, only when the operator typed it into the
page. The listening socket is bound before anything else, so a busy port is one
``etcdisco: error:`` line (exit 1). stdout carries one line once it serves (``listening``
with ``--json``); uvicorn's own logs go to stderr at warning level.

On a stop signal the live feeds of the open pages end first (uvicorn waits for
running responses before it stops, and a server-sent event stream never ends by
itself), then the server, then the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import os
import socket
import stat
from collections.abc import Generator
from pathlib import Path

import click

from .._address import join_address, parse_listen
from .._async_client import AsyncClient
from .._errors import ConfigError
from ._common import GlobalOptions, command, errors, fail, run_until_signal, say

TOKEN_ENV = "ETCDISCO_UI_TOKEN"
DEFAULT_LISTEN = "127.0.0.1:8500"


def _read_token(path: str | None) -> str | None:
    """The admin token from ``path`` (first line), else from $ETCDISCO_UI_TOKEN, else None."""
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read --admin-token-file {path}: {exc.strerror or exc}"
            ) from None
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not token:
            raise ConfigError(f"--admin-token-file {path} is empty")
        mode = os.stat(path).st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            click.echo(
                f"etcdisco: note: {path} is readable by other users (chmod 600 it)", err=True
            )
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now (a busy port is a ConfigError)."""
    where = join_address(host, port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _closing(sock: socket.socket) -> Generator[socket.socket, None, None]:
    try:
        yield sock
    finally:
        sock.close()


@command("ui")
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    help="Where to serve the dashboard (port 0: any free port). Loopback by default.",
)
@click.option(
    "--admin-token-file",
    type=click.Path(dir_okay=False),
    help=f"File holding the admin token that allows actions from the page (or ${TOKEN_ENV}); "
    "without one the dashboard is read-only.",
)
def ui_cmd(options: GlobalOptions, listen: str, admin_token_file: str | None) -> None:
    """Serve the dashboard: every service and instance, live, with their overrides.

    The page (http://HOST:PORT/) updates itself from a cache that follows etcd, and
    keeps showing the last known state with a banner while etcd is unreachable. With
    an admin token, operators who give it on the page can disable, enable, weight
    and deregister instances (the same calls as the commands of the same names).
    GET /prometheus/targets serves the registry to Prometheus (http_sd_configs).
    """
    if any(importlib.util.find_spec(m) is None for m in ("starlette", "uvicorn", "jinja2")):
        fail("etcdisco ui needs the ui extra: pip install 'etcdisco[ui]'")
    with errors():
        host, port = parse_listen(listen)
        token = _read_token(admin_token_file)
        if token is not None and len(token) < 16:
            raise ConfigError("the admin token must be at least 16 characters long")
        sock = _bind(host, port)

    import uvicorn

    from ..ui import create_app

    class Server(uvicorn.Server):
        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self.up = asyncio.Event()

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            self.up.set()

        # run_until_signal owns SIGINT/SIGTERM; uvicorn must not take them over.
        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            yield

    async def main(stop: asyncio.Event) -> None:
        async with AsyncClient(settings=options.settings) as client:
            app = create_app(client, admin_token=token)
            config = uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                lifespan="on",
                timeout_graceful_shutdown=3,
            )
            server = Server(config)
            serving = asyncio.ensure_future(server.serve(sockets=[sock]))
            stopping = asyncio.ensure_future(stop.wait())
            up = asyncio.ensure_future(server.up.wait())
            try:
                await asyncio.wait({serving, up}, return_when=asyncio.FIRST_COMPLETED)
                if not server.started:
                    serving.result()
                    fail("the dashboard server stopped at startup")
                bound_host, bound_port = sock.getsockname()[:2]
                url = f"http://{join_address(host or bound_host, bound_port)}/"
                mode = "admin actions with the token" if token else "read-only"
                say(
                    options,
                    "listening",
                    f"dashboard at {url} ({mode}); Prometheus targets at {url}prometheus/targets",
                    url=url,
                    port=bound_port,
                    admin=token is not None,
                )
                if not _is_loopback(host):
                    click.echo(
                        f"etcdisco: note: serving on {host or 'every interface'}, beyond this "
                        "host: anyone who reaches it sees the registry",
                        err=True,
                    )
                await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                up.cancel()
                stopping.cancel()
                # The pages' live feeds end first: uvicorn waits for open responses.
                await app.state.dashboard.close()
                server.should_exit = True
                with contextlib.suppress(asyncio.CancelledError):
                    await serving

    with _closing(sock):
        run_until_signal(main)
