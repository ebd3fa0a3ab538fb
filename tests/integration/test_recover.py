"""`lxd recover`: an instance (with a snapshot) whose database rows were deleted while the daemon
was stopped is kept by the start-up sweep and brought back by `lxd recover`, on a dir pool whose
record survived (flags) and on a btrfs pool on a loop file whose record went too (interactive, as
LXD asks); the instance starts with its files and its snapshot restores. Volumes the sweep can
prove unfinished (no backup.yaml, temporary names) are still removed."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from lxd_daemon.storage.drivers.btrfs import BtrfsDriver
from tests.helpers import Daemon, ensure_containers_ready, run_prefix, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rd(tmp_path_factory):
    """A daemon of this module's own (the tests stop it and edit its database)."""
    base = tmp_path_factory.mktemp("recover")
    d = Daemon(lxd_dir=base / "var", conf_dir=base / "conf")
    d.start()
    ensure_containers_ready(d)
    yield d
    for c in d.api("GET", "/1.0/instances").json().get("metadata") or []:
        d.lxc("delete", "-f", c.rsplit("/", 1)[-1], check=False)
    for p in d.api("GET", "/1.0/storage-pools").json().get("metadata") or []:
        name = p.rsplit("/", 1)[-1]
        if name != "default":
            d.lxc("profile", "device", "remove", "default", "root", check=False)
            d.lxc("storage", "delete", name, check=False)
    d.stop()
    _umount_under(d.lxd_dir)


