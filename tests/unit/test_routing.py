"""The transport-neutral routing core (etcdisco._routing) that the gRPC channels and
the HTTP transports share: the retry rule's structure, the attempts of one request,
the retry budget, and the pool's failing sub-channels."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from etcdisco import ConfigError, make_picker
from etcdisco._routing import (
    Attempt,
    Budget,
    Outcome,
    Pool,
    Retries,
    RetryBudget,
    SubChannel,
    may_retry,
    place,
)
from etcdisco.outlier import OutlierDetector

from ._factories import inst

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "etcdisco"


class FakeTransport:
    def __init__(self) -> None:
        self.closed: list[str] = []

    def open(self, address: str) -> str:
        return address

    def watch(self, sub: SubChannel[str]) -> None:
        pass

    def close(self, sub: SubChannel[str]) -> None:
        self.closed.append(sub.channel)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pool(n: int, outlier: OutlierDetector | None = None) -> Pool[str]:
    pool: Pool[str] = Pool("echo", make_picker("round_robin", start=0), outlier, FakeTransport())
    pool.update([inst(i) for i in range(1, n + 1)])
    return pool


def retries(pool: Pool[str], budget: Budget | None = None, attempts: int = 3) -> Retries[Any]:
    def place_on(key: str | None, exclude: frozenset[str], timeout: float | None) -> Any:
        return place(pool, key, exclude, timeout)

    return Retries(
        place_on,
        None,
        max_attempts=attempts,
        deadline=None,
        no_instance=lambda: LookupError("no instance"),
        budget=budget,
    )


@pytest.mark.parametrize(
    ("outcome", "idempotent", "retried"),
    [
        (Outcome.NOT_SENT, False, True),  # never reached an instance: always
        (Outcome.NOT_SENT, True, True),
        (Outcome.FAILED, True, True),  # reached it, maybe: only when idempotent
        (Outcome.FAILED, False, False),
        (Outcome.DONE, True, False),  # an answer is an answer
        (Outcome.DONE, False, False),
    ],
)
def test_retry_rule(outcome: Outcome, idempotent: bool, retried: bool) -> None:
    assert may_retry(outcome, idempotent) is retried
    pool = make_pool(2)
    r = retries(pool)
    first = r.next()
    assert first is not None
    assert r.decide(first, RuntimeError("x"), outcome, idempotent) is retried
    # Only DONE leaves the instance's record clean.
    assert first.ok is (outcome is Outcome.DONE)
    first.end()
    if retried:
        second = r.next()
        assert second is not None and second.instance.key != first.instance.key
        second.end()
    assert sum(s.in_flight for s in pool.subchannels()) == 0


def test_attempts_never_repeat_an_instance_and_end_with_the_last_failure() -> None:
    pool = make_pool(2)
    r = retries(pool, attempts=5)
    seen = []
    while (attempt := r.next()) is not None:
        seen.append(attempt.instance.key)
        assert r.decide(attempt, OSError(attempt.instance.key), Outcome.NOT_SENT, False)
        attempt.end()
    assert sorted(seen) == [inst(1).key, inst(2).key]
    assert str(r.exhausted()) == seen[-1]
    assert pool.retries == 1 and pool.picks == 2


def test_no_instance_at_all_is_the_transports_error() -> None:
    r = retries(make_pool(0))
    assert r.next() is None
    assert isinstance(r.exhausted(), LookupError)


def test_an_attempt_ends_once() -> None:
    pool = make_pool(1)
    attempt = place(pool, None, frozenset(), None)
    assert isinstance(attempt, Attempt)
    attempt.end()
    attempt.end()
    assert pool.subchannels()[0].in_flight == 0


def test_retry_budget_allows_a_fraction_of_requests_over_its_window() -> None:
    clock = Clock()
    budget = Budget(RetryBudget(ratio=0.5, min_per_second=0, window=10), clock)
    for _ in range(4):
        budget.deposit()
    allowed = 0
    while budget.can_retry():
        budget.withdraw()
        allowed += 1
    assert allowed == 2 and budget.refused == 1
    clock.now += 5  # half the window: the requests and retries still count
    assert not budget.can_retry()
    clock.now += 6  # past the window: forgotten, so nothing may be retried
    assert not budget.can_retry()
    budget.deposit()
    budget.deposit()
    assert budget.can_retry()


def test_retry_budget_reserve_lets_a_quiet_client_retry() -> None:
    clock = Clock()
    budget = Budget(RetryBudget(ratio=0.0, min_per_second=1, window=3), clock)
    for _ in range(3):
        assert budget.can_retry()
        budget.withdraw()
    assert not budget.can_retry()
    clock.now += 3.5
    assert budget.can_retry()


def test_retries_stop_when_the_budget_is_spent() -> None:
    pool = make_pool(3)
    budget = Budget(RetryBudget(ratio=0.0, min_per_second=0.1, window=10), Clock())  # 1 retry
    outcomes = []
    for _ in range(2):
        r = retries(pool, budget)
        attempt = r.next()
        assert attempt is not None
        assert r.decide(attempt, OSError("refused"), Outcome.NOT_SENT, False)
        attempt.end()
        retry = r.next()
        outcomes.append(retry is not None)
        if retry is not None:
            retry.end()
    assert outcomes == [True, False]
    assert budget.refused == 1


def test_retry_budget_is_validated() -> None:
    for bad in ({"ratio": -1}, {"window": 0}, {"min_per_second": float("nan")}):
        with pytest.raises(ConfigError):
            RetryBudget(**bad)


def test_failing_subchannels_are_avoided_while_others_can_take_requests() -> None:
    pool = make_pool(2)
    one, two = pool.subchannels()
    pool.set_failing(one, True)
    picked = {place(pool, None, frozenset(), None).instance.key for _ in range(4)}  # type: ignore[union-attr]
    assert picked == {two.instance.key}
    pool.set_failing(two, True)  # nothing better left: both again
    picked = {place(pool, None, frozenset(), None).instance.key for _ in range(4)}  # type: ignore[union-attr]
    assert picked == {one.instance.key, two.instance.key}


def test_suspects_draining_and_ejected_instances_are_not_picked() -> None:
    detector = OutlierDetector(consecutive_failures=1, max_ejected_fraction=1.0)
    pool: Pool[str] = Pool("echo", make_picker("round_robin"), detector, FakeTransport())
    live = inst(1)
    suspect = dataclasses.replace(inst(2), suspect=True)
    pool.update([live, suspect, inst(3, status="draining"), inst(4)])
    detector.record(inst(4).key, False)
    picked = {place(pool, None, frozenset(), None).instance.key for _ in range(6)}  # type: ignore[union-attr]
    assert picked == {live.key}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add("." * node.level + node.module)
    return found


def test_grpc_and_http_share_the_core_and_not_each_other() -> None:
    """The HTTP transports are not a copy of the gRPC channel: both stand on _routing."""
    import etcdisco._routing as routing
    from etcdisco.grpc import _calls, _pool
    from etcdisco.http import _route

    assert issubclass(_pool.Pool, routing.Pool)
    assert _pool.SubChannel is routing.SubChannel
    assert issubclass(_calls.Attempt, routing.Attempt)
    assert issubclass(_calls.UnaryRetries, routing.Retries)
    assert _route.Pool is routing.Pool and _route.Retries is routing.Retries
    for package, other in (("grpc", "http"), ("http", "grpc")):
        for path in (PACKAGE / package).glob("*.py"):
            assert not any(m.lstrip(".").startswith(other) for m in _imports(path)), path
