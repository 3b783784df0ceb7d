"""Every Python example in the README runs, as written, against a real etcd."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(etcd, index: int) -> None:
    env = {**os.environ, "ETCDISCO_ENDPOINTS": etcd.endpoint}
    res = subprocess.run(
        [sys.executable, "-c", BLOCKS[index]], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, f"README example {index} failed:\n{res.stderr}"
    assert "127.0.0.1:5005" in res.stdout, res.stdout