def _umount_under(root: Path) -> None:
    """Whatever a failed test left mounted below the daemon's directory (loop files autoclear)."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    for m in sorted(mounts, key=len, reverse=True):
        if m.startswith(str(root) + "/"):
            subprocess.run(["umount", "-l", m], capture_output=True)


def _db(d: Daemon, *statements: tuple[str, tuple]) -> None:
    con = sqlite3.connect(d.lxd_dir / "database" / "lxd.db")
    try:
        con.execute("PRAGMA foreign_keys=ON")
        with con:
            for sql, params in statements:
                con.execute(sql, params)
    finally:
        con.close()


def _instances(d: Daemon) -> list[str]:
    return [u.rsplit("/", 1)[-1] for u in d.api("GET", "/1.0/instances").json()["metadata"]]


def _snapshots_work(d: Daemon, name: str, snap: str) -> bool:
    r = d.lxc("snapshot", name, snap, check=False)
    if r.returncode != 0 and "not implemented" in (r.stderr + r.stdout).lower():
        return False
    assert r.returncode == 0, r.stderr
    return True


def test_recover_on_a_dir_pool_with_flags(rd):
    d = rd
    c = run_prefix() + "-dir"
    prof = c + "-prof"
    d.lxc("profile", "create", prof)
    d.lxc("init", "busybox", c, "-p", "default", "-p", prof)
    vol = d.lxd_dir / "storage-pools" / "default" / "containers" / c
    wait_for(lambda: (vol / "backup.yaml").exists())
    (vol / "rootfs" / "marker").write_text("one")
    snaps = _snapshots_work(d, c, "s0")
    (vol / "rootfs" / "marker").write_text("two")
    d.lxc("config", "set", c, "user.note", "kept")
    wait_for(lambda: "user.note" in (vol / "backup.yaml").read_text())
    cv = c + "-v"
    d.lxc("storage", "volume", "create", "default", cv)
    (d.lxd_dir / "storage-pools" / "default" / "custom" / f"default_{cv}" / "data").write_text("vol")
    # Leftovers of unfinished creates: no backup.yaml, or a temporary name.
    half = d.lxd_dir / "storage-pools" / "default" / "containers" / (c + "-half")
    (half / "rootfs").mkdir(parents=True)
    trash = d.lxd_dir / "storage-pools" / "default" / "containers" / f".trash-{c}-x"
    (trash / "rootfs").mkdir(parents=True)
    copy = d.lxd_dir / "storage-pools" / "default" / "containers" / (c + "-copy")  # a copy cut short
    (copy / "rootfs").mkdir(parents=True)
    (copy / "backup.yaml").write_bytes((vol / "backup.yaml").read_bytes())

    assert d.stop() == 0
    _db(d, ("DELETE FROM instances WHERE name=?", (c,)), ("DELETE FROM storage_volumes WHERE name=?", (cv,)))
    d.start()
    assert c not in _instances(d)
    assert (vol / "rootfs" / "marker").read_text() == "two"  # the sweep kept it
    assert not half.exists() and not trash.exists() and not copy.exists()  # and removed what it could prove unfinished

    r = d.lxd("recover", "--dry-run")
    assert f'Container "{c}" on pool "default" in project "default" (includes {1 if snaps else 0} snapshots)' \
        in r.stdout, r.stdout
    assert f'Volume "{cv}" on pool "default" in project "default" (includes 0 snapshots)' in r.stdout, r.stdout
    assert c not in _instances(d)
    assert d.api("GET", f"/1.0/storage-pools/default/volumes/custom/{cv}").status_code == 404
    # A profile the instance uses is missing: named, nothing recovered until it exists again.
    d.lxc("profile", "delete", prof)
    r = d.lxd("recover", "--yes", check=False)
    assert r.returncode == 1 and "You are currently missing the following:" in r.stdout, r.stdout + r.stderr
    assert f' - Profile "{prof}" in project "default"' in r.stdout
    assert c not in _instances(d)
    d.lxc("profile", "create", prof)
    r = d.lxd("recover", "--pool", "default", "--yes")
    assert "Starting recovery..." in r.stdout
    assert c in _instances(d)
    inst = d.api("GET", f"/1.0/instances/{c}").json()["metadata"]
    assert inst["config"]["user.note"] == "kept" and inst["profiles"] == ["default", prof]
    assert inst["expanded_devices"]["root"]["pool"] == "default"
    assert d.api("GET", f"/1.0/storage-pools/default/volumes/custom/{cv}").status_code == 200
    # Nothing left to find; the recovered instance runs with its files.
    assert "No unknown volumes found" in d.lxd("recover", "--yes").stdout
    d.lxc("start", c)
    assert d.lxc("exec", c, "--", "cat", "/marker").stdout == "two"
    if snaps:
        snaps_now = d.api("GET", f"/1.0/instances/{c}/snapshots").json()["metadata"]
        assert snaps_now == [f"/1.0/instances/{c}/snapshots/s0"], snaps_now
        d.lxc("stop", c, "-f")
        d.lxc("restore", c, "s0")
        d.lxc("start", c)
        assert d.lxc("exec", c, "--", "cat", "/marker").stdout == "one"
    d.lxc("delete", "-f", c)
    d.lxc("storage", "volume", "delete", "default", cv)
    d.lxc("profile", "delete", prof)


@pytest.mark.skipif(not BtrfsDriver.available()[0], reason="btrfs is not available on this host")
def test_recover_a_lost_btrfs_pool_interactively(rd):
    d = rd
    pool, c = run_prefix() + "-bt", run_prefix() + "-bc"
    d.lxc("storage", "create", pool, "btrfs", "size=1GiB")
    loop_file = d.lxd_dir / "disks" / f"{pool}.img"
    try:
        d.lxc("init", "busybox", c, "-s", pool)
        vol = d.lxd_dir / "storage-pools" / pool / "containers" / c
        wait_for(lambda: (vol / "backup.yaml").exists())
        (vol / "rootfs" / "marker").write_text("one")
        snaps = _snapshots_work(d, c, "s0")
        (vol / "rootfs" / "marker").write_text("two")
        d.lxc("storage", "volume", "create", pool, "v1")
        d.lxc("storage", "volume", "snapshot", pool, "v1", "vs0")

        assert d.stop() == 0
        _db(d, ("DELETE FROM instances WHERE name=?", (c,)), ("DELETE FROM storage_pools WHERE name=?", (pool,)))
        # As after a reboot: the pool is not mounted, nothing knows it but its loop file.
        subprocess.run(["umount", str(d.lxd_dir / "storage-pools" / pool)], check=True)
        d.start()
        assert d.api("GET", f"/1.0/storage-pools/{pool}").status_code == 404
        assert c not in _instances(d)

        answers = "\n".join(["yes", pool, "btrfs", str(loop_file), "", "no", "yes", "yes"]) + "\n"
        r = d.lxd("recover", input=answers)
        out = r.stdout
        for prompt in ("This LXD server currently has the following storage pools:",
                       "Would you like to recover another storage pool? (yes/no) [default=no]: ",
                       "Name of the storage pool: ", "Name of the storage backend (",
                       "Source of the storage pool (block device, volume group, dataset, path, ... as applicable): ",
                       "Additional storage pool configuration property (KEY=VALUE, empty when done): ",
                       f' - NEW: "{pool}" (backend="btrfs", source="{loop_file}")',
                       "Would you like to continue with scanning for lost volumes? (yes/no) [default=yes]: ",
                       f'Container "{c}" on pool "{pool}" in project "default" (includes {1 if snaps else 0} snapshots)',
                       "Would you like those to be recovered? (yes/no) [default=no]: ", "Starting recovery..."):
            assert prompt in out, out
        p = d.api("GET", f"/1.0/storage-pools/{pool}").json()["metadata"]
        assert p["driver"] == "btrfs" and p["config"]["source"] == str(loop_file)
        assert p["config"]["size"] == "1GiB"  # from backup.yaml's pool: every key it was made with
        assert c in _instances(d)
        assert d.api("GET", f"/1.0/instances/{c}").json()["metadata"]["expanded_devices"]["root"]["pool"] == pool
        assert 'Volume "v1"' in out and "(includes 1 snapshots)" in out
        snaps_v1 = d.api("GET", f"/1.0/storage-pools/{pool}/volumes/custom/v1/snapshots").json()["metadata"]
        assert snaps_v1 == [f"/1.0/storage-pools/{pool}/volumes/custom/v1/snapshots/vs0"], snaps_v1
        d.lxc("start", c)
        assert d.lxc("exec", c, "--", "cat", "/marker").stdout == "two"
        if snaps:
            d.lxc("restore", c, "s0")  # running: LXD stops, restores and starts it again
            assert d.lxc("exec", c, "--", "cat", "/marker").stdout == "one"
        d.lxc("delete", "-f", c)
        d.lxc("storage", "volume", "delete", pool, "v1")
    finally:
        d.lxc("delete", "-f", c, check=False)
        d.lxc("storage", "volume", "delete", pool, "v1", check=False)
        if d.api("GET", f"/1.0/storage-pools/{pool}").status_code == 200:
            d.lxc("storage", "delete", pool)
        mnt = d.lxd_dir / "storage-pools" / pool
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        with contextlib.suppress(OSError):
            loop_file.unlink()
    assert not loop_file.exists()


def test_recover_a_lost_dir_pool_kept_elsewhere(rd, tmp_path):
    d = rd
    pool = run_prefix() + "-dp"
    src = tmp_path / "src"
    src.mkdir()
    d.lxc("storage", "create", pool, "dir", f"source={src}")
    try:
        d.lxc("storage", "volume", "create", pool, "v1")
        (src / "custom" / "default_v1" / "data").write_text("kept")
        assert d.stop() == 0
        _db(d, ("DELETE FROM storage_pools WHERE name=?", (pool,)))
        (d.lxd_dir / "storage-pools" / pool).unlink()  # the link to the source went too
        d.start()
        assert d.api("GET", f"/1.0/storage-pools/{pool}").status_code == 404
        r = d.lxd("recover", "--unknown-pool", f"{pool}:dir:{src}", "--dry-run")
        assert f' - NEW: "{pool}" (backend="dir", source="{src}")' in r.stdout
        assert f'Volume "v1" on pool "{pool}"' in r.stdout
        assert d.api("GET", f"/1.0/storage-pools/{pool}").status_code == 404
        assert not (d.lxd_dir / "storage-pools" / pool).exists()  # a scan leaves nothing behind
        d.lxd("recover", "--unknown-pool", f"{pool}:dir:{src}", "--yes")
        p = d.api("GET", f"/1.0/storage-pools/{pool}").json()["metadata"]
        assert p["driver"] == "dir" and p["config"]["source"] == str(src)
        assert (d.lxd_dir / "storage-pools" / pool).resolve() == src.resolve()
        assert d.api("GET", f"/1.0/storage-pools/{pool}/volumes/custom/v1").status_code == 200
        d.lxc("storage", "volume", "delete", pool, "v1")
        d.lxc("storage", "delete", pool)
        assert src.is_dir() and not (src / "custom" / "default_v1").exists()
    finally:
        d.lxc("storage", "volume", "delete", pool, "v1", check=False)
        d.lxc("storage", "delete", pool, check=False)


def test_recover_errors_are_clear(rd):
    d = rd
    r = d.lxd("recover", "--unknown-pool", "nope", check=False)
    assert r.returncode == 1 and "NAME:DRIVER:SOURCE" in r.stderr
    r = d.lxd("recover", "--pool", "missing-pool", check=False)
    assert r.returncode == 1 and "--unknown-pool" in r.stderr
    missing = d.lxd_dir / "disks" / "nothing-here.img"
    r = d.lxd("recover", "--unknown-pool", f"gone:btrfs:{missing}", "--yes", check=False)
    assert r.returncode == 1 and "gone" in r.stderr
    r = d.lxd("recover", "--unknown-pool", "x:nosuchdriver:/tmp", "--yes", check=False)
    assert r.returncode == 1 and "nosuchdriver" in r.stderr
    assert d.api("GET", "/1.0/storage-pools/gone").status_code == 404
    assert not (d.lxd_dir / "storage-pools" / "gone").exists()
    r = d.lxd("recover", "--unknown-pool", "again:dir:" + str(d.lxd_dir / "storage-pools" / "default"), "--yes",
              check=False)
    assert r.returncode == 1 and "already" in r.stderr and "default" in r.stderr
    r = d.lxd("recover", "--unknown-pool", "lv:lvm:vg0", "--yes", check=False)
    assert r.returncode == 1 and "lvm" in r.stderr
    # Internal routes: the body is checked.
    r = d.api("POST", "/internal/recover/validate", json={"pools": "x"})
    assert r.status_code == 400
    r = d.api("POST", "/internal/recover/validate", json={"pools": [{"name": "default"}]})
    assert r.status_code == 200 and r.json()["metadata"] == {"UnknownVolumes": [], "DependencyErrors": []}
