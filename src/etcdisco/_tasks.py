"""Telling "my task is being cancelled" from "a stream I own was cancelled".

grpc.aio raises ``asyncio.CancelledError`` from a pending ``read()`` or ``write()``
when the call itself is cancelled, for instance by our own watchdog giving up on a
stalled stream. That error is not a request to stop the running task, and treating it
as one ends loops that must never end (a watch follower, a lease keeper), leaving a
cache frozen while it still says ``synced`` (DESIGN.md section 5.12). Every place that
reads a stream asks :func:`cancelling` before re-raising.
"""

from __future__ import annotations

import asyncio


def cancelling() -> bool:
    """Whether the running task has been asked to stop (``Task.cancel()``, or an
    ``asyncio.timeout`` expiring around it), as opposed to a call it awaited having
    been cancelled under it."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
