"""One watcher process for propagation.py: a discovery cache and a bare watch, side by side.

    python benchmarks/propagation_watcher.py ENDPOINT SERVICE FLOOR_PREFIX

Holds one AsyncClient with a `discover(SERVICE)` cache (what an application holds) and,
on a connection of its own, one `EtcdClient` watch on FLOOR_PREFIX (the floor). The
parent writes to the two key ranges in turn, so one never wakes the other. Prints one
line per event to stdout:

    R <perf_counter implementation>     once both are open
    E <key> <time.perf_counter()>       an instance ADDED to the cache / a put under FLOOR_PREFIX

The time is taken in this process when the change is applied (the cache listener runs
after the cache has it) or when the watch response is decoded. Exits when stdin closes,
so the parent ending, however it ends, ends this process too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time

from etcdisco import AsyncClient, ChangeEvent, EventType
from etcdisco.etcd import EtcdClient, WatchEventType


def emit(lines: list[str]) -> None:
    # One write per batch, unbuffered: the parent reads these as they come.
    os.write(1, "".join(lines).encode())


def on_cache_change(events: list[ChangeEvent]) -> None:
    now = time.perf_counter()
    lines = [f"E {ev.instance.key} {now!r}\n" for ev in events if ev.type is EventType.ADDED]
    if lines:
        emit(lines)


async def follow_floor(etcd: EtcdClient, prefix: str, opened: asyncio.Event) -> None:
    async with etcd.watch(prefix, prefix=True) as watch:
        opened.set()
        async for batch in watch:
            now = time.perf_counter()
            lines = [
                f"E {ev.kv.key.decode()} {now!r}\n"
                for ev in batch.events
                if ev.type is WatchEventType.PUT
            ]
            if lines:
                emit(lines)


async def main(endpoint: str, service: str, floor_prefix: str) -> None:
    async with (
        AsyncClient(endpoint) as client,
        client.discover(service) as cache,
        EtcdClient(endpoint) as etcd,
    ):
        await cache.wait_ready(60)
        cache.add_listener(on_cache_change)
        opened = asyncio.Event()
        floor = asyncio.create_task(follow_floor(etcd, floor_prefix, opened))
        opening = asyncio.ensure_future(opened.wait())
        try:
            await asyncio.wait({opening, floor}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            if floor.done():
                floor.result()  # raises what ended it
            if not opened.is_set():
                raise TimeoutError("the floor watch did not open within 60 s")
            emit([f"R {time.get_clock_info('perf_counter').implementation}\n"])
            # Blocks a worker thread until the parent closes our stdin (or dies).
            await asyncio.to_thread(sys.stdin.buffer.read)
        finally:
            opening.cancel()
            floor.cancel()
            try:
                await floor
            except asyncio.CancelledError:
                if not floor.cancelled():
                    raise


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(*sys.argv[1:4]))
