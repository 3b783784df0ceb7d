"""The child programs of the soak: an instance process and a watching process.

    python -m tests.soak._workers instance --endpoints E --ttl 3 --process 2
    python -m tests.soak._workers watcher --endpoints E --name w0

Both speak JSON lines: the supervisor writes ``{"id": n, "cmd": "..."}`` on stdin and
reads ``{"id": n, ...}`` on stdout. Once set up, a child writes ``{"id": 0, "ready":
true}``. SIGTERM stops it gracefully (an instance process deregisters first) and it
answers with a last ``{"id": -1, "bye": ...}`` line; end of stdin (the supervisor is
gone) stops it too. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from etcdisco import AsyncClient, Registration, ServiceCache

from ._layout import PREFIX, instances_of

log = logging.getLogger("soak.worker")

Handler = Callable[[str], Awaitable[dict[str, Any]]]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # A supervisor killed with SIGKILL runs no cleanup; the kernel then kills us too,
    # even while we are stopped with SIGSTOP (when end of stdin would go unnoticed).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        sys.exit("soak worker: the supervisor is already gone")


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _process_figures() -> dict[str, Any]:
    return {
        "tasks": len(asyncio.all_tasks()),
        "threads": threading.active_count(),
    }


async def _serve(handler: Handler, stop: asyncio.Event) -> None:
    """Answer requests until SIGTERM or end of stdin."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    lines: asyncio.Task[bytes] | None = None
    stopping = asyncio.create_task(stop.wait())
    try:
        while True:
            lines = asyncio.create_task(reader.readline())
            await asyncio.wait({lines, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done():
                return
            line = lines.result()
            if not line:
                log.info("end of stdin: stopping")
                return
            request = json.loads(line)
            try:
                answer = await handler(request["cmd"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("request %r failed", request)
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            _emit({"id": request["id"], **answer})
    finally:
        for task in (lines, stopping):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def _stop_on_sigterm() -> asyncio.Event:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    return stop


async def run_instance(endpoints: str, ttl: int, process: int) -> None:
    stop = _stop_on_sigterm()
    client = AsyncClient(endpoints=endpoints, prefix=PREFIX)
    regs: list[Registration] = []
    try:
        for spec in instances_of(process):
            regs.append(
                await client.register(
                    spec.service,
                    spec.address,
                    instance_id=spec.instance_id,
                    metadata={"zone": spec.zone, "process": process},
                    ttl=ttl,
                )
            )

        async def handle(cmd: str) -> dict[str, Any]:
            if cmd != "status":
                raise ValueError(f"unknown command {cmd!r}")
            return {
                "regs": [
                    {
                        "key": reg.key,
                        "state": reg.state.value,
                        "lease": reg.lease_id or 0,
                        "re_registrations": reg.re_registrations,
                    }
                    for reg in regs
                ],
                **_process_figures(),
            }

        _emit({"id": 0, "ready": True, "pid": os.getpid()})
        await _serve(handle, stop)
    finally:
        # Graceful: every key deleted and the lease revoked before we exit.
        await client.close(timeout=5.0)
    _emit({"id": -1, "bye": True, "deregistered": [reg.key for reg in regs]})


def _describe(cache: ServiceCache) -> dict[str, Any]:
    return {
        "instances": {
            inst.key: {
                "service": inst.service,
                "address": inst.address,
                "metadata": dict(inst.metadata),
                "revision": inst.revision,
                "lease": inst.lease,
                "suspect": inst.suspect,
            }
            for inst in cache.instances()
        },
        "state": cache.state.value,
        "revision": cache.revision,
        "resyncs": cache.resyncs,
        "malformed": cache.malformed,
        "expiry_protections": cache.expiry_protections,
    }


async def run_watcher(endpoints: str) -> None:
    stop = _stop_on_sigterm()
    client = AsyncClient(endpoints=endpoints, prefix=PREFIX)
    try:
        cache = await client.discover_all()
        await cache.wait_ready(timeout=30.0)

        async def handle(cmd: str) -> dict[str, Any]:
            if cmd != "snapshot":
                raise ValueError(f"unknown command {cmd!r}")
            return {**_describe(cache), **_process_figures()}

        _emit({"id": 0, "ready": True, "pid": os.getpid()})
        await _serve(handle, stop)
        await cache.close()
    finally:
        await client.close(timeout=5.0)
    _emit({"id": -1, "bye": True})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.soak._workers")
    parser.add_argument("kind", choices=("instance", "watcher"))
    parser.add_argument("--endpoints", required=True)
    parser.add_argument("--ttl", type=int, default=3)
    parser.add_argument("--process", type=int, default=0)
    parser.add_argument("--name", default="")
    args = parser.parse_args(argv)
    _die_with_parent()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {args.kind}{args.process if args.kind == 'instance' else args.name}"
        " %(levelname)s %(name)s: %(message)s",
    )
    if args.kind == "instance":
        asyncio.run(run_instance(args.endpoints, args.ttl, args.process))
    else:
        asyncio.run(run_watcher(args.endpoints))


if __name__ == "__main__":
    main()
