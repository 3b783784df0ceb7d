"""Routing requests over the live instances of a service, whatever carries them.

What every balancing client of etcdisco shares: the gRPC balancing channels
(``etcdisco.grpc``) and the HTTP transports (``etcdisco.http``) import this module and
add only what their transport needs (opening a connection, reading an outcome).

- :class:`Pool` keeps one :class:`SubChannel` per live instance of one service (a
  grpc channel, an HTTP connection pool: the transport's ``C``) and picks one per
  request. Lifecycle of a sub-channel: opened when its instance appears; kept (only
  its ``Instance`` replaced) when the instance's metadata changes, so a draining
  instance keeps its connections for the requests already on them while pickers skip
  it; retired when the instance disappears or moves to another address, and closed
  once its last request ends.
- Choice: the picker sees the instances whose sub-channel is not ``failing`` (all of
  them when no healthy one is left), minus those the outlier detector ejected and
  those a retry already tried. The snapshot handed to the picker is the same tuple
  object while nothing changes, so pickers keep their per-snapshot work.
- An :class:`Attempt` is one request placed on one sub-channel, counted (picker
  ``started``, ``in_flight``, the pick and retry counters) from its placement until
  ``end()`` (picker ``finished``, outlier detector, closing a retired sub-channel).
- The retry rule's structure: the transport sorts each failed attempt into an
  :class:`Outcome`; :func:`may_retry` says whether another instance may be tried;
  :class:`Retries` hands out the attempts of one request under that rule, at most
  ``max_attempts``, within a deadline, never twice on one instance, and within a
  :class:`RetryBudget` when one is given.

Thread-safe: the pool holds one lock for dictionary work only; a budget holds its own.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from ._checks import check_float
from ._model import Instance
from .balancing import Picker
from .outlier import OutlierDetector

log = logging.getLogger("etcdisco.routing")

C = TypeVar("C")
A = TypeVar("A", bound="Attempt[Any]")


# -- sub-channels and the pool -------------------------------------------------------


class SubChannel(Generic[C]):
    """The connection to one instance (``channel``), with the requests running on it."""

    __slots__ = (
        "callables",
        "channel",
        "closed",
        "failing",
        "in_flight",
        "instance",
        "retired",
        "state",
    )

    def __init__(self, instance: Instance, channel: C, state: Any = None) -> None:
        self.instance = instance
        self.channel = channel
        self.state = state  # the transport's own view of the connection (grpc: connectivity)
        self.failing = False  # avoided while other sub-channels can take requests
        self.in_flight = 0
        self.retired = False
        self.closed = False
        # What the transport derives from the channel once and reuses (grpc: the real
        # multicallables, which cost ~130 us each to build).
        self.callables: dict[object, Any] = {}


class Transport(Protocol[C]):
    """How a pool opens, follows and closes the connection to one instance."""

    def open(self, address: str) -> C: ...

    def watch(self, sub: SubChannel[C]) -> None:
        """Start following ``sub``'s connection, if the transport can."""

    def close(self, sub: SubChannel[C]) -> None:
        """Close ``sub``'s channel (may return before it is closed)."""


