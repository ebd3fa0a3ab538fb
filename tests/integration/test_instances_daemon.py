"""Containers across daemon restarts, crashes, `lxd shutdown` and autostart (own daemons)."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from tests.helpers import ensure_containers_ready, init_pid, root_subids, run_prefix, wait_for, wait_op

pytestmark = pytest.mark.integration


def status(d, name):
    return d.api("GET", f"/1.0/instances/{name}").json()["metadata"]["status"]


def _kill_all(d, names):
    for n in names:
        d.lxc("delete", "-f", n, check=False)


def test_kill9_restart_keeps_containers_managed(fresh_daemon):
    d = fresh_daemon.start()
    ensure_containers_ready(d)
    p = run_prefix()
    a, b = f"{p}-a", f"{p}-b"
    try:
        d.lxc("launch", "busybox", a)
        d.lxc("launch", "busybox", b)
        pid_a = init_pid(d, a)
        d.stop(signal.SIGKILL)
        assert os.path.exists(f"/proc/{pid_a}")  # still running without the daemon
        d.start()
        assert status(d, a) == "Running" and init_pid(d, a) == pid_a
        assert status(d, b) == "Running"
        st = d.api("GET", f"/1.0/instances/{a}/state").json()["metadata"]
        assert st["processes"] >= 1 and st["memory"]["usage"] > 0
        d.lxc("stop", "-f", a)
        assert status(d, a) == "Stopped"
        assert not os.path.exists(f"/proc/{pid_a}") or _zombie_or_gone(pid_a)
        d.lxc("stop", b, "--timeout", "10")
        assert status(d, b) == "Stopped"
        d.lxc("start", a)
        assert status(d, a) == "Running"
        # SIGTERM leaves them running too.
        pid_a = init_pid(d, a)
        assert d.stop(signal.SIGTERM) == 0
        assert os.path.exists(f"/proc/{pid_a}")
        d.start()
        assert init_pid(d, a) == pid_a
    finally:
        if d.proc is not None:
            _kill_all(d, [a, b])


def _zombie_or_gone(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_shutdown_stops_then_autostart_in_priority_order(fresh_daemon):
    d = fresh_daemon.start()
    ensure_containers_ready(d)
    p = run_prefix()
    lo, hi, off = f"{p}-lo", f"{p}-hi", f"{p}-off"
    try:
        d.lxc("init", "busybox", lo, "-c", "boot.autostart=true", "-c", "boot.autostart.priority=1")
        d.lxc("init", "busybox", hi, "-c", "boot.autostart=true", "-c", "boot.autostart.priority=9")
        d.lxc("init", "busybox", off, "-c", "boot.autostart=false")
        d.lxc("start", lo, hi, off)
        pids = [init_pid(d, n) for n in (lo, hi, off)]
        r = d.lxd("shutdown", "--timeout", "60")
        assert r.returncode == 0
        d.proc.wait(60)
        d.proc = None
        for pid in pids:
            wait_for(lambda pid=pid: _zombie_or_gone(pid), timeout=10)
        d.start()
        wait_for(lambda: status(d, lo) == "Running" and status(d, hi) == "Running", timeout=20)
        assert status(d, off) == "Stopped"
        # Higher priority first: its container started earlier.
        started = {n: d.api("GET", f"/1.0/instances/{n}").json()["metadata"]["last_used_at"] for n in (lo, hi)}
        assert started[hi] <= started[lo]
    finally:
        if d.proc is not None:
            _kill_all(d, [lo, hi, off])


def test_half_created_instance_is_swept_at_startup(fresh_daemon):
    d = fresh_daemon.start()
    ensure_containers_ready(d)
    name = run_prefix() + "-half"
    d.stop()
    # What a crash between "row inserted" and "volume complete" leaves behind.
    vol = d.lxd_dir / "storage-pools/default/containers" / name
    vol.mkdir(parents=True)
    (vol / "rootfs").mkdir()
    trash = d.lxd_dir / "storage-pools/default/containers" / f".trash-{name}-x"
    trash.mkdir()
    import sqlite3
    con = sqlite3.connect(d.lxd_dir / "database/lxd.db")
    con.execute("INSERT INTO instances (name, created_at, pending) VALUES (?, '2026-01-01T00:00:00Z', 1)", (name,))
    iid = con.execute("SELECT id FROM instances WHERE name=?", (name,)).fetchone()[0]
    con.execute("INSERT INTO instances_config (instance_id, key, value) VALUES (?, 'user.x', '1')", (iid,))
    con.commit()
    con.close()
    d.start()
    assert d.api("GET", f"/1.0/instances/{name}").status_code == 404
    assert not vol.exists() and not trash.exists()
    con = sqlite3.connect(d.lxd_dir / "database/lxd.db")
    assert con.execute("SELECT count(*) FROM instances WHERE name=?", (name,)).fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM instances_config WHERE instance_id=?", (iid,)).fetchone()[0] == 0
    con.close()
    # The name is usable again.
    d.lxc("init", "busybox", name)
    d.lxc("delete", name)


def test_preseed_creates_pool_and_root_disk(fresh_daemon):
    d = fresh_daemon.start()
    seed = {
        "storage_pools": [{"name": "default", "driver": "dir", "config": {}}],
        "profiles": [{"name": "default", "devices": {"root": {"path": "/", "pool": "default", "type": "disk"}}}],
    }
    d.lxd("init", "--preseed", input=json.dumps(seed))
    prof = d.api("GET", "/1.0/profiles/default").json()["metadata"]
    assert prof["devices"]["root"] == {"path": "/", "pool": "default", "type": "disk"}
    pool = d.api("GET", "/1.0/storage-pools/default").json()["metadata"]
    assert pool["driver"] == "dir" and pool["config"]["source"].endswith("storage-pools/default")
    assert (d.lxd_dir / "storage-pools/default/containers").is_dir()
    # Running it again is harmless.
    d.lxd("init", "--preseed", input=json.dumps(seed))


def test_isolated_and_privileged_maps(fresh_daemon):
    d = fresh_daemon.start()
    ensure_containers_ready(d)
    p = run_prefix()
    iso, priv = f"{p}-iso", f"{p}-priv"
    try:
        d.lxc("init", "busybox", iso, "-c", "security.idmap.isolated=true")
        d.lxc("start", iso)
        m = open(f"/proc/{init_pid(d, iso)}/uid_map").read().split()
        assert m[0] == "0" and int(m[1]) > root_subids()[0] and m[2] == "65536", m
        st = os.stat(d.lxd_dir / "containers" / iso / "rootfs" / "bin" / "busybox")
        assert st.st_uid == int(m[1])
        d.lxc("launch", "busybox", priv, "-c", "security.privileged=true")
        m = open(f"/proc/{init_pid(d, priv)}/uid_map").read().split()
        assert m[:2] == ["0", "0"], m
        cfg = d.api("GET", f"/1.0/instances/{priv}").json()["metadata"]["config"]
        assert cfg["volatile.idmap.next"] == "[]"
        r = subprocess.run(["stat", "-c", "%u", str(d.lxd_dir / "containers" / priv / "rootfs/bin/busybox")],
                           capture_output=True, text=True)
        assert r.stdout.strip() == "0"
        # Switching a stopped container to privileged shifts its files back once.
        d.lxc("stop", "-f", iso)
        d.lxc("config", "set", iso, "security.privileged=true")
        d.lxc("config", "unset", iso, "security.idmap.isolated")
        op = wait_op(d, d.api("PUT", f"/1.0/instances/{iso}/state", json={"action": "start"}))
        assert op["status"] == "Success", op
        st = os.stat(d.lxd_dir / "containers" / iso / "rootfs" / "bin" / "busybox")
        assert st.st_uid == 0
    finally:
        _kill_all(d, [iso, priv])
