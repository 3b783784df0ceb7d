"""Operator overrides: take an instance (or a service) out of rotation, change its
weight; kept in etcd apart from the instances' own keys.

Layout (one key per override, JSON value)::

    etcdisco/overrides/<prefix>/<service>          the whole service
    etcdisco/overrides/<prefix>/<service>/<id>     one instance

Never under ``<prefix>/<service>``: Go's naming resolver dialled with
``etcd:///services/echo`` watches the prefix ``services/echo`` without a trailing
slash, so anything starting with it would be read as an endpoint. Keys under
``etcdisco/`` cannot be confused with an instance by any naming reader.

An override outlives the instance's lease (re-registrations and restarts keep it) and
ends when removed or at ``expires_at``: such a key is also bound to a lease of that
length, so etcd deletes it then; readers stop honouring it at ``expires_at`` anyway
(a leader change extends leases).

Readers: one :class:`OverrideWatcher` per client follows the whole override prefix
(overrides are few) and every cache folds the effective override of each instance
(its own over the service's) into the ``Instance`` it hands out; ``Instance.status``
is then ``disabled`` and ``Instance.weight`` the override's, for every picker, channel,
transport and the xDS control plane alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import json
import logging
import math
import socket
import time
from collections.abc import Sequence
from typing import Any, Protocol

from ._errors import ConfigError, MalformedValueError
from ._follow import CacheState, KeyFollower, KeyValues
from ._model import Override, validate_instance_id, validate_service_name
from .etcd import Compare, EtcdClient, KeyValue, Op, WatchEvent, WatchEventType

__all__ = [
    "OVERRIDES_ROOT",
    "OverrideWatcher",
    "decode_override",
    "default_actor",
    "encode_override",
    "make_override",
    "override_key",
    "overrides_prefix",
    "read_overrides",
    "write_override",
]

log = logging.getLogger("etcdisco.discovery")

OVERRIDES_ROOT = "etcdisco/overrides"
_MAX_REASON = 500


def overrides_prefix(prefix: str) -> str:
    """Where the overrides of registry ``prefix`` live (with the trailing slash)."""
    return f"{OVERRIDES_ROOT}/{prefix}/"


def override_key(prefix: str, service: str, instance_id: str | None = None) -> str:
    key = overrides_prefix(prefix) + service
    return key if instance_id is None else f"{key}/{instance_id}"


def _split(prefix: str, key: str) -> tuple[str, str | None] | None:
    rest = key.removeprefix(overrides_prefix(prefix))
    if rest == key or not rest:
        return None
    service, sep, instance_id = rest.partition("/")
    if not service or (sep and (not instance_id or "/" in instance_id)):
        return None
    return service, (instance_id if sep else None)


def encode_override(override: Override) -> bytes:
    value: dict[str, Any] = {"disabled": override.disabled}
    if override.weight is not None:
        value["weight"] = override.weight
    value["reason"] = override.reason
    value["by"] = override.by
    if override.expires_at is not None:
        value["expires_at"] = override.expires_at
    value["created_at"] = override.created_at
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def decode_override(prefix: str, kv: KeyValue) -> Override:
    key = kv.key.decode("utf-8", "replace")
    where = _split(prefix, key)
    if where is None:
        raise MalformedValueError(key, "not an override key")
    try:
        value = json.loads(kv.value)
    except ValueError:
        raise MalformedValueError(key, "override value is not JSON") from None
    if not isinstance(value, dict):
        raise MalformedValueError(key, "override value is not a JSON object")
    disabled = value.get("disabled", False)
    weight = value.get("weight")
    expires_at = value.get("expires_at")
    if not isinstance(disabled, bool):
        raise MalformedValueError(key, "override 'disabled' is not true or false")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int)):
        raise MalformedValueError(key, "override 'weight' is not an integer")
    if expires_at is not None and not isinstance(expires_at, int | float):
        raise MalformedValueError(key, "override 'expires_at' is not a number")
    return Override(
        service=where[0],
        instance_id=where[1],
        disabled=disabled,
        weight=weight,
        reason=str(value.get("reason", "")),
        by=str(value.get("by", "")),
        expires_at=float(expires_at) if expires_at is not None else None,
        created_at=float(value.get("created_at") or 0.0),
        key=key,
        revision=kv.mod_revision,
    )


def make_override(
    service: str,
    instance_id: str | None,
    *,
    disabled: bool,
    weight: int | None,
    reason: str,
    by: str,
    expires_in: float | None,
    now: float,
) -> Override:
    """A validated override (refusing bad input before anything is written)."""
    validate_service_name(service)
    if instance_id is not None:
        validate_instance_id(instance_id)
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int)):
        raise ConfigError(f"weight must be an integer >= 0, not {weight!r}")
    if weight is not None and weight < 0:
        raise ConfigError(f"weight must be an integer >= 0, not {weight!r}")
    if not isinstance(reason, str) or len(reason) > _MAX_REASON:
        raise ConfigError(f"reason must be a string of at most {_MAX_REASON} characters")
    if expires_in is not None and (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, int | float)
        or not math.isfinite(expires_in)
        or expires_in <= 0
    ):
        raise ConfigError(f"expiry must be a positive number of seconds, not {expires_in!r}")
    return Override(
        service=service,
        instance_id=instance_id,
        disabled=disabled,
        weight=weight,
        reason=reason,
        by=by,
        expires_at=None if expires_in is None else now + float(expires_in),
        created_at=now,
    )


class OverrideListener(Protocol):
    def overrides_changed(self, services: set[str]) -> None: ...


class OverrideWatcher(KeyFollower[KeyValues]):
    """Every override of one registry prefix, followed live; shared by the client's
    caches (started with the first, stopped with the last)."""

    def __init__(self, etcd: EtcdClient, prefix: str) -> None:
        super().__init__(etcd, overrides_prefix(prefix))
        self.prefix = prefix
        self._by_key: dict[str, Override] = {}
        # service -> {instance id or None: override}
        self._by_service: dict[str, dict[str | None, Override]] = {}
        self._listeners: list[OverrideListener] = []
        self._timer: asyncio.TimerHandle | None = None
        self.malformed = 0
        self.settled = asyncio.Event()
        """Set after the first listing, or the first failure to list (a client that
        may not read overrides still discovers instances)."""

    # -- readers -------------------------------------------------------------------

    def covers(self, service: str) -> bool:
        return service in self._by_service

    def effective(self, service: str, instance_id: str) -> Override | None:
        """The override in force for an instance: its own over its service's."""
        entries = self._by_service.get(service)
        if not entries:
            return None
        now = time.time()
        own = entries.get(instance_id)
        whole = entries.get(None)
        if own is not None and own.expired(now):
            own = None
        if whole is not None and whole.expired(now):
            whole = None
        if own is None:
            return whole
        return own.merged_with(whole)

    def all(self) -> tuple[Override, ...]:
        now = time.time()
        return tuple(o for _, o in sorted(self._by_key.items()) if not o.expired(now))

    # -- listeners -----------------------------------------------------------------

    def attach(self, listener: OverrideListener) -> None:
        self._listeners.append(listener)
        self._start()

    async def detach(self, listener: OverrideListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
        if not self._listeners:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            await self._stop()
            # Started afresh by the next cache: its first listing settles again.
            self._ready.clear()
            self.settled.clear()
            self.state = CacheState.CONNECTING

    def _tell(self, services: set[str]) -> None:
        self._schedule_expiry()
        if services:
            for listener in list(self._listeners):
                listener.overrides_changed(services)

    # -- what the follower hands over ------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        if not self.settled.is_set():
            log.warning(
                "overrides under %s not readable (%s); going on without", self.key_prefix, exc
            )
            self.settled.set()

    def _decode(self, kv: KeyValue) -> Override | None:
        try:
            return decode_override(self.prefix, kv)
        except MalformedValueError as exc:
            self.malformed += 1
            log.warning("skipping %s", exc)
            return None

    def _new_listing(self) -> KeyValues:
        return KeyValues()

    def _loaded(self, listing: KeyValues) -> None:
        before = set(self._by_service)
        self._by_key = {}
        self._by_service = {}
        for kv in listing:
            override = self._decode(kv)
            if override is not None:
                self._put(override)
        self.settled.set()
        self._tell(before | set(self._by_service))

    def _applied(self, events: Sequence[WatchEvent]) -> None:
        touched: set[str] = set()
        for ev in events:
            key = ev.kv.key.decode("utf-8", "replace")
            old = self._by_key.pop(key, None)
            if old is not None:
                self._by_service[old.service].pop(old.instance_id, None)
                if not self._by_service[old.service]:
                    del self._by_service[old.service]
                touched.add(old.service)
            if ev.type is WatchEventType.PUT:
                override = self._decode(ev.kv)
                if override is not None:
                    self._put(override)
                    touched.add(override.service)
        self._tell(touched)

    def _put(self, override: Override) -> None:
        self._by_key[override.key] = override
        self._by_service.setdefault(override.service, {})[override.instance_id] = override

    def _schedule_expiry(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = time.time()
        due = [o.expires_at for o in self._by_key.values() if o.expires_at and o.expires_at > now]
        if due and self.running:
            self._timer = asyncio.get_running_loop().call_later(
                min(due) - now + 0.01, self._expire_due
            )

    def _expire_due(self) -> None:
        self._timer = None
        now = time.time()
        services = {
            o.service
            for o in self._by_key.values()
            if o.expires_at is not None and o.expires_at <= now
        }
        self._tell(services)


def default_actor() -> str:
    """Who acts, when not said: ``user@host``."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


async def write_override(
    etcd: EtcdClient,
    prefix: str,
    service: str,
    instance_id: str | None,
    *,
    disabled: bool | None,
    weight: int | None,
    reason: str | None,
    by: str | None,
    expires_in: float | None,
) -> Override | None:
    """Set fields of the override at (service, instance_id), keeping the fields given
    as None; returns the override, or None when nothing is left to override (the key
    is then deleted). Compare-and-swap on the key's revision, so two operators acting
    at once never lose each other's field."""
    key = override_key(prefix, service, instance_id)
    while True:
        now = time.time()
        current = await etcd.get(key)
        old = None
        if current.kvs:
            try:
                old = decode_override(prefix, current.kvs[0])
            except MalformedValueError:
                old = None  # replaced whole
            if old is not None and old.expired(now):
                old = None
        keep_expiry = expires_in is None and old is not None and old.expires_at is not None
        fresh = make_override(
            service,
            instance_id,
            disabled=disabled if disabled is not None else (old.disabled if old else False),
            weight=weight if weight is not None else (old.weight if old else None),
            reason=reason if reason is not None else (old.reason if old else ""),
            by=by if by is not None else default_actor(),
            expires_in=(
                (old.expires_at - now) if keep_expiry and old and old.expires_at else expires_in
            ),
            now=now,
        )
        guard = [
            Compare.mod_revision(key, "==", current.kvs[0].mod_revision)
            if current.kvs
            else Compare.version(key, "==", 0)
        ]
        if not fresh.disabled and fresh.weight is None:
            result = await etcd.txn(guard, [Op.delete(key)])
            if result.succeeded:
                return None
            continue
        lease = 0
        if keep_expiry and current.kvs:
            lease = current.kvs[0].lease
        elif fresh.expires_at is not None:
            # etcd removes the key at the end too; a second of slack keeps the reader's
            # own clock (expires_at) the one that decides.
            lease = (await etcd.lease_grant(math.ceil(fresh.expires_at - now) + 1)).id
        result = await etcd.txn(guard, [Op.put(key, encode_override(fresh), lease=lease)])
        if result.succeeded:
            return dataclasses.replace(fresh, key=key, revision=result.revision)


async def read_overrides(
    etcd: EtcdClient, prefix: str, service: str | None = None
) -> tuple[Override, ...]:
    """One read of the overrides in force (of ``service``, or of all)."""
    where = overrides_prefix(prefix) + (service if service is not None else "")
    result = await etcd.get(where, prefix=True)
    now = time.time()
    found = []
    for kv in result.kvs:
        try:
            override = decode_override(prefix, kv)
        except MalformedValueError:
            continue
        if (service is None or override.service == service) and not override.expired(now):
            found.append(override)
    return tuple(sorted(found, key=lambda o: (o.service, o.instance_id or "")))
