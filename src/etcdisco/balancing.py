"""Pickers: choose one instance from a snapshot. Pure code, no I/O.

Every picker skips draining and unhealthy instances (``Instance.healthy``) and returns
None when nothing is left, rather than send traffic to an instance on its way out.
Suspects (instances kept by the cache through a mass lease expiry) are used only when
no live healthy instance is left (``_model.usable``).

Callers tell a picker about the calls it placed with ``started(instance)`` and
``finished(instance, latency, ok)``; only load-aware policies (p2c) use them, the others
inherit no-ops from :class:`BasePicker`.

Speed: a picker derives what it needs from a snapshot (the healthy instances, a hash
ring, weights...) once and reuses it while the snapshot is unchanged. A tuple given again
as the *same object* is recognised in O(1), which is what the cache's immutable
snapshots allow; any other sequence (a list, an equal but new tuple) is compared by
content, O(n) at C speed, and only a real change rebuilds.

Thread safety: pickers may be shared by threads (the sync gRPC channel calls them from
its worker threads). Stateless pickers rely on atomic operations; the stateful ones
(weighted_round_robin, p2c) hold a lock for the few microseconds of a pick.
"""

from __future__ import annotations

import hashlib
import heapq
import inspect
import itertools
import math
import random
import struct
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

from ._checks import check_clock, check_float, check_int
from ._errors import ConfigError
from ._model import Instance, usable

__all__ = [
    "POLICIES",
    "BasePicker",
    "Picker",
    "PowerOfTwoChoices",
    "Random",
    "RingHash",
    "RoundRobin",
    "WeightedRoundRobin",
    "ZoneAware",
    "make_picker",
]

V = TypeVar("V")
Clock = Callable[[], float]


class Picker(Protocol):
    """What a balancing policy is: ``pick`` one instance per call. Pickers that keep
    per-call state also have ``started(instance)`` and ``finished(instance)``."""

    def pick(self, instances: Sequence[Instance], key: str | None = None) -> Instance | None:
        """One healthy instance of ``instances`` (``key`` steers hashing policies)."""
        ...

    def started(self, instance: Instance) -> None:
        """A call began on ``instance``."""
        ...

    def finished(self, instance: Instance, latency: float, ok: bool) -> None:
        """A call on ``instance`` ended after ``latency`` seconds."""
        ...


class _SnapshotCache(Generic[V]):
    """Holds the value derived from the last snapshot seen.

    The entry is one tuple swapped in a single assignment, so a thread reading it while
    another rebuilds sees either the old entry or the new one, never a mix.
    """

    __slots__ = ("_build", "_entry")

    def __init__(self, build: Callable[[tuple[Instance, ...]], V]) -> None:
        self._build = build
        # (object recognised by identity, snapshot as a tuple, derived value)
        self._entry: tuple[object, tuple[Instance, ...], V] | None = None

    def get(self, instances: Sequence[Instance]) -> V:
        entry = self._entry
        if entry is not None and instances is entry[0]:
            return entry[2]
        return self._refresh(instances, entry)

    def _refresh(
        self, instances: Sequence[Instance], entry: tuple[object, tuple[Instance, ...], V] | None
    ) -> V:
        # A list may be mutated in place and handed back, so only a tuple may be
        # recognised by identity next time.
        if isinstance(instances, tuple):
            frozen, identity = instances, instances
        else:
            frozen, identity = tuple(instances), None
        # Equal tuples compare element by element with an identity shortcut first, so an
        # unchanged snapshot handed over as a new object costs one C-speed pass.
        value = entry[2] if entry is not None and frozen == entry[1] else self._build(frozen)
        self._entry = (identity, frozen, value)
        return value


class BasePicker:
    """Base of the built-in pickers: ``started``/``finished`` do nothing."""

    def pick(self, instances: Sequence[Instance], key: str | None = None) -> Instance | None:
        raise NotImplementedError

    def started(self, instance: Instance) -> None:
        return None

    def finished(self, instance: Instance, latency: float, ok: bool) -> None:
        return None


