"""gRPC client paths against real registered servers: throughput, reaction to registry
changes, failed calls during a rolling restart.

    .venv/bin/python benchmarks/bench_grpc.py [--quick] [--out PATH]

Starts its own etcd (the newest found, or $ETCDISCO_ETCD) and three echo servers
(tests/grpc_echo/server.py, one process each, registered and drained by
etcdisco.grpc.aio_serve_registered), then measures, in one run against those servers:

1. unary calls/s and latency of: a plain channel to one server; grpc's own
   ``ipv4:a,b,c`` list with round_robin; ``xds:///echo`` through the embedded control
   plane; etcdisco's balancing channel; each sync (threads) and aio (tasks), each in a
   client process of its own (grpcio reads the xDS bootstrap once per process);
2. the time from a registry change (a server added, drained, SIGKILLed) to the
   routing of clients on the xDS path and on the balancing channels, which all call
   at a paced rate while the orchestrator's own watch timestamps the change;
3. failed/total calls of the same clients during a rolling restart of the three
   servers (SIGTERM and drain, wait for exit, start a replacement, next).

Prints the markdown section, or writes it to --out. The client side is
grpc_bench_client.py. Without --quick it first waits (up to --load-wait seconds) for
the 1-minute load average to fall below --max-load. Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from etcdisco import AsyncClient, ChangeEvent, EventType, Status
from etcdisco.discovery import ServiceCache
from etcdisco.testing import LocalEtcd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import command_line, load_average, pct, write_section  # noqa: E402

from tests.grpc_echo.fleet import EchoProcess, Fleet  # noqa: E402

CLIENT = Path(__file__).with_name("grpc_bench_client.py")
SERVICE = "echo"
CALL_TIMEOUT = 2.0  # the clients' per-call deadline (grpc_bench_client.CALL_TIMEOUT)
LOAD_DELAY = 0.01  # seconds the server waits in each paced call

# One call as a client recorded it: (start, latency, server name or "!" + status code).
Record = tuple[float, float, str]

LABELS = {
    "plain": "plain channel, one server",
    "round_robin": "`ipv4:` list + round_robin",
    "xds": "`xds:///echo`, embedded control plane",
    "xds_no_retry": "`xds:///echo`, route without retries (diagnostic)",
    "balancing": "etcdisco balancing channel",
}
# A measured variant: the client's --path and its extra arguments.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "plain": ("plain", ()),
    "round_robin": ("round_robin", ()),
    "xds": ("xds", ()),
    "xds_no_retry": ("xds", ("--xds-retries=0",)),
    "balancing": ("balancing", ()),
}
THROUGHPUT_PATHS = [(variant, mode) for mode in ("sync", "aio") for variant in VARIANTS]
# The clients that follow the registry, measured together on the same changes.
FOLLOWERS = [("xds", "sync"), ("balancing", "sync"), ("balancing", "aio")]


@dataclass(frozen=True)
class Settings:
    rounds: int
    warmup: float
    duration: float
    cycles: int
    ttl: int
    probe_rate: float
    restart_rate: float
    restarts: int
    sync_callers: int = 4
    aio_callers: int = 16
    # Paced clients wait for the server's LOAD_DELAY in every call: more threads.
    load_sync_callers: int = 12

    @classmethod
    def of(cls, args: argparse.Namespace) -> Settings:
        if args.quick:
            return cls(
                rounds=1,
                warmup=0.2,
                duration=0.6,
                cycles=1,
                ttl=2,
                probe_rate=300,
                restart_rate=args.restart_rate,
                restarts=1,
            )
        return cls(
            rounds=args.rounds,
            warmup=1.0,
            duration=args.duration,
            cycles=args.cycles,
            ttl=5,
            probe_rate=args.probe_rate,
            restart_rate=args.restart_rate,
            restarts=args.restarts,
        )

    def callers(self, mode: str, *, load: bool = False) -> int:
        if mode == "aio":
            return self.aio_callers
        return self.load_sync_callers if load else self.sync_callers


def label(path: str, mode: str) -> str:
    return f"{path}/{mode}"


# ------------------------------------------------------------------------- processes


class ClientProcess:
    """One grpc_bench_client.py process: JSON lines out, JSON commands in."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log

    @classmethod
    async def start(cls, name: str, argv: Sequence[str], log_dir: Path) -> ClientProcess:
        log = log_dir / f"client-{name.replace('/', '-')}.log"
        with log.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(CLIENT),
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                limit=1 << 20,
            )
        return cls(name, proc, log)

    async def line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                raw = await self.proc.stdout.readline()
        except TimeoutError:
            raise RuntimeError(f"{self.name}: no answer in {timeout}s\n{self.tail()}") from None
        if not raw:
            code = await self.proc.wait()
            raise RuntimeError(f"{self.name} exited ({code})\n{self.tail()}")
        return dict(json.loads(raw))

    async def ask(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        await self.proc.stdin.drain()
        return await self.line(timeout)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(CALL_TIMEOUT + 10):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class RegistryLog:
    """Every change of the service as this process's watch saw it, timestamped with
    time.monotonic (on Linux the same clock in every process): the moment of a
    registry change, to within the put -> watch delay (about half a millisecond)."""

    def __init__(self, cache: ServiceCache) -> None:
        self.entries: list[tuple[float, EventType, str, Status]] = []
        self._grew = asyncio.Event()
        cache.add_listener(self._on_events)

    def _on_events(self, events: list[ChangeEvent]) -> None:
        now = time.monotonic()
        for ev in events:
            name = str(ev.instance.metadata.get("name", ""))
            self.entries.append((now, ev.type, name, ev.instance.status))
        self._grew.set()

    async def wait(
        self, name: str, kind: EventType, after: float, timeout: float, status: Status | None = None
    ) -> float:
        """When ``name`` had a ``kind`` change (with ``status``) at or after ``after``."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for at, typ, who, st in self.entries:
                        wanted = who == name and typ is kind and status in (None, st)
                        if at >= after and wanted:
                            return at
                    self._grew.clear()
                    await self._grew.wait()
        except TimeoutError:
            raise RuntimeError(f"no {kind.name} of {name} in the registry in {timeout}s") from None


# ------------------------------------------------------------------------- 1. throughput


async def throughput(s: Settings, where: Where) -> dict[tuple[str, str], list[dict[str, Any]]]:
    results: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in THROUGHPUT_PATHS}
    for rnd in range(s.rounds):
        # Rotate the order so that no path always runs first or right after another.
        shift = rnd * 3 % len(THROUGHPUT_PATHS)
        for variant, mode in THROUGHPUT_PATHS[shift:] + THROUGHPUT_PATHS[:shift]:
            path, extra = VARIANTS[variant]
            argv = [
                "bench",
                f"--path={path}",
                *extra,
                f"--mode={mode}",
                f"--endpoint={where.endpoint}",
                f"--targets={','.join(where.targets)}",
                f"--callers={s.callers(mode)}",
                f"--warmup={s.warmup}",
                f"--duration={s.duration}",
            ]
            client = await ClientProcess.start(label(variant, mode), argv, where.log_dir)
            try:
                summary = await client.line(s.warmup + s.duration + 30)
            finally:
                await client.close()
            results[variant, mode].append(summary)
            print(
                f"  round {rnd + 1} {label(variant, mode):18} {summary['rate']:6.0f} calls/s "
                f"p50 {summary['p50_ms'] or 0:5.2f} ms p99 {summary['p99_ms'] or 0:5.2f} ms "
                f"client CPU {summary['cpu_us_per_call']:4.0f} us/call "
                f"errors {summary['errors']}",
                flush=True,
            )
    return results


def throughput_table(s: Settings, results: dict[tuple[str, str], list[dict[str, Any]]]) -> str:
    def median(key: tuple[str, str], field_: str) -> float:
        values = [r[field_] for r in results[key] if r[field_] is not None]
        return statistics.median(values) if values else float("nan")

    rows = [
        "| path | client | callers | calls/s | vs plain | p50 | p99 | client CPU per call "
        "| vs plain | failed calls |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in THROUGHPUT_PATHS:
        variant, mode = key
        rate, cpu = median(key, "rate"), median(key, "cpu_us_per_call")
        plain = ("plain", mode)
        errors = sum(r["errors"] for r in results[key])
        calls = sum(r["calls"] for r in results[key])
        rows.append(
            f"| {LABELS[variant]} | {mode} | {s.callers(mode)} | {rate:,.0f} | "
            f"{rate / median(plain, 'rate'):.2f} | {median(key, 'p50_ms'):.2f} ms | "
            f"{median(key, 'p99_ms'):.2f} ms | {cpu:.0f} us | "
            f"{cpu / median(plain, 'cpu_us_per_call'):.2f} | {errors}/{calls} |"
        )
    return "\n".join(rows)


# ------------------------------------------------------------------------- 2 + 3. changes


@dataclass
class Change:
    kind: str  # "add", "drain" or "crash"
    name: str
    at: float  # the registry change (add, drain) or the SIGKILL (crash)
    until: float  # the key deleted (drain, crash); = at for an add


@dataclass
class Session:
    """The paced clients and what happened to the registry while they ran."""

    clients: dict[str, ClientProcess] = field(default_factory=dict)
    traces: dict[str, Path] = field(default_factory=dict)
    records: dict[str, list[Record]] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    restarts: list[tuple[float, float]] = field(default_factory=list)  # (first SIGTERM, done)
    cycle_drains: list[dict[str, Any]] = field(default_factory=list)
    restart_drains: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Where:
    """What a client process needs to find the servers, and where its files go."""

    endpoint: str
    targets: tuple[str, ...]
    log_dir: Path


async def start_load(
    session: Session, s: Settings, where: Where, path: str, mode: str, rate: float
) -> ClientProcess:
    name = label(path, mode)
    trace = where.log_dir / f"trace-{path}-{mode}.json"
    argv = [
        "load",
        f"--path={path}",
        f"--mode={mode}",
        f"--endpoint={where.endpoint}",
        f"--targets={','.join(where.targets)}",
        f"--callers={s.callers(mode, load=True)}",
        f"--rate={rate}",
        f"--delay={LOAD_DELAY}",
        f"--trace={trace}",
        "--max-seconds=900",
    ]
    client = await ClientProcess.start(name, argv, where.log_dir)
    session.clients[name] = client
    session.traces[name] = trace
    ready = await client.line(30)
    assert ready.get("ready"), ready
    return client


async def wait_served(
    clients: Iterable[ClientProcess], name: str, after: float, timeout: float = 10.0
) -> None:
    async def one(client: ClientProcess) -> None:
        command = {"op": "wait_served", "name": name, "after": after, "timeout": timeout}
        answer = await client.ask(command, timeout + 5)
        if not answer["ok"]:
            raise RuntimeError(f"{client.name}: {name} answered no call within {timeout}s")

    await asyncio.gather(*(one(c) for c in clients))


async def add_server(
    fleet: Fleet, log: RegistryLog, followers: list[ClientProcess], name: str, s: Settings
) -> tuple[EchoProcess, float]:
    mark = time.monotonic()
    (proc,) = await asyncio.to_thread(fleet.start, name, extra=("--ttl", str(s.ttl)))
    added = await log.wait(name, EventType.ADDED, mark, 15)
    await wait_served(followers, name, added - 1.0)
    return proc, added


async def route_changes(
    session: Session, s: Settings, fleet: Fleet, log: RegistryLog, followers: list[ClientProcess]
) -> None:
    for cycle in range(1, s.cycles + 1):
        name = f"d{cycle}"
        proc, added = await add_server(fleet, log, followers, name, s)
        session.changes.append(Change("add", name, added, added))
        mark = time.monotonic()
        report = asyncio.create_task(asyncio.to_thread(proc.terminate))
        try:
            draining = await log.wait(name, EventType.UPDATED, mark, 10, Status.DRAINING)
            removed = await log.wait(name, EventType.REMOVED, mark, 20)
        finally:
            session.cycle_drains.append(await report)
        session.changes.append(Change("drain", name, draining, removed))

        name = f"k{cycle}"
        proc, added = await add_server(fleet, log, followers, name, s)
        session.changes.append(Change("add", name, added, added))
        # Let every client send it a few calls, as to any server that has been up a while.
        await wait_served(followers, name, time.monotonic())
        killed = time.monotonic()
        await asyncio.to_thread(proc.kill)
        expired = await log.wait(name, EventType.REMOVED, killed, 3 * s.ttl + 10)
        session.changes.append(Change("crash", name, killed, expired))
        print(f"  cycle {cycle}: add, drain, add, crash done", flush=True)


async def rolling_restart(
    session: Session,
    fleet: Fleet,
    log: RegistryLog,
    followers: list[ClientProcess],
    olds: list[EchoProcess],
    s: Settings,
) -> None:
    for round_ in range(1, s.restarts + 1):
        begin, news = time.monotonic(), []
        for n, old in enumerate(olds, 1):
            session.restart_drains.append(await asyncio.to_thread(old.terminate))
            new, _ = await add_server(fleet, log, followers, f"r{round_}.{n}", s)
            news.append(new)
        session.restarts.append((begin, time.monotonic()))
        olds = news
        print(f"  rolling restart {round_} done", flush=True)


def read_trace(path: Path) -> list[Record]:
    records = [(float(a), float(b), str(c)) for a, b, c in json.loads(path.read_text())]
    records.sort()
    return records


def failed(record: Record) -> bool:
    return record[2].startswith("!")


@dataclass
class Reaction:
    """How one client's routing followed the registry changes (milliseconds)."""

    add: list[float] = field(default_factory=list)
    drain: list[float] = field(default_factory=list)
    after_drain: int = 0
    drain_failed: int = 0
    crash_failed: int = 0
    crash_slowest: list[float] = field(default_factory=list)
    crash_in_flight: int = 0


def reaction(records: list[Record], changes: list[Change]) -> Reaction:
    """add: registered -> the first call the new server answered. drain: `draining`
    -> the last call sent to it (0 when none was sent after), and how many were.
    crash: the failed calls, and the slowest call in flight at the SIGKILL (a call
    the dead server held fails over to another one, or fails)."""
    out = Reaction()
    for ch in changes:
        to_it = [r[0] for r in records if r[2] == ch.name]
        if ch.kind == "add" and to_it:
            out.add.append((to_it[0] - ch.at) * 1000)
        elif ch.kind == "drain":
            after = [t for t in to_it if t > ch.at]
            out.drain.append((after[-1] - ch.at) * 1000 if after else 0.0)
            out.after_drain += len(after)
            out.drain_failed += sum(1 for r in records if failed(r) and ch.at <= r[0] <= ch.until)
        elif ch.kind == "crash":
            window = [r for r in records if ch.at - CALL_TIMEOUT <= r[0] <= ch.until]
            out.crash_failed += sum(1 for r in window if failed(r))
            in_flight = [r[1] * 1000 for r in window if r[0] <= ch.at <= r[0] + r[1]]
            out.crash_in_flight += len(in_flight)
            if in_flight:
                out.crash_slowest.append(max(in_flight))
    return out


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} / {max(values):.1f}"


