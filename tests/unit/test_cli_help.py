"""Issue 8, item 13: `lxd --help` tells where the daemon keeps its state (LXD_DIR), and
scripts/demo.sh says how to stop the daemon it leaves running."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO


def test_lxd_help_mentions_lxd_dir():
    r = subprocess.run([sys.executable, "-m", "lxd_daemon", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    assert "LXD_DIR" in r.stdout and "/var/lib/lxd" in r.stdout and "unix.socket" in r.stdout


def test_demo_says_how_to_stop_the_daemon():
    script = (REPO / "scripts" / "demo.sh").read_text()
    assert "lxd shutdown" in script.replace("$LXD shutdown", "lxd shutdown")
    assert "lxd.lock" in script  # where the pid it prints comes from
    r = subprocess.run(["bash", "-n", str(REPO / "scripts" / "demo.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
