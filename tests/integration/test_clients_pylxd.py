"""Issue 8, "Done when": pylxd drives the daemon through a container's whole life, both the newest
pylxd from PyPI (the venv's, from the `test` extras) and Debian's python3-pylxd 2.2.10: create from
an image, start, execute (exit code, stdout, stderr), files put/get, the (empty) snapshot list,
stop, delete. Each runs in its own interpreter, as a user's script would."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import SYSTEM_PYTHON, VENV_PYTHON, ensure_containers_ready, run_prefix

pytestmark = pytest.mark.integration

SCRIPT = r"""
import json, sys
import pylxd

out = {"version": pylxd.__version__}
client = pylxd.Client()  # $LXD_DIR/unix.socket
coll = getattr(client, "instances", None) or client.containers  # 2.2.10 has containers only
name, alias = sys.argv[1], sys.argv[2]
c = coll.create({"name": name, "source": {"type": "image", "alias": alias}}, wait=True)
out["created"] = c.status
c.start(wait=True)
c = coll.get(name)
out["started"] = c.status
res = c.execute(["sh", "-c", "echo out; echo err >&2; exit 3"])
out["exec"] = [res.exit_code, res.stdout, res.stderr]
res = c.execute(["cat", "/etc/hostname"])
out["hostname"] = res.stdout.strip()
c.files.put("/root/hello.txt", b"hello from pylxd\n")
out["file"] = c.files.get("/root/hello.txt").decode()
out["snapshots"] = len(c.snapshots.all())
out["networks"] = sorted(n.name for n in client.networks.all())
c.stop(wait=True)
c.sync()
out["stopped"] = c.status
c.delete(wait=True)
out["exists"] = coll.exists(name)
print(json.dumps(out))
"""


@pytest.mark.parametrize("python", [
    pytest.param(VENV_PYTHON, id="pylxd-newest"),
    pytest.param(SYSTEM_PYTHON, id="pylxd-debian"),
])
def test_pylxd_container_life(daemon, python):
    alias = ensure_containers_ready(daemon)
    name = f"{run_prefix()}-pylxd"
    try:
        r = subprocess.run([python, "-c", SCRIPT, name, alias], env=daemon.env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.splitlines()[-1])
    finally:
        daemon.lxc("delete", "-f", name, check=False)
    assert out["created"] == "Stopped" and out["started"] == "Running", out
    assert out["exec"] == [3, "out\n", "err\n"], out
    assert out["hostname"] == name
    assert out["file"] == "hello from pylxd\n"
    assert out["snapshots"] == 0
    assert "lo" in out["networks"]
    assert out["stopped"] == "Stopped"
    assert out["exists"] is False
