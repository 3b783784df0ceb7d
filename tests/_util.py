"""Bounded waits with clear failure messages (never a bare sleep as synchronisation)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from etcdisco import ChangeEvent, EventType
from etcdisco.discovery import EventStream

T = TypeVar("T")


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    message: str,
    interval: float = 0.05,
) -> float:
    """Poll ``check`` until it is true; returns the seconds it took. Used only where no
    event exists to await (state held in etcd, for instance)."""
    start = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{message} (waited {timeout}s)")
        await asyncio.sleep(interval)


async def next_event(
    stream: EventStream, timeout: float, what: str = "a change event"
) -> ChangeEvent:
    try:
        return await asyncio.wait_for(anext(stream), timeout)
    except TimeoutError:
        raise AssertionError(f"no {what} within {timeout}s") from None


async def wait_event(
    stream: EventStream,
    kind: EventType,
    key: str,
    timeout: float,
) -> ChangeEvent:
    """Wait for the event ``kind`` on ``key``, skipping unrelated ones."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {kind.value} event for {key} within {timeout}s")
        ev = await next_event(stream, left, f"{kind.value} event for {key}")
        if ev.type is kind and ev.instance.key == key:
            return ev


async def communicate(proc: asyncio.subprocess.Process, timeout: float) -> tuple[bytes, bytes]:
    """``proc.communicate()`` within ``timeout``; a process still running after it (or
    after any failure here) is killed, so no test leaves one behind."""
    try:
        async with asyncio.timeout(timeout):
            return await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
