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
    assert "127.0.0.1:" in res.stdout, res.stdout  # each example prints an address


def test_readme_testing_fixture_runs_under_pytest(etcd_binary: Path, tmp_path: Path) -> None:
    """The "Testing your services" example is a pytest module: pytest runs it as is."""
    section = README.read_text().split("## Testing your services against a real etcd\n")[1]
    example = re.findall(r"```py\n(.*?)```", section.split("\n## ")[0], flags=re.S)
    assert len(example) == 1
    (tmp_path / "test_example.py").write_text(example[0])
    env = {**os.environ, "ETCDISCO_ETCD": str(etcd_binary)}  # this run's etcd version
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout, res.stdout


DOCS = Path(__file__).resolve().parents[2] / "docs"
DOC_BLOCKS = [
    (page, block)
    for page in ("getting-started.md", "concepts.md")
    for block in re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)
]


@pytest.mark.parametrize(("page", "block"), DOC_BLOCKS, ids=[p for p, _ in DOC_BLOCKS])
def test_docs_example_runs(etcd, page: str, block: str) -> None:
    env = {**os.environ, "ETCDISCO_ENDPOINTS": etcd.endpoint}
    res = subprocess.run(
        [sys.executable, "-c", block], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, f"example in docs/{page} failed:\n{res.stderr}"


@pytest.mark.parametrize("fence", ["yaml", "toml"])
def test_docs_agent_config_examples_are_valid(tmp_path: Path, fence: str) -> None:
    page = (DOCS / "guides" / "agent.md").read_text()
    # Agent configs (the page also shows a Kubernetes probe snippet).
    blocks = [b for b in re.findall(rf"```{fence}\n(.*?)```", page, flags=re.S) if "services" in b]
    assert blocks
    for n, block in enumerate(blocks):
        path = tmp_path / f"agent{n}.{fence}"
        path.write_text(block)
        res = subprocess.run(
            [sys.executable, "-m", "etcdisco", "agent", "--config", str(path), "--check-config"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, f"docs/guides/agent.md {fence} example {n}: {res.stderr}"
