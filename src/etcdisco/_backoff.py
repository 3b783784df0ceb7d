"""Exponential backoff with jitter for every retry loop (re-register, re-watch, re-auth).

There is deliberately no attempt limit: a registry that gives up after N tries is how
services silently vanish after an etcd outage (DESIGN.md section 5.1).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from ._errors import ConfigError

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """Delays growing from ``initial`` by ``multiplier`` up to ``maximum`` seconds.

    Each delay is scaled by a random factor in ``[1 - jitter, 1 + jitter]`` so that many
    processes cut off together do not come back together, then capped at ``maximum``.
    Pass ``rng`` for reproducible delays.
    """

    initial: float = 0.1
    maximum: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.2
    rng: random.Random | None = field(default=None, repr=False, compare=False)
    attempts: int = field(default=0, init=False)
    # The un-jittered delay is kept rather than recomputed as initial * multiplier **
    # attempts, which overflows a float after about a thousand attempts.
    _base: float = field(default=0.0, init=False, repr=False, compare=False)
    _random: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("initial", "maximum", "multiplier", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"backoff {name} must be a number, not {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"backoff {name} must be finite, not {value!r}")
        if self.initial <= 0:
            raise ConfigError(f"backoff initial must be > 0, not {self.initial!r}")
        if self.maximum < self.initial:
            raise ConfigError(
                f"backoff maximum ({self.maximum!r}) must be >= initial ({self.initial!r})"
            )
        if self.multiplier < 1:
            raise ConfigError(f"backoff multiplier must be >= 1, not {self.multiplier!r}")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"backoff jitter must be in [0, 1), not {self.jitter!r}")
        self._random = self.rng if self.rng is not None else random.Random()
        self._base = float(self.initial)

    def next_delay(self) -> float:
        """The delay in seconds before the next attempt; counts the attempt."""
        base = self._base
        self._base = min(self.maximum, base * self.multiplier)
        self.attempts += 1
        delay = base * self._random.uniform(1 - self.jitter, 1 + self.jitter)
        return min(delay, self.maximum)

    def reset(self) -> None:
        """Start again from ``initial``, typically after a success."""
        self.attempts = 0
        self._base = float(self.initial)
