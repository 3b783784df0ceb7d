"""Pickers: pure functions of a snapshot (plus, for p2c, the calls reported to it)."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etcdisco import ConfigError, Instance, Random, RoundRobin, make_picker
from etcdisco.balancing import (
    POLICIES,
    BasePicker,
    Picker,
    PowerOfTwoChoices,
    RingHash,
    WeightedRoundRobin,
    ZoneAware,
    picker_from,
)


def inst(n: int, **meta: Any) -> Instance:
    addr = f"10.0.{n // 250}.{n % 250}:80"
    return Instance("echo", addr, addr, dict(meta), f"services/echo/{addr}", n)


def pool(count: int, **meta: Any) -> tuple[Instance, ...]:
    return tuple(inst(n, **meta) for n in range(1, count + 1))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def seeded(policy: str, seed: int = 7, **options: Any) -> Picker:
    """A picker whose randomness is fixed by ``seed``."""
    if policy in ("random", "p2c", "ring_hash"):
        options["rng"] = random.Random(seed)
    if policy == "round_robin":
        options["start"] = 0
    if policy == "zone_aware":
        options.setdefault("zone", "a")
    return make_picker(policy, **options)


def picked(picker: Picker, instances: Sequence[Instance], key: str | None = None) -> Instance:
    choice = picker.pick(instances, key)
    assert choice is not None
    return choice


# ------------------------------------------------------------------------ every policy


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_spreads_evenly_over_equal_instances(policy: str) -> None:
    instances = pool(10, zone="a")
    picker = seeded(policy)
    counts = Counter(picked(picker, instances, f"user-{i}").id for i in range(10_000))
    assert len(counts) == 10, counts
    # 1,000 each on average; the ring's 100 points per instance spread within ~±20%.
    assert min(counts.values()) > 750 and max(counts.values()) < 1250, counts


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_skips_draining_and_unhealthy(policy: str) -> None:
    instances = (
        inst(1, status="draining", zone="a"),
        inst(2, zone="a"),
        inst(3, status="unhealthy", zone="a"),
        inst(4, zone="a"),
    )
    picker = seeded(policy)
    ids = {picked(picker, instances, f"k{i}").id for i in range(500)}
    assert ids == {inst(2).id, inst(4).id}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_suspects_are_used_only_when_no_live_instance_is_left(policy: str) -> None:
    live = inst(1, zone="a")
    suspect = replace(inst(2, zone="a"), suspect=True)
    picker = seeded(policy)
    assert {picked(picker, (live, suspect), f"k{i}").id for i in range(200)} == {live.id}
    gone = (replace(live, metadata={"zone": "a", "status": "draining"}), suspect)
    assert picked(picker, gone, "k1") is suspect


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize(
    "instances",
    [(), (inst(1, status="draining"),), (inst(1, status="unhealthy"), inst(2, status="draining"))],
    ids=["empty", "draining", "unhealthy"],
)
def test_nothing_pickable_means_none(policy: str, instances: tuple[Instance, ...]) -> None:
    picker = seeded(policy)
    assert picker.pick(instances) is None
    assert picker.pick(instances, "user-1") is None
    assert picker.pick(list(instances)) is None


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_list_changed_in_place_is_noticed(policy: str) -> None:
    # Tuples are recognised by identity; a list is not, because it can change under
    # the same identity.
    instances = [inst(1, zone="a"), inst(2, zone="a")]
    picker = seeded(policy)
    assert picker.pick(instances, "k") is not None
    instances[0] = inst(1, zone="a", status="draining")
    instances[1] = inst(2, zone="a", status="draining")
    assert picker.pick(instances, "k") is None
    instances.append(inst(3, zone="a"))
    assert picked(picker, instances, "k").id == inst(3).id


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from(sorted(POLICIES)),
    states=st.lists(st.sampled_from(["up", "draining", "unhealthy"]), max_size=12),
    weights=st.lists(st.integers(0, 4), min_size=12, max_size=12),
    key=st.one_of(st.none(), st.text(max_size=8)),
)
def test_a_pick_is_a_healthy_member_or_none_when_there_is_none(
    policy: str, states: list[str], weights: list[int], key: str | None
) -> None:
    instances = tuple(
        inst(n, status=state, weight=weights[n], zone="a" if n % 2 else "b")
        for n, state in enumerate(states)
    )
    picker = seeded(policy)
    for _ in range(5):
        choice = picker.pick(instances, key)
        if any(i.healthy for i in instances):
            assert choice in instances and choice.healthy
        else:
            assert choice is None


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_picker_takes_call_reports(policy: str) -> None:
    picker = seeded(policy)
    assert isinstance(picker, BasePicker)
    instances = pool(3, zone="a")
    choice = picked(picker, instances)
    picker.started(choice)
    picker.finished(choice, 0.002, True)
    picker.finished(choice, 0.002, False)  # more finished than started is tolerated
    assert picker.pick(instances) in instances


# ------------------------------------------------------------------------- round robin


def test_round_robin_cycles_through_healthy_instances() -> None:
    instances = [inst(1), inst(2), inst(3, status="draining"), inst(4, status="unhealthy")]
    rr = RoundRobin(start=0)
    picks = [picked(rr, instances).id for _ in range(6)]
    assert picks == [inst(1).id, inst(2).id] * 3


def test_round_robin_starts_at_a_random_place_but_still_cycles() -> None:
    instances = pool(5)
    firsts = {picked(RoundRobin(), instances).id for _ in range(50)}
    assert len(firsts) > 1  # 50 pickers all starting on one instance: odds 5**-49
    rr = RoundRobin()
    window = [picked(rr, instances).id for _ in range(10)]
    assert sorted(window[:5]) == sorted(i.id for i in instances) and window[:5] == window[5:]


def test_random_is_spread_and_skips_draining() -> None:
    instances = [inst(1), inst(2), inst(3, status="draining")]
    picker = Random(random.Random(7))
    counts = Counter(picked(picker, instances).id for _ in range(1000))
    assert set(counts) == {inst(1).id, inst(2).id}
    assert min(counts.values()) > 400


# ---------------------------------------------------------------- weighted round robin


def test_smooth_weighted_round_robin_interleaves_like_nginx() -> None:
    a, b, c = inst(1, weight=5), inst(2, weight=1), inst(3, weight=1)
    picker = WeightedRoundRobin()
    picks = [picked(picker, (a, b, c)) for _ in range(14)]
    assert picks == [a, a, b, a, c, a, a] * 2


def test_weighted_round_robin_is_exact_over_each_cycle() -> None:
    weights = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 0, 8, 9, 7]
    instances = tuple(inst(n, weight=w) for n, w in enumerate(weights))
    expected = {i.id: i.weight for i in instances if i.weight}
    picker = WeightedRoundRobin()
    total = sum(weights)
    for _ in range(3):
        counts = Counter(picked(picker, instances).id for _ in range(total))
        assert counts == expected


def test_weighted_round_robin_matches_a_plain_nginx_scan() -> None:
    rng = random.Random(3)
    instances = tuple(inst(n, weight=rng.choice([1, 1, 2, 3, 10])) for n in range(40))
    current = [0] * len(instances)
    total = sum(i.weight for i in instances)
    expected = []
    for _ in range(500):
        for n, i in enumerate(instances):
            current[n] += i.weight
        best = max(range(len(instances)), key=lambda n: (current[n], -n))
        current[best] -= total
        expected.append(instances[best].id)
    picker = WeightedRoundRobin()
    assert [picked(picker, instances).id for _ in range(500)] == expected


def test_weight_zero_is_never_picked_unless_all_are_zero() -> None:
    picker = WeightedRoundRobin()
    some = (inst(1, weight=0), inst(2, weight=2), inst(3, weight=0))
    assert {picked(picker, some).id for _ in range(20)} == {inst(2).id}
    none = (inst(1, weight=0), inst(2, weight=0))
    assert Counter(picked(picker, none).id for _ in range(10)) == {inst(1).id: 5, inst(2).id: 5}


def test_weighted_round_robin_keeps_its_rotation_across_equal_snapshots() -> None:
    a, b = inst(1, weight=3), inst(2, weight=1)
    picker = WeightedRoundRobin()
    # The same content as new tuples and lists each time: the rotation goes on.
    picks = [picked(picker, (a, b) if n % 2 else [a, b]) for n in range(8)]
    assert Counter(p.id for p in picks) == {a.id: 6, b.id: 2}


# --------------------------------------------------------------------------------- p2c


def test_p2c_prefers_the_less_loaded_instance() -> None:
    clock = FakeClock()
    picker = PowerOfTwoChoices(rng=random.Random(1), clock=clock)
    instances = pool(10)
    for i in instances:
        picker.started(i)
        picker.finished(i, 0.01, True)
    busy = instances[4]
    for _ in range(3):
        picker.started(busy)
    picks = Counter(picked(picker, instances).id for _ in range(2000))
    assert busy.id not in picks
    assert len(picks) == 9
    for _ in range(3):
        picker.finished(busy, 0.01, True)
    assert busy.id in {picked(picker, instances).id for _ in range(500)}


def test_p2c_with_two_instances_always_takes_the_idle_one() -> None:
    picker = PowerOfTwoChoices(rng=random.Random(2), clock=FakeClock())
    a, b = pool(2)
    picker.started(a)
    assert {picked(picker, (a, b)).id for _ in range(100)} == {b.id}


def test_p2c_avoids_the_slow_instance_then_tries_it_again_later() -> None:
    clock = FakeClock()
    picker = PowerOfTwoChoices(decay=10.0, rng=random.Random(3), clock=clock)
    fast, slow = pool(2)
    latency = {fast.id: 0.01, slow.id: 0.5}
    for _ in range(20):
        clock.now += 1.0
        picker.finished(fast, 0.01, True)
        picker.finished(slow, 0.5, True)
    assert {picked(picker, (fast, slow)).id for _ in range(100)} == {fast.id}
    # Steady traffic, one call a second: the fast instance keeps reporting while the
    # slow one's estimate, without news, drifts down until it is tried again.
    picks = []
    for _ in range(300):
        clock.now += 1.0
        choice = picked(picker, (fast, slow))
        picker.started(choice)
        picker.finished(choice, latency[choice.id], True)
        picks.append(choice.id)
    assert slow.id in picks
    assert picks.count(fast.id) > 0.9 * len(picks)


def test_p2c_does_not_reward_an_instance_that_fails_fast() -> None:
    clock = FakeClock()
    picker = PowerOfTwoChoices(rng=random.Random(4), clock=clock)
    good, failing = pool(2)
    for _ in range(20):
        clock.now += 0.5
        picker.finished(good, 0.02, True)
        picker.finished(failing, 0.0005, False)
    assert {picked(picker, (good, failing)).id for _ in range(100)} == {good.id}


def test_p2c_forgets_instances_that_left() -> None:
    clock = FakeClock()
    picker = PowerOfTwoChoices(forget_after=60.0, rng=random.Random(5), clock=clock)
    for generation in range(50):
        instances = tuple(inst(generation * 10 + n) for n in range(10))
        for _ in range(20):
            choice = picked(picker, instances)
            picker.started(choice)
            picker.finished(choice, 0.01, True)
        clock.now += 10.0
    # Ten keys live, plus those of the last ~60 s not yet swept.
    assert len(picker._loads) <= 10 * 10


def test_p2c_counts_stay_exact_under_threads() -> None:
    picker = PowerOfTwoChoices(rng=random.Random(6))
    instances = pool(2)

    def work() -> None:
        for _ in range(5000):
            choice = picked(picker, instances)
            picker.started(choice)
            picker.finished(choice, 0.001, True)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [picker._loads[i.key].outstanding for i in instances] == [0, 0]


# --------------------------------------------------------------------------- ring hash

KEYS = [f"user-{n}" for n in range(10_000)]


def mapping(picker: Picker, instances: Sequence[Instance]) -> dict[str, str]:
    return {key: picked(picker, instances, key).id for key in KEYS}


def test_ring_hash_sends_a_key_to_the_same_instance_every_time() -> None:
    instances = pool(10)
    first, second = RingHash(), RingHash()
    assert all(
        picked(first, instances, "user-1") == picked(second, instances, "user-1") for _ in range(10)
    )
    assert mapping(first, instances) == mapping(second, list(instances))


def test_ring_hash_removing_one_instance_moves_only_its_keys() -> None:
    instances = pool(10)
    picker = RingHash()
    before = mapping(picker, instances)
    gone = instances[3]
    after = mapping(picker, instances[:3] + instances[4:])
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == gone.id}
    assert 500 < len(moved) < 1500  # about a tenth
    # It comes back: every key returns to where it was.
    assert mapping(picker, instances) == before


def test_ring_hash_draining_instance_gives_up_only_its_keys() -> None:
    instances = pool(10)
    picker = RingHash()
    before = mapping(picker, instances)
    draining = inst(7, status="draining")
    after = mapping(picker, tuple(draining if i.id == draining.id else i for i in instances))
    assert {k for k in KEYS if before[k] != after[k]} == {
        k for k in KEYS if before[k] == draining.id
    }


def test_ring_hash_built_step_by_step_equals_a_fresh_ring() -> None:
    # The ring is rebuilt incrementally from the previous one; the result must not
    # depend on the history.
    picker = RingHash()
    for members in (pool(10), pool(13)[5:], (*pool(4), inst(2, weight=3)), pool(12)):
        assert mapping(picker, members) == mapping(RingHash(), members)


def test_ring_hash_follows_weights() -> None:
    instances = (inst(1, weight=3), inst(2), inst(3), inst(4, weight=0))
    counts = Counter(mapping(RingHash(), instances).values())
    assert set(counts) == {inst(1).id, inst(2).id, inst(3).id}
    assert 2.2 < counts[inst(1).id] / ((counts[inst(2).id] + counts[inst(3).id]) / 2) < 3.8


def test_ring_hash_mapping_is_stable_across_versions() -> None:
    # Clients of different processes (and releases) must agree on where a key goes:
    # the hashing is part of the behaviour, pinned here.
    instances = pool(5)
    got = {key: picked(RingHash(), instances, key).id for key in ("user-1", "user-2", "cart-9")}
    assert got == PINNED


PINNED = {"user-1": "10.0.0.5:80", "user-2": "10.0.0.5:80", "cart-9": "10.0.0.3:80"}


def test_ring_hash_without_a_key_is_random() -> None:
    picker = RingHash(rng=random.Random(8))
    counts = Counter(picked(picker, pool(4)).id for _ in range(4000))
    assert len(counts) == 4 and min(counts.values()) > 800


def test_ring_hash_scaled_down_ring_still_moves_only_the_removed_keys() -> None:
    # 1,000 instances exceed the default cap: 20 points each instead of 100.
    instances = pool(1000)
    picker = RingHash()
    before = mapping(picker, instances)
    assert len(picker._ring.points) == 20_000  # type: ignore[union-attr]
    gone = instances[500]
    after = mapping(picker, instances[:500] + instances[501:])
    assert {k for k in KEYS if before[k] != after[k]} == {k for k in KEYS if before[k] == gone.id}


def test_ring_hash_caps_the_ring_size() -> None:
    heavy = tuple(inst(n, weight=50) for n in range(100))
    picker = RingHash(replicas=100, max_points=20_000)
    counts = Counter(mapping(picker, heavy).values())
    assert len(counts) > 90
    assert len(picker._ring.points) <= 20_000  # type: ignore[union-attr]


# -------------------------------------------------------------------------- zone aware


def test_zone_aware_stays_in_its_zone() -> None:
    instances = (inst(1, zone="a"), inst(2, zone="b"), inst(3, zone="a"), inst(4))
    picker = ZoneAware(zone="a")
    assert {picked(picker, instances).id for _ in range(20)} == {inst(1).id, inst(3).id}


def test_zone_aware_spills_over_when_the_zone_has_no_healthy_instance() -> None:
    instances = (inst(1, zone="a", status="draining"), inst(2, zone="b"), inst(3, zone="c"))
    picker = ZoneAware(zone="a")
    assert {picked(picker, instances).id for _ in range(20)} == {inst(2).id, inst(3).id}
    assert picked(ZoneAware(zone="x"), instances).zone in ("b", "c")


def test_zone_aware_spills_over_below_min_local() -> None:
    instances = (inst(1, zone="a"), inst(2, zone="b"), inst(3, zone="b"))
    spread = ZoneAware(zone="a", min_local=2)
    assert {picked(spread, instances).id for _ in range(30)} == {i.id for i in instances}
    enough = (*instances, inst(4, zone="a"))
    assert {picked(spread, enough).id for _ in range(30)} == {inst(1).id, inst(4).id}


def test_zone_aware_passes_key_and_call_reports_to_its_inner_policy() -> None:
    instances = tuple(inst(n, zone="a") for n in range(10))
    hashed = make_picker("zone_aware", zone="a", inner="ring_hash")
    alone = make_picker("ring_hash")
    assert picked(hashed, instances, "user-1") == picked(alone, instances, "user-1")

    inner = PowerOfTwoChoices(rng=random.Random(9), clock=FakeClock())
    zoned = ZoneAware(zone="a", inner=inner)
    busy = instances[0]
    zoned.started(busy)
    assert busy not in {picked(zoned, instances) for _ in range(500)}
    zoned.finished(busy, 0.01, True)
    assert inner._loads[busy.key].outstanding == 0


# ---------------------------------------------------------------------------- factory


def test_unknown_policy_is_named() -> None:
    with pytest.raises(ConfigError, match="nope"):
        make_picker("nope")
    assert isinstance(make_picker("round_robin"), RoundRobin)


@pytest.mark.parametrize(
    ("policy", "cls"),
    [
        ("round_robin", RoundRobin),
        ("random", Random),
        ("weighted_round_robin", WeightedRoundRobin),
        ("p2c", PowerOfTwoChoices),
        ("ring_hash", RingHash),
    ],
)
def test_make_picker_builds_each_policy(policy: str, cls: type[BasePicker]) -> None:
    assert type(make_picker(policy)) is cls


@pytest.mark.parametrize(
    ("policy", "options", "message"),
    [
        ("round_robin", {"zone": "a"}, "unknown option 'zone'; its options: start"),
        ("weighted_round_robin", {"x": 1}, "unknown option 'x'; its options: none"),
        ("p2c", {"decay": 0}, "decay must be a finite number > 0"),
        ("p2c", {"decay": float("nan")}, "decay"),
        ("p2c", {"rng": 7}, "rng must be a random.Random"),
        ("ring_hash", {"replicas": 0}, "replicas must be an integer >= 1"),
        ("ring_hash", {"max_points": 1.5}, "max_points"),
        ("zone_aware", {}, "zone must be a non-empty string"),
        ("zone_aware", {"zone": "a", "inner": "nope"}, "unknown balancing policy 'nope'"),
        ("zone_aware", {"zone": "a", "min_local": 0}, "min_local"),
        ("zone_aware", {"zone": "a", "inner_options": {"decay": -1}}, "unknown option 'decay'"),
        ("zone_aware", {"zone": "a", "inner": "p2c", "inner_options": {"decay": -1}}, "decay"),
        ("round_robin", {"start": -1}, "start"),
    ],
)
def test_bad_options_are_config_errors(policy: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        make_picker(policy, **options)


class _PickOnly:
    """A picker written against the old one-method interface."""

    def pick(self, instances: Sequence[Instance], key: str | None = None) -> Instance | None:
        return instances[0] if instances else None


def test_a_picker_object_needs_started_and_finished_too() -> None:
    # Callers count calls through started/finished; one missing would fail every call.
    with pytest.raises(ConfigError, match="must be a policy name or a picker"):
        picker_from(_PickOnly(), {}, "policy")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="zone_aware: inner"):
        ZoneAware(zone="a", inner=_PickOnly())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="options go with a policy name"):
        picker_from(RoundRobin(), {"decay": 1.0}, "policy")
    assert isinstance(picker_from("round_robin", {}, "policy"), RoundRobin)
