"""HTTP servers that register and drain (``etcdisco.uvicorn``, ``etcdisco serve``,
``etcdisco.asgi.lifespan``), as real uvicorn processes against a real etcd.

The drain-first path (``etcdisco serve``) is held to zero failed requests through a
rolling restart under load; the lifespan-only path (plain uvicorn, the registration
removed from the lifespan's teardown) is measured: its failed requests per restart
are printed, not asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import etcdisco
import etcdisco.http
from etcdisco import EventType, Status
from etcdisco.etcd import EtcdClient, Watch, WatchEvent, WatchEventType

from .._util import wait_event
from ..asgi_apps.fleet import (
    ROOT,
    Fleet,
    Load,
    Registry,
    SessionView,
    descendants,
    free_port,
    http_client,
    names,
    posts_after_draining,
    rolling_restart,
    start_uvicorn,
)
from ._cli_process import CliProcess

SERVICE = "hello"


@contextlib.asynccontextmanager
async def following(
    endpoint: str, service: str = SERVICE
) -> AsyncIterator[tuple[etcdisco.AsyncClient, Registry]]:
    async with etcdisco.AsyncClient(endpoint) as client, client.discover(service) as cache:
        await cache.wait_ready(10)
        yield client, Registry(cache)


async def exited(proc: CliProcess, timeout: float = 30) -> int:
    """The exit code of a process that ends on its own (no signal sent), with all its
    output read."""
    try:
        async with asyncio.timeout(timeout):
            await proc.proc.wait()
    except TimeoutError:
        await proc.kill()
        raise AssertionError(f"still running after {timeout}s\n{proc.said()}") from None
    return await proc.stop()


async def _get(url: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(url, timeout=5)


# -- the rolling restart: drain-first loses nothing, lifespan-only is measured ---------


async def test_rolling_restart_drain_first_fails_no_request(etcd) -> None:
    async with following(etcd.endpoint) as (client, registry):
        fleet = Fleet(etcd.endpoint, SERVICE, registry, "drain-first")
        try:
            servers = [await fleet.start(name) for name in names(3)]
            async with http_client(client, SERVICE) as http:
                load = Load(http, SERVICE)
                load.start()
                try:
                    for server in servers:
                        await load.served_by(server.name)
                    restart = await rolling_restart(fleet, load, servers)
                finally:
                    await load.stop()
        finally:
            await fleet.close()

    failures = load.failures()
    assert not failures, [f"{r.method} {r.error}" for r in failures[:5]]
    posts = [r for r in load.records if r.method == "POST" and r.name]
    assert len(posts) > 100, len(posts)
    # No POST went to an instance after the client saw it draining...
    late = posts_after_draining(load, registry.draining)
    assert not late, [(r.name, r.state_at_arrival) for r in late[:5]]
    # ...and every old server drained (quiet), deregistered and exited 0.
    for old in restart.stopped:
        assert old.exit_code == 0, old.proc.said()
        assert old.drained is not None and old.drained["quiet"], old.proc.said()
        assert registry.counts[(old.name, "removed")] == 1
    served = load.per_server()
    assert all(served[n] > 0 for n in ("v1-a", "v1-b", "v1-c", "v2-a", "v2-b", "v2-c")), served
    arrived_draining = sum(1 for r in load.records if r.state_at_arrival == "draining")
    print(
        f"\ndrain-first: {len(load.records)} requests, failed per restart "
        f"{restart.failed_per_restart}, {arrived_draining} answered while draining "
        f"(sent before the client saw it), per server {dict(served)}"
    )


async def test_rolling_restart_lifespan_only_is_measured(etcd, record_property) -> None:
    """Deregistering in the lifespan's teardown happens after uvicorn has closed its
    listeners: callers without retries (max_attempts=1) see failures. Reported, not
    asserted: it depends on timing."""
    async with following(etcd.endpoint) as (client, registry):
        fleet = Fleet(etcd.endpoint, SERVICE, registry, "lifespan")
        try:
            servers = [await fleet.start(name) for name in names(3)]
            async with http_client(client, SERVICE, max_attempts=1) as http:
                load = Load(http, SERVICE)
                load.start()
                try:
                    for server in servers:
                        await load.served_by(server.name)
                    restart = await rolling_restart(fleet, load, servers)
                finally:
                    await load.stop()
        finally:
            await fleet.close()

    for old in restart.stopped:
        # uvicorn raises the signal again once it has shut down: -SIGTERM is its clean exit.
        assert old.exit_code == -signal.SIGTERM, old.proc.said()
        assert registry.counts[(old.name, "removed")] == 1
    kinds = sorted({(r.error or "").split(":")[0] for r in load.failures()})
    record_property("failed_per_restart", restart.failed_per_restart)
    print(
        f"\nlifespan-only: {len(load.records)} requests, failed per restart "
        f"{restart.failed_per_restart} ({kinds})"
    )


async def test_rolling_restart_drain_first_through_requests_fails_no_request(etcd) -> None:
    """The same rolling restart, called through the requests adapter (blocking calls in
    threads): it skips a draining instance as the httpx transport does."""
    async with following(etcd.endpoint) as (_, registry):
        fleet = Fleet(etcd.endpoint, SERVICE, registry, "drain-first")
        try:
            servers = [await fleet.start(name) for name in names(3)]
            with (
                etcdisco.Client(etcd.endpoint) as sync_registry,
                etcdisco.http.Session(sync_registry, [SERVICE]) as session,
            ):
                load = Load(session, SERVICE)
                load.start()
                try:
                    for server in servers:
                        await load.served_by(server.name)
                    # The session's routes exist now: its view is recorded after theirs.
                    view = SessionView(sync_registry, SERVICE)
                    try:
                        restart = await rolling_restart(fleet, load, servers)
                    finally:
                        view.close()
                finally:
                    await load.stop()
        finally:
            await fleet.close()

    failures = load.failures()
    assert not failures, [f"{r.method} {r.error}" for r in failures[:5]]
    posts = [r for r in load.records if r.method == "POST" and r.name]
    assert len(posts) > 50, len(posts)
    # Judged by the session's own view: the test's async client has another watch.
    assert set(view.draining) == {s.name for s in servers}, view.draining
    late = posts_after_draining(load, view.draining)
    assert not late, [(r.name, r.state_at_arrival) for r in late[:5]]
    for old in restart.stopped:
        assert old.exit_code == 0, old.proc.said()
        assert registry.counts[(old.name, "removed")] == 1
    print(f"\ndrain-first, requests: {len(load.records)} requests, per server {load.per_server()}")


@pytest.mark.parametrize("flavour", ["httpx-async", "requests"])
async def test_sigkill_of_a_uvicorn_instance_under_idempotent_load_fails_no_request(
    etcd, flavour: str
) -> None:
    """One of 3 ``etcdisco serve`` processes is SIGKILLed under a GET load: its key stays
    until its lease expires (TTL 5 s), and meanwhile every request that meets its
    refused port or broken connection goes to another instance."""
    async with following(etcd.endpoint) as (client, registry):
        fleet = Fleet(etcd.endpoint, SERVICE, registry, "drain-first", ttl=5)
        try:
            servers = [await fleet.start(name) for name in names(3)]
            async with contextlib.AsyncExitStack() as stack:
                if flavour == "httpx-async":
                    http: Any = await stack.enter_async_context(http_client(client, SERVICE))
                else:
                    sync_registry = stack.enter_context(etcdisco.Client(etcd.endpoint))
                    http = stack.enter_context(etcdisco.http.Session(sync_registry, [SERVICE]))
                load = Load(http, SERVICE, methods=("GET",))
                load.start()
                try:
                    for server in servers:
                        await load.served_by(server.name)
                    victim = servers[0]
                    killed_at = len(load.records)
                    await victim.proc.kill()  # SIGKILL: no drain, no deregistration
                    await registry.wait(victim.name, "removed")  # its lease expired
                    removed_at = len(load.records)
                finally:
                    await load.stop()
                retries = http.balancer.route(SERVICE).pool.retries
        finally:
            await fleet.close()

    failures = load.failures()
    assert not failures, [f"{r.method} {r.error}" for r in failures[:5]]
    # The load went on all through the window where the dead instance was registered.
    # (A count, not a rate: a loaded machine sends fewer in the TTL's 5 s.)
    assert removed_at - killed_at > 20, (killed_at, removed_at)
    assert retries > 0, "no request met the killed instance"
    assert registry.counts[(victim.name, "draining")] == 0
    print(
        f"\nSIGKILL, {flavour}: {removed_at - killed_at} requests while the dead instance "
        f"was registered, {retries} retried, per server {load.per_server()}"
    )


# -- registration once the port accepts ------------------------------------------------


async def _start(mode: str, endpoint: str, port: int, name: str, env: dict[str, str]) -> CliProcess:
    """One server on ``port``: ``etcdisco serve`` (drain-first), plain uvicorn with the
    app's etcdisco lifespan (lifespan), or etcdisco.uvicorn.run adopting that lifespan
    (adopted)."""
    if mode == "drain-first":
        return await CliProcess.start(
            "serve", SERVICE, "--app", "tests.asgi_apps.app:app", "--app-dir", str(ROOT),
            "--port", str(port), "--json", "--endpoints", endpoint, "--meta", f"name={name}",
            "--quiet-period", "3", "--health-path", "/healthz",
            *(["--check", f"http://127.0.0.1:{port}/", "--check-interval", "0.5"]
              if env.get("APP_CHECK") == "1" else []),
            env={"APP_NAME": name, **env},
        )  # fmt: skip
    lifespan_env = {"APP_NAME": name, "APP_LIFESPAN": "1", "APP_PORT": str(port), **env}
    if mode == "lifespan":
        return await start_uvicorn(endpoint, port, env=lifespan_env)
    script = (
        "import logging; logging.basicConfig(level=logging.INFO); "
        "import etcdisco.uvicorn; etcdisco.uvicorn.run('tests.asgi_apps.app:app', "
        f"port={port}, quiet_period=3.0, health_path='/healthz')"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**_base_env(), "ETCDISCO_ENDPOINTS": endpoint, **lifespan_env},
        cwd=str(ROOT),
    )  # fmt: skip
    return CliProcess(proc)


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("ETCDISCO_", "APP_"))}


@pytest.mark.parametrize("mode", ["drain-first", "lifespan", "adopted"])
async def test_registered_only_once_the_port_accepts(etcd, mode: str) -> None:
    """The app's startup takes a second before uvicorn binds; the instance carries an
    HTTP check on its own port. Registered at startup, its first check would fail (and
    the instance would start unhealthy) and a caller would meet a refused port."""
    port = free_port()
    async with following(etcd.endpoint) as (_, registry):
        proc = await _start(
            mode, etcd.endpoint, port, "slow", {"APP_STARTUP_DELAY": "1", "APP_CHECK": "1"}
        )
        try:
            events = registry.cache.events()
            added = await wait_event(
                events, EventType.ADDED, f"services/{SERVICE}/127.0.0.1:{port}", 20
            )
            answer = await _get(f"http://{added.instance.address}/")  # at once: no retry
            assert answer.status_code == 200
            assert answer.json()["state"] == "serving"
            assert added.instance.status is Status.UP, added.instance
        finally:
            await proc.stop()


# -- SIGTERM: drain while the listeners still accept -----------------------------------


@pytest.mark.parametrize("mode", ["drain-first", "adopted", "lifespan"])
async def test_sigterm_drains_before_the_listeners_close(etcd, mode: str) -> None:
    """Drain-first (etcdisco serve, or etcdisco.uvicorn adopting the app's lifespan):
    when clients see "draining" the port still answers (readiness 503, requests 200),
    and when the key goes the port is closed already. Lifespan-only: by the time the
    key says "draining", the port refuses connections: that is the failure window."""
    port = free_port()
    key = f"services/{SERVICE}/127.0.0.1:{port}"
    async with following(etcd.endpoint) as (_, registry):
        proc = await _start(mode, etcd.endpoint, port, "one", {})
        events = registry.cache.events()
        try:
            await wait_event(events, EventType.ADDED, key, 20)
            proc.proc.send_signal(signal.SIGTERM)
            draining = await wait_event(events, EventType.UPDATED, key, 20)
            assert draining.instance.status is Status.DRAINING
            if mode == "lifespan":
                with pytest.raises(httpx.ConnectError):
                    await _get(f"http://127.0.0.1:{port}/")
            else:
                ready = await _get(f"http://127.0.0.1:{port}/healthz")
                assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
                answer = await _get(f"http://127.0.0.1:{port}/")
                assert (answer.status_code, answer.json()["state"]) == (200, "draining")
            await wait_event(events, EventType.REMOVED, key, 20)
            with pytest.raises(httpx.ConnectError):
                await _get(f"http://127.0.0.1:{port}/")  # closed before the key went
            code = await exited(proc)  # after the one SIGTERM
        finally:
            await proc.kill()
    assert code == (-signal.SIGTERM if mode == "lifespan" else 0), proc.said()
    if mode == "drain-first":
        said = [e for e in map(json.loads, proc.out) if e.get("event") != "registered"]
        assert [e["event"] for e in said] == ["draining", "drained", "deregistered"], said
        assert said[1]["quiet"] is True and said[1]["requests"] == 1, said


# -- several workers: one registration per address --------------------------------------


async def _pids_answering(address: str, want: int, attempts: int = 300) -> set[int]:
    """Pids of the processes answering at ``address`` (a new connection each time),
    once ``want`` of them have answered (at most ``attempts`` requests)."""
    pids: set[int] = set()
    for _ in range(attempts):
        async with httpx.AsyncClient() as http:
            pids.add((await http.get(f"http://{address}/", timeout=5)).json()["pid"])
        if len(pids) >= want:
            break
    return pids


@pytest.mark.parametrize("mode", ["drain-first", "lifespan"])
async def test_two_workers_leave_one_key_and_deregister_it_once(
    etcd, mode: str, tmp_path: Path
) -> None:
    """drain-first: ``etcdisco serve --workers 2`` (the master registers); lifespan:
    ``uvicorn --workers 2`` with the app's etcdisco lifespan (a lock file elects one
    worker). Either way one key, while two processes serve it, and one removal."""
    async with following(etcd.endpoint) as (client, registry):
        fleet = Fleet(etcd.endpoint, SERVICE, registry, mode, workers=2)
        try:
            server = await fleet.start("w", env={"APP_LOCK_DIR": str(tmp_path / "locks")})
            pids = await _pids_answering(server.address, 2)
            assert len(pids) == 2, f"only {pids} answered"
            assert server.proc.proc.pid not in pids  # workers answer, not the master
            instances = await client.list_instances(SERVICE)
            assert [i.address for i in instances] == [server.address]
            # Written once: a second registrant would have put the same key again.
            async with EtcdClient(etcd.endpoint) as kv:
                (entry,) = (await kv.get(f"services/{SERVICE}/{server.address}")).kvs
            assert entry.version == 1, f"the key was put {entry.version} times"
            await fleet.stop(server)
        finally:
            await fleet.close()
        await registry.wait("w", "removed")
        assert await client.list_instances(SERVICE) == ()
    assert server.exit_code in (0, -signal.SIGTERM), server.proc.said()
    assert registry.counts[("w", "added")] == 1, registry.counts
    assert registry.counts[("w", "removed")] == 1, registry.counts
    if mode == "drain-first":
        assert server.exit_code == 0
        assert registry.times[("w", "draining")] < registry.times[("w", "removed")]


async def test_a_dead_worker_leaves_the_registration_in_place(etcd) -> None:
    """The master replaces a worker killed by SIGKILL; the key is not touched (same
    lease, same revision) while the other worker and the replacement serve."""
    async with following(etcd.endpoint) as (client, registry):
        proc = await CliProcess.start(
            "serve", SERVICE, "--app", "tests.asgi_apps.app:app", "--app-dir", str(ROOT),
            "--port", "0", "--json", "--endpoints", etcd.endpoint, "--workers", "2",
            "--meta", "name=w", "--log-level", "info", "--no-access-log",
            env={"APP_NAME": "w"},
        )  # fmt: skip
        try:
            address = (await proc.event("registered", timeout=30))["address"]
            (before,) = await client.list_instances(SERVICE)
            pids = await _pids_answering(address, 2)
            assert len(pids) == 2
            victim = sorted(pids)[0]
            assert victim in descendants(proc.proc.pid)
            os.kill(victim, signal.SIGKILL)
            await proc.line(f"worker process [{victim}] died", stderr=True)
            await proc.wait_for(
                lambda: sum("started worker process" in line for line in proc.err) >= 3,
                30,
                "a replacement worker",
            )
            survivors = await _pids_answering(address, 2)
            assert victim not in survivors and len(survivors) == 2, survivors
            (after,) = await client.list_instances(SERVICE)
            assert (after.lease, after.revision) == (before.lease, before.revision)
            assert registry.counts[("w", "removed")] == 0
            assert registry.counts[("w", "draining")] == 0
            proc.proc.send_signal(signal.SIGTERM)
            assert await exited(proc) == 0, proc.said()
        finally:
            await proc.kill()
        assert await client.list_instances(SERVICE) == ()


async def test_lifespan_workers_a_dead_registrant_is_replaced_and_the_key_stays(
    etcd, tmp_path: Path
) -> None:
    """``uvicorn --workers 2`` with the app's etcdisco lifespan: SIGKILL the worker that
    holds the address lock (and so the registration). The kernel drops its lock;
    uvicorn starts a worker in its place, which takes the lock and registers the
    address again under a lease of its own; the key is never removed meanwhile."""
    locks = tmp_path / "locks"
    async with following(etcd.endpoint) as (client, registry):
        fleet = Fleet(etcd.endpoint, SERVICE, registry, "lifespan", workers=2)
        try:
            server = await fleet.start("w", env={"APP_LOCK_DIR": str(locks)})
            key = f"services/{SERVICE}/{server.address}"
            (before,) = await client.list_instances(SERVICE)
            (lock,) = locks.iterdir()
            holder = int(lock.read_text())
            assert holder in descendants(server.proc.proc.pid)
            async with EtcdClient(etcd.endpoint) as kv, kv.watch(key) as watch:
                os.kill(holder, signal.SIGKILL)
                again = await _next_write(watch, 20)  # same value: the cache sees no change
            assert again.type is WatchEventType.PUT, again  # never deleted
            assert again.kv.lease != before.lease
            successor = int(lock.read_text())
            assert successor != holder and successor in descendants(server.proc.proc.pid)
            assert registry.counts[("w", "removed")] == 0
            assert (await _get(f"http://{server.address}/")).status_code == 200
            await fleet.stop(server)
        finally:
            await fleet.close()
        await registry.wait("w", "removed")
        assert await client.list_instances(SERVICE) == ()
    assert registry.counts[("w", "removed")] == 1


async def _next_write(watch: Watch, timeout: float) -> WatchEvent:
    """The next put or delete a raw etcd watch sees, within ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            async for batch in watch:
                if batch.events:
                    return batch.events[0]
    except TimeoutError:
        pass
    raise AssertionError(f"the key was not written again within {timeout}s")