def changes_table(session: Session, s: Settings) -> str:
    rows = [
        "| path | client | added: registered -> first call to it | drained: `draining` -> "
        "last call to it (calls sent after) | SIGKILL: slowest call in flight (calls "
        "in flight) | "
        "failed calls (drain / crash) | p50 / p99 latency |",
        "|---|---|---|---|---|---|---|",
    ]
    for path, mode in FOLLOWERS:
        records = session.records[label(path, mode)]
        r = reaction(records, session.changes)
        latencies = [x[1] * 1000 for x in records if not failed(x)]
        rows.append(
            f"| {LABELS[path]} | {mode} | {spread(r.add)} ms | {spread(r.drain)} ms "
            f"({r.after_drain}) | {spread(r.crash_slowest)} ms ({r.crash_in_flight}) | "
            f"{r.drain_failed} / {r.crash_failed} | "
            f"{pct(latencies, 0.5):.1f} / {pct(latencies, 0.99):.1f} ms |"
        )
    drains = [(c.until - c.at) * 1000 for c in session.changes if c.kind == "drain"]
    crashes = [c.until - c.at for c in session.changes if c.kind == "crash"]
    adds = sum(1 for c in session.changes if c.kind == "add")
    rows += [
        "",
        f"Times are median / max over {adds} adds, {len(drains)} drain(s) and "
        f"{len(crashes)} crash(es). SIGKILL: the slowest of the calls in flight on any "
        f"server when it was sent; one the dead server held is retried elsewhere or fails. "
        f"Every client offered {s.probe_rate:.0f} calls/s "
        f"({s.callers('sync', load=True)} threads or {s.callers('aio')} tasks; the server waits "
        f"{LOAD_DELAY * 1000:.0f} ms in each call, so calls are in flight when a server "
        f"dies) spread over 3-4 servers: one server gets a call about every "
        f"{4 / s.probe_rate * 1000:.0f} ms, the resolution of the first two columns. "
        f"Registry side: `draining` -> key deleted {spread(drains)} ms (the server's quiet "
        f"period is 0.3 s; {sum(1 for d in session.cycle_drains if d.get('quiet'))}/"
        f"{len(session.cycle_drains)} drains quiet); SIGKILL -> lease expired (TTL {s.ttl} s) "
        f"{statistics.median(crashes) if crashes else 0:.2f} s median.",
    ]
    return "\n".join(rows)


