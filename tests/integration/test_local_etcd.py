"""The local etcd launcher itself, against real etcd 3.4 and 3.5."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from etcdisco.testing import (
    Credentials,
    EtcdctlError,
    EtcdStartError,
    LocalEtcd,
    LocalEtcdCluster,
    LocalEtcdError,
    TlsFiles,
    die_with_parent,
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
    etcd.stop(timeout=30)
    # SIGCONT follows SIGTERM, so a graceful exit, not the SIGKILL after 30 s.
    assert time.monotonic() - began < 20
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


def _exited(pid: int) -> bool:
    """Gone, or a zombie waiting for its new parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        return _process_gone(pid)
    return stat.rpartition(")")[2].split()[0] == "Z"


def test_die_with_parent_kills_the_child_with_its_parent() -> None:
    if die_with_parent(["true"]) == ["true"]:
        pytest.skip("no working setpriv --pdeathsig on this machine")
    # Another thread's fork would get the signal when that thread ends: not used there.
    from_thread: list[list[str]] = []
    thread = threading.Thread(target=lambda: from_thread.append(die_with_parent(["true"])))
    thread.start()
    thread.join()
    assert from_thread == [["true"]]

    script = (
        "import subprocess, sys\n"
        "from etcdisco.testing import die_with_parent\n"
        "child = subprocess.Popen(die_with_parent(['sleep', '600']))\n"
        "print(child.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        try:
            assert not _exited(child)
            parent.kill()  # no atexit, no finally: only the parent-death signal is left
            parent.wait(10)
            deadline = time.monotonic() + 10
            while not _exited(child):
                assert time.monotonic() < deadline, "the child outlived its SIGKILLed parent"
                time.sleep(0.05)
        finally:
            parent.kill()
            if not _exited(child):
                os.kill(child, signal.SIGKILL)


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
    old.wait_healthy(15)
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


# -- partitions through peer proxies ---------------------------------------------------

# A member cut off from its peers loses its leader after an election timeout (1 s);
# etcd cancels require-leader watches after three more (monitorLeader). Generous for a
# loaded machine.
_NO_LEADER_WITHIN = 15.0
_HASLEADER = {"Grpc-Metadata-Hasleader": "true"}


def _leader_watch(member: LocalEtcd) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A watch with etcd's require-leader flag (the gRPC metadata ``hasleader``), opened
    through the JSON gateway; its first line (``created``) is read."""
    body = json.dumps({"create_request": {"key": base64.b64encode(b"watched").decode()}})
    conn = http.client.HTTPConnection("127.0.0.1", member.client_port, timeout=_NO_LEADER_WITHIN)
    conn.request("POST", "/v3/watch", body.encode(), _HASLEADER)
    response = conn.getresponse()
    assert response.status == 200
    assert json.loads(response.readline())["result"]["created"]
    return conn, response


def _leader_of(member: LocalEtcd) -> str:
    return str(member.status().get("leader", "0"))


def _wait_until(what: str, predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        time.sleep(0.1)


def _assert_cut_off(cluster: LocalEtcdCluster, member: LocalEtcd) -> None:
    _wait_until("the partitioned member has no leader", lambda: _leader_of(member) == "0", 10.0)
    # Its clients still reach it, but nothing that needs a leader works there.
    assert member.status()["header"]["member_id"] == member.member_id
    assert not member.is_healthy()
    read = member.etcdctl("get", "k", "--command-timeout=2s", check=False)
    assert read.returncode != 0, read.stdout
    conn = http.client.HTTPConnection("127.0.0.1", member.client_port, timeout=5.0)
    try:
        conn.request("POST", "/v3/watch", b"{}", _HASLEADER)
        response = conn.getresponse()
        code, body = response.status, response.read()
    finally:
        conn.close()
    assert b"no leader" in body, (code, body)
    # The other two are a majority: one of them leads, and writes go on.
    leader = cluster.wait_for_leader(timeout=15.0)
    assert leader is not member
    assert all(_leader_of(m) == leader.member_id for m in cluster.members if m is not member)


def _assert_rejoined(cluster: LocalEtcdCluster, member: LocalEtcd, key: str, value: str) -> None:
    def caught_up() -> bool:
        got = member.etcdctl("get", key, "--consistency=s", "--print-value-only", check=False)
        return got.stdout.strip() == value

    _wait_until(f"{member.name} sees {key}={value} after the heal", caught_up, 15.0)
    leader = cluster.wait_for_leader(timeout=15.0)
    _wait_until(
        f"{member.name} follows leader {leader.name}",
        lambda: _leader_of(member) == leader.member_id,
        15.0,
    )
    _wait_until(f"{member.name} healthy", member.is_healthy, 15.0)


def test_partitioned_follower_loses_its_leader_and_rejoins(
    etcd_cluster_proxied: LocalEtcdCluster,
) -> None:
    cluster = etcd_cluster_proxied
    leader = cluster.wait_for_leader(timeout=10.0)
    follower = next(m for m in cluster.members if m is not leader)
    # rafthttp names each sender in X-Server-From as its hex member id.
    _wait_until(
        "every member seen in X-Server-From",
        lambda: cluster.peer_senders_seen == {m.member_id_hex for m in cluster.members},
        10.0,
    )
    conn, watch = _leader_watch(follower)
    try:
        began = time.monotonic()
        cluster.partition(follower)
        assert cluster.is_partitioned(follower)
        # The open require-leader watch is cancelled, not left silently stale.
        cancelled = json.loads(watch.readline())
        assert "no leader" in cancelled["error"]["message"], cancelled
        assert time.monotonic() - began < _NO_LEADER_WITHIN
    finally:
        conn.close()
    _assert_cut_off(cluster, follower)
    assert cluster.leader() is leader  # a follower's loss does not disturb the leader
    leader.etcdctl("put", "during", "1")

    cluster.heal(follower)
    assert not cluster.is_partitioned(follower)
    _assert_rejoined(cluster, follower, "during", "1")


def test_partitioned_leader_is_replaced_and_restarts_go_through_the_proxy(
    etcd_cluster_proxied: LocalEtcdCluster,
) -> None:
    cluster = etcd_cluster_proxied
    old = cluster.wait_for_leader(timeout=10.0)
    with cluster.partitioned(old):
        _assert_cut_off(cluster, old)
        new = cluster.wait_for_leader(timeout=15.0, exclude=old)
        new.etcdctl("put", "during", "1")
    _assert_rejoined(cluster, old, "during", "1")

    # A restarted member keeps advertising its proxy: cutting it off still works.
    old.restart()
    with cluster.partitioned(old):
        _assert_cut_off(cluster, old)
        cluster.wait_for_leader(timeout=15.0).etcdctl("put", "after-restart", "2")
    _assert_rejoined(cluster, old, "after-restart", "2")


def test_partition_needs_peer_proxies(etcd_binary: Path, tmp_path: Path) -> None:
    cluster = LocalEtcdCluster(3, tmp_path / "cluster", binary=etcd_binary)
    with pytest.raises(LocalEtcdError, match="peer_proxies=True"):
        cluster.partition(cluster.members[0])
    assert all(m.advertised_peer_url == m.peer_url for m in cluster.members)
    proxied = LocalEtcdCluster(3, tmp_path / "proxied", binary=etcd_binary, peer_proxies=True)
    try:
        # Peers are told the proxy's port; the member still listens on its own.
        for member in proxied.members:
            assert member.advertised_peer_url != member.peer_url
            assert f"--listen-peer-urls={member.peer_url}" in member.command()
            assert f"--initial-advertise-peer-urls={member.advertised_peer_url}" in (
                member.command()
            )
    finally:
        proxied.close()
