"""Discovery: a local cache of a service's instances that follows etcd.

A :class:`PrefixWatcher` owns one list + watch loop per key prefix and client; every
:class:`ServiceCache` on that prefix subscribes to it, so many caches cost etcd one
watch. The loop lists the prefix at revision R, watches from R + 1, and after any
break resumes from the last delivered event's revision + 1. A compaction makes it
re-list and emit only the difference. Errors never empty the cache: while etcd is
unreachable the last known instances stay served and the state says ``stale``.

With :class:`~etcdisco.ExpiryProtection` (on by default), instances that vanish by
lease expiry together are kept as ``suspect`` for a while (see ``_expiry``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from ._backoff import Backoff
from ._errors import (
    AuthError,
    ClosedError,
    CompactedError,
    EtcdError,
    EtcdTimeoutError,
    MalformedValueError,
    UnavailableError,
)
from ._expiry import ExpiryGuard, ExpiryProtection, InstanceTable
from ._model import ChangeEvent, EventType, Instance, decode_instance, diff, same_content
from ._tasks import cancelling
from .etcd import EtcdClient, KeyValue, Watch, WatchEventType

log = logging.getLogger("etcdisco.discovery")

# How often a quiet watch is asked to prove it is alive, and how long it may take.
# Together they bound how long a watch on a stalled member (alive, answering nothing)
# can pass for synced: 8 s, well inside what a lease TTL of a few seconds tolerates.
_PROGRESS_EVERY = 5.0
_PROGRESS_TIMEOUT = 3.0
# A watch or list refused for lack of permission is retried slowly: a fresh token
# does not grant a permission, and a hot loop of re-authentication is what etcd
# operators see as an attack (DESIGN.md section 5.8).
_DENIED_BACKOFF = Backoff(initial=5.0, maximum=60.0)


class CacheState(enum.StrEnum):
    """Where a cache stands with etcd (``ServiceCache.state``)."""

    CONNECTING = "connecting"  # no list has succeeded yet
    SYNCED = "synced"  # following etcd live
    STALE = "stale"  # etcd unreachable; serving the last known instances
    CLOSED = "closed"


EventListener = Callable[[list[ChangeEvent]], None]


class PrefixWatcher:
    """Owns the list + watch loop of one prefix; shared by the caches on it."""

    def __init__(
        self,
        etcd: EtcdClient,
        root: str,
        key_prefix: str,
        *,
        on_idle: Callable[[PrefixWatcher], None],
        expiry: ExpiryProtection | None = None,
    ) -> None:
        self._etcd = etcd
        self.root = root  # the registry prefix, e.g. "services"
        self.key_prefix = key_prefix  # what is watched, e.g. "services/echo/"
        self._on_idle = on_idle
        self.instances = InstanceTable()
        self._snapshot: tuple[Instance, ...] | None = None
        self._bad_keys: set[str] = set()
        self.revision = 0  # last revision fully applied
        self.state = CacheState.CONNECTING
        self.malformed = 0
        self.resyncs = 0
        self.events_applied = 0
        self.last_sync = 0.0
        self._subscribers: list[ServiceCache] = []
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._backoff = Backoff(initial=0.1, maximum=5.0)
        self._denied_backoff = dataclasses.replace(_DENIED_BACKOFF)
        self._denials = 0  # AuthErrors in a row
        self._last_error: BaseException | None = None
        self._expiry = ExpiryGuard(expiry) if expiry is not None else None
        self._expiry_timer: asyncio.TimerHandle | None = None

    @property
    def expiry_protections(self) -> int:
        """How many times mass-expiry protection engaged."""
        return self._expiry.engagements if self._expiry is not None else 0

    # -- subscribers ---------------------------------------------------------------

    def subscribe(self, cache: ServiceCache) -> None:
        self._subscribers.append(cache)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"etcdisco-watch-{self.key_prefix}"
            )

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
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._set_state(CacheState.CLOSED)
        subscribers, self._subscribers = self._subscribers, []
        for cache in subscribers:
            cache._end()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    @property
    def endpoints(self) -> str:
        return ", ".join(self._etcd.endpoints)

    @property
    def last_error(self) -> BaseException | None:
        return self._last_error

    def _set_state(self, state: CacheState) -> None:
        if state is self.state:
            return
        old, self.state = self.state, state
        level = logging.WARNING if state is CacheState.STALE else logging.INFO
        log.log(level, "cache %s: %s -> %s", self.key_prefix, old.value, state.value)
        for cache in list(self._subscribers):
            cache._state_changed(state)

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
        if delay is not None and self._task is not None:
            self._expiry_timer = asyncio.get_running_loop().call_later(delay, self._expire_due)

    def _expire_due(self) -> None:
        self._expiry_timer = None
        if self._expiry is not None:
            self._publish(self._expiry.expire(self.instances))

    # -- the loop ------------------------------------------------------------------

    async def _run(self) -> None:
        must_list = True
        while True:
            try:
                if must_list:
                    await self._list()
                    must_list = False
                await self._follow()
            except asyncio.CancelledError:
                if cancelling():
                    raise
                # A stream cancelled under us is a broken watch, not a request to stop:
                # ending here would leave the cache frozen while it says synced.
                await self._retry_after(UnavailableError("watch stream was cancelled"))
            except CompactedError as exc:
                # History we missed is gone: re-list and emit only what changed.
                log.info(
                    "watch on %s compacted at %d; re-listing", self.key_prefix, exc.compact_revision
                )
                self.resyncs += 1
                must_list = True
            except ClosedError as exc:
                self._last_error = exc
                return
            except EtcdError as exc:
                await self._retry_after(exc)
            except Exception as exc:  # never let the follower die: it would go stale silently
                log.exception("watch loop on %s failed; restarting", self.key_prefix)
                must_list = True
                await self._retry_after(exc)

    async def _retry_after(self, exc: BaseException) -> None:
        self._last_error = exc
        if self._ready.is_set():
            self._set_state(CacheState.STALE)
        if isinstance(exc, AuthError):
            self._denials += 1
        else:
            self._denials = 0
        if self._denials >= 2:
            # Refused again with a fresh token: a missing permission, not a stale token.
            delay = self._denied_backoff.next_delay()
            if self._denials == 2:
                log.warning(
                    "etcd refuses to let this client read %s (%s); retrying every %.0fs at most",
                    self.key_prefix,
                    exc,
                    self._denied_backoff.maximum,
                )
        else:
            delay = self._backoff.next_delay()
        log.debug("watch on %s broke (%s); retrying in %.2fs", self.key_prefix, exc, delay)
        await asyncio.sleep(delay)

    async def _list(self) -> None:
        result = await self._etcd.get(self.key_prefix, prefix=True)
        fresh = InstanceTable()
        bad: set[str] = set()
        for kv in result.kvs:
            inst = self._decode(kv)
            if inst is None:
                bad.add(kv.key.decode("utf-8", "replace"))
            else:
                fresh[inst.key] = inst
        if self._expiry is not None:
            self._expiry.carry(fresh)
        events = diff(self.instances, fresh)
        self.instances = fresh
        self._bad_keys = bad
        self.revision = result.revision
        self._synced()
        self._publish(events)

    def _synced(self) -> None:
        self.last_sync = time.monotonic()
        self._backoff.reset()
        self._denied_backoff.reset()
        self._denials = 0
        self._last_error = None
        self._set_state(CacheState.SYNCED)
        self._ready.set()

    async def _follow(self) -> None:
        watch = self._etcd.watch(
            self.key_prefix,
            prefix=True,
            start_revision=self.revision + 1,
            progress_notify=True,
            require_leader=True,
        )
        await watch.start()
        self._synced()
        prober = asyncio.get_running_loop().create_task(self._probe(watch))
        try:
            async for batch in watch:
                self._apply(batch.events)
                self.last_sync = time.monotonic()
        finally:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
            await watch.cancel()
        raise EtcdTimeoutError(f"watch on {self.key_prefix} went silent")

    async def _probe(self, watch: Watch) -> None:
        """A stream can stay open on a member cut off from the rest: ask for progress
        regularly and break the watch when no answer comes."""
        while True:
            await asyncio.sleep(_PROGRESS_EVERY)
            asked = time.monotonic()
            with contextlib.suppress(Exception):
                await watch.request_progress()
            await asyncio.sleep(_PROGRESS_TIMEOUT)
            if self.last_sync < asked:
                log.warning("watch on %s gave no progress; reconnecting", self.key_prefix)
                watch.abandon(
                    EtcdTimeoutError(
                        f"watch on {self.key_prefix} gave no progress within "
                        f"{_PROGRESS_TIMEOUT:.0f}s"
                    )
                )
                return

    def _apply(self, events: tuple[Any, ...]) -> None:
        self.events_applied += len(events)
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
            self.revision = max(self.revision, kv.mod_revision)
        self._publish(changes)

    def _decode(self, kv: KeyValue) -> Instance | None:
        try:
            return decode_instance(self.root, kv.key, kv.value, kv.mod_revision, kv.lease)
        except MalformedValueError as exc:
            self.malformed += 1
            # One warning per bad key per process keeps logs readable under garbage.
            key = kv.key.decode("utf-8", "replace")
            if key not in self._bad_keys:
                log.warning("skipping %s", exc)
            return None


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