def restart_table(session: Session, s: Settings) -> str:
    rows = [
        "| path | client | failed / total | failed per restart | replacements that answered |",
        "|---|---|---|---|---|",
    ]
    for path, mode in FOLLOWERS:
        records = session.records[label(path, mode)]
        windows = [[r for r in records if a <= r[0] <= b] for a, b in session.restarts]
        calls = [r for window in windows for r in window]
        bad = Counter(r[2][1:] for r in calls if failed(r))
        codes = f" ({', '.join(f'{c} {n}' for c, n in bad.most_common())})" if bad else ""
        per_restart = ", ".join(str(sum(1 for r in w if failed(r))) for w in windows)
        replacements = {r[2] for r in calls if r[2].startswith("r")}
        rows.append(
            f"| {LABELS[path]} | {mode} | {bad.total()}/{len(calls)}{codes} | {per_restart} | "
            f"{len(replacements)}/{3 * len(session.restarts)} |"
        )
    quiet = sum(1 for d in session.restart_drains if d.get("quiet"))
    seconds = ", ".join(f"{b - a:.1f}" for a, b in session.restarts)
    rows += [
        "",
        f"{len(session.restarts)} rolling restart(s), each replacing the 3 servers one by "
        f"one; windows of {seconds} s (first SIGTERM to the last replacement answering "
        f"every client). Offered load: {s.restart_rate:.0f} calls/s per client, paced, "
        f"all three clients at once. {quiet}/{len(session.restart_drains)} drains were quiet "
        f"(no call arrived in the server's quiet period).",
    ]
    return "\n".join(rows)


