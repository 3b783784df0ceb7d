"""The command line's conventions, as etcdctl and kubectl users expect them: global
options anywhere on the line, --version, shell completion, clean stdout, and errors
that are one line, before anything is registered. Subprocesses against a real etcd."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import etcdisco
from etcdisco import AsyncClient

from ._cli_process import CliProcess

CLI = [sys.executable, "-m", "etcdisco"]
README = Path(__file__).resolve().parents[2] / "README.md"
GLOBAL = ("--endpoints", "--prefix", "--cacert", "--cert", "--key", "--user", "--timeout")
COMMANDS = ("register", "list", "watch", "resolve", "xds", "agent", "etcd", "demo")


async def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``etcdisco ARGS`` to its end; only the ETCDISCO_ variables given in ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ETCDISCO_", "_ETCDISCO"))}
    return await asyncio.to_thread(
        subprocess.run,
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


def rows(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The run failed with exactly one ``etcdisco: error:`` line naming ``fragments``."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("etcdisco: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


async def keys(endpoint: str) -> list[str]:
    async with AsyncClient(endpoint) as client:
        found = await client.etcd.get("services/", prefix=True)
        return [kv.key.decode() for kv in found.kvs]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another process (this test) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
async def started() -> Any:
    processes: list[CliProcess] = []
    try:
        yield processes
    finally:
        for process in processes:
            await process.kill()


# -- 1. global options anywhere ----------------------------------------------------


async def test_global_options_go_before_or_after_the_command(etcd, started) -> None:
    ep = etcd.endpoint
    # After the command, before its arguments; the password-free env stays clean.
    reg = await CliProcess.start("register", "--endpoints", ep, "--json", "echo", "127.0.0.1:7401")
    started.append(reg)
    await reg.line('"state": "registered"')
    expected = [{"service": "echo", "id": "127.0.0.1:7401", "address": "127.0.0.1:7401"}]

    def addresses(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
        return [{k: row[k] for k in ("service", "id", "address")} for row in rows(result)]

    assert addresses(await run("list", "--json", "--endpoints", ep)) == expected
    assert addresses(await run("--json", "list", "echo", "--endpoints", ep)) == expected
    assert addresses(await run("--endpoints", ep, "list", "--json", "echo")) == expected
    # Given on both sides, the one after the command wins.
    overridden = await run("--endpoints", "127.0.0.1:1", "list", "--endpoints", ep, "--json")
    assert addresses(overridden) == expected
    # The environment variable still fills in what the line does not say...
    assert addresses(await run("list", "--json", env={"ETCDISCO_ENDPOINTS": ep})) == expected
    # ... and never wins over the line, whichever side of the command it is on.
    unreachable = {"ETCDISCO_ENDPOINTS": "127.0.0.1:1"}
    assert addresses(await run("--endpoints", ep, "list", "--json", env=unreachable)) == expected
    assert addresses(await run("list", "--endpoints", ep, "--json", env=unreachable)) == expected
    # Other commands too: resolve, and --prefix after the command.
    picked = await run("resolve", "echo", "--endpoints", ep, "--json", "--prefix", "services")
    assert [row["address"] for row in rows(picked)] == ["127.0.0.1:7401"]
    other_prefix = await run("list", "--endpoints", ep, "--prefix", "elsewhere", "--json")
    assert rows(other_prefix) == []
    assert await reg.stop() == 0


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_help_shows_the_global_options_once(name: str) -> None:
    result = subprocess.run([*CLI, name, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for option in (*GLOBAL, "--json", "--log-level"):
        assert len(re.findall(rf"^\s+{option}\b", result.stdout, re.M)) == 1, (option, name)
    assert "Global options (before or after the command):" in result.stdout
    assert "ETCDISCO_ENDPOINTS" in result.stdout


# -- 2. --version and shell completion ---------------------------------------------


def test_version() -> None:
    result = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"etcdisco {etcdisco.__version__}\n"


def complete(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ETCDISCO_", "_ETCDISCO"))}
    return subprocess.run(CLI, capture_output=True, text=True, timeout=30, env={**base, **env})


def test_shell_completion_as_the_readme_says() -> None:
    documented = re.findall(r"_ETCDISCO_COMPLETE=(\w+) etcdisco", README.read_text())
    assert {"bash_source", "zsh_source", "fish_source"} <= set(documented)
    script = complete({"_ETCDISCO_COMPLETE": "bash_source"})
    assert script.returncode == 0, script.stderr
    assert "_etcdisco_completion()" in script.stdout
    assert "complete -o nosort -F _etcdisco_completion etcdisco" in script.stdout
    for shell in ("zsh_source", "fish_source"):
        other = complete({"_ETCDISCO_COMPLETE": shell})
        assert other.returncode == 0 and "_ETCDISCO_COMPLETE" in other.stdout, shell

    def words(line: str) -> list[str]:
        env = {"_ETCDISCO_COMPLETE": "bash_complete", "COMP_WORDS": line}
        answer = complete({**env, "COMP_CWORD": str(len(line.split()) - 1)})
        assert answer.returncode == 0, answer.stderr
        return [item.split(",", 1)[1] for item in answer.stdout.splitlines()]

    # What the script asks the program for: commands, and options after the command.
    assert words("etcdisco li") == ["list"]
    assert words("etcdisco list --js") == ["--json"]
    assert words("etcdisco register --meta-") == ["--meta-json"]


# -- 3. watch lists once, then changes ----------------------------------------------


async def test_watch_lists_the_instances_once_then_the_changes(etcd, started) -> None:
    async with AsyncClient(etcd.endpoint) as client:
        first = await client.register("echo", "127.0.0.1:7411", ttl=10)
        second = await client.register("echo", "127.0.0.1:7412", ttl=10)
        text = await CliProcess.start("watch", "echo", "--endpoints", etcd.endpoint)
        watcher = await CliProcess.start("watch", "echo", "--json", "--endpoints", etcd.endpoint)
        started.extend([text, watcher])
        await watcher.event("existing", count=2)
        await text.wait_for(lambda: len(text.out) >= 2, 15, "two listed instances")
        third = await client.register("echo", "127.0.0.1:7413", ttl=10)
        added = await watcher.event("added")
        assert added["address"] == "127.0.0.1:7413"
        await first.deregister()
        removed = await watcher.event("removed")
        assert removed["address"] == "127.0.0.1:7411"
        await text.line("- echo")
        events = [(e["event"], e["address"]) for e in map(json.loads, watcher.out)]
        assert events == [
            ("existing", "127.0.0.1:7411"),
            ("existing", "127.0.0.1:7412"),
            ("added", "127.0.0.1:7413"),
            # deregister() writes status draining before it deletes the key
            ("updated", "127.0.0.1:7411"),
            ("removed", "127.0.0.1:7411"),
        ]
        marks = [line.split()[0] for line in text.out]
        assert marks == ["=", "=", "+", "~", "-"], text.out
        for process in (watcher, text):
            assert await process.stop(signal.SIGINT) == 0
        await second.deregister()
        await third.deregister()


# -- 4. metadata: strings, reserved types, --meta-json --------------------------------


async def test_meta_is_a_string_unless_reserved_and_meta_json_is_typed(etcd, started) -> None:
    ep = etcd.endpoint
    reg = await CliProcess.start(
        "--endpoints", ep, "--json", "register", "echo", "127.0.0.1:7421",
        "--meta", "version=1.10", "--meta", "flag=true", "--meta", "weight=5",
        "--meta", "zone=a", "--meta-json", "canary=true", "--meta-json", "owner=null",
        "--meta-json", "ratio=0.5", "--meta-json", 'note="x y"', "--meta-json", 'ports=[1,2]',
    )  # fmt: skip
    started.append(reg)
    await reg.line('"state": "registered"')
    (row,) = rows(await run("--endpoints", ep, "--json", "list"))
    assert row["metadata"] == {
        "version": "1.10",
        "flag": "true",
        "weight": 5,
        "zone": "a",
        "canary": True,
        "owner": None,
        "ratio": 0.5,
        "note": "x y",
        "ports": [1, 2],
    }
    table = await run("--endpoints", ep, "list")
    assert table.returncode == 0, table.stderr
    line = table.stdout.splitlines()[1]
    assert "canary=true" in line and "owner=null" in line and "version=1.10" in line
    assert "ports=[1,2]" in line and "weight=5" in line
    assert "True" not in line and "None" not in line
    assert await reg.stop() == 0


@pytest.mark.parametrize(
    "meta",
    [
        ("--meta", "weight=2.5"),
        ("--meta", "weight=heavy"),
        ("--meta", "weight=-1"),
        ("--meta-json", "weight=2.5"),
        ("--meta-json", "weight=true"),
        ("--meta", "status=gone"),
    ],
)
async def test_a_wrong_reserved_value_is_one_line_before_anything(
    etcd, tmp_path: Path, meta: tuple[str, str]
) -> None:
    ready = tmp_path / "ready"
    result = await run(
        "--endpoints", etcd.endpoint, "register", "echo", "127.0.0.1:7422", *meta,
        "--ready-file", str(ready), "--health-listen", "127.0.0.1:0",
    )  # fmt: skip
    key = meta[1].split("=", 1)[0]
    one_error_line(result, f"metadata {key!r} must be")
    assert result.stdout == ""  # no "listening", no "registered"
    assert await keys(etcd.endpoint) == []
    assert not ready.exists()


async def test_meta_json_refuses_what_is_not_json() -> None:
    result = await run("--endpoints", "127.0.0.1:1", "register", "e", "127.0.0.1:1",
                       "--meta-json", "name=plain")  # fmt: skip
    assert result.returncode == 2
    assert "--meta-json" in result.stderr and "'name=plain'" in result.stderr
    twice = await run("--endpoints", "127.0.0.1:1", "register", "e", "127.0.0.1:1",
                      "--meta", "k=a", "--meta-json", "k=1")  # fmt: skip
    assert twice.returncode == 2 and "metadata key 'k' given twice" in twice.stderr


# -- 5. an empty list leaves stdout empty -------------------------------------------


async def test_list_of_nothing_says_so_on_stderr(etcd) -> None:
    for extra in ((), ("--json",)):
        result = await run("--endpoints", etcd.endpoint, "list", "echo", *extra)
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""
        assert result.stderr == "no instances of echo\n"


# -- 7. busy listen ports ------------------------------------------------------------


@pytest.mark.parametrize("option", ["--health-listen", "--metrics-listen"])
async def test_register_on_a_busy_port_fails_before_registering(
    etcd, busy_port: int, option: str
) -> None:
    address = f"127.0.0.1:{busy_port}"
    result = await run(
        "--endpoints", etcd.endpoint, "register", "echo", "127.0.0.1:7431", option, address
    )
    one_error_line(result, address, "in use")
    assert result.stdout == ""
    assert await keys(etcd.endpoint) == []


async def test_agent_on_a_busy_port_fails_before_registering(
    etcd, busy_port: int, tmp_path: Path
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("services:\n  - {name: web, address: 127.0.0.1:7432}\n")
    address = f"127.0.0.1:{busy_port}"
    for option in ("--health-listen", "--metrics-listen"):
        result = await run("--endpoints", etcd.endpoint, "agent", "--config", str(config),
                           option, address)  # fmt: skip
        line = [x for x in result.stderr.splitlines() if x.startswith("etcdisco: error:")]
        assert result.returncode == 1 and len(line) == 1, result.stderr
        assert address in line[0] and "in use" in line[0]
        assert "Traceback" not in result.stderr
        assert await keys(etcd.endpoint) == []


async def test_a_second_xds_on_the_same_port_fails(etcd, started) -> None:
    first = await CliProcess.start("xds", "--endpoints", etcd.endpoint, "--listen", "127.0.0.1:0")
    started.append(first)
    listening = await first.line("listening on")
    address = listening.rsplit(" ", 1)[1]
    second = await run("xds", "--endpoints", etcd.endpoint, "--listen", address)
    one_error_line(second, address, "in use")
    assert second.stdout == ""
    assert await first.stop() == 0


# -- 8. etcdisco etcd ------------------------------------------------------------------


async def test_etcd_on_a_port_another_etcd_serves_fails(etcd, etcd_binary, tmp_path) -> None:
    port = etcd.endpoint.rsplit(":", 1)[1]
    env = {"ETCDISCO_ETCD": str(etcd_binary)}
    result = await run("etcd", "--port", port, "--data-dir", str(tmp_path / "d"), env=env)
    one_error_line(result, f"127.0.0.1:{port}", "in use")
    assert "ready" not in result.stdout


async def test_etcd_with_an_unusable_data_dir_is_one_line(etcd_binary, tmp_path) -> None:
    env = {"ETCDISCO_ETCD": str(etcd_binary)}
    a_file = tmp_path / "file"
    a_file.write_text("")
    for data_dir in (a_file, a_file / "below"):
        result = await run("etcd", "--port", "0", "--data-dir", str(data_dir), env=env)
        one_error_line(result, f"--data-dir {data_dir}")
        assert result.returncode == 1 and result.stdout == ""


# -- 9. a ready file that could never be written -------------------------------------


async def test_a_ready_file_in_a_missing_directory_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    config = tmp_path / "agent.yaml"
    config.write_text("services: []\n")
    for command in (
        ["register", "echo", "127.0.0.1:7441"],
        ["agent", "--config", str(config)],
    ):
        result = await run("--endpoints", "127.0.0.1:1", *command,
                           "--ready-file", str(missing / "ready"))  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "--ready-file" in result.stderr and f"{missing} does not exist" in result.stderr


# -- 11. a TTL above etcd's maximum ---------------------------------------------------


async def test_register_refuses_a_ttl_above_etcds_maximum_before_connecting() -> None:
    result = await run("--endpoints", "127.0.0.1:1", "--timeout", "1",
                       "register", "echo", "127.0.0.1:7451", "--ttl", "9000000001")  # fmt: skip
    one_error_line(result, "ttl must be an integer from 2 to 9,000,000,000")
    assert "127.0.0.1:1" not in result.stderr  # refused without trying etcd
