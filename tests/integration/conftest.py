"""Real etcd servers for the integration tests, one fresh server (or cluster) per test.

Each fixture depends on ``etcd_binary`` (tests/conftest.py), so every test here runs
once against etcd 3.4 and once against etcd 3.5. Data lives under the test's tmp_path;
after the test the member is stopped and its WAL/snapshots are deleted (64 MB each),
but ``etcd.log`` stays. When a test fails, the last lines of each member's log are
printed in the teardown section of the report.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from etcdisco.testing import LocalEtcd, LocalEtcdCluster, TlsFiles

from .._proxy import TcpProxy
from ..grpc_echo.fleet import Fleet

_CALL_FAILED = pytest.StashKey[bool]()


class AuthEtcd(NamedTuple):
    """What ``etcd_auth`` yields: ``member, user, password = etcd_auth``."""

    member: LocalEtcd
    user: str
    password: str


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


def _teardown(request: pytest.FixtureRequest, members: list[LocalEtcd]) -> None:
    try:
        if request.node.stash.get(_CALL_FAILED, False):
            for member in members:
                print(
                    f"--- {member.name} ({member.version}) {member.log_path} ---\n"
                    f"{member.log_tail(30)}",
                    file=sys.stderr,
                )
    finally:
        for member in members:
            member.stop()
            member.remove_data()


@pytest.fixture
def etcd(etcd_binary: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalEtcd]:
    """A started single-member etcd (plain http); ``etcd.endpoint`` is 127.0.0.1:PORT."""
    member = LocalEtcd(tmp_path / "etcd", binary=etcd_binary)
    try:
        member.start()
        yield member
    finally:
        _teardown(request, [member])


@pytest.fixture
def etcd_cluster(
    etcd_binary: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[LocalEtcdCluster]:
    """A started 3-member cluster; every member healthy and a leader elected."""
    cluster = LocalEtcdCluster(3, tmp_path / "cluster", binary=etcd_binary)
    try:
        cluster.start()
        yield cluster
    finally:
        _teardown(request, cluster.members)


@pytest.fixture
def etcd_cluster_proxied(
    etcd_binary: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[LocalEtcdCluster]:
    """A started 3-member cluster whose peers reach each other through proxies, so a
    test can partition a member (``cluster.partition(member)`` / ``cluster.heal``)."""
    cluster = LocalEtcdCluster(3, tmp_path / "cluster", binary=etcd_binary, peer_proxies=True)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            _teardown(request, cluster.members)
        finally:
            cluster.close()


@pytest.fixture
def etcd_tls(
    etcd_binary: Path, tls_files: TlsFiles, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[LocalEtcd, TlsFiles]]:
    """A started member serving https with mutual TLS, and its certificate files."""
    member = LocalEtcd(
        tmp_path / "etcd-tls", binary=etcd_binary, tls=tls_files, client_cert_auth=True
    )
    try:
        member.start()
        yield member, tls_files
    finally:
        _teardown(request, [member])


@pytest.fixture
def etcd_auth(
    etcd_binary: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[AuthEtcd]:
    """A started member with auth enabled for user root: ``member, user, password``.

    ``member.etcdctl`` already authenticates as root.
    """
    member = LocalEtcd(tmp_path / "etcd-auth", binary=etcd_binary)
    try:
        member.start()
        credentials = member.enable_auth(secrets.token_urlsafe(12))
        yield AuthEtcd(member, credentials.user, credentials.password)
    finally:
        _teardown(request, [member])


@pytest.fixture
def fleet(etcd: LocalEtcd, tmp_path: Path) -> Iterator[Fleet]:
    """Echo servers in processes of their own, registered in ``etcd``; all stopped after."""
    f = Fleet(etcd.endpoint, tmp_path)
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def proxy(etcd: LocalEtcd) -> Iterator[TcpProxy]:
    """A TCP proxy in front of ``etcd`` that the test can cut and heal."""
    host, port = etcd.endpoint.rsplit(":", 1)
    p = TcpProxy(host, int(port))
    try:
        yield p
    finally:
        p.close()
