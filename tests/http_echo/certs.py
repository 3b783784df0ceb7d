"""Certificates for a service name, made with the openssl command: a CA and a server
certificate whose names are given (etcdisco.testing.make_test_certs names only
127.0.0.1 and localhost)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = test
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = {names}
"""


def _run(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed: {result.stderr}")


def make_service_certs(directory: Path, *names: str) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) for DNS ``names``."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make certificates")
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "openssl.cnf"
    config.write_text(_CONFIG.format(names=", ".join(f"DNS:{n}" for n in names)))
    ca_key, ca, key, csr, crt = (
        directory / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")
    )
    curve = ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    _run("genpkey", *curve, "-out", str(ca_key))
    _run(
        "req", "-x509", "-new", "-key", str(ca_key), "-subj", "/CN=test-ca", "-days", "2",
        "-config", str(config), "-extensions", "v3_ca", "-out", str(ca),
    )  # fmt: skip
    _run("genpkey", *curve, "-out", str(key))
    _run("req", "-new", "-key", str(key), "-subj", f"/CN={names[0]}", "-config", str(config),
         "-out", str(csr))  # fmt: skip
    _run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", str(config), "-extensions", "v3_server",
        "-out", str(crt),
    )  # fmt: skip
    return ca, crt, key


def server_context(crt: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(crt, key)
    return context
