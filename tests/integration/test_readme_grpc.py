"""The README's gRPC server and client are examples/grpc_*.py, and they run, as
written, against a real etcd: the client reaches the server through the registry."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import etcdisco

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def test_readme_shows_the_grpc_examples_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in ("grpc_server.py", "grpc_client.py"):
        assert f"```py\n{(EXAMPLES / name).read_text()}```" in readme, name


async def test_grpc_examples_run_against_etcd(etcd) -> None:
    env = {**os.environ, "ETCDISCO_ENDPOINTS": etcd.endpoint}
    server = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "grpc_server.py")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], 20)
        assert ready, "the server example printed nothing within 20s"
        line = server.stdout.readline()
        assert line.startswith("serving greeter at "), line + server.stderr.read()
        address = line.split()[-1]
        assert not address.startswith(("0.0.0.0:", "[::]:"))

        client = subprocess.run(
            [sys.executable, str(EXAMPLES / "grpc_client.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.split() == ["SERVING"] * 3

        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0
        async with etcdisco.AsyncClient(etcd.endpoint) as c:
            assert await c.list_instances("greeter") == ()
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(10)
        for stream in (server.stdout, server.stderr):
            if stream is not None:
                stream.close()
