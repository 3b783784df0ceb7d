"""``etcdisco resolve``: what a balancing client would pick, from one read of etcd.

The picker comes from :func:`etcdisco.make_picker` (``--zone`` wraps the policy in
zone-aware balancing); the instances from one ``list_instances`` with the
invocation's ClientSettings.
"""

from __future__ import annotations

import asyncio

import click

from .._async_client import AsyncClient
from .._model import Instance
from ..balancing import POLICIES, Picker, make_picker
from ._common import GlobalOptions, command, fail, instance_json, run_until_signal


@command("resolve")
@click.argument("service")
@click.option(
    "--policy",
    type=click.Choice(sorted(POLICIES)),
    default="round_robin",
    show_default=True,
    help="Balancing policy (with --zone, the policy used inside the zone).",
)
@click.option("--hash-key", help="Hash key for ring_hash (e.g. a user id).")
@click.option("--zone", help="Prefer instances of this zone (zone-aware balancing).")
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Number of picks to print.",
)
def resolve_cmd(
    options: GlobalOptions,
    service: str,
    policy: str,
    hash_key: str | None,
    zone: str | None,
    count: int,
) -> None:
    """Pick an instance of SERVICE the way a client would, and print its address.

    Reads the instances once (no cache, no call history), so load-aware policies
    behave like random here.
    """
    if options.connection.key is not None and options.connection.cert is None:
        # --key is the global TLS client key here as everywhere; the hash key has a
        # name of its own.
        raise click.UsageError(
            "--key is the TLS client key (with --cert); the ring_hash key is --hash-key"
        )
    picker = _picker(policy, zone)

    async def main(stop: asyncio.Event) -> tuple[Instance, ...]:
        async with AsyncClient(settings=options.settings) as client:
            return await client.list_instances(service)

    instances = run_until_signal(main)
    picks = [picker.pick(instances, hash_key) for _ in range(count)]
    chosen = [inst for inst in picks if inst is not None]
    if not chosen:
        fail(f"no healthy instance of {service}")
    for inst in chosen:
        click.echo(instance_json(inst) if options.json else inst.address)


def _picker(policy: str, zone: str | None) -> Picker:
    if policy == "zone_aware":
        if not zone:
            raise click.UsageError("--policy zone_aware needs --zone")
        return make_picker("zone_aware", zone=zone)
    if zone:
        return make_picker("zone_aware", zone=zone, inner=policy)
    return make_picker(policy)
