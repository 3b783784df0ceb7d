"""Secrets stay secret: the etcd password and auth token never reach logs (even at
DEBUG), error messages, ``--help`` or ``repr()``."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time

import click
import pytest
from click.testing import CliRunner

from etcdisco import AsyncClient, CacheState, Client, RegistrationState
from etcdisco.cli import cli
from etcdisco.etcd import EtcdConfig

from .._util import eventually

# A value nobody would print by accident, so finding it anywhere is a leak.
PLANTED = "planted-Secret-7f3a9c"


def etcdisco(
    *args: str, password: str, timeout: float = 30, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "etcdisco", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "ETCDISCO_PASSWORD": password, **env},
    )


def test_cli_logs_no_password_at_debug(etcd_auth) -> None:
    member, user, password = etcd_auth
    ok = etcdisco(
        "--log-level", "debug", "--endpoints", member.endpoint, "--user", user, "list",
        password=password,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "no instances" in ok.stderr and ok.stdout == ""
    assert " DEBUG " in ok.stderr, "debug logging was not on"
    assert password not in ok.stdout + ok.stderr

    # A wrong password fails with one clear line that does not repeat it; the level
    # comes from the environment this time.
    wrong = etcdisco(
        "--endpoints", member.endpoint, "--user", user, "--timeout", "2", "list",
        password=PLANTED, ETCDISCO_LOG_LEVEL="DEBUG",
    )  # fmt: skip
    assert wrong.returncode == 1
    assert " DEBUG " in wrong.stderr, "debug logging was not on"
    assert re.search(r"etcdisco: error: .*(auth|password)", wrong.stderr), wrong.stderr
    assert PLANTED not in wrong.stdout + wrong.stderr


def test_long_running_command_logs_no_password(etcd_auth) -> None:
    member, user, password = etcd_auth
    cmd = [sys.executable, "-m", "etcdisco", "--log-level", "debug"]
    cmd += ["--endpoints", member.endpoint, "--user", user]
    cmd += ["register", "echo", "127.0.0.1:9", "--ttl", "2"]
    env = {**os.environ, "ETCDISCO_PASSWORD": password}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("registered services/echo/127.0.0.1:9")
        proc.terminate()
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
    finally:
        proc.kill()
        proc.wait()
    assert "granted lease" in err, "INFO lines missing: was logging on?"
    assert password not in out + err


def _commands(group: click.Group) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = [()]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            found += [(name, *sub) for sub in _commands(command)]
        else:
            found.append((name,))
    return found


@pytest.mark.parametrize("path", _commands(cli), ids=lambda p: " ".join(p) or "etcdisco")
def test_help_shows_no_secret(path: tuple[str, ...]) -> None:
    env = {"ETCDISCO_PASSWORD": PLANTED, "ETCDISCO_ENDPOINTS": "127.0.0.1:2379"}
    result = CliRunner().invoke(cli, [*path, "--help"], env=env, prog_name="etcdisco")
    assert result.exit_code == 0, result.output
    assert PLANTED not in result.output


def test_no_option_takes_a_secret_on_the_command_line() -> None:
    # A password given as an argument is visible to every user through ps.
    def walk(command: click.Command) -> list[str]:
        names = [n for p in command.params for n in getattr(p, "opts", [])]
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                names += walk(sub)
        return names

    options = walk(cli)
    assert "--user" in options  # the walk sees the options
    # A secret is read from a file or the environment: "--admin-token-file" names a file.
    secrets = [n for n in options if re.search(r"pass|secret|token", n)]
    assert [n for n in secrets if not n.endswith("-file")] == [], options


async def test_reprs_hide_the_password(etcd_auth) -> None:
    member, user, password = etcd_auth
    config = EtcdConfig(endpoints=(member.endpoint,), username=user, password=password)
    assert user in repr(config) and password not in repr(config)
    async with AsyncClient(member.endpoint, username=user, password=password) as client:
        await client.list_instances()  # authenticated: the connection holds a token
        token = client.etcd.connection.token
        assert token
        for obj in (client, client.etcd, client.etcd.config, client.etcd.connection):
            assert password not in repr(obj) and token not in repr(obj), repr(obj)
    with Client(member.endpoint, username=user, password=password) as sync:
        assert sync.list_instances() == ()
        for obj in (sync, sync.async_client):
            assert password not in repr(obj), repr(obj)


async def test_token_never_logged(etcd_auth, caplog: pytest.LogCaptureFixture) -> None:
    member, user, password = etcd_auth
    caplog.set_level(logging.DEBUG)
    async with AsyncClient(member.endpoint, username=user, password=password) as client:
        reg = await client.register("echo", "127.0.0.1:9", ttl=2)
        cache = await client.discover("echo")
        await cache.wait_ready(5)
        first = client.etcd.connection.token
        assert first
        cache_states: list[CacheState] = []
        cache.add_state_listener(cache_states.append)
        # A restart invalidates every simple token: the re-authentication paths log.
        member.restart()
        restarted = time.monotonic()
        await client.list_instances()
        # Wait for each stream to come back through a new token, not just for "now".
        await eventually(
            lambda: reg.last_keepalive > restarted, 15, "no keepalive answered after the restart"
        )
        assert reg.state is RegistrationState.REGISTERED, "registration not healthy"
        await eventually(
            lambda: cache_states[-1:] == [CacheState.SYNCED],
            15,
            f"watch never came back after the restart: {cache_states}",
        )
        second = client.etcd.connection.token
        assert second and second != first
        await cache.close()
    assert "etcd connection" in caplog.text, "nothing was logged: was capture on?"
    for secret in (first, second, password):
        assert secret not in caplog.text
