"""What every server that drains shares, whatever it speaks (gRPC, HTTP).

A registered server stops in this order: mark the instance ``draining`` (clients stop
picking it), wait until no new call has arrived for ``quiet_period`` seconds (never
longer than ``drain_timeout``), then stop listening and deregister, giving calls still
running ``grace`` seconds. The quiet period counts from the drain's start as well as
from the last arrival, so clients always get that long to see "draining" before the
instance goes; a client that never stops sending is cut off by ``drain_timeout``.

Here: the policy (:class:`DrainPolicy`) and what a drain reports
(:class:`DrainReport`), the arrival counter (:class:`Activity`, fed by a gRPC
interceptor or an ASGI middleware), the wait's next step (:func:`quiet_step`) and the
checks both kinds of server make before they start. The transports' own steps live in
``etcdisco.grpc`` and ``etcdisco.asgi`` / ``etcdisco.uvicorn``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ._address import normalize_address
from ._advertise import advertised_address
from ._errors import ConfigError

__all__ = [
    "STEP_TIMEOUT",
    "Activity",
    "Arrivals",
    "DrainPolicy",
    "DrainReport",
    "advertise",
    "quiet_step",
    "service_names",
]

# Each etcd step of a drain (mark draining, deregister) per registration: a step that
# cannot finish is skipped, since the lease expiring withdraws the instance anyway.
STEP_TIMEOUT = 5.0


@dataclass(frozen=True)
class DrainPolicy:
    """How a registered server drains; validated on creation."""

    quiet_period: float = 1.0
    drain_timeout: float = 10.0
    grace: float = 5.0

    def __post_init__(self) -> None:
        for name in ("quiet_period", "drain_timeout", "grace"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, not {value!r}")


@dataclass(frozen=True)
class DrainReport:
    """What a drain did: ``quiet`` is False when ``drain_timeout`` (or a second signal)
    ended the wait while clients were still sending. ``rpcs_while_draining`` counts
    the calls (gRPC) or requests (HTTP) that arrived after the drain began."""

    quiet: bool
    waited: float
    rpcs_while_draining: int

    @property
    def requests_while_draining(self) -> int:
        """``rpcs_while_draining``, under the name an HTTP server would use."""
        return self.rpcs_while_draining


class Arrivals(Protocol):
    """What a drain reads: how many calls arrived, and when the last one did
    (``time.monotonic()``; ``-inf`` before the first)."""

    @property
    def arrivals(self) -> int: ...

    @property
    def last_arrival(self) -> float: ...


class Activity:
    """When calls (other than health checks) arrive. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.arrivals = 0
        self.last_arrival = float("-inf")

    def touch(self) -> None:
        now = time.monotonic()
        with self._lock:
            self.arrivals += 1
            self.last_arrival = now


def quiet_step(
    activity: Arrivals, policy: DrainPolicy, started: float, hurried: bool
) -> bool | float:
    """The next step of a drain's wait for quiet (the callers sleep, a second signal
    wakes them): True once no call has arrived for the quiet period, counted from the
    drain's start too; False when ``drain_timeout`` or a second signal ends the wait
    first; else the seconds to sleep before looking again."""
    now = time.monotonic()
    left = max(started, activity.last_arrival) + policy.quiet_period - now
    if left <= 0:
        return True
    deadline = started + policy.drain_timeout
    if now >= deadline or hurried:
        return False
    return min(left, deadline - now)


def service_names(services: str | Sequence[str]) -> tuple[str, ...]:
    """The service names a server registers under (at least one)."""
    names = (services,) if isinstance(services, str) else tuple(services)
    if not names:
        raise ConfigError("services is empty: name at least one service to register")
    return names


def advertise(port: int | None, address: str | None, host: str | None, what: str) -> str:
    """The address to register: ``address`` as given, else ``host:port`` (host: this
    host's primary IP by default). ``what`` says where the port comes from."""
    if address is not None:
        if host is not None:
            raise ConfigError("give address or host, not both")
        return normalize_address(address)
    if port is None or isinstance(port, bool) or not isinstance(port, int) or port <= 0:
        raise ConfigError(
            f"port must be the port the server listens on ({what}), not {port!r}; or give address"
        )
    return advertised_address(port, host)
