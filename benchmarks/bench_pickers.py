"""Cost of one pick for every balancing policy, at 10 and 1,000 instances.

    .venv/bin/python benchmarks/bench_pickers.py [--quick] [--out PATH]
        [--batches 200] [--batch 1000]

Each number is the median over batches of (batch time / picks), measured with
time.perf_counter_ns on one unchanged snapshot, so per-snapshot work is cached, as in a
client between two changes. "rebuild" is the first pick after a change of one instance
(what a client pays once per change). Prints the markdown section, or writes it to
--out. Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from _common import command_line, write_section

from etcdisco import Instance, make_picker
from etcdisco.balancing import Picker

ROOT = Path(__file__).resolve().parents[1]
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


def section(args: argparse.Namespace) -> str:
    smoke = " (smoke run: too few picks to read much into)" if args.quick else ""
    command = command_line("bench_pickers.py")
    lines = [
        "## Picker cost per policy",
        "",
        f"Command: `{command}`{smoke} - Python {platform.python_version()} on "
        f"{platform.machine()}, {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        f"ns/pick: median over {args.batches} batches of {args.batch} picks on one unchanged "
        "snapshot (per-snapshot work cached, as in a client between two changes). "
        "Rebuild: the first pick after one instance changed, median of 21.",
        "",
        "| policy | "
        + " | ".join(f"ns/pick @{n}" for n in SIZES)
        + " | "
        + " | ".join(f"rebuild @{n}" for n in SIZES)
        + " |",
        "|---|" + "---|" * (2 * len(SIZES)),
    ]
    keys = [f"user-{n}" for n in range(args.batch)]
    pools = {n: make_pool(n) for n in SIZES}
    metrics: dict[str, float] = {}
    for label, policy, options in CASES:
        cells = []
        for n in SIZES:
            batch = pick_batch(make_picker(policy, **options), pools[n], keys)
            ns = per_pick_ns(batch, args.batch, args.batches)
            metrics[f"{label} ns/pick @{n}"] = round(ns, 1)
            cells.append(f"{ns:,.0f}")
        cells += [f"{rebuild_ms(policy, options, pools[n]):.2f} ms" for n in SIZES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "| case | " + " | ".join(f"ns @{n}" for n in SIZES) + " |",
        "|---|" + "---|" * len(SIZES),
    ]
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
        cells = []
        for n in SIZES:
            picker = make_picker("round_robin")
            batches = max(1, args.batches // 4)
            cells.append(f"{per_pick_ns(build(picker, pools[n]), args.batch, batches):,.0f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for policy in ("round_robin", "p2c"):
        cells = []
        for n in SIZES:
            batch = call_batch(make_picker(policy), pools[n], args.batch)
            cells.append(f"{per_pick_ns(batch, args.batch, args.batches):,.0f}")
        lines.append(f"| {policy}: pick+started+finished | " + " | ".join(cells) + " |")
    lines += ["", f"<!-- etcdisco-metrics {json.dumps({'pickers': metrics})} -->", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few, small batches")
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    parser.add_argument("--batches", type=int, help="batches per measurement (default 200)")
    parser.add_argument("--batch", type=int, help="picks per batch (default 1000)")
    args = parser.parse_args()
    if args.batches is None:
        args.batches = 20 if args.quick else 200
    if args.batch is None:
        args.batch = 200 if args.quick else 1000
    write_section(section(args), args.out)


def _fresh_tuples(picker: Picker, pool: tuple[Instance, ...], count: int) -> Callable[[], None]:
    # Distinct tuple objects with the same instances: identity never matches the last
    # one seen, so every pick takes the compare-by-content path.
    copies = [tuple(list(pool)) for _ in range(50)]

    def run() -> None:
        for n in range(count):
            picker.pick(copies[n % len(copies)])

    return run


if __name__ == "__main__":
    main()