class Pool(Generic[C]):
    """The sub-channels of one service. Thread-safe (one lock, dictionary work only).

    Subclasses may give new sub-channels a ``state`` (``initial_state``) and derive a
    pool-wide state from theirs (:meth:`_refresh_state`); ``on_state`` is called when
    that state changes, and once more when the pool closes.
    """

    initial_state: ClassVar[Any] = None

    def __init__(
        self,
        service: str,
        picker: Picker,
        outlier: OutlierDetector | None,
        transport: Transport[C],
        on_state: Callable[[], None] = lambda: None,
    ) -> None:
        self.service = service
        self.picker = picker
        self.outlier = outlier
        self._transport = transport
        self._on_state = on_state
        self._lock = threading.Lock()
        self._update_lock = threading.Lock()
        self._subs: dict[str, SubChannel[C]] = {}
        self._retired: set[SubChannel[C]] = set()
        self._pickable: tuple[Instance, ...] = ()
        self.closed = False
        # Counters for metrics, kept under the lock acquire() takes anyway. An
        # acquire that excludes instances already tried is a retry.
        self.picks = 0
        self.retries = 0

    # -- membership ----------------------------------------------------------------

    def update(self, instances: Iterable[Instance]) -> None:
        """Follow a new snapshot of the service's instances."""
        wanted = {i.key: i for i in instances if i.service == self.service}
        with self._update_lock:
            if self.closed:
                return
            with self._lock:
                # An instance that moved to another address gets a new sub-channel.
                stale = {
                    key: sub
                    for key, sub in self._subs.items()
                    if key not in wanted or wanted[key].address != sub.instance.address
                }
                fresh = [i for key, i in wanted.items() if key not in self._subs or key in stale]
                for key, sub in self._subs.items():
                    if key not in stale:
                        sub.instance = wanted[key]
            # Opening a channel does no I/O, but keep it out of the lock all the same.
            opened = [
                SubChannel(i, self._transport.open(i.address), self.initial_state) for i in fresh
            ]
            to_close: list[SubChannel[C]] = []
            with self._lock:
                for key, sub in stale.items():
                    del self._subs[key]
                    sub.retired = True
                    if sub.in_flight:
                        self._retired.add(sub)
                    else:
                        sub.closed = True
                        to_close.append(sub)
                for sub in opened:
                    self._subs[sub.instance.key] = sub
                changed = self._rebuild()
            for sub in stale.values():
                log.info(
                    "%s: %s left; its connections close once idle",
                    self.service,
                    sub.instance.address,
                )
            for sub in opened:
                log.info("%s: %s joined", self.service, sub.instance.address)
                self._transport.watch(sub)
            for sub in to_close:
                self._transport.close(sub)
            if changed:
                self._on_state()

    def set_failing(self, sub: SubChannel[C], failing: bool, state: Any = None) -> None:
        """Called by the transport when ``sub``'s connection fails or recovers (with
        the transport's ``state`` for it, when it keeps one)."""
        with self._lock:
            if sub.closed or (sub.failing is failing and sub.state is state):
                return
            sub.state = state
            sub.failing = failing
            changed = self._rebuild()
        if changed:
            self._on_state()

    def _rebuild(self) -> bool:
        """Recompute the pickable snapshot and the pool's state (lock held); True when
        the state changed."""
        subs = sorted(self._subs.values(), key=lambda s: s.instance.key)
        usable = tuple(s.instance for s in subs if not s.failing)
        if not any(i.healthy for i in usable):
            usable = tuple(s.instance for s in subs)
        if usable != self._pickable:
            self._pickable = usable
        return self._refresh_state(subs)

    def _refresh_state(self, subs: list[SubChannel[C]]) -> bool:
        """Derive the pool's state from its sub-channels' (lock held); True when it
        changed. No state by default."""
        return False

    def instances(self) -> tuple[Instance, ...]:
        """The instances that have a sub-channel (draining ones included)."""
        with self._lock:
            return tuple(
                s.instance for s in sorted(self._subs.values(), key=lambda s: s.instance.key)
            )

    def subchannels(self) -> list[SubChannel[C]]:
        """Every open sub-channel, retired ones still finishing requests included,
        by instance key (read them, do not change them)."""
        with self._lock:
            subs = [*self._subs.values(), *self._retired]
        return sorted(subs, key=lambda s: (s.instance.key, s.retired))

    # -- requests ------------------------------------------------------------------

    def acquire(
        self, key: str | None = None, exclude: frozenset[str] = frozenset()
    ) -> tuple[SubChannel[C], Instance] | None:
        """Pick an instance and count a request on its sub-channel; None when no
        instance can take it. Pair with :meth:`release`."""
        for _ in range(3):  # a pick may race with the instance's retirement
            snapshot = self._pickable
            # Ejection first, on the whole pool: the detector's cap on ejected
            # instances is a fraction of the pool, and the unchanged snapshot is
            # recognised by identity.
            if self.outlier is not None:
                snapshot = self.outlier.admitted(snapshot)
            if exclude:
                snapshot = tuple(i for i in snapshot if i.key not in exclude)
            inst = self.picker.pick(snapshot, key)
            if inst is None:
                return None
            with self._lock:
                sub = self._subs.get(inst.key)
                if sub is None or sub.retired:
                    continue
                sub.in_flight += 1
                self.picks += 1
                if exclude:
                    self.retries += 1
            self.picker.started(inst)
            return sub, inst
        return None

    def release(self, sub: SubChannel[C], inst: Instance, latency: float, ok: bool) -> None:
        """A request counted by :meth:`acquire` ended; ``ok`` is False only for
        failures that count against the instance."""
        self.picker.finished(inst, latency, ok)
        if self.outlier is not None:
            self.outlier.record(inst.key, ok)
        with self._lock:
            sub.in_flight -= 1
            close = sub.retired and not sub.closed and sub.in_flight == 0
            if close:
                sub.closed = True
                self._retired.discard(sub)
        if close:
            self._transport.close(sub)

    # -- end -----------------------------------------------------------------------

    def close(self) -> None:
        """Close every sub-channel now (requests still running may fail)."""
        with self._update_lock, self._lock:
            if self.closed:
                return
            self.closed = True
            subs = [*self._subs.values(), *self._retired]
            self._subs.clear()
            self._retired.clear()
            self._pickable = ()
            for sub in subs:
                sub.retired = sub.closed = True
        for sub in subs:
            self._transport.close(sub)
        self._on_state()


