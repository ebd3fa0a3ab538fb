"""Pure pieces of live migration: which requests are live, what a live push target must carry,
the pre-copy keys' validation, and undo steps that run to their end through a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from lxd_daemon.errors import BadRequest
from lxd_daemon.instances.config import validate_config
from lxd_daemon.migration import migrate_pb2 as pb
from lxd_daemon.migration.sink import MigrationSink
from lxd_daemon.migration.source import CHANNELS, LIVE_CHANNELS, check_target, offer_predump
from lxd_daemon.util.tasks import to_the_end


def test_which_sinks_are_live():
    assert MigrationSink.is_live({"mode": "push", "live": True})
    assert not MigrationSink.is_live({"mode": "push"})
    # pull: the source's `criu` secret says so, as LXD decides
    assert MigrationSink.is_live({"mode": "pull", "secrets": {"control": "c", "fs": "f", "criu": "m"}})
    assert MigrationSink.is_live({"secrets": {"control": "c", "fs": "f", "criu": "m"}})
    assert not MigrationSink.is_live({"mode": "pull", "secrets": {"control": "c", "fs": "f"}})
    assert not MigrationSink.is_live({"mode": "push", "secrets": {"criu": "m"}})  # (push: no secrets given)


def test_a_live_push_target_needs_its_criu_secret():
    target = {"operation": "https://127.0.0.1:1/1.0/operations/x", "secrets": {"control": "c", "fs": "f"}}
    check_target(target, CHANNELS)
    with pytest.raises(BadRequest, match="no criu secret"):
        check_target(target, LIVE_CHANNELS)
    check_target({**target, "secrets": {"control": "c", "fs": "f", "criu": "m"}}, LIVE_CHANNELS)


def test_predump_field():
    assert not offer_predump(pb.MigrationHeader(fs=pb.RSYNC))
    assert not offer_predump(pb.MigrationHeader(fs=pb.RSYNC, predump=False))
    assert offer_predump(pb.MigrationHeader(fs=pb.RSYNC, predump=True))


@pytest.mark.parametrize("key,good,bad", [
    ("migration.incremental.memory", "true", "maybe"),
    ("migration.incremental.memory.iterations", "999", "0"),
    ("migration.incremental.memory.goal", "100", "101"),
])
def test_precopy_keys_are_validated(key, good, bad):
    validate_config({key: good})
    with pytest.raises(BadRequest, match=key.replace(".", r"\.")):
        validate_config({key: bad})


def test_to_the_end_survives_a_cancellation():
    steps: list[str] = []

    async def undo() -> str:
        steps.append("start")
        await asyncio.sleep(0.05)
        steps.append("end")
        return "done"

    async def main() -> None:
        assert await to_the_end(undo()) == "done"
        task = asyncio.ensure_future(to_the_end(undo()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert steps == ["start", "end", "start", "end"]  # the second undo finished anyway

    asyncio.run(main())


def test_a_source_stops_waiting_once_the_sink_succeeded():
    """while_watching(done_on_success): the sink's success ends what is left of the source's
    work (waiting for its rsync to exit); without it, the work runs to its end."""
    from lxd_daemon.migration.source import while_watching

    async def main() -> None:
        for early in (True, False):
            ended: list[str] = []

            async def work(ended: list[str] = ended) -> None:
                try:
                    await asyncio.sleep(0.3)
                    ended.append("finished")
                except asyncio.CancelledError:
                    ended.append("stopped")
                    raise

            async def verdict():
                await asyncio.sleep(0.01)
                return pb.MigrationControl(success=True)

            watcher = asyncio.ensure_future(verdict())
            await while_watching(watcher, work(), done_on_success=early)
            assert ended == (["stopped"] if early else ["finished"])

            watcher = asyncio.ensure_future(asyncio.sleep(0.01, pb.MigrationControl(success=False, message="no")))
            with pytest.raises(Exception, match="no"):
                await while_watching(watcher, work(), done_on_success=early)

    asyncio.run(main())
