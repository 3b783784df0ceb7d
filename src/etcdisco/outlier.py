"""Outlier detection: keep traffic away from instances whose calls keep failing.

The caller reports the outcome of each call with ``record(instance.key, ok)`` and reads
the pool through ``filter()`` (or ``admitted()``, the hot-path form) before picking.

Rules:

- ``consecutive_failures`` failures in a row eject a key. A success resets the count.
- The n-th ejection of a key lasts ``base_ejection * 2**(n-1)`` seconds, at most
  ``max_ejection``. When the time is up the key is back, checked lazily against the
  clock, with no timer. Failures reported while a key is ejected (calls placed before
  the ejection) neither extend nor repeat it.
- n decays: for every ``base_ejection`` seconds a key spends admitted, n drops by one.
  A key that recovers for good is back to the base time after n such periods, while one
  that keeps failing shortly after each return keeps doubling. n stops growing once the
  time has reached ``max_ejection``, so decay never takes longer than needed.
- ``filter()`` never leaves out more than ``max_ejected_fraction`` of the instances it
  is given (rounded down: the only instance of a pool is never left out). Beyond that,
  the least recently ejected come back first. This only shapes what filter returns;
  the keys stay ejected, so a larger pool leaves them out again.

Thread-safe: one lock, held for dictionary work only.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence

from ._checks import check_clock, check_float, check_int
from ._errors import ConfigError
from ._model import Instance

__all__ = ["OutlierDetector"]


class _Record:
    __slots__ = ("admitted_since", "ejected_at", "ejections", "failures", "touched", "until")

    def __init__(self, now: float) -> None:
        self.failures = 0  # consecutive
        self.ejections = 0  # the n of the next duration, decayed
        self.until: float | None = None  # ejected until then
        self.ejected_at = 0.0
        self.admitted_since = now  # start of the current decay period
        self.touched = now


_WHAT = "outlier detection"


class OutlierDetector:
    """Ejects keys (``Instance.key``) after consecutive failures; see the module doc."""

    def __init__(
        self,
        *,
        consecutive_failures: int = 5,
        base_ejection: float = 10.0,
        max_ejection: float = 300.0,
        max_ejected_fraction: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = check_int(_WHAT, "consecutive_failures", consecutive_failures, 1)
        self._base = check_float(_WHAT, "base_ejection", base_ejection)
        self._max = check_float(_WHAT, "max_ejection", max_ejection)
        if self._max < self._base:
            raise ConfigError(
                f"outlier detection: max_ejection ({max_ejection}) is shorter than "
                f"base_ejection ({base_ejection})"
            )
        fraction = check_float(_WHAT, "max_ejected_fraction", max_ejected_fraction, positive=False)
        if fraction > 1:
            raise ConfigError(
                f"outlier detection: max_ejected_fraction must be at most 1, got {fraction!r}"
            )
        self._fraction = fraction
        self._clock = check_clock(_WHAT, clock)
        # The n at which the duration reaches max_ejection.
        self._max_n = 1 + max(0, math.ceil(math.log2(self._max / self._base)))
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self._version = 0  # bumped by every ejection, for admitted()'s cache
        self._next_prune = clock() + self._max
        self._admitted: tuple[object, int, float, tuple[Instance, ...]] | None = None
        self.ejections = 0
        """Ejections so far (a counter, for metrics)."""

    def ejection_time(self, n: int) -> float:
        """Seconds the n-th ejection (n >= 1) of a key lasts."""
        return min(self._max, self._base * float(2 ** min(max(n, 1) - 1, 62)))

    def record(self, key: str, ok: bool) -> None:
        """Report the outcome of one call on the instance with this key."""
        if ok and key not in self._records:
            # The common case: a healthy key has no record and needs none.
            return
        with self._lock:
            now = self._clock()
            if now >= self._next_prune:
                self._prune(now)
            record = self._records.get(key)
            if record is None:
                if ok:
                    return
                record = self._records[key] = _Record(now)
            self._settle(record, now)
            record.touched = now
            if ok:
                record.failures = 0
                if record.until is None and record.ejections == 0:
                    del self._records[key]
                return
            if record.until is not None:
                return
            record.failures += 1
            if record.failures >= self._threshold:
                record.failures = 0
                record.ejections = min(record.ejections + 1, self._max_n)
                record.ejected_at = now
                record.until = now + self.ejection_time(record.ejections)
                self.ejections += 1
                self._version += 1

    def is_ejected(self, key: str) -> bool:
        if key not in self._records:
            return False
        with self._lock:
            record = self._records.get(key)
            if record is None:
                return False
            self._settle(record, self._clock())
            return record.until is not None

    def filter(self, instances: Sequence[Instance]) -> list[Instance]:
        """``instances`` without the ejected ones, in order, leaving out no more than
        ``max_ejected_fraction`` of them."""
        return list(self.admitted(instances))

    def admitted(self, instances: Sequence[Instance]) -> tuple[Instance, ...]:
        """What ``filter`` returns, as a tuple that stays the same object while neither
        the input (the same tuple object) nor the ejections change; the input tuple
        itself when nothing in it is ejected. Pickers recognise an unchanged snapshot by
        identity, so this keeps their per-snapshot work cached."""
        source = instances if isinstance(instances, tuple) else tuple(instances)
        if not self._records:
            return source
        with self._lock:
            now = self._clock()
            cached = self._admitted
            if (
                cached is not None
                and cached[0] is instances
                and cached[1] == self._version
                and now < cached[2]
            ):
                return cached[3]
            result, valid_until = self._exclude(source, now)
            if source is instances:
                # Only an immutable tuple can be recognised by identity next time.
                self._admitted = (instances, self._version, valid_until, result)
            return result

    def _exclude(
        self, instances: tuple[Instance, ...], now: float
    ) -> tuple[tuple[Instance, ...], float]:
        """The admitted instances and the time until which that answer holds."""
        ejected: list[tuple[float, int]] = []
        valid_until = math.inf
        for position, inst in enumerate(instances):
            record = self._records.get(inst.key)
            if record is None:
                continue
            self._settle(record, now)
            if record.until is not None:
                ejected.append((record.ejected_at, position))
                valid_until = min(valid_until, record.until)
        if not ejected:
            return instances, valid_until
        allowed = math.floor(len(instances) * self._fraction + 1e-9)
        if len(ejected) > allowed:
            # The most recently ejected stay out; ties go by position, for stable output.
            ejected.sort(key=lambda item: (-item[0], item[1]))
            del ejected[allowed:]
        left_out = {position for _, position in ejected}
        admitted = tuple(
            inst for position, inst in enumerate(instances) if position not in left_out
        )
        return admitted, valid_until

    def _settle(self, record: _Record, now: float) -> None:
        """Apply the time that passed: re-admission, then decay of the ejection count."""
        if record.until is not None:
            if now < record.until:
                return
            record.admitted_since = record.until
            record.until = None
        if record.ejections:
            periods = int((now - record.admitted_since) // self._base)
            if periods > 0:
                record.ejections = max(0, record.ejections - periods)
                record.admitted_since += periods * self._base

    def _prune(self, now: float) -> None:
        """Forget keys with nothing left to remember, so that keys that come and go
        (instances replaced by a deploy) do not accumulate."""
        horizon = now - self._max
        for key, record in list(self._records.items()):
            self._settle(record, now)
            if record.until is None and record.ejections == 0 and record.touched < horizon:
                del self._records[key]
        self._next_prune = now + self._max
