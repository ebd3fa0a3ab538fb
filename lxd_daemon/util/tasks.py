"""Background tasks of the services (schedulers, watchers)."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Stop a service's background task at exit: cancel it and wait until it has ended. Whatever
    it ends with is of no interest then (its own loop logs its failures)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
