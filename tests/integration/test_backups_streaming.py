"""Uncompressed optimised (btrfs) backups: `btrfs send` written straight into the tarball at
export (no spool), and `lxc import` checked and received while the upload still arrives (the
scan follows the upload's file, the streams go from it into `btrfs receive` by sendfile).
Also the two building blocks without a daemon: TarMembers' in-place member and GrowingFile."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import tarfile
import threading
import time

import pytest

from lxd_daemon.backups.create import _Counting
from lxd_daemon.backups.restore import GrowingFile
from lxd_daemon.errors import BadRequest
from lxd_daemon.storage.drivers.blockutil import TarMembers
from tests.helpers import wait_op

pytestmark = pytest.mark.integration


# -- building blocks (no daemon) ------------------------------------------------------------------
def test_tool_output_written_in_place_makes_a_valid_tarball(tmp_path):
    out = tmp_path / "b.tar"
    names = ["backup/container.bin", "backup/snapshots/" + "s" * 120 + ".bin", "backup/empty.bin"]
    srcs = []
    for i, size in enumerate((70001, 512 * 3, 0)):
        p = tmp_path / f"src{i}"
        p.write_bytes(os.urandom(size))
        srcs.append(p)

    async def write() -> None:
        with open(out, "wb") as f:
            sink = _Counting(f, plain=True)
            tar = tarfile.TarFile(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT)
            members = TarMembers(tar, tmp_path / "spool")
            for name, src in zip(names, srcs, strict=True):
                await members.add_from_tool(name, "cat", str(src))
            tar.close()
            assert sink.pos == f.tell()

    asyncio.run(write())
    assert not (tmp_path / "spool").exists()  # nothing spooled
    with tarfile.open(out) as tf:
        assert tf.getnames() == names
        for name, src in zip(names, srcs, strict=True):
            assert tf.extractfile(name).read() == src.read_bytes()
    listing = subprocess.run(["tar", "-tvf", str(out)], capture_output=True, text=True, check=True).stdout
    assert [line.split()[-1] for line in listing.splitlines()] == names


def test_growing_file_follows_the_writer(tmp_path):
    path = tmp_path / "upload"
    data = os.urandom(3 << 20)
    g = GrowingFile(path)

    def writer(stop_at: int, fail: bool) -> None:
        with open(path, "wb") as f:
            for i in range(0, stop_at, 1 << 18):
                f.write(data[i:min(i + (1 << 18), stop_at)])
                f.flush()
                time.sleep(0.005)
        g.fail(BadRequest("The upload was interrupted")) if fail else g.finish()

    t = threading.Thread(target=writer, args=(len(data), False))
    t.start()
    r, w = os.pipe()
    got = bytearray()

    def read_all() -> None:
        while chunk := os.read(r, 1 << 16):
            got.extend(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    g.copy_region(1000, len(data) - 2000, w)  # waits for bytes not yet written
    os.close(w)
    reader.join()
    os.close(r)
    assert bytes(got) == data[1000:-1000]
    g.seek(5)
    assert g.read(10) == data[5:15] and g.tell() == 15
    t.join()
    g.dispose()

    # a short upload: a region past its end is refused as truncated; a failed one says why
    os.unlink(path)
    g = GrowingFile(path)
    t = threading.Thread(target=writer, args=(1 << 20, False))
    t.start()
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        with pytest.raises(BadRequest, match="truncated"):
            g.copy_region(0, 2 << 20, null)
    finally:
        os.close(null)
    t.join()
    g.dispose()
    os.unlink(path)
    g = GrowingFile(path)
    t = threading.Thread(target=writer, args=(1 << 20, True))
    t.start()
    with pytest.raises(BadRequest, match="interrupted"):
        g.wait_for(2 << 20)
    t.join()
    g.dispose()


def test_streamed_backup_is_readable_before_it_is_written(tmp_path):
    """StreamedBackup with `cat` for a stream: committed (sizes known) before the writer is done,
    read through FollowedFile's plain ASGI path (no socket takeover outside uvicorn) while it is
    written, and the result is the tarball TarFile would write."""
    from lxd_daemon.api.instance_backups import FollowedFile
    from lxd_daemon.backups.create import StreamedBackup

    srcs = []
    for i, size in enumerate((3 << 20, 1000)):
        p = tmp_path / f"s{i}"
        p.write_bytes(os.urandom(size))
        srcs.append(p)
    names = ["backup/snapshots/s0.bin", "backup/container.bin"]
    out = tmp_path / "b.tar"

    async def run() -> bytes:
        sb = StreamedBackup(out, b"index: 1\n", b"subvolumes: []\n",
                            [(n, ["cat", str(p)]) for n, p in zip(names, srcs, strict=True)])
        await sb.start()
        assert sb.total > 0
        f = sb.reopen()
        got = bytearray()

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            got.extend(message.get("body", b""))

        reading = asyncio.ensure_future(FollowedFile(f, sb.total, sb, {})({"type": "http", "method": "GET"},
                                                                           receive, send))
        await sb.finish()
        sb.close()
        await reading
        assert len(got) == sb.total == out.stat().st_size
        return bytes(got)

    data = asyncio.run(run())
    assert data == out.read_bytes()
    with tarfile.open(out) as tf:
        assert tf.getnames() == ["backup/index.yaml", "backup/optimized_header.yaml", *names]
        for n, p in zip(names, srcs, strict=True):
            assert tf.extractfile(n).read() == p.read_bytes()


# -- through the daemon -----------------------------------------------------------------------------
def _leftovers(d, pool: str) -> list[str]:
    out = []
    root = d.lxd_dir / "backups"
    if root.is_dir():
        out += [e for e in os.listdir(root) if e.startswith(".")]
    pdir = d.lxd_dir / "storage-pools" / pool / "containers"
    out += [e for e in os.listdir(pdir) if e.startswith(".")]
    return out


def _import_raw(d, data: bytes, name: str, pool: str):
    with d.http(timeout=120) as c:
        return c.post("/1.0/instances", content=data,
                      headers={"Content-Type": "application/octet-stream", "X-LXD-name": name, "X-LXD-pool": pool})


def test_uncompressed_optimized_export_and_pipelined_import(ready, names, btrfs_pool, tmp_path):
    d = ready
    c1, c2, c3 = names("so"), names("so2"), names("so3")
    d.lxc("init", "busybox", c1, "-s", btrfs_pool)
    vol = d.lxd_dir / "storage-pools" / btrfs_pool / "containers" / c1
    (vol / "rootfs" / "marker").write_text("snap")
    d.lxc("snapshot", c1, "s0")
    (vol / "rootfs" / "marker").write_text("live")
    big = os.urandom(3 << 20)
    (vol / "rootfs" / "big").write_bytes(big)
    opt = tmp_path / "opt.tar"
    d.lxc("export", c1, str(opt), "--optimized-storage", "--compression", "none")
    with tarfile.open(opt, "r:") as tf:  # uncompressed, a valid tarball
        members = {m.name: m.size for m in tf.getmembers()}
    assert {"backup/index.yaml", "backup/optimized_header.yaml", "backup/snapshots/s0.bin",
            "backup/container.bin"} == set(members)
    assert members["backup/container.bin"] > len(big)
    subprocess.run(["tar", "-tf", str(opt)], check=True, capture_output=True)
    assert not _leftovers(d, btrfs_pool)

    # `lxc import` (a chunked upload) received while it arrives
    d.lxc("import", str(opt), c2, "--storage", btrfs_pool)
    v2 = d.lxd_dir / "storage-pools" / btrfs_pool / "containers" / c2
    assert (v2 / "rootfs" / "marker").read_text() == "live"
    assert (v2 / "rootfs" / "big").read_bytes() == big
    s2 = d.lxd_dir / "storage-pools" / btrfs_pool / "containers-snapshots" / c2 / "s0" / "rootfs" / "marker"
    assert s2.read_text() == "snap"
    assert d.api("GET", f"/1.0/instances/{c2}/snapshots").json()["metadata"] == [f"/1.0/instances/{c2}/snapshots/s0"]

    data = opt.read_bytes()
    # truncated in the middle of the volume's stream: refused, through either upload path, nothing left
    cut = data[: len(data) - len(big) // 2]
    r = _import_raw(d, cut, c3, btrfs_pool)
    assert r.status_code == 400 and "truncated" in r.json()["error"], r.text
    bad = tmp_path / "cut.tar"
    bad.write_bytes(cut)
    r = d.lxc("import", str(bad), c3, "--storage", btrfs_pool, check=False)
    assert r.returncode != 0 and "truncated" in (r.stderr + r.stdout), r.stderr
    # a corrupt stream (btrfs receive refuses it): refused, nothing left
    start = data.index(b"btrfs-stream\x00", data.index(b"btrfs-stream\x00") + 1)  # the volume's stream
    corrupt = data[:start + 40] + bytes(4096) + data[start + 40 + 4096:]
    r = _import_raw(d, corrupt, c3, btrfs_pool)
    if r.status_code == 202:
        assert wait_op(d, r)["status"] != "Success"
    else:
        assert r.status_code in (400, 500), r.text
    assert d.api("GET", f"/1.0/instances/{c3}").status_code == 404
    assert not (d.lxd_dir / "storage-pools" / btrfs_pool / "containers" / c3).exists()
    for _ in range(50):
        if not _leftovers(d, btrfs_pool):
            break
        time.sleep(0.1)
    assert not _leftovers(d, btrfs_pool)

    # the same bytes sent with a Content-Length (spliced upload) import too
    r = _import_raw(d, data, c3, btrfs_pool)
    assert r.status_code == 202, r.text
    assert wait_op(d, r)["status"] == "Success"
    v3 = d.lxd_dir / "storage-pools" / btrfs_pool / "containers" / c3
    assert (v3 / "rootfs" / "big").read_bytes() == big
    assert not _leftovers(d, btrfs_pool)


# -- an uncompressed optimised export read while it is written ----------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _writing_send(d) -> int | None:
    """The daemon's `btrfs send` writing into a backup file (not the one only counting bytes)."""
    backups = str(d.lxd_dir / "backups")
    for pid in _children(d.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if argv[:2] == [b"btrfs", b"send"] and os.readlink(f"/proc/{pid}/fd/1").startswith(backups):
                return pid
        except OSError:
            continue
    return None


def _big_stopped_container(d, names, pool: str, mb: int):
    name = names("sw")
    d.lxc("init", "busybox", name, "-s", pool)
    vol = d.lxd_dir / "storage-pools" / pool / "containers" / name
    with open(vol / "rootfs" / "big", "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    return name, vol


def _is_ro(path) -> bool:
    r = subprocess.run(["btrfs", "property", "get", "-ts", str(path), "ro"], capture_output=True, text=True)
    return r.stdout.strip() == "ro=true"


def test_export_committed_before_written_is_complete_and_valid(ready, names, btrfs_pool, tmp_path):
    """The stock client's export of a stopped container: the volume itself is sent (read-only
    meanwhile, writable again after), the download follows the file being written, and the
    tarball is whole: the same members and bytes as the volume's stream."""
    d = ready
    name, vol = _big_stopped_container(d, names, btrfs_pool, 64)
    out = tmp_path / "e.tar"
    d.lxc("export", name, str(out), "--optimized-storage", "--compression", "none")
    with tarfile.open(out, "r:") as tf:
        sizes = {m.name: m.size for m in tf.getmembers()}
    assert set(sizes) == {"backup/index.yaml", "backup/optimized_header.yaml", "backup/container.bin"}
    assert sizes["backup/container.bin"] > 64 << 20
    assert not _is_ro(vol) and not [e for e in os.listdir(vol.parent) if e.startswith(".")]
    (vol / "rootfs" / "after").write_text("writable")  # the volume is writable again
    assert d.api("GET", f"/1.0/instances/{name}/backups").json()["metadata"] == []  # lxc deleted it
    new = names("sw2")
    d.lxc("import", str(out), new, "--storage", btrfs_pool)
    got = d.lxd_dir / "storage-pools" / btrfs_pool / "containers" / new / "rootfs" / "big"
    assert got.stat().st_size == 64 << 20
    assert _sha(got) == _sha(vol / "rootfs" / "big")
    assert not _is_ro(got.parent.parent)


def _sha(p) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_export_whose_send_dies_midway_fails_for_the_client(ready, names, btrfs_pool, tmp_path):
    """The backup is committed once every stream's size is known, while the file is still
    being written; when the writing `btrfs send` dies after that, the download ends short of its
    Content-Length and `lxc export` fails (no file that looks complete), the backup is gone and
    the volume is writable again."""
    d = ready
    name, vol = _big_stopped_container(d, names, btrfs_pool, 160)
    out = tmp_path / "cut.tar"
    proc = subprocess.Popen(["lxc", "export", name, str(out), "--optimized-storage", "--compression", "none"],
                            env=d.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer = None
    try:
        deadline = time.monotonic() + 30
        while writer is None and time.monotonic() < deadline and proc.poll() is None:
            writer = _writing_send(d)
        assert writer is not None, "the writing btrfs send was not seen"
        os.kill(writer, signal.SIGSTOP)  # (a child of the daemon this test suite started)
        # the backup is committed (sizes counted) and the download starts, then waits for bytes
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (out.exists() and out.stat().st_size > 0):
            time.sleep(0.01)
        assert out.exists() and out.stat().st_size > 0, "the download did not start"
        assert d.api("GET", f"/1.0/instances/{name}/backups").json()["metadata"] != []
        os.kill(writer, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if writer is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(writer, signal.SIGKILL)
    assert proc.returncode != 0, err
    assert "EOF" in err or "unexpected" in err.lower(), err
    size = out.stat().st_size if out.exists() else 0
    assert size < 160 << 20  # never the whole thing
    for _ in range(100):
        if d.api("GET", f"/1.0/instances/{name}/backups").json()["metadata"] == [] and not _is_ro(vol):
            break
        time.sleep(0.05)
    assert d.api("GET", f"/1.0/instances/{name}/backups").json()["metadata"] == []
    assert not _is_ro(vol)
    assert not [e for e in os.listdir(d.lxd_dir / "backups") if e.startswith(".")]
    for iid in os.listdir(d.lxd_dir / "backups" / "instances"):
        assert not [e for e in os.listdir(d.lxd_dir / "backups" / "instances" / iid) if e.startswith(".tmp")]
    assert not [e for e in os.listdir(vol.parent) if e.startswith(".")]
    # and the next export works
    d.lxc("export", name, str(out), "--optimized-storage", "--compression", "none")
    with tarfile.open(out, "r:") as tf:
        assert tf.getmember("backup/container.bin").size > 160 << 20


def test_kill_while_a_committed_backup_is_written(fresh_daemon):
    """SIGKILL after the backup was committed (its row inserted, the operation done) while its
    file is still being written, the volume read-only for the send: after the restart there is
    no backup (no row, no file), the volume is writable again and exports anew."""
    from tests.integration import test_storage_crash as crash

    d = fresh_daemon
    crash.start_ready(d)
    r = d.api("POST", "/1.0/storage-pools", json={"name": "bt", "driver": "btrfs", "config": {"size": "1GiB"}})
    if r.status_code != 201 and "btrfs" in r.text:
        d.stop()
        pytest.skip("btrfs can't run on this host")
    assert r.status_code == 201, r.text
    pool = d.lxd_dir / "storage-pools" / "bt"
    try:
        d.lxc("init", "busybox", "c1", "-s", "bt")
        vol = pool / "containers" / "c1"
        with open(vol / "rootfs" / "big", "wb") as f:
            for _ in range(160):
                f.write(os.urandom(1 << 20))
        before = crash.host_state(d)
        stopped: list[int] = []

        def cond() -> bool:
            if not stopped:
                pid = _writing_send(d)
                if pid is None:
                    return False
                os.kill(pid, signal.SIGSTOP)  # held mid-file (a child of this test's daemon)
                stopped.append(pid)
            return bool(crash.db_rows(d, "SELECT name FROM instances_backups"))

        crash.kill_when(d, lambda: crash.post_async(d, "/1.0/instances/c1/backups", {
            "name": "b1", "compression_algorithm": "none", "optimized_storage": True}), cond)
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert _is_ro(vol) and [e for e in os.listdir(pool / "containers") if e.startswith(".sendro-")]
        crash.restart_after_kill(d)
        crash.assert_consistent(d, pool, before, btrfs=True)
        assert d.api("GET", "/1.0/instances/c1/backups").json()["metadata"] == []
        assert not _is_ro(vol)
        (vol / "rootfs" / "after").write_text("writable")
        out = d.lxd_dir.parent / "again.tar"
        d.lxc("export", "c1", str(out), "--optimized-storage", "--compression", "none")
        with tarfile.open(out, "r:") as tf:
            assert tf.getmember("backup/container.bin").size > 160 << 20
        out.unlink()
    finally:
        if d.proc is not None:
            d.lxc("delete", "-f", "c1", check=False)
            d.api("DELETE", "/1.0/storage-pools/bt")


def test_file_writes_wait_for_a_live_send_of_a_stopped_instance(ready, names, btrfs_pool, tmp_path):
    """An optimised backup sends a stopped instance's btrfs volume as it is, read-only meanwhile:
    file pushes and deletes into that instance wait for it instead of failing."""
    d = ready
    c1 = names("lw")
    d.lxc("init", "busybox", c1, "-s", btrfs_pool)
    big = tmp_path / "big"
    with open(big, "wb") as f:
        for _ in range(20):
            f.write(os.urandom(10 << 20))
    d.lxc("file", "push", str(big), f"{c1}/root/big")
    small = tmp_path / "small"
    small.write_text("pushed during the backup")
    for i in range(3):
        r = d.api("POST", f"/1.0/instances/{c1}/backups",
                  json={"name": f"b{i}", "optimized_storage": True, "compression_algorithm": "none"})
        assert r.status_code == 202, r.text
        time.sleep(0.05 * i)
        d.lxc("file", "push", str(small), f"{c1}/root/small{i}")
        d.lxc("file", "delete", f"{c1}/root/small{i}")
        assert wait_op(d, r)["status"] == "Success"
    vol = d.lxd_dir / "storage-pools" / btrfs_pool / "containers" / c1 / "rootfs" / "root"
    (vol / "writable").write_text("x")  # the volume is writable again
    d.lxc("file", "push", str(small), f"{c1}/root/small")
    assert (vol / "small").read_text() == "pushed during the backup"
