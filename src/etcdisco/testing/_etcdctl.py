"""Running etcdctl (API v3) against local members, with their TLS files and
credentials, and enabling auth through it. Shared by `LocalEtcd` and
`LocalEtcdCluster`, whose ``etcdctl`` and ``enable_auth`` methods are the public face.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ._certs import Credentials, TlsFiles
from ._errors import EtcdctlError


def _etcdctl_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    return env


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
