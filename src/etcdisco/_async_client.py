"""AsyncClient: the async core that owns the etcd client, leases and watchers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from ._errors import ClosedError, ConfigError, MalformedValueError
from ._expiry import DEFAULT_EXPIRY_PROTECTION, ExpiryProtection
from ._model import (
    DEFAULT_PREFIX,
    Instance,
    Override,
    decode_instance,
    instance_key,
    service_prefix,
    validate_instance_id,
    validate_service_name,
)
from ._overrides import OverrideWatcher, override_key, read_overrides, write_override
from ._settings import ClientSettings, settings_from
from .discovery import PrefixWatcher, ServiceCache
from .etcd import EtcdClient
from .health import Check
from .registry import (
    LeaseKeeper,
    Registration,
    RegistrationState,
    make_registration,
    validate_ttl,
)

log = logging.getLogger("etcdisco")

T = TypeVar("T", Registration, ServiceCache)


class _Opening(Generic[T]):
    """Lets ``await client.register(...)`` and ``async with client.register(...)``
    both work: the first keeps the object, the second closes it on exit."""

    def __init__(self, opener: Callable[[], Awaitable[T]]) -> None:
        self._opener: Callable[[], Awaitable[T]] = opener
        self._value: T | None = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._opener().__await__()

    async def __aenter__(self) -> T:
        self._value = await self._opener()
        return self._value

    async def __aexit__(self, *exc: object) -> None:
        if self._value is not None:
            if isinstance(self._value, Registration):
                await self._value.deregister()
            else:
                await self._value.close()


class AsyncClient:
    """Registers instances and discovers services in etcd.

    ``endpoints`` defaults to ``$ETCDISCO_ENDPOINTS``, else ``127.0.0.1:2379``.

    >>> async with AsyncClient("127.0.0.1:2379") as client:        # doctest: +SKIP
    ...     async with client.register("echo", "10.0.0.5:50051"):
    ...         async with client.discover("echo") as cache:
    ...             await cache.wait_ready()
    ...             print(cache.instances())
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        cacert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
        expiry_protection: ExpiryProtection | None = DEFAULT_EXPIRY_PROTECTION,
        settings: ClientSettings | None = None,
    ) -> None:
        self.settings = settings_from(
            endpoints,
            prefix=prefix,
            cacert=cacert,
            cert=cert,
            key=key,
            username=username,
            password=password,
            timeout=timeout,
            expiry_protection=expiry_protection,
            settings=settings,
        )
        self.prefix = self.settings.prefix
        # None turns mass-expiry protection off for every cache of this client.
        self.expiry_protection = self.settings.expiry_protection
        etcd = EtcdClient(config=self.settings.etcd)
        self.etcd = etcd
        self._stream = etcd.keepalive_stream()
        self._keepers: dict[int, LeaseKeeper[Registration]] = {}
        # Keys of this client's open registrations, whatever their TTL (a key in two
        # keepers would be two leases fighting over one key).
        self._claims: dict[str, Registration] = {}
        self._watchers: dict[str, PrefixWatcher] = {}
        # Every cache folds operator overrides in; one watch of them per client.
        self._overrides = OverrideWatcher(etcd, self.prefix)
        self._closed = False

    # -- registration --------------------------------------------------------------

    def register(
        self,
        service: str,
        address: str,
        *,
        instance_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        ttl: int = 10,
        checks: Sequence[Check] = (),
        on_failing: str = "mark",
    ) -> _Opening[Registration]:
        """Register an instance; it stays registered (and heals) until deregistered.

        Input is validated before anything is written. Await it, or use it as an
        async context manager to deregister on exit. With ``checks``
        (:mod:`etcdisco.health`), the instance is probed once before the first write
        and then on the checks' schedule; while failing it is written with status
        ``unhealthy`` (``on_failing="mark"``) or its key is withdrawn
        (``on_failing="withdraw"``), under the same lease either way.
        """
        ttl = validate_ttl(ttl)

        async def open_() -> Registration:
            self._check_open()
            keeper = self._keepers.get(ttl)
            if keeper is None:
                keeper = self._keepers[ttl] = LeaseKeeper(self.etcd, self._stream, ttl)
            reg = make_registration(
                keeper,
                prefix=self.prefix,
                service=service,
                address=address,
                instance_id=instance_id,
                metadata=metadata,
                checks=checks,
                on_failing=on_failing,
            )
            held = self._claims.get(reg.key)
            if held is not None:
                raise ConfigError(
                    f"{reg.key} is already registered by this client (ttl {held.ttl}s)"
                )
            self._claims[reg.key] = reg
            reg.add_listener(self._release_claim)
            try:
                await reg._open()
            except BaseException:
                self._release_claim(reg, RegistrationState.CLOSED)
                raise
            return reg

        return _Opening(open_)

    def _release_claim(self, reg: Registration, state: RegistrationState) -> None:
        if state is RegistrationState.CLOSED and self._claims.get(reg.key) is reg:
            del self._claims[reg.key]

    @property
    def registrations(self) -> tuple[Registration, ...]:
        return tuple(r for k in self._keepers.values() for r in k.registrations)

    # -- discovery -----------------------------------------------------------------

    def discover(self, service: str) -> _Opening[ServiceCache]:
        """A cache of ``service``'s instances, following etcd until closed."""
        name = validate_service_name(service)
        return _Opening(lambda: self._open_cache(service_prefix(self.prefix, name), name))

    def discover_all(self) -> _Opening[ServiceCache]:
        """A cache of every instance of every service under the prefix."""
        return _Opening(lambda: self._open_cache(self.prefix + "/", None))

    async def list_instances(self, service: str | None = None) -> tuple[Instance, ...]:
        """One read of etcd, no cache: the instances of ``service`` (or of all).

        Malformed values are skipped, as in a cache."""
        self._check_open()
        key_prefix = (
            service_prefix(self.prefix, validate_service_name(service))
            if service
            else self.prefix + "/"
        )
        found: list[Instance] = []
        # Each page is decoded while etcd reads the next (get_prefix_pages asks ahead).
        async for page in self.etcd.get_prefix_pages(key_prefix):
            for kv in page.kvs:
                try:
                    found.append(
                        decode_instance(self.prefix, kv.key, kv.value, kv.mod_revision, kv.lease)
                    )
                except MalformedValueError as exc:
                    log.warning("skipping %s", exc)
        return tuple(sorted(found, key=lambda i: (i.service, i.id)))

    async def _open_cache(self, key_prefix: str, service: str | None) -> ServiceCache:
        self._check_open()
        watcher = self._watchers.get(key_prefix)
        if watcher is None:
            watcher = self._watchers[key_prefix] = PrefixWatcher(
                self.etcd,
                self.prefix,
                key_prefix,
                on_idle=self._forget_watcher,
                expiry=self.expiry_protection,
                overrides=self._overrides,
            )
        cache = ServiceCache(watcher, service)
        watcher.subscribe(cache)
        return cache

    def _forget_watcher(self, watcher: PrefixWatcher) -> None:
        if self._watchers.get(watcher.key_prefix) is watcher:
            del self._watchers[watcher.key_prefix]

    @property
    def lease_keepers(self) -> tuple[LeaseKeeper[Registration], ...]:
        """The leases this client keeps alive, one per TTL in use (read them, do not
        drive them: metrics and readiness probes)."""
        return tuple(self._keepers.values())

    @property
    def watchers(self) -> tuple[PrefixWatcher, ...]:
        """The list + watch loops this client runs, one per watched prefix (read them,
        do not drive them)."""
        return tuple(self._watchers.values())

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def watch_count(self) -> int:
        """Watches this client holds open (one per distinct prefix)."""
        return len(self._watchers)

    # -- operator overrides --------------------------------------------------------

    async def set_override(
        self,
        service: str,
        instance_id: str | None = None,
        *,
        disabled: bool | None = None,
        weight: int | None = None,
        reason: str | None = None,
        by: str | None = None,
        expires_in: float | None = None,
    ) -> Override | None:
        """Set an operator override on one instance (or, without ``instance_id``, on
        the whole service): ``disabled=True`` takes it out of rotation for every
        reader, ``weight`` replaces its own. Fields left None keep their current value;
        ``by`` defaults to ``user@host``; ``expires_in`` seconds ends it by itself.
        The override lives apart from the instance's lease: it survives
        re-registration and restarts. Returns None when nothing is left to override
        (``disabled=False`` without a weight removes it)."""
        self._check_open()
        validate_service_name(service)
        return await write_override(
            self.etcd,
            self.prefix,
            service,
            instance_id,
            disabled=disabled,
            weight=weight,
            reason=reason,
            by=by,
            expires_in=expires_in,
        )

    async def clear_override(self, service: str, instance_id: str | None = None) -> bool:
        """Remove the override on an instance (or the service's own); True if there
        was one."""
        self._check_open()
        validate_service_name(service)
        if instance_id is not None:
            validate_instance_id(instance_id)
        result = await self.etcd.delete(override_key(self.prefix, service, instance_id))
        return result.deleted > 0

    async def list_overrides(self, service: str | None = None) -> tuple[Override, ...]:
        """One read of etcd: the overrides in force (of ``service``, or all)."""
        self._check_open()
        if service is not None:
            validate_service_name(service)
        return await read_overrides(self.etcd, self.prefix, service)

    async def remove_instance(self, service: str, instance_id: str) -> Instance | None:
        """Delete an instance's key from etcd (a stale entry, say) and return what it
        was, with the lease that held it; None when there was none. A live instance
        puts its key back within a keepalive round: take it out of rotation with an
        override instead."""
        self._check_open()
        key = instance_key(self.prefix, validate_service_name(service), instance_id)
        result = await self.etcd.delete(key, prev_kv=True)
        for kv in result.prev_kvs:
            with contextlib.suppress(MalformedValueError):
                return decode_instance(self.prefix, kv.key, kv.value, kv.mod_revision, kv.lease)
        return None

    # -- lifecycle -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("client is closed")

    async def close(self, timeout: float = 5.0) -> None:
        """Deregister every registration (bounded by ``timeout``), stop every cache,
        and close the connection."""
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(k.close(timeout) for k in self._keepers.values()))
        await asyncio.gather(*(w.stop() for w in list(self._watchers.values())))
        self._watchers.clear()
        await self._overrides._stop()
        await self._stream.close()
        await self.etcd.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
