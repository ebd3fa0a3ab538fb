"""Disk devices backed by custom storage volumes and by host block devices, through the stock
client on real containers: attached at start and hot-plugged, shared by two containers, owned
through the containers' id maps (shifted on attach, refused between different maps, unmapped,
idmapped with security.shifted), and a loop device's filesystem mounted into a container."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import root_subids, run_prefix

pytestmark = pytest.mark.integration

NOBODY = "65534"


def ok(d, *args) -> str:
    return d.lxc(*args).stdout


def fails(d, *args) -> str:
    r = d.lxc(*args, check=False)
    assert r.returncode != 0, f"lxc {args} unexpectedly succeeded: {r.stdout}"
    return r.stderr


def mounted(d, name: str, path: str) -> bool:
    info = ok(d, "exec", name, "--", "cat", "/proc/self/mountinfo")
    return any(line.split()[4] == path for line in info.splitlines())


def volume(d, pool: str, name: str) -> dict:
    return yaml.safe_load(ok(d, "storage", "volume", "show", pool, name))


def host_mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


@pytest.fixture(scope="module")
def c1(ready):
    """One running container the module's hot-plug tests share."""
    name = f"{run_prefix()}-c1"
    ready.lxc("launch", "busybox", name)
    yield name
    ready.lxc("delete", "-f", name, check=False)



@pytest.fixture(params=["dir", "btrfs"])
def pool(request, ready):
    return "default" if request.param == "dir" else request.getfixturevalue("btrfs_pool")


@pytest.fixture
def vols(ready):
    """Makes unique custom volumes (on pool `default` unless told); deleted after the test."""
    made: list[tuple[str, str]] = []

    def make(suffix: str, *config: str, pool: str = "default") -> str:
        n = f"{run_prefix()}-{suffix}"
        ok(ready, "storage", "volume", "create", pool, n, *config)
        made.append((pool, n))
        return n

    yield make
    for pool, n in made:
        ready.lxc("storage", "volume", "delete", pool, n, check=False)


def vol_path(d, name: str, pool: str = "default") -> Path:
    return d.lxd_dir / "storage-pools" / pool / "custom" / f"default_{name}"


def test_volume_shared_by_two_containers(ready, c1, names, vols, pool):
    """The issue's case, on a dir and on a btrfs pool: a file written by one container is read
    by the other, owned by the container's root; attached hot to a running container and at
    start to a stopped one."""
    d = ready
    vol = vols("shared", pool=pool)
    uid, gid = root_subids()
    ok(d, "storage", "volume", "attach", pool, vol, c1, "/mnt/data")  # running: hot-plugged
    # a new, empty volume belongs to the container's root, through the id map
    assert ok(d, "exec", c1, "--", "stat", "-c", "%u:%g", "/mnt/data").strip() == "0:0"
    assert os.stat(vol_path(d, vol, pool)).st_uid == uid
    ok(d, "exec", c1, "--", "sh", "-c", "echo hello from c1 > /mnt/data/f")
    # the map the files were shifted to is recorded on the volume: the container's
    last = json.loads(volume(d, pool, vol)["config"]["volatile.idmap.last"])
    current = json.loads(ok(d, "config", "get", c1, "volatile.idmap.current"))
    assert last == current and any(e["Hostid"] == uid and e["Nsid"] == 0 for e in last)

    c2 = names("c2")
    ok(d, "init", "busybox", c2)
    ok(d, "storage", "volume", "attach", pool, vol, c2, "/mnt/shared")  # stopped: at start
    ok(d, "start", c2)
    assert ok(d, "exec", c2, "--", "cat", "/mnt/shared/f") == "hello from c1\n"
    assert ok(d, "exec", c2, "--", "stat", "-c", "%u:%g", "/mnt/shared/f").strip() == "0:0"
    st = os.stat(vol_path(d, vol, pool) / "f")
    assert (st.st_uid, st.st_gid) == (uid, gid)
    ok(d, "exec", c2, "--", "sh", "-c", "echo reply > /mnt/shared/g")
    assert ok(d, "exec", c1, "--", "cat", "/mnt/data/g") == "reply\n"

    used = volume(d, pool, vol)["used_by"]
    assert f"/1.0/instances/{c1}" in used and f"/1.0/instances/{c2}" in used
    assert "in use" in fails(d, "storage", "volume", "delete", pool, vol)

    ok(d, "storage", "volume", "detach", pool, vol, c1)  # hot-unplugged
    assert not mounted(d, c1, "/mnt/data")
    assert volume(d, pool, vol)["used_by"] == [f"/1.0/instances/{c2}"]
    assert ok(d, "exec", c2, "--", "cat", "/mnt/shared/g") == "reply\n"
    ok(d, "delete", "-f", c2)
    assert volume(d, pool, vol)["used_by"] == []


