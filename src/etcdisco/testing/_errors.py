"""The errors of `etcdisco.testing`, and nothing else.

RuntimeError
  └── LocalEtcdError           driving a local etcd went wrong (no binary, no leader...)
        └── EtcdStartError     a member did not become healthy (message: its log tail)
              └── _AddressInUseError   private: a picked port was taken; start retries
subprocess.CalledProcessError
  └── EtcdctlError             etcdctl exited non-zero (str() shows what it printed)
"""

from __future__ import annotations

import subprocess

__all__ = ["EtcdStartError", "EtcdctlError", "LocalEtcdError"]


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
