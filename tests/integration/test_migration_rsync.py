"""rsync.py over a real migration websocket pair on 127.0.0.1 (uvicorn accepts, wire.dial connects),
with the real rsync on both ends, as a migration runs it: a tree with owners, modes, xattrs,
hard links, symlinks, device nodes, a fifo and a sparse file arrives identical (hard links as
separate copies: LXD's rsync arguments have no -H); a second run with `delete` removes what the
source no longer has; several streams share one websocket; a killed peer fails the other end
quickly and leaves no rsync or netcat behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lxd_daemon.migration import rsync
from lxd_daemon.migration.wire import MigrationError
from tests.helpers import REPO
from tests.wspair import pair, ws_server

pytestmark = pytest.mark.integration

if os.geteuid() != 0:
    pytest.skip("needs root (owners, device nodes, trusted xattrs)", allow_module_level=True)


def make_tree(root: Path) -> None:
    root.mkdir()
    (root / "etc").mkdir(mode=0o750)
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    os.chown(root / "etc", 1000000, 1000000)
    os.chown(root / "etc" / "hosts", 1000000, 1000005)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "bin").mkdir()
    su = root / "bin" / "su"
    su.write_bytes(b"\x7fELF" + os.urandom(5000))
    os.chmod(su, 0o4755)
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "bin" / "busybox").write_bytes(os.urandom(70000))
    os.chmod(root / "bin" / "busybox", 0o755)
    os.link(root / "bin" / "busybox", root / "bin" / "hardlinked")
    os.symlink("/nonexistent/target", root / "dangling")
    os.lchown(root / "dangling", 1000001, 1000002)
    os.setxattr(root / "etc" / "hosts", "user.comment", b"hello")
    os.setxattr(root / "bin" / "busybox", "trusted.overlay.origin", b"\x00\x01binary")
    (root / "dev").mkdir()
    os.mknod(root / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev" / "loop9", 0o660 | stat.S_IFBLK, os.makedev(7, 9))
    os.mkfifo(root / "dev" / "fifo", 0o600)
    with open(root / "sparse.img", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"data in the middle" * 100)
    (root / "empty").mkdir()
    os.utime(root / "etc" / "hosts", (1_600_000_000, 1_600_000_000))


def describe(root: Path) -> dict[str, tuple]:
    """Everything rsync -a --devices --numeric-ids --sparse --xattrs carries, per path."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""] if dirpath == str(root) else [*dirnames, *filenames]:
            p = Path(dirpath) / name if name else Path(dirpath)
            st = p.lstat()
            rel = str(p.relative_to(root))
            extra: object = None
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = st.st_rdev
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {k: os.getxattr(p, k) for k in os.listxattr(p)}
            mtime = None if stat.S_ISLNK(st.st_mode) else st.st_mtime_ns
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, mtime, extra, xattrs)
    return out


async def transfer(src: Path, dst: Path, features: rsync.Features, streams: int = 1) -> tuple[list, int]:
    """Run `streams` rsync sessions of src into dst over one websocket; returns the progress
    reports of the sender and the bytes the receiver got."""
    reports: list = []
    async with ws_server() as server:
        dialed, acc = await pair(server)
        for _ in range(streams):
            await asyncio.wait_for(asyncio.gather(
                rsync.send(src, dialed, features, progress=lambda done, speed: reports.append((done, speed))),
                rsync.receive(dst, acc, features)), 120)
        await dialed.close()
        await acc.close()
    return reports, acc.bytes_received


