"""Registry size: etcdisco next to etcd's own tools at 10,000 and 100,000 instances.

    .venv/bin/python benchmarks/registry_size.py [--quick] [--out PATH]
        [--sizes 10000,100000] [--services-per 10] [--repeats 3]
        [--churn-rate 1000] [--churn-seconds 10] [--burst 20000]

One local etcd (the newest found, or $ETCDISCO_ETCD) is filled with instances in the
naming format (a small metadata object each, ``--services-per`` instances per
service), size after size. At each size, measured side by side in the same run:

- the floors: ``etcdctl get --prefix services/ -w json`` and ``--print-value-only``
  (output to /dev/null), and one paged range through etcdisco's own etcd client;
- ``etcdisco --json list`` (a fresh process, output to /dev/null);
- a fresh process's ``AsyncClient().discover_all()`` until every instance is held, and
  its RSS per instance (after ``gc.collect()``).

At the largest size, that cache process then follows ``--churn-rate`` metadata
updates/s (its CPU), and a lease holding ``--burst`` of the instances is revoked: the
longest the cache's event loop went without running a 2 ms ticker while the deletions
arrived, and its CPU per deleted instance. Medians of ``--repeats``. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import command_line, load_average, write_section

from etcdisco import AsyncClient, ServiceCache, encode_value
from etcdisco.etcd import EtcdClient, Op
from etcdisco.testing import LocalEtcd

SCRIPT = Path(__file__).resolve()
STEP_TIMEOUT = 600.0
GOAL_LIST = 2.0  # etcdisco --json list within 2x of etcdctl -w json
GOAL_WARM = 2.5  # discover_all() warm within 2.5x of etcdctl --print-value-only
GOAL_BYTES = 800  # client RSS per instance
GOAL_FOLLOW = 20.0  # % of one core following 1,000 changes/s
GOAL_STALL_MS = 50.0  # no callback over 50 ms during a burst of deletions


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def address_of(g: int) -> str:
    return f"10.{g // 62500 % 256}.{g // 250 % 250}.{g % 250 + 1}:8080"


def key_of(g: int, services_per: int) -> tuple[str, str]:
    address = address_of(g)
    return f"services/svc-{g // services_per:06d}/{address}", address


def value_of(address: str, g: int, seq: int = 0) -> bytes:
    return encode_value(address, {"zone": f"zone-{g % 3}", "version": "1.4.2", "seq": seq})


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- cache process


async def holding(cache: ServiceCache, count: int) -> None:
    """Until the cache holds ``count`` instances (told by its change events)."""
    enough = asyncio.Event()

    def check(_events: object) -> None:
        if len(cache.instances()) >= count:
            enough.set()

    cache.add_listener(check)
    try:
        check(None)
        async with asyncio.timeout(STEP_TIMEOUT):
            await enough.wait()
    finally:
        cache.remove_listener(check)


async def cache_main(endpoint: str, expect: int) -> None:
    """Warm a discover_all() cache, report; then obey 'follow' and 'burst' lines."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    async with AsyncClient(endpoint, timeout=60) as client:
        cache = await client.discover_all()
        await cache.wait_ready(STEP_TIMEOUT)
        await holding(cache, expect)
        warm = time.perf_counter() - t0
        held = len(cache.instances())
        gc.collect()
        emit({"warm": warm, "instances": held, "bytes": (rss_bytes() - rss0) / held})
        (watcher,) = client.watchers
        while line := await reader.readline():
            command = json.loads(line)
            if command["cmd"] == "follow":
                applied, cpu, wall = watcher.events_applied, cpu_seconds(), time.perf_counter()
                emit({"following": True})
                await asyncio.sleep(command["seconds"])
                emit(
                    {
                        "events": watcher.events_applied - applied,
                        "cpu": cpu_seconds() - cpu,
                        "wall": time.perf_counter() - wall,
                    }
                )
            elif command["cmd"] == "settle":
                await holding(cache, command["instances"])
                emit({"settled": True})
            elif command["cmd"] == "burst":
                target = watcher.events_applied + command["events"]
                # The longest the loop stayed away from this ticker, in wall time and in
                # this thread's CPU time: on a shared machine the wall gap includes time
                # the process was not scheduled; the CPU gap is the callback's own work.
                worst = worst_cpu = 0.0
                cpu = cpu_seconds()
                emit({"watching": True})
                t, tc = time.perf_counter(), time.thread_time()
                began = t
                while watcher.events_applied < target:
                    await asyncio.sleep(0.002)
                    now, now_cpu = time.perf_counter(), time.thread_time()
                    worst = max(worst, now - t - 0.002)
                    worst_cpu = max(worst_cpu, now_cpu - tc)
                    t, tc = now, now_cpu
                    if now - began > STEP_TIMEOUT:
                        raise RuntimeError("the burst of deletions never arrived")
                emit(
                    {
                        "worst_stall": worst,
                        "worst_stall_cpu": worst_cpu,
                        "cpu": cpu_seconds() - cpu,
                        "seconds": time.perf_counter() - began,
                        "instances": len(cache.instances()),
                    }
                )


