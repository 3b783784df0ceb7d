"""An exception the command line did not expect: one line, and the traceback only
with ``--log-level debug`` (given before or after the command)."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from etcdisco.cli import _common, _resolve, main


@pytest.fixture
def crashing_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("boom\nwith a second line")

    monkeypatch.setattr(_resolve, "_picker", broken)
    # What --log-level changes in this process, put back after the test.
    monkeypatch.setattr(_common, "_show_tracebacks", False)
    monkeypatch.setattr(_common, "log_to_stderr", lambda level: None)
    monkeypatch.delenv("ETCDISCO_LOG_LEVEL", raising=False)


def run(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["etcdisco", *args])
    with pytest.raises(SystemExit) as info:
        main()
    return int(info.value.code or 0)


@pytest.mark.usefixtures("crashing_resolve")
def test_an_unexpected_exception_is_one_line_with_a_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(monkeypatch, "resolve", "echo") == 1
    err = capsys.readouterr().err
    assert err == (
        "etcdisco: error: unexpected RuntimeError: boom "
        "(rerun with --log-level debug for the traceback)\n"
    )


@pytest.mark.usefixtures("crashing_resolve")
@pytest.mark.parametrize(
    "args",
    [("resolve", "echo", "--log-level", "debug"), ("--log-level", "debug", "resolve", "echo")],
)
def test_log_level_debug_shows_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: tuple[str, ...]
) -> None:
    assert run(monkeypatch, *args) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):"), err
    assert "in broken" in err and "RuntimeError: boom" in err
    assert err.endswith("etcdisco: error: unexpected RuntimeError: boom\n")
