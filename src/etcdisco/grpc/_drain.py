"""The drain policy both server flavours share: its settings, its checks, its steps.

Both flavours (``serve_registered`` in ``_serve_sync`` for ``grpc.Server`` with
:class:`etcdisco.Client`, ``aio_serve_registered`` in ``_serve_aio`` for
``grpc.aio.Server`` with :class:`etcdisco.AsyncClient`) follow one order:

    start      server.start() -> health SERVING ("" and every name) -> register
    shutdown   health NOT_SERVING + registry status "draining"
               -> wait until no new RPC arrived for ``quiet_period`` seconds
                  (never longer than ``drain_timeout``)
               -> deregister (key deleted, lease revoked)
               -> server.stop(grace): RPCs still running get ``grace`` seconds

Registering only once the server listens means no client is sent to a port that
refuses it. The quiet period counts from the drain's start as well as from the last
arrival, so clients always get that long to see "draining" before the key goes; a
client that never stops sending is cut off by ``drain_timeout``. A second signal
during the wait skips the rest of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .._address import normalize_address
from .._errors import ConfigError
from .._signals import StopSignals, signal_name
from ._advertise import advertised_address
from ._server import Activity, ServerKit, kit_of

__all__ = [
    "STEP_TIMEOUT",
    "DrainPolicy",
    "DrainReport",
    "drained",
    "log",
    "on_signal_message",
    "prepare",
    "quiet_step",
]

log = logging.getLogger("etcdisco.grpc")

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
    ended the wait while clients were still sending."""

    quiet: bool
    waited: float
    rpcs_while_draining: int


def _names(services: str | Sequence[str]) -> tuple[str, ...]:
    names = (services,) if isinstance(services, str) else tuple(services)
    if not names:
        raise ConfigError("services is empty: name at least one service to register")
    return names


def _address(port: int | None, address: str | None, host: str | None) -> str:
    if address is not None:
        if host is not None:
            raise ConfigError("give address or host, not both")
        return normalize_address(address)
    if port is None or isinstance(port, bool) or not isinstance(port, int) or port <= 0:
        raise ConfigError(
            f"port must be the port the server listens on (what add_insecure_port "
            f"returned), not {port!r}; or give address"
        )
    return advertised_address(port, host)


def prepare(
    server: object,
    services: str | Sequence[str],
    port: int | None,
    address: str | None,
    host: str | None,
    timings: tuple[float, float, float],
    handle_signals: bool,
) -> tuple[tuple[str, ...], str, DrainPolicy, ServerKit]:
    """Both flavours' checks, made before anything starts; ``timings`` are the
    quiet period, drain timeout and grace."""
    names = _names(services)
    advertised = _address(port, address, host)
    policy = DrainPolicy(*timings)
    kit = kit_of(server)
    if handle_signals:
        try:
            StopSignals.check_main_thread("handle_signals=True")
        except RuntimeError as exc:
            raise ConfigError(str(exc)) from None
    return names, advertised, policy, kit


def quiet_step(
    activity: Activity, policy: DrainPolicy, started: float, hurried: bool
) -> bool | float:
    """The next step of a drain's wait for quiet (the flavours sleep, a second signal
    wakes them): True once no RPC has arrived for the quiet period, counted from the
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


def drained(address: str, quiet: bool, waited: float, rpcs: int) -> DrainReport:
    report = DrainReport(quiet, waited, rpcs)
    log.info(
        "%s drained in %.2fs (%s, %d RPCs while draining) and stopped",
        address,
        waited,
        "quiet" if quiet else "timed out",
        rpcs,
    )
    return report


def on_signal_message(signum: int, first: bool, address: str) -> None:
    """Log what a stop signal does: the first drains, the next ones hurry."""
    if first:
        log.info("%s: draining %s", signal_name(signum), address)
    else:
        log.info("%s again: skipping the rest of the drain wait", signal_name(signum))
