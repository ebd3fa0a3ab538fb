"""util.revert.Revert: undo steps run newest first unless success() is called."""

from __future__ import annotations

import asyncio

import pytest

from lxd_daemon.util.revert import Revert


def test_async_revert_runs_sync_and_async_steps_in_reverse_on_error():
    done = []

    async def undo_async(x):
        done.append(x)

    async def go():
        async with Revert() as r:
            r.add(done.append, 1)
            r.add(undo_async, 2)
            r.add(lambda: done.append(3))
            raise ValueError("x")

    with pytest.raises(ValueError):
        asyncio.run(go())
    assert done == [3, 2, 1]


def test_success_keeps_everything():
    done = []

    async def go():
        async with Revert() as r:
            r.add(done.append, 1)
            r.success()

    asyncio.run(go())
    assert done == []


def test_leaving_without_success_reverts_and_a_failing_step_does_not_stop_the_rest():
    done = []

    def bad():
        raise OSError("undo failed")

    async def go():
        async with Revert() as r:
            r.add(done.append, "a")
            r.add(bad)
            r.add(done.append, "b")

    asyncio.run(go())
    assert done == ["b", "a"]


def test_cancellation_reverts():
    done = []

    async def go():
        async with Revert() as r:
            r.add(done.append, 1)
            await asyncio.sleep(10)

    async def main():
        t = asyncio.create_task(go())
        await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    asyncio.run(main())
    assert done == [1]


def test_sync_revert_and_clone():
    done = []
    with pytest.raises(KeyError):
        with Revert() as r:
            r.add(done.append, 1)
            raise KeyError("k")
    assert done == [1]
    with Revert() as r:
        r.add(done.append, 2)
        later = r.clone()
    assert done == [1]
    with later:
        pass
    assert done == [1, 2]


def test_sync_revert_refuses_coroutine_steps():
    async def undo():
        pass

    r = Revert()
    r.add(undo)
    r.fail_sync()  # logged, not raised; the coroutine is closed (no "never awaited" warning)
