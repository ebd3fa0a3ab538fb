"""The image builder end to end: the real `lxd-imagebuilder` command, GNU tar and unsquashfs on its
output, and the busybox root filesystem booted as an unprivileged liblxc container."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from lxd_daemon.imagebuilder.busybox import build_busybox
from lxd_daemon.imagebuilder.cli import main as cli_main
from lxd_daemon.imagebuilder.verify import ScratchContainer, verify_image
from tests.helpers import run_prefix

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.isfile("/bin/busybox") or not shutil.which("lxc-start"),
                       reason="needs busybox-static and the lxc tools"),
]

# A clean stop takes about 0.1 s (0.6 s with a process that ignores SIGTERM) on an idle machine;
# the bound leaves room for a loaded one while still catching an init that waits for a timeout.
STOP_BOUND = 3.0

BUILDER = [sys.executable, "-m", "lxd_daemon.imagebuilder.cli"]


def build(*args: str, subprocess_: bool = False) -> dict[str, str]:
    """Run `lxd-imagebuilder busybox ARGS` (in this process, or as the real command) and parse
    its "key: value" output."""
    if subprocess_:
        r = subprocess.run([*BUILDER, "busybox", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        stdout = r.stdout
    else:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert cli_main(["busybox", *args]) == 0
        stdout = buf.getvalue()
    out = {}
    for line in stdout.splitlines():
        k, _, v = line.partition(": ")
        out[k] = v
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    gz = build("--output", f"{d}/", "--alias-hint", "bb-gz", subprocess_=True)
    xz = build("--output", str(d / "bb-xz.tar.xz"), "--compression", "xz")
    sq = build("--output", f"{d}/", "--format", "split", "--compression", "xz", "--alias-hint", "bb-split")
    return {"dir": d, "gz": gz, "xz": xz, "split": sq}


def sha256(*paths: str) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def test_unified_images_and_fingerprints(images):
    d = images["dir"]
    assert images["gz"]["image"] == str(d / "bb-gz.tar.gz")
    assert images["xz"]["image"] == str(d / "bb-xz.tar.xz")
    for key, magic in (("gz", b"\x1f\x8b"), ("xz", b"\xfd7zXZ")):
        img = images[key]["image"]
        assert Path(img).read_bytes()[:len(magic)] == magic
        assert images[key]["fingerprint"] == sha256(img)
        assert int(images[key]["size"]) == Path(img).stat().st_size < 3 << 20
        assert images[key]["import with"] == f"lxc image import {img} --alias " + (
            "bb-gz" if key == "gz" else "busybox")
        # GNU tar, as the daemon unpacks, lists the layout LXD expects
        r = subprocess.run(["tar", "-tvf", img, "--numeric-owner"], capture_output=True, text=True, check=True)
        lines = r.stdout.splitlines()
        names = [ln.split()[5] for ln in lines]
        assert names[0] == "metadata.yaml"
        for want in ("rootfs/bin/busybox", "rootfs/sbin/init", "rootfs/bin/sh", "rootfs/usr/bin/sha256sum",
                     "rootfs/etc/passwd", "rootfs/tmp/", "templates/hostname.tpl", "templates/hosts.tpl"):
            assert want in names, want
        assert all(ln.split()[1] == "0/0" for ln in lines)
        tmpline = lines[names.index("rootfs/tmp/")]
        assert tmpline.startswith("drwxrwxrwt")
    # every build is reported with the LXD fingerprint of what was written, nothing else is left
    assert sorted(p.name for p in d.iterdir()) == ["bb-gz.tar.gz", "bb-split.meta.tar.xz",
                                                  "bb-split.squashfs", "bb-xz.tar.xz"]


def test_split_image_and_fingerprint(images):
    d = images["dir"]
    sq = images["split"]
    meta, rootfs = sq["metadata"], sq["rootfs"]
    assert (meta, rootfs) == (str(d / "bb-split.meta.tar.xz"), str(d / "bb-split.squashfs"))
    assert sq["fingerprint"] == sha256(meta, rootfs)
    assert sq["import with"] == f"lxc image import {meta} {rootfs} --alias bb-split"
    with tarfile.open(meta) as t:
        assert t.getnames() == ["metadata.yaml", "templates", "templates/hostname.tpl", "templates/hosts.tpl"]
        doc = yaml.safe_load(t.extractfile("metadata.yaml"))
    assert doc["properties"]["os"] == "busybox"
    assert doc["templates"]["/etc/hostname"]["when"] == ["create", "copy"]
    r = subprocess.run(["unsquashfs", "-lls", rootfs], capture_output=True, text=True, check=True)
    listing = r.stdout
    for want in ("squashfs-root/bin/busybox", "squashfs-root/sbin/init", "squashfs-root/usr/bin/sha256sum"):
        assert want in listing
    entries = [ln for ln in listing.splitlines() if "squashfs-root" in ln]
    assert entries and all(" root/root " in ln for ln in entries)


@pytest.fixture
def container(images):
    c = ScratchContainer(name=run_prefix() + "-bb")
    try:
        c.populate_from_image([Path(images["gz"]["image"])])
        c.prepare()
        yield c
    finally:
        c.cleanup()
    assert not c.base.exists()


def _running(c: ScratchContainer) -> None:
    c.start()
    assert c.wait_state("RUNNING", 20), c.log_tail()


def test_busybox_boots_and_stops_cleanly(container):
    c = container
    _running(c)
    r = c.attach("sh", "-c", "ps; hostname")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == c.name
    assert any(ln.split()[:1] == ["1"] and "/sbin/init" in ln for ln in lines), r.stdout
    # the usual tools are there and work
    r = c.attach("sh", "-c", "id; stat -c %a /tmp; echo -n abc | sha256sum; env | grep -c PATH; "
                             "ip -o link show lo; mount | grep -c ' /proc '; cat /etc/hostname; "
                             "true && ! false && sleep 0 && echo ok")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith("uid=0(root) gid=0(root)")
    assert out[1] == "1777"
    assert out[2].startswith(hashlib.sha256(b"abc").hexdigest())
    assert "lo:" in out[4] and "UP" in out[4]  # rcS brought the loopback up
    assert out[-1] == "ok"
    took = c.stop(20)  # SIGPWR, no kill: fails unless init stops the container by itself
    assert c.state() == "STOPPED"
    assert took < STOP_BOUND, f"clean stop took {took:.2f}s"


def test_stop_with_a_process_ignoring_sigterm(container):
    c = container
    _running(c)
    r = c.attach("sh", "-c", "(trap '' TERM; exec sleep 1000) >/dev/null 2>&1 & sleep 0.1; "
                             "ps | grep -c 'sleep 1000'")
    assert r.returncode == 0 and int(r.stdout.split()[-1]) >= 1, r.stdout + r.stderr
    took = c.stop(20)
    assert c.state() == "STOPPED"
    assert took < STOP_BOUND, f"stop took {took:.2f}s"


def test_sigterm_halts_and_orphans_are_reaped(container):
    c = container
    _running(c)
    # an orphan re-parented to init exits: init reaps it (no zombie left)
    r = c.attach("sh", "-c", "sh -c 'sleep 0.2 &' ; sleep 0.6; "
                             "for s in /proc/[0-9]*/stat; do read -r l < $s; set -- $l; echo $3; done")
    assert r.returncode == 0, r.stderr
    assert "Z" not in r.stdout.split(), r.stdout
    pid = c.init_pid()
    assert pid > 0
    t0 = time.monotonic()
    os.kill(pid, 15)
    assert c.wait_state("STOPPED", 20), c.log_tail()
    assert time.monotonic() - t0 < STOP_BOUND


def test_sigint_reboots(container):
    c = container
    _running(c)
    pid = c.init_pid()
    r = subprocess.run(["lxc-stop", *c._args(), "-r", "-t", "20"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        new = c.init_pid()
        if new and new != pid and c.state() == "RUNNING":
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"container did not come back after a reboot: {c.state()}\n{c.log_tail()}")
    # `reboot` inside the container asks init for the same. Init's shutdown then signals every
    # process, so `reboot` itself may be killed by SIGTERM (143) before it exits on its own.
    r = c.attach("reboot")
    assert r.returncode in (0, 143), r.stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and c.init_pid() in (0, new):
        time.sleep(0.05)
    assert c.init_pid() not in (0, new)
    assert c.wait_state("RUNNING", 20)
    # `poweroff` inside stops it
    c.attach("poweroff")
    assert c.wait_state("STOPPED", 20), c.log_tail()


def test_verify_split_squashfs_image(images):
    rep = verify_image([Path(images["split"]["metadata"]), Path(images["split"]["rootfs"])])
    assert "/sbin/init" in rep.ps
    assert rep.stop_seconds < STOP_BOUND


def test_build_busybox_api_for_other_tests(tmp_path):
    res = build_busybox(tmp_path, fmt="split", compression="gzip")
    assert [p.name for p in res.paths] == ["busybox.meta.tar.gz", "busybox.squashfs"]
    assert res.fingerprint == sha256(*map(str, res.paths))
