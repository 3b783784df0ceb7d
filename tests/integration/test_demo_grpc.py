"""``etcdisco demo --grpc``, run as a user runs it: a subprocess that starts its own etcd."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if any(text.encode() in arg for arg in args):
            found.append(b" ".join(args).decode(errors="replace"))
    return found


def test_grpc_demo_rolls_servers_under_load_without_a_failed_call(etcd_binary) -> None:
    env = {**os.environ, "ETCDISCO_ETCD": str(etcd_binary), "ETCDISCO_ENDPOINTS": "127.0.0.1:1"}
    res = subprocess.run(
        [sys.executable, "-m", "etcdisco", "demo", "--grpc"],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "starting a local one" in out

    # The rolling restart: each server drained and exited, a replacement took calls.
    for step in (1, 2, 3):
        assert f"rolling restart {step}/3: SIGTERM to v1-" in out, out
    assert out.count("deregistered, exited with code 0") == 3, out
    for name in ("v2-a", "v2-b", "v2-c"):
        assert f"{name} is taking calls through the channel and through xDS" in out, out
    assert "rolling restart done" in out

    # Zero failed calls through either path, and calls spread over every server.
    totals = dict(re.findall(r"through (the balancing channel|xDS): (\d+ calls, \d+ failed)", out))
    assert set(totals) == {"the balancing channel", "xDS"}, out
    for path, counts in totals.items():
        calls, failed = map(int, re.findall(r"\d+", counts))
        assert failed == 0 and calls > 0, f"{path}: {counts}\n{out}"
    per_server = {
        name: (int(channel), int(xds))
        for name, channel, xds in re.findall(r"^\s+(v[12]-[a-c])\s+(\d+)\s+(\d+)$", out, re.M)
    }
    assert sorted(per_server) == ["v1-a", "v1-b", "v1-c", "v2-a", "v2-b", "v2-c"], out
    assert all(channel > 0 and xds > 0 for channel, xds in per_server.values()), per_server

    # Every process it started is gone: the servers, the xDS caller and etcd itself.
    (endpoint,) = re.findall(r"listening on (127\.0\.0\.1:\d+)", out)
    assert not _processes_mentioning(endpoint), _processes_mentioning(endpoint)
    assert "local etcd stopped" in out
