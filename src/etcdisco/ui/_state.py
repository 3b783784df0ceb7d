"""What the dashboard knows: one ``discover_all()`` cache of the client, the recent
changes of each service, the leases' time left, and the live feeds of the pages.

Nothing here polls etcd: the cache follows it (list + watch), every batch of changes
is recorded and pushed to every open page (:meth:`Dashboard.subscribe`), and a change
of the cache's state (``stale`` while etcd is unreachable, the last known instances
still served) too. Views of 10,000 instances are cheap because everything derived
from the snapshot (service counts, search text) is computed once per snapshot (the
cache hands out the same tuple until something changes) and a page gets one slice
of rows. Leases are asked of etcd (``lease_time_to_live``) only for the rows a page
shows, and at most every ``lease_max_age`` seconds per lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .._async_client import AsyncClient
from .._errors import EtcdError
from .._model import ChangeEvent, EventType, Instance
from .._operator import status_word
from ..discovery import CacheState, ServiceCache
from ._targets import health_word

__all__ = ["STATUSES", "Dashboard", "Feed", "instance_row"]

log = logging.getLogger("etcdisco.ui")

# The words of the status column and filter: the effective status, or "suspect".
STATUSES = ("up", "draining", "unhealthy", "disabled", "suspect")

# A batch of changes larger than this is announced as a "resync": the page refetches
# its view rather than receive thousands of events.
_MAX_EVENTS_PER_MESSAGE = 200
# A page that cannot keep up is told to refetch instead of buffering without end.
_FEED_QUEUE = 256


def _override_dict(inst: Instance) -> dict[str, Any] | None:
    o = inst.override
    if o is None or o.expired():
        return None
    return {
        "disabled": o.disabled,
        "weight": o.weight,
        "reason": o.reason,
        "by": o.by,
        "expires_at": o.expires_at,
        "service_wide": o.instance_id is None,
    }


def instance_row(inst: Instance) -> dict[str, Any]:
    """One instance as the page shows it."""
    return {
        "key": inst.key,
        "service": inst.service,
        "id": inst.id,
        "address": inst.address,
        "zone": inst.zone or "",
        "weight": inst.weight,
        "status": status_word(inst),
        "health": health_word(inst),
        "override": _override_dict(inst),
        "metadata": dict(inst.metadata),
        "lease": f"{inst.lease:x}" if inst.lease else "",
        "revision": inst.revision,
    }


def _describe(ev: ChangeEvent) -> str:
    """What changed, in a few words (for the page's list of recent changes)."""
    inst, old = ev.instance, ev.previous
    if ev.type is EventType.ADDED:
        return f"added at {inst.address} ({status_word(inst)})"
    if ev.type is EventType.REMOVED:
        return "removed" + (" (was suspect)" if inst.suspect else "")
    if old is None:
        return "updated"
    parts = []
    if status_word(old) != status_word(inst):
        parts.append(f"status {status_word(old)} -> {status_word(inst)}")
    if old.weight != inst.weight:
        parts.append(f"weight {old.weight} -> {inst.weight}")
    if old.address != inst.address:
        parts.append(f"address {old.address} -> {inst.address}")
    if _override_dict(old) != _override_dict(inst):
        o = inst.override
        if o is None or o.expired():
            parts.append("override removed")
        else:
            who = f" by {o.by}" if o.by else ""
            why = f": {o.reason}" if o.reason else ""
            parts.append(f"override set{who}{why}")
    changed = sorted(
        k
        for k in set(old.metadata) | set(inst.metadata)
        if k not in ("status", "weight") and old.metadata.get(k) != inst.metadata.get(k)
    )
    if changed:
        parts.append("metadata " + ", ".join(changed))
    return "; ".join(parts) or "updated"


def _event_dict(ev: ChangeEvent, at: float) -> dict[str, Any]:
    return {
        "at": at,
        "type": ev.type.value,
        "service": ev.instance.service,
        "id": ev.instance.id,
        "key": ev.instance.key,
        "address": ev.instance.address,
        "status": status_word(ev.instance),
        "detail": _describe(ev),
    }


@dataclass
class _Lease:
    ttl: int
    granted: int
    fetched: float  # monotonic
    error: str | None = None


class Feed:
    """One page's live feed: messages (``event``, ``data``) until the dashboard
    closes (then None)."""

    def __init__(self, dashboard: Dashboard) -> None:
        self._dashboard = dashboard
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue(_FEED_QUEUE)
        self._behind = False

    def push(self, event: str, data: dict[str, Any]) -> None:
        if self._behind:
            return
        try:
            self._queue.put_nowait((event, data))
        except asyncio.QueueFull:
            # Too slow a reader: drop what it has not read and have it refetch.
            self._behind = True
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(("resync", {"reason": "behind"}))

    def end(self) -> None:
        while True:
            try:
                self._queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()

    async def next(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        """The next message; None at the end; ``("ping", {})`` when ``timeout`` passed
        first (a keep-alive for the connection)."""
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return ("ping", {})
        if item is not None and item[0] == "resync":
            self._behind = False
        return item

    def close(self) -> None:
        self._dashboard._feeds.discard(self)


class Dashboard:
    """The dashboard's view of one registry (the prefix of ``client``): start it
    (:meth:`start`), read it, close it (:meth:`close`). ``client`` stays the
    caller's."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        history: int = 50,
        lease_max_age: float = 5.0,
    ) -> None:
        self.client = client
        self.cache: ServiceCache | None = None
        self.history = history
        self.lease_max_age = lease_max_age
        self.started_at = time.time()
        self.state_since = time.time()
        self._live = False  # after the first listing: events are changes, not the listing
        self._events: dict[str, deque[dict[str, Any]]] = {}
        self._all_events: deque[dict[str, Any]] = deque(maxlen=history * 4)
        self._feeds: set[Feed] = set()
        self._leases: dict[int, _Lease] = {}
        self._lease_calls = asyncio.Semaphore(8)
        self._snapshot: tuple[Instance, ...] | None = None
        self._summary: list[dict[str, Any]] = []
        self._haystack: list[str] = []
        self._ready_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        self.cache = await self.client.discover_all()
        self.cache.add_listener(self._changed)
        self.cache.add_state_listener(self._state_changed)
        self._ready_task = asyncio.ensure_future(self._wait_ready(self.cache))

    async def _wait_ready(self, cache: ServiceCache) -> None:
        await cache.wait_ready()
        self._live = True
        self._broadcast("resync", {"reason": "ready"})

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for feed in list(self._feeds):
            feed.end()
        self._feeds.clear()
        if self._ready_task is not None:
            self._ready_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ready_task
        if self.cache is not None:
            self.cache.remove_listener(self._changed)
            self.cache.remove_state_listener(self._state_changed)
            await self.cache.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- what the cache tells ------------------------------------------------------

    def _changed(self, events: list[ChangeEvent]) -> None:
        if not self._live:
            return  # the first listing: the instances, not changes
        now = time.time()
        recorded = []
        for ev in events:
            item = _event_dict(ev, now)
            self._events.setdefault(ev.instance.service, deque(maxlen=self.history)).append(item)
            self._all_events.append(item)
            recorded.append(item)
        if len(recorded) > _MAX_EVENTS_PER_MESSAGE:
            self._broadcast("resync", {"reason": "many", "count": len(recorded)})
        else:
            self._broadcast("change", {"events": recorded, "revision": self.revision})

    def _state_changed(self, state: CacheState) -> None:
        self.state_since = time.time()
        self._broadcast("state", self.status())

    def _broadcast(self, event: str, data: dict[str, Any]) -> None:
        for feed in list(self._feeds):
            feed.push(event, data)

    def subscribe(self) -> Feed:
        """A live feed for one page; it starts with the state."""
        feed = Feed(self)
        if self._closed:
            feed.end()
            return feed
        self._feeds.add(feed)
        feed.push("state", self.status())
        return feed

    # -- reading -------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self.cache.state.value if self.cache is not None else "connecting"

    @property
    def revision(self) -> int:
        return self.cache.revision if self.cache is not None else 0

    def status(self) -> dict[str, Any]:
        cache = self.cache
        last_error = None
        if cache is not None and cache.state is CacheState.STALE:
            watcher = next(
                (w for w in self.client.watchers if w.key_prefix == self.client.prefix + "/"),
                None,
            )
            if watcher is not None and watcher.last_error is not None:
                last_error = str(watcher.last_error)
        return {
            "state": self.state,
            "since": self.state_since,
            "revision": self.revision,
            "instances": len(self.instances()),
            "error": last_error,
        }

    def instances(self) -> tuple[Instance, ...]:
        return self.cache.instances() if self.cache is not None else ()

    def _derive(self) -> tuple[Instance, ...]:
        snapshot = self.instances()
        if snapshot is not self._snapshot:
            self._snapshot = snapshot
            self._summary = []
            self._haystack = []
        return snapshot

    def services(self) -> list[dict[str, Any]]:
        """Every service with its instance counts by status, by name."""
        snapshot = self._derive()
        if not self._summary and snapshot:
            counts: dict[str, dict[str, int]] = {}
            for inst in snapshot:
                c = counts.get(inst.service)
                if c is None:
                    c = counts[inst.service] = dict.fromkeys(("total", *STATUSES), 0)
                c["total"] += 1
                c[status_word(inst)] += 1
            self._summary = [{"name": name, **c} for name, c in sorted(counts.items())]
        return self._summary

    def _haystacks(self, snapshot: Sequence[Instance]) -> list[str]:
        if not self._haystack and snapshot:
            self._haystack = [
                " ".join(
                    (
                        inst.service,
                        inst.id,
                        inst.address,
                        inst.zone or "",
                        json.dumps(dict(inst.metadata), ensure_ascii=False, default=str),
                        (inst.override.reason + " " + inst.override.by) if inst.override else "",
                    )
                ).lower()
                for inst in snapshot
            ]
        return self._haystack

    def query(
        self,
        *,
        service: str | None = None,
        status: str | None = None,
        q: str | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> dict[str, Any]:
        """One page of the instances that match, and how many match in all."""
        snapshot = self._derive()
        needle = (q or "").strip().lower()
        haystacks = self._haystacks(snapshot) if needle else []
        matched: list[Instance] = []
        total = 0
        for n, inst in enumerate(snapshot):
            if service and inst.service != service:
                continue
            if status and status_word(inst) != status:
                continue
            if needle and needle not in haystacks[n]:
                continue
            if offset <= total < offset + limit:
                matched.append(inst)
            total += 1
        return {
            "total": total,
            "offset": offset,
            "limit": limit,
            "rows": [instance_row(i) for i in matched],
            "revision": self.revision,
            "state": self.state,
        }

    def events(self, service: str | None = None) -> list[dict[str, Any]]:
        """The recent changes (of ``service``, or of all), oldest first."""
        if service:
            return list(self._events.get(service, ()))
        return list(self._all_events)

    async def leases(self, ids: Iterable[int]) -> dict[str, dict[str, Any]]:
        """Time left of each lease (hex id -> ``ttl``, ``granted``, or ``error``), asked
        of etcd at most every ``lease_max_age`` seconds per lease."""
        wanted = list(dict.fromkeys(i for i in ids if i))
        now = time.monotonic()
        stale = [
            i
            for i in wanted
            if i not in self._leases or now - self._leases[i].fetched > self.lease_max_age
        ]
        if stale:
            await asyncio.gather(*(self._fetch_lease(i) for i in stale))
        out: dict[str, dict[str, Any]] = {}
        now = time.monotonic()
        for i in wanted:
            known = self._leases.get(i)
            if known is None:
                continue
            if known.error is not None:
                out[f"{i:x}"] = {"error": known.error}
            elif known.ttl < 0:
                out[f"{i:x}"] = {"ttl": -1, "granted": known.granted}
            else:
                left = max(0, round(known.ttl - (now - known.fetched)))
                out[f"{i:x}"] = {"ttl": left, "granted": known.granted}
        if len(self._leases) > 20_000:
            cutoff = time.monotonic() - 10 * self.lease_max_age
            self._leases = {k: v for k, v in self._leases.items() if v.fetched > cutoff}
        return out

    async def _fetch_lease(self, lease_id: int) -> None:
        async with self._lease_calls:
            try:
                info = await self.client.etcd.lease_time_to_live(lease_id, timeout=3.0)
            except EtcdError as exc:
                old = self._leases.get(lease_id)
                if old is not None and old.error is None:
                    return  # keep counting down from the last answer
                self._leases[lease_id] = _Lease(-1, 0, time.monotonic(), str(exc))
            else:
                self._leases[lease_id] = _Lease(info.ttl, info.granted_ttl, time.monotonic())
