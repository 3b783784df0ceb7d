"""What one probe found, and the thresholded state built from many probes."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CheckResult(enum.StrEnum):
    """Three-valued: a probe (or a check's settled state) passes, fails, or cannot tell.

    ``UNKNOWN`` is neither good nor bad news: it never moves a settled state (a gRPC
    server answering ``UNKNOWN`` has not said it is broken), and before any definite
    result a registration treats it as not proven healthy.
    """

    PASSING = "passing"
    FAILING = "failing"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One probe's result with a short human-readable reason ("HTTP 503", ...)."""

    result: CheckResult
    detail: str = ""

    @classmethod
    def passing(cls, detail: str = "") -> Outcome:
        return cls(CheckResult.PASSING, detail)

    @classmethod
    def failing(cls, detail: str) -> Outcome:
        return cls(CheckResult.FAILING, detail)

    @classmethod
    def unknown(cls, detail: str) -> Outcome:
        return cls(CheckResult.UNKNOWN, detail)