def test_missing_or_wrong_volumes_are_refused_when_added(ready, names, vols):
    d = ready
    c = names("bad")
    ok(d, "init", "busybox", c)
    err = fails(d, "storage", "volume", "attach", "default", f"{run_prefix()}-nope", c, "/mnt/x")
    assert "doesn't exist" in err or "not found" in err.lower()
    err = fails(d, "config", "device", "add", c, "v", "disk", "pool=default", "source=custom/nope", "path=/x")
    assert "'nope' doesn't exist" in err
    vol = vols("snapped")
    err = fails(d, "config", "device", "add", c, "v", "disk", "pool=default", f"source={vol}/snap0", "path=/x")
    assert "snapshots" in err
    err = fails(d, "config", "device", "add", c, "v", "disk", "pool=default", f"source={vol}", "path=/x",
                "shift=true")
    assert "security.shifted" in err
    err = fails(d, "config", "device", "add", c, "v", "disk", "pool=nopool", f"source={vol}", "path=/x")
    assert "nopool" in err
    assert "v" not in ok(d, "config", "device", "list", c).split()
    # `custom/<name>` names the same volume
    ok(d, "config", "device", "add", c, "v", "disk", "pool=default", f"source=custom/{vol}", "path=/x")
    assert volume(d, "default", vol)["used_by"] == [f"/1.0/instances/{c}"]


def test_attach_profile_lists_the_profile(ready, names, vols):
    d = ready
    prof = names("prof")
    vol = vols("pv")
    ok(d, "profile", "create", prof)
    ok(d, "storage", "volume", "attach-profile", "default", vol, prof, "/mnt/p")
    dev = yaml.safe_load(ok(d, "profile", "show", prof))["devices"][vol]
    assert dev == {"type": "disk", "pool": "default", "source": vol, "path": "/mnt/p"}
    assert volume(d, "default", vol)["used_by"] == [f"/1.0/profiles/{prof}"]
    assert "in use" in fails(d, "storage", "volume", "delete", "default", vol)
    ok(d, "storage", "volume", "detach-profile", "default", vol, prof)
    assert volume(d, "default", vol)["used_by"] == []


def test_id_maps_unmapped_and_shifted(ready, c1, names, vols):
    """Different maps: a volume shifted to one map is refused to a container with another
    (isolated) one; security.shifted=true shares it through idmapped mounts, unshifted on disk;
    security.unmapped=true leaves host root's files as they are (nobody inside)."""
    d = ready
    uid, _ = root_subids()
    plain, shifted, unmapped = vols("plain"), vols("shifted", "security.shifted=true"), \
        vols("unmapped", "security.unmapped=true")

    ok(d, "storage", "volume", "attach", "default", plain, c1, "/mnt/plain")
    iso = names("iso")
    ok(d, "init", "busybox", iso, "-c", "security.idmap.isolated=true")
    ok(d, "storage", "volume", "attach", "default", plain, iso, "/mnt/plain")
    err = fails(d, "start", iso)
    assert "Idmaps of container" in err and plain in err
    assert os.stat(vol_path(d, plain)).st_uid == uid  # left as c1 has it
    ok(d, "storage", "volume", "detach", "default", plain, iso)

    # security.shifted: both containers, each through its own map; the files stay unshifted
    ok(d, "storage", "volume", "attach", "default", shifted, c1, "/mnt/shifted")
    ok(d, "exec", c1, "--", "sh", "-c", "echo shared > /mnt/shifted/f")
    assert ok(d, "exec", c1, "--", "stat", "-c", "%u", "/mnt/shifted/f").strip() == "0"
    assert os.stat(vol_path(d, shifted) / "f").st_uid == 0
    ok(d, "storage", "volume", "attach", "default", shifted, iso, "/mnt/shifted")
    ok(d, "start", iso)
    assert ok(d, "exec", iso, "--", "cat", "/mnt/shifted/f") == "shared\n"
    assert ok(d, "exec", iso, "--", "stat", "-c", "%u", "/mnt/shifted/f").strip() == "0"
    assert ok(d, "exec", iso, "--", "stat", "-c", "%u", "/").strip() == "0"
    assert "security.shifted" in fails(d, "storage", "volume", "unset", "default", shifted, "security.shifted")

    # security.unmapped: host root's directory, nobody's inside
    ok(d, "storage", "volume", "attach", "default", unmapped, c1, "/mnt/unmapped")
    assert ok(d, "exec", c1, "--", "stat", "-c", "%u", "/mnt/unmapped").strip() == NOBODY
    assert os.stat(vol_path(d, unmapped)).st_uid == 0
    assert "volatile.idmap.last" not in volume(d, "default", unmapped)["config"]
    for v in (plain, shifted, unmapped):
        ok(d, "storage", "volume", "detach", "default", v, c1)
    ok(d, "delete", "-f", iso)


