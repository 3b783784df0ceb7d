"""The committed etcd protobuf modules match what scripts/gen_proto.py generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_modules_are_current() -> None:
    # The script runs the pinned generator (in .venv-protogen, made on first use).
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        "generated etcd modules are stale; run scripts/gen_proto.py\n"
        + result.stdout
        + result.stderr
    )
