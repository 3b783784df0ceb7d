"""``etcdisco register`` / ``list`` / ``watch`` against an etcd that demands client
certificates, or a password: the real commands, as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

from ._cli_process import CliProcess, etcd_tls_options

CLI = [sys.executable, "-m", "etcdisco"]


async def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ETCDISCO_")}
    return await asyncio.to_thread(
        subprocess.run,
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


def listed(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


async def test_register_list_watch_over_mutual_tls(etcd_tls) -> None:
    member, files = etcd_tls
    common = ["--endpoints", member.endpoint, *etcd_tls_options(files), "--timeout", "2", "--json"]
    watcher = await CliProcess.start(*common, "watch", "web")
    reg = await CliProcess.start(*common, "register", "web", "127.0.0.1:7301", "--ttl", "3")
    try:
        await reg.line('"state": "registered"')
        found = listed(await run(*common, "list", "web"))
        assert [i["address"] for i in found] == ["127.0.0.1:7301"]
        await watcher.line("127.0.0.1:7301")

        assert await reg.stop() == 0
        assert listed(await run(*common, "list", "web")) == []
    finally:
        await reg.kill()
        await watcher.kill()


async def test_list_without_client_certificate_names_the_cause(etcd_tls) -> None:
    member, files = etcd_tls
    options = etcd_tls_options(files, client_cert=False)
    result = await run("--endpoints", member.endpoint, *options, "--timeout", "2", "list")
    assert result.returncode != 0
    assert "client certificate" in result.stderr, result.stderr


async def test_register_and_list_with_a_password(etcd_auth) -> None:
    member, user, password = etcd_auth
    common = ["--endpoints", member.endpoint, "--user", user, "--timeout", "2", "--json"]
    env = {"ETCDISCO_PASSWORD": password}
    reg = await CliProcess.start(*common, "register", "db", "127.0.0.1:7302", env=env)
    try:
        await reg.line('"state": "registered"')
        found = listed(await run(*common, "list", "db", env=env))
        assert [i["address"] for i in found] == ["127.0.0.1:7302"]

        wrong = await run(*common, "list", env={"ETCDISCO_PASSWORD": "wrong"})
        assert wrong.returncode != 0 and "authentication failed" in wrong.stderr, wrong.stderr
        assert password not in wrong.stderr + wrong.stdout
        assert await reg.stop() == 0
    finally:
        await reg.kill()
