"""The drain both server flavours share: its checks and its log lines (the policy, the
arrival counter and the wait's steps are transport-neutral: ``etcdisco._drain``).

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
from collections.abc import Sequence

from .._drain import (
    STEP_TIMEOUT,
    DrainPolicy,
    DrainReport,
    advertise,
    quiet_step,
    service_names,
)
from .._errors import ConfigError
from .._signals import StopSignals, signal_name
from ._server import ServerKit, kit_of

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
    names = service_names(services)
    advertised = advertise(port, address, host, "what add_insecure_port returned")
    policy = DrainPolicy(*timings)
    kit = kit_of(server)
    if handle_signals:
        try:
            StopSignals.check_main_thread("handle_signals=True")
        except RuntimeError as exc:
            raise ConfigError(str(exc)) from None
    return names, advertised, policy, kit


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
