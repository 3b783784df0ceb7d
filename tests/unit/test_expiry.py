"""Mass-expiry bookkeeping (pure: a fake clock, no etcd)."""

from __future__ import annotations

import pytest

from etcdisco import ConfigError, EventType, Instance, RoundRobin
from etcdisco._expiry import ExpiryGuard, ExpiryProtection, InstanceTable
from etcdisco._model import usable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def inst(n: int, service: str = "echo", status: str | None = None) -> Instance:
    meta = {"status": status} if status else {}
    return Instance(service, f"i{n}", f"127.0.0.1:{9000 + n}", meta, f"s/{service}/i{n}", n)


def fleet(n: int, service: str = "echo") -> InstanceTable:
    return InstanceTable({i.key: i for i in (inst(k, service) for k in range(n))})


def test_one_crash_in_four_is_removed() -> None:
    guard, view = ExpiryGuard(ExpiryProtection(), Clock()), fleet(4)
    events = guard.deleted(view["s/echo/i0"], view)
    assert [e.type for e in events] == [EventType.REMOVED]
    assert len(view) == 3 and guard.engagements == 0


def test_three_of_four_together_are_held_as_suspects() -> None:
    clock = Clock()
    guard, view = ExpiryGuard(ExpiryProtection(hold=60), clock), fleet(4)
    first = guard.deleted(view["s/echo/i0"], view)
    clock.now += 1
    second = guard.deleted(view["s/echo/i1"], view)  # 2 of 4: not more than half
    assert [e.type for e in first + second] == [EventType.REMOVED] * 2
    clock.now += 1
    third = guard.deleted(view["s/echo/i2"], view)  # 3 of 4: engage, bring back the two
    assert guard.engagements == 1
    assert sorted((e.type, e.instance.id) for e in third) == [
        (EventType.ADDED, "i0"),
        (EventType.ADDED, "i1"),
        (EventType.UPDATED, "i2"),
    ]
    assert all(e.instance.suspect for e in third)
    assert {i.id for i in view.values() if i.suspect} == {"i0", "i1", "i2"}
    # The episode goes on: the last one joins without a new engagement.
    fourth = guard.deleted(view["s/echo/i3"], view)
    assert [(e.type, e.instance.suspect) for e in fourth] == [(EventType.UPDATED, True)]
    assert guard.engagements == 1
    # Hold over: all removed.
    clock.now += 59
    assert guard.expire(view) == [] and len(view) == 4
    clock.now += 2
    gone = guard.expire(view)
    assert {e.instance.id for e in gone} == {"i0", "i1", "i2", "i3"} and not view
    assert guard.next_deadline() is None


def test_losses_outside_the_window_do_not_add_up() -> None:
    clock = Clock()
    guard, view = ExpiryGuard(ExpiryProtection(window=10), clock), fleet(4)
    for key in ("s/echo/i0", "s/echo/i1", "s/echo/i2"):
        events = guard.deleted(view[key], view)
        assert [e.type for e in events] == [EventType.REMOVED]
        clock.now += 11
    assert guard.engagements == 0


def test_announced_departures_never_count() -> None:
    guard = ExpiryGuard(ExpiryProtection(), Clock())
    view = InstanceTable({i.key: i for i in (inst(k, status="draining") for k in range(4))})
    for key in list(view):
        assert [e.type for e in guard.deleted(view[key], view)] == [EventType.REMOVED]
    assert guard.engagements == 0 and not view


def test_a_suspect_that_comes_back_is_no_longer_held() -> None:
    clock = Clock()
    guard, view = ExpiryGuard(ExpiryProtection(), clock), fleet(3)
    for key in ("s/echo/i0", "s/echo/i1"):
        guard.deleted(view[key], view)
    assert guard.engagements == 1
    guard.returned("s/echo/i0")
    view["s/echo/i0"] = inst(0)
    clock.now += 3600
    assert [e.instance.id for e in guard.expire(view)] == ["i1"]
    assert not view["s/echo/i0"].suspect


def test_relist_keeps_suspects_it_does_not_show() -> None:
    guard, view = ExpiryGuard(ExpiryProtection(), Clock()), fleet(2)
    for key in list(view):
        guard.deleted(view[key], view)
    fresh = InstanceTable({"s/echo/i1": inst(1)})
    guard.carry(fresh)
    assert fresh["s/echo/i0"].suspect and not fresh["s/echo/i1"].suspect
    assert [i.id for i in guard.suspects] == ["i0"]


def test_services_are_counted_apart() -> None:
    guard = ExpiryGuard(ExpiryProtection(), Clock())
    view = InstanceTable({**fleet(2, "a"), **fleet(8, "b")})
    guard.deleted(view["s/a/i0"], view)
    assert guard.engagements == 0  # 1 of 2 is not more than half
    guard.deleted(view["s/a/i1"], view)
    assert guard.engagements == 1
    assert [i.service for i in guard.suspects] == ["a", "a"]


