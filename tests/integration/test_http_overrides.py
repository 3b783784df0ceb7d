"""Operator overrides honoured by the HTTP transports (etcdisco.http): a disabled
instance gets no request, an override weight steers weighted picks, and enabling brings
the instance back, all set by another client (as ``etcdisco disable`` does) against
real HTTP servers registered in a real etcd."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import etcdisco
import etcdisco.http

from .._util import eventually
from ..http_echo.server import EchoServer


@pytest.fixture
def fleet() -> Iterator[list[EchoServer]]:
    servers = [EchoServer(f"s{n}").start() for n in range(3)]
    try:
        yield servers
    finally:
        for server in servers:
            server.close()


async def test_http_client_honours_disable_and_weight_overrides(
    etcd: Any, fleet: list[EchoServer]
) -> None:
    s0, _, s2 = fleet
    async with (
        etcdisco.AsyncClient(etcd.endpoint) as registry,
        etcdisco.AsyncClient(etcd.endpoint) as operator,
    ):
        regs = [await registry.register("users", s.address, ttl=10) for s in fleet]
        async with etcdisco.http.AsyncClient(
            registry, services=["users"], policy="weighted_round_robin"
        ) as http:

            async def served(n: int) -> Counter[str]:
                replies = [await http.get("http://users/x") for _ in range(n)]
                return Counter(r.json()["server"] for r in replies)

            def seen(address: str, **state: Any) -> bool:
                found = [i for i in http.balancer.instances("users") if i.address == address]
                return bool(found) and all(getattr(found[0], k) == v for k, v in state.items())

            assert await served(30) == {"s0": 10, "s1": 10, "s2": 10}

            await operator.set_override(
                "users", regs[0].instance_id, disabled=True, reason="bad disk", by="ops"
            )
            await eventually(
                lambda: seen(s0.address, status=etcdisco.Status.DISABLED),
                10,
                "the disable never reached the transport",
            )
            assert await served(30) == {"s1": 15, "s2": 15}

            await operator.set_override("users", regs[2].instance_id, weight=3)
            await eventually(
                lambda: seen(s2.address, weight=3), 10, "the weight never reached the transport"
            )
            assert await served(40) == {"s1": 10, "s2": 30}

            # Enabled again: back in rotation, while the weight override stays.
            assert await operator.set_override("users", regs[0].instance_id, disabled=False) is None
            await eventually(
                lambda: seen(s0.address, status=etcdisco.Status.UP),
                10,
                "the enable never reached the transport",
            )
            assert await served(50) == {"s0": 10, "s1": 10, "s2": 30}
