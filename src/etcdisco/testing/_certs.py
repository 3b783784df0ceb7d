"""What a client needs to reach a secured etcd: test certificates (`make_test_certs`,
`TlsFiles`) and a user name with its password (`Credentials`).

Certificates are made with the ``openssl`` command: a CA, a server certificate for
127.0.0.1, ::1 and localhost, and a client certificate (P-256 keys, quick to make).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from ._errors import LocalEtcdError

__all__ = ["Credentials", "TlsFiles", "make_test_certs"]


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files for serving and reaching etcd over TLS, as `make_test_certs` makes them.

    ``server_cert``/``server_key`` are etcd's (``LocalEtcd(tls=...)``); a client
    passes ``ca``, ``client_cert`` and ``client_key`` (``cacert=``, ``cert=``, ``key=``).
    """

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A user name and password for an etcd with auth enabled (`LocalEtcd.enable_auth`
    returns root's)."""

    user: str
    password: str


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
