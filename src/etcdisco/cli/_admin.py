"""The operator's commands: act on instances rather than only look at them.

- ``disable SERVICE [ID] --reason R [--for 30m]``: out of rotation for every reader
  (an override kept in etcd apart from the instance's lease, see
  ``etcdisco._overrides``); without ID, every instance of the service;
- ``enable SERVICE [ID]``: back in rotation (a weight override stays);
- ``weight SERVICE ID N``: the weight every weighted picker and xDS use instead of the
  instance's own;
- ``deregister SERVICE ID``: delete a stale key, saying whose lease held it and how
  long that lease has left (a live instance puts its key back: use ``disable``);
- ``overrides [SERVICE]``: the overrides in force.

Every action records who (``--by``, default ``user@host``) and why (``--reason``); an
expiry (``--for``) ends it by itself. The dashboard's actions call the same
``AsyncClient`` methods (``etcdisco.ui``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .._async_client import AsyncClient
from .._model import Override, validate_instance_id, validate_service_name
from .._operator import deregister, format_duration, parse_duration
from ._common import (
    GlobalOptions,
    command,
    errors,
    fail,
    override_text,
    run_until_signal,
    say,
)

F = TypeVar("F", bound=Callable[..., Any])


def _by_option(command: F) -> F:
    return click.option(
        "--by",
        metavar="NAME",
        help="Who acts, recorded with the override (default: user@host).",
    )(command)


def _for_option(command: F) -> F:
    return click.option(
        "--for",
        "duration",
        metavar="DURATION",
        help="End the override by itself after DURATION: 90s, 30m, 2h, 1d, 1h30m "
        "(default: until removed).",
    )(command)


def _target(service: str, instance_id: str | None) -> str:
    return f"{service}/{instance_id}" if instance_id is not None else f"{service} (every instance)"


def _check(service: str, instance_id: str | None, duration: str | None) -> float | None:
    """Refuse bad input before connecting; the expiry in seconds."""
    with errors():
        validate_service_name(service)
        if instance_id is not None:
            validate_instance_id(instance_id)
        return parse_duration(duration) if duration is not None else None
    raise AssertionError("unreachable")


def _note(text: str) -> None:
    click.echo(f"etcdisco: note: {text}", err=True)


async def _registered(client: AsyncClient, service: str, instance_id: str | None) -> int:
    """How many instances the override applies to right now."""
    found = await client.list_instances(service)
    return sum(1 for i in found if instance_id is None or i.id == instance_id)


def _say_override(options: GlobalOptions, event: str, text: str, o: Override | None) -> None:
    fields = o.to_dict() if o is not None else {}
    say(options, event, text, **fields)


@command("disable")
@click.argument("service")
@click.argument("instance_id", metavar="[ID]", required=False)
@click.option("--reason", required=True, help="Why, recorded with the override.")
@_for_option
@_by_option
def disable_cmd(
    options: GlobalOptions,
    service: str,
    instance_id: str | None,
    reason: str,
    duration: str | None,
    by: str | None,
) -> None:
    """Take instance ID of SERVICE (or, without ID, every instance) out of rotation.

    Every reader skips it from then on (caches, pickers, channels, xDS) while its own
    registration is untouched: the override lives in etcd apart from the instance's
    lease, so restarts and re-registrations keep it, until `etcdisco enable` or the end
    of --for.
    """
    expires_in = _check(service, instance_id, duration)

    async def main(stop: asyncio.Event) -> tuple[Override | None, int]:
        async with AsyncClient(settings=options.settings) as client:
            o = await client.set_override(
                service, instance_id, disabled=True, reason=reason, by=by, expires_in=expires_in
            )
            return o, await _registered(client, service, instance_id)

    o, present = run_until_signal(main)
    text = f"disabled {_target(service, instance_id)}" + (f": {override_text(o)}" if o else "")
    _say_override(options, "disabled", text, o)
    if present == 0:
        _note(
            f"no instance {_target(service, instance_id)} is registered now; the override "
            "applies when one registers"
        )
    elif instance_id is None:
        _note(f"all {present} instance(s) of {service} are out of rotation")


@command("enable")
@click.argument("service")
@click.argument("instance_id", metavar="[ID]", required=False)
@_by_option
def enable_cmd(
    options: GlobalOptions, service: str, instance_id: str | None, by: str | None
) -> None:
    """Put instance ID of SERVICE (or, without ID, the whole service) back in rotation.

    Ends a `disable`; a weight set with `etcdisco weight` stays.
    """
    _check(service, instance_id, None)

    async def main(stop: asyncio.Event) -> tuple[Override | None, Override | None, bool]:
        async with AsyncClient(settings=options.settings) as client:
            before = await client.list_overrides(service)
            own = next((o for o in before if o.instance_id == instance_id), None)
            whole = next((o for o in before if o.instance_id is None), None)
            was_disabled = own is not None and own.disabled
            left = own
            if was_disabled:
                left = await client.set_override(service, instance_id, disabled=False, by=by)
            return left, whole, was_disabled

    left, whole, was_disabled = run_until_signal(main)
    target = _target(service, instance_id)
    if was_disabled:
        text = f"enabled {target}"
        if left is not None:
            text += f"; its override stays: {override_text(left)}"
    else:
        text = f"{target} was not disabled"
    say(options, "enabled", text, service=service, id=instance_id, was_disabled=was_disabled,
        override=left.to_dict() if left is not None else None)  # fmt: skip
    if instance_id is not None and whole is not None and whole.disabled:
        _note(
            f"{service} is still disabled service-wide ({override_text(whole)}); "
            f"`etcdisco enable {service}` ends that"
        )


@command("weight")
@click.argument("service")
@click.argument("instance_id", metavar="ID")
@click.argument("weight", type=click.IntRange(min=0), metavar="N")
@click.option("--reason", help="Why, recorded with the override.")
@_for_option
@_by_option
def weight_cmd(
    options: GlobalOptions,
    service: str,
    instance_id: str,
    weight: int,
    reason: str | None,
    duration: str | None,
    by: str | None,
) -> None:
    """Give instance ID of SERVICE the weight N (an integer >= 0) instead of its own.

    Weighted pickers and the xDS control plane use it; 0 means never picked while
    another instance has a weight. A `disable` on the same instance stays.
    """
    expires_in = _check(service, instance_id, duration)

    async def main(stop: asyncio.Event) -> tuple[Override | None, int]:
        async with AsyncClient(settings=options.settings) as client:
            o = await client.set_override(
                service, instance_id, weight=weight, reason=reason, by=by, expires_in=expires_in
            )
            return o, await _registered(client, service, instance_id)

    o, present = run_until_signal(main)
    text = f"weight of {_target(service, instance_id)} set to {weight}"
    if o is not None:
        text += f": {override_text(o)}"
    _say_override(options, "weight", text, o)
    if present == 0:
        _note(
            f"no instance {_target(service, instance_id)} is registered now; the override "
            "applies when it registers"
        )


@command("deregister")
@click.argument("service")
@click.argument("instance_id", metavar="ID")
def deregister_cmd(options: GlobalOptions, service: str, instance_id: str) -> None:
    """Delete the key of instance ID of SERVICE: a stale entry left by a dead process.

    Says whose lease held the key and how long that lease has left. A live instance
    puts its key back within a keepalive round: to take a live instance out of
    rotation, use `etcdisco disable` instead.
    """
    _check(service, instance_id, None)

    async def main(stop: asyncio.Event) -> Any:
        async with AsyncClient(settings=options.settings) as client:
            return await deregister(client, service, instance_id)

    removal = run_until_signal(main)
    if removal is None:
        fail(f"no instance {service}/{instance_id} in etcd")
    inst = removal.instance
    lease = f"{removal.lease:x}" if removal.lease else "none"
    if removal.lease == 0:
        held = "no lease"
    elif removal.ttl_left is None:
        held = f"lease {lease}, time left not readable"
    elif removal.ttl_left < 0:
        held = f"lease {lease}, expired"
    else:
        held = f"lease {lease}, {removal.ttl_left}s left of {removal.granted_ttl}s"
    say(
        options,
        "deregistered",
        f"deregistered {inst.key} -> {inst.address} ({held})",
        key=inst.key,
        address=inst.address,
        lease=lease,
        lease_ttl_left=removal.ttl_left,
        lease_granted_ttl=removal.granted_ttl,
        lease_other_keys=list(removal.other_keys),
        lease_alive=removal.lease_alive,
        advice=removal.advice(),
    )
    if removal.lease_alive or (removal.ttl_left is None and removal.lease):
        click.echo(f"etcdisco: warning: {removal.advice()}", err=True)


OVERRIDES_HEADER = (
    f"{'SERVICE':<20} {'ID':<28} {'DISABLED':<9} {'WEIGHT':<7} {'EXPIRES IN':<11} {'BY':<24} REASON"
)


def _override_row(o: Override, now: float) -> dict[str, Any]:
    return {
        "service": o.service,
        "id": o.instance_id if o.instance_id is not None else "*",
        "disabled": o.disabled,
        "weight": o.weight,
        "reason": o.reason,
        "by": o.by,
        "expires_in": None if o.expires_at is None else max(0.0, round(o.expires_at - now, 1)),
        "expires_at": o.expires_at,
    }


@command("overrides")
@click.argument("service", required=False)
def overrides_cmd(options: GlobalOptions, service: str | None) -> None:
    """List the operators' overrides in force (of SERVICE, or of every service).

    ID `*` is an override of the whole service.
    """
    if service is not None:
        _check(service, None, None)

    async def main(stop: asyncio.Event) -> tuple[Override, ...]:
        async with AsyncClient(settings=options.settings) as client:
            return await client.list_overrides(service)

    found = run_until_signal(main)
    if not found:
        click.echo("no overrides" + (f" of {service}" if service else ""), err=True)
        return
    now = time.time()
    if options.json:
        for o in found:
            click.echo(json.dumps(_override_row(o, now), sort_keys=True))
        return
    click.echo(OVERRIDES_HEADER)
    for o in found:
        row = _override_row(o, now)
        weight = "-" if o.weight is None else str(o.weight)
        expires = "-" if o.expires_at is None else format_duration(o.expires_at - now)
        disabled = "yes" if o.disabled else "no"
        click.echo(
            f"{o.service:<20} {row['id']:<28} {disabled:<9} {weight:<7} {expires:<11} "
            f"{o.by or '-':<24} {o.reason}"
        )
