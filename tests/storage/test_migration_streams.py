"""streams.py: driver-native migration streams over a real websocket pair on 127.0.0.1.

btrfs for real on a loop pool: a volume with a nested subvolume and two snapshots goes as LXD's
btrfs migration sends it (header JSON + barrier, then one `btrfs send` stream per subvolume,
incremental against the previous snapshot, each ended by a barrier) and arrives whole; without the
subvolume features a nested subvolume is refused before anything is sent. zfs (no zfs here): the
exact command lines through a recorded runner, with the stream framing checked end to end."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from lxd_daemon.migration import streams
from lxd_daemon.migration.wire import MigrationError
from lxd_daemon.storage.drivers import tools
from lxd_daemon.storage.drivers.btrfs import BtrfsDriver
from lxd_daemon.storage.volume import Volume, VolumeType
from tests.storage.conformance import populate, tree
from tests.storage.test_btrfs import POOL_SIZE, force_cleanup, mounts_under
from tests.wspair import pair, ws_server

ALL = [streams.BTRFS_MIGRATION_HEADER, streams.BTRFS_SUBVOLUMES]


@pytest.fixture
def btrfs_pool(tmp_path):
    ok, why = BtrfsDriver.available()
    if os.geteuid() != 0 or not ok:
        pytest.skip(f"needs root and btrfs ({why})")
    d = BtrfsDriver("mig", tmp_path / "var" / "storage-pools" / "mig",
                    BtrfsDriver.validate_pool_config({"size": POOL_SIZE}))
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(d.create_pool())
        yield d, loop
    finally:
        try:
            loop.run_until_complete(d.delete_pool())
        except Exception:
            pass
        force_cleanup(tmp_path)
        loop.close()
        assert mounts_under(tmp_path) == []


def vol(name: str) -> Volume:
    return Volume("mig", VolumeType.CONTAINER, name)


def test_btrfs_volume_with_snapshots_and_nested_subvolume(btrfs_pool):
    d, loop = btrfs_pool
    src = vol("c1")

    async def fill(path: Path) -> None:
        await asyncio.to_thread(populate, path)

    async def main():
        await d.create_volume(src, fill)
        p = await d.mount_volume(src)
        (p / "f").write_text("v1")
        await d.create_snapshot(src.snapshot("s1"))
        (p / "f").write_text("v2")
        (p / "var" / "lib").mkdir(parents=True)
        subprocess.run(["btrfs", "subvolume", "create", str(p / "var" / "lib" / "machines")], check=True,
                       capture_output=True)
        (p / "var" / "lib" / "machines" / "inner").write_text("nested")
        await d.create_snapshot(src.snapshot("s2"))
        (p / "f").write_text("v3")
        frames: list[str] = []
        reports: list[tuple[str, int]] = []

        def progress(label):
            return lambda done, speed: reports.append((label, done))

        async with ws_server() as server:
            dialed, acc = await pair(server)
            # without the subvolume features a nested subvolume can't go: refused before any data
            with pytest.raises(MigrationError, match="Subvolumes detected"):
                await streams.send_btrfs_volume(d, src, ["s1", "s2"], dialed, [streams.BTRFS_MIGRATION_HEADER])
            assert acc.bytes_received == 0
            # count the streams as the receiver sees them: frames, then a barrier each
            orig = acc.recv

            async def spy(timeout=None):
                data = await orig(timeout)
                frames.append("B" if data is None else "d")
                return data

            acc.recv = spy
            await asyncio.wait_for(asyncio.gather(
                streams.send_btrfs_volume(d, src, ["s1", "s2"], dialed, ALL, progress=progress),
                streams.receive_btrfs_volume(d, vol("c2"), ["s1", "s2"], acc, ALL, progress=progress)), 120)
            await dialed.close()
            await acc.close()
        # header, s1, s2 (+ its nested subvolume), the volume (+ its nested subvolume): 6 barriers
        assert "".join(frames).count("B") == 6
        dst = vol("c2")
        assert tree(await d.mount_volume(dst)) == tree(p)
        assert (await d.mount_volume(dst) / "f").read_text() == "v3"
        assert (await d.mount_volume(dst.snapshot("s1")) / "f").read_text() == "v1"
        s2 = await d.mount_volume(dst.snapshot("s2"))
        assert (s2 / "var/lib/machines/inner").read_text() == "nested"
        assert await d.list_snapshots(dst) == ["s1", "s2"]
        # the copy is writable, its snapshots are not
        (await d.mount_volume(dst) / "var/lib/machines/new").write_text("rw")
        with pytest.raises(OSError):
            (s2 / "new").write_text("ro")
        assert {label for label, _ in reports} >= {"c1", "c1/s1", "c1/s2", "c2", "c2/s1", "c2/s2"}
        for v in (src, dst):
            for s in await d.list_snapshots(v):
                await d.delete_snapshot(v.snapshot(s))
            await d.delete_volume(v)

    loop.run_until_complete(main())


def test_btrfs_receive_fails_cleanly_when_the_sender_goes(btrfs_pool):
    d, loop = btrfs_pool
    src = vol("c1")

    async def main():
        async def fill(path: Path) -> None:
            (path / "big").write_bytes(os.urandom(4 << 20))

        await d.create_volume(src, fill)
        async with ws_server() as server:
            dialed, acc = await pair(server)
            recv = asyncio.ensure_future(streams.receive_btrfs_volume(d, vol("c2"), [], acc, ALL))
            await dialed.send_json(streams.btrfs_header([streams.BtrfsSubvolume()]))
            await dialed.send(b"btrfs-stream\x00" + b"\x01" * 1000)  # the start of a stream, then gone
            await dialed.close()
            with pytest.raises(MigrationError):
                await asyncio.wait_for(recv, 30)
            await acc.close()
        assert not await d.has_volume(vol("c2"))
        assert sorted(os.listdir(d.mount_path / "containers")) == ["c1"]
        await d.delete_volume(src)

    loop.run_until_complete(main())


def test_btrfs_header_shape():
    subvols = [streams.BtrfsSubvolume("/", "s1", True, "u1"), streams.BtrfsSubvolume("/var/lib/x", "", False)]
    obj = streams.btrfs_header(subvols)
    assert obj == {"subvolumes": [{"path": "/", "snapshot": "s1", "readonly": True, "uuid": "u1"},
                                  {"path": "/var/lib/x", "snapshot": "", "readonly": False, "uuid": ""}]}
    assert streams.parse_btrfs_header(obj) == subvols
    for bad in ({"subvolumes": [{"path": "../etc"}]}, {"subvolumes": [{"path": "/", "snapshot": "a/b"}]}, [], None):
        with pytest.raises(MigrationError):
            streams.parse_btrfs_header(bad)
    assert streams.default_btrfs_subvolumes(["a"]) == [streams.BtrfsSubvolume("/", "a", True),
                                                       streams.BtrfsSubvolume("/", "", False)]
    assert streams.btrfs_send_args(Path("/p/s"), Path("/p/r")) == ["btrfs", "send", "-q", "-p", "/p/r", "/p/s"]
    assert streams.btrfs_receive_args(Path("/w/0")) == ["btrfs", "receive", "-e", "/w/0"]


def test_zfs_command_lines_and_framing():
    """zfs can't run here: the commands go through a recorded runner; the bytes it 'prints'
    travel over a real websocket and are what the receiving command gets on stdin."""
    calls: list[tuple[tuple[str, ...], bytes | None]] = []

    async def runner(argv, stdin):
        calls.append((argv, stdin))
        if argv[:2] == ("zfs", "send"):
            return tools.Result(argv, 0, "ZFSSTREAM:" + argv[-1], "")
        if "broken" in argv:
            return tools.Result(argv, 1, "", "cannot receive: invalid stream")
        return tools.Result(argv, 0, "", "")

    assert streams.zfs_send_args("p/c/c1@snapshot-s1") == ["zfs", "send", "p/c/c1@snapshot-s1"]
    assert streams.zfs_send_args("p/c/c1@migration-x", "p/c/c1@snapshot-s1", compress=True) == \
        ["zfs", "send", "-c", "-L", "-i", "p/c/c1@snapshot-s1", "p/c/c1@migration-x"]
    assert streams.zfs_receive_args("p/c/c2") == ["zfs", "receive", "-x", "mountpoint", "-F", "-u", "p/c/c2"]
    assert streams.zfs_receive_args("p/v/c2.block", block=True) == ["zfs", "receive", "-F", "-u", "p/v/c2.block"]

    async def main():
        async with ws_server() as server:
            dialed, acc = await pair(server)
            with tools.use_runner(runner):
                await asyncio.gather(streams.zfs_send("p/c/c1@snapshot-s1", dialed),
                                     streams.zfs_receive("p/c/c2", acc))
                await asyncio.gather(streams.zfs_send("p/c/c1@m", dialed, parent="p/c/c1@snapshot-s1", compress=True),
                                     streams.zfs_receive("p/c/c2", acc))
                send = asyncio.gather(streams.zfs_send("p/c/c1@m2", dialed))
                with pytest.raises(MigrationError, match="invalid stream"):
                    await streams.zfs_receive("broken", acc)
                await send
            await dialed.close()
            await acc.close()

    asyncio.run(main())
    sends = [(argv, stdin) for argv, stdin in calls if argv[1] == "send"]
    recvs = [(argv, stdin) for argv, stdin in calls if argv[1] == "receive"]
    assert [a for a, _ in sends] == [("zfs", "send", "p/c/c1@snapshot-s1"),
                                     ("zfs", "send", "-c", "-L", "-i", "p/c/c1@snapshot-s1", "p/c/c1@m"),
                                     ("zfs", "send", "p/c/c1@m2")]
    assert recvs == [(("zfs", "receive", "-x", "mountpoint", "-F", "-u", "p/c/c2"), b"ZFSSTREAM:p/c/c1@snapshot-s1"),
                     (("zfs", "receive", "-x", "mountpoint", "-F", "-u", "p/c/c2"), b"ZFSSTREAM:p/c/c1@m"),
                     (("zfs", "receive", "-x", "mountpoint", "-F", "-u", "broken"), b"ZFSSTREAM:p/c/c1@m2")]
