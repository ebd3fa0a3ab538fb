"""Stateful stop/start, snapshots and restores (CRIU) through the stock client.

On this host CRIU is unusable (`criu check` fails), so the shared daemon must refuse every stateful
request with a clear 400 before touching the container, and not advertise the stateful
extensions. The daemon's own stateful paths (record, state directory, restore at the next start,
a failed dump leaving nothing behind) run against a daemon of this module's own whose PATH holds a
fake `criu` (it passes the probe) and a fake `lxc-checkpoint` that records its argv, "dumps" by
writing an inventory image and killing the container, and "restores" by booting it with
lxc-start: only the tools are replaced, the daemon's code path is the real one."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from lxd_daemon.migration import criu
from tests.helpers import (
    FAKE_CRIU,
    Daemon,
    ensure_containers_ready,
    init_pid,
    release_host_state,
    run_prefix,
    write_tool,
)

pytestmark = pytest.mark.integration

FAKE_CHECKPOINT = """#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE_LOG"
name=""; lxcpath=""; conf=""; dir=""; restore=""; stop=""; prev=""
for a in "$@"; do
  case "$prev" in -n) name="$a" ;; -P) lxcpath="$a" ;; -D) dir="$a" ;; esac
  case "$a" in --rcfile=*) conf="${a#--rcfile=}" ;; -r) restore=1 ;; -s) stop=1 ;; esac
  prev="$a"
done
if [ -f "$FAKE_FAIL" ]; then echo "Error (criu/cr-dump.c:1): Dumping FAILED." >&2; exit 1; fi
if [ -n "$restore" ]; then
  [ -f "$dir/inventory.img" ] || { echo "no images in $dir" >&2; exit 2; }
  exec lxc-start -n "$name" -P "$lxcpath" -f "$conf"
