"""Outlier detection, driven by a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from etcdisco import ConfigError, Instance
from etcdisco.outlier import OutlierDetector


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def inst(n: int) -> Instance:
    addr = f"10.0.0.{n}:80"
    return Instance("echo", addr, addr, {}, f"services/echo/{addr}", n)


def detector(clock: FakeClock, **options: Any) -> OutlierDetector:
    options.setdefault("consecutive_failures", 3)
    options.setdefault("base_ejection", 10.0)
    options.setdefault("max_ejection", 60.0)
    return OutlierDetector(clock=clock, **options)


def fail(d: OutlierDetector, key: str, times: int) -> None:
    for _ in range(times):
        d.record(key, False)


def test_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    clock = FakeClock()
    d = detector(clock)
    fail(d, "a", 2)
    d.record("a", True)
    fail(d, "a", 2)
    assert not d.is_ejected("a") and d.ejections == 0
    fail(d, "a", 1)
    assert d.is_ejected("a") and d.ejections == 1
    assert not d.is_ejected("b")


def test_an_ejected_key_comes_back_when_its_time_is_up() -> None:
    clock = FakeClock()
    d = detector(clock)
    fail(d, "a", 3)
    clock.now += 9.99
    assert d.is_ejected("a")
    clock.now += 0.01
    assert not d.is_ejected("a")


def test_failures_while_ejected_neither_extend_nor_repeat_the_ejection() -> None:
    clock = FakeClock()
    d = detector(clock)
    fail(d, "a", 3)
    clock.now += 5
    fail(d, "a", 10)  # calls placed before the ejection, finishing late
    assert d.ejections == 1
    clock.now += 5
    assert not d.is_ejected("a")


def test_each_ejection_doubles_up_to_the_maximum() -> None:
    clock = FakeClock()
    d = detector(clock)
    durations = []
    for _ in range(5):
        fail(d, "a", 3)
        start = clock.now
        while d.is_ejected("a"):
            clock.now += 1.0
        durations.append(clock.now - start)
    assert durations == [10.0, 20.0, 40.0, 60.0, 60.0]
    assert [d.ejection_time(n) for n in (1, 2, 3, 4, 100)] == [10.0, 20.0, 40.0, 60.0, 60.0]


def test_the_ejection_count_decays_after_a_healthy_period() -> None:
    clock = FakeClock()
    d = detector(clock)
    fail(d, "a", 3)  # 10 s
    clock.now += 10
    fail(d, "a", 3)  # 20 s: second ejection
    clock.now += 20
    assert not d.is_ejected("a")
    # One base period admitted takes the count from 2 back to 1: the next lasts 20 s.
    clock.now += 10
    fail(d, "a", 3)
    clock.now += 19.9
    assert d.is_ejected("a")
    clock.now += 0.1
    assert not d.is_ejected("a")
    # Two base periods later it is back to the base time.
    clock.now += 20
    fail(d, "a", 3)
    clock.now += 10
    assert not d.is_ejected("a")


def test_filter_leaves_out_the_ejected_in_order() -> None:
    clock = FakeClock()
    d = detector(clock)
    pool = [inst(n) for n in range(1, 7)]
    fail(d, pool[1].key, 3)
    fail(d, pool[4].key, 3)
    assert d.filter(pool) == [pool[0], pool[2], pool[3], pool[5]]
    clock.now += 10
    assert d.filter(pool) == pool


def test_filter_never_ejects_more_than_the_fraction() -> None:
    clock = FakeClock()
    d = detector(clock, max_ejected_fraction=0.5)
    pool = [inst(n) for n in range(1, 5)]
    for member in pool[:3]:  # ejected at 500, 501, 502
        fail(d, member.key, 3)
        clock.now += 1
    # Half of 4 may be left out: the two most recent; the least recent comes back.
    assert d.filter(pool) == [pool[0], pool[3]]
    assert d.is_ejected(pool[0].key)  # still ejected, only admitted by the cap
    assert d.filter(pool[:1]) == pool[:1]  # a lone instance is never left out
    assert d.filter(pool[:3]) == [pool[0], pool[1]]  # floor(1.5) = 1 left out


def test_a_zero_fraction_never_filters() -> None:
    d = detector(FakeClock(), max_ejected_fraction=0.0)
    pool = [inst(1), inst(2)]
    fail(d, pool[0].key, 3)
    assert d.is_ejected(pool[0].key)
    assert d.filter(pool) == pool


def test_admitted_keeps_one_object_while_nothing_changes() -> None:
    clock = FakeClock()
    d = detector(clock)
    pool = tuple(inst(n) for n in range(1, 5))
    assert d.admitted(pool) is pool
    fail(d, pool[0].key, 3)
    first = d.admitted(pool)
    assert first == pool[1:]
    clock.now += 1
    assert d.admitted(pool) is first
    fail(d, pool[1].key, 3)
    assert d.admitted(pool) == pool[2:]
    clock.now += 9  # 510: the first is back, the second is out until 511
    assert d.admitted(pool) == (pool[0], *pool[2:])
    clock.now += 1
    assert d.admitted(pool) is pool
    assert d.admitted(list(pool)) == pool


def test_healthy_keys_leave_nothing_behind() -> None:
    clock = FakeClock()
    d = detector(clock)
    for n in range(1000):
        d.record(f"k{n}", True)
        d.record(f"j{n}", False)
        d.record(f"j{n}", True)
    assert not d._records
    # Keys that failed once and vanished are forgotten after max_ejection.
    fail(d, "gone", 1)
    clock.now += 61
    d.record("other", False)
    assert "gone" not in d._records


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"consecutive_failures": 0}, "consecutive_failures"),
        ({"base_ejection": 0}, "base_ejection"),
        ({"max_ejection": 5.0}, "max_ejection .* shorter than base_ejection"),
        ({"max_ejected_fraction": 1.5}, "max_ejected_fraction"),
        ({"max_ejected_fraction": -0.1}, "max_ejected_fraction"),
        ({"base_ejection": float("inf")}, "base_ejection"),
    ],
)
def test_bad_settings_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        detector(FakeClock(), **options)
