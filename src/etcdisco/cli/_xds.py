"""``etcdisco xds``: the xDS control plane as a process of its own.

Its options (listen address, ADS over TLS, per-service policies), the bootstrap it
prints for clients (``--print-bootstrap``), and the serving loop: an
:class:`~etcdisco.grpc.xds.XdsServer` on a client made from the invocation's
ClientSettings, announced once the registry has been read. ``etcdisco.grpc.xds``
needs the ``grpc`` extra, so it is imported when the command runs (a missing extra
is one error line), and for types only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import TYPE_CHECKING

import click

from .._address import join_address, parse_listen
from .._async_client import AsyncClient
from .._errors import ConfigError, EtcdTimeoutError
from ._common import GlobalOptions, check_port_free, command, errors, fail, run_until_signal
from ._metrics import Listen, exposing_metrics, metrics_option

if TYPE_CHECKING:
    from ..grpc.xds import ServicePolicy, XdsServer, XdsTls

_FILE = click.Path(dir_okay=False)


def _parse_policies(items: tuple[str, ...]) -> dict[str, ServicePolicy]:
    from ..grpc.xds import ServicePolicy as Policy

    policies: dict[str, ServicePolicy] = {}
    for item in items:
        service, sep, spec = item.partition("=")
        lb, _, header = spec.partition(":")
        if not sep or not service or not lb:
            raise click.BadParameter(
                f"{item!r} is not SERVICE=round_robin or SERVICE=ring_hash[:HEADER]",
                param_hint="--policy",
            )
        try:
            policies[service] = Policy(lb=lb, hash_header=header or None)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--policy") from None
    return policies


def _tls(
    cert: str | None,
    key: str | None,
    client_ca: str | None,
    bootstrap_cacert: str | None,
    bootstrap_cert: str | None,
    bootstrap_key: str | None,
) -> XdsTls | None:
    from ..grpc.xds import XdsTls as Tls

    if (cert is None) != (key is None):
        raise click.UsageError("--xds-cert and --xds-key go together")
    if cert is None or key is None:
        given = [
            name
            for name, value in (
                ("--xds-client-ca", client_ca),
                ("--bootstrap-cacert", bootstrap_cacert),
                ("--bootstrap-cert", bootstrap_cert),
                ("--bootstrap-key", bootstrap_key),
            )
            if value is not None
        ]
        if given:
            # Without a certificate the port is plaintext: TLS settings would be a lie.
            raise click.UsageError(
                f"{', '.join(given)}: only with --xds-cert and --xds-key "
                "(without them the port is plaintext)"
            )
        return None
    if (bootstrap_cert is None) != (bootstrap_key is None):
        raise click.UsageError("--bootstrap-cert and --bootstrap-key go together")
    return Tls(
        cert,
        key,
        client_ca,
        client_cacert=bootstrap_cacert,
        client_cert=bootstrap_cert,
        client_key=bootstrap_key,
    )


async def _wait_registry(xds: XdsServer, stop: asyncio.Event, every: float) -> bool:
    """Wait until the registry has been read (True) or ``stop`` is set (False), saying
    on stderr why etcd does not answer (a TLS or auth failure, say) while it does not."""
    said: set[str] = set()
    stopping = asyncio.ensure_future(stop.wait())
    ready: asyncio.Future[None] | None = None
    try:
        while True:
            ready = asyncio.ensure_future(xds.wait_ready(every))
            await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                return False
            try:
                ready.result()
                return True
            except EtcdTimeoutError as exc:
                # Once per distinct reason: the control plane keeps trying, quietly.
                # (The first may carry no reason yet: etcd's first answer is pending.)
                if str(exc) not in said:
                    said.add(str(exc))
                    click.echo(f"etcdisco: warning: registry not read yet: {exc}", err=True)
    finally:
        for waiter in (stopping, ready):
            if waiter is not None and not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter


@command("xds")
@click.option(
    "--listen",
    default="127.0.0.1:18000",
    show_default=True,
    help="HOST:PORT to serve ADS on (port 0: any free port).",
)
@click.option(
    "--print-bootstrap",
    is_flag=True,
    help="Print the gRPC xDS bootstrap JSON for clients of this server, and exit.",
)
@click.option(
    "--xds-cert",
    type=_FILE,
    help="Serve ADS over TLS with this certificate (PEM; it must name the host clients dial).",
)
@click.option("--xds-key", type=_FILE, help="The private key of --xds-cert.")
@click.option(
    "--xds-client-ca",
    type=_FILE,
    help="Serve only clients with a certificate signed by this CA (mutual TLS).",
)
@click.option(
    "--bootstrap-cacert",
    type=_FILE,
    help="For --print-bootstrap with TLS: the CA clients verify this server with, as a "
    "path on the clients' hosts (default: their system's roots).",
)
@click.option(
    "--bootstrap-cert",
    type=_FILE,
    help="For --print-bootstrap with mutual TLS: the clients' certificate.",
)
@click.option("--bootstrap-key", type=_FILE, help="The private key of --bootstrap-cert.")
@click.option(
    "--server-uri",
    metavar="HOST:PORT",
    help="Address clients dial, for the bootstrap (default: --listen).",
)
@click.option("--node-id", help="node.id in the bootstrap (default: etcdisco-<hostname>).")
@click.option("--zone", default="", help="node.locality.zone in the bootstrap.")
@click.option(
    "--retries",
    type=click.IntRange(0, 4),
    default=2,
    show_default=True,
    help="Retries of a call that fails with UNAVAILABLE.",
)
@click.option(
    "--policy",
    multiple=True,
    metavar="SERVICE=LB[:HEADER]",
    help="round_robin or ring_hash (on HEADER, else per channel) for SERVICE; repeatable. "
    "Without one, a service follows its instances' metadata lb / hash_header.",
)
@metrics_option
def xds_cmd(
    options: GlobalOptions,
    listen: str,
    print_bootstrap: bool,
    xds_cert: str | None,
    xds_key: str | None,
    xds_client_ca: str | None,
    bootstrap_cacert: str | None,
    bootstrap_cert: str | None,
    bootstrap_key: str | None,
    server_uri: str | None,
    node_id: str | None,
    zone: str,
    retries: int,
    policy: tuple[str, ...],
    metrics_listen: Listen | None,
) -> None:
    """Serve the registry to gRPC clients over xDS (ADS, v3) until SIGINT/SIGTERM.

    Clients in any language then dial xds:///SERVICE with the bootstrap from
    --print-bootstrap in the file named by GRPC_XDS_BOOTSTRAP. With --xds-cert and
    --xds-key the port speaks TLS (mutual TLS with --xds-client-ca), and the printed
    bootstrap gives clients gRFC A65 "tls" credentials (--bootstrap-* files).
    The listening line is printed once the registry has been read.
    """
    try:
        from ..grpc.xds import XdsServer, bootstrap_config
    except ImportError as exc:
        fail(str(exc))

    try:
        host, port = parse_listen(listen)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    policies = _parse_policies(policy)
    tls = _tls(xds_cert, xds_key, xds_client_ca, bootstrap_cacert, bootstrap_cert, bootstrap_key)

    if print_bootstrap:
        if server_uri is None:
            if port == 0 or host in ("0.0.0.0", "::"):
                fail(
                    f"clients cannot dial {listen}: give --server-uri HOST:PORT "
                    "(the address clients reach this server at)"
                )
            server_uri = join_address(host, port)
        if tls is not None and tls.client_ca is not None and tls.client_cert is None:
            fail(
                "the control plane requires client certificates (--xds-client-ca): "
                "give --bootstrap-cert and --bootstrap-key for its clients"
            )
        config = bootstrap_config(
            server_uri,
            node_id=node_id or f"etcdisco-{socket.gethostname()}",
            zone=zone,
            tls=tls is not None,
            cacert=bootstrap_cacert,
            cert=bootstrap_cert,
            key=bootstrap_key,
        )
        click.echo(json.dumps(config, indent=2))
        return

    with errors():
        # Before grpc tries: its own failure comes with a log line of grpc's.
        check_port_free(host, port)

    async def main(stop: asyncio.Event) -> None:
        settings = options.settings
        async with (
            AsyncClient(settings=settings) as client,
            XdsServer(client, listen=listen, policies=policies, retries=retries, tls=tls) as xds,
            exposing_metrics(metrics_listen, client, xds),
        ):
            if not await _wait_registry(xds, stop, max(settings.timeout, 1.0)):
                return
            if options.json:
                click.echo(json.dumps({"listen": xds.address}))
            else:
                click.echo(f"xDS control plane listening on {xds.address}")
            await stop.wait()

    run_until_signal(main)
