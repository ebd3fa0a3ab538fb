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


async def to_the_end(aw):
    """Await `aw` to its end even when the caller is cancelled meanwhile (an undo that must not
    stop halfway); the cancellation is raised once it has ended."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result
