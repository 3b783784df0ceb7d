"""Processes and their leftovers: spawning so that children die with us, reaping at
exit, temporary directories, free loopback ports and etcd's environment.

Every etcd process started by this package is registered here and killed at
interpreter exit (atexit); where util-linux's ``setpriv`` allows it, it also gets a
parent-death signal (`die_with_parent`), which covers the exits atexit does not see
(SIGKILL, ``os._exit``). Temporary data directories are removed at exit too: an
interrupted run must not leave 64 MB WAL files behind in /tmp.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

__all__ = ["die_with_parent"]

_HOST = "127.0.0.1"
# Start attempts when a freshly picked port turns out to be taken by someone else.
_PORT_ATTEMPTS = 3

_live_lock = threading.Lock()
_live: dict[int, subprocess.Popen[bytes]] = {}
# Temporary directories made by LocalEtcd/LocalEtcdCluster.
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
    # util-linux's setpriv, which then execs the command, covers those cases without a
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


def die_with_parent(argv: Sequence[str]) -> list[str]:
    """``argv``, prefixed so that the process it starts is SIGKILLed when we die.

    For the processes a test starts besides etcd (the service under test, a client):
    ``subprocess.Popen(die_with_parent([sys.executable, "-m", "myservice"]))``. Unlike
    an atexit hook, this also works when the test run is SIGKILLed or leaves through
    ``os._exit`` (as pytest-timeout's thread method does). `LocalEtcd` starts etcd
    this way.

    It uses util-linux's ``setpriv --pdeathsig KILL``, which then execs ``argv`` (the
    pid stays the child's). Without a working ``setpriv`` (not Linux, not installed),
    and when called from a thread other than the main thread, ``argv`` is returned
    unchanged: the parent-death signal fires when the *thread* that forked exits, so
    only the main thread, which lives as long as the process, is safe.
    """
    if threading.current_thread() is not threading.main_thread():
        return list(argv)
    return [*_setpriv_pdeathsig(), *argv]


def _etcd_env() -> dict[str, str]:
    # etcd reads every flag from ETCD_* variables too; a stray ETCD_DATA_DIR or
    # ETCD_NAME in the caller's environment would silently change the member.
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ETCD_") or key == "ETCD_UNSUPPORTED_ARCH"
    }


def _port_taken(port: int) -> bool:
    """True when a process listens on ``_HOST:port`` (connections in TIME_WAIT do not
    count: etcd, like every Go server, binds with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return True
    return False


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
