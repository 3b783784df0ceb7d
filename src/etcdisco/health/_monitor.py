"""Running checks: one owned task per check, and their combined state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence

from ._check import Check, run_probe
from ._result import CheckResult, Outcome
from ._thresholds import Thresholds

log = logging.getLogger("etcdisco.health")

HealthListener = Callable[[CheckResult], None]


class CheckRunner:
    """Probes one check on its schedule and keeps its thresholded state."""

    def __init__(
        self,
        check: Check,
        on_change: Callable[[CheckRunner], None],
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.check = check
        self.thresholds = Thresholds(check.rise, check.fall)
        self.last: Outcome | None = None
        self._on_change = on_change
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> CheckResult:
        return self.thresholds.state

    async def probe_once(self) -> bool:
        """Probe now; True when the settled state changed."""
        outcome = await run_probe(self.check)
        self.last = outcome
        changed = self.thresholds.observe(outcome.result)
        if changed:
            # INFO: whoever acts on the verdict (a registration) warns, once.
            log.info(
                "check %s is now %s (%s)", self.check.describe(), self.state.value, outcome.detail
            )
        return changed

    def next_delay(self) -> float:
        jitter = self.check.jitter
        return self.check.interval * self._rng.uniform(1 - jitter, 1 + jitter)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"etcdisco-check-{self.check.describe()}"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.next_delay())
            try:
                changed = await self.probe_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # run_probe turns target errors into outcomes; this is a bug or a bad
                # config, and a checker that dies would freeze the state silently.
                log.exception("check %s failed to run", self.check.describe())
                continue
            if changed:
                self._on_change(self)


class HealthMonitor:
    """Owns the runners of a set of checks and reports their combined state:
    failing if any check fails, passing if all pass, unknown otherwise."""

    def __init__(self, checks: Sequence[Check], *, rng: random.Random | None = None) -> None:
        self.runners = [CheckRunner(c, self._runner_changed, rng=rng) for c in checks]
        self._listeners: list[HealthListener] = []
        self._reported = CheckResult.UNKNOWN

    @property
    def state(self) -> CheckResult:
        states = {r.state for r in self.runners}
        if CheckResult.FAILING in states:
            return CheckResult.FAILING
        if states == {CheckResult.PASSING}:
            return CheckResult.PASSING
        return CheckResult.UNKNOWN

    def failures(self) -> list[str]:
        """What the failing checks last said, for logs and status pages."""
        return [
            f"{r.check.describe()}: {r.last.detail if r.last else 'no result'}"
            for r in self.runners
            if r.state is not CheckResult.PASSING
        ]

    def add_listener(self, listener: HealthListener) -> None:
        """Call ``listener(state)`` on the loop when the combined state changes."""
        self._listeners.append(listener)

    async def first_round(self) -> CheckResult:
        """Probe every check once, now, concurrently; returns the combined state."""
        await asyncio.gather(*(r.probe_once() for r in self.runners))
        self._reported = self.state
        return self._reported

    def start(self) -> None:
        for runner in self.runners:
            runner.start()

    async def stop(self) -> None:
        await asyncio.gather(*(r.stop() for r in self.runners))

    def _runner_changed(self, runner: CheckRunner) -> None:
        state = self.state
        if state is self._reported:
            return
        self._reported = state
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                log.exception("health listener failed")
