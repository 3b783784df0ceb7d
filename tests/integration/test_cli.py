"""The command line, run as a user runs it: a subprocess against a real etcd."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

from etcdisco import AsyncClient, EventType

from .._util import wait_event
from ._cli_process import CliProcess


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "etcdisco", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


async def test_register_list_watch(etcd) -> None:
    ep = etcd.endpoint
    async with AsyncClient(ep) as c, c.discover("echo") as cache:
        await cache.wait_ready(5)
        events = cache.events()
        reg = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "etcdisco",
                "--endpoints",
                ep,
                "register",
                "echo",
                "127.0.0.1:7001",
                "--meta",
                "zone=a",
                "--meta",
                "weight=3",
                "--ttl",
                "5",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        watcher = await CliProcess.start("--endpoints", ep, "--json", "watch", "echo")
        try:
            await wait_event(events, EventType.ADDED, "services/echo/127.0.0.1:7001", 15)
            # Another process, another watch: it reports the instance in its own time,
            # as listed (existing) or as a change (added).
            await watcher.wait_for(
                lambda: watcher.json_events("existing") or watcher.json_events("added"),
                30,
                "the watcher showing the instance",
            )

            listed = await asyncio.to_thread(run, "--endpoints", ep, "--json", "list", "echo")
            assert listed.returncode == 0, listed.stderr
            rows = [json.loads(line) for line in listed.stdout.splitlines()]
            assert rows == [
                {
                    "service": "echo",
                    "id": "127.0.0.1:7001",
                    "address": "127.0.0.1:7001",
                    "metadata": {"zone": "a", "weight": 3},
                    "status": "up",  # the effective status (an operator's override wins)
                }
            ]
            table = await asyncio.to_thread(run, "--endpoints", ep, "list")
            assert "127.0.0.1:7001" in table.stdout and "zone=a" in table.stdout

            reg.send_signal(signal.SIGINT)
            assert await asyncio.to_thread(reg.wait, 10) == 0
            assert "deregistered services/echo/127.0.0.1:7001" in (
                reg.stdout.read() if reg.stdout else ""
            )
            await wait_event(events, EventType.REMOVED, "services/echo/127.0.0.1:7001", 5)
            removed = await watcher.event("removed", 30)
            assert removed["id"] == "127.0.0.1:7001", removed
            assert await watcher.stop(signal.SIGINT) == 0, watcher.said()
        finally:
            reg.kill()
            reg.wait()
            await watcher.kill()


def test_unreachable_etcd_is_one_clear_line() -> None:
    res = run("--endpoints", "127.0.0.1:1", "--timeout", "1", "list")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("etcdisco: error:") and "127.0.0.1:1" in lines[0]


def test_bad_address_names_the_address() -> None:
    res = run("--endpoints", "127.0.0.1:1", "register", "echo", "10.0.0.5")
    assert res.returncode != 0
    assert "10.0.0.5" in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_etcd_command_serves_and_stops_cleanly(etcd_binary, tmp_path) -> None:
    env = {**os.environ, "ETCDISCO_ETCD": str(etcd_binary)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "etcdisco",
            "etcd",
            "--data-dir",
            str(tmp_path / "d"),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # blocks until etcd is ready (or the command died)
        assert "ready at 127.0.0.1:" in first, first + (proc.stderr.read() if proc.stderr else "")
        endpoint = first.split("ready at ", 1)[1].split()[0]
        listed = run("--endpoints", endpoint, "--json", "list")
        assert listed.returncode == 0, listed.stderr
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert "etcd stopped" in out
    finally:
        proc.kill()
        proc.wait()


def test_demo_runs_end_to_end_with_its_own_etcd(etcd_binary) -> None:
    env = {**os.environ, "ETCDISCO_ETCD": str(etcd_binary), "ETCDISCO_ENDPOINTS": "127.0.0.1:1"}
    res = subprocess.run(
        [sys.executable, "-m", "etcdisco", "demo", "--ttl", "2"],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "starting a local one" in out
    assert "vanished" in out and "after the crash" in out and "after SIGTERM" in out
    assert "local etcd stopped" in out
