"""`LocalEtcdCluster`: several `LocalEtcd` members forming one cluster.

Starting and stopping them together (a member alone has no quorum), finding the agreed
leader, etcdctl against all of them, auth for all of them, and partitions through the
peer proxies (`_peer_proxy`) when made with ``peer_proxies=True``.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import os
import secrets
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from ._binaries import default_etcd_binary, etcd_version, etcdctl_for
from ._certs import Credentials, TlsFiles
from ._errors import LocalEtcdError, _AddressInUseError
from ._etcdctl import _enable_auth, _run_etcdctl
from ._member import (
    DEFAULT_ELECTION_TIMEOUT_MS,
    DEFAULT_HEARTBEAT_INTERVAL_MS,
    DEFAULT_START_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    LocalEtcd,
)
from ._peer_proxy import _PeerProxies
from ._process import _PORT_ATTEMPTS, _free_ports, _make_temp_dir, _remove_temp_dir

__all__ = ["LocalEtcdCluster"]


class LocalEtcdCluster:
    """``size`` local members (default 3) forming one cluster, in ``base_dir/<name>``.

    Members are `LocalEtcd` objects: kill, pause or restart them one by one. A
    restarted member finds its data dir and rejoins.

    With ``peer_proxies=True`` every member is reached by its peers through a small
    TCP proxy in this process (loopback only, no privileges needed), which makes
    network partitions possible: `partition` cuts one member off from its peers while
    its clients still reach it (it loses its leader; the others keep or elect one),
    `heal` lets it rejoin. Proxies outlive member restarts (a restarted member is
    still reached through its proxy) and stop with `close`.
    """

    def __init__(
        self,
        size: int = 3,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        binary: str | os.PathLike[str] | None = None,
        tls: TlsFiles | None = None,
        client_cert_auth: bool = False,
        auto_compaction: str | None = None,
        auto_compaction_mode: Literal["periodic", "revision"] = "periodic",
        quota_backend_bytes: int | None = None,
        heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL_MS,
        election_timeout: int = DEFAULT_ELECTION_TIMEOUT_MS,
        extra_args: Sequence[str] = (),
        start_timeout: float = DEFAULT_START_TIMEOUT,
        name_prefix: str = "etcd",
        peer_proxies: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one member")
        self._owns_dir = base_dir is None
        if base_dir is None:
            self.base_dir = _make_temp_dir("etcdisco-cluster-")
        else:
            self.base_dir = Path(base_dir).absolute()
        resolved = Path(binary).absolute() if binary is not None else default_etcd_binary()
        self.binary = resolved
        self.version = etcd_version(resolved)
        self.tls = tls
        self.start_timeout = start_timeout
        self.credentials: Credentials | None = None
        self.members = [
            LocalEtcd(
                self.base_dir / f"{name_prefix}{i}",
                binary=resolved,
                name=f"{name_prefix}{i}",
                tls=tls,
                client_cert_auth=client_cert_auth,
                auto_compaction=auto_compaction,
                auto_compaction_mode=auto_compaction_mode,
                quota_backend_bytes=quota_backend_bytes,
                heartbeat_interval=heartbeat_interval,
                election_timeout=election_timeout,
                extra_args=extra_args,
                start_timeout=start_timeout,
            )
            for i in range(size)
        ]
        token = f"etcdisco-{secrets.token_hex(6)}"
        for member in self.members:
            member._cluster_token = token
        self._ever_healthy = False
        self._proxies = _PeerProxies(size) if peer_proxies else None
        self._partitioned: set[int] = set()
        self._assign_ports()
        self.last_start_seconds: float | None = None

    def __repr__(self) -> str:
        return f"<LocalEtcdCluster {self.version} {self.members!r}>"

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[LocalEtcd]:
        return iter(self.members)

    def __getitem__(self, index: int) -> LocalEtcd:
        return self.members[index]

    @property
    def endpoints(self) -> list[str]:
        """``127.0.0.1:PORT`` of every member."""
        return [member.endpoint for member in self.members]

    @property
    def urls(self) -> list[str]:
        """Every member's client URL with its scheme."""
        return [member.url for member in self.members]

    # ---- lifecycle

    def start(self, timeout: float | None = None) -> Self:
        """Start every member that is not running and wait until all are healthy."""
        limit = self.start_timeout if timeout is None else timeout
        attempts = 1 if self._ever_healthy else _PORT_ATTEMPTS
        began = time.monotonic()
        for attempt in range(1, attempts + 1):
            # All members must be up before any can be healthy (no quorum alone), so
            # spawn them all, then wait.
            for member in self.members:
                if not member.running:
                    member._spawn()
            deadline = time.monotonic() + limit
            try:
                for member in self.members:
                    member.wait_healthy(max(0.1, deadline - time.monotonic()))
            except _AddressInUseError:
                if attempt == attempts:
                    self._stop_all(0.0)
                    raise
                # Every member's flags name every peer port, so all start over.
                self._stop_all(0.0)
                for member in self.members:
                    member._discard_failed_start()
                self._assign_ports()
                continue
            except BaseException:
                if not self._ever_healthy:
                    self._stop_all(0.0)
                raise
            self._ever_healthy = True
            self.last_start_seconds = time.monotonic() - began
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop all members at once (one by one, the last ones would lose quorum)."""
        self._stop_all(timeout)

    def kill(self) -> None:
        """SIGKILL every member (see `LocalEtcd.kill`)."""
        for member in self.members:
            member.kill()

    def restart(self, timeout: float | None = None) -> Self:
        """Stop all members, then start them again on the same ports and data."""
        self.stop()
        return self.start(timeout)

    def remove_data(self) -> None:
        """Delete every member's etcd state (see `LocalEtcd.remove_data`)."""
        for member in self.members:
            member.remove_data()
        self._ever_healthy = False

    def close(self) -> None:
        """Stop; close the peer proxies; remove ``base_dir`` if this object made it."""
        self.stop()
        if self._proxies is not None:
            self._proxies.close()
        if self._owns_dir:
            _remove_temp_dir(self.base_dir)

    def __enter__(self) -> Self:
        if not all(member.running for member in self.members):
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- leadership

    def leader(self, timeout: float = 1.0) -> LocalEtcd | None:
        """The member that leads, or None while there is no agreed leader.

        One status request per running member, each bounded by ``timeout``. A member
        counts as leader when it says so itself and a majority of the cluster reports
        the same leader, so a freshly killed leader's id, still remembered by the
        others until their election timeout, is never returned.
        """
        statuses: dict[int, tuple[str, str]] = {}
        for index, member in enumerate(self.members):
            if not member.running or member.paused:
                continue
            try:
                status = member.status(timeout=timeout)
            except (LocalEtcdError, OSError, http.client.HTTPException, ValueError):
                continue
            member_id = str(status.get("header", {}).get("member_id", ""))
            leader_id = str(status.get("leader", "0"))
            statuses[index] = (member_id, leader_id)
        votes = collections.Counter(leader_id for _, leader_id in statuses.values())
        for index, (member_id, leader_id) in statuses.items():
            if leader_id == member_id and votes[leader_id] > len(self.members) // 2:
                return self.members[index]
        return None

    def wait_for_leader(self, timeout: float = 15.0, exclude: LocalEtcd | None = None) -> LocalEtcd:
        """Poll `leader` until there is one (other than ``exclude``)."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader()
            if leader is not None and leader is not exclude:
                return leader
            if time.monotonic() >= deadline:
                raise LocalEtcdError(
                    f"no leader{f' other than {exclude.name}' if exclude else ''} "
                    f"after {timeout:.1f}s; members: {self._describe()}"
                )
            time.sleep(0.05)

    # ---- partitions (peer_proxies=True)

    def partition(self, member: LocalEtcd) -> None:
        """Cut ``member`` off from its peers; its clients still reach it.

        Open peer connections to and from it are dropped and new ones refused until
        `heal`. The member must have run once (its id is read from it, and cached).
        """
        proxies = self._require_proxies()
        index = self._index(member)
        proxies.cut(index, member.member_id_hex)
        self._partitioned.add(index)

    def heal(self, member: LocalEtcd) -> None:
        """Let ``member`` reach its peers again after `partition`."""
        proxies = self._require_proxies()
        index = self._index(member)
        proxies.heal(index, member.member_id_hex)
        self._partitioned.discard(index)

    @contextlib.contextmanager
    def partitioned(self, member: LocalEtcd) -> Iterator[LocalEtcd]:
        """``with cluster.partitioned(member): ...``: partition, then heal on exit."""
        self.partition(member)
        try:
            yield member
        finally:
            self.heal(member)

    def is_partitioned(self, member: LocalEtcd) -> bool:
        """Whether ``member`` is cut off by `partition` (and not healed yet)."""
        return self._index(member) in self._partitioned

    @property
    def peer_senders_seen(self) -> frozenset[str]:
        """Every member id (hex) the peer proxies saw in an ``X-Server-From`` header."""
        return self._require_proxies().senders()

    def _require_proxies(self) -> _PeerProxies:
        if self._proxies is None:
            raise LocalEtcdError("partitions need LocalEtcdCluster(..., peer_proxies=True)")
        return self._proxies

    def _index(self, member: LocalEtcd) -> int:
        for index, candidate in enumerate(self.members):
            if candidate is member:
                return index
        raise ValueError(f"{member!r} is not a member of this cluster")

    # ---- etcdctl and auth

    def etcdctl(
        self,
        *args: str,
        user: Credentials | None = None,
        check: bool = True,
        input: str | None = None,
        timeout: float = 30.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run the matching etcdctl (API v3) with every member's URL as endpoints."""
        return _run_etcdctl(
            etcdctl_for(self.binary),
            self.urls,
            self.tls,
            self.credentials,
            args,
            user=user,
            check=check,
            input=input,
            timeout=timeout,
        )

    def enable_auth(self, password: str) -> Credentials:
        """Create user root with the root role and enable auth, for all members."""
        credentials = _enable_auth(self.etcdctl, password)
        self.credentials = credentials
        for member in self.members:
            member.credentials = credentials
        return credentials

    # ---- internals

    def _assign_ports(self) -> None:
        ports = _free_ports(2 * len(self.members))
        for i, member in enumerate(self.members):
            member._set_ports(ports[2 * i], ports[2 * i + 1])
            if self._proxies is not None:
                self._proxies.set_target(i, member.peer_port)
                member._advertised_peer_port = self._proxies.ports[i]
        initial = ",".join(f"{m.name}={m.advertised_peer_url}" for m in self.members)
        for member in self.members:
            member._initial_cluster = initial

    def _stop_all(self, timeout: float) -> None:
        for member in self.members:
            member._terminate()
        deadline = time.monotonic() + timeout
        for member in self.members:
            member._wait_stopped(max(0.0, deadline - time.monotonic()))

    def _describe(self) -> str:
        parts = []
        for member in self.members:
            if not member.running:
                parts.append(f"{member.name}: stopped")
            elif member.paused:
                parts.append(f"{member.name}: paused")
            else:
                try:
                    status = member.status(timeout=1.0)
                    parts.append(
                        f"{member.name}: id={status.get('header', {}).get('member_id')} "
                        f"leader={status.get('leader')} term={status.get('raftTerm')}"
                    )
                except (LocalEtcdError, OSError, http.client.HTTPException, ValueError) as exc:
                    parts.append(f"{member.name}: status failed ({exc})")
        return "; ".join(parts)
