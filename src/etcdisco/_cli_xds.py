"""``etcdisco xds``: the xDS control plane as a process of its own."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import TYPE_CHECKING

import click

from ._cli_metrics import Listen, exposing_metrics, metrics_option
from ._errors import ConfigError

if TYPE_CHECKING:
    # Imported for types only: a module-level import of .cli (which imports this module)
    # leaves mypy unable to type the command inside the import cycle.
    from .cli import Settings
    from .grpc.xds import ServicePolicy


def _parse_policies(items: tuple[str, ...]) -> dict[str, ServicePolicy]:
    from .grpc.xds import ServicePolicy as Policy

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


@click.command("xds")
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
@click.pass_obj
def xds_cmd(
    settings: Settings,
    listen: str,
    print_bootstrap: bool,
    server_uri: str | None,
    node_id: str | None,
    zone: str,
    retries: int,
    policy: tuple[str, ...],
    metrics_listen: Listen | None,
) -> None:
    """Serve the registry to gRPC clients over xDS (ADS, v3) until SIGINT/SIGTERM.

    Clients in any language then dial xds:///SERVICE with the bootstrap from
    --print-bootstrap in the file named by GRPC_XDS_BOOTSTRAP.
    """
    from .cli import fail, run_until_signal

    try:
        from .grpc.xds import XdsServer, bootstrap_config
        from .grpc.xds._server import _split_listen
    except ImportError as exc:
        fail(str(exc))
        return

    try:
        host, port = _split_listen(listen)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    policies = _parse_policies(policy)

    if print_bootstrap:
        if server_uri is None:
            if port == 0 or host in ("0.0.0.0", "::"):
                fail(
                    f"clients cannot dial {listen}: give --server-uri HOST:PORT "
                    "(the address clients reach this server at)"
                )
            server_uri = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        config = bootstrap_config(
            server_uri, node_id=node_id or f"etcdisco-{socket.gethostname()}", zone=zone
        )
        click.echo(json.dumps(config, indent=2))
        return

    async def main(stop: asyncio.Event) -> None:
        async with (
            settings.client() as client,
            XdsServer(client, listen=listen, policies=policies, retries=retries) as xds,
            exposing_metrics(metrics_listen, client, xds),
        ):
            if settings.json:
                click.echo(json.dumps({"listen": xds.address}))
            else:
                click.echo(f"xDS control plane listening on {xds.address}")
            await stop.wait()

    run_until_signal(main)
