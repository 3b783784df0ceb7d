"""HTTP clients through the registry (etcdisco.http) against plain clients, and registry
change -> routing.

    .venv/bin/python benchmarks/bench_http.py [--quick] [--out PATH]

Servers: uvicorn (one process each, a bare ASGI app answering its name) on loopback,
registered in a local etcd as service "bench".

1. Throughput and client CPU: requests/s and the client process's CPU time per request
   (time.process_time, every thread of the process) through etcdisco.http.Client and
   AsyncClient against a plain httpx.Client / AsyncClient sent straight to the same one
   instance; and etcdisco.http.Session against a plain requests.Session. Sync: one
   thread, one request after the other. Async: 4 tasks on one loop. Rounds alternate
   plain and etcdisco; the table shows medians. Goal: etcdisco >= 0.9x plain requests/s.
2. Registry change -> routing, with 4 callers sending requests back to back (tasks for
   the async client, threads for the sync one) while a second instance is registered
   (put issued -> the first request picked for it), then drained (status `draining`
   written -> the last request picked for it).

Prints the markdown section, or writes it to --out. Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import requests
from _common import command_line, load_average, write_section

import etcdisco
import etcdisco.http
from etcdisco.testing import LocalEtcd

SERVICE = "bench"
ASYNC_TASKS = 4
CALLERS = 4
GOAL = 0.9


# -- the server ------------------------------------------------------------------------


def serve(name: str) -> None:
    """Run one uvicorn server on a free loopback port; print the port, then serve."""
    import uvicorn

    body = name.encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose proto
    # says TCP. Without it, uvicorn's two writes (headers, body) meet Nagle and the
    # client's delayed ACK: 40 ms a response here.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


class ServerProcess:
    def __init__(self, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", name],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"server {name} did not start (exit {self.proc.poll()})")
        self.address = f"127.0.0.1:{json.loads(line)['port']}"

    def wait_serving(self) -> None:
        host, port = self.address.split(":")
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection((host, int(port)), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# -- 1. throughput -----------------------------------------------------------------------


@dataclass
class Run:
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)

    def add(self, count: int, wall: float, cpu: float) -> None:
        self.rps.append(count / wall)
        self.cpu_us.append(cpu / count * 1e6)


def timed_sync(get: Callable[[], Any], count: int) -> tuple[float, float]:
    for _ in range(20):  # connections up, caches warm
        get()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        get()
    return time.perf_counter() - wall, time.process_time() - cpu


async def timed_async(client: httpx.AsyncClient, url: str, count: int) -> tuple[float, float]:
    per_task = count // ASYNC_TASKS

    async def worker(n: int) -> None:
        for _ in range(n):
            response = await client.get(url)
            assert response.status_code == 200

    await asyncio.gather(*(worker(5) for _ in range(ASYNC_TASKS)))
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(per_task) for _ in range(ASYNC_TASKS)))
    return time.perf_counter() - wall, time.process_time() - cpu


def throughput_sync(endpoint: str, address: str, rounds: int, count: int) -> dict[str, Run]:
    runs = {name: Run() for name in ("httpx", "etcdisco-httpx", "requests", "etcdisco-requests")}
    with (
        etcdisco.Client(endpoint) as registry,
        httpx.Client() as plain,
        etcdisco.http.Client(registry, [SERVICE]) as balanced,
        requests.Session() as plain_session,
        etcdisco.http.Session(registry, [SERVICE]) as session,
    ):
        direct, via = f"http://{address}/", f"http://{SERVICE}/"
        for _ in range(rounds):
            runs["httpx"].add(count, *timed_sync(lambda: plain.get(direct), count))
            runs["etcdisco-httpx"].add(count, *timed_sync(lambda: balanced.get(via), count))
            small = max(count // 3, 50)  # requests is slower: fewer requests, same rounds
            runs["requests"].add(small, *timed_sync(lambda: plain_session.get(direct), small))
            runs["etcdisco-requests"].add(small, *timed_sync(lambda: session.get(via), small))
    return runs


async def throughput_async(endpoint: str, address: str, rounds: int, count: int) -> dict[str, Run]:
    runs = {name: Run() for name in ("httpx-async", "etcdisco-httpx-async")}
    async with (
        etcdisco.AsyncClient(endpoint) as registry,
        httpx.AsyncClient() as plain,
        etcdisco.http.AsyncClient(registry, [SERVICE]) as balanced,
    ):
        for _ in range(rounds):
            runs["httpx-async"].add(count, *await timed_async(plain, f"http://{address}/", count))
            runs["etcdisco-httpx-async"].add(
                count, *await timed_async(balanced, f"http://{SERVICE}/", count)
            )
    return runs


# -- 2. registry change -> routing -------------------------------------------------------


class Trace:
    """(pick time, server) of every request, and events for the controller."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.failures = 0

    def add(self, started: float, server: str) -> None:
        with self.lock:
            self.records.append((started, server))

    def wait(self, check: Callable[[list[tuple[float, str]]], bool], what: str) -> None:
        deadline = time.monotonic() + 15
        while True:
            with self.lock:
                records = list(self.records)
            if check(records):
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}")
            time.sleep(0.005)


