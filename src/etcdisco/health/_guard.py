"""Binds checks to whatever acts on their verdict: a failing instance marks itself or
withdraws.

The guard knows nothing of etcd or of registrations: it is given a name (for logs),
the address its target-less checks probe, and two callbacks, ``apply(failing)`` (make
the world say so; may fail, and is then retried with backoff) and ``on_change(state)``
(tell listeners). The registry passes its own: marking rewrites the value under the
same lease (status ``unhealthy``), withdrawing deletes the key but keeps the lease
alive, so a flapping check costs etcd one write per settled change, never a re-grant.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence

from .._backoff import Backoff
from .._errors import ConfigError
from ._check import Check
from ._monitor import HealthMonitor
from ._result import CheckResult

log = logging.getLogger("etcdisco.health")


class OnFailing(enum.StrEnum):
    """What a registration does while its checks fail."""

    MARK = "mark"  # keep the key, with metadata status "unhealthy"
    WITHDRAW = "withdraw"  # delete the key, keep the lease; put it back when passing


def validate_checks(
    checks: Sequence[Check], on_failing: str
) -> tuple[tuple[Check, ...], OnFailing]:
    if isinstance(checks, Check):
        checks = [checks]
    found = tuple(checks)
    for check in found:
        if not isinstance(check, Check):
            raise ConfigError(f"checks must be etcdisco.health checks, not {check!r}")
    try:
        mode = OnFailing(on_failing)
    except ValueError:
        raise ConfigError(f"on_failing must be 'mark' or 'withdraw', not {on_failing!r}") from None
    return found, mode


class HealthGuard:
    """Owned by one user (a registration): runs its checks and applies their verdict.

    Check changes only set a desired state and wake one applier task, which calls
    ``apply`` with the latest verdict: a burst of changes while etcd is slow coalesces
    into one call, and a failed call is retried with backoff without blocking the
    checks.
    """

    def __init__(
        self,
        name: str,
        address: str,
        checks: Sequence[Check],
        mode: OnFailing,
        *,
        apply: Callable[[bool], Awaitable[None]],
        on_change: Callable[[CheckResult], None],
    ) -> None:
        self.name = name
        self.mode = mode
        self._apply = apply
        self._on_change = on_change
        self.monitor = HealthMonitor([c.bind(address) for c in checks])
        self.monitor.add_listener(self._changed)
        self._wake = asyncio.Event()
        self._applied: bool | None = None  # the "failing" verdict etcd holds
        self._task: asyncio.Task[None] | None = None
        self._backoff = Backoff(initial=0.2, maximum=5.0)

    @property
    def state(self) -> CheckResult:
        return self.monitor.state

    async def first_round(self) -> bool:
        """Probe once before the first write, so that write already tells the truth;
        returns whether the instance starts failing (not yet proven healthy)."""
        state = await self.monitor.first_round()
        failing = state is not CheckResult.PASSING
        self._applied = failing
        if failing:
            log.warning("%s starts unhealthy: %s", self.name, "; ".join(self.monitor.failures()))
        return failing

    def start(self) -> None:
        self.monitor.start()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._apply_loop(), name=f"etcdisco-health-{self.name}"
            )

    async def stop(self) -> None:
        await self.monitor.stop()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _changed(self, state: CheckResult) -> None:
        if state is CheckResult.FAILING:
            log.warning("%s is failing: %s", self.name, "; ".join(self.monitor.failures()))
        else:
            log.info("%s is %s", self.name, state.value)
        self._on_change(state)
        self._wake.set()

    async def _apply_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            failing = self.monitor.state is not CheckResult.PASSING
            if failing == self._applied:
                continue
            try:
                await self._apply(failing)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = self._backoff.next_delay()
                log.warning(
                    "could not write the health of %s (%s); retrying in %.1fs",
                    self.name,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                self._wake.set()
                continue
            self._applied = failing
            self._backoff.reset()
