"""``etcdisco agent`` against an etcd that demands client certificates, or a password:
the real command, its instances read back from etcd by a client of its own."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from etcdisco import AsyncClient

from ._cli_process import CliProcess, etcd_tls_options

CONFIG = """\
defaults:
  ttl: 3
services:
  - {name: web, address: 127.0.0.1:7201, metadata: {zone: a}}
  - {name: db, address: 127.0.0.1:7202, id: db-primary}
"""
KEYS = {"services/web/127.0.0.1:7201", "services/db/db-primary"}


@contextlib.asynccontextmanager
async def agent(
    endpoint: str, options: list[str], config: Path, env: dict[str, str] | None = None
) -> AsyncIterator[CliProcess]:
    proc = await CliProcess.start(
        "--endpoints", endpoint, *options, "--timeout", "2", "--json",
        "agent", "--config", write_config(config),
        env=env,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.proc.returncode is None:
            await proc.kill()


def write_config(path: Path) -> str:
    path.write_text(CONFIG)
    return str(path)


async def keys(client: AsyncClient) -> set[str]:
    return {kv.key.decode() for kv in (await client.etcd.get("services/", prefix=True)).kvs}


async def test_agent_registers_over_mutual_tls(etcd_tls, tmp_path: Path) -> None:
    member, files = etcd_tls
    async with (
        agent(member.endpoint, etcd_tls_options(files), tmp_path / "agent.yaml") as proc,
        AsyncClient(member.endpoint, cacert=str(files.ca), cert=str(files.client_cert),
                    key=str(files.client_key)) as reader,
    ):  # fmt: skip
        await proc.event("ready")
        assert await keys(reader) == KEYS
        (web,) = await reader.list_instances("web")
        assert web.metadata["zone"] == "a" and web.lease, web
        assert await proc.stop() == 0, proc.said()
        assert await keys(reader) == set(), "SIGTERM must deregister everything"
        assert proc.json_events("deregistered")[0]["count"] == 2


async def test_agent_registers_with_user_and_password(etcd_auth, tmp_path: Path) -> None:
    member, user, password = etcd_auth
    # The password travels in the environment, never on the command line.
    env = {"ETCDISCO_PASSWORD": password}
    async with (
        agent(member.endpoint, ["--user", user], tmp_path / "agent.yaml", env) as proc,
        AsyncClient(member.endpoint, username=user, password=password) as reader,
    ):
        assert password not in " ".join(argv(proc))
        await proc.event("ready")
        assert await keys(reader) == KEYS
        assert await proc.stop() == 0, proc.said()
        assert await keys(reader) == set()
        assert password not in proc.everything()


def argv(proc: CliProcess) -> list[str]:
    return Path(f"/proc/{proc.proc.pid}/cmdline").read_text().split("\0")


async def test_agent_without_client_certificate_says_so_and_is_never_ready(
    etcd_tls, tmp_path: Path
) -> None:
    member, files = etcd_tls
    options = etcd_tls_options(files, client_cert=False)
    async with agent(member.endpoint, options, tmp_path / "agent.yaml") as proc:
        # The agent outlives an etcd it cannot use yet (by design), and says why.
        failed = await proc.line("registering", stderr=True)
        assert "failed (etcd unavailable" in failed and member.endpoint in failed, failed
        # etcd 3.5 fails the handshake (etcdisco's line says "Tls handshake failed ...
        # BAD_CERTIFICATE"); etcd 3.4 (TLS 1.3) rejects the certificate after it, so
        # etcdisco's line says "Unwrap failed (TSI_DATA_CORRUPTED)" and gRPC's own log
        # line next to it names the cause.
        await proc.line("SSLV3_ALERT_BAD_CERTIFICATE", stderr=True)
        assert proc.json_events("ready") == [], proc.said()
        assert await proc.stop() == 0, proc.said()
    async with AsyncClient(
        member.endpoint,
        cacert=str(files.ca),
        cert=str(files.client_cert),
        key=str(files.client_key),
    ) as reader:
        assert await keys(reader) == set()


async def test_agent_with_wrong_password_says_so_and_is_never_ready(
    etcd_auth, tmp_path: Path
) -> None:
    member, user, password = etcd_auth
    env = {"ETCDISCO_PASSWORD": password + "-wrong"}
    async with agent(member.endpoint, ["--user", user], tmp_path / "agent.yaml", env) as proc:
        failed = await proc.line("refused to register", stderr=True)
        assert " ERROR " in failed and "authentication failed" in failed.lower(), failed
        assert proc.json_events("ready") == [], proc.said()
        assert await proc.stop() == 0, proc.said()
        assert password not in proc.everything()