# --------------------------------------------------------------------------- parent


class CacheProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, endpoint: str, expect: int) -> CacheProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            "--cache",
            endpoint,
            str(expect),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())

    async def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(STEP_TIMEOUT):
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the cache process exited with {await self.proc.wait()}")
        message: dict[str, Any] = json.loads(line)
        return message

    async def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(30):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True, env=env)
    return time.perf_counter() - t


async def fill(etcd: EtcdClient, lease: int, first: int, last: int, services_per: int) -> None:
    ops: list[Op] = []
    for g in range(first, last):
        key, address = key_of(g, services_per)
        ops.append(Op.put(key, value_of(address, g), lease=lease))
        if len(ops) == 128:
            await etcd.txn([], ops)
            ops = []
    if ops:
        await etcd.txn([], ops)


async def churn(
    etcd: EtcdClient, lease: int, size: int, rate: float, seconds: float, per: int
) -> int:
    """Rewrite random instances' metadata at ``rate``/s: every 10 ms, the puts due, in
    one transaction (one writer keeps up with the rate; each put is its own event)."""
    loop = asyncio.get_running_loop()
    start, done, rng = loop.time(), 0, random.Random(7)
    while (now := loop.time()) - start < seconds:
        ops = []
        # Distinct keys: etcd refuses a transaction that puts one key twice.
        for g in rng.sample(range(size), max(0, min(128, int((now - start) * rate) - done))):
            key, address = key_of(g, per)
            ops.append(Op.put(key, value_of(address, g, done + 1), lease=lease))
            done += 1
        if ops:
            await etcd.txn([], ops)
        await asyncio.sleep(0.01)
    return done


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    etcdctl = shutil.which("etcdctl")
    if etcdctl is None:
        raise SystemExit("etcdctl not found (Debian's etcd-client): run scripts/setup.sh")
    cli = str(Path(sys.executable).with_name("etcdisco"))
    figures: dict[str, Any] = {"sizes": {}}
    with LocalEtcd(quota_backend_bytes=8 * 1024**3) as member:
        args.etcd_version = member.version
        env = {**os.environ, "ETCDCTL_API": "3", "ETCDISCO_ENDPOINTS": member.endpoint}
        async with EtcdClient(member.endpoint, timeout=120) as etcd:
            lease = (await etcd.lease_grant(3600)).id
            filled = 0
            for size in args.sizes:
                await fill(etcd, lease, filled, size, args.services_per)
                filled = size
                r = args.repeats
                ctl_json = [
                    timed(
                        [
                            etcdctl,
                            f"--endpoints={member.endpoint}",
                            "get",
                            "--prefix",
                            "services/",
                            "-w",
                            "json",
                        ],
                        env,
                    )
                    for _ in range(r)
                ]
                ctl_values = [
                    timed(
                        [
                            etcdctl,
                            f"--endpoints={member.endpoint}",
                            "get",
                            "--prefix",
                            "services/",
                            "--print-value-only",
                        ],
                        env,
                    )
                    for _ in range(r)
                ]
                ranges = []
                for _ in range(r):
                    t = time.perf_counter()
                    await etcd.get_prefix("services/")
                    ranges.append(time.perf_counter() - t)
                lists = [timed([cli, "--json", "list"], env) for _ in range(r)]
                warms: list[dict[str, Any]] = []
                keep: CacheProcess | None = None
                for i in range(r):
                    proc = await CacheProcess.start(member.endpoint, size)
                    warms.append(await proc.receive())
                    if size == args.sizes[-1] and i == r - 1:
                        keep = proc
                    else:
                        await proc.stop()
                med = statistics.median
                f = {
                    "etcdctl_json": med(ctl_json),
                    "etcdctl_values": med(ctl_values),
                    "range": med(ranges),
                    "list": med(lists),
                    "warm": med(w["warm"] for w in warms),
                    "bytes_per_instance": med(w["bytes"] for w in warms),
                }
                figures["sizes"][str(size)] = {k: round(v, 4) for k, v in f.items()}
                if keep is not None:
                    keep.send({"cmd": "follow", "seconds": args.churn_seconds})
                    await keep.receive()
                    made = await churn(
                        etcd, lease, size, args.churn_rate, args.churn_seconds, args.services_per
                    )
                    followed = await keep.receive()
                    figures["follow"] = {
                        "rate": made / args.churn_seconds,
                        "events_per_s": followed["events"] / followed["wall"],
                        "cpu_percent": 100 * followed["cpu"] / followed["wall"],
                    }
                    burst_lease = (await etcd.lease_grant(3600)).id
                    await fill(etcd, burst_lease, size, size + args.burst, args.services_per)
                    keep.send({"cmd": "settle", "instances": size + args.burst})
                    await keep.receive()
                    keep.send({"cmd": "burst", "events": args.burst})
                    await keep.receive()
                    await etcd.lease_revoke(burst_lease)
                    burst = await keep.receive()
                    figures["burst"] = {
                        "deletions": args.burst,
                        "worst_stall_ms": 1000 * burst["worst_stall"],
                        "worst_stall_cpu_ms": 1000 * burst["worst_stall_cpu"],
                        "cpu_us_per_deletion": 1e6 * burst["cpu"] / args.burst,
                        "seconds": burst["seconds"],
                    }
                    await keep.stop()
    return figures


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


