"""The README's HTTP client is examples/http_client.py, and it runs, as written,
against a real etcd: its requests reach the registered instances of "users"."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import etcdisco

from ..http_echo.server import EchoServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "http_client.py"


def test_readme_shows_the_http_client_example_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## HTTP services\n", 1)[1].split("\n## ", 1)[0]
    assert f"```py\n{EXAMPLE.read_text()}```" in section


async def test_http_client_example_reaches_the_registered_instances(etcd: Any) -> None:
    with EchoServer("s1") as one, EchoServer("s2") as two:
        async with etcdisco.AsyncClient(etcd.endpoint) as registry:
            for server in (one, two):
                await registry.register("users", server.address, ttl=5)
            env = {**os.environ, "ETCDISCO_ENDPOINTS": etcd.endpoint}
            # In a thread: the registrations' keepalives run on this loop meanwhile.
            run = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, str(EXAMPLE)],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("200 {") for line in lines), run.stdout
    assert {"'server': 's1'", "'server': 's2'"} <= {
        part for line in lines for part in ("'server': 's1'", "'server': 's2'") if part in line
    }
    assert all("'host': 'users'" in line for line in lines)