# -- etcdisco serve, end to end -------------------------------------------------------


async def test_serve_registers_serves_drains_and_exits_0(etcd) -> None:
    async with following(etcd.endpoint) as (client, registry):
        proc = await CliProcess.start(
            "serve", SERVICE, "--app", "tests.asgi_apps.app:app", "--app-dir", str(ROOT),
            "--port", "0", "--json", "--endpoints", etcd.endpoint, "--meta", "version=2",
            "--meta", "name=e2e", "--health-path", "/healthz", "--quiet-period", "0.5",
            env={"APP_NAME": "e2e"},
        )  # fmt: skip
        try:
            registered = await proc.event("registered", timeout=30)
            address = registered["address"]
            assert registered["keys"] == [f"services/{SERVICE}/{address}"]
            (instance,) = await client.list_instances(SERVICE)
            assert instance.metadata == {"version": "2", "name": "e2e"}
            async with http_client(client, SERVICE) as http:
                answer = await http.get(f"http://{SERVICE}/")
                assert answer.json()["name"] == "e2e"
                assert answer.json()["state"] == "serving"  # request.app.state.etcdisco
                ready = await http.get(f"http://{SERVICE}/healthz")
                assert (ready.status_code, ready.json()) == (200, {"status": "serving"})
            proc.proc.send_signal(signal.SIGTERM)
            code = await exited(proc)
        finally:
            await proc.kill()
        await registry.wait("e2e", "removed")
    assert code == 0, proc.said()
    events = [json.loads(line)["event"] for line in proc.out]
    assert events == ["registered", "draining", "drained", "deregistered"], proc.said()
    assert not any("uvicorn" in line or "GET /" in line for line in proc.out)  # stdout is ours


