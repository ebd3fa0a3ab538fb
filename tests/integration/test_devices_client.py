"""Devices through the stock client: disk and unix-char hotplug, validation errors, `none` masking."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.helpers import ensure_containers_ready, root_subids, run_prefix

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scratch():
    d = Path(tempfile.mkdtemp(prefix="devices-client-"))
    d.chmod(0o711)  # container root must traverse it to reach bind-mount sources
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def ct(daemon):
    alias = ensure_containers_ready(daemon)
    name = f"{run_prefix()}-dev"
    daemon.lxc("launch", alias, name)
    yield name
    daemon.lxc("delete", "-f", name, check=False)


def ok(daemon, *args):
    return daemon.lxc(*args).stdout


def fails(daemon, *args) -> str:
    r = daemon.lxc(*args, check=False)
    assert r.returncode != 0, f"lxc {args} unexpectedly succeeded: {r.stdout}"
    return r.stderr


def test_disk_hotplug_through_client(daemon, ct, scratch):
    src = scratch / "share"
    src.mkdir()
    (src / "f").write_text("from host\n")
    os.chown(src, *root_subids())
    ok(daemon, "config", "device", "add", ct, "share", "disk", f"source={src}", "path=/mnt/share")
    assert ok(daemon, "exec", ct, "--", "cat", "/mnt/share/f") == "from host\n"
    ok(daemon, "exec", ct, "--", "sh", "-c", "echo back > /mnt/share/g")
    assert (src / "g").read_text() == "back\n"
    assert "share" in ok(daemon, "config", "device", "list", ct).split()
    ok(daemon, "config", "device", "set", ct, "share", "readonly=true")
    r = daemon.lxc("exec", ct, "--", "sh", "-c", "echo x > /mnt/share/h", check=False)
    assert r.returncode != 0
    ok(daemon, "config", "device", "remove", ct, "share")
    assert "/mnt/share" not in ok(daemon, "exec", ct, "--", "cat", "/proc/self/mountinfo")
    # the mount point goes with the device, as in LXD (issue 8)
    assert daemon.lxc("exec", ct, "--", "test", "-e", "/mnt/share", check=False).returncode != 0


def test_unix_char_hotplug_through_client(daemon, ct):
    ok(daemon, "config", "device", "add", ct, "znull", "unix-char", "source=/dev/null", "path=/dev/znull",
       "mode=0666")
    out = ok(daemon, "exec", ct, "--", "sh", "-c", "ls -l /dev/znull; echo x > /dev/znull && echo ok")
    assert out.startswith("crw-rw-rw-") and out.endswith("ok\n")
    ok(daemon, "config", "device", "remove", ct, "znull")
    assert daemon.lxc("exec", ct, "--", "ls", "/dev/znull", check=False).returncode != 0


@pytest.mark.parametrize("args,fragment", [
    (["eth0", "nic", "nictype=bridged"], "bridged nics need a parent"),
    (["x", "floppy"], "unknown device type"),
    (["x", "disk", "source=/tmp", "path=/x", "colour=red"], "'colour'"),
    (["x", "disk", "source=/tmp", "path=/x", "propagation=sideways"], "'propagation'"),
    (["x", "unix-char", "path=/dev/x", "major=1"], "major and minor"),
])
def test_invalid_devices_are_400(daemon, ct, args, fragment):
    err = fails(daemon, "config", "device", "add", ct, *args)
    assert fragment in err
    assert args[0] not in ok(daemon, "config", "device", "list", ct).split()


def test_missing_source_on_running_container_is_refused_and_not_stored(daemon, ct, scratch):
    err = fails(daemon, "config", "device", "add", ct, "gone", "disk", f"source={scratch}/nope", "path=/gone")
    assert "Missing source path" in err
    assert "gone" not in ok(daemon, "config", "device", "list", ct).split()
    ok(daemon, "config", "device", "add", ct, "gone", "disk", f"source={scratch}/nope", "path=/gone", "optional=true")
    ok(daemon, "config", "device", "remove", ct, "gone")


def test_profile_device_and_none_mask(daemon, scratch):
    alias = ensure_containers_ready(daemon)
    prefix = run_prefix()
    prof, name = f"{prefix}-p", f"{prefix}-mask"
    src = scratch / "pdata"
    src.mkdir()
    (src / "p").write_text("profile\n")
    daemon.lxc("profile", "create", prof)
    try:
        ok(daemon, "profile", "device", "add", prof, "pdata", "disk", f"source={src}", "path=/pdata", "readonly=true")
        ok(daemon, "launch", alias, name, "-p", "default", "-p", prof)
        assert ok(daemon, "exec", name, "--", "cat", "/pdata/p") == "profile\n"  # rendered at start
        r = daemon.lxc("exec", name, "--", "sh", "-c", "echo x > /pdata/q", check=False)
        assert r.returncode != 0
        ok(daemon, "config", "device", "add", name, "pdata", "none")  # masks the profile's device, live
        assert "/pdata" not in ok(daemon, "exec", name, "--", "cat", "/proc/self/mountinfo")
        expanded = yaml.safe_load(ok(daemon, "config", "show", name, "-e"))
        assert "pdata" not in expanded["devices"] and "root" in expanded["devices"]
        ok(daemon, "config", "device", "remove", name, "pdata")  # unmasked: plugged again
        assert ok(daemon, "exec", name, "--", "cat", "/pdata/p") == "profile\n"
    finally:
        daemon.lxc("delete", "-f", name, check=False)
        daemon.lxc("profile", "delete", prof, check=False)