@dataclass
class Changes:
    add_ms: list[float] = field(default_factory=list)
    drain_ms: list[float] = field(default_factory=list)
    failures: int = 0


def cycles(trace: Trace, registrant: etcdisco.Client, second: ServerProcess, count: int) -> Changes:
    out = Changes()
    for n in range(count):
        put = time.monotonic()
        reg = registrant.register(SERVICE, second.address, instance_id=f"b{n}", ttl=10)
        trace.wait(
            lambda rs, put=put: any(s == second.name and t >= put for t, s in rs), "a first pick"
        )
        with trace.lock:
            first = min(t for t, s in trace.records if s == second.name and t >= put)
        out.add_ms.append((first - put) * 1000)
        drained = time.monotonic()
        reg.drain()
        # Quiet: 300 requests picked after the drain, none of them for it.
        trace.wait(
            lambda rs, d=drained: (
                sum(1 for t, s in rs if t >= d + 0.05 and s != second.name) >= 300
            ),
            "requests after the drain",
        )
        with trace.lock:
            last = max((t for t, s in trace.records if s == second.name), default=drained)
        out.drain_ms.append(max(0.0, last - drained) * 1000)
        reg.deregister()
    out.failures = trace.failures
    return out


def changes_sync(endpoint: str, second: ServerProcess, count: int) -> Changes:
    trace = Trace()
    with (
        etcdisco.Client(endpoint) as registry,
        etcdisco.Client(endpoint) as registrant,
        etcdisco.http.Client(registry, [SERVICE]) as http,
    ):

        def caller() -> None:
            while not trace.stop.is_set():
                started = time.monotonic()
                try:
                    server = http.get(f"http://{SERVICE}/").text
                except httpx.HTTPError:
                    trace.failures += 1
                    continue
                trace.add(started, server)

        threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
        for t in threads:
            t.start()
        try:
            return cycles(trace, registrant, second, count)
        finally:
            trace.stop.set()
            for t in threads:
                t.join(10)


async def changes_async(endpoint: str, second: ServerProcess, count: int) -> Changes:
    trace = Trace()
    async with (
        etcdisco.AsyncClient(endpoint) as registry,
        etcdisco.http.AsyncClient(registry, [SERVICE]) as http,
    ):

        async def caller() -> None:
            while not trace.stop.is_set():
                started = time.monotonic()
                try:
                    server = (await http.get(f"http://{SERVICE}/")).text
                except httpx.HTTPError:
                    trace.failures += 1
                    continue
                trace.add(started, server)

        tasks = [asyncio.create_task(caller()) for _ in range(CALLERS)]
        try:
            with etcdisco.Client(endpoint) as registrant:
                return await asyncio.to_thread(cycles, trace, registrant, second, count)
        finally:
            trace.stop.set()
            await asyncio.gather(*tasks)


# -- the section -------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    return f"{median(values):.1f} / {max(values):.1f}" if values else "n/a"


