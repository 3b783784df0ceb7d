"""Several xDS control planes against one etcd: the fan-out layer for gRPC clients,
and what a client does when the control plane it talks to dies.

Two ``etcdisco xds`` processes read the same etcd; one gRPC client process (grpcio,
see CLIENT in test_xds.py) has a bootstrap listing both. gRPC's xDS fallback (gRFC
A71, on by default in grpcio 1.85) only moves to the second server when the first is
unreachable *and* the client needs a resource it has not cached, and grpcio keeps one
xDS client per channel target. Measured here: a client that already holds its
configuration keeps it and keeps calling, without errors; registry changes for that
target reach it only when the first control plane is back at its address. A new
target falls back to the second server at once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from etcdisco import AsyncClient
from etcdisco.grpc.xds import bootstrap_config
from etcdisco.testing import LocalEtcd

from ._cli_process import CliProcess
from .test_xds import backends, xds_client


def report(what: str, value: str) -> None:
    print(f"xds scale-out: {what}: {value}")


async def _control_plane(etcd: LocalEtcd) -> tuple[CliProcess, str]:
    process = await CliProcess.start("xds", "--endpoints", etcd.endpoint, "--listen", "127.0.0.1:0")
    line = await process.line("listening on", 20)
    return process, line.rsplit(" ", 1)[1]


@pytest.fixture
async def control_planes(etcd: LocalEtcd) -> AsyncIterator[list[tuple[CliProcess, str]]]:
    """Two ``etcdisco xds`` processes on the same etcd: (process, address) each."""
    started: list[tuple[CliProcess, str]] = []
    try:
        for _ in range(2):
            started.append(await _control_plane(etcd))
        yield started
    finally:
        for process, _ in started:
            await process.kill()


def two_server_bootstrap(primary: str, secondary: str) -> dict[str, Any]:
    bootstrap = bootstrap_config(primary, node_id="scale-out-test")
    second = bootstrap_config(secondary)["xds_servers"][0]
    bootstrap["xds_servers"].append(second)
    return bootstrap


async def test_client_survives_the_loss_of_its_control_plane(
    etcd: LocalEtcd, control_planes: list[tuple[CliProcess, str]]
) -> None:
    (primary, primary_address), (_, secondary_address) = control_planes
    bootstrap = two_server_bootstrap(primary_address, secondary_address)
    async with (
        AsyncClient(etcd.endpoint) as registry,
        backends(2) as servers,
        backends(2, first=2) as (late, other),
        xds_client(bootstrap) as caller,
    ):
        for backend in servers:
            await registry.register("echo", backend.address, ttl=10)
        for name in ("b0", "b1"):
            warm = await caller.run(op="until", want=name, present=True, within=15)
            assert warm["at"] is not None, f"{name} never answered: {warm}"

        await primary.kill()  # SIGKILL: the client's ADS stream breaks
        killed = time.time()
        # gRPC keeps its last configuration: calls go on, none fails.
        after = await caller.run(op="call", n=40)
        assert after["n_errors"] == 0, f"calls failed after the control plane died: {after}"
        assert sorted(after["counts"]) == ["b0", "b1"], after

        # A registry change made after the kill. Both control planes saw it in etcd,
        # but the client's resources are all cached, so it does not fall back (A71).
        changed = time.time()
        await registry.register("echo", late.address, ttl=10)
        stale = await caller.run(op="until", want="b2", present=True, within=8, timeout=30)
        report(
            "primary killed, instance added, client holding its configuration",
            f"b2 reached after {stale['at'] - changed:.2f}s"
            if stale["at"] is not None
            else "b2 not reached in 8s (no fallback while every resource is cached)",
        )
        assert stale["n_errors"] == 0, stale
        assert stale["at"] is None, "the client fell back without needing a new resource"

        # A resource the client has not cached (a new target) makes gRPC fall back to
        # the second server, for that target: grpcio keeps one xDS client per target,
        # so the channel that already holds its configuration stays where it was.
        await registry.register("echo2", other.address, ttl=10)
        asked = time.time()
        fallback = await caller.run(
            op="until", want="b3", present=True, target="xds:///echo2", within=20, timeout=40
        )
        assert fallback["at"] is not None, f"no fallback for a new target: {fallback}"
        still = await caller.run(op="until", want="b2", present=True, within=5, timeout=30)
        assert still["n_errors"] == 0, still
        assert still["at"] is None, "the cached target moved to the second server"
        report(
            "new target after the kill -> first call through the second server",
            f"{fallback['at'] - asked:.2f}s; the old target still misses the change",
        )

        # The control plane comes back at the same address (a supervisor restarting
        # it): the client reconnects and gets the change.
        port = primary_address.rsplit(":", 1)[1]
        back = await CliProcess.start(
            "xds", "--endpoints", etcd.endpoint, "--listen", f"127.0.0.1:{port}"
        )
        try:
            await back.line("listening on", 20)
            restarted = time.time()
            caught_up = await caller.run(op="until", want="b2", present=True, within=30, timeout=45)
        finally:
            await back.kill()
        assert caught_up["at"] is not None, f"the change never arrived: {caught_up}"
        assert caught_up["n_errors"] == 0, caught_up
        report(
            "control plane back at the same address -> client has the change",
            f"{caught_up['at'] - restarted:.2f}s (primary was down {restarted - killed:.1f}s)",
        )
