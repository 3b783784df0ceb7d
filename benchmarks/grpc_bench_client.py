"""One gRPC client of bench_grpc.py, in a process of its own.

grpcio reads the xDS bootstrap once per process, so every client path runs in a
process like this one; bench_grpc.py starts it and reads its JSON lines.

    grpc_bench_client.py bench --path P --mode sync|aio --callers N --duration S ...
        calls as fast as N callers can for warmup + duration seconds, prints one summary.
    grpc_bench_client.py load --path P --mode sync|aio --callers N --rate R --trace FILE ...
        calls at R calls/s (all callers together) until told to stop on stdin, where it
        takes one JSON command a line and answers each with one JSON line:
          {"op": "wait_served", "name": X, "after": T, "timeout": S}  a call started at
              or after T (time.monotonic, shared by the processes of one machine) was
              answered by server X; answers {"ok": bool, "at": T0 or null}
          {"op": "rate", "value": R}                                 change the rate
          {"op": "stop"}                                             stop, write FILE
        FILE holds every call as [start (monotonic), latency (s), server or "!CODE"].

Paths: plain (a channel to the first --targets address), round_robin (grpc's own
``ipv4:`` list with the round_robin policy), xds (``xds:///echo`` through a control
plane embedded in this process), balancing (etcdisco's balancing channel).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

import etcdisco
import etcdisco.grpc
from etcdisco.grpc.xds import install, start_embedded

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.grpc_echo import echo_pb2, echo_pb2_grpc  # noqa: E402

SERVICE = "echo"
CALL_TIMEOUT = 2.0
ROUND_ROBIN_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
POLL = 0.005
PATHS = ("plain", "round_robin", "xds", "balancing")
MAX_COMMANDS = 100_000

# One call: (start, latency, server name or "!" + status code name).
Record = tuple[float, float, str]


def say(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


class Pace:
    """Seconds between two calls of one caller (0: as fast as it can); all callers
    together offer ``rate`` calls/s. Read by the callers on every call, so a change
    takes effect at once."""

    def __init__(self, callers: int, rate: float) -> None:
        self.callers = callers
        self.interval = 0.0
        self.set_rate(rate)

    def set_rate(self, rate: float) -> None:
        self.interval = self.callers / rate if rate > 0 else 0.0

    def first_slot(self, index: int, now: float) -> float:
        # Callers spread over one interval: started together, they would call in bursts.
        return now + index * self.interval / self.callers

    def next_slot(self, slot: float, now: float) -> float:
        slot += self.interval
        if slot < now:
            # Behind (a slow call): skip the missed slots instead of bursting to catch
            # up, and keep this caller's place among the others.
            slot += math.ceil((now - slot) / self.interval) * self.interval
        return slot


@dataclass(frozen=True)
class Window:
    """The measured part of a bench run: wall clock and this process's CPU time (every
    thread, grpc's own included), so a path's client-side cost per call shows even
    when the servers are what limits the calls/s."""

    start: float
    cpu: float

    @classmethod
    def open(cls) -> Window:
        return cls(time.monotonic(), time.process_time())

    def close(self, records: Sequence[Record]) -> dict[str, Any]:
        cpu = time.process_time() - self.cpu
        summary = summarize(records, self.start, time.monotonic())
        summary["cpu_us_per_call"] = cpu / max(1, summary["calls"]) * 1e6
        return summary


def summarize(records: Sequence[Record], start: float, end: float) -> dict[str, Any]:
    """Calls that started and ended inside [start, end]."""
    window = [r for r in records if r[0] >= start and r[0] + r[1] <= end]
    latencies = sorted(r[1] for r in window if not r[2].startswith("!"))
    servers = Counter(r[2] for r in window)

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {
        "calls": len(window),
        "errors": len(window) - len(latencies),
        "seconds": end - start,
        "rate": len(window) / (end - start),
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "servers": dict(servers),
    }


@dataclass
class Plan:
    """What every caller of one process does, and where it writes down each call."""

    request: Any
    pace: Pace
    deadline: float
    max_calls: int  # per caller
    records: list[Record] = field(default_factory=list)

    @classmethod
    def of(cls, args: argparse.Namespace) -> Plan:
        return cls(
            request=echo_pb2.SayRequest(text="ping", delay=args.delay),
            pace=Pace(args.callers, args.rate),
            deadline=time.monotonic() + args.max_seconds,  # from the callers' start
            max_calls=args.max_calls,
        )


class WaitServed:
    """A wait_served command in progress, polled until it holds or times out."""

    def __init__(self, command: dict[str, Any]) -> None:
        self.name = str(command["name"])
        self.after = float(command["after"])
        self.deadline = time.monotonic() + float(command["timeout"])
        self.seen = 0  # records before this one were looked at already

    def poll(self, records: list[Record]) -> dict[str, Any] | None:
        count = len(records)
        for start, _, who in records[self.seen : count]:
            if who == self.name and start >= self.after:
                return {"ok": True, "at": start}
        self.seen = count
        return {"ok": False, "at": None} if time.monotonic() >= self.deadline else None

    def polls(self) -> range:
        """Enough polls to reach the deadline, and then one more: a bounded loop."""
        return range(int((self.deadline - time.monotonic()) / POLL) + 2)

    def wait(self, records: list[Record]) -> dict[str, Any]:
        for _ in self.polls():
            if (answer := self.poll(records)) is not None:
                return answer
            time.sleep(POLL)
        return {"ok": False, "at": None}

    async def aio_wait(self, records: list[Record]) -> dict[str, Any]:
        for _ in self.polls():
            if (answer := self.poll(records)) is not None:
                return answer
            await asyncio.sleep(POLL)
        return {"ok": False, "at": None}


def handle(line: str, plan: Plan) -> dict[str, Any] | WaitServed | None:
    """The answer to one command line; a WaitServed to poll; None: stop (or stdin closed)."""
    if not line.strip():
        return None
    command = json.loads(line)
    if command["op"] == "stop":
        return None
    if command["op"] == "rate":
        plan.pace.set_rate(float(command["value"]))
        return {"ok": True}
    if command["op"] == "wait_served":
        return WaitServed(command)
    return {"ok": False, "error": f"unknown op {command['op']!r}"}


def xds_options(args: argparse.Namespace) -> dict[str, Any]:
    return {} if args.xds_retries is None else {"retries": args.xds_retries}


# ------------------------------------------------------------------------- threads


@contextlib.contextmanager
def sync_channel(args: argparse.Namespace) -> Iterator[grpc.Channel]:
    if args.path == "plain":
        with grpc.insecure_channel(args.targets[0]) as ch:
            yield ch
    elif args.path == "round_robin":
        target = "ipv4:" + ",".join(args.targets)
        options = [("grpc.service_config", ROUND_ROBIN_CONFIG)]
        with grpc.insecure_channel(target, options) as ch:
            yield ch
    elif args.path == "xds":
        with (
            install(args.endpoint, **xds_options(args)),
            grpc.insecure_channel(f"xds:///{SERVICE}") as ch,
        ):
            yield ch
    else:
        with (
            etcdisco.Client(args.endpoint) as client,
            etcdisco.grpc.channel(client, SERVICE, idempotent=True) as bch,
        ):
            yield bch


def sync_caller(call: Callable[..., Any], plan: Plan, index: int, stop: threading.Event) -> None:
    slot = plan.pace.first_slot(index, time.monotonic())
    for _ in range(plan.max_calls):
        if plan.pace.interval:
            stop.wait(max(0.0, slot - time.monotonic()))
        start = time.monotonic()
        if stop.is_set() or start > plan.deadline:
            return
        try:
            who = call(plan.request, timeout=CALL_TIMEOUT).server
        except grpc.RpcError as exc:
            who = f"!{exc.code().name}"
        now = time.monotonic()
        plan.records.append((start, now - start, who))
        if plan.pace.interval:
            slot = plan.pace.next_slot(slot, now)


def run_sync(args: argparse.Namespace) -> None:
    stop = threading.Event()
    with sync_channel(args) as ch:
        call = echo_pb2_grpc.EchoStub(ch).Say
        plan = Plan.of(args)
        threads = [
            threading.Thread(target=sync_caller, args=(call, plan, i, stop), name=f"caller-{i}")
            for i in range(args.callers)
        ]
        for t in threads:
            t.start()
        try:
            if args.command == "bench":
                stop.wait(args.warmup)
                window = Window.open()
                stop.wait(args.duration)
                summary = window.close(plan.records)
            else:
                sync_commands(plan)
        finally:
            stop.set()
            for t in threads:
                t.join(CALL_TIMEOUT + 5)
    if args.command == "bench":
        say(summary)
    else:
        finish_load(args, plan.records)


def sync_commands(plan: Plan) -> None:
    say({"ready": True})
    for _ in range(MAX_COMMANDS):
        answer = handle(sys.stdin.readline(), plan)
        if answer is None:
            return
        say(answer.wait(plan.records) if isinstance(answer, WaitServed) else answer)


# ------------------------------------------------------------------------- asyncio


@contextlib.asynccontextmanager
async def aio_channel(args: argparse.Namespace) -> AsyncIterator[grpc.aio.Channel]:
    if args.path == "plain":
        async with grpc.aio.insecure_channel(args.targets[0]) as ch:
            yield ch
    elif args.path == "round_robin":
        target = "ipv4:" + ",".join(args.targets)
        options = [("grpc.service_config", ROUND_ROBIN_CONFIG)]
        async with grpc.aio.insecure_channel(target, options) as ch:
            yield ch
    elif args.path == "xds":
        async with etcdisco.AsyncClient(args.endpoint) as client:
            server = await start_embedded(client, **xds_options(args))
            try:
                async with grpc.aio.insecure_channel(f"xds:///{SERVICE}") as ch:
                    yield ch
            finally:
                await server.close()
    else:
        async with (
            etcdisco.AsyncClient(args.endpoint) as client,
            etcdisco.grpc.aio_channel(client, SERVICE, idempotent=True) as bch,
        ):
            yield bch


async def aio_caller(call: Callable[..., Any], plan: Plan, index: int, stop: asyncio.Event) -> None:
    slot = plan.pace.first_slot(index, time.monotonic())
    for _ in range(plan.max_calls):
        if plan.pace.interval:
            await asyncio.sleep(max(0.0, slot - time.monotonic()))
        start = time.monotonic()
        if stop.is_set() or start > plan.deadline:
            return
        try:
            who = (await call(plan.request, timeout=CALL_TIMEOUT)).server
        except grpc.RpcError as exc:
            code = exc.code()
            who = f"!{code.name}" if isinstance(code, grpc.StatusCode) else "!UNKNOWN"
        now = time.monotonic()
        plan.records.append((start, now - start, who))
        if plan.pace.interval:
            slot = plan.pace.next_slot(slot, now)


async def run_aio(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    async with aio_channel(args) as ch:
        call = echo_pb2_grpc.EchoStub(ch).Say
        plan = Plan.of(args)
        callers = [
            asyncio.create_task(aio_caller(call, plan, i, stop)) for i in range(args.callers)
        ]
        try:
            if args.command == "bench":
                await asyncio.sleep(args.warmup)
                window = Window.open()
                await asyncio.sleep(args.duration)
                summary = window.close(plan.records)
            else:
                await aio_commands(plan)
        finally:
            stop.set()
            async with asyncio.timeout(CALL_TIMEOUT + 5):
                await asyncio.gather(*callers)
    if args.command == "bench":
        say(summary)
    else:
        finish_load(args, plan.records)


async def aio_commands(plan: Plan) -> None:
    say({"ready": True})
    for _ in range(MAX_COMMANDS):
        # A thread reads stdin so that the callers keep running on the loop meanwhile.
        answer = handle(await asyncio.to_thread(sys.stdin.readline), plan)
        if answer is None:
            return
        if isinstance(answer, WaitServed):
            answer = await answer.aio_wait(plan.records)
        say(answer)


# ------------------------------------------------------------------------- main


def finish_load(args: argparse.Namespace, records: list[Record]) -> None:
    Path(args.trace).write_text(json.dumps(records))
    errors = sum(1 for r in records if r[2].startswith("!"))
    say({"stopped": True, "calls": len(records), "errors": errors})


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("bench", "load"))
    parser.add_argument("--path", required=True, choices=PATHS)
    parser.add_argument("--mode", required=True, choices=("sync", "aio"))
    parser.add_argument("--endpoint", required=True, help="etcd endpoint")
    parser.add_argument("--targets", default="", help="server addresses, comma separated")
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.0, help="calls/s, all callers (0: max)")
    parser.add_argument("--xds-retries", type=int, help="xds: the route's retries on UNAVAILABLE")
    parser.add_argument("--delay", type=float, default=0.0, help="server-side wait per call")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="callers stop after")
    parser.add_argument("--max-calls", type=int, default=1_000_000, help="per caller")
    parser.add_argument("--trace", default="", help="load: where to write the calls")
    args = parser.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    if args.path in ("plain", "round_robin") and not args.targets:
        parser.error(f"--path {args.path} needs --targets")
    if args.command == "load" and not args.trace:
        parser.error("load needs --trace")
    if args.command == "bench":
        args.max_seconds = min(args.max_seconds, args.warmup + args.duration + 1)
    return args


def main() -> None:
    args = parse()
    if args.mode == "sync":
        run_sync(args)
    else:
        asyncio.run(run_aio(args))


if __name__ == "__main__":
    main()