async def stop_clients(session: Session) -> None:
    """Stop every paced client and read what it recorded."""
    for name, client in session.clients.items():
        stopped = await client.ask({"op": "stop"}, CALL_TIMEOUT + 30)
        assert stopped.get("stopped"), stopped
        await client.close()
        session.records[name] = read_trace(session.traces[name])


# ------------------------------------------------------------------------- main


def header(args: argparse.Namespace, etcd_version: str, load: float) -> str:
    command = command_line("bench_grpc.py")
    return (
        f"{os.cpu_count()} cores, 1-min load average {load:.2f} before the run (the run "
        f"itself keeps the cores busy), etcd {etcd_version}, grpcio {grpc.__version__}, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}; "
        f"command: `{command}`{' (smoke run: too short to read much into)' if args.quick else ''}"
    )


async def wait_for_quiet_machine(max_load: float, limit: float) -> None:
    deadline = time.monotonic() + limit
    while (load := load_average()) >= max_load and time.monotonic() < deadline:
        print(f"  1-min load {load:.2f} >= {max_load}: waiting", flush=True)
        await asyncio.sleep(min(15.0, max(0.0, deadline - time.monotonic())))


async def run(args: argparse.Namespace) -> str:
    s = Settings.of(args)
    if not args.quick and args.load_wait > 0:
        await wait_for_quiet_machine(args.max_load, args.load_wait)
    load = load_average()
    with (
        tempfile.TemporaryDirectory(prefix="bench-grpc-") as tmp,
        LocalEtcd() as etcd,  # started on entry
    ):
        log_dir = Path(tmp)
        fleet = Fleet(etcd.endpoint, log_dir)
        session = Session()
        try:
            print("starting 3 echo servers", flush=True)
            extra = ("--ttl", str(s.ttl))
            olds = await asyncio.to_thread(fleet.start, "s1", "s2", "s3", extra=extra)
            where = Where(etcd.endpoint, tuple(p.address for p in olds), log_dir)

            print("1. throughput", flush=True)
            results = await throughput(s, where)

            async with AsyncClient(etcd.endpoint) as client, client.discover(SERVICE) as cache:
                await cache.wait_ready(10)
                log = RegistryLog(cache)
                print("2. registry changes", flush=True)
                for path, mode in FOLLOWERS:
                    await start_load(session, s, where, path, mode, s.probe_rate)
                followers = list(session.clients.values())
                for p in olds:
                    await wait_served(followers, p.name, 0.0, 15)
                await route_changes(session, s, fleet, log, followers)

                print("3. rolling restart", flush=True)
                for follower in followers:
                    await follower.ask({"op": "rate", "value": s.restart_rate}, 5)
                await rolling_restart(session, fleet, log, followers, olds, s)
                await stop_clients(session)
        except BaseException:
            for p in fleet.procs:
                if p.proc.poll() is not None and p.proc.returncode not in (0, -9):
                    print(f"--- {p.name} log\n{p.log_tail()}", file=sys.stderr)
            raise
        finally:
            for c in session.clients.values():
                await c.close()
            await asyncio.to_thread(fleet.close)
        etcd_version = etcd.version
    return "\n".join(
        [
            "## gRPC client paths",
            "",
            header(args, etcd_version, load),
            "",
            "Servers: 3 echo servers (tests/grpc_echo/server.py, grpc.aio, one process each) "
            "registered and drained by etcdisco.grpc.aio_serve_registered. Every client runs "
            "in a process of its own; the balancing channels are created with "
            "`idempotent=True`, like the xDS route's retry on UNAVAILABLE.",
            "",
            "### 1. Unary throughput (one small message each way)",
            "",
            f"Calls as fast as the callers go (sync: threads, aio: tasks), {s.rounds} round(s) "
            f"of {s.duration:g} s after {s.warmup:g} s of warm-up, path order rotated per "
            "round; median of the rounds. `vs plain`: over the plain channel's number in the "
            "same client flavour. The plain channel loads one server process, the others "
            "spread over three, so calls/s also says how busy the servers were; the client "
            "CPU per call (the client process's CPU time, every thread, over its calls) is "
            "the path's own cost.",
            "",
            throughput_table(s, results),
            "",
            "### 2. Registry change -> client routing",
            "",
            "The three clients below run together at a paced rate; each records which "
            "server answered every call and when it started. The change is timestamped "
            "by this script's own watch of the registry (the SIGKILL: when it was sent).",
            "",
            changes_table(session, s),
            "",
            "### 3. Rolling restart of the 3 servers",
            "",
            "SIGTERM (the helper drains: NOT_SERVING and `draining`, quiet period, "
            "deregister, stop), wait for its exit, start a replacement, wait until it is "
            "registered and answers every discovery client, next.",
            "",
            restart_table(session, s),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--cycles", type=int, default=3, help="add/drain/add/crash cycles")
    parser.add_argument("--probe-rate", type=float, default=500, help="calls/s per client in 2")
    parser.add_argument("--restarts", type=int, default=3, help="rolling restarts in 3")
    parser.add_argument("--restart-rate", type=float, default=200, help="calls/s per client in 3")
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a lower load")
    parser.add_argument("--load-wait", type=float, default=600, help="at most this long")
    args = parser.parse_args()
    write_section(asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
