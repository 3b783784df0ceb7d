"""xDS fan-out: one control plane, up to 500 ADS subscribers, one etcd change.

    .venv/bin/python benchmarks/bench_xds_fanout.py [--quick] [--out PATH]
        [--streams 500] [--processes 5] [--changes 5] [--profile PATH]

Against a local etcd this script starts (the newest found, or $ETCDISCO_ETCD):

1. The control plane as a user runs it, a process of its own: ``etcdisco --json xds
   --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0`` (its RSS and CPU read from
   /proc/<pid>, its ADS counters from its Prometheus endpoint).
2. Subscriber processes (this file with ``--subscriber``) open ADS streams speaking the
   protocol directly over grpc.aio (the envoy protos): one channel per stream, each
   with a subchannel pool of its own, so every stream is its own HTTP/2 connection as
   separate gRPC clients would be. Each stream asks for the EDS resource of one service and ACKs
   every response with its nonce and version.
3. With every stream subscribed and ACKed, the parent writes one etcd key (a new
   instance of the service) and notes the wall clock (time.time(); every process is
   on this machine); each stream reports the wall time at which it received an
   assignment holding that instance. Per change: p50/p99/max over the streams;
   ``--changes`` changes, medians of those figures.

Steps 2-3 run with one stream, then with ``--streams`` streams (``--processes``
subscriber processes). Goal: with every stream, the last one has the change within
2x the one-stream time + 100 ms. Also reported: the control plane's RSS before and
after the streams open, its CPU during each fan-out, and ADS responses sent per etcd
event. ``--profile PATH`` runs the control plane under cProfile (its stats written to
PATH when it stops), which slows it: figures from such a run are for finding where
the time goes, not for the table.

The subscribers talk to the parent with JSON lines on stdin/stdout and exit when their
stdin closes. Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import sys
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

import grpc
from _common import command_line, load_average, pct, write_section
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from etcdisco import encode_value
from etcdisco.etcd import EtcdClient
from etcdisco.testing import LocalEtcd

SCRIPT = Path(__file__).resolve()
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SERVICE = "fanout"
PREFIX = "services"
STEP_TIMEOUT = 120.0  # any one step (start, subscribe, one change's fan-out)
STOP_TIMEOUT = 15.0
SETTLE = 0.5  # quiet time between changes, so ACKs and CPU settle
GOAL_FACTOR = 2.0  # all streams within 2x the one-stream time ...
GOAL_SLACK_MS = 100.0  # ... plus 100 ms


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def socket_count(pid: int) -> int:
    """Open sockets of a process (its listeners plus one per connection)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
    return count


def instance_address(i: int) -> str:
    return f"10.1.{i // 250 % 250}.{i % 250 + 1}:8080"


# --------------------------------------------------------------------------- subscriber


def open_channel(address: str) -> grpc.aio.Channel:
    # A subchannel pool of its own: otherwise gRPC shares one connection between the
    # channels of a process that dial the same address with the same options.
    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


class Stream:
    """One ADS stream subscribed to EDS, on a channel (so a connection) of its own
    unless ``shared`` is given."""

    def __init__(
        self, address: str, node: str, owner: Subscriber, shared: grpc.aio.Channel | None
    ) -> None:
        self.owner = owner
        self.own_channel = shared is None
        self.channel = open_channel(address) if shared is None else shared
        # Requests written on the call directly (no request iterator: one task fewer
        # per ACK, so the subscribers take less of the CPU the control plane needs).
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(
            self.channel
        ).StreamAggregatedResources()
        self.node = node
        self.acked = asyncio.Event()
        self.bodies: list[bytes] = []
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        await self.call.write(
            discovery_pb2.DiscoveryRequest(
                node=base_pb2.Node(id=self.node), type_url=EDS, resource_names=[SERVICE]
            )
        )
        while True:
            response = await self.call.read()
            now = time.time()
            if response is None or not hasattr(response, "resources"):
                raise RuntimeError("the control plane ended an ADS stream")
            self.bodies = [body.value for body in response.resources]
            self.owner.received(self, now)
            await self.call.write(
                discovery_pb2.DiscoveryRequest(
                    type_url=EDS,
                    resource_names=[SERVICE],
                    response_nonce=response.nonce,
                    version_info=response.version_info,
                )
            )
            self.acked.set()

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        self.call.cancel()
        if self.own_channel:
            await self.channel.close()


def marker(address: str) -> bytes:
    """How an instance's host appears in an encoded ClusterLoadAssignment: the
    SocketAddress ``address`` field (number 2, length-delimited: tag 0x12, a one-byte
    length, the text). Looking for these bytes instead of decoding every assignment
    keeps the subscribers' own CPU, which shares this machine, small."""
    host = address.rsplit(":", 1)[0].encode()
    return b"\x12" + bytes([len(host)]) + host


