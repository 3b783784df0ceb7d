"""What both demos share: the clock that stamps each line they print, and the etcd
they run against (the one at the given endpoints if it answers, else a local one
started for the demo and stopped after it)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import click

from .._async_client import AsyncClient
from .._errors import EtcdError
from ..testing import LocalEtcd


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def say(self, text: str) -> None:
        click.echo(f"[{time.monotonic() - self.start:6.2f}s] {text}")


async def reachable(endpoints: str) -> bool:
    try:
        async with AsyncClient(endpoints, timeout=1.0) as c:
            await c.etcd.get("etcdisco-demo-probe")
        return True
    except EtcdError:
        return False


@contextlib.contextmanager
def local_etcd_if_needed(endpoints: str, reachable: bool, clock: Clock) -> Iterator[str]:
    if reachable:
        clock.say(f"using etcd at {endpoints}")
        yield endpoints
        return
    clock.say(f"no etcd reachable at {endpoints}; starting a local one")
    member = LocalEtcd(name="etcdisco-demo")
    member.start()
    clock.say(f"local etcd {member.version} listening on {member.endpoint}")
    try:
        yield member.endpoint
    finally:
        member.close()
        clock.say("local etcd stopped")
