"""One real gRPC channel per live instance, and the choice of one for each call.

Shared by the sync and the aio balancing channels; what differs (how a channel is
opened, followed and closed) comes in through :class:`Transport`. The pool itself is
the transport-neutral one of ``etcdisco._routing`` (sub-channel lifecycle, choice,
call accounting), which the HTTP transports use too; gRPC adds connectivity.

Lifecycle of a sub-channel: opened when its instance appears; kept (only its
``Instance`` replaced) when the instance's metadata changes, so a draining instance
keeps its connection for the calls already on it while pickers skip it; retired when
the instance disappears or moves to another address, and closed once its last call
ends (closing a grpc channel cancels the calls on it).

Choice: the picker sees the instances whose sub-channel is not in TRANSIENT_FAILURE
(all of them when no healthy one is left), minus those the outlier detector ejected
and those a retry already tried.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar

import grpc

from .. import _routing
from .._routing import SubChannel

__all__ = ["Pool", "SubChannel", "SubChannelInfo", "Transport", "aggregate"]

C = TypeVar("C")

Connectivity = grpc.ChannelConnectivity
_TF = Connectivity.TRANSIENT_FAILURE


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


class Pool(_routing.Pool[C]):
    """The sub-channels of one service, with their connectivity. Thread-safe."""

    initial_state: ClassVar[grpc.ChannelConnectivity] = Connectivity.IDLE
    _state: grpc.ChannelConnectivity = _TF

    def state_changed(self, sub: SubChannel[C], state: grpc.ChannelConnectivity) -> None:
        """Called by the transport when ``sub``'s connectivity changes."""
        self.set_failing(sub, state is _TF, state)

    def _refresh_state(self, subs: list[SubChannel[C]]) -> bool:
        state = aggregate(s.state for s in subs)
        changed, self._state = state is not self._state, state
        return changed

    @property
    def state(self) -> grpc.ChannelConnectivity:
        return Connectivity.SHUTDOWN if self.closed else self._state

    def info(self) -> tuple[SubChannelInfo, ...]:
        return tuple(
            SubChannelInfo(s.instance.key, s.instance.address, s.state, s.in_flight, s.retired)
            for s in self.subchannels()
        )