class Subscriber:
    def __init__(self) -> None:
        self.expect: bytes | None = None
        self.times: dict[int, float] = {}
        self.streams: list[Stream] = []
        self.done = asyncio.Event()

    def received(self, stream: Stream, now: float) -> None:
        if self.expect is None or id(stream) in self.times:
            return
        if not any(self.expect in body for body in stream.bodies):
            return
        self.times[id(stream)] = now
        if len(self.times) == len(self.streams):
            self.done.set()


async def subscriber_main(address: str, count: int, index: int, share: bool) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    sub = Subscriber()
    shared = open_channel(address) if share else None
    try:
        sub.streams = [Stream(address, f"bench-{index}-{i}", sub, shared) for i in range(count)]
        async with asyncio.timeout(STEP_TIMEOUT):
            await asyncio.gather(*(s.acked.wait() for s in sub.streams))
        failed = [s.task for s in sub.streams if s.task.done()]
        if failed:
            raise RuntimeError(f"{len(failed)} streams ended: {failed[0].exception()}")
        emit({"subscribed": count})
        while line := await reader.readline():
            command = json.loads(line)
            if command["cmd"] == "expect":
                sub.expect, sub.times = marker(command["address"]), {}
                sub.done.clear()
                t = os.times()
                cpu = t.user + t.system
                emit({"armed": True})
                try:
                    async with asyncio.timeout(STEP_TIMEOUT):
                        await sub.done.wait()
                except TimeoutError:
                    emit({"error": f"{len(sub.times)} of {count} streams got the change"})
                    return
                t = os.times()
                emit({"times": sorted(sub.times.values()), "cpu": t.user + t.system - cpu})
    finally:
        await asyncio.gather(*(s.close() for s in sub.streams))
        if shared is not None:
            await shared.close()


# --------------------------------------------------------------------------- parent


