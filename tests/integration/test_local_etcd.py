"""The local etcd launcher itself, against real etcd 3.4 and 3.5."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from etcdisco._local_etcd import (
    Credentials,
    EtcdctlError,
    EtcdStartError,
    LocalEtcd,
    LocalEtcdCluster,
    TlsFiles,
    etcd_version,
    find_etcd_binaries,
)


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_single_member_put_get(etcd: LocalEtcd, etcd_binary: Path) -> None:
    assert etcd.version == etcd_version(etcd_binary)
    assert etcd.endpoint == f"127.0.0.1:{etcd.client_port}"
    assert find_etcd_binaries()[etcd.version] == etcd_binary

    etcd.etcdctl("put", "greeting", "hello")
    got = etcd.etcdctl("get", "greeting", "--print-value-only").stdout.strip()
    assert got == "hello"
    assert etcd.status()["version"] == etcd.version
    assert etcd.log_path.is_file()


def test_data_survives_restart_and_stop_leaves_no_process(etcd: LocalEtcd) -> None:
    etcd.etcdctl("put", "k", "v1")
    old_pid = etcd.pid
    assert old_pid is not None
    port = etcd.client_port

    etcd.restart()
    assert etcd.client_port == port
    assert _process_gone(old_pid)
    assert etcd.etcdctl("get", "k", "--print-value-only").stdout.strip() == "v1"

    pid = etcd.pid
    assert pid is not None
    etcd.stop()
    assert not etcd.running
    assert _process_gone(pid)


def test_kill_then_start_again(etcd: LocalEtcd) -> None:
    etcd.etcdctl("put", "k", "v")
    etcd.kill()
    assert not etcd.running
    etcd.start()
    assert etcd.etcdctl("get", "k", "--print-value-only").stdout.strip() == "v"


def test_pause_and_resume(etcd: LocalEtcd) -> None:
    etcd.pause()
    assert etcd.paused
    assert not etcd.is_healthy(timeout=0.5)
    etcd.resume()
    deadline = time.monotonic() + 10
    while not etcd.is_healthy():
        assert time.monotonic() < deadline, "etcd not healthy again 10s after SIGCONT"
        time.sleep(0.05)


def test_stop_while_paused(etcd: LocalEtcd) -> None:
    pid = etcd.pid
    assert pid is not None
    etcd.pause()
    began = time.monotonic()
    etcd.stop(timeout=5)
    # SIGCONT follows SIGTERM, so a graceful exit, not the SIGKILL after 5 s.
    assert time.monotonic() - began < 4
    assert _process_gone(pid)


def test_taken_port_is_replaced_on_first_start(etcd_binary: Path, tmp_path: Path) -> None:
    member = LocalEtcd(tmp_path / "etcd", binary=etcd_binary)
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        squatter.bind(("127.0.0.1", member.client_port))
        squatter.listen()
        taken = member.client_port
        member.start(timeout=15)
        assert member.client_port != taken
        member.etcdctl("put", "k", "v")
    finally:
        squatter.close()
        member.stop()
        member.remove_data()


def test_start_failure_reports_the_log(etcd_binary: Path, tmp_path: Path) -> None:
    member = LocalEtcd(tmp_path / "etcd", binary=etcd_binary, extra_args=["--no-such-flag"])
    with pytest.raises(EtcdStartError) as info:
        member.start(timeout=15)
    message = str(info.value)
    assert "exited with code" in message
    assert "no-such-flag" in message
    assert not member.running


def test_cluster_leader_killed_new_leader_then_rejoin(etcd_cluster: LocalEtcdCluster) -> None:
    assert len(etcd_cluster.endpoints) == 3
    old = etcd_cluster.wait_for_leader(timeout=10)
    etcd_cluster.etcdctl("put", "before", "1")

    old.kill()
    began = time.monotonic()
    new = etcd_cluster.wait_for_leader(timeout=20, exclude=old)
    elected_after = time.monotonic() - began
    assert new is not old
    # Election timeout is 1 s: a new leader well within a few of them.
    assert elected_after < 15, f"new leader took {elected_after:.1f}s"

    # The two survivors have quorum: writes go on.
    new.etcdctl("put", "during", "2")

    old.restart()
    assert old.is_healthy()
    # The old member caught up with what was written while it was down: a
    # serializable read answers from its own store, not via the leader.
    value = old.etcdctl("get", "during", "--consistency=s", "--print-value-only")
    assert value.stdout.strip() == "2"
    members = json.loads(etcd_cluster.etcdctl("member", "list", "-w", "json").stdout)
    assert len(members["members"]) == 3
    assert etcd_cluster.wait_for_leader(timeout=10) is not None


def test_tls_member_refuses_plaintext(etcd_tls: tuple[LocalEtcd, TlsFiles]) -> None:
    member, files = etcd_tls
    assert member.url.startswith("https://")

    # Plain HTTP to the TLS port: Go's TLS server answers 400 (or the connection drops).
    conn = http.client.HTTPConnection("127.0.0.1", member.client_port, timeout=5)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().status == 400
    except (OSError, http.client.HTTPException):
        pass
    finally:
        conn.close()

    plain = subprocess.run(
        [str(member.etcdctl_path), f"--endpoints=http://{member.endpoint}",
         "--dial-timeout=1s", "--command-timeout=2s", "get", "k"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "ETCDCTL_API": "3"},
        check=False,
    )  # fmt: skip
    assert plain.returncode != 0, plain.stdout

    # Mutual TLS: the CA alone (no client certificate) is refused too.
    no_cert = subprocess.run(
        [str(member.etcdctl_path), f"--endpoints={member.url}", f"--cacert={files.ca}",
         "--dial-timeout=1s", "--command-timeout=2s", "get", "k"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "ETCDCTL_API": "3"},
        check=False,
    )  # fmt: skip
    assert no_cert.returncode != 0, no_cert.stdout


def test_tls_member_accepts_client_certificate(etcd_tls: tuple[LocalEtcd, TlsFiles]) -> None:
    member, _ = etcd_tls
    member.etcdctl("put", "secure", "yes")
    assert member.etcdctl("get", "secure", "--print-value-only").stdout.strip() == "yes"


def test_auth_member(etcd_auth: tuple[LocalEtcd, str, str]) -> None:
    member, user, password = etcd_auth
    assert user == "root"
    member.etcdctl("put", "k", "v")  # as root, from the stored credentials
    assert member.etcdctl("user", "get", "root").stdout.split()[-1] == "root"  # its role

    anonymous = subprocess.run(
        [str(member.etcdctl_path), f"--endpoints={member.url}", "get", "k"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "ETCDCTL_API": "3"},
        check=False,
    )  # fmt: skip
    assert anonymous.returncode != 0

    with pytest.raises(EtcdctlError, match="authentication failed"):
        member.etcdctl("get", "k", user=Credentials(user, password + "x"))