def test_single_instance_services_are_not_protected() -> None:
    guard, view = ExpiryGuard(ExpiryProtection(), Clock()), fleet(1)
    assert [e.type for e in guard.deleted(view["s/echo/i0"], view)] == [EventType.REMOVED]


def test_pickers_use_suspects_only_when_nothing_live_is_left() -> None:
    live, suspect = inst(0), Instance("echo", "i1", "127.0.0.1:9001", {}, "s/echo/i1", 1, 0, True)
    assert usable([live, suspect]) == (live,)
    assert usable([suspect, inst(2, status="draining")]) == (suspect,)
    assert not suspect.healthy
    picker = RoundRobin()
    assert {picker.pick([live, suspect]) for _ in range(4)} == {live}
    assert picker.pick([suspect]) == suspect


@pytest.mark.parametrize(
    "kwargs", [{"threshold": 1.0}, {"threshold": 0}, {"window": -1}, {"min_instances": 0}]
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        ExpiryProtection(**kwargs)  # type: ignore[arg-type]


class ScanCounter(InstanceTable):
    """A table that counts whole-table scans, which a deletion must never need."""

    scans = 0

    def values(self):  # type: ignore[no-untyped-def]
        self.scans += 1
        return super().values()

    def items(self):  # type: ignore[no-untyped-def]
        self.scans += 1
        return super().items()

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.scans += 1
        return super().__iter__()


def test_a_mass_expiry_never_scans_the_table() -> None:
    """20,000 instances, 14,000 deleted in one burst: each deletion is judged from
    counts, not by walking the table (which made one batch block a loop for seconds)."""
    clock = Clock()
    guard = ExpiryGuard(ExpiryProtection(), clock)
    view = ScanCounter(
        {i.key: i for s in range(200) for i in (inst(k, f"svc{s}") for k in range(100))}
    )
    doomed = [key for key in list(dict.keys(view)) if int(key.rsplit("i", 1)[1]) < 70]
    events = []
    for key in doomed:
        events += guard.deleted(view[key], view)
        clock.now += 0.0001
    assert view.scans == 0
    # 70 of 100 per service went: each service engaged once, all 70 held as suspects.
    assert guard.engagements == 200
    assert sum(1 for i in dict.values(view) if i.suspect) == 14_000
    # Deadlines come out oldest first: svc0 engaged first, so its suspects go first.
    first = guard.next_deadline()
    assert first is not None
    clock.now = first
    early = guard.expire(view)
    assert {e.instance.service for e in early} == {"svc0"}
    clock.now += 3600
    gone = guard.expire(view)
    assert len(early) + len(gone) == 14_000 and view.scans == 0 and len(view) == 6_000


def test_live_counts_follow_every_change() -> None:
    view = fleet(3)
    assert view.live("echo") == 3
    view["s/echo/i0"] = Instance("echo", "i0", "127.0.0.1:9000", {}, "s/echo/i0", 0, 0, True)
    assert view.live("echo") == 2
    del view["s/echo/i1"]
    assert view.live("echo") == 1 and view.live("other") == 0
    with pytest.raises(TypeError):
        view.pop("s/echo/i2")


def test_a_suspect_keeps_every_field_of_the_instance() -> None:
    import dataclasses

    from etcdisco import Override

    guard, view = ExpiryGuard(ExpiryProtection(), Clock()), InstanceTable()
    full = Instance(
        "echo",
        "i0",
        "127.0.0.1:9000",
        {"zone": "a"},
        "s/echo/i0",
        7,
        lease=42,
        override=Override("echo", "i0", disabled=True, reason="r", by="ops"),
    )
    for n in range(1, 4):
        view[f"s/echo/i{n}"] = inst(n)
    view[full.key] = full
    guard._hold(full, view, 0.0, previous=None)
    assert view[full.key] == dataclasses.replace(full, suspect=True)


def test_many_services_engaging_at_once_log_one_line(caplog: pytest.LogCaptureFixture) -> None:
    guard, view = ExpiryGuard(ExpiryProtection(), Clock()), InstanceTable()
    for s in range(50):
        for i in fleet(4, f"svc{s}").values():
            view[i.key] = i
    for s in range(50):
        for n in range(4):
            guard.deleted(view[f"s/svc{s}/i{n}"], view)
    assert guard.engagements == 50
    with caplog.at_level("WARNING", logger="etcdisco"):
        guard.report()
        guard.report()
    (line,) = [r.getMessage() for r in caplog.records]
    assert "svc0: 3 of 4" in line and "47 more services" in line
