"""Scale: many instances from many processes, one client following them all.

    .venv/bin/python benchmarks/scale.py [--quick] [--out PATH]
        [--processes 10] [--instances 10000] [--services 1000] [--ttl 10]
        [--churn-rate 100] [--churn-seconds 20] [--warm-repeats 3]

Against a local etcd this script starts (the newest found, or $ETCDISCO_ETCD):

1. ``--processes`` registrant processes (one AsyncClient each, so one lease each)
   register ``--instances`` instances of ``--services`` services between them, all
   at once on a start signal.
2. A fresh process warms a ``discover_all()`` cache of all of them (repeated in
   ``--warm-repeats`` fresh processes; the median counts), reporting its own RSS.
3. The last of those follows ``--churn-rate`` metadata updates/s (made by the
   registrants) for ``--churn-seconds``: its CPU, RSS and the events it saw.
4. Lease keepalives and lease lookups per process, as etcd's own /metrics count them.
5. etcd's db size and RSS, as context.

The registrants and the watchers are this same file started with ``--worker`` and
``--watcher``; they talk to the parent with JSON lines on stdin/stdout and exit when
their stdin closes, so a dying parent takes them along. Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import platform
import random
import re
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import command_line, write_section

from etcdisco import AsyncClient
from etcdisco.testing import LocalEtcd

# Generous bounds on each step so a wedged child fails the run with a message
# instead of hanging it.
STEP_TIMEOUT = 300.0
STOP_TIMEOUT = 10.0
SCRIPT = Path(__file__).resolve()

# --------------------------------------------------------------------------- helpers


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU of another process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may contain spaces; the fields after ")" are fixed.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def mib(n: float) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def instance_address(g: int) -> str:
    return f"10.{g // 62500 % 256}.{g // 250 % 250}.{g % 250 + 1}:8080"


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def next_command(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await reader.readline()
    if not line:  # the parent is gone
        return {"cmd": "stop"}
    command: dict[str, Any] = json.loads(line)
    return command


# --------------------------------------------------------------------------- registrant


class WarningCounter(logging.Handler):
    """Counts the library's warnings by message template instead of printing
    thousands of lines; the parent reports the counts."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[str(record.msg)] = self.counts.get(str(record.msg), 0) + 1


async def worker_main(args: argparse.Namespace) -> None:
    warnings = WarningCounter()
    logging.getLogger("etcdisco").addHandler(warnings)
    reader = await stdin_lines()
    client = AsyncClient(args.endpoint)
    regs: list[Any] = []
    try:
        emit({"ready": True})
        while True:
            command = await next_command(reader)
            if command["cmd"] == "register":
                first = args.index * args.count
                t0 = time.perf_counter()
                regs = list(
                    await asyncio.gather(
                        *(
                            client.register(
                                f"svc-{g % args.services:05d}",
                                instance_address(g),
                                metadata={"zone": f"zone-{g % 3}", "version": "1.4.2", "seq": 0},
                                ttl=args.ttl,
                            )
                            for g in range(first, first + args.count)
                        )
                    )
                )
                emit({"registered": len(regs), "seconds": time.perf_counter() - t0})
            elif command["cmd"] == "churn":
                done, seconds = await churn(regs, command["rate"], command["seconds"], args.index)
                emit({"updates": done, "seconds": seconds})
            elif command["cmd"] == "warnings":
                emit({"warnings": warnings.counts})
            else:
                break
    finally:
        # Closing deregisters every instance: skip that work (and its load on the
        # etcd we are about to stop) by revoking the lease outright instead.
        with contextlib.suppress(Exception):
            leases = {reg.lease_id for reg in regs if reg.lease_id is not None}
            for lease in leases:
                await client.etcd.lease_revoke(lease)
        await client.close(timeout=1.0)


