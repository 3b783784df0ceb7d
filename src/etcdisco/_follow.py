"""Following a key prefix in etcd: the list + watch loop every cache stands on.

A :class:`KeyFollower` lists its prefix at revision R, watches from R + 1, and after
any break resumes from the last delivered event's revision + 1. A compaction makes it
re-list; a watch that goes silent (its member stalled or cut off) is abandoned after
the progress probe; errors never end the loop, and never empty what it holds: while
etcd is unreachable the state says ``stale``. What the keys mean is the subclass's
business (instances in ``discovery``, operator overrides in ``_overrides``): it
receives listings page by page (:meth:`_new_listing`, then :meth:`_loaded` once the
last page is in) and batches of events (:meth:`_applied`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

from ._backoff import Backoff
from ._errors import (
    AuthError,
    ClosedError,
    CompactedError,
    EtcdError,
    EtcdTimeoutError,
    UnavailableError,
)
from ._tasks import cancelling
from .etcd import EtcdClient, KeyValue, Watch, WatchEvent

__all__ = ["CacheState", "KeyFollower", "KeyValues", "Listing"]

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
# Watch events applied between two yields to the loop (about 10 ms of work).
_APPLY_SLICE = 1000


class CacheState(enum.StrEnum):
    """Where a cache stands with etcd (``ServiceCache.state``)."""

    CONNECTING = "connecting"  # no list has succeeded yet
    SYNCED = "synced"  # following etcd live
    STALE = "stale"  # etcd unreachable; serving the last known instances
    CLOSED = "closed"


class Listing(Protocol):
    """A listing being read: takes each page's key-values as they arrive."""

    def add(self, kvs: Sequence[KeyValue]) -> None: ...


L = TypeVar("L", bound=Listing)


class KeyValues(list[KeyValue]):
    """A listing kept raw, for followers of a few keys."""

    def add(self, kvs: Sequence[KeyValue]) -> None:
        self.extend(kvs)


class KeyFollower(Generic[L]):
    """Owns the list + watch loop of one prefix (its task is started by
    :meth:`_start` and stopped by :meth:`_stop`)."""

    def __init__(self, etcd: EtcdClient, key_prefix: str) -> None:
        self._etcd = etcd
        self.key_prefix = key_prefix
        self.revision = 0  # last revision fully applied
        self.state = CacheState.CONNECTING
        self.resyncs = 0
        self.events_applied = 0
        self.last_sync = 0.0
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._backoff = Backoff(initial=0.1, maximum=5.0)
        self._denied_backoff = dataclasses.replace(_DENIED_BACKOFF)
        self._denials = 0  # AuthErrors in a row
        self._last_error: BaseException | None = None

    # -- what subclasses provide ---------------------------------------------------

    def _new_listing(self) -> L:
        """An empty listing to fill page by page. Pages are decoded as they come so
        that a large registry's raw listing is never held whole (at 100,000 keys,
        holding it left a third of the cache's memory fragmented)."""
        raise NotImplementedError

    def _loaded(self, listing: L) -> None:
        """Replace the whole view with a complete listing."""
        raise NotImplementedError

    def _applied(self, events: Sequence[WatchEvent]) -> None:
        """Apply one batch of watch events."""
        raise NotImplementedError

    def _state_changed(self, old: CacheState, new: CacheState) -> None:
        """Told of every state change."""

    def _failed(self, exc: BaseException) -> None:
        """Told of every failed attempt (listing or watching)."""

    # -- lifecycle -----------------------------------------------------------------

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"etcdisco-watch-{self.key_prefix}"
            )

    @property
    def running(self) -> bool:
        return self._task is not None

    async def _stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._set_state(CacheState.CLOSED)

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
        log.log(level, "watch %s: %s -> %s", self.key_prefix, old.value, state.value)
        self._state_changed(old, state)

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
                # History we missed is gone: re-list and let the subclass diff.
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
        self._failed(exc)
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
        listing = self._new_listing()
        revision = 0
        async for page in self._etcd.get_prefix_pages(self.key_prefix):
            listing.add(page.kvs)
            revision = page.revision
        self.revision = revision
        self._synced()
        self._loaded(listing)

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
                events = batch.events
                for start in range(0, len(events), _APPLY_SLICE):
                    if start:
                        # A mass expiry arrives as one batch of thousands: apply it in
                        # slices so that keepalives and requests sharing the loop run.
                        await asyncio.sleep(0)
                    part = events[start : start + _APPLY_SLICE]
                    self.events_applied += len(part)
                    self._applied(part)
                    self.revision = max(self.revision, part[-1].kv.mod_revision)
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
