"""What the operator's tools share: the admin commands of the command line and the
dashboard's actions call these, so a click on the page does what the command does.

- :func:`parse_duration` / :func:`format_duration`: ``90s``, ``30m``, ``2h``, ``1d``,
  ``1h30m``;
- :func:`status_word`: the status column (the effective status, or ``suspect``);
- :func:`with_overrides`: instances from a one-shot read (``list_instances``) with the
  overrides in force folded in, as a cache folds them;
- :func:`effective_instances`: that, read from etcd (overrides skipped, with a
  reason, when this client may not read them);
- :func:`deregister`: delete a stale instance key and report the lease that held it
  (how long it has left, which keys it still holds).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ._async_client import AsyncClient
from ._errors import AuthError, ConfigError
from ._model import Instance, Override, Status

__all__ = [
    "Removal",
    "deregister",
    "effective_instances",
    "format_duration",
    "parse_duration",
    "status_word",
    "with_overrides",
]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
# A year: longer than that is a typo, not a maintenance window.
_MAX_SECONDS = 366 * 86400


def parse_duration(text: str) -> float:
    """Seconds from ``90s``, ``30m``, ``2h``, ``1d`` or a sum such as ``1h30m``;
    ConfigError for anything else (a bare number, a negative or zero duration)."""
    cleaned = text.strip().lower()
    pos = 0
    total = 0.0
    for match in _PART.finditer(cleaned):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not cleaned or pos != len(cleaned):
        raise ConfigError(
            f"duration {text!r} is not a number with a unit: 90s, 30m, 2h, 1d or 1h30m"
        )
    if total <= 0 or not math.isfinite(total):
        raise ConfigError(f"duration {text!r} must be longer than 0s")
    if total > _MAX_SECONDS:
        raise ConfigError(f"duration {text!r} is longer than a year")
    return total


def format_duration(seconds: float) -> str:
    """``1h30m``, ``45s``, ``2d3h``: the two largest units, rounded down (``0s`` for
    less than a second)."""
    left = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
        if len(parts) == 2:
            break
    return "".join(parts)


def status_word(inst: Instance) -> str:
    """The effective status (``up``, ``draining``, ``unhealthy``, ``disabled``), or
    ``suspect`` for an instance whose last word was up but that is gone from etcd and
    kept after a mass expiry."""
    if inst.suspect and inst.status is Status.UP:
        return "suspect"
    return inst.status.value


def with_overrides(
    instances: Iterable[Instance], overrides: Iterable[Override]
) -> tuple[Instance, ...]:
    """``instances`` with the override in force for each (its own over its
    service's, as ``OverrideWatcher.effective`` merges them)."""
    table: dict[tuple[str, str | None], Override] = {}
    for o in overrides:
        if not o.expired():
            table[(o.service, o.instance_id)] = o
    if not table:
        return tuple(instances)
    out = []
    for inst in instances:
        own = table.get((inst.service, inst.id))
        whole = table.get((inst.service, None))
        effective = own.merged_with(whole) if own is not None else whole
        out.append(inst if effective is None else dataclasses.replace(inst, override=effective))
    return tuple(out)


async def effective_instances(
    client: AsyncClient, service: str | None = None
) -> tuple[tuple[Instance, ...], str | None]:
    """The instances of ``service`` (or of all) with their overrides, and a note when
    the overrides could not be read (a user without read on ``etcdisco/overrides/``):
    the instances are then as they wrote themselves."""
    instances = await client.list_instances(service)
    try:
        overrides = await client.list_overrides(service)
    except AuthError as exc:
        return instances, f"overrides not shown: {exc}"
    return with_overrides(instances, overrides), None


@dataclass(frozen=True)
class Removal:
    """What :func:`deregister` removed: the instance, and its lease as etcd saw it
    right after (``ttl_left`` -1: expired or revoked; None: not readable)."""

    instance: Instance
    lease: int
    ttl_left: int | None
    granted_ttl: int | None
    other_keys: Sequence[str]

    @property
    def lease_alive(self) -> bool:
        return self.lease != 0 and self.ttl_left is not None and self.ttl_left >= 0

    def advice(self) -> str:
        """One sentence on what happens next, for the operator."""
        if self.lease == 0:
            return "it had no lease: nothing will put it back"
        if self.ttl_left is None:
            return (
                f"lease {self.lease:x} could not be read: if its instance is alive it "
                f"puts the key back within a keepalive round; take it out of rotation with "
                f"`etcdisco disable {self.instance.service} {self.instance.id}` instead"
            )
        if self.ttl_left < 0:
            return f"its lease {self.lease:x} has expired: the instance is gone"
        others = f", and holds {len(self.other_keys)} other key(s)" if self.other_keys else ""
        return (
            f"its lease {self.lease:x} is still alive ({self.ttl_left}s left of "
            f"{self.granted_ttl}s{others}): a live instance puts its key back within a "
            f"keepalive round; to take it out of rotation use `etcdisco disable "
            f"{self.instance.service} {self.instance.id}`"
        )


async def deregister(client: AsyncClient, service: str, instance_id: str) -> Removal | None:
    """Delete the key of ``service``/``instance_id`` (a stale entry) and say whose
    lease held it and how long that lease has left; None when there was no key."""
    inst = await client.remove_instance(service, instance_id)
    if inst is None:
        return None
    ttl: int | None = None
    granted: int | None = None
    keys: list[str] = []
    if inst.lease:
        try:
            info = await client.etcd.lease_time_to_live(inst.lease, keys=True)
        except AuthError:
            pass  # etcd 3.5 wants read on every key of the lease; the key is gone anyway
        else:
            ttl, granted = info.ttl, info.granted_ttl
            keys = sorted(k.decode("utf-8", "replace") for k in info.keys)
    return Removal(inst, inst.lease, ttl, granted, tuple(k for k in keys if k != inst.key))
