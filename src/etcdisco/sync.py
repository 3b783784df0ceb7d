"""The sync facade: the async core on a private event-loop thread.

Every blocking method hands a coroutine to that loop and waits for it. User callbacks
never run on the loop: they are queued to one dispatcher thread per client, so a slow
callback cannot stall keepalives or watches.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from ._async_client import AsyncClient
from ._errors import ClosedError, EtcdTimeoutError
from ._expiry import DEFAULT_EXPIRY_PROTECTION, ExpiryProtection
from ._model import DEFAULT_PREFIX, ChangeEvent, Instance, Override
from ._settings import ClientSettings, settings_from
from .discovery import CacheState, EventListener, ServiceCache
from .health import Check, CheckResult
from .registry import Registration, RegistrationState

log = logging.getLogger("etcdisco.sync")

T = TypeVar("T")


class _LoopThread:
    """Owns a private event loop and the thread that runs it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._pid = os.getpid()
        self._stopped = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self._finish()

    def _finish(self) -> None:
        """What asyncio.run does on the way out: cancel what is left and let it end,
        so nothing is destroyed while pending (which Python reports at exit)."""
        loop = self.loop
        try:
            left = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        try:
            self._check_usable()
        except BaseException:
            coro.close()
            raise
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            # The core's own timeouts (EtcdTimeoutError is a TimeoutError) come out of a
            # finished future with their message; only a wait that ran out is ours.
            if future.done():
                raise
            future.cancel()
            raise EtcdTimeoutError(f"operation did not finish within {timeout}s") from None

    def _check_usable(self) -> None:
        if os.getpid() != self._pid:
            # The loop thread did not survive fork(): waiting on it would hang forever.
            raise ClosedError(
                f"this etcdisco Client was created in process {self._pid} and cannot be "
                "used in a forked child; create a new Client after fork()"
            )
        if self._stopped:
            raise ClosedError("client is closed")
        if threading.current_thread() is self._thread:
            raise RuntimeError("blocking etcdisco call made from its own loop thread")

    def stop(self) -> None:
        self._stopped = True
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class _Dispatcher:
    """One thread that runs user callbacks in order."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        self._queue.put(fn)

    def _main(self) -> None:
        while (fn := self._queue.get()) is not None:
            try:
                fn()
            except Exception:
                log.exception("etcdisco callback failed")

    def stop(self) -> None:
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)


class SyncRegistration:
    """A registration seen from sync code (see :class:`etcdisco.Registration`)."""

    def __init__(self, client: Client, reg: Registration) -> None:
        self._client = client
        self._reg = reg
        self._relays: dict[Callable[..., None], Callable[[Registration, Any], None]] = {}

    key = property(lambda self: self._reg.key)
    service = property(lambda self: self._reg.service)
    address = property(lambda self: self._reg.address)
    instance_id = property(lambda self: self._reg.instance_id)

    @property
    def state(self) -> RegistrationState:
        return self._reg.state

    @property
    def metadata(self) -> Mapping[str, Any]:
        return self._reg.metadata

    @property
    def status(self) -> str | None:
        return self._reg.status

    @property
    def in_sync(self) -> bool:
        return self._reg.in_sync

    @property
    def lease_id(self) -> int | None:
        return self._reg.lease_id

    @property
    def ttl(self) -> int:
        return self._reg.ttl

    @property
    def last_keepalive(self) -> float:
        return self._reg.last_keepalive

    @property
    def re_registrations(self) -> int:
        return self._reg.re_registrations

    @property
    def health(self) -> CheckResult | None:
        return self._reg.health

    @property
    def health_failures(self) -> tuple[str, ...]:
        return self._reg.health_failures

    @property
    def withdrawn(self) -> bool:
        return self._reg.withdrawn

    @property
    def value(self) -> bytes:
        return self._reg.value

    def add_listener(self, listener: Callable[[SyncRegistration, RegistrationState], None]) -> None:
        """Like :meth:`Registration.add_listener`; called on the dispatcher thread."""

        def relay(_: Registration, state: RegistrationState) -> None:
            self._client._dispatch.submit(lambda: listener(self, state))

        self._relays[listener] = relay
        self._client._call_in_loop(lambda: self._reg.add_listener(relay))

    def remove_listener(
        self, listener: Callable[[SyncRegistration, RegistrationState], None]
    ) -> None:
        relay = self._relays.pop(listener, None)
        if relay is not None and not self._client._closed:
            self._client._call_in_loop(lambda: self._reg.remove_listener(relay))

    def add_health_listener(
        self, listener: Callable[[SyncRegistration, CheckResult], None]
    ) -> None:
        """Like :meth:`Registration.add_health_listener`; called on the dispatcher thread."""

        def relay(_: Registration, health: CheckResult) -> None:
            self._client._dispatch.submit(lambda: listener(self, health))

        self._client._call_in_loop(lambda: self._reg.add_health_listener(relay))

    def update(self, metadata: Mapping[str, Any]) -> None:
        """See :meth:`Registration.update`."""
        self._client._run(self._reg.update(metadata))

    def drain(self, wait: float = 0.0) -> None:
        """See :meth:`Registration.drain`."""
        self._client._run(self._reg.drain(wait), timeout=wait + self._client._timeout)

    def deregister(self, timeout: float = 5.0) -> None:
        """See :meth:`Registration.deregister`."""
        self._client._run(self._reg.deregister(timeout), timeout=timeout + 1)

    def __enter__(self) -> SyncRegistration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.deregister()


class SyncServiceCache:
    """A discovery cache seen from sync code (see :class:`etcdisco.ServiceCache`)."""

    def __init__(self, client: Client, cache: ServiceCache) -> None:
        self._client = client
        self._cache = cache
        self._events: queue.SimpleQueue[ChangeEvent] | None = None
        # What each listener given to add_listener() or follow() was wrapped in.
        self._relays: dict[Callable[..., None], EventListener] = {}
        self._state_relays: dict[Callable[..., None], Callable[[CacheState], None]] = {}

    @property
    def state(self) -> CacheState:
        return self._cache.state

    @property
    def malformed(self) -> int:
        return self._cache.malformed

    @property
    def revision(self) -> int:
        return self._cache.revision

    @property
    def resyncs(self) -> int:
        return self._cache.resyncs

    @property
    def expiry_protections(self) -> int:
        return self._cache.expiry_protections

    def add_state_listener(self, listener: Callable[[CacheState], None]) -> None:
        """Like :meth:`ServiceCache.add_state_listener`; called on the dispatcher thread."""

        def relay(state: CacheState) -> None:
            self._client._dispatch.submit(lambda: listener(state))

        self._state_relays[listener] = relay
        self._client._call_in_loop(lambda: self._cache.add_state_listener(relay))

    def remove_state_listener(self, listener: Callable[[CacheState], None]) -> None:
        relay = self._state_relays.pop(listener, None)
        if relay is not None and not self._client._closed:
            self._client._call_in_loop(lambda: self._cache.remove_state_listener(relay))

    def instances(self) -> tuple[Instance, ...]:
        """See :meth:`ServiceCache.instances`."""
        # Snapshots are immutable tuples rebuilt on the loop; reading the dict from
        # here races with the loop's updates, so build the tuple there.
        return self._client._run(_snapshot(self._cache))

    def suspects(self) -> tuple[Instance, ...]:
        """Instances held after a mass expiry (see :meth:`ServiceCache.suspects`)."""
        return tuple(i for i in self.instances() if i.suspect)

    def services(self) -> Mapping[str, tuple[Instance, ...]]:
        out: dict[str, list[Instance]] = {}
        for inst in self.instances():
            out.setdefault(inst.service, []).append(inst)
        return {name: tuple(items) for name, items in out.items()}

    def wait_ready(self, timeout: float | None = None) -> None:
        """See :meth:`ServiceCache.wait_ready`."""
        self._client._run(self._cache.wait_ready(timeout))

    def add_listener(self, listener: Callable[[list[ChangeEvent]], None]) -> None:
        """Call ``listener(events)`` with each batch of changes, on the callback thread."""

        def relay(events: list[ChangeEvent]) -> None:
            self._client._dispatch.submit(lambda: listener(events))

        self._relays[listener] = relay
        self._client._call_in_loop(lambda: self._cache.add_listener(relay))

    def follow(self, listener: Callable[[tuple[Instance, ...]], None]) -> None:
        """Call ``listener(instances)`` with the whole current snapshot: once before
        this returns (on this thread), then after every change (on the dispatcher
        thread). Snapshots are built on the loop together with the change, the way
        etcd's Go resolver pushes full state, so nothing reads back into the loop; an
        older snapshot is never delivered after a newer one. Stop with
        :meth:`remove_listener`."""
        lock = threading.Lock()
        delivered = -1
        sequence = itertools.count()

        def deliver(seq: int, snapshot: tuple[Instance, ...]) -> None:
            nonlocal delivered
            with lock:
                if seq > delivered:
                    delivered = seq
                    listener(snapshot)

        def relay(events: list[ChangeEvent]) -> None:  # on the loop
            seq, snapshot = next(sequence), self._cache.instances()
            self._client._dispatch.submit(lambda: deliver(seq, snapshot))

        async def subscribe() -> tuple[int, tuple[Instance, ...]]:
            self._cache.add_listener(relay)
            return next(sequence), self._cache.instances()

        self._relays[listener] = relay
        deliver(*self._client._run(subscribe()))

    def remove_listener(self, listener: Callable[..., None]) -> None:
        relay = self._relays.pop(listener, None)
        # A closed client's caches and their listeners are gone with its loop.
        if relay is not None and not self._client._closed:
            self._client._call_in_loop(lambda: self._cache.remove_listener(relay))

    def next_event(self, timeout: float | None = None) -> ChangeEvent | None:
        """The next change (None after ``timeout``). Events are collected from the
        first call of this method or of iteration on."""
        if self._events is None:
            q: queue.SimpleQueue[ChangeEvent] = queue.SimpleQueue()
            self._events = q

            def feed(events: list[ChangeEvent]) -> None:
                for ev in events:
                    q.put(ev)

            self._client._call_in_loop(lambda: self._cache.add_listener(feed))
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def events(self) -> SyncEventStream:
        """Change events from this call on, as a blocking iterator that ends when the
        cache closes; subscribe before acting on etcd so no change is missed."""
        stream = SyncEventStream(self)

        async def subscribe() -> None:
            self._cache.add_listener(stream._feed)
            self._cache.add_state_listener(stream._state)
            if self._cache.state is CacheState.CLOSED:
                stream._state(CacheState.CLOSED)

        self._client._run(subscribe())
        return stream

    def _unsubscribe(self, stream: SyncEventStream) -> None:
        if not self._client._closed:

            def remove() -> None:
                self._cache.remove_listener(stream._feed)
                self._cache.remove_state_listener(stream._state)

            self._client._call_in_loop(remove)

    def __iter__(self) -> Iterator[ChangeEvent]:
        return iter(self.events())

    def close(self) -> None:
        self._client._run(self._cache.close())

    def __enter__(self) -> SyncServiceCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncEventStream:
    """One subscriber's change events, for sync code: iterate (blocks until the next
    event, ends when the cache closes) or :meth:`get` with a timeout."""

    def __init__(self, cache: SyncServiceCache) -> None:
        self._cache = cache
        self._queue: queue.SimpleQueue[ChangeEvent | None] = queue.SimpleQueue()
        self._ended = False

    # Called on the loop.
    def _feed(self, events: list[ChangeEvent]) -> None:
        for ev in events:
            self._queue.put(ev)

    def _state(self, state: CacheState) -> None:
        if state is CacheState.CLOSED:
            self._queue.put(None)

    def get(self, timeout: float | None = None) -> ChangeEvent | None:
        """The next event; None after ``timeout`` seconds, or once the stream ended."""
        if self._ended:
            return None
        try:
            ev = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if ev is None:
            self._ended = True
        return ev

    def __iter__(self) -> SyncEventStream:
        return self

    def __next__(self) -> ChangeEvent:
        ev = self.get()
        if ev is None:
            raise StopIteration
        return ev

    def close(self) -> None:
        """Stop collecting events (iteration ends)."""
        if not self._ended:
            self._cache._unsubscribe(self)
            self._queue.put(None)

    def __enter__(self) -> SyncEventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _snapshot(cache: ServiceCache) -> tuple[Instance, ...]:
    return cache.instances()


class Client:
    """The blocking twin of :class:`etcdisco.AsyncClient` (same arguments)."""

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
        # Validated here, on the caller's thread, before any thread is started.
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
        self._timeout = self.settings.timeout
        # One wrapper per open registration, so that listeners added through it can be
        # removed through the one `registrations` returns.
        self._wrapped: dict[Registration, SyncRegistration] = {}
        self._loop = _LoopThread("etcdisco-loop")
        self._dispatch = _Dispatcher("etcdisco-callbacks")

        async def make() -> AsyncClient:
            return AsyncClient(settings=self.settings)

        try:
            self._async = self._loop.run(make())
        except BaseException:
            self._loop.stop()
            self._dispatch.stop()
            raise
        self._closed = False

    @property
    def async_client(self) -> AsyncClient:
        return self._async

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self._loop.run(coro, timeout)

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        async def call() -> None:
            fn()

        self._run(call())

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
    ) -> SyncRegistration:
        """See :meth:`AsyncClient.register`; blocks until the first write is done."""

        async def open_() -> Registration:
            return await self._async.register(
                service,
                address,
                instance_id=instance_id,
                metadata=metadata,
                ttl=ttl,
                checks=checks,
                on_failing=on_failing,
            )

        reg = SyncRegistration(self, self._run(open_()))
        self._wrapped = {
            r: w for r, w in self._wrapped.items() if r.state is not RegistrationState.CLOSED
        }
        self._wrapped[reg._reg] = reg
        return reg

    @property
    def registrations(self) -> tuple[SyncRegistration, ...]:
        """The open registrations (see :attr:`AsyncClient.registrations`)."""
        return tuple(
            self._wrapped.get(reg) or SyncRegistration(self, reg)
            for reg in self._async.registrations
        )

    @property
    def watch_count(self) -> int:
        return self._async.watch_count

    @property
    def closed(self) -> bool:
        return self._closed

    def set_override(
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
        """See :meth:`AsyncClient.set_override`."""
        return self._run(
            self._async.set_override(
                service,
                instance_id,
                disabled=disabled,
                weight=weight,
                reason=reason,
                by=by,
                expires_in=expires_in,
            )
        )

    def clear_override(self, service: str, instance_id: str | None = None) -> bool:
        """See :meth:`AsyncClient.clear_override`."""
        return self._run(self._async.clear_override(service, instance_id))

    def list_overrides(self, service: str | None = None) -> tuple[Override, ...]:
        """See :meth:`AsyncClient.list_overrides`."""
        return self._run(self._async.list_overrides(service))

    def remove_instance(self, service: str, instance_id: str) -> Instance | None:
        """See :meth:`AsyncClient.remove_instance`."""
        return self._run(self._async.remove_instance(service, instance_id))

    def list_instances(self, service: str | None = None) -> tuple[Instance, ...]:
        """One read of etcd, no cache (see :meth:`AsyncClient.list_instances`)."""
        return self._run(self._async.list_instances(service))

    def discover(self, service: str) -> SyncServiceCache:
        """See :meth:`AsyncClient.discover`; call ``wait_ready()`` on the result."""

        async def open_() -> ServiceCache:
            return await self._async.discover(service)

        return SyncServiceCache(self, self._run(open_()))

    def discover_all(self) -> SyncServiceCache:
        """See :meth:`AsyncClient.discover_all`."""

        async def open_() -> ServiceCache:
            return await self._async.discover_all()

        return SyncServiceCache(self, self._run(open_()))

    def close(self, timeout: float = 5.0) -> None:
        """Deregister everything (bounded by ``timeout``), stop every cache, and stop
        the loop and callback threads."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._async.close(timeout), timeout=timeout + 2)
        finally:
            self._loop.stop()
            self._dispatch.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
