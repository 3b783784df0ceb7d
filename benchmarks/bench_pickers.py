"""Cost of one pick for every balancing policy, at 10 and 1,000 instances.

    .venv/bin/python benchmarks/bench_pickers.py [--batches 200] [--batch 1000]

Each number is the median over batches of (batch time / picks), measured with
time.perf_counter_ns on one unchanged snapshot, so per-snapshot work is cached, as in a
client between two changes. "rebuild" is the first pick after a change of one instance
(what a client pays once per change). Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from etcdisco import Instance, make_picker
from etcdisco.balancing import Picker

SIZES = (10, 1000)
CASES: list[tuple[str, str, dict[str, object]]] = [
    ("round_robin", "round_robin", {}),
    ("random", "random", {}),
    ("weighted_round_robin", "weighted_round_robin", {}),
    ("p2c", "p2c", {}),
    ("ring_hash", "ring_hash", {}),
    ("zone_aware(round_robin)", "zone_aware", {"zone": "a"}),
    ("zone_aware(p2c)", "zone_aware", {"zone": "a", "inner": "p2c"}),
]


def make_pool(size: int) -> tuple[Instance, ...]:
    out = []
    for n in range(size):
        address = f"10.{n // 65536}.{n // 256 % 256}.{n % 256}:50051"
        metadata = {"zone": "abc"[n % 3], "weight": 1 + n % 4}
        out.append(Instance("bench", address, address, metadata, f"services/bench/{address}", n))
    return tuple(out)


def per_pick_ns(run_batch: Callable[[], None], batch: int, batches: int) -> float:
    run_batch()  # warm the per-snapshot cache
    samples = []
    for _ in range(batches):
        start = time.perf_counter_ns()
        run_batch()
        samples.append((time.perf_counter_ns() - start) / batch)
    return statistics.median(samples)


def pick_batch(
    picker: Picker, instances: Sequence[Instance], keys: list[str]
) -> Callable[[], None]:
    pick = picker.pick

    def run() -> None:
        for key in keys:
            pick(instances, key)

    return run


def call_batch(picker: Picker, instances: Sequence[Instance], count: int) -> Callable[[], None]:
    """pick + started + finished: what a balancing channel does per call."""

    def run() -> None:
        for _ in range(count):
            chosen = picker.pick(instances)
            assert chosen is not None
            picker.started(chosen)
            picker.finished(chosen, 0.001, True)

    return run


def rebuild_ms(policy: str, options: dict[str, object], instances: tuple[Instance, ...]) -> float:
    """Median time of the first pick after one instance changed."""
    picker = make_picker(policy, **options)
    picker.pick(instances, "k")
    variants = [instances, (*instances[:-1], make_pool(len(instances) + 1)[-1])]
    samples = []
    for n in range(21):
        snapshot = tuple(variants[n % 2])  # a new tuple object each time
        start = time.perf_counter_ns()
        picker.pick(snapshot, "k")
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()

    print(f"# pick cost, Python {platform.python_version()} on {platform.machine()}")
    print(f"# median of {args.batches} batches of {args.batch} picks\n")
    header = f"{'policy':<26}" + "".join(f"{f'ns/pick @{n}':>15}" for n in SIZES)
    header += "".join(f"{f'rebuild ms @{n}':>17}" for n in SIZES)
    print(header)
    keys = [f"user-{n}" for n in range(args.batch)]
    pools = {n: make_pool(n) for n in SIZES}
    for label, policy, options in CASES:
        row = f"{label:<26}"
        for n in SIZES:
            batch = pick_batch(make_picker(policy, **options), pools[n], keys)
            row += f"{per_pick_ns(batch, args.batch, args.batches):>15.0f}"
        for n in SIZES:
            row += f"{rebuild_ms(policy, options, pools[n]):>17.2f}"
        print(row, flush=True)

    print()
    extra = f"{'case':<40}" + "".join(f"{f'ns @{n}':>12}" for n in SIZES)
    print(extra)
    rows: list[tuple[str, Callable[[Picker, tuple[Instance, ...]], Callable[[], None]]]] = [
        (
            "round_robin, same list object",
            lambda p, pool: pick_batch(p, list(pool), keys),
        ),
        (
            "round_robin, equal new tuple per pick",
            lambda p, pool: _fresh_tuples(p, pool, args.batch),
        ),
    ]
    for label, build in rows:
        row = f"{label:<40}"
        for n in SIZES:
            picker = make_picker("round_robin")
            row += f"{per_pick_ns(build(picker, pools[n]), args.batch, args.batches // 4):>12.0f}"
        print(row, flush=True)
    for policy in ("round_robin", "p2c"):
        row = f"{policy + ': pick+started+finished':<40}"
        for n in SIZES:
            picker = make_picker(policy)
            batch = call_batch(picker, pools[n], args.batch)
            row += f"{per_pick_ns(batch, args.batch, args.batches):>12.0f}"
        print(row, flush=True)


def _fresh_tuples(picker: Picker, pool: tuple[Instance, ...], count: int) -> Callable[[], None]:
    # Distinct tuple objects with the same instances: identity never matches the last
    # one seen, so every pick takes the compare-by-content path.
    copies = [tuple(list(pool)) for _ in range(50)]

    def run() -> None:
        for n in range(count):
            picker.pick(copies[n % len(copies)])

    return run


if __name__ == "__main__":
    sys.exit(main())