fi
mkdir -p "$dir" && echo fake > "$dir/inventory.img"
[ -n "$stop" ] && lxc-stop -k -n "$name" -P "$lxcpath"
exit 0
"""


def fails(d: Daemon, *args: str) -> str:
    r = d.lxc(*args, check=False)
    assert r.returncode != 0, f"lxc {args} unexpectedly succeeded: {r.stdout}"
    return r.stderr


# -- the shared daemon, on this host (CRIU unusable) ----------------------------------------------
def test_stateful_requests_are_refused_without_criu(ready, names):
    st = asyncio.run(criu.Probe().status())
    if st.usable:
        pytest.skip("CRIU works on this host: the refusals don't apply")
    real = subprocess.run(["criu", "check"], capture_output=True, text=True)
    assert st.reason.split(": ", 1)[1] in real.stderr + real.stdout  # CRIU's own words
    d = ready
    c = names("st")
    d.lxc("launch", "busybox", c)
    pid = init_pid(d, c)
    assert "Error: A stateful stop needs CRIU, which doesn't work on this server: `criu check` failed: " \
        in fails(d, "stop", "--stateful", c)
    assert init_pid(d, c) == pid  # untouched: still the same init
    assert not (d.lxd_dir / "containers" / c / "state").exists()

    assert "A stateful snapshot needs CRIU" in fails(d, "snapshot", "--stateful", c, "s1")
    assert d.api("GET", f"/1.0/instances/{c}/snapshots/s1").status_code == 404
    d.lxc("snapshot", c, "s0")
    assert "Restoring a stateful snapshot needs CRIU" in fails(d, "restore", "--stateful", c, "s0")
    assert init_pid(d, c) == pid

    r = d.api("PUT", f"/1.0/instances/{c}/state", json={"action": "restart", "stateful": True})
    assert r.status_code == 400 and r.json()["error_code"] == 400 and "only start and stop" in r.json()["error"]
    d.lxc("stop", "-f", c)
    r = d.api("PUT", f"/1.0/instances/{c}/state", json={"action": "start", "stateful": True})
    assert r.status_code == 400 and "no saved state" in r.json()["error"]
    r = d.api("PUT", f"/1.0/instances/{c}/state", json={"action": "stop", "stateful": True})
    assert r.status_code == 400 and "already stopped" in r.json()["error"]
    info = d.api("GET", f"/1.0/instances/{c}").json()["metadata"]
    assert info["status"] == "Stopped" and info["stateful"] is False

    r = d.api("PUT", "/1.0/instances", json={"state": {"action": "stop", "stateful": True}})
    assert r.status_code == 400 and "A stateful state change needs CRIU" in r.json()["error"]

    assert not set(criu.EXTENSIONS) & set(d.api("GET", "/1.0").json()["metadata"]["api_extensions"])


# -- the daemon's stateful paths, with the tools replaced -----------------------------------------
@pytest.fixture(scope="module")
def fake_daemon(tmp_path_factory):
    base = tmp_path_factory.mktemp("stateful")
    bindir = base / "bin"
    bindir.mkdir()
    write_tool(bindir, "criu", FAKE_CRIU)
    write_tool(bindir, "lxc-checkpoint", FAKE_CHECKPOINT)
    d = Daemon(lxd_dir=base / "var", conf_dir=base / "conf",
               extra_env={"PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_LOG": str(base / "argv.log"),
                          "FAKE_FAIL": str(base / "fail")})
    d.start()
    try:
        ensure_containers_ready(d)
        yield d, base
    finally:
        for line in d.lxc("list", "--format=csv", "-c", "n", check=False).stdout.split():
            d.lxc("delete", "-f", line, check=False)
        d.stop()
        release_host_state(d.lxd_dir)


def test_stateful_stop_then_start_restores(fake_daemon):
    d, base = fake_daemon
    log = base / "argv.log"
    c = f"{run_prefix()}-sf"
    d.lxc("launch", "busybox", c)
    state = d.lxd_dir / "containers" / c / "state"
    lxcpath = d.lxd_dir / "containers"
    conf = d.lxd_dir / "logs" / c / "lxc.conf"
    ckpt_log = d.lxd_dir / "logs" / c / "lxc-checkpoint.log"
    common = f"-n {c} -P {lxcpath} --rcfile={conf} -D {state} -v -o {ckpt_log} -l INFO"

    # a failed dump: an error with CRIU's words, the container still running, no state kept
    pid = init_pid(d, c)
    (base / "fail").touch()
    try:
        assert "Dumping FAILED" in fails(d, "stop", "--stateful", c)
    finally:
        (base / "fail").unlink()
    assert init_pid(d, c) == pid and not state.exists()
    assert d.api("GET", f"/1.0/instances/{c}").json()["metadata"]["stateful"] is False

    d.lxc("stop", "--stateful", c)
    assert log.read_text().splitlines()[-1] == f"{common} -s"
    info = d.api("GET", f"/1.0/instances/{c}").json()["metadata"]
    assert info["status"] == "Stopped" and info["stateful"] is True
    assert (state / "inventory.img").exists()

    d.lxc("start", c)  # the stock client asks for a stateful start of a stateful instance
    assert log.read_text().splitlines()[-1] == f"-r {common} -d"
    info = d.api("GET", f"/1.0/instances/{c}?recursion=1").json()["metadata"]
    assert info["status"] == "Running" and info["stateful"] is False and info["state"]["pid"] > 0
    assert not state.exists()  # the state is used once
    assert d.lxc("exec", c, "--", "true").returncode == 0

    # a failed restore: a clear error, the state kept for another try, nothing left running
    d.lxc("stop", "--stateful", c)
    (base / "fail").touch()
    try:
        err = fails(d, "start", c)
    finally:
        (base / "fail").unlink()
    assert "Failed to start the instance: restoring its saved state: lxc-checkpoint failed: " in err, err
    assert "Dumping FAILED" in err
    info = d.api("GET", f"/1.0/instances/{c}").json()["metadata"]
    assert info["status"] == "Stopped" and info["stateful"] is True and (state / "inventory.img").exists()

    # `start --stateless` of a stateful instance drops its state and boots
    n = len(log.read_text().splitlines())
    d.lxc("start", "--stateless", c)
    assert len(log.read_text().splitlines()) == n  # no restore
    info = d.api("GET", f"/1.0/instances/{c}").json()["metadata"]
    assert info["status"] == "Running" and info["stateful"] is False and not state.exists()
    d.lxc("delete", "-f", c)


def test_stateful_snapshot_then_restore(fake_daemon):
    d, base = fake_daemon
    log = base / "argv.log"
    c = f"{run_prefix()}-ss"
    d.lxc("launch", "busybox", c)
    state = d.lxd_dir / "containers" / c / "state"
    common = (f"-n {c} -P {d.lxd_dir / 'containers'} --rcfile={d.lxd_dir / 'logs' / c / 'lxc.conf'} -D {state} -v "
              f"-o {d.lxd_dir / 'logs' / c / 'lxc-checkpoint.log'} -l INFO")
    pid = init_pid(d, c)

    # a failed dump: CRIU's words, no snapshot, the container untouched, no state left
    (base / "fail").touch()
    try:
        assert "Dumping FAILED" in fails(d, "snapshot", "--stateful", c, "s1")
    finally:
        (base / "fail").unlink()
    assert d.api("GET", f"/1.0/instances/{c}/snapshots/s1").status_code == 404
    assert init_pid(d, c) == pid and not state.exists()

    d.lxc("snapshot", "--stateful", c, "s1")
    assert log.read_text().splitlines()[-1] == common  # a dump that leaves it running (no -s)
    assert init_pid(d, c) == pid  # still the same init
    assert not state.exists()  # the snapshot keeps the only copy
    assert (d.lxd_dir / "storage-pools" / "default" / "containers-snapshots" / c / "s1" / "state" / "inventory.img"
            ).read_text() == "fake\n"
    snap = d.api("GET", f"/1.0/instances/{c}/snapshots/s1").json()["metadata"]
    assert snap["stateful"] is True
    row = next(ln for ln in d.lxc("info", c).stdout.splitlines() if "| s1 " in ln)
    assert "YES" in row, row
    d.lxc("snapshot", c, "s0")
    assert d.api("GET", f"/1.0/instances/{c}/snapshots/s0").json()["metadata"]["stateful"] is False
    assert "Snapshot 's0' is stateless" in fails(d, "restore", "--stateful", c, "s0")
    assert init_pid(d, c) == pid

    # restore --stateful: the snapshot's volume (its state with it), then a start from that state
    d.lxc("exec", c, "--", "touch", "/after")
    d.lxc("restore", "--stateful", c, "s1")
    assert log.read_text().splitlines()[-1] == f"-r {common} -d"
    info = d.api("GET", f"/1.0/instances/{c}").json()["metadata"]
    assert info["status"] == "Running" and info["stateful"] is False and not state.exists()
    assert d.lxc("exec", c, "--", "test", "-e", "/after", check=False).returncode == 1  # the snapshot's files
    assert init_pid(d, c) != pid

    # a failed restore of the state: stopped and stateful, the state kept; `lxc start` tries again
    (base / "fail").touch()
    try:
        assert "restoring its saved state" in fails(d, "restore", "--stateful", c, "s1")
    finally:
        (base / "fail").unlink()
    info = d.api("GET", f"/1.0/instances/{c}").json()["metadata"]
    assert info["status"] == "Stopped" and info["stateful"] is True and (state / "inventory.img").exists()
    d.lxc("start", c)
    assert log.read_text().splitlines()[-1] == f"-r {common} -d"
    assert d.api("GET", f"/1.0/instances/{c}").json()["metadata"]["status"] == "Running" and not state.exists()

    # a stateless restore of the stateful snapshot: a plain restart, no saved state left behind
    n = len(log.read_text().splitlines())
    d.lxc("restore", c, "s1")
    assert len(log.read_text().splitlines()) == n
    info = d.api("GET", f"/1.0/instances/{c}").json()["metadata"]
    assert info["status"] == "Running" and info["stateful"] is False and not state.exists()
    d.lxc("delete", "-f", c)


def test_running_instance_moves_between_pools_statefully(fake_daemon):
    """`lxc move c -s POOL` of a running container (the client asks for a stateful move): a
    stateful stop, the move with its saved state, a restoring start on the new pool. Stateless,
    it must be stopped first (as LXD)."""
    d, base = fake_daemon
    log = base / "argv.log"
    c = f"{run_prefix()}-mp"
    pool = f"{run_prefix()}-p2"
    r = d.api("POST", "/1.0/storage-pools", json={"name": pool, "driver": "dir"})
    assert r.status_code == 201, r.text
    try:
        d.lxc("launch", "busybox", c)
        d.lxc("exec", c, "--", "sh", "-c", "echo kept > /marker")
        assert "Instance must be stopped to move between pools statelessly" in fails(
            d, "move", c, "-s", pool, "--stateless")
        n = len(log.read_text().splitlines()) if log.exists() else 0
        d.lxc("move", c, "-s", pool)
        lines = log.read_text().splitlines()[n:]
        assert lines[0].endswith(" -s") and lines[1].startswith("-r ") and len(lines) == 2, lines
        info = d.api("GET", f"/1.0/instances/{c}").json()["metadata"]
        assert info["status"] == "Running" and info["stateful"] is False
        assert info["expanded_devices"]["root"]["pool"] == pool
        assert d.lxc("exec", c, "--", "cat", "/marker").stdout.strip() == "kept"
        assert not (d.lxd_dir / "containers" / c / "state").exists()
    finally:
        d.lxc("delete", "-f", c, check=False)
        d.api("DELETE", f"/1.0/storage-pools/{pool}")


def test_running_move_between_pools_refused_without_criu(ready, names):
    if asyncio.run(criu.Probe().status()).usable:
        pytest.skip("CRIU works on this host: the refusal doesn't apply")
    d = ready
    c = names("mp")
    d.lxc("launch", "busybox", c)
    assert "Moving a running instance between pools needs CRIU" in fails(d, "move", c, "-s", "default")
    r = d.api("POST", f"/1.0/instances/{c}", json={"migration": True, "pool": "default", "live": True})
    assert r.status_code == 400 and "needs CRIU" in r.json()["error"], r.text
    assert d.api("GET", f"/1.0/instances/{c}").json()["metadata"]["status"] == "Running"
