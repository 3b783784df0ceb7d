"""Pickers: choose one instance from a snapshot. Pure code, no I/O.

A picker never picks a draining or unhealthy instance while a healthy one exists; with
none healthy it returns None rather than send traffic to an instance on its way out.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Protocol

from ._errors import ConfigError
from ._model import Instance


class Picker(Protocol):
    def pick(self, instances: Sequence[Instance], key: str | None = None) -> Instance | None: ...


def _healthy(instances: Sequence[Instance]) -> Sequence[Instance]:
    return [i for i in instances if i.healthy]


class RoundRobin:
    """Each healthy instance in turn."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, instances: Sequence[Instance], key: str | None = None) -> Instance | None:
        candidates = _healthy(instances)
        if not candidates:
            return None
        return candidates[next(self._counter) % len(candidates)]


class Random:
    """A uniformly random healthy instance."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, instances: Sequence[Instance], key: str | None = None) -> Instance | None:
        candidates = _healthy(instances)
        return self._rng.choice(candidates) if candidates else None


POLICIES: dict[str, type[RoundRobin] | type[Random]] = {
    "round_robin": RoundRobin,
    "random": Random,
}


def make_picker(policy: str) -> Picker:
    try:
        return POLICIES[policy]()
    except KeyError:
        raise ConfigError(
            f"unknown balancing policy {policy!r}; choose one of {', '.join(sorted(POLICIES))}"
        ) from None
