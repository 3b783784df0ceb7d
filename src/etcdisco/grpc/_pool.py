"""One real gRPC channel per live instance, and the choice of one for each call.

Shared by the sync and the aio balancing channels; what differs (how a channel is
opened, followed and closed) comes in through :class:`Transport`.

Lifecycle of a sub-channel: opened when its instance appears; kept (only its
``Instance`` replaced) when the instance's metadata changes, so a draining instance
keeps its connection for the calls already on it while pickers skip it; retired when
the instance disappears or moves to another address, and closed once its last call
ends (closing a grpc channel cancels the calls on it).

Choice: the picker sees the instances whose sub-channel is not in TRANSIENT_FAILURE
(all of them when no healthy one is left), minus those the outlier detector ejected
and those a retry already tried. The snapshot handed to the picker is the same tuple object while
nothing changes, so pickers keep their per-snapshot work.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import grpc

from .._model import Instance
from ..balancing import Picker
from ..outlier import OutlierDetector

log = logging.getLogger("etcdisco.grpc")

C = TypeVar("C")

Connectivity = grpc.ChannelConnectivity
_TF = Connectivity.TRANSIENT_FAILURE


class SubChannel(Generic[C]):
    """A real channel to one instance, with the calls running on it."""

    __slots__ = ("callables", "channel", "closed", "in_flight", "instance", "retired", "state")

    def __init__(self, instance: Instance, channel: C) -> None:
        self.instance = instance
        self.channel = channel
        self.state = Connectivity.IDLE
        self.in_flight = 0
        self.retired = False
        self.closed = False
        # Multicallables by the balancing multicallable they serve: building one costs
        # ~130 us, far more than a dictionary lookup.
        self.callables: dict[object, Any] = {}


@dataclass(frozen=True)
class SubChannelInfo:
    """A sub-channel as :meth:`Pool.info` reports it (for inspection and tests)."""

    key: str
    address: str
    state: grpc.ChannelConnectivity
    in_flight: int
    retired: bool


class Transport(Protocol[C]):
    def open(self, address: str) -> C: ...

    def watch(self, sub: SubChannel[C]) -> None:
        """Start following ``sub``'s connectivity (reporting to Pool.state_changed)."""

    def close(self, sub: SubChannel[C]) -> None:
        """Close ``sub``'s channel (may return before it is closed)."""


def aggregate(states: Iterable[grpc.ChannelConnectivity]) -> grpc.ChannelConnectivity:
    """The channel's state from its sub-channels', as grpc's round_robin reports it."""
    seen = set(states)
    for state in (Connectivity.READY, Connectivity.CONNECTING, Connectivity.IDLE):
        if state in seen:
            return state
    return _TF


class Pool(Generic[C]):
    """The sub-channels of one service. Thread-safe (one lock, dictionary work only)."""

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
        self._state = _TF
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
            opened = [SubChannel(i, self._transport.open(i.address)) for i in fresh]
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
                    "%s: %s left; its channel closes once idle", self.service, sub.instance.address
                )
            for sub in opened:
                log.info("%s: %s joined", self.service, sub.instance.address)
                self._transport.watch(sub)
            for sub in to_close:
                self._transport.close(sub)
            if changed:
                self._on_state()

    def state_changed(self, sub: SubChannel[C], state: grpc.ChannelConnectivity) -> None:
        """Called by the transport when ``sub``'s connectivity changes."""
        with self._lock:
            if sub.closed or sub.state is state:
                return
            sub.state = state
            changed = self._rebuild()
        if changed:
            self._on_state()

    def _rebuild(self) -> bool:
        """Recompute the pickable snapshot and the state (lock held); True when the
        state changed."""
        subs = sorted(self._subs.values(), key=lambda s: s.instance.key)
        usable = tuple(s.instance for s in subs if s.state is not _TF)
        if not any(i.healthy for i in usable):
            usable = tuple(s.instance for s in subs)
        if usable != self._pickable:
            self._pickable = usable
        state = aggregate(s.state for s in subs)
        changed, self._state = state is not self._state, state
        return changed

    @property
    def state(self) -> grpc.ChannelConnectivity:
        return Connectivity.SHUTDOWN if self.closed else self._state

    def instances(self) -> tuple[Instance, ...]:
        """The instances that have a sub-channel (draining ones included)."""
        with self._lock:
            return tuple(
                s.instance for s in sorted(self._subs.values(), key=lambda s: s.instance.key)
            )

    def info(self) -> tuple[SubChannelInfo, ...]:
        with self._lock:
            subs = [*self._subs.values(), *self._retired]
            return tuple(
                SubChannelInfo(s.instance.key, s.instance.address, s.state, s.in_flight, s.retired)
                for s in sorted(subs, key=lambda s: (s.instance.key, s.retired))
            )

    # -- calls ---------------------------------------------------------------------

    def acquire(
        self, key: str | None = None, exclude: frozenset[str] = frozenset()
    ) -> tuple[SubChannel[C], Instance] | None:
        """Pick an instance and count a call on its sub-channel; None when no
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
        """A call counted by :meth:`acquire` ended; ``ok`` is False only for failures
        that say the instance is unreachable."""
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
        """Close every sub-channel now (calls still running are cancelled)."""
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
