"""The soak's own bookkeeping (tests/soak), pure: no etcd, no child processes.

A soak that reports a violation where there is none, or misses one, misleads whoever
reads its report; these pin the rules its checks are built on.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, cast

from tests.soak._children import Child
from tests.soak._etcd_view import Entry, Registry
from tests.soak._faults import FAULT_COST, FIRST_KINDS, FaultInjector, SoakContext
from tests.soak._invariants import (
    Ledger,
    Persistence,
    cache_mismatches,
    convergence_problems,
    held_suspect,
    metadata_mismatches,
    synced_mismatches,
)
from tests.soak._ops import OpsBook

BOUND = 16.0


def entry(key: str, metadata: dict[str, Any] | None = None, lease: int = 7) -> Entry:
    return Entry(key, "svc", "192.0.2.1:1", metadata or {}, 5, lease)


def registry(*entries: Entry) -> Registry:
    return Registry(10, {e.key: e for e in entries}, {})


def cached(e: Entry, suspect: bool = False, **changes: Any) -> dict[str, Any]:
    item = {
        "service": e.service,
        "address": e.address,
        "metadata": e.metadata,
        "revision": e.revision,
        "lease": e.lease,
        "suspect": suspect,
    }
    return {**item, **changes}


def snapshot(state: str, *items: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {"state": state, "instances": dict(items)}


# -- Persistence ------------------------------------------------------------------------


def test_a_difference_counts_once_it_outlasts_the_bound() -> None:
    clock = Persistence(BOUND)
    assert clock.update(0.0, {"a": "A"}) == []
    assert clock.update(BOUND, {"a": "A"}) == []
    assert clock.update(BOUND + 0.5, {"a": "A"}) == ["A (for 16.5s; bound 16s)"]
    assert clock.update(BOUND + 1.0, {"a": "A"}) == []  # once per episode
    assert clock.update(BOUND + 2.0, {}) == []
    assert clock.update(BOUND + 3.0, {"a": "A"}) == []  # a new episode starts over


def test_a_paused_clock_does_not_run() -> None:
    clock = Persistence(BOUND)
    clock.update(0.0, {"old": "OLD"})
    clock.pause(10.0)
    # Seen only during the outage: its time starts at the heal.
    assert clock.update(30.0, {"old": "OLD", "new": "NEW"}) == []
    clock.resume(40.0)
    assert clock.update(45.0, {"old": "OLD", "new": "NEW"}) == []
    # "old" had run 10 s before the pause: 6 more after the heal cross the bound.
    assert clock.update(46.5, {"old": "OLD", "new": "NEW"}) == ["OLD (for 16.5s; bound 16s)"]
    assert clock.update(56.5, {"old": "OLD", "new": "NEW"}) == ["NEW (for 16.5s; bound 16s)"]


# -- caches ---------------------------------------------------------------------------------


def test_a_synced_cache_that_differs_is_named_and_a_stale_one_is_not() -> None:
    e = entry("services/svc/a")
    reg = registry(e)
    behind = snapshot("synced", (e.key, cached(e, revision=3)))
    stale = snapshot("stale", (e.key, cached(e, revision=3)))
    assert list(synced_mismatches(reg, {"w0": behind, "w1": stale})) == [
        "w0 differs services/svc/a (synced)"
    ]


def test_a_kept_suspect_is_told_apart_and_left_to_the_sampler() -> None:
    gone = entry("services/svc/gone")
    reg = registry()
    snap = snapshot("synced", (gone.key, cached(gone, suspect=True)))
    ids = list(cache_mismatches(reg, {"w0": snap}))
    assert ids == ["w0 holds suspect services/svc/gone"]
    assert held_suspect(ids[0])
    assert synced_mismatches(reg, {"w0": snap}) == {}
    assert convergence_problems(reg, set(), {}, {"w0": snap}) == []
    # Not a suspect: an ordinary difference, for convergence too.
    plain = snapshot("synced", (gone.key, cached(gone)))
    assert not held_suspect(next(iter(cache_mismatches(reg, {"w0": plain}))))
    assert convergence_problems(reg, set(), {}, {"w0": plain})


# -- metadata ----------------------------------------------------------------------------


def status(key: str, metadata: dict[str, Any], drained: bool = False) -> dict[str, Any]:
    return {
        "regs": [
            {
                "key": key,
                "state": "registered",
                "lease": 7,
                "metadata": metadata,
                "drained": drained,
            }
        ]
    }


def test_a_drained_registration_must_say_draining_in_etcd() -> None:
    key = "services/svc/a"
    meta = {"zone": "z0"}
    assert metadata_mismatches(registry(entry(key, meta)), {"i0": status(key, meta)}) == {}
    drained = {"i0": status(key, meta, drained=True)}
    assert list(metadata_mismatches(registry(entry(key, meta)), drained)) == [f"meta {key}"]
    etcd = registry(entry(key, {**meta, "status": "draining"}))
    assert metadata_mismatches(etcd, drained) == {}


# -- operations and withdrawn keys -----------------------------------------------------------


class FakeChild:
    name = "instance0"

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def request(self, cmd: str, timeout: float, args: dict[str, Any]) -> dict[str, Any]:
        self.sent.append({"cmd": cmd, **args})
        return {"started": args["op_id"]}


def fake_child() -> Child:
    return cast(Child, FakeChild())


# The scheduler needs no soak to pick kinds.
NO_CONTEXT = cast(SoakContext, None)


def book() -> tuple[OpsBook, Ledger]:
    ledger = Ledger(time.monotonic())
    return OpsBook(ledger, BOUND, time.monotonic()), ledger


def report(op_id: int, outcome: str, ended: float, **extra: Any) -> dict[str, Any]:
    return {"op_id": op_id, "outcome": outcome, "ended": ended, **extra}


def test_a_returned_deregister_must_be_gone_from_the_next_read_on() -> None:
    ops, ledger = book()
    op = asyncio.run(ops.issue(fake_child(), 0, "deregister", "k", "stall"))
    assert ops.withdrawn_keys() == {"k"}
    ops.absorb("instance0", [report(op.op_id, "returned", 100.0)])
    still = registry(entry("k"))
    ops.check_gone(still, read_started=99.0)  # read before the return: no verdict
    assert ledger.checks["deregistered_gone"] == 0
    ops.check_gone(still, read_started=100.1)
    assert ledger.violation_counts["deregistered_gone"] == 1


def test_a_raised_deregister_has_the_bound_after_the_heal() -> None:
    ops, ledger = book()
    op = asyncio.run(ops.issue(fake_child(), 0, "deregister", "k", "no_quorum"))
    ops.absorb("instance0", [report(op.op_id, "raised", 100.0, error="EtcdTimeoutError")])
    ops.check_gone(registry(entry("k")), read_started=1000.0)
    assert ledger.checks["deregistered_gone"] == 0  # no heal yet: no deadline
    ops.healed([op], 110.0)
    ops.check_gone(registry(entry("k")), read_started=110.0 + BOUND - 0.1)
    assert ledger.checks["deregistered_gone"] == 0
    ops.check_gone(registry(), read_started=110.0 + BOUND + 0.1)
    assert ledger.checks["deregistered_gone"] == 1
    assert ledger.violation_counts["deregistered_gone"] == 0
    assert [w.key for w in ops.due()] == ["k"]


def test_registering_again_stops_the_gone_check_before_the_worker_hears_of_it() -> None:
    ops, ledger = book()
    child = fake_child()
    op = asyncio.run(ops.issue(child, 0, "deregister", "k", "stall"))
    ops.absorb("instance0", [report(op.op_id, "returned", 100.0)])
    ops.check_gone(registry(), read_started=101.0)
    (withdrawal,) = ops.due()
    again = asyncio.run(ops.register_again(withdrawal, child))
    ops.check_gone(registry(entry("k")), read_started=102.0)
    assert ledger.violation_counts["deregistered_gone"] == 0
    ops.absorb("instance0", [report(again.op_id, "returned", 102.5)])
    assert ops.withdrawn_keys() == set()


def test_an_update_that_returned_is_what_the_registration_reports() -> None:
    ops, ledger = book()
    wanted = {"zone": "z0", "version": 1}
    op = asyncio.run(ops.issue(fake_child(), 0, "update", "k", "stall", wanted))
    ops.absorb("instance0", [report(op.op_id, "returned", 100.0, metadata_after={"zone": "z0"})])
    assert ledger.violation_counts["metadata_matches"] == 1


def test_an_operation_that_never_ends_is_reported_once_past_its_bound() -> None:
    ops, ledger = book()
    op = asyncio.run(ops.issue(fake_child(), 0, "drain", "k", "stall"))
    ops.check_finished(op.issued + 1000.0)
    assert ledger.checks["ops_finish"] == 0  # not healed yet: no bound
    ops.healed([op], op.issued + 10.0)
    ops.check_finished(op.issued + 10.0 + BOUND - 1.0)
    assert ledger.checks["ops_finish"] == 0
    ops.check_finished(op.issued + 10.0 + BOUND + 1.0)
    ops.check_finished(op.issued + 10.0 + BOUND + 2.0)
    assert ledger.violation_counts["ops_finish"] == 1


# -- which faults a run gets -----------------------------------------------------------------


def test_a_two_minute_run_starts_with_every_hard_fault() -> None:
    for seed in range(20):
        injector = FaultInjector(NO_CONTEXT, random.Random(seed))
        order = []
        remaining = 120.0
        while (kind := injector.next_kind(remaining)) is not None:
            order.append(kind)
            remaining -= FAULT_COST[kind] + 1.25  # plus the quiet time between faults
        assert set(FIRST_KINDS) <= set(order[:5]), (seed, order)


def test_kinds_can_be_forced_and_only_faults_that_fit_start() -> None:
    injector = FaultInjector(NO_CONTEXT, random.Random(1), kinds=("key_delete", "partition"))
    assert injector.next_kind(100.0) == "key_delete"
    # Left: partition, which does not fit; a short one of the kinds given does.
    assert injector.next_kind(FAULT_COST["partition"] - 1) == "key_delete"
    assert injector.next_kind(FAULT_COST["key_delete"] - 1) is None
    assert injector.next_kind(100.0) == "partition"
    assert {injector.next_kind(100.0) for _ in range(10)} <= {"key_delete", "partition"}
