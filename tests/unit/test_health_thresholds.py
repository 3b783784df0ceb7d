"""The rise/fall state machine and the monitor's combined state, with fake results."""

from __future__ import annotations

import pytest

from etcdisco import ConfigError
from etcdisco.health import Check, CheckResult, HealthMonitor, Outcome, Thresholds
from etcdisco.health._grpc import decode_status, encode_request

P, F, U = CheckResult.PASSING, CheckResult.FAILING, CheckResult.UNKNOWN


def feed(t: Thresholds, results: list[CheckResult]) -> list[CheckResult]:
    """The settled state after each result."""
    states = []
    for result in results:
        t.observe(result)
        states.append(t.state)
    return states


def test_first_definite_result_settles_at_once() -> None:
    assert feed(Thresholds(rise=3, fall=3), [P]) == [P]
    assert feed(Thresholds(rise=3, fall=3), [F]) == [F]


def test_fall_failures_in_a_row_to_fail() -> None:
    t = Thresholds(rise=2, fall=3)
    assert feed(t, [P, F, F, F]) == [P, P, P, F]


def test_rise_passes_in_a_row_to_recover() -> None:
    t = Thresholds(rise=2, fall=1)
    assert feed(t, [F, P, P]) == [F, F, P]


def test_a_broken_run_starts_again() -> None:
    t = Thresholds(rise=2, fall=3)
    # Two failures, a pass, two failures: never three in a row, so never failing.
    assert feed(t, [P, F, F, P, F, F]) == [P] * 6
    assert feed(t, [F]) == [F]


def test_unknown_neither_counts_nor_breaks_a_run() -> None:
    t = Thresholds(rise=2, fall=2)
    assert feed(t, [U, U]) == [U, U]
    assert feed(t, [P, F, U, F]) == [P, P, P, F]


def test_observe_reports_changes_only() -> None:
    t = Thresholds(rise=1, fall=2)
    assert [t.observe(r) for r in (P, P, F, F, F, P)] == [True, False, False, True, False, True]


def test_flapping_target_never_settles_failing() -> None:
    t = Thresholds(rise=2, fall=3)
    changes = sum(t.observe(r) for r in [P, F] * 50)
    assert changes == 1 and t.state is P


@pytest.mark.parametrize("rise,fall", [(0, 1), (1, 0), (1.5, 1), (True, 1)])
def test_bad_thresholds_are_refused(rise: object, fall: object) -> None:
    with pytest.raises(ConfigError):
        Thresholds(rise, fall)  # type: ignore[arg-type]


class Scripted(Check):
    """A check that returns the next scripted result."""

    def __init__(self, results: list[CheckResult]) -> None:
        super().__init__(rise=1, fall=1)
        object.__setattr__(self, "_results", results)

    async def probe(self) -> Outcome:
        return Outcome(self._results.pop(0))  # type: ignore[attr-defined]

    def describe(self) -> str:
        return "scripted"


async def test_monitor_combines_checks_failing_wins() -> None:
    a, b = Scripted([P, P, F]), Scripted([P, U, U])
    monitor = HealthMonitor([a, b])
    seen: list[CheckResult] = []
    monitor.add_listener(seen.append)
    assert await monitor.first_round() is P
    for runner in monitor.runners:
        if await runner.probe_once():
            monitor._runner_changed(runner)
    assert monitor.state is P  # b's UNKNOWN keeps its settled PASSING
    for runner in monitor.runners:
        if await runner.probe_once():
            monitor._runner_changed(runner)
    assert monitor.state is F and seen == [F]
    assert monitor.failures() == ["scripted: "]


async def test_monitor_is_unknown_until_every_check_has_a_verdict() -> None:
    monitor = HealthMonitor([Scripted([P]), Scripted([U])])
    assert await monitor.first_round() is U


def test_grpc_health_messages_round_trip() -> None:
    assert encode_request("") == b""
    assert encode_request("echo") == b"\x0a\x04echo"
    assert decode_status(b"") == 0  # proto3 omits the default (UNKNOWN)
    assert decode_status(b"\x08\x01") == 1
    # Unknown fields of every wire type are skipped.
    assert decode_status(b"\x12\x02hi\x08\x02\x19" + b"\0" * 8 + b"\x25\0\0\0\0") == 2
    with pytest.raises(ValueError):
        decode_status(b"\x08")
