"""`LocalEtcd`: one etcd member, a process on 127.0.0.1 with its own data directory.

Its lifecycle (start and wait for ``/health``, stop, kill, pause, restart, remove its
data), what it says about itself (``/health``, Maintenance.Status through the JSON
gateway, its log) and etcdctl against it. A `LocalEtcdCluster` is made of these and
sets the cluster-wide flags (initial cluster, token, advertised peer port) on them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shlex
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from ._binaries import default_etcd_binary, etcd_version, etcdctl_for
from ._certs import Credentials, TlsFiles
from ._errors import EtcdStartError, LocalEtcdError, _AddressInUseError
from ._etcdctl import _enable_auth, _run_etcdctl
from ._process import (
    _HOST,
    _PORT_ATTEMPTS,
    _etcd_env,
    _free_ports,
    _make_temp_dir,
    _port_taken,
    _register,
    _remove_temp_dir,
    _unregister,
    die_with_parent,
)

__all__ = [
    "DEFAULT_ELECTION_TIMEOUT_MS",
    "DEFAULT_HEARTBEAT_INTERVAL_MS",
    "LocalEtcd",
]

# Raft timing every member gets unless told otherwise (etcd's own defaults too).
DEFAULT_HEARTBEAT_INTERVAL_MS = 100
DEFAULT_ELECTION_TIMEOUT_MS = 1000
# Seconds `start` waits for ``/health``, and `stop` for the exit before SIGKILL.
DEFAULT_START_TIMEOUT = 30.0
DEFAULT_STOP_TIMEOUT = 10.0
_LOG_TAIL_LINES = 40


class LocalEtcd:
    """One local etcd member: a process on 127.0.0.1 with its own data directory.

    ``data_dir`` is etcd's ``--data-dir``; etcd's output goes to ``etcd.log`` in it
    (etcd logs one warning about the unknown file, nothing more). Without ``data_dir``
    a temporary directory is made and `close` removes it. Ports left as None are free
    ephemeral ports picked now; when another process grabs one before etcd binds it,
    the first `start` picks new ones and tries again.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        binary: str | os.PathLike[str] | None = None,
        name: str = "etcdisco",
        client_port: int | None = None,
        peer_port: int | None = None,
        tls: TlsFiles | None = None,
        client_cert_auth: bool = False,
        auto_compaction: str | None = None,
        auto_compaction_mode: Literal["periodic", "revision"] = "periodic",
        quota_backend_bytes: int | None = None,
        heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL_MS,
        election_timeout: int = DEFAULT_ELECTION_TIMEOUT_MS,
        extra_args: Sequence[str] = (),
        start_timeout: float = DEFAULT_START_TIMEOUT,
    ) -> None:
        if client_cert_auth and tls is None:
            raise ValueError("client_cert_auth needs tls files")
        self.binary = Path(binary).absolute() if binary is not None else default_etcd_binary()
        self.version = etcd_version(self.binary)
        self.name = name
        self._owns_dir = data_dir is None
        if data_dir is None:
            self.data_dir = _make_temp_dir(f"etcdisco-{name}-")
        else:
            self.data_dir = Path(data_dir).absolute()
        self._ports_fixed = client_port is not None or peer_port is not None
        picked = _free_ports(2)
        self.client_port = client_port if client_port is not None else picked[0]
        self.peer_port = peer_port if peer_port is not None else picked[1]
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.auto_compaction = auto_compaction
        self.auto_compaction_mode = auto_compaction_mode
        self.quota_backend_bytes = quota_backend_bytes
        self.heartbeat_interval = heartbeat_interval
        self.election_timeout = election_timeout
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        # Set by enable_auth (or by hand): used by etcdctl() and status().
        self.credentials: Credentials | None = None
        # Seconds the last start() took until /health answered true.
        self.last_start_seconds: float | None = None
        # A LocalEtcdCluster sets these; alone, a member is a cluster of itself.
        self._initial_cluster: str | None = None
        # Set by a LocalEtcdCluster with peer proxies: the port peers are told to use.
        self._advertised_peer_port: int | None = None
        self._cluster_token = f"etcdisco-{secrets.token_hex(6)}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._ever_healthy = False
        self._log_offset = 0
        self._spawned_at = 0.0
        self._ssl: ssl.SSLContext | None = None
        self._member_id: str | None = None

    # ---- description

    def __repr__(self) -> str:
        state = "paused" if self._paused else "running" if self.running else "stopped"
        return f"<LocalEtcd {self.name} {self.version} {self.url} {state}>"

    @property
    def scheme(self) -> str:
        """``https`` when the member serves TLS, else ``http``."""
        return "https" if self.tls is not None else "http"

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``, the client endpoint without a scheme."""
        return f"{_HOST}:{self.client_port}"

    @property
    def url(self) -> str:
        """The client URL with its scheme, as etcdctl and etcd's flags want it."""
        return f"{self.scheme}://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        """Where this member listens for its peers."""
        return f"http://{_HOST}:{self.peer_port}"

    @property
    def advertised_peer_url(self) -> str:
        """What the other members dial: `peer_url`, or the port of the member's peer
        proxy in a cluster made with ``peer_proxies=True``."""
        port = self._advertised_peer_port
        return self.peer_url if port is None else f"http://{_HOST}:{port}"

    @property
    def log_path(self) -> Path:
        """etcd's output, ``etcd.log`` in the data dir (kept by `remove_data`)."""
        return self.data_dir / "etcd.log"

    @property
    def etcdctl_path(self) -> Path:
        """The etcdctl that matches this member's etcd binary."""
        return etcdctl_for(self.binary)

    @property
    def pid(self) -> int | None:
        """etcd's process id while it runs, else None."""
        return self._proc.pid if self._proc is not None and self.running else None

    @property
    def running(self) -> bool:
        """The process exists (it may be paused)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        """Stopped by `pause` (SIGSTOP) and not resumed yet."""
        return self._paused and self.running

    def command(self) -> list[str]:
        """etcd's command line for this member."""
        advertised = self.advertised_peer_url
        cmd = [
            str(self.binary),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={advertised}",
            f"--initial-cluster={self._initial_cluster or f'{self.name}={advertised}'}",
            f"--initial-cluster-token={self._cluster_token}",
            # Ignored by etcd once the data dir holds a member, so restarts rejoin.
            "--initial-cluster-state=new",
            f"--heartbeat-interval={self.heartbeat_interval}",
            f"--election-timeout={self.election_timeout}",
            # 3.4 defaults to the deprecated capnslog text logger; zap gives both
            # versions the same JSON log lines.
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if self.tls is not None:
            cmd += [f"--cert-file={self.tls.server_cert}", f"--key-file={self.tls.server_key}"]
            if self.client_cert_auth:
                cmd += ["--client-cert-auth", f"--trusted-ca-file={self.tls.ca}"]
        if self.auto_compaction is not None:
            cmd += [
                f"--auto-compaction-mode={self.auto_compaction_mode}",
                f"--auto-compaction-retention={self.auto_compaction}",
            ]
        if self.quota_backend_bytes is not None:
            cmd.append(f"--quota-backend-bytes={self.quota_backend_bytes}")
        cmd += self.extra_args
        return cmd

    # ---- lifecycle

    def start(self, timeout: float | None = None) -> Self:
        """Start etcd and wait until it answers ``/health`` with true."""
        if self.running:
            raise LocalEtcdError(f"{self!r} is already running")
        # Re-picking ports is only safe before the member has written its peer URL to
        # its data dir, and only when no other member's flags name this member's port.
        retry = not (self._ports_fixed or self._ever_healthy or self._initial_cluster)
        attempts = _PORT_ATTEMPTS if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                self._check_ports_free()
                self._spawn()
                self.wait_healthy(timeout)
                return self
            except _AddressInUseError:
                if attempt == attempts:
                    raise
                self._discard_failed_start()
                self._set_ports(*_free_ports(2))
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL if etcd has not exited after ``timeout`` seconds."""
        self._terminate()
        self._wait_stopped(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance for etcd to step down or flush."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
        proc.wait()
        self._forget()

    def restart(self, timeout: float | None = None) -> Self:
        """Stop (if running) and start again on the same ports and data dir."""
        self.stop()
        return self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing. Returns once
        the process is stopped (a signal is delivered asynchronously: without the
        wait, a request sent right after could still be answered)."""
        self._signal(signal.SIGSTOP)
        self._paused = True
        self._wait_stopped_state(True)

    def resume(self) -> None:
        """SIGCONT after `pause`; returns once the process runs again."""
        self._signal(signal.SIGCONT)
        self._paused = False
        self._wait_stopped_state(False)

    def _wait_stopped_state(self, stopped: bool, timeout: float = 5.0) -> None:
        assert self._proc is not None
        stat = Path(f"/proc/{self._proc.pid}/stat")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                # The state is the field after the parenthesised command name.
                state = stat.read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return  # no /proc (not Linux) or the process is gone: nothing to wait for
            if (state in ("T", "t")) == stopped:
                return
            time.sleep(0.005)
        raise LocalEtcdError(f"{self!r} did not {'stop' if stopped else 'continue'} in time")

    def remove_data(self) -> None:
        """Delete etcd's state (WAL, snapshots, db) but keep the log.

        A member's WAL alone preallocates 64 MB, so test suites call this. The next
        start makes a new, empty member.
        """
        if self.running:
            raise LocalEtcdError(f"{self!r} is running; stop it before removing its data")
        shutil.rmtree(self.data_dir / "member", ignore_errors=True)
        self._ever_healthy = False
        self._member_id = None

    def close(self) -> None:
        """Stop; remove the data directory if this object created it."""
        self.stop()
        if self._owns_dir:
            _remove_temp_dir(self.data_dir)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- health and status

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Poll ``GET /health`` until it says true; raise `EtcdStartError` with the log."""
        proc = self._proc
        if proc is None:
            raise LocalEtcdError(f"{self!r} was not started")
        limit = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        last = "no answer yet"
        while True:
            code = proc.poll()
            if code is not None:
                tail = self.log_tail(since_start=True)
                kind = _AddressInUseError if "address already in use" in tail else EtcdStartError
                self._forget()
                raise kind(
                    f"etcd {self.name} ({self.version}) exited with code {code} before "
                    f"becoming healthy\n{self._log_banner()}\n{tail}"
                )
            try:
                status, body = self._http("GET", "/health", timeout=1.0)
                if status == 200 and json.loads(body).get("health") == "true":
                    if proc.poll() is None:
                        break
                    continue  # answered by someone else: ours exited (reported above)
                last = f"HTTP {status}: {body[:200].decode(errors='replace')}"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise EtcdStartError(
                    f"etcd {self.name} ({self.version}) at {self.url} not healthy after "
                    f"{limit:.1f}s (last /health answer: {last})\n{self._log_banner()}\n"
                    f"{self.log_tail(since_start=True)}"
                )
            time.sleep(0.02)
        self._ever_healthy = True
        self.last_start_seconds = time.monotonic() - self._spawned_at

    def is_healthy(self, timeout: float = 1.0) -> bool:
        """One ``GET /health``: True when the member has a leader and serves reads."""
        try:
            status, body = self._http("GET", "/health", timeout=timeout)
            return status == 200 and json.loads(body).get("health") == "true"
        except (OSError, http.client.HTTPException, ValueError):
            return False

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        """Maintenance.Status through the JSON gateway (uint64 fields come as strings)."""
        code, body = self._http("POST", "/v3/maintenance/status", b"{}", timeout=timeout)
        if code != 200 and self.credentials is not None:
            # 3.4.23 and 3.5.1 answer Status without a token even with auth on; a token
            # costs a bcrypt check on the server, so it is only fetched when refused.
            headers = {"Authorization": self._auth_token(timeout)}
            code, body = self._http("POST", "/v3/maintenance/status", b"{}", headers, timeout)
        if code != 200:
            raise LocalEtcdError(f"status of {self.name}: HTTP {code}: {body[:300]!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    @property
    def member_id(self) -> str:
        """etcd's member id (decimal string, as the JSON gateway writes it)."""
        if self._member_id is None:
            self._member_id = str(self.status()["header"]["member_id"])
        return self._member_id

    @property
    def member_id_hex(self) -> str:
        """The member id as etcd writes it in logs, etcdctl tables and peer headers."""
        return format(int(self.member_id), "x")

    def log_tail(self, lines: int = _LOG_TAIL_LINES, *, since_start: bool = False) -> str:
        """The last lines of etcd's log (only this run's when ``since_start``)."""
        try:
            with self.log_path.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = max(self._log_offset if since_start else 0, size - 64 * 1024)
                f.seek(start)
                data = f.read()
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    # ---- etcdctl and auth

    def etcdctl(
        self,
        *args: str,
        user: Credentials | None = None,
        check: bool = True,
        input: str | None = None,
        timeout: float = 30.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run the etcdctl matching this etcd (API v3) against this member.

        TLS flags are added when the member serves TLS, ``--user`` when ``user`` is
        given or `enable_auth` stored credentials. ``check`` raises `EtcdctlError`.
        """
        return _run_etcdctl(
            self.etcdctl_path,
            [self.url],
            self.tls,
            self.credentials,
            args,
            user=user,
            check=check,
            input=input,
            timeout=timeout,
        )

    def enable_auth(self, password: str) -> Credentials:
        """Create user root with ``password`` and the root role, then enable auth."""
        credentials = _enable_auth(self.etcdctl, password)
        self.credentials = credentials
        return credentials

    # ---- internals

    def _set_ports(self, client_port: int, peer_port: int) -> None:
        self.client_port = client_port
        self.peer_port = peer_port

    def _check_ports_free(self) -> None:
        """Refuse ports that another process listens on, before spawning: etcd would
        exit, but until it does another etcd there answers ``/health`` for it."""
        for what, port in (("client", self.client_port), ("peer", self.peer_port)):
            if _port_taken(port):
                raise _AddressInUseError(
                    f"etcd {self.name}: its {what} port {_HOST}:{port} is in use by another process"
                )

    def _spawn(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cmd = self.command()
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"==== etcdisco {stamp}: {shlex.join(cmd)}\n".encode())
            log.flush()
            self._spawned_at = time.monotonic()
            # A session of its own keeps a terminal's Ctrl-C away from etcd: the demo
            # must be able to deregister before its etcd goes away.
            proc = subprocess.Popen(
                die_with_parent(cmd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_etcd_env(),
                start_new_session=True,
            )
        _register(proc)
        self._proc = proc
        self._paused = False

    def _terminate(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.terminate()
                if self._paused:
                    proc.send_signal(signal.SIGCONT)

    def _wait_stopped(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
        self._forget()

    def _forget(self) -> None:
        if self._proc is not None:
            _unregister(self._proc)
        self._proc = None
        self._paused = False

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or not self.running:
            raise LocalEtcdError(f"{self!r} is not running")
        self._proc.send_signal(sig)

    def _discard_failed_start(self) -> None:
        # Only called before the member was ever healthy, so nothing of value is lost.
        shutil.rmtree(self.data_dir / "member", ignore_errors=True)

    def _log_banner(self) -> str:
        return f"--- last lines of {self.log_path} ---"

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        if self._ssl is None:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
            self._ssl = context
        return self._ssl

    def _http(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 2.0,
    ) -> tuple[int, bytes]:
        conn: http.client.HTTPConnection
        context = self._ssl_context()
        if context is not None:
            conn = http.client.HTTPSConnection(
                _HOST, self.client_port, timeout=timeout, context=context
            )
        else:
            conn = http.client.HTTPConnection(_HOST, self.client_port, timeout=timeout)
        try:
            all_headers = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def _auth_token(self, timeout: float) -> str:
        assert self.credentials is not None
        payload = json.dumps(
            {"name": self.credentials.user, "password": self.credentials.password}
        ).encode()
        code, body = self._http("POST", "/v3/auth/authenticate", payload, timeout=timeout)
        if code != 200:
            raise LocalEtcdError(f"authenticate on {self.name}: HTTP {code}: {body[:300]!r}")
        token: str = json.loads(body)["token"]
        return token
