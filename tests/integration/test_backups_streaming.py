"""Uncompressed optimised (btrfs) backups: `btrfs send` written straight into the tarball at
export (no spool), and `lxc import` checked and received while the upload still arrives (the
scan follows the upload's file, the streams go from it into `btrfs receive` by sendfile).
Also the two building blocks without a daemon: TarMembers' in-place member and GrowingFile."""

from __future__ import annotations

import asyncio
import os
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
