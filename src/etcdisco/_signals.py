"""SIGTERM and SIGINT handling shared by the command line and the server helpers.

A service stops on either signal: the first one starts a graceful stop, a second one
tells it to hurry. Handlers are installed on the running event loop (the callback
runs on the loop) or, for blocking code, with ``signal.signal`` (the callback runs on
the main thread, between bytecodes), and removal puts back what was there before.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """Calls ``on_signal(signum)`` on every SIGTERM/SIGINT while installed.

    ``loop``: handle them on that event loop (``loop.add_signal_handler``); None:
    with ``signal.signal``, which only the main thread may call."""

    def __init__(
        self, on_signal: Callable[[int], None], loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._on_signal = on_signal
        self._loop = loop
        self._previous: dict[signal.Signals, Any] = {}
        self._installed = False

    @staticmethod
    def check_main_thread(what: str) -> None:
        """Refuse early where handlers cannot be installed (Python delivers signals to
        the main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(f"{what} needs the main thread (Python delivers signals there)")

    def install(self) -> StopSignals:
        if self._installed:
            return self
        if self._loop is not None:
            for sig in STOP_SIGNALS:
                self._loop.add_signal_handler(sig, self._on_signal, sig)
        else:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._from_signal_module)
        self._installed = True
        return self

    def _from_signal_module(self, signum: int, frame: FrameType | None) -> None:
        self._on_signal(signum)

    def remove(self) -> None:
        if not self._installed:
            return
        if self._loop is not None:
            if not self._loop.is_closed():
                for sig in STOP_SIGNALS:
                    self._loop.remove_signal_handler(sig)
        elif threading.current_thread() is threading.main_thread():
            while self._previous:
                sig, handler = self._previous.popitem()
                signal.signal(sig, handler)
        else:
            return  # only the main thread may restore; try again from there
        self._installed = False

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()
