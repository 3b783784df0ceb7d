"""The README's HTTP server is examples/http_server.py, and it runs, as written, against
a real etcd: registered once it listens, reached through the registry (by the README's
client example too), drained and deregistered on SIGTERM, exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import etcdisco
import etcdisco.http
from etcdisco import EventType
from etcdisco.discovery import EventStream

from .._util import communicate, next_event, wait_event

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def test_readme_shows_the_http_server_example_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## HTTP services\n", 1)[1].split("\n## ", 1)[0]
    assert f"```py\n{(EXAMPLES / 'http_server.py').read_text()}```" in section


async def test_http_server_example_runs_against_etcd(etcd) -> None:
    env = {**os.environ, "ETCDISCO_ENDPOINTS": etcd.endpoint}
    async with etcdisco.AsyncClient(etcd.endpoint) as client, client.discover("users") as cache:
        await cache.wait_ready(10)
        events = cache.events()
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLES / "http_server.py"),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            added = await next_added(events)
            address = added.instance.address
            assert not address.startswith(("0.0.0.0:", "[::]:"))
            async with etcdisco.http.AsyncClient(client, services=["users"]) as http:
                reply = await http.get("http://users/v1/me")
                assert reply.json() == {"user": "me", "served_by": address}
                ready = await http.get("http://users/healthz")
                assert ready.json() == {"status": "serving"}
            if (EXAMPLES / "http_client.py").exists():  # the README's client, unchanged
                client_run = await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(EXAMPLES / "http_client.py"),
                    env=env,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                out, err = await communicate(client_run, 60)
                assert client_run.returncode == 0, err.decode()
                lines = out.decode().splitlines()
                assert len(lines) == 3 and all(line.startswith("200 ") for line in lines), lines
            server.send_signal(signal.SIGTERM)
            await wait_event(events, EventType.UPDATED, added.instance.key, 20)  # draining
            await wait_event(events, EventType.REMOVED, added.instance.key, 20)
            _, err = await communicate(server, 20)
            assert server.returncode == 0, err.decode()
        finally:
            if server.returncode is None:
                server.kill()
                await server.wait()
        assert await client.list_instances("users") == ()


async def next_added(events: EventStream) -> etcdisco.ChangeEvent:
    while True:
        ev = await next_event(events, 20, "the server example's registration")
        if ev.type is EventType.ADDED:
            return ev