class Attempt(Generic[C]):
    """One request placed on one sub-channel. ``end()`` when the request has ended
    (later calls do nothing); ``ok`` stays True unless the outcome counts against the
    instance."""

    __slots__ = ("_ended", "_pool", "_started", "instance", "ok", "sub", "timeout")

    def __init__(
        self, pool: Pool[C], sub: SubChannel[C], instance: Instance, timeout: float | None = None
    ) -> None:
        self._pool = pool
        self._started = time.monotonic()
        self._ended = False
        self.sub = sub
        self.instance = instance
        self.timeout = timeout
        self.ok = True

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self._pool.release(self.sub, self.instance, time.monotonic() - self._started, self.ok)


def place(
    pool: Pool[C], key: str | None, exclude: frozenset[str], timeout: float | None
) -> Attempt[C] | None:
    """An attempt on the instance the pool picks, or None when none can take it."""
    picked = pool.acquire(key, exclude)
    return None if picked is None else Attempt(pool, picked[0], picked[1], timeout)


# -- the retry rule ------------------------------------------------------------------


class Outcome(enum.Enum):
    """How an attempt ended, as far as routing is concerned. The transport decides
    which of its results is which."""

    DONE = "done"
    """An answer, or a failure that says nothing against the instance: not retried."""
    NOT_SENT = "not_sent"
    """Failed before the request reached the instance (no connection): tried again on
    another instance whatever the request; counts against the instance."""
    FAILED = "failed"
    """The instance failed the request, maybe after acting on it: tried again on
    another instance only when the request is idempotent; counts against the
    instance."""


def may_retry(outcome: Outcome, idempotent: bool) -> bool:
    """The rule: a request that never reached an instance goes to another one; one
    that did goes again only when repeating it is harmless."""
    return outcome is Outcome.NOT_SENT or (outcome is Outcome.FAILED and idempotent)


@dataclass(frozen=True)
class RetryBudget:
    """At most ``ratio`` retries per request, over the last ``window`` seconds, plus
    ``min_per_second`` retries a second (so that a quiet client can still retry).

    Finagle's and Envoy's retry budgets: when instances fail for a reason retries
    cannot fix (overload, say), retries stop at a fraction of the traffic instead of
    multiplying it by ``max_attempts``. Validated on creation.
    """

    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0

    def __post_init__(self) -> None:
        check_float("retry budget", "ratio", self.ratio, positive=False)
        check_float("retry budget", "min_per_second", self.min_per_second, positive=False)
        check_float("retry budget", "window", self.window)


DEFAULT_RETRY_BUDGET = RetryBudget()


