"""``etcdisco demo --http``, run as a user runs it: a subprocess that starts its own etcd."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .test_demo_grpc import _processes_mentioning


def test_http_demo_rolls_servers_under_load_without_a_failed_request(etcd_binary) -> None:
    env = {**os.environ, "ETCDISCO_ETCD": str(etcd_binary), "ETCDISCO_ENDPOINTS": "127.0.0.1:1"}
    res = subprocess.run(
        [sys.executable, "-m", "etcdisco", "demo", "--http"],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "starting a local one" in out

    # The rolling restart: each server drained before it stopped listening, exited,
    # and a replacement took both GETs and POSTs.
    for step in (1, 2, 3):
        assert f"rolling restart {step}/3: SIGTERM to v1-" in out, out
    assert out.count("stopped listening, deregistered, exited with code 0") == 3, out
    for name in ("v1-a", "v1-b", "v1-c"):
        assert f"registry: {name} is draining" in out, out
    for name in ("v2-a", "v2-b", "v2-c"):
        assert f"{name} is taking GETs and POSTs" in out, out
    assert "rolling restart done" in out

    # Zero failed requests, GET or POST, and requests spread over every server.
    totals = dict(re.findall(r"^\s+(GET|POST): (\d+ requests, \d+ failed)$", out, re.M))
    assert set(totals) == {"GET", "POST"}, out
    for method, counts in totals.items():
        requests, failed = map(int, re.findall(r"\d+", counts))
        assert failed == 0 and requests > 0, f"{method}: {counts}\n{out}"
    per_server = {
        name: (int(get), int(post))
        for name, get, post in re.findall(r"^\s+(v[12]-[a-c])\s+(\d+)\s+(\d+)$", out, re.M)
    }
    assert sorted(per_server) == ["v1-a", "v1-b", "v1-c", "v2-a", "v2-b", "v2-c"], out
    assert all(get > 0 and post > 0 for get, post in per_server.values()), per_server

    # Every process it started is gone: the servers and etcd itself.
    (endpoint,) = re.findall(r"listening on (127\.0\.0\.1:\d+)", out)
    assert not _processes_mentioning(endpoint), _processes_mentioning(endpoint)
    assert "local etcd stopped" in out