def run(args: argparse.Namespace) -> str:
    load = load_average()
    rounds, count, change_cycles = (2, 300, 3) if args.quick else (5, 3000, 10)
    with LocalEtcd() as member:
        first, second = ServerProcess("first"), ServerProcess("second")
        try:
            first.wait_serving()
            second.wait_serving()
            with etcdisco.Client(member.endpoint) as owner:
                owner.register(SERVICE, first.address, ttl=10)
                runs = throughput_sync(member.endpoint, first.address, rounds, count)
                runs |= asyncio.run(throughput_async(member.endpoint, first.address, rounds, count))
                sync_changes = changes_sync(member.endpoint, second, change_cycles)
                async_changes = asyncio.run(changes_async(member.endpoint, second, change_cycles))
            version = member.version
        finally:
            first.stop()
            second.stop()

    def row(label: str, plain: str, ours: str) -> tuple[str, float, float]:
        rps_plain, rps_ours = median(runs[plain].rps), median(runs[ours].rps)
        cpu_plain, cpu_ours = median(runs[plain].cpu_us), median(runs[ours].cpu_us)
        ratio = rps_ours / rps_plain
        cpu = cpu_ours - cpu_plain
        text = (
            f"| {label} | {rps_plain:,.0f} | {rps_ours:,.0f} | **{ratio:.2f}x** | "
            f"{cpu_plain:.0f} us | {cpu_ours:.0f} us | {cpu:+.0f} us |"
        )
        return text, ratio, cpu

    sync_row, sync_ratio, sync_cpu = row("httpx, sync (1 thread)", "httpx", "etcdisco-httpx")
    async_row, async_ratio, async_cpu = row(
        f"httpx, async ({ASYNC_TASKS} tasks)", "httpx-async", "etcdisco-httpx-async"
    )
    req_row, req_ratio, _ = row("requests (1 thread)", "requests", "etcdisco-requests")
    metrics = {
        "http": {
            "sync_ratio": round(sync_ratio, 3),
            "async_ratio": round(async_ratio, 3),
            "requests_ratio": round(req_ratio, 3),
            "sync_cpu_overhead_us": round(sync_cpu, 1),
            "async_cpu_overhead_us": round(async_cpu, 1),
        }
    }
    smoke = " (smoke run)" if args.quick else ""
    lines = [
        "## HTTP clients through the registry",
        "",
        f"Command: `{command_line('bench_http.py')}`{smoke}; etcd {version}, 1-min load "
        f"{load:.2f} before; httpx {httpx.__version__}, requests {requests.__version__}. One "
        "uvicorn process (a bare ASGI app) registered as the only instance of the service; "
        "the plain client is sent straight to it, the etcdisco one to `http://bench/`. "
        f"Medians of {rounds} alternating rounds of {count:,} requests (requests: a third). "
        "CPU: the client process's CPU time per request, all threads.",
        "",
        "| client | plain req/s | etcdisco req/s | ratio | plain CPU/req | etcdisco CPU/req "
        "| overhead |",
        "|---|---|---|---|---|---|---|",
        sync_row,
        async_row,
        req_row,
        "",
        f"Registry change -> routing, {CALLERS} callers sending back to back, "
        f"{change_cycles} cycles, median / max in ms: a second instance registered (the put "
        "issued -> the first request picked for it), then drained (`draining` written -> "
        "the last request picked for it).",
        "",
        "| client | added -> first request | draining -> last request | failed requests |",
        "|---|---|---|---|",
        f"| etcdisco.http.Client (threads) | {spread(sync_changes.add_ms)} "
        f"| {spread(sync_changes.drain_ms)} | {sync_changes.failures} |",
        f"| etcdisco.http.AsyncClient (tasks) | {spread(async_changes.add_ms)} "
        f"| {spread(async_changes.drain_ms)} | {async_changes.failures} |",
        "",
        f"<!-- etcdisco-metrics {json.dumps(metrics)} -->",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests")
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    parser.add_argument("--serve", metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    os.environ.setdefault("NO_PROXY", "*")
    write_section(run(args), args.out)


if __name__ == "__main__":
    main()
