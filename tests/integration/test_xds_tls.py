"""The xDS control plane with TLS on both of its sides: the real ``etcdisco xds``
reading an etcd that demands client certificates (or a password), serving ADS over
mutual TLS, and a real grpcio client (a subprocess: gRPC reads its bootstrap once per
process) reaching a server registered in that etcd through ``xds:///echo``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from etcdisco import AsyncClient, ConfigError
from etcdisco.grpc.xds import XdsServer, XdsTls, bootstrap_config
from etcdisco.testing import TlsFiles

from .._util import communicate
from ._cli_process import CliProcess, etcd_tls_options
from .test_xds import LDS, XdsClientProcess, backends, register_all


def port_tls_options(files: TlsFiles) -> list[str]:
    """Mutual TLS on the ADS port; the same test CA signs both ends."""
    return [
        "--xds-cert", str(files.server_cert), "--xds-key", str(files.server_key),
        "--xds-client-ca", str(files.ca),
    ]  # fmt: skip


def bootstrap_tls_options(files: TlsFiles) -> list[str]:
    return [
        "--bootstrap-cacert", str(files.ca),
        "--bootstrap-cert", str(files.client_cert), "--bootstrap-key", str(files.client_key),
    ]  # fmt: skip


def tls_client(member: Any, files: TlsFiles) -> AsyncClient:
    return AsyncClient(
        member.endpoint,
        cacert=str(files.ca),
        cert=str(files.client_cert),
        key=str(files.client_key),
    )


@contextlib.asynccontextmanager
async def control_plane(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[CliProcess]:
    proc = await CliProcess.start(*args, env=env)
    try:
        yield proc
    finally:
        if proc.proc.returncode is None:
            await proc.kill()


def print_bootstrap(*args: str) -> dict[str, Any]:
    printed = subprocess.run(
        [sys.executable, "-m", "etcdisco", "xds", *args, "--print-bootstrap"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert printed.returncode == 0, printed.stderr
    result: dict[str, Any] = json.loads(printed.stdout)
    return result


def write_json(path: Path, data: dict[str, Any]) -> str:
    path.write_text(json.dumps(data))
    return str(path)


async def calls_through(bootstrap: dict[str, Any], path: Path, client: AsyncClient) -> None:
    """Two servers registered through ``client``, reached through xds:///echo by a grpcio
    process given ``bootstrap`` as a file (GRPC_XDS_BOOTSTRAP), as a deployment does."""
    bootstrap_file = write_json(path, bootstrap)
    async with backends(2) as servers:
        await register_all(client, servers)
        caller = await XdsClientProcess.start({"GRPC_XDS_BOOTSTRAP": bootstrap_file})
        try:
            for name in ("b0", "b1"):
                found = await caller.run(op="until", want=name, present=True)
                assert found["at"] is not None, f"{name} never answered: {found}"
            result = await caller.run(op="call", n=10)
        finally:
            await caller.close()
    assert result["n_errors"] == 0, result["errors"]
    assert sorted(result["counts"]) == ["b0", "b1"]


async def ads_call_fails(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    """Open an ADS stream as a client without the right credentials would; return the
    failure's details (the stream must fail, not hang)."""
    channel = (
        grpc.aio.insecure_channel(address)
        if credentials is None
        else grpc.aio.secure_channel(address, credentials)
    )
    try:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = stub.StreamAggregatedResources(
            iter(
                [
                    discovery_pb2.DiscoveryRequest(
                        type_url=LDS,
                        resource_names=["echo"],
                    )
                ]
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async with asyncio.timeout(10):
                await call.read()
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE, info.value
        return str(info.value.details())
    finally:
        await channel.close()


async def test_cli_serves_mutual_tls_from_a_mutual_tls_etcd(etcd_tls, tmp_path: Path) -> None:
    member, files = etcd_tls
    async with (
        control_plane(
            "--endpoints", member.endpoint, *etcd_tls_options(files),
            "xds", "--listen", "127.0.0.1:0", *port_tls_options(files),
        ) as xds,
        tls_client(member, files) as client,
    ):  # fmt: skip
        line = await xds.line("listening on 127.0.0.1:", timeout=20)
        address = line.split()[-1]
        bootstrap = print_bootstrap(
            "--listen", address, *port_tls_options(files), *bootstrap_tls_options(files)
        )
        assert bootstrap["xds_servers"][0]["channel_creds"] == [
            {
                "type": "tls",
                "config": {
                    "ca_certificate_file": str(files.ca),
                    "certificate_file": str(files.client_cert),
                    "private_key_file": str(files.client_key),
                },
            }
        ]
        await calls_through(bootstrap, tmp_path / "bootstrap.json", client)

        # The port really demands TLS and a client certificate.
        plaintext = await ads_call_fails(address, None)
        no_cert = await ads_call_fails(address, grpc.ssl_channel_credentials(files.ca.read_bytes()))
        assert "Socket closed" in plaintext or "failed to connect" in plaintext, plaintext
        assert "failed to connect" in no_cert or "Socket closed" in no_cert, no_cert
        assert await xds.stop(signal.SIGINT) == 0, xds.said()


async def test_cli_reads_an_etcd_with_user_and_password(etcd_auth, tmp_path: Path) -> None:
    member, user, password = etcd_auth
    async with (
        control_plane(
            "--endpoints", member.endpoint, "--user", user,
            "xds", "--listen", "127.0.0.1:0",
            env={"ETCDISCO_PASSWORD": password},  # never on the command line
        ) as xds,
        AsyncClient(member.endpoint, username=user, password=password) as client,
    ):  # fmt: skip
        address = (await xds.line("listening on 127.0.0.1:", timeout=20)).split()[-1]
        bootstrap = print_bootstrap("--listen", address)
        assert bootstrap["xds_servers"][0]["channel_creds"] == [{"type": "insecure"}]
        await calls_through(bootstrap, tmp_path / "bootstrap.json", client)
        assert await xds.stop(signal.SIGINT) == 0, xds.said()
    assert password not in xds.everything()


WARNING_WITH_REASON = re.compile(r"registry not read yet: .* not ready after [\d.]+s: ")


async def reason(xds: CliProcess) -> str:
    """The control plane's first warning that names why etcd did not answer (the very
    first may come before etcd's first answer, and name none)."""

    def found() -> str | None:
        return next((line for line in xds.err if WARNING_WITH_REASON.search(line)), None)

    result: str = await xds.wait_for(found, 15, "a warning naming why etcd did not answer")
    return result


async def test_cli_without_client_certificate_says_why_and_is_never_ready(etcd_tls) -> None:
    member, files = etcd_tls
    async with control_plane(
        "--endpoints", member.endpoint, *etcd_tls_options(files, client_cert=False),
        "--timeout", "1", "xds", "--listen", "127.0.0.1:0",
    ) as xds:  # fmt: skip
        warning = await reason(xds)
        assert member.endpoint in warning and "etcd unavailable" in warning, warning
        # etcdisco's line says "Tls handshake failed" (etcd 3.5) or "Unwrap failed"
        # (etcd 3.4 rejects the certificate after a TLS 1.3 handshake); gRPC's own log
        # names the cause in both.
        await xds.line("SSLV3_ALERT_BAD_CERTIFICATE", stderr=True)
        assert not any("listening" in line for line in xds.out), xds.said()
        assert await xds.stop(signal.SIGINT) == 0, xds.said()


async def test_cli_with_wrong_password_says_why_and_is_never_ready(etcd_auth) -> None:
    member, user, password = etcd_auth
    async with control_plane(
        "--endpoints", member.endpoint, "--user", user, "--timeout", "1",
        "xds", "--listen", "127.0.0.1:0",
        env={"ETCDISCO_PASSWORD": password + "-wrong"},
    ) as xds:  # fmt: skip
        warning = await reason(xds)
        assert "authentication failed" in warning.lower(), warning
        assert not any("listening" in line for line in xds.out), xds.said()
        assert await xds.stop(signal.SIGINT) == 0, xds.said()
    assert password not in xds.everything()


EMBEDDED_TLS = """
import json, os, sys, grpc
from etcdisco.grpc import xds
ca, cert, key, server_cert, server_key = sys.argv[1:]
tls = xds.XdsTls(server_cert, server_key, client_ca=ca,
                 client_cacert=ca, client_cert=cert, client_key=key)
with xds.install(os.environ["ETCDISCO_ENDPOINTS"], cacert=ca, cert=cert, key=key,
                 xds_tls=tls) as plane:
    call = grpc.insecure_channel("xds:///echo").unary_unary("/etcdisco.test.Echo/Who")
    names = sorted({call(b"", timeout=5).decode() for _ in range(8)})
    creds = plane.bootstrap()["xds_servers"][0]["channel_creds"]
    print(json.dumps({"names": names, "creds": creds}))
"""


async def test_embedded_control_plane_over_mutual_tls(etcd_tls) -> None:
    member, files = etcd_tls
    async with tls_client(member, files) as client, backends(2) as servers:
        await register_all(client, servers)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPC_XDS", "ETCDISCO_"))}
        env["ETCDISCO_ENDPOINTS"] = member.endpoint
        files_args = (files.ca, files.client_cert, files.client_key)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", EMBEDDED_TLS,
            *map(str, (*files_args, files.server_cert, files.server_key)),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await communicate(proc, 30)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["names"] == ["b0", "b1"], result
    ((creds),) = result["creds"]
    assert creds["type"] == "tls" and creds["config"]["certificate_file"] == str(files.client_cert)


async def test_tls_configuration_errors_are_named(tls_files: TlsFiles) -> None:
    files = tls_files
    # A key that does not belong to the certificate fails at start, naming both files.
    async with AsyncClient("127.0.0.1:1") as client:
        wrong = XdsTls(str(files.server_cert), str(files.client_key))
        with pytest.raises(
            ConfigError, match=r"cannot use certificate .*server\.crt .*client\.key"
        ):
            await XdsServer(client, tls=wrong).start()
        missing = XdsTls(str(files.server_cert), str(files.server_key), client_ca="/nonexistent")
        with pytest.raises(ConfigError, match="client CA /nonexistent"):
            await XdsServer(client, tls=missing).start()
    # A mutual TLS server cannot hand out a bootstrap without a client certificate.
    mutual = XdsTls(str(files.server_cert), str(files.server_key), client_ca=str(files.ca))
    with pytest.raises(ConfigError, match="requires client certificates"):
        mutual.bootstrap_options()
    with pytest.raises(ConfigError, match="go together"):
        XdsTls(str(files.server_cert), str(files.server_key), client_cert=str(files.client_cert))
    with pytest.raises(ConfigError, match="go together"):
        bootstrap_config("h:1", cert="c.pem")
    # TLS without files: the system's roots verify the server.
    assert bootstrap_config("h:1", tls=True)["xds_servers"][0]["channel_creds"] == [
        {"type": "tls", "config": {}}
    ]
    assert bootstrap_config("h:1")["xds_servers"][0]["channel_creds"] == [{"type": "insecure"}]


def test_cli_refuses_tls_settings_for_a_plaintext_port(tls_files: TlsFiles) -> None:
    def xds(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "etcdisco", "xds", "--listen", "127.0.0.1:18000", *args],
            capture_output=True,
            text=True,
            timeout=20,
        )

    plain = xds("--print-bootstrap", "--bootstrap-cacert", str(tls_files.ca))
    assert plain.returncode == 2 and "only with --xds-cert and --xds-key" in plain.stderr
    no_client = xds("--print-bootstrap", *port_tls_options(tls_files))
    assert no_client.returncode == 1 and "--bootstrap-cert" in no_client.stderr, no_client.stderr
