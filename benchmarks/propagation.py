"""Register -> visible latency and crash -> vanish time, against a real local etcd.

    .venv/bin/python benchmarks/propagation.py [--samples 200] [--crash-samples 3]

Starts its own etcd (the newest found, or $ETCDISCO_ETCD), measures, prints a table
and writes it to benchmarks/results-propagation.md. Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from etcdisco import AsyncClient, EventType
from etcdisco._local_etcd import LocalEtcd
from etcdisco.etcd import EtcdClient

OUT = Path(__file__).with_name("results-propagation.md")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def floor(endpoint: str, samples: int) -> list[float]:
    """A bare put -> watch event with the project's own etcd client."""
    async with EtcdClient(endpoint) as writer, EtcdClient(endpoint) as reader:
        start = (await reader.get("floor/")).revision + 1
        async with reader.watch("floor/", prefix=True, start_revision=start) as w:
            out = []
            for i in range(samples):
                t0 = time.perf_counter()
                await writer.put(f"floor/{i}", "x")
                await anext(w)
                out.append((time.perf_counter() - t0) * 1000)
            return out


async def register_to_visible(endpoint: str, samples: int) -> list[float]:
    async with (
        AsyncClient(endpoint) as server,
        AsyncClient(endpoint) as client,
        client.discover("bench") as cache,
    ):
        await cache.wait_ready(5)
        events = cache.events()
        out = []
        for i in range(samples):
            t0 = time.perf_counter()
            reg = await server.register("bench", f"127.0.0.1:{20000 + i}", ttl=30)
            while True:
                ev = await anext(events)
                if ev.type is EventType.ADDED and ev.instance.key == reg.key:
                    break
            out.append((time.perf_counter() - t0) * 1000)
        return out


async def crash_to_vanish(endpoint: str, ttl: int, samples: int) -> list[float]:
    out = []
    async with AsyncClient(endpoint) as client, client.discover("crash") as cache:
        await cache.wait_ready(5)
        events = cache.events()
        for i in range(samples):
            address = f"127.0.0.1:{30000 + i}"
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "etcdisco",
                    "--endpoints",
                    endpoint,
                    "register",
                    "crash",
                    address,
                    "--ttl",
                    str(ttl),
                ],
                stdout=subprocess.DEVNULL,
            )
            while not any(inst.address == address for inst in cache.instances()):
                await anext(events)
            # Let the lease be refreshed at least once, as in a long-running process.
            await asyncio.sleep(ttl / 2)
            proc.send_signal(signal.SIGKILL)
            t0 = time.perf_counter()
            proc.wait()
            while True:
                ev = await anext(events)
                if ev.type is EventType.REMOVED and ev.instance.address == address:
                    break
            out.append(time.perf_counter() - t0)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--crash-samples", type=int, default=3)
    args = parser.parse_args()
    with LocalEtcd() as member:  # started on entry
        ep = member.endpoint
        fl = await floor(ep, args.samples)
        vis = await register_to_visible(ep, args.samples)
        crashes = {ttl: await crash_to_vanish(ep, ttl, args.crash_samples) for ttl in (2, 5)}
        version = member.version
    rows = [
        "| measurement | samples | p50 | p99 | max |",
        "|---|---|---|---|---|",
        f"| bare put -> watch event (floor) | {len(fl)} | {pct(fl, 0.5):.2f} ms | "
        f"{pct(fl, 0.99):.2f} ms | {max(fl):.2f} ms |",
        f"| register() -> visible in another client's cache | {len(vis)} | "
        f"{pct(vis, 0.5):.2f} ms | {pct(vis, 0.99):.2f} ms | {max(vis):.2f} ms |",
    ]
    for ttl, values in crashes.items():
        rows.append(
            f"| SIGKILL -> gone from cache, ttl {ttl}s | {len(values)} | "
            f"{statistics.median(values):.2f} s | - | {max(values):.2f} s |"
        )
    header = (
        f"etcd {version}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}; command: `.venv/bin/python benchmarks/propagation.py "
        f"--samples {args.samples} --crash-samples {args.crash_samples}`"
    )
    text = f"# Propagation\n\n{header}\n\n" + "\n".join(rows) + "\n"
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    asyncio.run(main())