class Child:
    """A process talking JSON lines; its stderr is kept (the last lines) for errors."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.stderr: deque[str] = deque(maxlen=20)
        self.stderr_lines: asyncio.Queue[str] = asyncio.Queue()
        self._drain = asyncio.get_running_loop().create_task(self._read_stderr())

    @classmethod
    async def start(cls, name: str, *argv: str, **kw: Any) -> Child:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            **kw,
        )
        return cls(name, proc)

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.stderr.append(line)
            self.stderr_lines.put_nowait(line)

    def fail(self, why: str) -> RuntimeError:
        tail = "\n".join(f"    {line}" for line in self.stderr)
        return RuntimeError(f"{self.name}: {why}" + (f"\n  its stderr:\n{tail}" if tail else ""))

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())

    async def receive(self, what: str, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                line = await self.proc.stdout.readline()
        except TimeoutError:
            raise self.fail(f"no {what} within {timeout:.0f} s") from None
        if not line:
            raise self.fail(f"exited with {await self.proc.wait()} before {what}")
        message: dict[str, Any] = json.loads(line)
        if "error" in message:
            raise self.fail(message["error"])
        return message

    async def stop(self, sig: int | None = None) -> None:
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain


class ControlPlane:
    """``etcdisco xds`` in a process of its own; its address and metrics URL."""

    def __init__(self, child: Child, address: str, metrics_url: str) -> None:
        self.child = child
        self.address = address
        self.metrics_url = metrics_url

    @property
    def pid(self) -> int:
        return self.child.proc.pid

    @classmethod
    async def start(cls, endpoint: str, profile: Path | None) -> ControlPlane:
        cli = str(Path(sys.executable).with_name("etcdisco"))
        argv = [cli]
        if profile is not None:
            argv = [sys.executable, "-m", "cProfile", "-o", str(profile), cli]
        argv += [
            "--endpoints",
            endpoint,
            "--json",
            "--log-level",
            "warning",
            "xds",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ]
        child = await Child.start("the control plane", *argv)
        listening = await child.receive("listening line")
        url = ""
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                while not url:
                    line = await child.stderr_lines.get()
                    if m := re.search(r"metrics at (\S+)", line):
                        url = m.group(1)
        except TimeoutError:
            raise child.fail("no metrics line on stderr") from None
        return cls(child, listening["listen"], url)

    def counters(self) -> dict[str, float]:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            text = r.read().decode()
        found = {}
        for name in ("streams", "responses", "acks", "nacks"):
            m = re.search(rf"^etcdisco_xds_{name}_total(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
            found[name] = float(m.group(1)) if m else float("nan")
        return found

    async def stop(self) -> None:
        # SIGINT: a clean exit (streams end with OK; cProfile writes its file).
        await self.child.stop(signal.SIGINT)


async def start_subscribers(
    address: str, streams: int, processes: int, first: int, share: bool
) -> list[Child]:
    per, extra = divmod(streams, processes)
    children = []
    for i in range(processes):
        count = per + (1 if i < extra else 0)
        if count:
            children.append(
                await Child.start(
                    f"subscriber {first + i}",
                    sys.executable,
                    str(SCRIPT),
                    "--subscriber",
                    address,
                    str(count),
                    str(first + i),
                    "1" if share else "0",
                )
            )
    await asyncio.gather(*(c.receive("subscription (every stream ACKed)") for c in children))
    return children


async def fan_out(
    etcd: EtcdClient,
    lease: int,
    plane: ControlPlane,
    children: list[Child],
    changes: int,
    next_instance: list[int],
) -> dict[str, Any]:
    """``changes`` times: one new instance in etcd, until every stream has it."""
    rounds = []
    for _ in range(changes):
        await asyncio.sleep(SETTLE)
        i = next_instance[0]
        next_instance[0] += 1
        address = instance_address(i)
        for c in children:
            c.send({"cmd": "expect", "address": address})
        await asyncio.gather(*(c.receive("armed") for c in children))
        before = plane.counters()
        cpu0 = cpu_seconds_of(plane.pid)
        t0 = time.time()
        await etcd.put(
            f"{PREFIX}/{SERVICE}/{address}",
            encode_value(address, {"zone": "a", "weight": 1}),
            lease=lease,
        )
        reports = await asyncio.gather(*(c.receive("the change on every stream") for c in children))
        cpu = cpu_seconds_of(plane.pid) - cpu0
        wall = max(max(r["times"]) for r in reports) - t0
        lat = [1000 * (t - t0) for r in reports for t in r["times"]]
        after = plane.counters()
        rounds.append(
            {
                "p50_ms": pct(lat, 0.5),
                "p99_ms": pct(lat, 0.99),
                "max_ms": max(lat),
                "wall": wall,
                "cpu": cpu,
                "subscriber_cpu": sum(r["cpu"] for r in reports),
                "responses": after["responses"] - before["responses"],
            }
        )
    med = statistics.median
    # CPU is read in clock ticks (10 ms): summed over the changes, not a median of ticks.
    cpu = sum(r["cpu"] for r in rounds)
    return {
        **{k: round(med(r[k] for r in rounds), 3) for k in ("p50_ms", "p99_ms", "max_ms")},
        "max_ms_each": [round(r["max_ms"], 1) for r in rounds],
        "cpu_ms": round(1000 * cpu / changes, 1),
        "cpu_percent": round(100 * cpu / sum(r["wall"] for r in rounds), 1),
        "subscriber_cpu_ms": round(1000 * sum(r["subscriber_cpu"] for r in rounds) / changes, 1),
        "responses": med(r["responses"] for r in rounds),
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with LocalEtcd() as member:
        args.etcd_version = member.version
        async with EtcdClient(member.endpoint, timeout=30) as etcd:
            lease = (await etcd.lease_grant(3600)).id
            next_instance = [0]
            for _ in range(3):  # the service exists before anything subscribes
                address = instance_address(next_instance[0])
                next_instance[0] += 1
                await etcd.put(
                    f"{PREFIX}/{SERVICE}/{address}",
                    encode_value(address, {"zone": "a", "weight": 1}),
                    lease=lease,
                )
            plane = await ControlPlane.start(member.endpoint, args.profile)
            try:
                await asyncio.sleep(1.0)
                rss_idle = rss_bytes(plane.pid)
                one = await start_subscribers(plane.address, 1, 1, 0, False)
                try:
                    figures["one"] = await fan_out(
                        etcd, lease, plane, one, args.changes, next_instance
                    )
                finally:
                    await asyncio.gather(*(c.stop() for c in one))
                figures["one"]["streams"] = 1
                await asyncio.sleep(1.0)
                rss_before = rss_bytes(plane.pid)
                t = time.perf_counter()
                many = await start_subscribers(
                    plane.address, args.streams, args.processes, 1, args.shared_channels
                )
                subscribe_s = time.perf_counter() - t
                try:
                    await asyncio.sleep(1.0)
                    rss_after = rss_bytes(plane.pid)
                    sockets = socket_count(plane.pid)
                    cpu0, t = cpu_seconds_of(plane.pid), time.perf_counter()
                    await asyncio.sleep(2.0)
                    idle_cpu = (cpu_seconds_of(plane.pid) - cpu0) / (time.perf_counter() - t)
                    figures["many"] = await fan_out(
                        etcd, lease, plane, many, args.changes, next_instance
                    )
                    figures["many"]["streams"] = args.streams
                    rss_end = rss_bytes(plane.pid)
                finally:
                    await asyncio.gather(*(c.stop() for c in many))
                figures["control_plane"] = {
                    "rss_idle_mib": round(rss_idle / 2**20, 1),
                    "rss_one_stream_mib": round(rss_before / 2**20, 1),
                    "rss_all_streams_mib": round(rss_after / 2**20, 1),
                    "rss_after_changes_mib": round(rss_end / 2**20, 1),
                    "kib_per_stream": round((rss_after - rss_before) / 1024 / args.streams, 1),
                    "sockets": sockets,
                    "idle_cpu_percent": round(100 * idle_cpu, 1),
                    "subscribe_all_s": round(subscribe_s, 2),
                    "counters": plane.counters(),
                }
            finally:
                await plane.stop()
    return figures


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


def render(args: argparse.Namespace, figures: dict[str, Any]) -> str:
    one, many, cp = figures["one"], figures["many"], figures["control_plane"]
    limit = GOAL_FACTOR * one["max_ms"] + GOAL_SLACK_MS
    met = many["max_ms"] <= limit
    figures["goal"] = {"limit_ms": round(limit, 1), "met": met}
    lines = [
        "## xDS fan-out",
        "",
        f"Command: `{command_line('bench_xds_fanout.py')}`; etcd {args.etcd_version}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, load "
        f"{load_average():.2f} at the end, {time.strftime('%Y-%m-%d')}. One control plane "
        "(`etcdisco xds`, a process of its own); subscribers speak ADS directly (EDS for one "
        "service, every response ACKed), "
        + (
            "streams multiplexed on one channel (one connection) per subscriber process"
            if args.shared_channels
            else "one channel and connection per stream"
        )
        + f", {args.processes} subscriber processes for the many-stream run. One change = one "
        f"new instance written to etcd; from the write (wall clock) to each stream holding "
        f"it. Latencies: medians of {args.changes} changes; CPU: means (read in 10 ms "
        "ticks from /proc). Every process shares this machine, the subscribers too.",
        "",
        "| streams | p50 | p99 | max (all have it) | control plane CPU per change "
        "| its CPU % during the fan-out | subscribers' CPU per change "
        "| responses per etcd event |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in (one, many):
        lines.append(
            f"| {f['streams']} | {f['p50_ms']:.1f} ms | {f['p99_ms']:.1f} ms | "
            f"{f['max_ms']:.1f} ms | {f['cpu_ms']:.0f} ms | {f['cpu_percent']:.0f}% | "
            f"{f['subscriber_cpu_ms']:.0f} ms | {f['responses']:.0f} |"
        )
    lines += [
        "",
        f"Control plane RSS: {cp['rss_idle_mib']} MiB idle, {cp['rss_one_stream_mib']} MiB "
        f"after the one-stream run, {cp['rss_all_streams_mib']} MiB with {args.streams} "
        f"streams ({cp['kib_per_stream']} KiB per stream), {cp['rss_after_changes_mib']} MiB "
        f"after the changes; {cp['sockets']} sockets open; {cp['idle_cpu_percent']}% of a "
        f"core idle with every stream open; all {args.streams} subscribed and ACKed in "
        f"{cp['subscribe_all_s']} s. Largest time per change, {many['streams']} streams: "
        + ", ".join(f"{v:g}" for v in many["max_ms_each"])
        + " ms.",
        "",
        "Goals:",
        "",
        f"- every one of {args.streams} streams has the change within {GOAL_FACTOR:g}x the "
        f"one-stream time + {GOAL_SLACK_MS:g} ms: {verdict(met)} ({many['max_ms']:.1f} ms; "
        f"limit {limit:.1f} ms from {one['max_ms']:.1f} ms)",
        "",
        f"<!-- etcdisco-metrics {json.dumps({'xds_fanout': figures})} -->",
    ]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 50 streams, 3 changes")
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    parser.add_argument("--streams", type=int, help="streams in the many run (500; quick 50)")
    parser.add_argument("--processes", type=int, help="subscriber processes (5; quick 2)")
    parser.add_argument("--changes", type=int, help="changes per run (5; quick 3)")
    parser.add_argument("--profile", type=Path, help="cProfile the control plane into PATH")
    parser.add_argument(
        "--shared-channels",
        action="store_true",
        help="one channel (one connection) per subscriber process, its streams multiplexed",
    )
    parser.add_argument("--subscriber", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.subscriber:
        return args
    q = args.quick
    args.streams = args.streams or (50 if q else 500)
    args.processes = args.processes or (2 if q else 5)
    args.changes = args.changes or (3 if q else 5)
    if args.streams < 1 or args.processes < 1 or args.changes < 1:
        parser.error("--streams, --processes and --changes must be positive")
    return args


def main() -> None:
    args = parse_args()
    if args.subscriber:
        address, count, index, share = args.subscriber
        asyncio.run(subscriber_main(address, int(count), int(index), share == "1"))
        return
    figures = asyncio.run(measure(args))
    write_section(render(args, figures), args.out)


if __name__ == "__main__":
    main()