def goal_lines(figures: dict[str, Any]) -> list[str]:
    """The goals of issue 14 with their verdicts (run_all.py lists them too)."""
    sizes = figures["sizes"]
    counts = sorted(int(n) for n in sizes)
    big, small = sizes[str(counts[-1])], sizes[str(counts[0])]
    list_ratio = big["list"] / big["etcdctl_json"]
    warm_ratio = big["warm"] / big["etcdctl_values"]
    growth = (big["warm"] / small["warm"]) / (counts[-1] / counts[0])
    goals = [
        f"- `etcdisco --json list` within {GOAL_LIST:g}x of `etcdctl -w json` at "
        f"{counts[-1]:,}: {verdict(list_ratio <= GOAL_LIST)} ({list_ratio:.2f}x)",
        f"- cache warm within {GOAL_WARM:g}x of `etcdctl --print-value-only`: "
        f"{verdict(warm_ratio <= GOAL_WARM)} ({warm_ratio:.2f}x)",
        f"- at most {GOAL_BYTES} B of client RSS per instance: "
        f"{verdict(big['bytes_per_instance'] <= GOAL_BYTES)} "
        f"({big['bytes_per_instance']:.0f} B)",
        f"- warm-up time per instance, {counts[-1]:,} vs {counts[0]:,}: "
        f"{growth:.2f}x (1.00 = linear)",
    ]
    follow = figures.get("follow")
    if follow:
        goals.append(
            f"- following {follow['rate']:,.0f} changes/s under {GOAL_FOLLOW:g}% of one core: "
            f"{verdict(follow['cpu_percent'] < GOAL_FOLLOW)} ({follow['cpu_percent']:.1f}%, "
            f"{follow['events_per_s']:,.0f} events/s applied)"
        )
    burst = figures.get("burst")
    if burst:
        goals.append(
            f"- {burst['deletions']:,} deletions at once (one lease revoked), no callback over "
            f"{GOAL_STALL_MS:g} ms: {verdict(burst['worst_stall_cpu_ms'] <= GOAL_STALL_MS)} "
            f"(longest stretch of the loop's own CPU {burst['worst_stall_cpu_ms']:.1f} ms, "
            f"wall {burst['worst_stall_ms']:.1f} ms; {burst['cpu_us_per_deletion']:.1f} us "
            f"of CPU per deletion; all applied in {burst['seconds']:.2f} s)"
        )
    return goals


