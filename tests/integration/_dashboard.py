"""What the dashboard's tests share: ``etcdisco ui`` run as an operator runs it, and a
real headless Chromium (Debian's ``chromium`` package, driven by Playwright; never a
downloaded browser)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ._cli_process import CliProcess

CHROMIUM = os.environ.get("ETCDISCO_CHROMIUM", "/usr/bin/chromium")
TOKEN = "operator-token-0123456789abcdef"


def chromium_or_skip() -> str:
    """The browser's path; a missing one skips (fails under CI, as a missing etcd does)."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    found = shutil.which("chromium")
    if found:
        return found
    message = f"no Chromium at {CHROMIUM}: run scripts/setup.sh (Debian's chromium package)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@contextlib.asynccontextmanager
async def launched_browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    path = chromium_or_skip()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=path, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


class Dashboard:
    """A running ``etcdisco ui``: its process, its URL and its admin token (or None)."""

    def __init__(self, proc: CliProcess, url: str, token: str | None) -> None:
        self.proc = proc
        self.url = url
        self.token = token


@contextlib.asynccontextmanager
async def running_dashboard(
    endpoint: str, tmp_path: Path, *, token: str | None = None, extra: tuple[str, ...] = ()
) -> AsyncIterator[Dashboard]:
    args = ["--endpoints", endpoint, "--json", "ui", "--listen", "127.0.0.1:0", *extra]
    if token is not None:
        token_file = tmp_path / "ui-token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        args += ["--admin-token-file", str(token_file)]
    proc = await CliProcess.start(*args)
    try:
        listening = await proc.event("listening", timeout=30)
        yield Dashboard(proc, listening["url"], token)
    finally:
        code = await proc.stop()
        assert code == 0, f"etcdisco ui exited {code}\n{proc.said()}"


async def open_page(browser: Any, url: str) -> Any:
    """A new page on the dashboard, once it shows the synced registry and its live
    feed is open (the first rows are drawn before the feed connects, under a
    "connecting" banner)."""
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    await page.goto(url)
    await page.wait_for_selector('body[data-state="synced"][data-rendered-at]', timeout=15_000)
    await page.wait_for_selector("#banner[hidden]", state="attached", timeout=15_000)
    return page


def row(key: str) -> str:
    """The selector of an instance's row."""
    return f'tr[data-key="{key}"]'
