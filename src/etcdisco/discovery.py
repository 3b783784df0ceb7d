"""Discovery: a local cache of a service's instances that follows etcd.

A :class:`PrefixWatcher` owns one list + watch loop per key prefix and client (the
loop itself is ``_follow.KeyFollower``); every :class:`ServiceCache` on that prefix
subscribes to it, so many caches cost etcd one watch. A compaction makes it re-list
and emit only the difference. Errors never empty the cache: while etcd is unreachable
the last known instances stay served and the state says ``stale``. Operator overrides
(``_overrides``) are folded into the instances, so every reader honours them.

With :class:`~etcdisco.ExpiryProtection` (on by default), instances that vanish by
lease expiry together are kept as ``suspect`` for a while (see ``_expiry``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence

from ._errors import EtcdTimeoutError, MalformedValueError
from ._expiry import ExpiryGuard, ExpiryProtection, InstanceTable
from ._follow import CacheState, KeyFollower
from ._model import ChangeEvent, EventType, Instance, decode_instance, diff, same_content
from ._overrides import OverrideWatcher
from .etcd import EtcdClient, KeyValue, WatchEvent, WatchEventType

__all__ = ["CacheState", "EventListener", "EventStream", "PrefixWatcher", "ServiceCache"]

log = logging.getLogger("etcdisco.discovery")


EventListener = Callable[[list[ChangeEvent]], None]


class PrefixWatcher(KeyFollower["_InstanceListing"]):
    """The instances under one prefix, kept by one list + watch loop; shared by the
    caches on it. Operator overrides (``overrides``) are folded into the instances it
    hands out."""

    def __init__(
        self,
        etcd: EtcdClient,
        root: str,
        key_prefix: str,
        *,
        on_idle: Callable[[PrefixWatcher], None],
        expiry: ExpiryProtection | None = None,
        overrides: OverrideWatcher | None = None,
    ) -> None:
        super().__init__(etcd, key_prefix)
        self.root = root  # the registry prefix, e.g. "services"
        self._on_idle = on_idle
        self.instances = InstanceTable()
        self._snapshot: tuple[Instance, ...] | None = None
        self._bad_keys: set[str] = set()
        self.malformed = 0
        self._subscribers: list[ServiceCache] = []
        self._expiry = ExpiryGuard(expiry) if expiry is not None else None
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._overrides = overrides

    @property
    def expiry_protections(self) -> int:
        """How many times mass-expiry protection engaged."""
        return self._expiry.engagements if self._expiry is not None else 0

    # -- subscribers ---------------------------------------------------------------

    def subscribe(self, cache: ServiceCache) -> None:
        self._subscribers.append(cache)
        if not self.running:
            if self._overrides is not None:
                self._overrides.attach(self)
            self._start()

    async def unsubscribe(self, cache: ServiceCache) -> None:
        if cache in self._subscribers:
            self._subscribers.remove(cache)
        if not self._subscribers:
            self._on_idle(self)
            await self.stop()

    async def stop(self) -> None:
        """Stop following etcd and end every subscriber (their iterations end too)."""
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if self._overrides is not None:
            await self._overrides.detach(self)
        await self._stop()
        subscribers, self._subscribers = self._subscribers, []
        for cache in subscribers:
            cache._end()

    async def wait_ready(self) -> None:
        """The first listing is in, and the overrides' (or their first failure: a
        client that may not read them still discovers)."""
        await self._ready.wait()
        if self._overrides is not None:
            await self._overrides.settled.wait()

    def _state_changed(self, old: CacheState, new: CacheState) -> None:
        for cache in list(self._subscribers):
            cache._state_changed(new)

    def snapshot(self) -> tuple[Instance, ...]:
        """The instances as a sorted tuple, rebuilt only after a change: pickers
        recognise an unchanged snapshot by identity and keep their derived state."""
        if self._snapshot is None:
            self._snapshot = tuple(sorted(self.instances.values(), key=lambda i: (i.service, i.id)))
        return self._snapshot

    def _publish(self, events: list[ChangeEvent]) -> None:
        # Every change to ``instances`` ends here, so this is where the snapshot ages.
        self._snapshot = None
        if self._expiry is not None:
            self._schedule_expiry()
        if events:
            for cache in list(self._subscribers):
                cache._deliver(events)

    def _schedule_expiry(self) -> None:
        assert self._expiry is not None
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        delay = self._expiry.seconds_to_next()
        if delay is not None and self.running:
            self._expiry_timer = asyncio.get_running_loop().call_later(delay, self._expire_due)

    def _expire_due(self) -> None:
        self._expiry_timer = None
        if self._expiry is not None:
            self._publish(self._expiry.expire(self.instances))

    # -- overrides -----------------------------------------------------------------

    def _with_override(self, inst: Instance) -> Instance:
        store = self._overrides
        if store is None or not store.covers(inst.service):
            return inst
        override = store.effective(inst.service, inst.id)
        return inst if override is None else dataclasses.replace(inst, override=override)

    def overrides_changed(self, services: set[str]) -> None:
        """The overrides of ``services`` changed (or expired): re-derive their
        instances and tell subscribers what that changed."""
        store = self._overrides
        if store is None:
            return
        changes: list[ChangeEvent] = []
        for key, inst in list(self.instances.items()):
            if inst.service not in services:
                continue
            override = store.effective(inst.service, inst.id)
            if override != inst.override:
                fresh = dataclasses.replace(inst, override=override)
                self.instances[key] = fresh
                changes.append(ChangeEvent(EventType.UPDATED, fresh, inst))
        if changes:
            self._publish(changes)

    # -- what the follower hands over ------------------------------------------------

    def _new_listing(self) -> _InstanceListing:
        return _InstanceListing(self._decode)

    def _loaded(self, listing: _InstanceListing) -> None:
        fresh = listing.instances
        if self._expiry is not None:
            self._expiry.carry(fresh)
        events = diff(self.instances, fresh)
        self.instances = fresh
        self._bad_keys = listing.bad
        self._publish(events)

    def _applied(self, events: Sequence[WatchEvent]) -> None:
        changes: list[ChangeEvent] = []
        for ev in events:
            kv: KeyValue = ev.kv
            key = kv.key.decode("utf-8", "replace")
            old = self.instances.get(key)
            if ev.type is WatchEventType.DELETE:
                self._bad_keys.discard(key)
                if old is not None and self._expiry is not None:
                    changes.extend(self._expiry.deleted(old, self.instances))
                elif old is not None:
                    del self.instances[key]
                    changes.append(ChangeEvent(EventType.REMOVED, old, None))
            else:
                if self._expiry is not None:
                    self._expiry.returned(key)
                inst = self._decode(kv)
                if inst is None:
                    self._bad_keys.add(key)
                    # A key that turned to garbage no longer names a usable instance.
                    if old is not None:
                        del self.instances[key]
                        changes.append(ChangeEvent(EventType.REMOVED, old, None))
                else:
                    self._bad_keys.discard(key)
                    self.instances[key] = inst
                    if old is None:
                        changes.append(ChangeEvent(EventType.ADDED, inst, None))
                    elif not same_content(old, inst):
                        changes.append(ChangeEvent(EventType.UPDATED, inst, old))
        if self._expiry is not None:
            self._expiry.report()
        self._publish(changes)

    def _decode(
        self, kv: KeyValue, revision: int | None = None, lease: int | None = None
    ) -> Instance | None:
        try:
            inst = decode_instance(
                self.root,
                kv.key,
                kv.value,
                kv.mod_revision if revision is None else revision,
                kv.lease if lease is None else lease,
            )
        except MalformedValueError as exc:
            self.malformed += 1
            # One warning per bad key per process keeps logs readable under garbage.
            key = kv.key.decode("utf-8", "replace")
            if key not in self._bad_keys:
                log.warning("skipping %s", exc)
            return None
        return self._with_override(inst)


class _InstanceListing:
    """A listing decoded page by page into a fresh table.

    Revisions and lease ids repeat across keys (one lease per registering process,
    one revision per transaction): each distinct number is kept once, which at
    100,000 instances saves tens of bytes per instance."""

    def __init__(self, decode: Callable[[KeyValue, int, int], Instance | None]) -> None:
        self._decode = decode
        self.instances = InstanceTable()
        self.bad: set[str] = set()
        self._numbers: dict[int, int] = {}

    def add(self, kvs: Sequence[KeyValue]) -> None:
        numbers = self._numbers.setdefault
        for kv in kvs:
            inst = self._decode(
                kv, numbers(kv.mod_revision, kv.mod_revision), numbers(kv.lease, kv.lease)
            )
            if inst is None:
                self.bad.add(kv.key.decode("utf-8", "replace"))
            else:
                self.instances[inst.key] = inst


class ServiceCache:
    """The instances of one service (or of every service), kept current.

    ``instances()`` is an immutable snapshot; iterate the cache (``async for``) for
    :class:`ChangeEvent` values; ``wait_ready()`` waits for the first full list.
    """

    def __init__(self, watcher: PrefixWatcher, service: str | None) -> None:
        self._watcher = watcher
        self.service = service
        self._queues: list[asyncio.Queue[ChangeEvent | None]] = []
        self._listeners: list[EventListener] = []
        self._state_listeners: list[Callable[[CacheState], None]] = []
        self._told: CacheState | None = None  # the last state its listeners heard
        self._closed = False

    @property
    def state(self) -> CacheState:
        return CacheState.CLOSED if self._closed else self._watcher.state

    @property
    def revision(self) -> int:
        return self._watcher.revision

    @property
    def malformed(self) -> int:
        """How many malformed values were skipped so far."""
        return self._watcher.malformed

    @property
    def resyncs(self) -> int:
        return self._watcher.resyncs

    @property
    def expiry_protections(self) -> int:
        """How many times mass-expiry protection engaged on this cache's prefix."""
        return self._watcher.expiry_protections

    def instances(self) -> tuple[Instance, ...]:
        """Every known instance, suspects included (``Instance.suspect``); give it to
        a picker, which prefers live instances (see ``etcdisco._model.usable``)."""
        return self._watcher.snapshot()

    def suspects(self) -> tuple[Instance, ...]:
        """Instances held after a mass expiry: gone from etcd, kept for a while."""
        return tuple(i for i in self.instances() if i.suspect)

    def services(self) -> Mapping[str, tuple[Instance, ...]]:
        out: dict[str, list[Instance]] = {}
        for inst in self.instances():
            out.setdefault(inst.service, []).append(inst)
        return {name: tuple(items) for name, items in out.items()}

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the first list has been loaded."""
        try:
            async with asyncio.timeout(timeout):
                await self._watcher.wait_ready()
        except TimeoutError:
            err = self._watcher.last_error
            detail = f": {err}" if err else f" (etcd endpoints: {self._watcher.endpoints})"
            raise EtcdTimeoutError(
                f"cache for {self._watcher.key_prefix} not ready after {timeout}s{detail}"
            ) from None

    def add_listener(self, listener: EventListener) -> None:
        """Call ``listener(events)`` with each batch of changes (on the event loop)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: EventListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def add_state_listener(self, listener: Callable[[CacheState], None]) -> None:
        """Call ``listener(state)`` on every change of :attr:`state` (on the event
        loop), ``closed`` last."""
        self._state_listeners.append(listener)

    def remove_state_listener(self, listener: Callable[[CacheState], None]) -> None:
        if listener in self._state_listeners:
            self._state_listeners.remove(listener)

    def _deliver(self, events: list[ChangeEvent]) -> None:
        for q in self._queues:
            for ev in events:
                q.put_nowait(ev)
        for listener in list(self._listeners):
            try:
                listener(events)
            except Exception:
                log.exception("cache listener failed")

    def _end(self) -> None:
        """The watcher stopped under this cache (its client closed): end it too."""
        if not self._closed:
            self._closed = True
            for q in self._queues:
                q.put_nowait(None)
            self._state_changed(CacheState.CLOSED)

    def _state_changed(self, state: CacheState) -> None:
        if state is self._told:
            return
        self._told = state
        for listener in list(self._state_listeners):
            try:
                listener(state)
            except Exception:
                log.exception("cache state listener failed")

    def events(self) -> EventStream:
        """Change events from this call on (not from the first iteration: a change
        made between the call and the first ``await`` is not lost)."""
        return EventStream(self)

    def __aiter__(self) -> EventStream:
        return self.events()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for q in self._queues:
            q.put_nowait(None)
        self._state_changed(CacheState.CLOSED)
        await self._watcher.unsubscribe(self)

    async def __aenter__(self) -> ServiceCache:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class EventStream:
    """An async iterator of one subscriber's change events; ends when the cache closes."""

    def __init__(self, cache: ServiceCache) -> None:
        self._cache = cache
        self._queue: asyncio.Queue[ChangeEvent | None] = asyncio.Queue()
        cache._queues.append(self._queue)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> ChangeEvent:
        ev = await self._queue.get()
        if ev is None:
            self.close()
            raise StopAsyncIteration
        return ev

    def close(self) -> None:
        """Stop collecting events."""
        if self._queue in self._cache._queues:
            self._cache._queues.remove(self._queue)