def test_tree_arrives_identical_then_delete_removes_extras(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    want = describe(src)
    _, first_bytes = asyncio.run(transfer(src, dst, rsync.Features()))
    got = describe(dst)
    assert got == want
    # hard links arrive as separate copies with the same content (no -H, as LXD)
    assert (dst / "bin" / "hardlinked").read_bytes() == (dst / "bin" / "busybox").read_bytes()
    # the sparse file stays sparse
    assert (dst / "sparse.img").stat().st_blocks * 512 < (1 << 20)

    # a second run (a refresh): changes arrive, what the source lost goes, unchanged data is not resent
    (src / "etc" / "hosts").write_text("127.0.0.1 localhost changed\n")
    (src / "tmp" / "new").write_text("new file")
    os.unlink(src / "dangling")
    (dst / "extra-on-target").write_text("should go")
    (dst / "empty" / "extra-dir").mkdir()
    _, second_bytes = asyncio.run(transfer(src, dst, rsync.Features()))
    assert describe(dst) == describe(src)
    assert not (dst / "extra-on-target").exists()
    assert second_bytes < first_bytes / 4, (second_bytes, first_bytes)

    # without `delete` an extra file stays; without `xattrs` none are carried
    (dst / "kept").write_text("stays")
    dst2 = tmp_path / "dst2"
    asyncio.run(transfer(src, dst, rsync.Features(delete=False, xattrs=False)))
    asyncio.run(transfer(src, dst2, rsync.Features(delete=False, xattrs=False, compress=False)))
    assert (dst / "kept").read_text() == "stays"
    assert os.listxattr(dst2 / "etc" / "hosts") == []
    assert (dst2 / "bin" / "su").stat().st_mode == (src / "bin" / "su").stat().st_mode


def test_several_streams_share_one_websocket_with_progress(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(6 << 20))
    reports, received = asyncio.run(transfer(src, dst, rsync.Features(compress=False), streams=3))
    assert (dst / "big").read_bytes() == (src / "big").read_bytes()
    assert received > 6 << 20
    assert len(reports) >= 3 and all(done > 0 and speed > 0 for done, speed in reports)
    # the first stream carried the file (and reported it at its end); the others found it up to date
    assert max(done for done, _ in reports) > 6 << 20 > reports[-1][0]


def test_failures_are_migration_errors(tmp_path):
    async def main():
        async with ws_server() as server:
            dialed, acc = await pair(server)
            with pytest.raises(MigrationError, match="absolute"):
                await rsync.send(Path("relative"), dialed, rsync.Features())
            with pytest.raises(MigrationError, match="no such directory"):
                await rsync.send(tmp_path / "missing", dialed, rsync.Features())
            # the receiver can't write its target: both ends fail, the websocket stays usable
            blocker = tmp_path / "file"
            blocker.write_text("not a dir")
            src = tmp_path / "src"
            src.mkdir()
            (src / "f").write_text("x")
            results = await asyncio.wait_for(asyncio.gather(
                rsync.send(src, dialed, rsync.Features()),
                rsync.receive(blocker / "sub", acc, rsync.Features()), return_exceptions=True), 60)
            assert all(isinstance(r, MigrationError) for r in results), results
            assert "Rsync receive failed" in results[1].message
            await asyncio.wait_for(asyncio.gather(rsync.send(src, dialed, rsync.Features()),
                                                  rsync.receive(tmp_path / "ok", acc, rsync.Features())), 60)
            assert (tmp_path / "ok" / "f").read_text() == "x"
            await dialed.close()
            await acc.close()

    asyncio.run(main())


PEER = """
import asyncio, sys
from pathlib import Path
from lxd_daemon.migration import rsync, wire

async def main(url, secret, role, path):
    ch = await wire.dial(url, secret, None)
    print("connected", flush=True)
    if role == "send":
        await rsync.send(Path(path), ch, rsync.Features(compress=False), bwlimit="1000")
    else:
        await rsync.receive(Path(path), ch, rsync.Features(compress=False))

asyncio.run(main(*sys.argv[1:]))
"""


def leftovers(marker: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found.append(f"{pid}: {cmd}")
    return found


@pytest.mark.parametrize("killed", ["sender", "receiver"])
def test_killed_peer_fails_the_other_end(tmp_path, killed):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(20 << 20))  # ~20 s at the peer's bwlimit

    async def main():
        async with ws_server() as server:
            role, path = ("send", src) if killed == "sender" else ("receive", dst)
            peer = await asyncio.create_subprocess_exec(
                sys.executable, "-c", PEER, server.url, server.secret, role, str(path), cwd=str(REPO),
                stdout=asyncio.subprocess.PIPE)
            try:
                assert await asyncio.wait_for(peer.stdout.readline(), 20) == b"connected\n"
                ch = await asyncio.wait_for(server.accepted.get(), 10)
                if killed == "sender":
                    mine = asyncio.ensure_future(rsync.receive(dst, ch, rsync.Features(compress=False)))
                else:
                    mine = asyncio.ensure_future(rsync.send(src, ch, rsync.Features(compress=False),
                                                            bwlimit="1000"))
                # data flows, then the peer dies
                for _ in range(100):
                    if ch.bytes_received + ch.bytes_sent > 256 << 10:
                        break
                    await asyncio.sleep(0.1)
                assert ch.bytes_received + ch.bytes_sent > 256 << 10
                assert not mine.done()
                running = "\n".join(leftovers(str(tmp_path)))
                assert "migration/netcat.py" in running and "rsync --server" in running  # both ends' processes
                peer.send_signal(signal.SIGKILL)
                t0 = time.monotonic()
                with pytest.raises(MigrationError, match="closed the connection|rsync exited"):
                    await asyncio.wait_for(mine, 15)
                assert time.monotonic() - t0 < 10
            finally:
                if peer.returncode is None:
                    peer.kill()
                await peer.wait()

    asyncio.run(main())
    # nothing left running: neither our rsync/netcat nor the killed peer's (they end on EOF)
    deadline = time.monotonic() + 10
    while leftovers(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(str(tmp_path)) == []
    assert subprocess.run(["true"]).returncode == 0


def test_storage_conformance_tree_arrives_identical(tmp_path):
    """The tree the storage drivers' copies must keep (ACLs and file capabilities included)."""
    from tests.storage.conformance import populate, tree

    src = tmp_path / "src"
    src.mkdir()
    populate(src)
    asyncio.run(transfer(src, tmp_path / "dst", rsync.Features()))
    assert tree(tmp_path / "dst") == tree(src)


def test_cancelled_transfer_leaves_no_process(tmp_path):
    """An operation cancelled mid-transfer cancels its rsync.send: rsync and netcat are killed at
    once; the migration then closes its websocket and the receiving end fails."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(8 << 20))

    async def main():
        async with ws_server() as server:
            dialed, acc = await pair(server)
            sender = asyncio.ensure_future(rsync.send(src, dialed, rsync.Features(compress=False), bwlimit="1000"))
            receiver = asyncio.ensure_future(rsync.receive(dst, acc, rsync.Features(compress=False)))
            for _ in range(100):
                if acc.bytes_received > 256 << 10:
                    break
                await asyncio.sleep(0.1)
            assert "migration/netcat.py" in "\n".join(leftovers(str(src)))
            sender.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sender
            assert leftovers(str(src)) == []  # reaped before the cancellation completed
            await dialed.close()
            with pytest.raises(MigrationError, match="closed the connection"):
                await asyncio.wait_for(receiver, 10)
            await acc.close()

    asyncio.run(main())
    assert leftovers(str(tmp_path)) == []