def render(args: argparse.Namespace, figures: dict[str, Any]) -> str:
    sizes = figures["sizes"]
    lines = [
        "## Registry size",
        "",
        f"Command: `{command_line('registry_size.py')}`; etcd {args.etcd_version}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, load "
        f"{load_average():.2f} at the end, {time.strftime('%Y-%m-%d')}. Values in the naming "
        f"format with a 3-field metadata object, {args.services_per} instances per service; "
        f"medians of {args.repeats}. Every process shares this machine.",
        "",
        "| measurement | " + " | ".join(f"{int(s):,} instances" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]

    def row(name: str, key: str, fmt: str) -> str:
        return f"| {name} | " + " | ".join(fmt.format(v[key]) for v in sizes.values()) + " |"

    lines += [
        row("floor: `etcdctl get --prefix -w json`", "etcdctl_json", "{:.2f} s"),
        row("floor: `etcdctl get --prefix --print-value-only`", "etcdctl_values", "{:.2f} s"),
        row("floor: one paged range, etcdisco's etcd client", "range", "{:.2f} s"),
        row("`etcdisco --json list`", "list", "{:.2f} s"),
        row("fresh `discover_all()` until all held", "warm", "{:.2f} s"),
        row("cache client RSS per instance", "bytes_per_instance", "{:.0f} B"),
        "",
    ]
    lines += ["Goals:", "", *goal_lines(figures), ""]
    lines.append(f"<!-- etcdisco-metrics {json.dumps({'registry_size': figures})} -->")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 and 10,000")
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    parser.add_argument("--sizes", help="instance counts, ascending (10000,100000)")
    parser.add_argument("--services-per", type=int, default=10, help="instances per service")
    parser.add_argument("--repeats", type=int, help="runs per figure (3; quick 1)")
    parser.add_argument("--churn-rate", type=float, default=1000.0, help="changes/s")
    parser.add_argument("--churn-seconds", type=float, help="churn window (10; quick 3)")
    parser.add_argument("--burst", type=int, help="deletions at once (20000; quick 2000)")
    parser.add_argument("--cache", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cache:
        return args
    q = args.quick
    args.sizes = [
        int(s) for s in (args.sizes or ("2000,10000" if q else "10000,100000")).split(",")
    ]
    if args.sizes != sorted(args.sizes) or args.sizes[0] < 1:
        parser.error("--sizes must be positive and ascending")
    args.repeats = args.repeats or (1 if q else 3)
    args.churn_seconds = args.churn_seconds or (3.0 if q else 10.0)
    args.burst = args.burst or (2000 if q else 20_000)
    return args


def main() -> None:
    args = parse_args()
    if args.cache:
        asyncio.run(cache_main(args.cache[0], int(args.cache[1])))
        return
    figures = asyncio.run(measure(args))
    write_section(render(args, figures), args.out)


if __name__ == "__main__":
    main()
