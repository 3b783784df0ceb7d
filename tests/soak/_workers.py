"""The child programs of the soak: an instance process and a watching process.

    python -m tests.soak._workers instance --endpoints E --ttl 3 --process 2
    python -m tests.soak._workers watcher --endpoints E --name w0 [--user U]

Both speak JSON lines: the supervisor writes ``{"id": n, "cmd": "...", "args": {...}}``
on stdin and reads ``{"id": n, ...}`` on stdout. Once set up, a child writes ``{"id":
0, "ready": true}``. SIGTERM stops it gracefully (an instance process deregisters
first) and it answers with a last ``{"id": -1, "bye": ...}`` line; end of stdin (the
supervisor is gone) stops it too. Logs go to stderr. With ``--user`` the password is
read from ``$SOAK_ETCD_PASSWORD`` (not argv, which every process can read).

An instance process also runs operations on its registrations (``op``: deregister,
update, drain, register). They may block for as long as etcd is unreachable, so each
runs as a task of its own and the answer only says it started; ``status`` reports how
each one ended (returned or raised, with the error) and when, on the machine-wide
monotonic clock the supervisor shares.
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
import time
from collections.abc import Awaitable, Callable
from typing import Any

from etcdisco import AsyncClient, Registration, ServiceCache

from ._layout import PREFIX, InstanceSpec, initial_metadata, instances_of

log = logging.getLogger("soak.worker")

Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]

_PR_SET_PDEATHSIG = 1
PASSWORD_ENV = "SOAK_ETCD_PASSWORD"


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
                answer = await handler(request["cmd"], request.get("args") or {})
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


def _client(endpoints: str, user: str | None) -> AsyncClient:
    password = os.environ.get(PASSWORD_ENV) if user else None
    return AsyncClient(endpoints=endpoints, prefix=PREFIX, username=user, password=password)


class _Instances:
    """The registrations of one instance process, and the operations run on them."""

    def __init__(self, client: AsyncClient, ttl: int, process: int) -> None:
        self.client = client
        self.ttl = ttl
        self.process = process
        self.specs = {spec.key: spec for spec in instances_of(process)}
        self.regs: dict[str, Registration] = {}
        # Keys drain() was called on (whatever its outcome): draining is for good, it
        # survives update() and re-registration, so etcd must say so from then on.
        self.drained: set[str] = set()
        self.ops: dict[int, dict[str, Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def register(self, spec: InstanceSpec) -> None:
        self.regs[spec.key] = await self.client.register(
            spec.service,
            spec.address,
            instance_id=spec.instance_id,
            metadata=initial_metadata(spec, self.process),
            ttl=self.ttl,
        )

    def status(self) -> dict[str, Any]:
        return {
            "regs": [
                {
                    "key": reg.key,
                    "state": reg.state.value,
                    "lease": reg.lease_id or 0,
                    "re_registrations": reg.re_registrations,
                    "metadata": dict(reg.metadata),
                    "drained": reg.key in self.drained,
                }
                for reg in self.regs.values()
            ],
            "ops": list(self.ops.values()),
        }

    def start_op(self, args: dict[str, Any]) -> dict[str, Any]:
        op_id = int(args["op_id"])
        op, key = str(args["op"]), str(args["key"])
        if op == "register":
            if key not in self.specs or key in self.regs:
                raise ValueError(f"cannot register {key}: unknown or registered already")
        elif key not in self.regs:
            raise ValueError(f"cannot {op} {key}: not registered here")
        record: dict[str, Any] = {
            "op_id": op_id,
            "op": op,
            "key": key,
            "outcome": "pending",
            "started": time.monotonic(),
        }
        self.ops[op_id] = record
        # A registration being deregistered is no longer this process's to report:
        # whatever the call's outcome, the supervisor no longer expects its key.
        reg = self.regs.pop(key) if op == "deregister" else self.regs.get(key)
        task = asyncio.create_task(self._run_op(record, reg, args.get("metadata")))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return {"started": op_id}

    async def _run_op(
        self, record: dict[str, Any], reg: Registration | None, metadata: dict[str, Any] | None
    ) -> None:
        op, key = record["op"], record["key"]
        log.info("op %s %s %s: start", record["op_id"], op, key)
        try:
            if op == "register":
                self.drained.discard(key)  # a new registration, not the drained one
                await self.register(self.specs[key])
            else:
                assert reg is not None
                if op == "deregister":
                    await reg.deregister()
                elif op == "update":
                    assert metadata is not None
                    await reg.update(metadata)
                elif op == "drain":
                    self.drained.add(key)
                    await reg.drain()
                else:
                    raise ValueError(f"unknown op {op!r}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            record.update(outcome="raised", error=f"{type(exc).__name__}: {exc}")
        else:
            record["outcome"] = "returned"
        record["ended"] = time.monotonic()
        if reg is not None and op != "deregister":
            # What the registration says right after the call, whatever its outcome.
            record["metadata_after"] = dict(reg.metadata)
        log.info(
            "op %s %s %s: %s %s",
            record["op_id"],
            op,
            key,
            record["outcome"],
            record.get("error", ""),
        )

    async def stop_ops(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def run_instance(endpoints: str, ttl: int, process: int, user: str | None) -> None:
    stop = _stop_on_sigterm()
    client = _client(endpoints, user)
    fleet = _Instances(client, ttl, process)
    failures: list[str] = []
    try:
        for spec in instances_of(process):
            # A register that raises while etcd has quorum is a finding, not a reason
            # to die: the supervisor reports the errors, the fleet stays whole.
            while True:
                try:
                    await fleet.register(spec)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("registering %s raised: %r", spec.key, exc)
                    failures.append(f"{spec.key}: {type(exc).__name__}: {exc}")
                    await asyncio.sleep(1.0)

        async def handle(cmd: str, args: dict[str, Any]) -> dict[str, Any]:
            if cmd == "status":
                return {**fleet.status(), **_process_figures()}
            if cmd == "op":
                return fleet.start_op(args)
            raise ValueError(f"unknown command {cmd!r}")

        _emit({"id": 0, "ready": True, "pid": os.getpid(), "failures": failures})
        await _serve(handle, stop)
    finally:
        await fleet.stop_ops()
        # Graceful: every key deleted and the lease revoked before we exit.
        await client.close(timeout=5.0)
    _emit({"id": -1, "bye": True, "deregistered": sorted(fleet.regs)})


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


async def run_watcher(endpoints: str, user: str | None) -> None:
    stop = _stop_on_sigterm()
    client = _client(endpoints, user)
    try:
        cache = await client.discover_all()
        await cache.wait_ready(timeout=30.0)

        async def handle(cmd: str, args: dict[str, Any]) -> dict[str, Any]:
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
    parser.add_argument("--user", default=None, help=f"etcd user; password in ${PASSWORD_ENV}")
    args = parser.parse_args(argv)
    _die_with_parent()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {args.kind}{args.process if args.kind == 'instance' else args.name}"
        " %(levelname)s %(name)s: %(message)s",
    )
    if args.kind == "instance":
        asyncio.run(run_instance(args.endpoints, args.ttl, args.process, args.user))
    else:
        asyncio.run(run_watcher(args.endpoints, args.user))


if __name__ == "__main__":
    main()