@pytest.fixture
def loopdev(tmp_path):
    """A small ext4 filesystem (root and a file owned by the shared map's root) on a loop device."""
    uid, gid = root_subids()
    content = tmp_path / "content"
    content.mkdir()
    (content / "hello").write_text("from the block device\n")
    os.chown(content / "hello", uid, gid)
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"root_owner={uid}:{gid}", "-d", str(content), str(img)],
                   check=True, capture_output=True)
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_block_device_disk(ready, c1, loopdev, tmp_path):
    d = ready
    devdir = d.lxd_dir / "devices" / c1
    ok(d, "config", "device", "add", c1, "blk", "disk", f"source={loopdev}", "path=/mnt/blk")  # hot-plugged
    assert ok(d, "exec", c1, "--", "cat", "/mnt/blk/hello") == "from the block device\n"
    assert ok(d, "exec", c1, "--", "stat", "-c", "%u", "/mnt/blk/hello").strip() == "0"
    ok(d, "exec", c1, "--", "sh", "-c", "echo written > /mnt/blk/new")
    assert host_mounts_under(devdir) == []  # the host side went once the container had it
    assert ok(d, "exec", c1, "--", "stat", "-c", "%u", "/mnt/blk/lost+found").strip() == NOBODY  # host root's
    ok(d, "config", "device", "remove", c1, "blk")
    assert not mounted(d, c1, "/mnt/blk")

    # shift=true: an idmapped mount, host root's files are the container root's
    ok(d, "config", "device", "add", c1, "blk", "disk", f"source={loopdev}", "path=/mnt/blk", "shift=true")
    assert ok(d, "exec", c1, "--", "stat", "-c", "%u", "/mnt/blk/lost+found").strip() == "0"
    assert ok(d, "exec", c1, "--", "stat", "-c", "%u", "/mnt/blk/hello").strip() == str(root_subids()[0])
    ok(d, "config", "device", "remove", c1, "blk")

    # at start, read-only
    ok(d, "config", "device", "add", c1, "blk", "disk", f"source={loopdev}", "path=/mnt/blk", "readonly=true")
    ok(d, "restart", c1, "--force")
    assert ok(d, "exec", c1, "--", "cat", "/mnt/blk/new") == "written\n"
    assert d.lxc("exec", c1, "--", "sh", "-c", "echo x > /mnt/blk/ro", check=False).returncode != 0
    assert host_mounts_under(devdir) == []
    ok(d, "config", "device", "remove", c1, "blk")
    assert not mounted(d, c1, "/mnt/blk")

    # nothing holds the filesystem any more: it mounts again on the host, with the data
    mnt = tmp_path / "check"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "ro", loopdev, str(mnt)], check=True)
    try:
        assert (mnt / "new").read_text() == "written\n"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_failed_start_undoes_the_devices_already_prepared(ready, names, loopdev):
    """A start that fails on a later device (a required source missing) undoes what the earlier
    devices prepared on the host: the block device's host-side mount is gone, and the device
    works at the next start once the bad one is removed."""
    d = ready
    c = names("undo")
    ok(d, "init", "busybox", c)
    ok(d, "config", "device", "add", c, "blk", "disk", f"source={loopdev}", "path=/mnt/blk")
    ok(d, "config", "device", "add", c, "gone", "disk", "source=/nonexistent-h10", "path=/mnt/blk/deeper/x")
    err = fails(d, "start", c)
    assert "Missing source path" in err
    devdir = d.lxd_dir / "devices" / c
    assert host_mounts_under(devdir) == []
    assert not (devdir / "disk.blk.mnt-blk").exists()
    ok(d, "config", "device", "remove", c, "gone")
    ok(d, "start", c)
    try:
        assert ok(d, "exec", c, "--", "cat", "/mnt/blk/hello") == "from the block device\n"
        assert host_mounts_under(devdir) == []
    finally:
        ok(d, "delete", "-f", c)


