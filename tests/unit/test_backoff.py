"""Unit tests for Backoff."""

from __future__ import annotations

import random
from typing import Any

import pytest

from etcdisco._backoff import Backoff
from etcdisco._errors import ConfigError


def test_defaults() -> None:
    backoff = Backoff()
    assert (backoff.initial, backoff.maximum, backoff.multiplier, backoff.jitter) == (
        0.1,
        10.0,
        2.0,
        0.2,
    )
    assert backoff.attempts == 0


def test_growth_without_jitter() -> None:
    backoff = Backoff(initial=0.1, maximum=10.0, multiplier=2.0, jitter=0.0)
    delays = [backoff.next_delay() for _ in range(10)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0])
    assert backoff.attempts == 10


def test_multiplier_one_is_constant() -> None:
    backoff = Backoff(initial=0.5, maximum=0.5, multiplier=1.0, jitter=0.0)
    assert [backoff.next_delay() for _ in range(3)] == [0.5, 0.5, 0.5]


def test_never_gives_up_and_never_overflows() -> None:
    backoff = Backoff(jitter=0.0)
    for _ in range(5000):
        delay = backoff.next_delay()
    assert delay == 10.0
    assert backoff.attempts == 5000


@pytest.mark.parametrize("seed", range(20))
def test_jitter_bounds(seed: int) -> None:
    backoff = Backoff(initial=1.0, maximum=8.0, multiplier=2.0, jitter=0.2, rng=random.Random(seed))
    for base in [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]:
        delay = backoff.next_delay()
        assert base * 0.8 <= delay <= min(base * 1.2, 8.0)


def test_jitter_never_exceeds_maximum() -> None:
    backoff = Backoff(initial=10.0, maximum=10.0, jitter=0.5, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(200)]
    assert max(delays) <= 10.0
    assert min(delays) >= 5.0
    assert len(set(delays)) > 1


def test_jitter_spreads_delays() -> None:
    backoffs = [Backoff(rng=random.Random(seed)) for seed in range(50)]
    first = {backoff.next_delay() for backoff in backoffs}
    assert len(first) == 50


def test_deterministic_with_seeded_rng() -> None:
    a = Backoff(rng=random.Random(42))
    b = Backoff(rng=random.Random(42))
    assert [a.next_delay() for _ in range(20)] == [b.next_delay() for _ in range(20)]


def test_reset() -> None:
    backoff = Backoff(initial=0.1, jitter=0.0)
    for _ in range(6):
        backoff.next_delay()
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.next_delay() == pytest.approx(0.1)
    assert backoff.next_delay() == pytest.approx(0.2)
    assert backoff.attempts == 2


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"initial": 0}, "initial must be > 0"),
        ({"initial": -1.0}, "initial must be > 0"),
        ({"initial": 5.0, "maximum": 1.0}, "maximum"),
        ({"maximum": 0.05}, "maximum"),
        ({"maximum": float("inf")}, "finite"),
        ({"initial": float("nan")}, "finite"),
        ({"multiplier": 0.5}, "multiplier must be >= 1"),
        ({"multiplier": float("inf")}, "finite"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": 1.0}, "jitter"),
        ({"jitter": float("nan")}, "finite"),
        ({"initial": "1"}, "must be a number"),
        ({"jitter": True}, "must be a number"),
    ],
)
def test_validation(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Backoff(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": 1, "maximum": 1},
        {"multiplier": 1},
        {"jitter": 0},
        {"jitter": 0.99},
    ],
)
def test_valid_edges(kwargs: dict[str, Any]) -> None:
    backoff = Backoff(**kwargs)
    assert 0 < backoff.next_delay() <= backoff.maximum
