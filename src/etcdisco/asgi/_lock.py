"""One registration per listening address when several processes serve it.

``uvicorn --workers N`` and gunicorn run the application, and so its lifespan, in
every worker: each would register the same ``host:port`` key under a lease of its
own, and the first worker to exit would delete the key while the others still
serve. An :class:`AddressLock` elects one of them: an exclusive ``flock`` on a file
named after the registry prefix and the address, in a directory only this user may
write (``$XDG_RUNTIME_DIR/etcdisco``, else ``<tmp>/etcdisco-<uid>``). The worker that
holds it registers; the others serve without registering. The kernel releases the
lock when its holder exits, however it exits, so the next worker started takes it.

The file is never deleted: deleting a lock file while another process has it open
would let two processes each hold "the" lock.
"""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
from pathlib import Path
from urllib.parse import quote

from .._errors import ConfigError

__all__ = ["AddressLock", "default_lock_dir"]


def default_lock_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "etcdisco"
    return Path(tempfile.gettempdir()) / f"etcdisco-{os.getuid()}"


def _private_dir(path: Path) -> Path:
    """``path``, created if needed; refused unless it is a directory of this user that
    nobody else may write (else another user could hold our lock, or swap the file)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        raise ConfigError(f"cannot use lock directory {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ConfigError(f"lock directory {path} is not a directory owned by this user")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"lock directory {path} is writable by other users")
    return path


class AddressLock:
    """The lock of ``address`` under ``prefix``: :meth:`try_acquire` takes it without
    waiting, :meth:`release` lets it go (so does the process exiting)."""

    def __init__(self, prefix: str, address: str, directory: str | os.PathLike[str] | None) -> None:
        self.directory = Path(directory) if directory is not None else default_lock_dir()
        self.path = self.directory / (quote(f"{prefix}@{address}", safe="") + ".lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """True if this process holds the lock now (taken, or held already)."""
        if self._fd is not None:
            return True
        _private_dir(self.directory)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open lock file {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        # Who holds it, for a person looking (the lock itself is the flock).
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor releases the flock