def test_shifted_host_path_and_unix_node_at_start(ready, names):
    """At start: a host path with shift=true is idmapped (the filesystem probed by a worker), a
    unix-char node is made in the devices directory; removing the unix device from the stopped
    container removes its node."""
    import shutil
    import tempfile

    from lxd_daemon.runtime.hotplug import idmapped_mounts_supported

    d = ready
    src = Path(tempfile.mkdtemp(prefix="h10-shift-"))
    try:
        src.chmod(0o711)
        (src / "f").write_text("host root's\n")
        if not idmapped_mounts_supported(src):
            pytest.skip("no idmapped mounts for this filesystem here")
        c = names("atstart")
        ok(d, "init", "busybox", c)
        ok(d, "config", "device", "add", c, "sh", "disk", f"source={src}", "path=/mnt/sh", "shift=true")
        ok(d, "config", "device", "add", c, "nul", "unix-char", "path=/dev/mynull2", "major=1", "minor=3")
        ok(d, "start", c)
        assert ok(d, "exec", c, "--", "stat", "-c", "%u", "/mnt/sh/f").strip() == "0"
        assert ok(d, "exec", c, "--", "sh", "-c", "echo hi > /dev/mynull2 && echo ok") == "ok\n"
        node = d.lxd_dir / "devices" / c / "unix.nul.dev-mynull2"
        assert node.is_char_device()
        ok(d, "stop", c, "--force")
        ok(d, "config", "device", "remove", c, "nul")
        assert not node.exists()
        ok(d, "delete", c)
    finally:
        shutil.rmtree(src, ignore_errors=True)


def test_block_device_without_filesystem_is_refused(ready, c1, tmp_path):
    d = ready
    img = tmp_path / "blank.img"
    with open(img, "wb") as f:
        f.truncate(4 << 20)
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        err = fails(d, "config", "device", "add", c1, "blank", "disk", f"source={dev}", "path=/mnt/blank")
        assert "Failed to mount" in err and dev in err
        assert "blank" not in ok(d, "config", "device", "list", c1).split()
        devdir = d.lxd_dir / "devices" / c1
        assert host_mounts_under(devdir) == []
        assert not (devdir / "disk.blank.mnt-blank").exists()
        assert not mounted(d, c1, "/mnt/blank")
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_delete_never_removes_files_through_a_leftover_host_mount(ready, names, tmp_path):
    """A daemon killed between a block device's host-side mount and its unmount leaves a mount in
    the instance's devices directory: deleting the instance unmounts it before removing the
    directory, so the filesystem's files survive."""
    d = ready
    c = names("left")
    ok(d, "init", "busybox", c)
    data = tmp_path / "fs"
    data.mkdir()
    (data / "precious").write_text("keep me\n")
    mnt = d.lxd_dir / "devices" / c / "disk.blk.mnt-blk"
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(data), str(mnt)], check=True)
    try:
        ok(d, "delete", c)
        assert host_mounts_under(d.lxd_dir / "devices" / c) == []
        assert not mnt.parent.exists()
        assert (data / "precious").read_text() == "keep me\n"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
