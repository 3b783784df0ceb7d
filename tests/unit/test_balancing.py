"""Pickers: pure functions of a snapshot."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from etcdisco import ConfigError, Instance, Random, RoundRobin, make_picker


def inst(n: int, **meta: object) -> Instance:
    addr = f"10.0.0.{n}:80"
    return Instance("echo", addr, addr, dict(meta), f"services/echo/{addr}", n)


def test_round_robin_cycles_through_healthy_instances() -> None:
    pool = [inst(1), inst(2), inst(3, status="draining"), inst(4, status="unhealthy")]
    rr = RoundRobin()
    picks = [rr.pick(pool) for _ in range(6)]
    assert [p.id for p in picks if p] == ["10.0.0.1:80", "10.0.0.2:80"] * 3


def test_random_is_spread_and_skips_draining() -> None:
    pool = [inst(1), inst(2), inst(3, status="draining")]
    picker = Random(random.Random(7))
    counts = Counter(picker.pick(pool).id for _ in range(1000))  # type: ignore[union-attr]
    assert set(counts) == {"10.0.0.1:80", "10.0.0.2:80"}
    assert min(counts.values()) > 400


def test_nothing_healthy_means_no_pick() -> None:
    assert RoundRobin().pick([inst(1, status="draining")]) is None
    assert Random().pick([]) is None


def test_unknown_policy_is_named() -> None:
    with pytest.raises(ConfigError, match="nope"):
        make_picker("nope")
    assert isinstance(make_picker("round_robin"), RoundRobin)
