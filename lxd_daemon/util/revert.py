"""Undo multi-step changes on failure: a stack of callbacks run in reverse unless success() is called.

    async with Revert() as revert:
        await driver.create_volume(vol)
        revert.add(driver.delete_volume, vol)
        await write_record()
        revert.success()

Callbacks may be plain functions or coroutine functions (awaited). A failing callback is logged
and the rest still run; the original error propagates. Leaving the block through a cancellation
reverts too. `with Revert()` (synchronous) refuses coroutine callbacks.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("lxd.revert")


class Revert:
    def __init__(self) -> None:
        self._steps: list[tuple[Callable[..., Any], tuple, dict]] = []
        self._done = False

    def add(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Push an undo step (called as fn(*args, **kwargs))."""
        self._steps.append((fn, args, kwargs))

    def success(self) -> None:
        """Keep what was done: the undo steps are dropped."""
        self._done = True
        self._steps.clear()

    def clone(self) -> Revert:
        """Hand the pending steps to a new Revert (for a caller that finishes the change later);
        this one is then marked successful."""
        other = Revert()
        other._steps = list(self._steps)
        self.success()
        return other

    async def fail(self) -> None:
        """Run the undo steps now, newest first."""
        steps, self._steps = self._steps, []
        self._done = True
        for fn, args, kwargs in reversed(steps):
            try:
                res = fn(*args, **kwargs)
                if inspect.isawaitable(res):
                    await res
            except Exception:
                log.exception("revert step failed", extra={"step": getattr(fn, "__qualname__", repr(fn))})

    def fail_sync(self) -> None:
        steps, self._steps = self._steps, []
        self._done = True
        for fn, args, kwargs in reversed(steps):
            try:
                res = fn(*args, **kwargs)
                if inspect.isawaitable(res):
                    res.close()
                    raise TypeError("coroutine revert step in a synchronous Revert block")
            except Exception:
                log.exception("revert step failed", extra={"step": getattr(fn, "__qualname__", repr(fn))})

    async def __aenter__(self) -> Revert:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if not self._done:
            await self.fail()
        return False

    def __enter__(self) -> Revert:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self._done:
            self.fail_sync()
        return False