async def churn(regs: list[Any], rate: float, seconds: float, seed: int) -> tuple[int, float]:
    """Update random instances' metadata at a steady ``rate`` for ``seconds``; a late
    update does not shift the schedule, so the average rate holds."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    start = loop.time()
    done = 0
    while True:
        due = start + done / rate
        if due - start >= seconds:
            break
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        reg = rng.choice(regs)
        await reg.update({**reg.metadata, "seq": done + 1})
        done += 1
    return done, loop.time() - start


# --------------------------------------------------------------------------- watcher


async def watcher_main(args: argparse.Namespace) -> None:
    reader = await stdin_lines()
    gc.collect()
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    client = AsyncClient(args.endpoint)
    try:
        cache = await client.discover_all()
        await cache.wait_ready(STEP_TIMEOUT)
        # The first list normally brings everything; this only waits if the
        # registrants were not all visible yet.
        complete = asyncio.Event()

        def check(_events: list[Any]) -> None:
            if len(cache.instances()) >= args.expect:
                complete.set()

        cache.add_listener(check)
        check([])
        async with asyncio.timeout(STEP_TIMEOUT):
            await complete.wait()
        cache.remove_listener(check)
        warm = time.perf_counter() - t0
        gc.collect()
        emit(
            {
                "warm_seconds": warm,
                "instances": len(cache.instances()),
                "rss_before": rss_before,
                "rss_after": rss_bytes(),
            }
        )
        seen = 0

        def count(events: list[Any]) -> None:
            nonlocal seen
            seen += len(events)

        cache.add_listener(count)
        while True:
            command = await next_command(reader)
            if command["cmd"] != "follow":
                break
            seen = 0
            cpu0, wall0 = own_cpu_seconds(), time.perf_counter()
            emit({"following": True})
            await asyncio.sleep(command["seconds"])
            cpu, wall = own_cpu_seconds() - cpu0, time.perf_counter() - wall0
            emit(
                {
                    "events": seen,
                    "cpu_seconds": cpu,
                    "wall_seconds": wall,
                    "rss": rss_bytes(),
                    "instances": len(cache.instances()),
                }
            )
    finally:
        await client.close(timeout=1.0)


# --------------------------------------------------------------------------- parent


class Child:
    """A child process of this script and its JSON-lines channel."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc

    @classmethod
    async def start(cls, name: str, *argv: str) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(name, proc)

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())

    async def receive(self, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                line = await self.proc.stdout.readline()
        except TimeoutError:
            raise RuntimeError(f"{self.name}: no answer within {timeout:.0f}s") from None
        if not line:
            code = await self.proc.wait()
            raise RuntimeError(f"{self.name} exited (code {code}) before answering")
        message: dict[str, Any] = json.loads(line)
        return message

    async def stop(self) -> None:
        """Close stdin (the child's cue to leave); kill it if it does not."""
        if self.proc.returncode is not None:
            return
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await self.proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


def etcd_metrics(endpoint: str) -> str:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    return text


def metric_sum(text: str, name: str, match: Callable[[str], bool] = lambda labels: True) -> float:
    """Sum of the samples of ``name`` whose label text ``match`` accepts."""
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", re.MULTILINE)
    return sum(float(m.group(2)) for m in pattern.finditer(text) if match(m.group(1) or ""))


def grpc_method(method: str) -> Callable[[str], bool]:
    return lambda labels: f'grpc_method="{method}"' in labels


class Snapshot:
    """The server-side counters this benchmark reads, at one moment."""

    def __init__(self, member: LocalEtcd) -> None:
        text = etcd_metrics(member.endpoint)
        self.at = time.perf_counter()
        self.keepalive_msgs = metric_sum(
            text, "grpc_server_msg_received_total", grpc_method("LeaseKeepAlive")
        )
        self.leases_renewed = metric_sum(text, "etcd_debugging_lease_renewed_total")
        self.time_to_live = metric_sum(
            text, "grpc_server_handled_total", grpc_method("LeaseTimeToLive")
        )
        self.puts = metric_sum(text, "grpc_server_handled_total", grpc_method("Put"))
        assert member.pid is not None
        self.etcd_cpu = cpu_seconds_of(member.pid)


async def run(args: argparse.Namespace) -> tuple[list[tuple[str, str, str]], dict[str, Any]]:
    """The table's rows, and the key figures for run_all.py to read."""
    rows: list[tuple[str, str, str]] = []
    figures: dict[str, Any] = {}
    n, p = args.instances, args.processes
    per_process = n // p
    with LocalEtcd(quota_backend_bytes=args.quota_backend_bytes) as member:
        args.etcd_version = member.version
        assert member.pid is not None
        etcd_rss_idle = rss_bytes(member.pid)
        children: list[Child] = []
        try:
            # 1. registration
            for i in range(p):
                children.append(
                    await Child.start(
                        f"registrant {i}",
                        "--worker",
                        f"--endpoint={member.endpoint}",
                        f"--index={i}",
                        f"--count={per_process}",
                        f"--services={args.services}",
                        f"--ttl={args.ttl}",
                    )
                )
            workers = list(children)
            for w in workers:
                await w.receive()
            t0 = time.perf_counter()
            for w in workers:
                w.send({"cmd": "register"})
            reports = [await w.receive() for w in workers]
            total = time.perf_counter() - t0
            registered = sum(r["registered"] for r in reports)
            rates = [r["registered"] / r["seconds"] for r in reports]
            rows.append(
                (
                    f"register {registered:,} instances of {args.services:,} services "
                    f"from {p} processes",
                    f"{total:.2f} s ({registered / total:,.0f}/s overall)",
                    "start signal -> every process reports all registered; each process "
                    f"registers its {per_process:,} at once (asyncio.gather), one lease each",
                )
            )
            rows.append(
                (
                    "registrations/s per process",
                    f"median {statistics.median(rates):,.0f}/s "
                    f"(min {min(rates):,.0f}, max {max(rates):,.0f})",
                    f"{per_process:,} register() calls / the process's own elapsed time",
                )
            )
            figures["register_seconds"] = round(total, 3)
            figures["register_per_process_per_s"] = round(statistics.median(rates), 1)
            after_registration = Snapshot(member)
            status = member.status()
            db_size = int(status["dbSize"])
            etcd_rss_loaded = rss_bytes(member.pid)

            # 2. warm-up of a fresh client, each in a fresh process
            warms: list[dict[str, Any]] = []
            watcher: Child | None = None
            for r in range(args.warm_repeats):
                child = await Child.start(
                    f"watcher {r}", "--watcher", f"--endpoint={member.endpoint}", f"--expect={n}"
                )
                children.append(child)
                warms.append(await child.receive())
                if r < args.warm_repeats - 1:
                    await child.stop()
                else:
                    watcher = child
            assert watcher is not None
            warm_times = [w["warm_seconds"] for w in warms]
            last = warms[-1]
            rows.append(
                (
                    f"warm a discover_all() cache of {last['instances']:,} instances",
                    f"median {statistics.median(warm_times) * 1000:.0f} ms "
                    f"(min {min(warm_times) * 1000:.0f}, max {max(warm_times) * 1000:.0f})",
                    f"{len(warm_times)} fresh processes; new AsyncClient -> discover_all() -> "
                    "wait_ready() -> all instances held (includes connecting)",
                )
            )
            rows.append(
                (
                    "cache client RSS before / after warm-up",
                    f"{mib(last['rss_before'])} / {mib(last['rss_after'])}",
                    f"+{mib(last['rss_after'] - last['rss_before'])}, "
                    f"{(last['rss_after'] - last['rss_before']) / n:,.0f} bytes/instance "
                    "(VmRSS after gc.collect(); before = imports done, no client yet)",
                )
            )

            figures["warm_ms"] = round(statistics.median(warm_times) * 1000, 1)
            figures["cache_rss_bytes_per_instance"] = round(
                (last["rss_after"] - last["rss_before"]) / n
            )

            # 3. following churn
            watcher.send({"cmd": "follow", "seconds": args.churn_seconds})
            await watcher.receive()
            before_churn = Snapshot(member)
            for w in workers:
                w.send({"cmd": "churn", "rate": args.churn_rate / p, "seconds": args.churn_seconds})
            churned = [await w.receive() for w in workers]
            followed = await watcher.receive()
            after_churn = Snapshot(member)
            updates = sum(c["updates"] for c in churned)
            churn_wall = max(c["seconds"] for c in churned)
            cpu_pct = 100 * followed["cpu_seconds"] / followed["wall_seconds"]
            rows.append(
                (
                    f"cache client following {args.churn_rate:g} updates/s",
                    f"{cpu_pct:.1f}% of one core, RSS {mib(followed['rss'])}",
                    f"over {followed['wall_seconds']:.1f} s; updates made "
                    f"{updates / churn_wall:.1f}/s by the {p} registrants (reg.update())",
                )
            )
            rows.append(
                (
                    "change events seen by that client",
                    f"{followed['events'] / followed['wall_seconds']:.1f}/s",
                    f"{followed['events']:,} events in its window vs {updates:,} updates made; "
                    f"still holds {followed['instances']:,} instances",
                )
            )

            figures["follow_cpu_percent"] = round(cpu_pct, 2)
            figures["events_seen_per_s"] = round(followed["events"] / followed["wall_seconds"], 1)

            # 4. keepalives, as etcd saw them (from registration to the end of churn)
            window = after_churn.at - after_registration.at
            keepalives = after_churn.keepalive_msgs - after_registration.keepalive_msgs
            renewed = after_churn.leases_renewed - after_registration.leases_renewed
            ttl_calls = after_churn.time_to_live - after_registration.time_to_live
            interval = max(args.ttl / 3.0, 0.5)
            rows.append(
                (
                    f"lease keepalives per process (ttl {args.ttl} s)",
                    f"{keepalives / window / p:.3f} msgs/s",
                    f"etcd's grpc_server_msg_received_total{{LeaseKeepAlive}} over {window:.1f} s "
                    f"/ {p} processes (etcd_debugging_lease_renewed_total: "
                    f"{renewed / window / p:.3f}/s); the keeper waits ttl/3 = {interval:.2f} s "
                    f"between ticks -> at most {1 / interval:.3f}/s. The processes tick in step, "
                    f"so the window's edges make this +-{1 / window:.3f}/s",
                )
            )
            rows.append(
                (
                    "LeaseTimeToLive(keys=true) per process",
                    f"{ttl_calls / window / p:.3f} calls/s",
                    f"the keeper's key check after each keepalive; each answer lists all "
                    f"{per_process:,} keys of the lease",
                )
            )
            logged: dict[str, int] = {}
            for w in workers:
                w.send({"cmd": "warnings"})
                for template, count in (await w.receive())["warnings"].items():
                    logged[template] = logged.get(template, 0) + count
            rows.append(
                (
                    "warnings logged by the registrants",
                    f"{sum(logged.values()):,}",
                    "; ".join(f"{c:,} x `{t}`" for t, c in sorted(logged.items())) or "none",
                )
            )
            figures["keepalives_per_process_per_s"] = round(keepalives / window / p, 3)
            figures["ttl"] = args.ttl
            figures["registrant_warnings"] = sum(logged.values())
            churn_window = after_churn.at - before_churn.at
            etcd_cpu = 100 * (after_churn.etcd_cpu - before_churn.etcd_cpu) / churn_window
            puts = (after_churn.puts - before_churn.puts) / churn_window

            # 5. context
            rows.append(
                (
                    "etcd db size after registration",
                    mib(db_size),
                    f"Maintenance.Status dbSize; quota {mib(args.quota_backend_bytes)}"
                    if args.quota_backend_bytes
                    else "Maintenance.Status dbSize (default quota)",
                )
            )
            rows.append(
                (
                    "etcd RSS idle / after registration / after churn",
                    f"{mib(etcd_rss_idle)} / {mib(etcd_rss_loaded)} / {mib(rss_bytes(member.pid))}",
                    "VmRSS of the etcd server process",
                )
            )
            rows.append(
                (
                    "etcd CPU during churn",
                    f"{etcd_cpu:.1f}% of one core",
                    f"{puts:.1f} Put/s handled; single member, WAL on local disk",
                )
            )
        except BaseException:
            for child in children:
                child.kill()
            raise
        finally:
            await asyncio.gather(*(child.stop() for child in children))
    figures.update(instances=n, processes=p, services=args.services)
    return rows, figures


def render(
    args: argparse.Namespace, rows: list[tuple[str, str, str]], figures: dict[str, Any]
) -> str:
    command = command_line("scale.py")
    lines = [
        "## Scale",
        "",
        f"Command: `{command}`; etcd {args.etcd_version}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}. Every process "
        "(etcd, registrants, cache client) shares this machine.",
        "",
        "| measurement | value | notes |",
        "|---|---|---|",
    ]
    lines += [f"| {m} | {v} | {n} |" for m, v, n in rows]
    lines += ["", f"<!-- etcdisco-metrics {json.dumps({'scale': figures})} -->"]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small counts")
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    parser.add_argument("--processes", type=int, help="registrant processes (10; quick 4)")
    parser.add_argument("--instances", type=int, help="instances in all (10000; quick 1000)")
    parser.add_argument("--services", type=int, help="services (1000; quick 100)")
    parser.add_argument("--ttl", type=int, default=10, help="lease ttl of every registration")
    parser.add_argument("--churn-rate", type=float, default=100.0, help="metadata updates/s")
    parser.add_argument("--churn-seconds", type=float, help="churn window (20; quick 3)")
    parser.add_argument("--warm-repeats", type=int, help="fresh cache processes (3; quick 2)")
    parser.add_argument(
        "--quota-backend-bytes", type=int, default=None, help="etcd's quota (default: etcd's)"
    )
    # Child modes, used by the parent only.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--watcher", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = (4, 1000, 100, 3.0, 2) if args.quick else (10, 10_000, 1000, 20.0, 3)
    for name, value in zip(
        ("processes", "instances", "services", "churn_seconds", "warm_repeats"),
        defaults,
        strict=True,
    ):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.instances % args.processes:
        parser.error("--instances must be a multiple of --processes")
    if args.warm_repeats < 1:
        parser.error("--warm-repeats must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        asyncio.run(worker_main(args))
        return
    if args.watcher:
        asyncio.run(watcher_main(args))
        return
    rows, figures = asyncio.run(run(args))
    write_section(render(args, rows, figures), args.out)


if __name__ == "__main__":
    main()
