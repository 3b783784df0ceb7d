"""Protection against mass expiry (Eureka's self-preservation, Nacos' protect threshold).

When most of a service's instances vanish through lease expiry at once, the likelier
story is that they lost etcd (a partition, a stalled host, an overloaded network), not
that they all crashed in the same seconds; emptying every client's list would turn a
registry hiccup into an outage. So a cache keeps such instances as ``suspect`` for a
bounded time. A suspect is not ``healthy``; pickers that filter with
``etcdisco._model.usable`` use suspects only when no healthy instance is left.

Telling expiry from a planned exit: a watch shows both as a bare DELETE (etcd's watch
API carries no cause, and a single key's expiry leaves no trace in the event). The
registry closes that gap on the writer's side: a graceful deregistration writes
``status: draining`` before it deletes, and a withdrawal writes ``unhealthy``. So a
removal counts as unannounced only if the last value the cache saw said the instance
was up. Writers that delete without announcing (Go's naming package, ``etcdctl del``)
count as expiries; when many do it in one window their instances are held too, which
costs nothing while any live instance remains to pick.

Only watch deletions count: after a re-list (a compaction or a long disconnection)
the cache cannot tell what happened in between, so it removes without protecting.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn

from ._errors import ConfigError
from ._model import ChangeEvent, EventType, Instance, Status

log = logging.getLogger("etcdisco.discovery")


@dataclass(frozen=True)
class ExpiryProtection:
    """When more than ``threshold`` of a service's instances disappear unannounced
    within ``window`` seconds, keep them as suspects for ``hold`` seconds (or until
    they come back). Services with fewer than ``min_instances`` are never protected.

    Default threshold 0.5 (more than half): instances that crash independently
    almost never take more than half a fleet within ten seconds, while a shared cause
    (losing etcd) takes most of it; and because suspects are only picked when nothing
    live is left, a false alarm costs nothing but a minute of stale entries, whereas a
    missed one empties the list. Eureka engages far earlier (renewals under 85%, so
    15% lost) and holds forever, which its users know as the never-ending
    "EMERGENCY! EUREKA MAY BE INCORRECTLY CLAIMING INSTANCES ARE UP".

    Default window 10 s: instances cut off at the same moment expire over about a
    third of their TTL (their last keepalives were that far apart), plus etcd's
    half-second expiry sweep; 10 s covers TTLs up to 30 s. Default hold 60 s: a live
    instance re-registers within about a TTL once it reaches etcd again and replaces
    its suspect; one still gone after a minute is more likely dead than cut off.
    """

    threshold: float = 0.5
    window: float = 10.0
    hold: float = 60.0
    min_instances: int = 2

    def __post_init__(self) -> None:
        for name in ("threshold", "window", "hold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"expiry protection {name} must be a number, not {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"expiry protection {name} must be > 0, not {value!r}")
        if self.threshold >= 1:
            raise ConfigError(
                f"expiry protection threshold is a share in (0, 1), not {self.threshold!r}"
            )
        m = self.min_instances
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"expiry protection min_instances must be >= 1, not {m!r}")


DEFAULT_EXPIRY_PROTECTION = ExpiryProtection()


class InstanceTable(dict[str, Instance]):
    """A cache's instances by key, counting the live (not suspect) ones per service
    as they come and go, so that judging one deletion never scans the whole table.

    Only item assignment and ``del`` change it (the other mutators are refused, since
    ``dict``'s own would bypass the counts)."""

    def __init__(self, items: Mapping[str, Instance] | None = None) -> None:
        super().__init__()
        self._live: Counter[str] = Counter()
        for key, inst in (items or {}).items():
            self[key] = inst

    def live(self, service: str) -> int:
        """How many of ``service``'s instances are not suspects."""
        return self._live[service]

    def __setitem__(self, key: str, inst: Instance) -> None:
        old = self.get(key)
        if old is not None and not old.suspect:
            self._uncount(old.service)
        if not inst.suspect:
            self._live[inst.service] += 1
        super().__setitem__(key, inst)

    def __delitem__(self, key: str) -> None:
        old = self[key]
        super().__delitem__(key)
        if not old.suspect:
            self._uncount(old.service)

    def _uncount(self, service: str) -> None:
        left = self._live[service] - 1
        if left:
            self._live[service] = left
        else:
            del self._live[service]

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("InstanceTable changes only by item assignment and del")

    pop = popitem = clear = update = setdefault = __ior__ = _refuse


class ExpiryGuard:
    """The bookkeeping of one prefix watcher: recent unannounced removals per
    service, and the suspects held with their deadlines. Pure: no loop, no I/O.

    Every operation costs O(1) per instance it touches: a mass expiry delivers
    thousands of deletions at once, and a cache that scanned its table for each one
    would block its event loop for seconds (and with it every keepalive sharing it).
    """

    def __init__(
        self, config: ExpiryProtection, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        # Per service, the unannounced removals within the window, oldest first.
        self._recent: dict[str, dict[str, tuple[float, Instance]]] = {}
        self._recent_service: dict[str, str] = {}  # key -> service, for returned()
        # key -> (suspect, deadline). The hold is the same for all, so insertion order
        # is deadline order: the next deadline is the first entry.
        self._held: dict[str, tuple[Instance, float]] = {}
        self._held_per_service: Counter[str] = Counter()
        self.engagements = 0
        self._engaged: list[tuple[str, int, int]] = []  # since the last report()

    @property
    def suspects(self) -> tuple[Instance, ...]:
        return tuple(inst for inst, _ in self._held.values())

    def next_deadline(self) -> float | None:
        for _, deadline in self._held.values():
            return deadline
        return None

    def seconds_to_next(self) -> float | None:
        deadline = self.next_deadline()
        return None if deadline is None else max(0.0, deadline - self._clock())

    def deleted(self, old: Instance, instances: InstanceTable) -> list[ChangeEvent]:
        """``old`` was deleted in etcd (and still sits in ``instances``): remove it,
        or hold it (and those that went shortly before it) as suspects."""
        del instances[old.key]
        if old.status is not Status.UP or old.suspect:
            return [ChangeEvent(EventType.REMOVED, old)]  # announced: draining or unhealthy
        now = self._clock()
        service = old.service
        if self._held_per_service[service]:
            # The episode goes on: later expiries of the same service join it.
            return [self._hold(old, instances, now, previous=old)]
        recent = self._recent.setdefault(service, {})
        cutoff = now - self.config.window
        while recent:
            key, (when, _) = next(iter(recent.items()))
            if when >= cutoff:
                break
            del recent[key]
            self._recent_service.pop(key, None)
        recent.pop(old.key, None)  # re-insert at the end: the order stays by time
        recent[old.key] = (now, old)
        self._recent_service[old.key] = service
        live = instances.live(service)
        lost = len(recent)
        if lost + live < self.config.min_instances or lost / (lost + live) <= self.config.threshold:
            return [ChangeEvent(EventType.REMOVED, old)]
        self.engagements += 1
        # Told in one line per batch (see report()): a lease shared by thousands of
        # services would otherwise write thousands of lines at once.
        self._engaged.append((service, lost, lost + live))
        del recent[old.key]
        events = [self._hold(inst, instances, now, previous=None) for _, inst in recent.values()]
        events.append(self._hold(old, instances, now, previous=old))
        for key in recent:
            self._recent_service.pop(key, None)
        self._recent_service.pop(old.key, None)
        del self._recent[service]
        return events

    def report(self) -> None:
        """Log the protections engaged since the last call, in one line."""
        engaged, self._engaged = self._engaged, []
        if not engaged:
            return
        shown = ", ".join(f"{s}: {lost} of {total}" for s, lost, total in engaged[:3])
        if len(engaged) > 3:
            shown += f" and {len(engaged) - 3} more services"
        log.warning(
            "mass expiry (%s instances lost their lease within %.0fs); keeping them as "
            "suspect for up to %.0fs",
            shown,
            self.config.window,
            self.config.hold,
        )

    def _hold(
        self, inst: Instance, instances: InstanceTable, now: float, previous: Instance | None
    ) -> ChangeEvent:
        # Built directly: dataclasses.replace() was half the cost of a mass expiry.
        suspect = Instance(
            service=inst.service,
            id=inst.id,
            address=inst.address,
            metadata=inst.metadata,
            key=inst.key,
            revision=inst.revision,
            lease=inst.lease,
            suspect=True,
            override=inst.override,
        )
        instances[inst.key] = suspect
        if self._held.pop(inst.key, None) is None:
            self._held_per_service[inst.service] += 1
        self._held[inst.key] = (suspect, now + self.config.hold)
        if previous is None:
            return ChangeEvent(EventType.ADDED, suspect)
        return ChangeEvent(EventType.UPDATED, suspect, previous)

    def _release(self, key: str) -> Instance | None:
        entry = self._held.pop(key, None)
        if entry is None:
            return None
        service = entry[0].service
        left = self._held_per_service[service] - 1
        if left:
            self._held_per_service[service] = left
        else:
            del self._held_per_service[service]
        return entry[0]

    def returned(self, key: str) -> None:
        """``key`` is in etcd again: it no longer counts as lost or suspect."""
        if self._release(key) is not None:
            log.info("suspect %s is back", key)
        service = self._recent_service.pop(key, None)
        if service is not None:
            recent = self._recent.get(service)
            if recent is not None:
                recent.pop(key, None)
                if not recent:
                    del self._recent[service]

    def expire(self, instances: InstanceTable) -> list[ChangeEvent]:
        """Remove the suspects whose hold is over."""
        now = self._clock()
        events: list[ChangeEvent] = []
        while self._held:
            key, (suspect, deadline) = next(iter(self._held.items()))
            if deadline > now:
                break
            self._release(key)
            if instances.get(key) is suspect:
                del instances[key]
                events.append(ChangeEvent(EventType.REMOVED, suspect))
        if events:
            log.warning(
                "%d suspect instance(s) did not come back within %.0fs; removed",
                len(events),
                self.config.hold,
            )
        return events

    def carry(self, fresh: InstanceTable) -> None:
        """A re-list replaces the whole view: keep the suspects it does not contain,
        and forget the ones it shows alive again."""
        for key, (suspect, _) in list(self._held.items()):
            if key in fresh:
                self.returned(key)
            else:
                fresh[key] = suspect
