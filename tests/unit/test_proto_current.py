"""The committed etcd API modules must match what scripts/gen_proto.py generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GEN_PROTO = ROOT / "scripts" / "gen_proto.py"
REQUIRED_SERIES = "1.66."


def _grpc_tools_version() -> str | None:
    try:
        from grpc_tools import grpc_version  # type: ignore[import-untyped]
    except ImportError:
        return None
    return str(grpc_version.VERSION)


def test_generated_proto_modules_are_current() -> None:
    version = _grpc_tools_version()
    if version is None:
        pytest.skip("grpc_tools is not importable; install the dev extra (grpcio-tools==1.66.2)")
    if not version.startswith(REQUIRED_SERIES):
        pytest.skip(
            f"grpcio-tools {version} installed; gen_proto.py only generates with "
            f"{REQUIRED_SERIES}x, so its output cannot be compared"
        )

    result = subprocess.run(
        [sys.executable, str(GEN_PROTO), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (
        "src/etcdisco/etcd/_proto is stale; run `python scripts/gen_proto.py`\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