async def test_serve_text_output(etcd) -> None:
    proc = await CliProcess.start(
        "serve", SERVICE, "--app", "tests.asgi_apps.app:app", "--app-dir", str(ROOT),
        "--port", "0", "--endpoints", etcd.endpoint, "--quiet-period", "0",
    )  # fmt: skip
    try:
        line = await proc.line("registered ", timeout=30)
        assert line.startswith(f"registered services/{SERVICE}/127.0.0.1:"), line
        assert await proc.stop() == 0
    finally:
        await proc.kill()
    text = "\n".join(proc.out)
    assert "draining 127.0.0.1:" in text and "drained in " in text, text
    assert "deregistered 127.0.0.1:" in text, text


@pytest.mark.parametrize(
    ("app", "said"),
    [
        ("nosuchmodule:app", "no module named 'nosuchmodule'"),
        ("tests.asgi_apps.app", "is not MODULE:ATTRIBUTE"),
    ],
)
async def test_serve_refuses_an_app_it_cannot_find(app: str, said: str) -> None:
    proc = await CliProcess.start(
        "serve", SERVICE, "--app", app, "--app-dir", str(ROOT), "--endpoints", "127.0.0.1:1"
    )
    code = await exited(proc)
    assert code == 2, proc.said()
    assert said in proc.everything(), proc.said()


async def test_serve_without_etcd_fails_in_one_line_and_stops_listening() -> None:
    port = free_port()
    proc = await CliProcess.start(
        "serve", SERVICE, "--app", "tests.asgi_apps.app:app", "--app-dir", str(ROOT),
        "--port", str(port), "--endpoints", "127.0.0.1:1", "--timeout", "1",
    )  # fmt: skip
    code = await exited(proc)
    assert code == 1, proc.said()
    errors = [line for line in proc.err if line.startswith("etcdisco: error:")]
    assert len(errors) == 1, proc.said()
    assert "Traceback" not in proc.everything(), proc.said()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # nothing listens there any more
