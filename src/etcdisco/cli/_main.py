"""The ``etcdisco`` group and its own commands; it wires in the other families.

- the group: the global options, made into one :class:`GlobalOptions` per invocation
  (``ctx.obj``);
- ``register`` (one instance, in the foreground), ``list``, ``watch``;
- ``etcd`` (a local single-node etcd for development) and ``demo`` (the demos of
  :mod:`etcdisco.demo`);
- ``resolve`` (:mod:`._resolve`), ``agent`` (:mod:`._agent`) and ``xds``
  (:mod:`._xds`), added to the group at the bottom;
- :func:`main`, the console entry point.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any

import click

from .._async_client import AsyncClient
from .._model import Instance
from ..agent import ProbeServer, ReadyFile, describe
from ..demo import run_demo
from ..etcd import DEFAULT_ENDPOINT
from ..registry import Registration, RegistrationState
from ..testing import LocalEtcd, LocalEtcdError
from ._agent import HealthOptions, ProbeOptions, agent_cmd, health_options, probe_options
from ._common import (
    ConnectionOptions,
    GlobalOptions,
    event_json,
    fail,
    instance_json,
    instance_line,
    log_to_stderr,
    run_until_signal,
    say,
)
from ._metrics import Listen, exposing_metrics, metrics_option
from ._resolve import resolve_cmd
from ._xds import xds_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--endpoints",
    envvar="ETCDISCO_ENDPOINTS",
    default=DEFAULT_ENDPOINT,
    show_default=True,
    help="Comma-separated etcd endpoints (env ETCDISCO_ENDPOINTS).",
)
@click.option("--prefix", default="services", show_default=True, help="Registry key prefix.")
@click.option("--cacert", type=click.Path(dir_okay=False), help="CA bundle for TLS to etcd.")
@click.option("--cert", type=click.Path(dir_okay=False), help="Client certificate (mutual TLS).")
@click.option("--key", type=click.Path(dir_okay=False), help="Client key (mutual TLS).")
@click.option("--user", help="etcd user; the password is read from ETCDISCO_PASSWORD.")
@click.option("--timeout", default=5.0, show_default=True, help="Deadline of one etcd call (s).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (JSON lines).")
@click.option(
    "--log-level",
    envvar="ETCDISCO_LOG_LEVEL",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Log to stderr at this level (env ETCDISCO_LOG_LEVEL).",
)
@click.pass_context
def cli(
    ctx: click.Context,
    endpoints: str,
    prefix: str,
    cacert: str | None,
    cert: str | None,
    key: str | None,
    user: str | None,
    timeout: float,
    as_json: bool,
    log_level: str | None,
) -> None:
    """Service registration and discovery on etcd."""
    if log_level:
        log_to_stderr(log_level.upper())
    connection = ConnectionOptions(endpoints, prefix, cacert, cert, key, user, timeout)
    ctx.obj = GlobalOptions(connection, json=as_json, log_level=log_level)


def _parse_meta(items: tuple[str, ...]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not key=value", param_hint="--meta")
        value: Any = raw
        # Numbers and booleans keep their type so weights compare as numbers.
        try:
            value = json.loads(raw)
            if isinstance(value, (dict, list)):
                value = raw
        except ValueError:
            value = raw
        meta[name] = value
    return meta


@cli.command()
@click.argument("service")
@click.argument("address")
@click.option("--id", "instance_id", help="Instance id (default: the address).")
@click.option("--meta", multiple=True, metavar="K=V", help="Metadata entry; repeatable.")
@click.option("--ttl", default=10, show_default=True, help="Lease TTL in seconds (>= 2).")
@health_options
@probe_options
@metrics_option
@click.pass_obj
def register(
    options: GlobalOptions,
    service: str,
    address: str,
    instance_id: str | None,
    meta: tuple[str, ...],
    ttl: int,
    health: HealthOptions,
    probes: ProbeOptions,
    metrics_listen: Listen | None,
) -> None:
    """Register SERVICE at ADDRESS and keep it alive until SIGINT/SIGTERM."""
    metadata = _parse_meta(meta)

    async def main(stop: asyncio.Event) -> None:
        marker = ReadyFile(probes.ready_file) if probes.ready_file else None
        probe: ProbeServer | None = None
        try:
            async with (
                AsyncClient(settings=options.settings) as client,
                exposing_metrics(metrics_listen, client),
            ):
                reg = await client.register(
                    service,
                    address,
                    instance_id=instance_id,
                    metadata=metadata,
                    ttl=ttl,
                    checks=health.checks,
                    on_failing=health.on_failing,
                )
                _say_registered(options, reg)

                def on_state(r: Registration, state: RegistrationState) -> None:
                    if marker is not None:
                        marker.update(state is RegistrationState.REGISTERED)
                    if options.json:
                        click.echo(json.dumps({"key": r.key, "state": state.value}))
                    else:
                        click.echo(f"{r.key}: {state.value}")

                def status() -> dict[str, Any]:
                    ready = reg.state is RegistrationState.REGISTERED
                    return {"ready": ready, "registrations": [describe(reg)]}

                reg.add_listener(on_state)
                if marker is not None:
                    marker.update(reg.state is RegistrationState.REGISTERED)
                if probes.listen is not None:
                    probe = ProbeServer(status, *probes.listen)
                    await probe.start()
                    say(options, "listening", f"probes on port {probe.port}", port=probe.port)
                await stop.wait()
                await reg.deregister()
                if not options.json:
                    click.echo(f"deregistered {reg.key}")
        finally:
            if probe is not None:
                await probe.close()
            if marker is not None:
                marker.update(False)

    run_until_signal(main)


def _say_registered(options: GlobalOptions, reg: Registration) -> None:
    if options.json:
        click.echo(
            json.dumps(
                {
                    "key": reg.key,
                    "address": reg.address,
                    "lease": reg.lease_id,
                    "ttl": reg.ttl,
                    "state": reg.state.value,
                }
            )
        )
    else:
        click.echo(
            f"registered {reg.key} -> {reg.address} (lease {reg.lease_id:x}, ttl {reg.ttl}s)"
        )


@cli.command("list")
@click.argument("service", required=False)
@click.pass_obj
def list_(options: GlobalOptions, service: str | None) -> None:
    """List the instances of SERVICE (or of every service)."""

    async def main(stop: asyncio.Event) -> list[Instance]:
        async with AsyncClient(settings=options.settings) as client:
            return list(await client.list_instances(service))

    instances = run_until_signal(main)
    if options.json:
        for inst in instances:
            click.echo(instance_json(inst))
        return
    if not instances:
        click.echo("no instances" + (f" of {service}" if service else ""))
        return
    click.echo(f"{'SERVICE':<20} {'ID':<28} {'ADDRESS':<24} METADATA")
    for inst in instances:
        click.echo(instance_line(inst))


@cli.command()
@click.argument("service", required=False)
@metrics_option
@click.pass_obj
def watch(options: GlobalOptions, service: str | None, metrics_listen: Listen | None) -> None:
    """Print the instances, then one line per change, until interrupted."""

    async def main(stop: asyncio.Event) -> None:
        settings = options.settings
        async with (
            AsyncClient(settings=settings) as client,
            exposing_metrics(metrics_listen, client),
        ):
            opening = client.discover(service) if service else client.discover_all()
            async with opening as cache:
                events = cache.events()
                await cache.wait_ready(settings.timeout)
                for inst in cache.instances():
                    if options.json:
                        click.echo(
                            json.dumps({"event": "existing", **inst.to_dict()}, sort_keys=True)
                        )
                    else:
                        click.echo(f"= {instance_line(inst)}")
                cache.add_state_listener(
                    lambda state: click.echo(f"# cache {state.value}", err=True)
                )
                stopper = asyncio.ensure_future(stop.wait())
                try:
                    while True:
                        nxt = asyncio.ensure_future(anext(events))
                        done, _ = await asyncio.wait(
                            {nxt, stopper}, return_when=asyncio.FIRST_COMPLETED
                        )
                        if stopper in done:
                            nxt.cancel()
                            return
                        ev = nxt.result()
                        if options.json:
                            click.echo(event_json(ev))
                        else:
                            mark = {"added": "+", "removed": "-", "updated": "~"}[ev.type.value]
                            click.echo(f"{mark} {instance_line(ev.instance)}")
                finally:
                    stopper.cancel()

    run_until_signal(main)


@cli.command("etcd")
@click.option(
    "--data-dir", type=click.Path(file_okay=False), help="Data directory (default: temporary)."
)
@click.option(
    "--port", type=int, help="Client port (default: 2379 if free, else any free port; 0: any)."
)
def etcd_cmd(data_dir: str | None, port: int | None) -> None:
    """Run a local single-node etcd for development until SIGINT."""
    if port is None and _port_free(2379):
        port = 2379
    try:
        member = LocalEtcd(data_dir, name="etcdisco-dev", client_port=port or None)
        member.start()
    except LocalEtcdError as exc:
        fail(str(exc))
    click.echo(f"etcd {member.version} ready at {member.endpoint} (data in {member.data_dir})")
    click.echo(f"export ETCDISCO_ENDPOINTS={member.endpoint}")

    async def main(stop: asyncio.Event) -> None:
        await stop.wait()

    try:
        run_until_signal(main)
    finally:
        member.close()
        click.echo("etcd stopped")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@cli.command()
@click.option("--instances", default=3, show_default=True, type=click.IntRange(2, 9))
@click.option("--ttl", default=3, show_default=True, type=click.IntRange(2, 30))
@click.option("--grpc", "grpc_mode", is_flag=True, help="gRPC servers: rolling restart under load.")
@click.pass_obj
def demo(options: GlobalOptions, instances: int, ttl: int, grpc_mode: bool) -> None:
    """Register instances, follow them, crash one, stop one (local etcd if needed)."""
    run = run_demo
    if grpc_mode:
        # Needs the grpc extra (etcdisco.grpc): imported only when asked for.
        from ..demo._grpc import run_grpc_demo

        run = run_grpc_demo

    async def main(stop: asyncio.Event) -> None:
        # The demos reach etcd at the endpoints alone (plaintext, no user): as typed.
        task = asyncio.ensure_future(run(options.connection.endpoints, instances, ttl))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    run_until_signal(main)


cli.add_command(resolve_cmd)
cli.add_command(agent_cmd)
cli.add_command(xds_cmd)


def main() -> None:
    cli(prog_name="etcdisco")
