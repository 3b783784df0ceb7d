"""Argument checks shared by the pickers and the outlier detector: each names the
component and the option, so a bad value is refused with a message that says where."""

from __future__ import annotations

import math
from collections.abc import Callable

from ._errors import ConfigError


def check_int(what: str, name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{what}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_float(what: str, name: str, value: object, *, positive: bool = True) -> float:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or (value <= 0 if positive else value < 0)
    ):
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"{what}: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_clock(what: str, clock: object) -> Callable[[], float]:
    if not callable(clock):
        raise ConfigError(f"{what}: clock must be a callable returning seconds")
    return clock
