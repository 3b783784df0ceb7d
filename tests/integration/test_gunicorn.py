"""gunicorn with uvicorn workers and ``etcdisco.gunicorn``'s hooks, as real processes
against a real etcd: one key per listening address whatever the number of workers,
drained before gunicorn closes its listeners (zero failed requests through a rolling
restart), and a dead worker replaced with the registration left in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator

import httpx
import pytest

import etcdisco
from etcdisco.etcd import EtcdClient

from ..asgi_apps.fleet import (
    ROOT,
    Fleet,
    Load,
    Registry,
    Server,
    descendants,
    free_port,
    http_client,
    names,
    posts_after_draining,
    rolling_restart,
)
from ._cli_process import CliProcess

pytest.importorskip("gunicorn")
pytest.importorskip("uvicorn_worker")

SERVICE = "hello"
CONF = str(ROOT / "tests" / "asgi_apps" / "gunicorn_conf.py")


@contextlib.asynccontextmanager
async def following(endpoint: str) -> AsyncIterator[tuple[etcdisco.AsyncClient, Registry]]:
    async with etcdisco.AsyncClient(endpoint) as client, client.discover(SERVICE) as cache:
        await cache.wait_ready(10)
        yield client, Registry(cache)


async def start_gunicorn(
    endpoint: str, port: int, *, workers: int, config: str = CONF, env: dict[str, str]
) -> CliProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ETCDISCO_", "APP_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gunicorn", "-c", config, "tests.asgi_apps.app:app",
        "--chdir", str(ROOT), "-b", f"127.0.0.1:{port}", "-w", str(workers),
        "--graceful-timeout", "10", "--no-control-socket",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**base, "ETCDISCO_ENDPOINTS": endpoint, **env},
    )  # fmt: skip
    return CliProcess(proc)


class GunicornFleet(Fleet):
    """Servers of ``hello`` run by gunicorn (``workers`` uvicorn workers each), with
    ``tests/asgi_apps/gunicorn_conf.py``."""

    def __init__(self, endpoint: str, registry: Registry, *, workers: int = 2) -> None:
        super().__init__(endpoint, SERVICE, registry, "drain-first", workers=workers)

    async def start(self, name: str, *, env: dict[str, str] | None = None) -> Server:
        proc = await start_gunicorn(
            self.endpoint,
            free_port(),
            workers=self.workers,
            env={"APP_NAME": name, "APP_TTL": str(self.ttl), **(env or {})},
        )
        server = Server(name, proc, "gunicorn")
        self.servers.append(server)
        try:
            await self.registry.wait(name, "added")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{proc.said()}") from None
        server.address = self.registry.addresses[name]
        return server


async def _pids_answering(address: str, want: int, attempts: int = 300) -> set[int]:
    """Pids of the workers answering at ``address`` (a new connection each request)."""
    pids: set[int] = set()
    for _ in range(attempts):
        async with httpx.AsyncClient() as http:
            pids.add((await http.get(f"http://{address}/", timeout=5)).json()["pid"])
        if len(pids) >= want:
            break
    return pids


async def test_two_workers_leave_one_key_and_deregister_it_once(etcd) -> None:
    """``gunicorn -w 2 -c python:etcdisco.gunicorn.conf``: two workers answer, one key,
    written once (version 1); SIGTERM drains it (readiness 503 while the port still
    serves), then removes it once, after the port has closed; gunicorn exits 0."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    key = f"services/{SERVICE}/{address}"
    async with following(etcd.endpoint) as (client, registry):
        proc = await start_gunicorn(
            etcd.endpoint, port, workers=2, config="python:etcdisco.gunicorn.conf",
            env={"ETCDISCO_SERVICES": SERVICE, "ETCDISCO_HEALTH_PATH": "/healthz",
                 "ETCDISCO_QUIET_PERIOD": "3", "APP_NAME": "w"},
        )  # fmt: skip
        try:
            await registry.wait(address, "added")
            pids = await _pids_answering(address, 2)
            assert len(pids) == 2, f"only {pids} answered\n{proc.said()}"
            assert proc.proc.pid not in pids
            instances = await client.list_instances(SERVICE)
            assert [i.address for i in instances] == [address]
            async with EtcdClient(etcd.endpoint) as kv:
                (entry,) = (await kv.get(key)).kvs
            assert entry.version == 1, f"the key was put {entry.version} times"
            async with httpx.AsyncClient() as http:
                ready = await http.get(f"http://{address}/healthz", timeout=5)
                assert (ready.status_code, ready.json()) == (200, {"status": "serving"})
                proc.proc.send_signal(signal.SIGTERM)
                await registry.wait(address, "draining")
                ready = await http.get(f"http://{address}/healthz", timeout=5)
                assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
                answer = await http.get(f"http://{address}/", timeout=5)
                assert (answer.status_code, answer.json()["state"]) == (200, "draining")
            await registry.wait(address, "removed")
            with pytest.raises(httpx.ConnectError):
                await _get(f"http://{address}/")  # closed before the key went
            code = await proc.stop(timeout=30)
        finally:
            await _kill(proc)
        assert await client.list_instances(SERVICE) == ()
    assert code == 0, proc.said()
    assert registry.counts[(address, "added")] == 1, registry.counts
    assert registry.counts[(address, "removed")] == 1, registry.counts
    assert registry.times[(address, "draining")] < registry.times[(address, "removed")]
    assert "etcdisco: drained in" in proc.everything(), proc.said()