class Budget:
    """The running account of one :class:`RetryBudget`: requests and retries counted
    in ten buckets over its window. Thread-safe."""

    _BUCKETS = 10

    __slots__ = (
        "_current",
        "_lock",
        "_requests",
        "_retries",
        "_total_requests",
        "_total_retries",
        "_width",
        "clock",
        "refused",
        "spec",
    )

    def __init__(self, spec: RetryBudget, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.clock = clock
        self._width = spec.window / self._BUCKETS
        self._lock = threading.Lock()
        self._requests = [0] * self._BUCKETS
        self._retries = [0] * self._BUCKETS
        self._total_requests = 0
        self._total_retries = 0
        self._current = math.floor(clock() / self._width)
        self.refused = 0
        """Retries refused so far (a counter, for metrics and logs)."""

    def _advance(self) -> int:
        """The current bucket's index, after emptying the buckets time has left (lock
        held)."""
        now = math.floor(self.clock() / self._width)
        if now != self._current:
            for step in range(min(now - self._current, self._BUCKETS)):
                index = (self._current + 1 + step) % self._BUCKETS
                self._total_requests -= self._requests[index]
                self._total_retries -= self._retries[index]
                self._requests[index] = self._retries[index] = 0
            self._current = now
        return now % self._BUCKETS

    def deposit(self) -> None:
        """A request (not a retry) began."""
        with self._lock:
            self._requests[self._advance()] += 1
            self._total_requests += 1

    def can_retry(self) -> bool:
        """Whether one more retry fits; count it with :meth:`withdraw`."""
        spec = self.spec
        with self._lock:
            self._advance()
            allowed = spec.min_per_second * spec.window + spec.ratio * self._total_requests
            if self._total_retries < allowed:
                return True
            self.refused += 1
        return False

    def withdraw(self) -> None:
        """A retry was made."""
        with self._lock:
            self._retries[self._advance()] += 1
            self._total_retries += 1


Placer = Callable[[str | None, frozenset[str], float | None], A | None]


class Retries(Generic[A]):
    """The attempts of one request. The transport runs them in a loop like this one,
    blocking on or awaiting each attempt::

        while (attempt := retries.next()) is not None:
            try:
                return <the request on attempt.sub, within attempt.timeout>
            except <the transport's errors> as exc:
                if not retries.decide(attempt, exc, <its Outcome>, idempotent):
                    raise
            finally:
                attempt.end()
        raise retries.exhausted()

    ``place(key, exclude, timeout)`` makes an attempt on an instance not in
    ``exclude`` (None when none can take it).
    """

    __slots__ = (
        "_budget",
        "_deadline",
        "_key",
        "_last",
        "_left",
        "_no_instance",
        "_place",
        "_tried",
    )

    def __init__(
        self,
        place: Placer[A],
        key: str | None,
        *,
        max_attempts: int,
        deadline: float | None,
        no_instance: Callable[[], BaseException],
        budget: Budget | None = None,
    ) -> None:
        self._place = place
        self._key = key
        self._left = max_attempts
        self._deadline = deadline
        self._no_instance = no_instance
        self._budget = budget
        self._tried: frozenset[str] = frozenset()
        self._last: BaseException | None = None
        if budget is not None:
            budget.deposit()

    @property
    def tried(self) -> frozenset[str]:
        """Keys of the instances tried and given up on so far."""
        return self._tried

    def next(self) -> A | None:
        """The next attempt, with what is left of the deadline; None when the
        attempts, the deadline, the budget or the untried instances are used up."""
        if self._left <= 0:
            return None
        self._left -= 1
        remaining = None if self._deadline is None else self._deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return None
        budget = self._budget if self._tried else None
        if budget is not None and not budget.can_retry():
            return None
        attempt = self._place(self._key, self._tried, remaining)
        if attempt is not None and budget is not None:
            budget.withdraw()
        return attempt

    def decide(
        self, attempt: A, error: BaseException | None, outcome: Outcome, idempotent: bool
    ) -> bool:
        """``attempt`` ended with ``outcome`` (``error`` when it raised): note that for
        its instance, and say whether another instance may be tried."""
        attempt.ok = outcome is Outcome.DONE
        if not may_retry(outcome, idempotent):
            return False
        if error is not None:
            self._last = error
        self._tried |= {attempt.instance.key}
        return True

    def exhausted(self) -> BaseException:
        """What the request raises when :meth:`next` ran out: the last failure, else
        the transport's error for no instance at all."""
        return self._last if self._last is not None else self._no_instance()
