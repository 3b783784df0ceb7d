"""``--metrics-listen HOST:PORT`` for the long-running commands (register, watch,
agent, xds): the option and the endpoint it opens.

The endpoint runs on a thread of its own (prometheus_client's server) for as long as
the command's client is open; the collector reads the client's state when scraped.
The chosen address is printed to stderr as ``metrics at http://HOST:PORT/metrics``
(port 0 picks a free port). prometheus_client comes with the ``metrics`` extra, so
``etcdisco.metrics`` is imported only once the option is given.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .._address import parse_listen
from .._errors import ConfigError

if TYPE_CHECKING:
    from ..metrics import MetricsServer

F = TypeVar("F", bound=Callable[..., Any])

Listen = tuple[str, int]


def _parse_listen(ctx: click.Context, param: click.Parameter, text: str | None) -> Listen | None:
    if text is None:
        return None
    if importlib.util.find_spec("prometheus_client") is None:
        raise click.BadParameter(
            "needs prometheus-client: pip install 'etcdisco[metrics]'", ctx, param
        )
    try:
        return parse_listen(text)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def metrics_option(command: F) -> F:
    """Add ``--metrics-listen``, handed to the command as ``metrics_listen``."""
    option = click.option(
        "--metrics-listen",
        metavar="HOST:PORT",
        callback=_parse_listen,
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port).",
    )
    return option(command)


@asynccontextmanager
async def exposing_metrics(
    listen: Listen | None, *objects: object
) -> AsyncIterator[MetricsServer | None]:
    """Serve the metrics of ``objects`` while the block runs (nothing when ``listen``
    is None)."""
    if listen is None:
        yield None
        return
    from .. import metrics

    host, port = listen
    try:
        server = metrics.serve(host, port)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    try:
        metrics.track(*objects)
        click.echo(f"metrics at {server.url}", err=True)
        yield server
    finally:
        metrics.untrack(*objects)
        # Stopping the server thread takes up to its poll interval: not on the loop.
        await asyncio.to_thread(server.close)
