"""The Debian image: debootstrap from this machine's Debian mirror, then boot it with liblxc.

Slow (a couple of minutes: it downloads about 40 MB of packages), so not in the default suite:
    .venv/bin/python -m pytest -q -m slow tests/integration/test_imagebuilder_debian.py
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from lxd_daemon.imagebuilder.verify import ScratchContainer
from tests.helpers import run_prefix

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("debootstrap") or not shutil.which("lxc-start"),
                       reason="needs debootstrap and the lxc tools"),
]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("debian")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "lxd_daemon.imagebuilder.cli", "debian", "--output", f"{d}/",
                        "--alias-hint", "deb"], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    out = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    out["seconds"] = time.monotonic() - t0
    return out


def test_debian_image_contents(image):
    img = image["image"]
    assert image["fingerprint"] == hashlib.sha256(Path(img).read_bytes()).hexdigest()
    with tarfile.open(img) as t:
        meta = yaml.safe_load(t.extractfile("metadata.yaml"))
        members = {m.name: m for m in t.getmembers()}
        sources = t.extractfile("rootfs/etc/apt/sources.list.d/debian.sources").read().decode()
        inittab = t.extractfile("rootfs/etc/inittab").read().decode()
    props = meta["properties"]
    assert (props["os"], props["release"], props["version"], props["variant"]) == ("debian", "bookworm", "12",
                                                                                 "default")
    assert set(meta["templates"]) == {"/etc/hostname", "/etc/hosts"}
    assert members["rootfs/etc/machine-id"].size == 0
    assert members["rootfs/etc/resolv.conf"].size == 0
    assert not [n for n in members if n.startswith("rootfs/etc/ssh/ssh_host_")]
    assert not [n for n in members if n.startswith("rootfs/dev/")]
    assert not [n for n in members if n.endswith(".deb")]
    assert not [n for n in members if n.startswith("rootfs/var/lib/apt/lists/") and members[n].isfile()]
    assert members["rootfs/sbin"].issym()  # merged /usr
    assert "rootfs/usr/sbin/init" in members and "rootfs/etc/network/interfaces" in members
    # ownership is preserved (not everything is root's), set-id bits too
    assert members["rootfs/etc/shadow"].gid == 42
    assert members["rootfs/usr/bin/passwd"].mode & 0o4000
    assert "Suites: bookworm bookworm-updates" in sources
    assert "pf::powerwait:/sbin/init 0" in inittab


def test_debian_boots_restarts_and_stops(image):
    c = ScratchContainer(name=run_prefix() + "-deb")
    try:
        c.populate_from_image([Path(image["image"])])
        c.prepare()
        c.start()
        assert c.wait_state("RUNNING", 10), c.log_tail()
        deadline = time.monotonic() + 60
        while True:
            r = c.attach("runlevel")
            if r.returncode == 0 and r.stdout.split()[-1:] == ["2"]:
                break
            assert time.monotonic() < deadline, f"no runlevel 2: {r.stdout}{r.stderr}"
            time.sleep(0.3)
        r = c.attach("sh", "-c", "ps -e -o pid,comm; hostname; cat /etc/hostname; test -s /etc/machine-id && echo mid")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.split("\n")
        assert any(ln.split() == ["1", "init"] for ln in lines), r.stdout
        assert f"{c.name}\n{c.name}\nmid" in r.stdout
        # lxc restart: SIGINT -> shutdown -r -> reboot(2) -> liblxc starts it again
        pid = c.init_pid()
        r = subprocess.run(["lxc-stop", *c._args(), "-r", "-t", "30"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 30
        while c.init_pid() in (0, pid) or c.state() != "RUNNING":
            assert time.monotonic() < deadline, f"did not come back: {c.state()}\n{c.log_tail()}"
            time.sleep(0.1)
        took = c.stop(30)
        assert c.state() == "STOPPED"
        assert took < 10
    finally:
        c.cleanup()
    assert not os.path.exists(c.base)
