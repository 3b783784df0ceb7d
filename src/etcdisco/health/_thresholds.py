"""The rise/fall state machine: pure, so it is tested without clocks or sockets."""

from __future__ import annotations

from .._errors import ConfigError
from ._result import CheckResult


class Thresholds:
    """Turns a stream of probe results into a settled state that does not flap.

    The state starts ``UNKNOWN`` and the first definite result settles it at once:
    a fresh registration should not wait ``rise`` intervals to learn it is healthy,
    nor stay marked healthy for ``fall`` intervals when it is not. From then on it
    takes ``rise`` consecutive passes to go from failing to passing and ``fall``
    consecutive failures to go the other way. An ``UNKNOWN`` result neither counts
    nor breaks a run: it carries no evidence either way.
    """

    def __init__(self, rise: int, fall: int) -> None:
        for name, value in (("rise", rise), ("fall", fall)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        self.rise = rise
        self.fall = fall
        self.state = CheckResult.UNKNOWN
        self.successes = 0
        self.failures = 0

    def observe(self, result: CheckResult) -> bool:
        """Feed one probe result; True when the settled state changed."""
        if result is CheckResult.UNKNOWN:
            return False
        if result is CheckResult.PASSING:
            self.successes += 1
            self.failures = 0
            needed = self.rise
        else:
            self.failures += 1
            self.successes = 0
            needed = self.fall
        if self.state is result:
            return False
        run = self.successes if result is CheckResult.PASSING else self.failures
        if self.state is CheckResult.UNKNOWN or run >= needed:
            self.state = result
            return True
        return False
