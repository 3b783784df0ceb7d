"""`LocalEtcdProxy`: etcd's own gRPC proxy (``etcd grpc-proxy start``) on 127.0.0.1,
in front of local members, for tests of the scale-out path.

The proxy is the same ``etcd`` binary as the members it fronts (3.4 and 3.5 both ship
it). It coalesces watches on the same range and keepalive streams of the same lease,
so thousands of clients can share a few streams to etcd. It serves gRPC and HTTP on
one port: `wait_healthy` reads its ``/health``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shlex
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from ._binaries import default_etcd_binary, etcd_version
from ._cluster import LocalEtcdCluster
from ._errors import EtcdStartError, LocalEtcdError, _AddressInUseError
from ._member import DEFAULT_START_TIMEOUT, DEFAULT_STOP_TIMEOUT, LocalEtcd
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

__all__ = ["LocalEtcdProxy"]

_LOG_TAIL_LINES = 40


class LocalEtcdProxy:
    """etcd's gRPC proxy on 127.0.0.1, in front of a `LocalEtcd`, a `LocalEtcdCluster`
    or endpoints given as ``host:port`` strings (plain http only).

    Clients dial `endpoint` as they would dial a member. The binary is the fronted
    member's (else ``binary``, else `default_etcd_binary`). ``data_dir`` holds the
    proxy's log (``proxy.log``); without it a temporary directory is made and `close`
    removes it. ``upstream_auth`` says that etcd has authentication on (known by
    itself for members whose `LocalEtcd.enable_auth` was called). A port left as None
    is a free ephemeral port picked now (picked again on the first start if someone
    else took it); `restart` keeps it, so clients reconnect to the same address.

        with LocalEtcd() as etcd, LocalEtcdProxy(etcd) as proxy:
            with Client(proxy.endpoint) as client:   # every call goes through the proxy
                ...
            proxy.restart()                          # same port: clients come back
    """

    def __init__(
        self,
        upstream: LocalEtcd | LocalEtcdCluster | str | Sequence[str],
        *,
        binary: str | os.PathLike[str] | None = None,
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = DEFAULT_START_TIMEOUT,
        upstream_auth: bool = False,
    ) -> None:
        members: list[LocalEtcd] = []
        if isinstance(upstream, LocalEtcd):
            members = [upstream]
        elif isinstance(upstream, LocalEtcdCluster):
            members = list(upstream.members)
        elif isinstance(upstream, str):
            self.upstream = [part for part in upstream.split(",") if part]
        else:
            self.upstream = [str(part) for part in upstream]
        if members:
            if any(member.tls is not None for member in members):
                raise ValueError("LocalEtcdProxy fronts plain-http members only")
            self.upstream = [member.endpoint for member in members]
        if not self.upstream:
            raise ValueError("LocalEtcdProxy needs at least one upstream endpoint")
        self._members = members
        self._upstream_auth = upstream_auth
        if binary is not None:
            self.binary = Path(binary).absolute()
        elif members:
            self.binary = members[0].binary
        else:
            self.binary = default_etcd_binary()
        self.version = etcd_version(self.binary)
        self._owns_dir = data_dir is None
        if data_dir is None:
            self.data_dir = _make_temp_dir("etcdisco-grpc-proxy-")
        else:
            self.data_dir = Path(data_dir).absolute()
        self._port_fixed = port is not None
        self.port = port if port is not None else _free_ports(1)[0]
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        # Seconds the last start() took until /health answered.
        self.last_start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ever_started = False
        self._log_offset = 0
        self._spawned_at = 0.0

    # ---- description

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"<LocalEtcdProxy {self.version} {self.endpoint} -> {','.join(self.upstream)} {state}>"
        )

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``, where clients dial the proxy."""
        return f"{_HOST}:{self.port}"

    @property
    def url(self) -> str:
        """The endpoint with its scheme, as etcdctl wants it."""
        return f"http://{self.endpoint}"

    @property
    def log_path(self) -> Path:
        """The proxy's output, ``proxy.log`` in the data dir."""
        return self.data_dir / "proxy.log"

    @property
    def pid(self) -> int | None:
        """The proxy's process id while it runs, else None."""
        return self._proc.pid if self._proc is not None and self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The proxy's command line."""
        return [
            str(self.binary),
            "grpc-proxy",
            "start",
            f"--endpoints={','.join(self.upstream)}",
            f"--listen-addr={self.endpoint}",
            # 3.5 dials its advertised URL (default 127.0.0.1:23790) for itself.
            f"--advertise-client-url={self.endpoint}",
            f"--data-dir={self.data_dir}",
            *self.extra_args,
        ]

    # ---- lifecycle

    def start(self, timeout: float | None = None) -> Self:
        """Start the proxy and wait until it answers ``/health``."""
        if self.running:
            raise LocalEtcdError(f"{self!r} is already running")
        # Once clients know the port, it is kept: a restart must come back on it.
        attempts = 1 if self._port_fixed or self._ever_started else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                if _port_taken(self.port):
                    raise _AddressInUseError(
                        f"grpc-proxy: port {self.endpoint} is in use by another process"
                    )
                self._spawn()
                self.wait_healthy(timeout)
                self._ever_started = True
                return self
            except _AddressInUseError:
                if attempt == attempts:
                    raise
                self.port = _free_ports(1)[0]
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL if the proxy has not exited after ``timeout`` seconds."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
        self._forget()

    def kill(self) -> None:
        """SIGKILL: the proxy crashes; every stream through it breaks at once."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
        proc.wait()
        self._forget()

    def restart(self, timeout: float | None = None) -> Self:
        """Stop (if running) and start again on the same port."""
        self.stop()
        return self.start(timeout)

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

    # ---- health

    @property
    def upstream_auth(self) -> bool:
        """etcd behind the proxy has authentication on."""
        return self._upstream_auth or any(m.credentials is not None for m in self._members)

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Poll ``GET /health`` until the proxy answers it with true (it asks its
        upstream); raise `EtcdStartError` with the proxy's log.

        With `upstream_auth`, any answer will do: the proxy asks etcd without a user,
        so its ``/health`` says false for as long as authentication is on.
        """
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
                    f"grpc-proxy ({self.version}) exited with code {code} before "
                    f"becoming healthy\n--- last lines of {self.log_path} ---\n{tail}"
                )
            healthy, last = self._health(1.0)
            answered = last.startswith("HTTP ")
            if (healthy or (answered and self.upstream_auth)) and proc.poll() is None:
                break
            if time.monotonic() >= deadline:
                raise EtcdStartError(
                    f"grpc-proxy ({self.version}) at {self.endpoint} not healthy after "
                    f"{limit:.1f}s (last /health answer: {last})\n"
                    f"--- last lines of {self.log_path} ---\n{self.log_tail(since_start=True)}"
                )
            time.sleep(0.02)
        self.last_start_seconds = time.monotonic() - self._spawned_at

    def is_healthy(self, timeout: float = 1.0) -> bool:
        """One ``GET /health``: True when the proxy runs and reaches its upstream
        (always False while etcd has authentication on, see `wait_healthy`)."""
        return self._health(timeout)[0]

    def log_tail(self, lines: int = _LOG_TAIL_LINES, *, since_start: bool = False) -> str:
        """The last lines of the proxy's log (only this run's when ``since_start``)."""
        try:
            with self.log_path.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(self._log_offset if since_start else 0, size - 64 * 1024))
                data = f.read()
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    # ---- internals

    def _health(self, timeout: float) -> tuple[bool, str]:
        conn = http.client.HTTPConnection(_HOST, self.port, timeout=timeout)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            body = response.read()
            healthy = response.status == 200 and json.loads(body).get("health") == "true"
            return healthy, f"HTTP {response.status}: {body[:200].decode(errors='replace')}"
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return False, f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()

    def _spawn(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cmd = self.command()
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"==== etcdisco {stamp}: {shlex.join(cmd)}\n".encode())
            log.flush()
            self._spawned_at = time.monotonic()
            proc = subprocess.Popen(
                die_with_parent(cmd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_etcd_env(),
                start_new_session=True,
                # The proxy writes nothing to its working directory when --data-dir
                # is given, but keep it out of the caller's directory regardless.
                cwd=self.data_dir,
            )
        _register(proc)
        self._proc = proc

    def _forget(self) -> None:
        if self._proc is not None:
            _unregister(self._proc)
        self._proc = None