# ---------------------------------------------------------------------------- validation


def _check_rng(policy: str, rng: object) -> random.Random:
    if rng is None:
        return random.Random()
    if not isinstance(rng, random.Random):
        raise ConfigError(f"{policy}: rng must be a random.Random, got {type(rng).__name__}")
    return rng


# ---------------------------------------------------------------------------- round robin


class RoundRobin(BasePicker):
    """Each healthy instance in turn.

    The first pick lands on a random instance unless ``start`` is given, so that many
    clients started together do not all send their first call to the same instance.
    """

    def __init__(self, *, start: int | None = None) -> None:
        if start is None:
            start = random.randrange(1 << 30)
        self._counter = itertools.count(check_int("round_robin", "start", start, 0))
        self._views: _SnapshotCache[tuple[Instance, ...]] = _SnapshotCache(usable)

    def pick(self, instances: Sequence[Instance], key: str | None = None) -> Instance | None:
        candidates = self._views.get(instances)
        if not candidates:
            return None
        # next() on itertools.count is atomic, so threads never get the same turn.
        return candidates[next(self._counter) % len(candidates)]


class Random(BasePicker):
    """A uniformly random healthy instance."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = _check_rng("random", rng)
        self._views: _SnapshotCache[tuple[Instance, ...]] = _SnapshotCache(usable)

    def pick(self, instances: Sequence[Instance], key: str | None = None) -> Instance | None:
        candidates = self._views.get(instances)
        return self._rng.choice(candidates) if candidates else None


# ------------------------------------------------------------------- weighted round robin


def _weighted(healthy: tuple[Instance, ...]) -> list[tuple[Instance, int]]:
    """Members with their weights: weight 0 means never, unless every weight is 0, in
    which case they share equally rather than leave a live pool unused."""
    members = [(inst, inst.weight) for inst in healthy if inst.weight > 0]
    if not members:
        members = [(inst, 1) for inst in healthy]
    return members


class _SmoothSchedule:
    """nginx's smooth weighted round robin, O(number of distinct weights + log n) a pick.

    nginx adds each weight to its instance's ``current`` value, picks the largest
    (the first one on a tie) and subtracts the total weight from it: an O(n) scan per
    pick. Writing ``current_i = base_i + step * weight_i`` makes every instance of one
    weight grow at the same rate, so within a weight group the leader is the top of a
    heap ordered by (base, position); only group leaders need comparing. The sequence
    is exactly nginx's, ties included.
    """

    __slots__ = ("groups", "step", "total")

    def __init__(self, healthy: tuple[Instance, ...], carried: Mapping[str, int]) -> None:
        members = _weighted(healthy)
        self.total = sum(weight for _, weight in members)
        self.step = 0
        heaps: dict[int, list[tuple[int, int, Instance]]] = {}
        for position, (inst, weight) in enumerate(members):
            # Heap entries hold -base: heapq keeps the smallest on top.
            heaps.setdefault(weight, []).append((-carried.get(inst.key, 0), position, inst))
        for heap in heaps.values():
            heapq.heapify(heap)
        self.groups = list(heaps.items())

    def next(self) -> Instance | None:
        self.step += 1
        step = self.step
        best_value = 0
        best_position = -1
        best_heap: list[tuple[int, int, Instance]] | None = None
        for weight, heap in self.groups:
            neg_base, position, _ = heap[0]
            value = step * weight - neg_base
            if (
                best_heap is None
                or value > best_value
                or (value == best_value and position < best_position)
            ):
                best_value, best_position, best_heap = value, position, heap
        if best_heap is None:
            return None
        neg_base, position, inst = best_heap[0]
        heapq.heapreplace(best_heap, (neg_base + self.total, position, inst))
        return inst

    def current(self) -> dict[str, int]:
        """Each instance's nginx ``current`` value, to carry into the next snapshot."""
        return {
            inst.key: self.step * weight - neg_base
            for weight, heap in self.groups
            for neg_base, _, inst in heap
        }


