"""The one interface every active check implements, and its timing settings."""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import os
from dataclasses import dataclass

from .._errors import ConfigError
from ._result import Outcome

log = logging.getLogger("etcdisco.health")

# HAProxy's rise 2 / fall 3 damp a single lost probe without hiding a real outage for
# long; a 5 s interval detects a dead target in about fall x interval = 15 s, which is
# below the 10 s TTL's worst case for a crashed process (up to ~2 TTL after a leader
# change) and far cheaper than probing every second from every sidecar.
DEFAULT_INTERVAL = 5.0
DEFAULT_TIMEOUT = 2.0
DEFAULT_RISE = 2
DEFAULT_FALL = 3
DEFAULT_JITTER = 0.1


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be > 0 seconds, not {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class Check(abc.ABC):
    """An active check: ``probe()`` asks the target once; the rest is its schedule.

    ``interval`` seconds between probes (each scaled by a random factor in
    ``1 ± jitter`` so that many checkers do not probe in step), ``timeout`` seconds
    for one probe, ``rise`` consecutive passes to become passing again and ``fall``
    consecutive failures to become failing. Checks are frozen values: two equal
    checks probe the same thing the same way, which is how the agent's reload tells
    a changed registration from an untouched one.
    """

    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    rise: int = DEFAULT_RISE
    fall: int = DEFAULT_FALL
    jitter: float = DEFAULT_JITTER

    def __post_init__(self) -> None:
        _positive("interval", self.interval)
        _positive("timeout", self.timeout)
        for name in ("rise", "fall"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, not {value!r}")
        jitter = self.jitter
        if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter < 1:
            raise ConfigError(f"jitter must be a fraction in [0, 1), not {jitter!r}")

    @abc.abstractmethod
    async def probe(self) -> Outcome:
        """Ask the target once. The caller bounds the time with ``timeout``."""

    @abc.abstractmethod
    def describe(self) -> str:
        """A short name for logs, e.g. ``http://127.0.0.1:8080/healthz``."""

    def bind(self, address: str) -> Check:
        """This check with its target defaulted to ``address`` (a registration's)."""
        return self


def os_reason(exc: OSError) -> str:
    """The OS's words ("Connection refused"), not asyncio's "Connect call failed"."""
    if exc.errno:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


async def run_probe(check: Check) -> Outcome:
    """One probe bounded by the check's timeout; any error is a failing outcome, so
    a broken target can never stop its checker."""
    try:
        async with asyncio.timeout(check.timeout):
            return await check.probe()
    except asyncio.CancelledError:
        raise
    except TimeoutError:
        return Outcome.failing(f"no answer within {check.timeout:g}s")
    except ConfigError:
        raise
    except Exception as exc:
        log.debug("probe of %s raised", check.describe(), exc_info=True)
        return Outcome.failing(f"probe error: {exc!r}")
