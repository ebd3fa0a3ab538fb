"""Backups between LXD 5.0.2 (Debian's `lxd`, started in a network namespace of its own through
scripts/bench/daemons.py, on a dir pool) and our daemon, both ways, with the stock client:
a container with a snapshot exported by one is imported by the other, has the same files and
snapshot, and boots (busybox answers through exec)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lxd_daemon.backups.config import parse_index_yaml
from tests.helpers import busybox_tarball, lxd502_setup, run_prefix

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def lxd502(tmp_path_factory):
    daemons, wd = lxd502_setup(tmp_path_factory, "interop")
    d = daemons.Daemon("lxd", "LXD 5.0.2", daemons.DEBIAN_LXD, wd, run_prefix())
    try:
        d.start()
        d.preseed("default")
        d.lxc("image", "import", str(busybox_tarball()), "--alias", "busybox")
        yield d
    finally:
        try:
            d.stop()
        finally:
            daemons.cleanup(wd, log=lambda *_: None)


def _tar_index(path: Path):
    import tarfile

    with tarfile.open(path) as tf:
        return tf.getnames(), parse_index_yaml(tf.extractfile("backup/index.yaml").read())


def test_lxd_backup_imports_into_ours_and_boots(lxd502, ready, names, tmp_path):
    lxd, ours = lxd502, ready
    src = f"{run_prefix()}-l"
    lxd.lxc("init", "busybox", src)
    vol = lxd.lxd_dir / "storage-pools" / "default" / "containers" / src / "rootfs"
    (vol / "marker").write_text("from-lxd-snap")
    lxd.lxc("snapshot", src, "snap0")
    (vol / "marker").write_text("from-lxd")
    lxd.lxc("config", "set", src, "user.origin", "lxd502")
    out = tmp_path / "lxd.tar.gz"
    lxd.lxc("export", src, str(out))
    members, idx = _tar_index(out)
    assert idx.name == src and idx.snapshots == ["snap0"] and "backup/snapshots/snap0/rootfs/marker" in members
    dst = names("froml")
    ours.lxc("import", str(out), dst)
    info = ours.api("GET", f"/1.0/instances/{dst}").json()["metadata"]
    assert info["config"]["user.origin"] == "lxd502"
    assert ours.api("GET", f"/1.0/instances/{dst}/snapshots").json()["metadata"] == [
        f"/1.0/instances/{dst}/snapshots/snap0"]
    snap_marker = ours.lxd_dir / "storage-pools" / "default" / "containers-snapshots" / dst / "snap0" / "rootfs" / "marker"
    assert snap_marker.read_text() == "from-lxd-snap"
    ours.lxc("start", dst)
    r = ours.lxc("exec", dst, "--", "cat", "/marker")
    assert r.stdout == "from-lxd"
    ours.lxc("stop", "-f", dst)
    lxd.lxc("delete", "-f", src)


def test_our_backup_imports_into_lxd_and_boots(lxd502, ready, names, tmp_path):
    lxd, ours = lxd502, ready
    src = names("tol")
    ours.lxc("init", "busybox", src, "-c", "user.origin=ours")
    vol = ours.lxd_dir / "storage-pools" / "default" / "containers" / src / "rootfs"
    (vol / "marker").write_text("from-ours-snap")
    ours.lxc("snapshot", src, "snap0")
    (vol / "marker").write_text("from-ours")
    out = tmp_path / "ours.tar.gz"
    ours.lxc("export", src, str(out))
    dst = f"{run_prefix()}-o"
    r = lxd.lxc("import", str(out), dst, check=False)
    assert r.returncode == 0, r.stderr + r.stdout
    try:
        cfg = lxd.lxc("config", "get", dst, "user.origin").stdout.strip()
        assert cfg == "ours"
        assert "snap0" in lxd.lxc("info", dst).stdout
        r = lxd.lxc("start", dst, check=False)
        assert r.returncode == 0, r.stderr + r.stdout + lxd.lxc("info", "--show-log", dst, check=False).stdout
        assert lxd.lxc("exec", dst, "--", "cat", "/marker").stdout == "from-ours"
        snap = lxd.lxd_dir / "storage-pools" / "default" / "containers-snapshots" / dst / "snap0" / "rootfs" / "marker"
        assert snap.read_text() == "from-ours-snap"
    finally:
        lxd.lxc("delete", "-f", dst, check=False)


@pytest.fixture(scope="module")
def btrfs_pools(lxd502, ready):
    """A btrfs pool on a loop file on each side."""
    name = run_prefix() + "ib"
    lxd502.lxc("storage", "create", name, "btrfs", "size=1GiB")
    ready.lxc("storage", "create", name, "btrfs", "size=1GiB")
    yield name
    for inst in ready.api("GET", "/1.0/instances?recursion=1").json()["metadata"]:
        if inst["expanded_devices"].get("root", {}).get("pool") == name:
            ready.lxc("delete", "-f", inst["name"], check=False)
    ready.lxc("storage", "delete", name, check=False)
    lxd502.lxc("storage", "delete", name, check=False)


# Opt-in (`-m slow`): LXD 5.0.2 itself now and then hangs in a btrfs import on a loop-file pool
# (seen with its own exports too, under load), which would make the default suite flaky.
@pytest.mark.slow
def test_optimized_btrfs_backups_both_ways(lxd502, ready, names, btrfs_pools, tmp_path):
    lxd, ours, pool = lxd502, ready, btrfs_pools
    # LXD 5.0.2 -> ours (the optimised layout LXD writes: index.yaml, optimized_header.yaml,
    # snapshots/<snap>.bin, container.bin)
    src = f"{run_prefix()}-lb"
    lxd.lxc("init", "busybox", src, "-s", pool)
    root = lxd.lxd_dir / "storage-pools" / pool / "containers" / src / "rootfs"
    (root / "marker").write_text("lxd-snap")
    lxd.lxc("snapshot", src, "snap0")
    (root / "marker").write_text("lxd-live")
    out = tmp_path / "lxd-opt.tar.gz"
    lxd.lxc("export", src, str(out), "--optimized-storage")
    members, idx = _tar_index(out)
    assert idx.optimized and "backup/container.bin" in members and "backup/snapshots/snap0.bin" in members
    dst = names("fromlb")
    ours.lxc("import", str(out), dst, "--storage", pool)
    ours.lxc("start", dst)
    assert ours.lxc("exec", dst, "--", "cat", "/marker").stdout == "lxd-live"
    snap = ours.lxd_dir / "storage-pools" / pool / "containers-snapshots" / dst / "snap0" / "rootfs" / "marker"
    assert snap.read_text() == "lxd-snap"
    ours.lxc("stop", "-f", dst)
    lxd.lxc("delete", "-f", src)
    # ours -> LXD 5.0.2
    src2 = names("tolb")
    ours.lxc("init", "busybox", src2, "-s", pool)
    root2 = ours.lxd_dir / "storage-pools" / pool / "containers" / src2 / "rootfs"
    (root2 / "marker").write_text("ours-snap")
    ours.lxc("snapshot", src2, "snap0")
    (root2 / "marker").write_text("ours-live")
    out2 = tmp_path / "ours-opt.tar.gz"
    ours.lxc("export", src2, str(out2), "--optimized-storage")
    dst2 = f"{run_prefix()}-ob"
    try:
        r = lxd.lxc("import", str(out2), dst2, "--storage", pool, check=False, timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError("LXD 5.0.2's import hung:\n" + lxd.tail_log(60)) from None
    assert r.returncode == 0, r.stderr + r.stdout
    try:
        r = lxd.lxc("start", dst2, check=False)
        assert r.returncode == 0, r.stderr + r.stdout
        assert lxd.lxc("exec", dst2, "--", "cat", "/marker").stdout == "ours-live"
        snap2 = lxd.lxd_dir / "storage-pools" / pool / "containers-snapshots" / dst2 / "snap0" / "rootfs" / "marker"
        assert snap2.read_text() == "ours-snap"
    finally:
        lxd.lxc("delete", "-f", dst2, check=False)
