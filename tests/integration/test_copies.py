"""`lxc copy`: with snapshots, `--instance-only`, from a snapshot, `--refresh`, and to another pool
(dir <-> btrfs, with snapshots), through the stock client on the shared daemon."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration



def push(d, inst, text, tmp_path):
    f = tmp_path / "f"
    f.write_text(text + "\n")
    d.lxc("file", "push", str(f), f"{inst}/root/f")


def pull(d, inst):
    return d.lxc("file", "pull", f"{inst}/root/f", "-").stdout.strip()


def on_disk(d, pool, inst, snap=None):
    base = d.lxd_dir / "storage-pools" / pool
    p = base / "containers-snapshots" / inst / snap if snap else base / "containers" / inst
    return p / "rootfs" / "root" / "f"


def snaps(d, inst):
    return [s["name"] for s in d.api("GET", f"/1.0/instances/{inst}/snapshots?recursion=1").json()["metadata"]]


def config(d, inst):
    return d.api("GET", f"/1.0/instances/{inst}").json()["metadata"]["config"]


def source_with_snapshots(d, names, tmp_path, pool="default"):
    c = names("src")
    d.lxc("init", "busybox", c, "-s", pool, "-c", "user.x=1")
    push(d, c, "one", tmp_path)
    d.lxc("snapshot", c, "s1")
    push(d, c, "two", tmp_path)
    d.lxc("snapshot", c, "s2")
    push(d, c, "three", tmp_path)
    return c


def test_copy_snapshots_instance_only_from_snapshot_refresh(ready, names, tmp_path):
    d = ready
    c = source_with_snapshots(d, names, tmp_path)
    c2, c3, c4 = names("full"), names("only"), names("fromsnap")

    d.lxc("copy", c, c2)
    assert snaps(d, c2) == ["s1", "s2"]
    assert on_disk(d, "default", c2, "s1").read_text() == "one\n"
    assert on_disk(d, "default", c2, "s2").read_text() == "two\n"
    assert pull(d, c2) == "three"
    st_src, st_dst = os.stat(on_disk(d, "default", c)), os.stat(on_disk(d, "default", c2))
    assert (st_src.st_uid, st_src.st_gid) == (st_dst.st_uid, st_dst.st_gid) != (0, 0)
    # fresh identity, same base image and user config
    src_cfg, dst_cfg = config(d, c), config(d, c2)
    assert dst_cfg["volatile.uuid"] != src_cfg["volatile.uuid"]
    assert dst_cfg["volatile.base_image"] == src_cfg["volatile.base_image"]
    assert dst_cfg["user.x"] == "1"
    s1_src = d.api("GET", f"/1.0/instances/{c}/snapshots/s1").json()["metadata"]
    s1_dst = d.api("GET", f"/1.0/instances/{c2}/snapshots/s1").json()["metadata"]
    assert s1_dst["created_at"] == s1_src["created_at"]
    assert s1_dst["config"].get("volatile.uuid") != s1_src["config"].get("volatile.uuid")

    d.lxc("copy", c, c3, "--instance-only")
    assert snaps(d, c3) == []
    assert pull(d, c3) == "three"

    d.lxc("copy", f"{c}/s1", c4)
    assert snaps(d, c4) == []
    assert pull(d, c4) == "one"
    r = d.lxc("copy", f"{c}/nope", names("x"), check=False)
    assert r.returncode != 0 and "not found" in r.stderr.lower()

    # --refresh: only what changed (new snapshot s3, s1 gone from the source, new content)
    d.lxc("snapshot", c, "s3")
    push(d, c, "four", tmp_path)
    d.lxc("delete", f"{c}/s1")
    d.lxc("copy", c, c2, "--refresh")
    assert snaps(d, c2) == ["s2", "s3"]
    assert on_disk(d, "default", c2, "s3").read_text() == "three\n"
    assert pull(d, c2) == "four"
    # the copy boots, and a running target can't be refreshed
    d.lxc("start", c2)
    r = d.lxc("copy", c, c2, "--refresh", check=False)
    assert r.returncode != 0 and "running" in r.stderr
    # a running source (dir: frozen while its tree is copied, then thawed)
    c5 = names("live")
    d.lxc("exec", c2, "--", "sh", "-c", "echo live > /root/f")
    d.lxc("copy", c2, c5)
    assert d.api("GET", f"/1.0/instances/{c2}").json()["metadata"]["status"] == "Running"
    assert pull(d, c5) == "live" and snaps(d, c5) == ["s2", "s3"]


def test_copy_between_pools_with_snapshots(ready, names, btrfs_pool, tmp_path):
    d = ready
    c = source_with_snapshots(d, names, tmp_path)  # dir
    b = names("bt")
    d.lxc("copy", c, b, "-s", btrfs_pool)
    assert d.api("GET", f"/1.0/instances/{b}").json()["metadata"]["expanded_devices"]["root"]["pool"] == btrfs_pool
    assert snaps(d, b) == ["s1", "s2"]
    assert on_disk(d, btrfs_pool, b, "s1").read_text() == "one\n"
    assert on_disk(d, btrfs_pool, b, "s2").read_text() == "two\n"
    assert pull(d, b) == "three"

    # within the btrfs pool (subvolume snapshots), then back to dir
    b2, back = names("bt2"), names("back")
    d.lxc("copy", b, b2)
    assert snaps(d, b2) == ["s1", "s2"] and pull(d, b2) == "three"
    d.lxc("copy", b2, back, "-s", "default")
    assert snaps(d, back) == ["s1", "s2"]
    assert on_disk(d, "default", back, "s1").read_text() == "one\n"

    # --refresh across pools
    push(d, c, "five", tmp_path)
    d.lxc("snapshot", c, "s4")
    d.lxc("copy", c, b, "--refresh", "-s", btrfs_pool)  # (the client then PUTs the source's devices)
    assert snaps(d, b) == ["s1", "s2", "s4"]
    assert on_disk(d, btrfs_pool, b, "s4").read_text() == "five\n"
    assert pull(d, b) == "five"

    # restore on the copy works, and the copy boots
    d.lxc("restore", b, "s1")
    assert pull(d, b) == "one"
    d.lxc("start", b)
    assert d.lxc("exec", b, "--", "cat", "/root/f").stdout.strip() == "one"
    # a running instance moves between pools statefully (CRIU) or not at all (test_stateful.py)
    r = d.lxc("move", b, "-s", "default", "--stateless", check=False)
    assert r.returncode != 0 and "Instance must be stopped to move between pools statelessly" in r.stderr

    # `lxc move NAME -s POOL` (server side, instance_pool_move): same name and identity, snapshots kept
    uuid = config(d, back)["volatile.uuid"]
    d.lxc("move", back, "-s", btrfs_pool)
    inst = d.api("GET", f"/1.0/instances/{back}").json()["metadata"]
    assert inst["expanded_devices"]["root"]["pool"] == btrfs_pool
    assert inst["config"]["volatile.uuid"] == uuid
    assert snaps(d, back) == ["s1", "s2"]
    assert on_disk(d, btrfs_pool, back, "s2").read_text() == "two\n"
    assert not on_disk(d, "default", back).parent.parent.parent.exists()
    assert [i for i in d.api("GET", "/1.0/instances").json()["metadata"] if "lxd-move-of" in i] == []