class WeightedRoundRobin(BasePicker):
    """Smooth weighted round robin (nginx) on ``Instance.weight``.

    Over any ``sum(weights)`` consecutive picks from a fresh start each instance gets
    exactly its weight, interleaved rather than in bursts (weights 5,1,1 give
    a a b a c a a). Weight 0 is never picked unless every healthy instance has weight 0.
    When the snapshot changes, instances that stay keep their place in the rotation.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._schedule: _SmoothSchedule | None = None
        self._views: _SnapshotCache[_SmoothSchedule] = _SnapshotCache(self._build)

    def _build(self, instances: tuple[Instance, ...]) -> _SmoothSchedule:
        carried = self._schedule.current() if self._schedule is not None else {}
        return _SmoothSchedule(usable(instances), carried)

    def pick(self, instances: Sequence[Instance], key: str | None = None) -> Instance | None:
        with self._lock:
            schedule = self._schedule = self._views.get(instances)
            return schedule.next()


# ---------------------------------------------------------------------- power of two

# Without news an estimate drifts toward this fraction of the pool's average latency.
# Below 1, so that an instance left alone long enough looks cheaper than peers that keep
# reporting their real latency, and gets tried again; not far below, so that it draws
# at most about twice its share of calls before new samples correct it.
_IDLE_DISCOUNT = 0.5


class _Load:
    __slots__ = ("ewma", "outstanding", "samples", "stamp", "touched")

    def __init__(self, now: float) -> None:
        self.outstanding = 0
        self.ewma = 0.0
        self.samples = 0
        self.stamp = now  # time of the last latency sample
        self.touched = now  # time of the last sign of life, for forgetting


class _P2CView:
    __slots__ = ("candidates", "keys")

    def __init__(self, candidates: tuple[Instance, ...]) -> None:
        self.candidates = candidates
        self.keys = frozenset(inst.key for inst in candidates)


class PowerOfTwoChoices(BasePicker):
    """Power of two random choices: of two random healthy instances, the cheaper one.

    cost = (outstanding calls + 1) * latency estimate. Outstanding calls (counted by
    ``started``/``finished``) react at once to an instance that slows down; the estimate
    sorts out instances that are idle alike.

    The latency estimate is an exponentially time-weighted average with time constant
    ``decay`` seconds: a sample weighs ``1 - exp(-gap/decay)``, gap being the time since
    the instance's previous sample, so the estimate covers the last ``decay`` seconds
    whatever the call rate. Until an instance has enough samples to span that long, a
    sample weighs at least 1/n (n samples so far): the estimate starts as the plain mean
    of the first samples instead of staying stuck on a guess or on the first sample.

    Without news the estimate drifts (same time constant) toward half the pool's average
    latency, where an instance never measured starts. So an instance shunned for being
    slow is tried again after a few ``decay`` periods, and instances nobody has measured
    tie and share calls evenly. A failed call counts as at least ``failure_penalty``
    times the pool's average, so an instance that fails fast does not attract traffic by
    looking quick.

    State is kept per ``Instance.key``; keys absent from the current snapshot and
    untouched for ``forget_after`` seconds are dropped.
    """

    def __init__(
        self,
        *,
        decay: float = 10.0,
        default_latency: float = 0.01,
        failure_penalty: float = 5.0,
        forget_after: float = 300.0,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._decay = check_float("p2c", "decay", decay)
        # The pool's average latency, seeded with a guess until calls report.
        self._pool = check_float("p2c", "default_latency", default_latency)
        self._penalty = check_float("p2c", "failure_penalty", failure_penalty, positive=False)
        self._forget_after = check_float("p2c", "forget_after", forget_after)
        self._rng = _check_rng("p2c", rng)
        self._clock = check_clock("p2c", clock)
        self._lock = threading.Lock()
        self._loads: dict[str, _Load] = {}
        self._keep: frozenset[str] = frozenset()
        self._pool_stamp = self._clock()
        self._pool_samples = 0
        self._next_sweep = self._pool_stamp + self._forget_after / 2
        self._views: _SnapshotCache[_P2CView] = _SnapshotCache(self._build)

    def _build(self, instances: tuple[Instance, ...]) -> _P2CView:
        return _P2CView(usable(instances))

    def _load(self, key: str, now: float) -> _Load:
        load = self._loads.get(key)
        if load is None:
            load = self._loads[key] = _Load(now)
        return load

    def _cost(self, key: str, now: float) -> float:
        load = self._loads.get(key)
        target = self._pool * _IDLE_DISCOUNT
        if load is None:
            return target
        if not load.samples:
            return (load.outstanding + 1) * target
        estimate = target + (load.ewma - target) * math.exp((load.stamp - now) / self._decay)
        return (load.outstanding + 1) * estimate

    def pick(self, instances: Sequence[Instance], key: str | None = None) -> Instance | None:
        view = self._views.get(instances)
        candidates = view.candidates
        count = len(candidates)
        if count < 2:
            return candidates[0] if candidates else None
        rng = self._rng.random
        first = int(rng() * count)
        second = int(rng() * (count - 1))
        if second >= first:
            second += 1
        a, b = candidates[first], candidates[second]
        with self._lock:
            now = self._clock()
            self._keep = view.keys
            if now >= self._next_sweep:
                self._sweep(now)
            # a is already a random one of the two, so ties need no coin.
            return a if self._cost(a.key, now) <= self._cost(b.key, now) else b

    def started(self, instance: Instance) -> None:
        with self._lock:
            now = self._clock()
            load = self._load(instance.key, now)
            load.outstanding += 1
            load.touched = now

    def finished(self, instance: Instance, latency: float, ok: bool) -> None:
        latency = max(0.0, latency)
        with self._lock:
            now = self._clock()
            load = self._load(instance.key, now)
            # A forgotten key (or a finished without started) must not go negative.
            load.outstanding = max(0, load.outstanding - 1)
            load.touched = now
            sample = latency if ok else max(latency, self._penalty * self._pool)
            load.samples += 1
            load.ewma = self._blend(load.ewma, sample, now - load.stamp, load.samples)
            load.stamp = now
            self._pool_samples += 1
            self._pool = self._blend(
                self._pool, latency, now - self._pool_stamp, self._pool_samples
            )
            self._pool_stamp = now

    def _blend(self, average: float, sample: float, gap: float, samples: int) -> float:
        weight = max(-math.expm1(-gap / self._decay), 1.0 / samples)
        return average + (sample - average) * weight

    def _sweep(self, now: float) -> None:
        horizon = now - self._forget_after
        keep = self._keep
        for key in [k for k, load in self._loads.items() if load.touched < horizon]:
            if key not in keep:
                del self._loads[key]
        self._next_sweep = now + self._forget_after / 2


# ------------------------------------------------------------------------- ring hash

_POINTS_PER_DIGEST = 8
_UNPACK_POINTS = struct.Struct(">8Q").unpack


def _hash64(text: str) -> int:
    # A keyed-by-nothing blake2b: the same in every process and language (Python's
    # hash() is salted per process), so all clients map a key to the same instance.
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _ring_points(key: str, count: int) -> list[int]:
    points: list[int] = []
    for chunk in range((count + _POINTS_PER_DIGEST - 1) // _POINTS_PER_DIGEST):
        digest = hashlib.blake2b(f"{key}#{chunk}".encode(), digest_size=64).digest()
        points.extend(_UNPACK_POINTS(digest))
    del points[count:]
    return points


class _Ring:
    __slots__ = ("by_key", "candidates", "owner", "points", "vnodes")

    def __init__(
        self,
        candidates: tuple[Instance, ...],
        by_key: dict[str, Instance],
        points: list[int],
        owner: dict[int, str],
        vnodes: dict[str, list[int]],
    ) -> None:
        self.candidates = candidates
        self.by_key = by_key  # instance key -> instance in this snapshot
        self.points = points  # sorted ring positions
        self.owner = owner  # ring position -> instance key, in ring order
        self.vnodes = vnodes  # instance key -> its positions


class RingHash(BasePicker):
    """Consistent hashing of ``key`` onto a ring of the healthy instances.

    A ketama-style ring rather than rendezvous (HRW) hashing: HRW hashes the key with
    every instance on each pick (O(n), about 0.4 ms at 1,000 instances), while a ring
    costs one hash and a binary search per pick and pays for its points only when the
    snapshot changes. Both move only the keys of a removed instance.

    Each instance owns ``replicas * weight`` points placed by hashing its etcd key, so
    its points do not depend on the other instances: removing one instance hands its
    arcs to the neighbours and moves no other key. 100 points an instance spread keys
    within about ±20%. Beyond ``max_points`` (memory: ~100 bytes a point) every
    instance's count is scaled down to fit (20 each at 1,000 instances by default). An
    instance's points are a fixed sequence of which it keeps a prefix, and counts are
    rounded down, so a change of membership then rarely changes a count and moves at
    most the keys of the points gained or lost.

    A draining instance leaves the ring (its keys move to their neighbours) and takes
    them back when it returns. With ``key=None`` a pick is uniformly random.
    """

    def __init__(
        self,
        *,
        replicas: int = 100,
        max_points: int = 20_000,
        rng: random.Random | None = None,
    ) -> None:
        self._replicas = check_int("ring_hash", "replicas", replicas, 1)
        self._max_points = check_int("ring_hash", "max_points", max_points, 1)
        self._rng = _check_rng("ring_hash", rng)
        self._ring: _Ring | None = None
        self._views: _SnapshotCache[_Ring] = _SnapshotCache(self._build)

    def _build(self, instances: tuple[Instance, ...]) -> _Ring:
        candidates = usable(instances)
        members = _weighted(candidates)
        total = sum(weight for _, weight in members) * self._replicas
        scale = min(1.0, self._max_points / total) if total else 1.0
        wanted = {
            inst.key: max(1, int(weight * self._replicas * scale)) for inst, weight in members
        }
        old = self._ring
        old_vnodes = old.vnodes if old is not None else {}
        old_owner = old.owner if old is not None else {}
        vnodes: dict[str, list[int]] = {}
        added: list[str] = []
        for key in sorted(wanted):
            kept = old_vnodes.get(key)
            if kept is not None and len(kept) == wanted[key]:
                vnodes[key] = kept
            else:
                vnodes[key] = _ring_points(key, wanted[key])
                added.append(key)
        # Start from the old ring (kept in ring order) without the points of keys that left
        # or changed, then add the new points: sorting a long sorted run followed by a
        # short tail is nearly linear, where a full sort costs ~3 ms per 10,000 points.
        dropped = {key for key, kept in old_vnodes.items() if vnodes.get(key) is not kept}
        if old is not None and not dropped and not added:
            # Same members and weights (new revisions, say): the ring stays as it is.
            points, owner = old.points, old.owner
        else:
            owner = {p: k for p, k in old_owner.items() if k not in dropped}
            for key in added:
                for point in vnodes[key]:
                    # A 64-bit collision (odds about points**2 / 2**65) goes to the lower
                    # key, the same in every client.
                    holder = owner.get(point)
                    if holder is None or key < holder:
                        owner[point] = key
            points = sorted(owner)
            if added:
                owner = {point: owner[point] for point in points}
        by_key = {inst.key: inst for inst, _ in members}
        ring = _Ring(candidates, by_key, points, owner, vnodes)
        self._ring = ring
        return ring

    def pick(self, instances: Sequence[Instance], key: str | None = None) -> Instance | None:
        ring = self._views.get(instances)
        if not ring.points:
            return None
        if key is None:
            return self._rng.choice(ring.candidates)
        points = ring.points
        index = bisect_right(points, _hash64(key))
        point = points[index] if index < len(points) else points[0]
        return ring.by_key[ring.owner[point]]


# ------------------------------------------------------------------------- zone aware


class ZoneAware(BasePicker):
    """Keep calls in ``zone`` while it can take them; otherwise use every zone.

    Rule: when at least ``min_local`` healthy instances have ``Instance.zone == zone``,
    the inner policy picks among those alone; with fewer (none included) it picks among
    all healthy instances of every zone, the local ones too. The choice is made once per
    snapshot, so the inner picker always sees one stable sequence.
    """

    def __init__(
        self,
        *,
        zone: str | None = None,
        inner: str | Picker = "round_robin",
        min_local: int = 1,
        inner_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(zone, str) or not zone:
            raise ConfigError(f"zone_aware: zone must be a non-empty string, got {zone!r}")
        self.zone = zone
        self._min_local = check_int("zone_aware", "min_local", min_local, 1)
        self._inner = picker_from(inner, inner_options or {}, "zone_aware: inner")
        self._views: _SnapshotCache[tuple[Instance, ...]] = _SnapshotCache(self._build)

    @property
    def inner(self) -> Picker:
        return self._inner

    def _build(self, instances: tuple[Instance, ...]) -> tuple[Instance, ...]:
        healthy = usable(instances)
        local = tuple(inst for inst in healthy if inst.zone == self.zone)
        return local if len(local) >= self._min_local else healthy

    def pick(self, instances: Sequence[Instance], key: str | None = None) -> Instance | None:
        return self._inner.pick(self._views.get(instances), key)

    def started(self, instance: Instance) -> None:
        self._inner.started(instance)

    def finished(self, instance: Instance, latency: float, ok: bool) -> None:
        self._inner.finished(instance, latency, ok)


# ----------------------------------------------------------------------------- factory

POLICIES: dict[str, type[BasePicker]] = {
    "round_robin": RoundRobin,
    "random": Random,
    "weighted_round_robin": WeightedRoundRobin,
    "p2c": PowerOfTwoChoices,
    "ring_hash": RingHash,
    "zone_aware": ZoneAware,
}


def _option_names(cls: type[BasePicker]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self"]


def picker_from(policy: str | Picker, options: Mapping[str, Any], what: str) -> Picker:
    """A new picker for a policy name and its options, or a picker object as given. An
    object must have all of ``pick``, ``started`` and ``finished``: callers count calls
    through the last two, and one missing would fail every call after the pick."""
    if isinstance(policy, str):
        return make_picker(policy, **options)
    if options:
        raise ConfigError(f"{what}: options go with a policy name, not with a picker object")
    if all(callable(getattr(policy, name, None)) for name in ("pick", "started", "finished")):
        return policy
    raise ConfigError(f"{what} must be a policy name or a picker, not {policy!r}")


def make_picker(policy: str, **options: Any) -> Picker:
    """A new picker for ``policy`` (one of POLICIES), configured by ``options``.

    Raises ConfigError for an unknown policy, an option the policy does not have, or
    an option value it cannot use.
    """
    cls = POLICIES.get(policy) if isinstance(policy, str) else None
    if cls is None:
        raise ConfigError(
            f"unknown balancing policy {policy!r}; choose one of {', '.join(sorted(POLICIES))}"
        )
    known = _option_names(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        offered = ", ".join(known) if known else "none"
        raise ConfigError(
            f"{policy}: unknown option {', '.join(map(repr, unknown))}; its options: {offered}"
        )
    return cls(**options)