async def _get(url: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(url, timeout=5)


async def _kill(proc: CliProcess) -> None:
    if proc.proc.returncode is None:
        for pid in descendants(proc.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await proc.kill()


async def test_rolling_restart_of_gunicorn_servers_fails_no_request(etcd) -> None:
    """3 gunicorn servers (2 workers each) restarted one by one under a GET + POST load
    through ``etcdisco.http``: no failed request, no POST sent to a server after the
    client saw it draining, every old server deregistered once and exited 0."""
    async with following(etcd.endpoint) as (client, registry):
        fleet = GunicornFleet(etcd.endpoint, registry)
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
            for server in fleet.servers:
                await _kill(server.proc)

    failures = load.failures()
    assert not failures, [f"{r.method} {r.error}" for r in failures[:5]]
    posts = [r for r in load.records if r.method == "POST" and r.name]
    assert len(posts) > 100, len(posts)
    late = posts_after_draining(load, registry.draining)
    assert not late, [(r.name, r.state_at_arrival) for r in late[:5]]
    for old in restart.stopped:
        assert old.exit_code == 0, old.proc.said()
        assert "etcdisco: drained in" in old.proc.everything(), old.proc.said()
        assert registry.counts[(old.name, "removed")] == 1
    served = load.per_server()
    assert all(served[n] > 0 for n in ("v1-a", "v1-b", "v1-c", "v2-a", "v2-b", "v2-c")), served
    print(
        f"\ngunicorn: {len(load.records)} requests, failed per restart "
        f"{restart.failed_per_restart}, per server {dict(served)}"
    )


async def test_a_dead_worker_is_replaced_and_the_key_stays(etcd) -> None:
    """A worker SIGKILLed: gunicorn starts another; the key is untouched (same lease,
    same revision) and both workers serve; SIGTERM still deregisters it once."""
    async with following(etcd.endpoint) as (client, registry):
        fleet = GunicornFleet(etcd.endpoint, registry)
        try:
            server = await fleet.start("w")
            (before,) = await client.list_instances(SERVICE)
            pids = await _pids_answering(server.address, 2)
            assert len(pids) == 2, pids
            victim = sorted(pids)[0]
            assert victim in descendants(server.proc.proc.pid)
            os.kill(victim, signal.SIGKILL)
            await server.proc.line(f"Worker (pid:{victim}) was sent SIGKILL", stderr=True)
            await server.proc.wait_for(
                lambda: sum("Booting worker with pid" in line for line in server.proc.err) >= 3,
                30,
                "a replacement worker",
            )
            survivors = await _pids_answering(server.address, 2)
            assert victim not in survivors and len(survivors) == 2, survivors
            (after,) = await client.list_instances(SERVICE)
            assert (after.lease, after.revision) == (before.lease, before.revision)
            assert registry.counts[("w", "removed")] == 0
            assert registry.counts[("w", "draining")] == 0
            await fleet.stop(server)
        finally:
            for s in fleet.servers:
                await _kill(s.proc)
        await registry.wait("w", "removed")
        assert await client.list_instances(SERVICE) == ()
    assert server.exit_code == 0, server.proc.said()
    assert registry.counts[("w", "removed")] == 1


def test_readme_gunicorn_config_loads(tmp_path) -> None:
    """The README's gunicorn.conf.py, as written, is a config gunicorn accepts: it
    loads, names the uvicorn worker and installs the hooks."""
    import re
    import subprocess

    section = (ROOT / "README.md").read_text().split("## HTTP services\n", 1)[1]
    (block,) = re.findall(r"In `gunicorn.conf.py`:\n\n```py\n(.*?)```", section, flags=re.S)
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(block)
    namespace: dict[str, object] = {}
    exec(compile(block, str(conf), "exec"), namespace)
    assert namespace["worker_class"] == "uvicorn_worker.UvicornWorker"
    assert {"when_ready", "pre_fork", "post_worker_init", "child_exit", "on_exit"} <= set(namespace)
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--check-config",
            "-c",
            str(conf),
            "tests.asgi_apps.app:app",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
