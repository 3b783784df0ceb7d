"""Register -> visible in K other processes, beside two raw etcd floors; crash -> vanish.

    .venv/bin/python benchmarks/propagation.py [--quick] [--out PATH]
        [--watchers 1,10,100] [--samples 100] [--crash-ttls 2,5] [--crash-samples 3]

Starts its own etcd (the newest found, or $ETCDISCO_ETCD). For each K it starts, in
parallel, K watcher processes (propagation_watcher.py: an AsyncClient with a
`discover()` cache, plus a bare `EtcdClient` watch on its own connection) and K
`etcdctl watch --prefix` processes (the etcdctl shipped with that etcd), waits until
every one of them is ready and idle, then takes samples. A sample writes to one path
and waits until all K processes of that path have reported it before the next write,
so the numbers are latency, not queueing:

- etcdisco: `register()` returns in this process -> the instance is in each cache;
- floor, thin client: `put()` returns -> the watch event is decoded in each process;
- floor, etcdctl: `put()` returns -> this process reads the key line from each etcdctl.

The three paths watch disjoint key ranges, take turns within a sample (the order
rotates) and run against the same processes at the same time, so a busy machine
weighs on all three alike. Then SIGKILL of a registered process -> gone from a cache,
against the lease TTL. Prints the markdown section, or writes it to --out.
Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _common import command_line, load_average, pct, write_section

from etcdisco import AsyncClient, EventType
from etcdisco.etcd import EtcdClient
from etcdisco.testing import LocalEtcd, die_with_parent

ROOT = Path(__file__).resolve().parents[1]
WATCHER = Path(__file__).with_name("propagation_watcher.py")
SERVICE = "bench"
FLOOR_PREFIX = "floor/"  # the watchers' bare EtcdClient watch
CTL_PREFIX = "ctl/"  # the etcdctl processes' watch
PATHS = ("etcdisco", "thin", "etcdctl")
KEY_PREFIX = {"etcdisco": f"services/{SERVICE}/", "thin": FLOOR_PREFIX, "etcdctl": CTL_PREFIX}
PATH_LABELS = {
    "etcdisco": "etcdisco: `register()` -> in the `discover()` cache",
    "thin": "floor: `put()` -> event, etcdisco.etcd.EtcdClient watch",
    "etcdctl": "floor: `put()` -> event, `etcdctl watch --prefix`",
}
# Every process's time.perf_counter() is clock_gettime(CLOCK_MONOTONIC) on Linux (the
# watchers report their implementation and the run stops if it differs). That clock
# is one system-wide counter since boot, not a per-process one, so a time taken in a
# watcher minus a time taken here is a duration.
CLOCK = "clock_gettime(CLOCK_MONOTONIC)"


# ------------------------------------------------------------------ watched processes


@dataclass(eq=False)
class Watched:
    """One process whose stdout says when it saw each key."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    stamps_itself: bool  # our watcher prints its own time; etcdctl is timed on read
    seen: dict[str, float] = field(default_factory=dict)
    ready: bool = False
    clock: str = ""
    ended: bool = False
    _rest: bytes = b""

    @property
    def fd(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def feed(self, chunk: bytes, now: float) -> None:
        *lines, self._rest = (self._rest + chunk).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            if self.stamps_itself:
                kind, _, rest = line.partition(" ")
                if kind == "R":
                    self.ready, self.clock = True, rest
                elif kind == "E":
                    key, _, stamp = rest.rpartition(" ")
                    self.seen.setdefault(key, float(stamp))
            elif line.startswith(CTL_PREFIX):
                # etcdctl prints PUT, the key and the value on three lines per event.
                self.seen.setdefault(line, now)

    def has_warmup(self, prefix: str) -> bool:
        return any(key.startswith(prefix) and "warm" in key for key in self.seen)


class Fleet:
    """Starts the watched processes, reads their stdout, and stops every one of them."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.members: list[Watched] = []
        self._selector = selectors.DefaultSelector()

    def _spawn(self, name: str, argv: list[str], stamps_itself: bool) -> Watched:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(
                die_with_parent(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env={**os.environ, "ETCDCTL_API": "3"},
            )
        member = Watched(name, proc, log, stamps_itself)
        self.members.append(member)
        os.set_blocking(member.fd, False)
        self._selector.register(member.fd, selectors.EVENT_READ, member)
        return member

    def start_watchers(self, endpoint: str, k: int) -> list[Watched]:
        argv = [sys.executable, str(WATCHER), endpoint, SERVICE, FLOOR_PREFIX]
        return [self._spawn(f"watcher-{n}", argv, True) for n in range(k)]

    def start_etcdctl(self, etcdctl: Path, endpoint: str, k: int) -> list[Watched]:
        argv = [str(etcdctl), "--endpoints", endpoint, "watch", "--prefix", CTL_PREFIX]
        return [self._spawn(f"etcdctl-{n}", argv, False) for n in range(k)]

    def pump(
        self, members: Sequence[Watched], done: Callable[[], bool], timeout: float, what: str
    ) -> None:
        """Read every process's output until done() (blocking: the caller has nothing
        else to do meanwhile, and a blocked event loop cannot delay the reading)."""
        deadline = time.perf_counter() + timeout
        while not done():
            ended = [m for m in members if m.ended]
            if ended:
                tails = "\n".join(f"--- {m.name}\n{m.log.read_text()[-2000:]}" for m in ended)
                raise RuntimeError(f"{len(ended)} process(es) ended while {what}\n{tails}")
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                missing = sum(1 for m in members if m.proc.poll() is None)
                raise TimeoutError(f"{what}: not done after {timeout:.0f} s ({missing} alive)")
            ready = self._selector.select(remaining)
            # Everything in this batch was readable by now: one stamp for all of them,
            # so the order they are read in does not add to the later ones.
            now = time.perf_counter()
            for key, _ in ready:
                member: Watched = key.data
                try:
                    chunk = os.read(member.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if chunk:
                    member.feed(chunk, now)
                else:
                    member.ended = True
                    self._selector.unregister(member.fd)

    def cpu_seconds(self) -> float:
        total = 0
        for m in self.members:
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{m.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime
        return total / os.sysconf("SC_CLK_TCK")

    def close(self, timeout: float = 15.0) -> None:
        # Our watchers leave when stdin closes (closing their clients); etcdctl on TERM.
        for m in self.members:
            if m.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    m.proc.stdin.close()
            if not m.stamps_itself and m.proc.poll() is None:
                m.proc.terminate()
        deadline = time.monotonic() + timeout
        for m in self.members:
            with contextlib.suppress(subprocess.TimeoutExpired):
                m.proc.wait(max(0.0, deadline - time.monotonic()))
        for m in self.members:
            if m.proc.poll() is None:
                m.proc.kill()
                m.proc.wait()
            if m.proc.stdout is not None:
                m.proc.stdout.close()
        self._selector.close()
        self.members.clear()


# --------------------------------------------------------------------- measurement


@dataclass
class PathResult:
    per_sample: list[list[float]] = field(default_factory=list)  # ms, one per watcher
    call_ms: list[float] = field(default_factory=list)  # the register()/put() call itself
    # The slowest watcher, from the call's return: etcd answers the writer and notifies
    # the watchers at the same moment, so this is about zero, and negative when the
    # watchers are quicker than the writer's own reply.
    after_return_ms: list[float] = field(default_factory=list)

    @property
    def pairs(self) -> list[float]:
        return [v for sample in self.per_sample for v in sample]

    @property
    def all_k(self) -> list[float]:
        return [max(sample) for sample in self.per_sample]


@dataclass
class KResult:
    k: int
    paths: dict[str, PathResult]
    ready_s: float
    idle: str


async def wait_idle(fleet: Fleet, limit: float) -> str:
    """Wait until the watched processes together use under 10% of one core."""
    deadline = time.monotonic() + limit
    while True:
        before = fleet.cpu_seconds()
        await asyncio.sleep(0.5)
        busy = (fleet.cpu_seconds() - before) / 0.5
        if busy < 0.1:
            return f"idle ({busy:.0%} of a core)"
        if time.monotonic() > deadline:
            return f"NOT idle after {limit:.0f} s ({busy:.0%} of a core)"


async def measure_k(
    endpoint: str, etcdctl: Path, k: int, samples: int, warm: int, log_dir: Path
) -> KResult:
    fleet = Fleet(log_dir)
    try:
        started = time.perf_counter()
        watchers = fleet.start_watchers(endpoint, k)
        ctls = fleet.start_etcdctl(etcdctl, endpoint, k)
        await asyncio.to_thread(
            fleet.pump,
            watchers,
            lambda: all(m.ready for m in watchers),
            60 + 1.5 * k,
            f"waiting for {k} watcher(s) to open",
        )
        clocks = {m.clock for m in watchers}
        if clocks != {CLOCK} or time.get_clock_info("perf_counter").implementation != CLOCK:
            raise RuntimeError(f"perf_counter is not {CLOCK} everywhere: {clocks}")
        groups = {"etcdisco": watchers, "thin": watchers, "etcdctl": ctls}
        result = {path: PathResult() for path in PATHS}
        async with AsyncClient(endpoint) as server, EtcdClient(endpoint) as writer:
            server_regs: list[object] = []

            async def write(path: str, name: str) -> tuple[str, float, float]:
                t_call = time.perf_counter()
                if path == "etcdisco":
                    reg = await server.register(
                        SERVICE, f"127.0.0.1:{20000 + len(server_regs)}", instance_id=name, ttl=30
                    )
                    server_regs.append(reg)
                    key = reg.key
                else:
                    key = f"{FLOOR_PREFIX if path == 'thin' else CTL_PREFIX}{name}"
                    await writer.put(key, "x")
                return key, t_call, time.perf_counter()

            # etcdctl says nothing when its watch is open: it is ready once it has
            # printed a put. Write until every process of each path has seen one.
            for path in PATHS:
                group, prefix = groups[path], KEY_PREFIX[path]

                def all_warm(group: list[Watched] = group, prefix: str = prefix) -> bool:
                    return all(m.has_warmup(prefix) for m in group)

                for n in range(int(60 + 1.5 * k) * 4):
                    await write(path, f"k{k}-warm{n}")
                    with contextlib.suppress(TimeoutError):
                        fleet.pump(group, all_warm, 0.25, "")
                    if all_warm():
                        break
                else:
                    raise TimeoutError(f"{path}: some processes never saw a warm-up write")
            ready_s = time.perf_counter() - started
            idle = await wait_idle(fleet, 30)
            for i in range(warm + samples):
                for j in range(len(PATHS)):
                    path = PATHS[(i + j) % len(PATHS)]
                    group = groups[path]
                    key, t_call, t_return = await write(path, f"k{k}-s{i}")
                    fleet.pump(
                        group,
                        lambda g=group, key=key: all(key in m.seen for m in g),
                        15,
                        f"waiting for {key} in {k} process(es)",
                    )
                    if i >= warm:
                        seen = [m.seen[key] for m in group]
                        pr = result[path]
                        pr.per_sample.append([(t - t_call) * 1e3 for t in seen])
                        pr.call_ms.append((t_return - t_call) * 1e3)
                        pr.after_return_ms.append((max(seen) - t_return) * 1e3)
                    # Let the processes finish what follows their report before the
                    # next write (and this loop serve its own connections).
                    await asyncio.sleep(0.005)
        return KResult(k, result, ready_s, idle)
    finally:
        await asyncio.to_thread(fleet.close)


BYSTANDERS = 5


async def crash_to_vanish(endpoint: str, ttl: int, samples: int) -> list[float]:
    """One registrant process of a live fleet is SIGKILLed: how long until caches drop it.

    The fleet (BYSTANDERS instances that stay) keeps each crash a small share of the
    service, as in production, so the cache's mass-expiry protection (which holds
    instances when more than half of a service expires at once) stays out of it.
    """
    out = []
    service = f"crash{ttl}"
    async with (
        AsyncClient(endpoint) as client,
        AsyncClient(endpoint) as fleet,
        client.discover(service) as cache,
    ):
        for n in range(BYSTANDERS):
            await fleet.register(service, f"127.0.0.1:{31000 + n}", ttl=ttl)
        await cache.wait_ready(5)
        events = cache.events()
        for i in range(samples):
            address = f"127.0.0.1:{30000 + i}"
            argv = [sys.executable, "-m", "etcdisco", "--endpoints", endpoint]
            argv += ["register", service, address, "--ttl", str(ttl)]
            proc = subprocess.Popen(die_with_parent(argv), stdout=subprocess.DEVNULL)
            try:
                async with asyncio.timeout(30):
                    while not any(inst.address == address for inst in cache.instances()):
                        await anext(events)
                # Let the lease be refreshed at least once, as in a long-running process.
                await asyncio.sleep(ttl / 2)
                proc.send_signal(signal.SIGKILL)
                t0 = time.perf_counter()
                async with asyncio.timeout(ttl * 3 + 10):
                    while True:
                        ev = await anext(events)
                        if ev.type is EventType.REMOVED and ev.instance.address == address:
                            break
                out.append(time.perf_counter() - t0)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
    return out


# ------------------------------------------------------------------------- report


def ms(value: float) -> str:
    return f"{value:.2f} ms"


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def section(
    args: argparse.Namespace,
    version: str,
    load: float,
    results: list[KResult],
    crashes: dict[int, list[float]],
) -> str:
    command = command_line("propagation.py")
    smoke = " (smoke run: too few samples to read much into)" if args.quick else ""
    lines = [
        "## Propagation: register -> visible in K processes; crash -> vanish",
        "",
        f"Command: `{command}`{smoke} - etcd {version}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, 1-min load {load:.2f} before, "
        f"{time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        "From the start of the write in this process (`register()` for etcdisco, `put()` "
        "for the floors) to the change being seen in each of K other processes, all on one "
        "machine (every process's `time.perf_counter()` is the system-wide "
        "CLOCK_MONOTONIC). Per watcher: over every (watcher, sample) pair; all K: the "
        "slowest watcher of each sample, over the samples. K watcher processes (each an "
        "AsyncClient with a `discover()` cache and a bare EtcdClient watch) and K etcdctl "
        "processes run at once; the three paths watch disjoint keys and take turns, each "
        "write waiting until every process of its path reported the previous one. The "
        "etcdctl floor is timed when this process reads the key line from the pipe. Timed "
        "from the call's return instead (last column), it is about zero: etcd answers the "
        "writer and notifies the watchers at the same moment, so a watcher often has the "
        "change before the writer has its reply.",
        "",
        "| K | path | samples | per watcher p50 | p99 | all K p50 | all K p99 "
        "| the write call p50 | all K p50 from the call's return |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for path in PATHS:
            pr = r.paths[path]
            pairs, all_k = pr.pairs, pr.all_k
            lines.append(
                f"| {r.k} | {PATH_LABELS[path]} | {len(pr.per_sample)} | {ms(pct(pairs, 0.5))} "
                f"| {ms(pct(pairs, 0.99))} | {ms(pct(all_k, 0.5))} | {ms(pct(all_k, 0.99))} "
                f"| {ms(pct(pr.call_ms, 0.5))} | {ms(pct(pr.after_return_ms, 0.5))} |"
            )
    lines += [
        "",
        "etcdisco over each floor (p50 / p99):",
        "",
        "| K | per watcher, vs thin client | per watcher, vs etcdctl | all K, vs thin client "
        "| all K, vs etcdctl | watchers ready in |",
        "|---|---|---|---|---|---|",
    ]
    metrics: dict[str, dict[str, float]] = {}
    for r in results:
        own = r.paths["etcdisco"]
        cells = []
        for values in (lambda p: p.pairs, lambda p: p.all_k):
            for floor in ("thin", "etcdctl"):
                fl = r.paths[floor]
                r50 = ratio(pct(values(own), 0.5), pct(values(fl), 0.5))
                r99 = ratio(pct(values(own), 0.99), pct(values(fl), 0.99))
                cells.append(f"{r50:.2f} / {r99:.2f}")
        lines.append(f"| {r.k} | {' | '.join(cells)} | {r.ready_s:.1f} s, then {r.idle} |")
        metrics[str(r.k)] = {
            f"{path}_p50_ms": round(pct(r.paths[path].pairs, 0.5), 4) for path in PATHS
        } | {f"{path}_p99_ms": round(pct(r.paths[path].pairs, 0.99), 4) for path in PATHS}
        metrics[str(r.k)] |= {
            f"{path}_all_k_p50_ms": round(pct(r.paths[path].all_k, 0.5), 4) for path in PATHS
        }
    lines += [
        "",
        "| crash | samples | median | max |",
        "|---|---|---|---|",
    ]
    for ttl, values in crashes.items():
        lines.append(
            f"| SIGKILL of a registered process -> gone from a cache, ttl {ttl} s | "
            f"{len(values)} | {pct(values, 0.5):.2f} s | {max(values):.2f} s |"
        )
    lines += [
        "",
        f"A registrant process (`etcdisco register`) among {BYSTANDERS} live instances of "
        "its service is SIGKILLed half a TTL after it registered; timed until the REMOVED "
        "event in another client's cache. The lease expires between TTL - (time since the "
        "last keepalive) and TTL after the kill; etcd's expiry check adds up to about half "
        "a second.",
        "",
        f"<!-- etcdisco-metrics {json.dumps({'propagation': metrics})} -->",
        "",
    ]
    return "\n".join(lines)


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


async def run(args: argparse.Namespace) -> str:
    load = load_average()
    with (
        tempfile.TemporaryDirectory(prefix="bench-propagation-") as tmp,
        LocalEtcd() as member,  # started on entry
    ):
        results = []
        for k in args.watchers:
            print(f"K={k}: starting {k} watcher and {k} etcdctl processes", file=sys.stderr)
            r = await measure_k(
                member.endpoint, member.etcdctl_path, k, args.samples, args.warm, Path(tmp)
            )
            print(f"K={k}: done ({r.idle})", file=sys.stderr, flush=True)
            results.append(r)
        crashes = {}
        for ttl in args.crash_ttls:
            print(f"crash -> vanish, ttl {ttl}", file=sys.stderr, flush=True)
            crashes[ttl] = await crash_to_vanish(member.endpoint, ttl, args.crash_samples)
        version = member.version
    return section(args, version, load, results, crashes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: K=1,5, few samples")
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    parser.add_argument("--watchers", type=int_list, help="K values, comma separated")
    parser.add_argument("--samples", type=int, help="samples per K and path")
    parser.add_argument("--warm", type=int, help="samples per K and path not counted")
    parser.add_argument("--crash-ttls", type=int_list, help="lease TTLs for crash -> vanish")
    parser.add_argument("--crash-samples", type=int, help="crashes per TTL")
    args = parser.parse_args()
    defaults = (
        {"watchers": [1, 5], "samples": 10, "warm": 2, "crash_ttls": [2], "crash_samples": 1}
        if args.quick
        else {"watchers": [1, 10, 100], "samples": 100, "warm": 5}
        | {"crash_ttls": [2, 5], "crash_samples": 3}
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    write_section(asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
