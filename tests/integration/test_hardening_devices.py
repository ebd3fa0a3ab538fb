"""Issue 8: a disk unplugged from a running container takes its mount point with it (item 12),
and `lxc profile assign` to profiles without a root disk follows LXD 5.0.2 (item 11)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scratch():
    d = Path(tempfile.mkdtemp(prefix="hardening-devices-"))
    d.chmod(0o711)  # container root must traverse it to reach bind-mount sources
    yield d
    shutil.rmtree(d, ignore_errors=True)


def exists_in(daemon, ct: str, path: str) -> bool:
    return daemon.lxc("exec", ct, "--", "test", "-e", path, check=False).returncode == 0


def test_unplugged_disk_leaves_no_mount_point(daemon, names, scratch):
    ct = names("unplug")
    daemon.lxc("launch", "busybox", ct)
    src = scratch / "src"
    src.mkdir()
    (src / "f").write_text("x\n")
    daemon.lxc("config", "device", "add", ct, "d", "disk", f"source={src}", "path=/mnt/made/deep")
    assert daemon.lxc("exec", ct, "--", "cat", "/mnt/made/deep/f").stdout == "x\n"
    daemon.lxc("config", "device", "remove", ct, "d")
    assert not exists_in(daemon, ct, "/mnt/made/deep")
    assert exists_in(daemon, ct, "/mnt/made")  # LXD removes the mount point only

    # a file disk: the file made for it goes too
    fsrc = scratch / "file"
    fsrc.write_text("y\n")
    daemon.lxc("config", "device", "add", ct, "f", "disk", f"source={fsrc}", "path=/etc/extra.conf")
    assert daemon.lxc("exec", ct, "--", "cat", "/etc/extra.conf").stdout == "y\n"
    daemon.lxc("config", "device", "remove", ct, "f")
    assert not exists_in(daemon, ct, "/etc/extra.conf")

    # as LXD: an empty directory that was there before goes as well; one with files stays
    daemon.lxc("exec", ct, "--", "mkdir", "-p", "/srv/empty", "/srv/full")
    daemon.lxc("exec", ct, "--", "touch", "/srv/full/keep")
    daemon.lxc("config", "device", "add", ct, "e", "disk", f"source={src}", "path=/srv/empty")
    daemon.lxc("config", "device", "add", ct, "g", "disk", f"source={src}", "path=/srv/full")
    assert daemon.lxc("exec", ct, "--", "ls", "/srv/full").stdout.split() == ["f"]
    daemon.lxc("config", "device", "remove", ct, "e")
    daemon.lxc("config", "device", "remove", ct, "g")
    assert not exists_in(daemon, ct, "/srv/empty")
    assert daemon.lxc("exec", ct, "--", "ls", "/srv/full").stdout.split() == ["keep"]
    # a file with content the mount hid is the container's: it stays (LXD would delete it)
    daemon.lxc("exec", ct, "--", "sh", "-c", "echo mine > /etc/own.conf")
    daemon.lxc("config", "device", "add", ct, "h", "disk", f"source={fsrc}", "path=/etc/own.conf")
    assert daemon.lxc("exec", ct, "--", "cat", "/etc/own.conf").stdout == "y\n"
    daemon.lxc("config", "device", "remove", ct, "h")
    assert daemon.lxc("exec", ct, "--", "cat", "/etc/own.conf").stdout == "mine\n"
    assert os.listdir(src) == ["f"]  # the host side is untouched


def test_profile_assign_without_root_disk_follows_lxd(daemon, names, scratch):
    ct = names("assign")
    one, two, withdev = names("one"), names("two"), names("dev")
    daemon.lxc("init", "busybox", ct)
    for p in (one, two, withdev):
        daemon.lxc("profile", "create", p)
    daemon.lxc("profile", "device", "add", withdev, "d", "disk", f"source={scratch}", "path=/mnt/x")

    # profiles that give no devices at all: accepted, as LXD 5.0.2 does
    daemon.lxc("profile", "assign", ct, f"{one},{two}")
    shown = daemon.lxc("config", "show", ct).stdout
    assert f"- {one}" in shown and f"- {two}" in shown
    # ... but without a root disk the container can't start
    r = daemon.lxc("start", ct, check=False)
    assert r.returncode != 0 and "No root device could be found" in r.stderr

    # devices without a root disk among them: refused, as LXD does
    r = daemon.lxc("profile", "assign", ct, withdev, check=False)
    assert r.returncode != 0
    assert "Failed detecting root disk device: No root device could be found" in r.stderr

    # the root disk comes back with the default profile, and the container starts
    daemon.lxc("profile", "assign", ct, "default")
    daemon.lxc("start", ct)
    daemon.lxc("stop", "-f", ct)

    # a container without a root disk can still be deleted, and its volume goes with it
    daemon.lxc("profile", "assign", ct, one)
    volume = daemon.lxd_dir / "storage-pools" / "default" / "containers" / ct
    assert volume.is_dir()
    daemon.lxc("delete", ct)
    assert daemon.api("GET", f"/1.0/instances/{ct}").status_code == 404
    wait_for(lambda: not volume.exists(), timeout=30)
