"""The ``etcdisco`` group and its own commands; it wires in the other families.

- the group: the global options, made into one :class:`GlobalOptions` per invocation
  (``ctx.obj``);
- ``register`` (one instance, in the foreground), ``list``, ``watch``;
- ``etcd`` (a local single-node etcd for development) and ``demo`` (the demos of
  :mod:`etcdisco.demo`);
- ``resolve`` (:mod:`._resolve`), ``agent`` (:mod:`._agent`), ``xds``
  (:mod:`._xds`) and ``serve`` (:mod:`._serve`), added to the group at the bottom;
- :func:`main`, the console entry point.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
from pathlib import Path
from typing import Any

import click

from .. import __version__
from .._address import normalize_address
from .._async_client import AsyncClient
from .._metadata import check_metadata
from .._model import Instance, encode_value, validate_instance_id, validate_service_name
from .._operator import effective_instances
from ..agent import ProbeServer, ReadyFile, describe
from ..demo import run_demo
from ..registry import Registration, RegistrationState, validate_ttl
from ..testing import LocalEtcd, LocalEtcdError
from ._admin import deregister_cmd, disable_cmd, enable_cmd, overrides_cmd, weight_cmd
from ._agent import HealthOptions, ProbeOptions, agent_cmd, health_options, probe_options
from ._common import (
    INSTANCE_HEADER,
    GlobalOptions,
    command,
    errors,
    event_json,
    fail,
    global_options,
    group_options,
    instance_dict,
    instance_line,
    instances_json,
    metadata_options,
    parse_meta,
    report_crash,
    run_until_signal,
    say,
    write_lines,
)
from ._metrics import Listen, exposing_metrics, metrics_option
from ._resolve import resolve_cmd
from ._serve import serve_cmd
from ._ui import ui_cmd
from ._xds import xds_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    __version__, "--version", prog_name="etcdisco", message="%(prog)s %(version)s"
)
@global_options
@click.pass_context
def cli(ctx: click.Context, /, **values: Any) -> None:
    """Service registration and discovery on etcd.

    The global options go before or after the command (etcdisco --json list, etcdisco
    list --json); given in both places, the one after the command wins.
    """
    group_options(ctx, values)


def _validate_registration(
    service: str, address: str, instance_id: str | None, metadata: dict[str, Any], ttl: int
) -> None:
    """What the core refuses, refused before anything is opened (ports, files, etcd)."""
    validate_service_name(service)
    normalize_address(address)
    if instance_id is not None:
        validate_instance_id(instance_id)
    validate_ttl(ttl)
    check_metadata(metadata)
    encode_value(address, metadata)


@command("register")
@click.argument("service")
@click.argument("address")
@click.option("--id", "instance_id", help="Instance id (default: the address).")
@metadata_options
@click.option(
    "--ttl", default=10, show_default=True, help="Lease TTL in seconds (2 to 9,000,000,000)."
)
@health_options
@probe_options
@metrics_option
def register(
    options: GlobalOptions,
    service: str,
    address: str,
    instance_id: str | None,
    meta: tuple[str, ...],
    meta_json: tuple[str, ...],
    ttl: int,
    health: HealthOptions,
    probes: ProbeOptions,
    metrics_listen: Listen | None,
) -> None:
    """Register SERVICE at ADDRESS and keep it alive until SIGINT/SIGTERM."""
    metadata = parse_meta(meta, meta_json)
    with errors():
        _validate_registration(service, address, instance_id, metadata, ttl)

    async def main(stop: asyncio.Event) -> None:
        marker = ReadyFile(probes.ready_file) if probes.ready_file else None
        if marker is not None:
            marker.update(False)  # one left by an earlier run must not say ready
        reg: Registration | None = None

        def status() -> dict[str, Any]:
            if reg is None:
                return {"ready": False, "registrations": []}
            ready = reg.state is RegistrationState.REGISTERED
            return {"ready": ready, "registrations": [describe(reg)]}

        # Listening first: a busy port is an error before anything is registered.
        probe = ProbeServer(status, *probes.listen) if probes.listen is not None else None
        try:
            if probe is not None:
                await probe.start()
                say(options, "listening", f"probes on port {probe.port}", port=probe.port)
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

                reg.add_listener(on_state)
                if marker is not None:
                    marker.update(reg.state is RegistrationState.REGISTERED)
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


@command("list")
@click.argument("service", required=False)
def list_(options: GlobalOptions, service: str | None) -> None:
    """List the instances of SERVICE (or of every service)."""

    async def main(stop: asyncio.Event) -> list[Instance]:
        async with AsyncClient(settings=options.settings) as client:
            # With the operators' overrides folded in, as every cache sees them.
            found, note = await effective_instances(client, service)
            if note:
                click.echo(f"etcdisco: note: {note}", err=True)
            return list(found)

    instances = run_until_signal(main)
    if not instances:
        # A note, not output: stdout stays empty (kubectl's "No resources found").
        click.echo("no instances" + (f" of {service}" if service else ""), err=True)
        return
    if options.json:
        write_lines(instances_json(instances))
    else:
        write_lines(itertools.chain([INSTANCE_HEADER], map(instance_line, instances)))


@command("watch")
@click.argument("service", required=False)
@metrics_option
def watch(options: GlobalOptions, service: str | None, metrics_listen: Listen | None) -> None:
    """Print the instances once, then one line per change, until interrupted.

    Text lines start with = (there at the start), + (added), ~ (updated) or -
    (removed); JSON lines say it in "event": existing, added, updated, removed.
    """

    async def main(stop: asyncio.Event) -> None:
        settings = options.settings
        async with (
            AsyncClient(settings=settings) as client,
            exposing_metrics(metrics_listen, client),
        ):
            opening = client.discover(service) if service else client.discover_all()
            async with opening as cache:
                await cache.wait_ready(settings.timeout)
                # The listing and the subscription in one step (no await between):
                # every change after the listing is an event, none before it is.
                existing = cache.instances()
                events = cache.events()
                for inst in existing:
                    if options.json:
                        click.echo(
                            json.dumps({"event": "existing", **instance_dict(inst)}, sort_keys=True)
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


@command("etcd")
@click.option("--data-dir", help="Data directory (default: temporary).")
@click.option(
    "--port", type=int, help="Client port (default: 2379 if free, else any free port; 0: any)."
)
def etcd_cmd(options: GlobalOptions, data_dir: str | None, port: int | None) -> None:
    """Run a local single-node etcd for development until SIGINT."""
    if data_dir is not None:
        _check_data_dir(Path(data_dir))
    if port is None and _port_free(2379):
        port = 2379
    member: LocalEtcd | None = None
    try:
        member = LocalEtcd(data_dir, name="etcdisco-dev", client_port=port or None)
        member.start()
    except LocalEtcdError as exc:
        # The first line says what went wrong; etcd's own words are in its log.
        first = str(exc).strip().splitlines()[0]
        logged = member is not None and member.log_path.exists()
        log = f" (etcd's log: {member.log_path})" if member is not None and logged else ""
        fail(f"{first}{log}")
    except OSError as exc:
        fail(f"cannot use --data-dir {data_dir}: {exc.strerror or exc}")
    click.echo(f"etcd {member.version} ready at {member.endpoint} (data in {member.data_dir})")
    click.echo(f"export ETCDISCO_ENDPOINTS={member.endpoint}")

    async def main(stop: asyncio.Event) -> None:
        await stop.wait()

    try:
        run_until_signal(main)
    finally:
        member.close()
        click.echo("etcd stopped")


def _check_data_dir(path: Path) -> None:
    """A data directory etcd can use, or one ``etcdisco: error:`` line."""
    if path.exists() and not path.is_dir():
        fail(f"cannot use --data-dir {path}: it is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        fail(f"cannot use --data-dir {path}: {exc.strerror or exc}")
    probe = path / ".etcdisco-write-test"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        fail(f"cannot use --data-dir {path}: not writable ({exc.strerror or exc})")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # As etcd binds: a port held only by connections in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@command("demo")
@click.option("--instances", default=3, show_default=True, type=click.IntRange(2, 9))
@click.option("--ttl", default=3, show_default=True, type=click.IntRange(2, 30))
@click.option("--grpc", "grpc_mode", is_flag=True, help="gRPC servers: rolling restart under load.")
@click.option(
    "--http", "http_mode", is_flag=True, help="uvicorn servers: rolling restart under load."
)
def demo(
    options: GlobalOptions, instances: int, ttl: int, grpc_mode: bool, http_mode: bool
) -> None:
    """Register instances, follow them, crash one, stop one (local etcd if needed)."""
    if grpc_mode and http_mode:
        raise click.UsageError("give --grpc or --http, not both")
    run = run_demo
    if grpc_mode:
        # Needs the grpc extra (etcdisco.grpc): imported only when asked for.
        from ..demo._grpc import run_grpc_demo

        run = run_grpc_demo
    elif http_mode:
        # Needs the http extra (uvicorn, httpx): imported only when asked for.
        from ..demo._http import run_http_demo

        run = run_http_demo

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


cli.add_command(register)
cli.add_command(list_)
cli.add_command(watch)
cli.add_command(etcd_cmd)
cli.add_command(demo)
cli.add_command(resolve_cmd)
cli.add_command(agent_cmd)
cli.add_command(xds_cmd)
cli.add_command(disable_cmd)
cli.add_command(enable_cmd)
cli.add_command(weight_cmd)
cli.add_command(deregister_cmd)
cli.add_command(overrides_cmd)
cli.add_command(ui_cmd)
cli.add_command(serve_cmd)


def main() -> None:
    """The console entry point: the command line, and any exception nothing expected
    as one line (see report_crash)."""
    try:
        cli.main(prog_name="etcdisco")
    except Exception as exc:
        report_crash(exc)
