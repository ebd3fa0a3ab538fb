"""The `lxd` command and the daemon's life: lock, socket, signals, crash safety, init, sql."""

from __future__ import annotations

import grp
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import yaml

from lxd_daemon import __version__
from tests.helpers import Daemon, run_prefix, socket_inode, wait_for

pytestmark = pytest.mark.integration


def lxd_cmd(d: Daemon, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lxd_daemon", *args], env=d.env, capture_output=True,
                          text=True, input=input, timeout=timeout)


def worker_pids(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]




def test_version():
    r = subprocess.run([sys.executable, "-m", "lxd_daemon", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == __version__


def test_group_owns_the_socket(fresh_daemon):
    try:
        group = grp.getgrnam("lxd")
    except KeyError:
        pytest.skip("no lxd group on this host")
    d = fresh_daemon.start("--group", "lxd")
    st = os.stat(d.socket)
    assert st.st_gid == group.gr_gid and stat.S_IMODE(st.st_mode) == 0o660


def test_unknown_group_is_a_clear_error(fresh_daemon):
    fresh_daemon.lxd_dir.mkdir(parents=True)
    r = lxd_cmd(fresh_daemon, "--group", "no-such-group-xyz")
    assert r.returncode == 1 and "no-such-group-xyz" in r.stderr


def test_something_listening_on_the_socket_path_is_refused(fresh_daemon):
    d = fresh_daemon
    d.lxd_dir.mkdir(parents=True)
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind(str(d.socket))
    squatter.listen(1)
    try:
        r = lxd_cmd(d, timeout=30)
        assert r.returncode == 1 and "already listening" in r.stderr
    finally:
        squatter.close()


def test_waitready_times_out_without_a_daemon(fresh_daemon):
    fresh_daemon.lxd_dir.mkdir(parents=True)
    t0 = time.monotonic()
    r = lxd_cmd(fresh_daemon, "waitready", "--timeout=1")
    took = time.monotonic() - t0
    assert r.returncode == 1 and "timeout" in r.stderr.lower()
    assert 0.9 < took < 10


def test_killed_worker_is_respawned_and_logged_to_monitor(fresh_daemon):
    import select

    d = fresh_daemon.start()
    mon = subprocess.Popen(["lxc", "monitor", "--type", "logging", "--format", "json"], env=d.env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        event = None
        deadline = time.monotonic() + 20
        while event is None and time.monotonic() < deadline:
            # The monitor subscribes asynchronously: kill workers until it reports one.
            before = worker_pids(d.proc.pid)
            os.kill(before[0], signal.SIGKILL)
            wait_for(lambda b=before: len(worker_pids(d.proc.pid)) == len(b)
                     and set(worker_pids(d.proc.pid)) != set(b), timeout=10)
            ready, _, _ = select.select([mon.stdout], [], [], 1.0)
            while ready and event is None:
                ev = json.loads(mon.stdout.readline())
                if "worker" in ev["metadata"]["message"]:
                    event = ev
                ready, _, _ = select.select([mon.stdout], [], [], 0.2)
        assert event is not None, "no logging event for the dead worker"
        assert event["type"] == "logging" and event["metadata"]["level"] == "warning"
    finally:
        mon.terminate()
        mon.wait(10)
    # The new workers serve: the daemon still answers and reaches liblxc.
    assert d.api("GET", "/1.0").status_code == 200
    assert d.lxc("info").returncode == 0


# -- a daemon of the test's own ----------------------------------------------------------------

def test_first_start_while_waitready_waits(fresh_daemon):
    d = fresh_daemon
    d.lxd_dir.mkdir(parents=True)
    waiter = subprocess.Popen([sys.executable, "-m", "lxd_daemon", "waitready", "--timeout=90"], env=d.env)
    try:
        time.sleep(0.3)
        assert waiter.poll() is None
        d.start(wait=False)
        assert waiter.wait(90) == 0
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    st = os.stat(d.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_uid == 0 and st.st_gid == 0
    assert stat.S_IMODE(os.stat(d.lxd_dir / "server.key").st_mode) == 0o600
    assert (d.lxd_dir / "server.crt").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert (d.lxd_dir / "database" / "lxd.db").exists()
    assert d.lxc("info").returncode == 0


def test_kill_9_keeps_committed_config_then_sigterm_cleans_up(fresh_daemon):
    d = fresh_daemon.start()
    d.lxc("config", "set", "images.auto_update_interval", "17")
    d.lxc("config", "set", "core.trust_password", "pw")
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    assert d.socket.exists()  # a stale socket: the next start must replace it
    d.start()
    assert d.lxc("config", "get", "images.auto_update_interval").stdout.strip() == "17"
    assert d.lxc("config", "get", "core.trust_password").stdout.strip() == "true"
    workers = worker_pids(d.proc.pid)
    assert d.stop(signal.SIGTERM) == 0
    assert not d.socket.exists()
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in workers), timeout=10)


def test_init_auto_then_lxd_shutdown_then_activateifneeded(fresh_daemon):
    d = fresh_daemon.start()
    r = lxd_cmd(d, "init", "--auto", "--storage-backend", "nonsense")
    assert r.returncode == 1 and "nonsense" in r.stderr
    storage = d.api("GET", "/1.0/storage-pools").status_code != 404
    r = lxd_cmd(d, "init", "--auto", "--storage-backend", "dir")
    if storage:
        assert r.returncode == 0, r.stderr
        assert d.api("GET", "/1.0/storage-pools/default").status_code == 200
        root = d.api("GET", "/1.0/profiles/default").json()["metadata"]["devices"]["root"]
        assert root == {"type": "disk", "path": "/", "pool": "default"}
    else:
        assert r.returncode == 1 and "does not support storage pools" in r.stderr
    r = lxd_cmd(d, "shutdown", "--timeout=60")
    assert r.returncode == 0, r.stderr
    assert d.proc.wait(10) == 0
    assert not d.socket.exists()
    r = lxd_cmd(d, "shutdown", "--timeout=5")
    assert r.returncode == 1 and "Error" in r.stderr
    # A daemon with no network listener and no autostart containers needs no waking at boot.
    r = lxd_cmd(d, "activateifneeded")
    assert r.returncode == 0, r.stderr
    assert not d.socket.exists()


def test_activateifneeded_without_a_database(fresh_daemon):
    fresh_daemon.lxd_dir.mkdir(parents=True)
    r = lxd_cmd(fresh_daemon, "activateifneeded")
    assert r.returncode == 0 and not fresh_daemon.socket.exists()


# -- the shared daemon -------------------------------------------------------------------------

def test_workers_hold_no_listening_socket(daemon):
    inode = socket_inode(daemon.socket)
    workers = worker_pids(daemon.proc.pid)
    assert len(workers) >= 1
    for pid in workers:
        assert "lxd_daemon.runtime.worker" in open(f"/proc/{pid}/cmdline").read()
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert f"socket:[{inode}]" not in links, f"worker {pid} holds the listening socket"
    links = [os.readlink(f"/proc/{daemon.proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{daemon.proc.pid}/fd")]
    assert f"socket:[{inode}]" in links


def test_second_daemon_refuses_with_a_clear_message(daemon):
    r = lxd_cmd(daemon, timeout=60)
    assert r.returncode == 1
    assert "already running" in r.stderr and str(daemon.lxd_dir) in r.stderr
    assert str(daemon.proc.pid) in r.stderr
    assert daemon.lxc("info").returncode == 0  # the first one still serves




def test_init_preseed_config_and_dump(daemon, restore_config):
    seed = {"config": {"images.auto_update_interval": "9", "core.trust_password": "init-pw"}}
    r = lxd_cmd(daemon, "init", "--preseed", input=yaml.safe_dump(seed))
    assert r.returncode == 0, r.stderr
    assert daemon.lxc("config", "get", "images.auto_update_interval").stdout.strip() == "9"
    assert daemon.lxc("config", "get", "core.trust_password").stdout.strip() == "true"
    dumped = yaml.safe_load(lxd_cmd(daemon, "init", "--dump").stdout)
    assert dumped["config"]["images.auto_update_interval"] == "9"
    assert "core.trust_password" not in dumped["config"]  # a hash is no use in a preseed
    for section in ("networks", "storage_pools", "profiles", "projects"):
        assert isinstance(dumped[section], list)
    assert any(p["name"] == "default" for p in dumped["projects"])
    # What --dump prints for the server config is a valid preseed for this daemon.
    r = lxd_cmd(daemon, "init", "--preseed", input=yaml.safe_dump({"config": dumped["config"]}))
    assert r.returncode == 0, r.stderr


def test_init_preseed_errors_are_clear(daemon, restore_config):
    r = lxd_cmd(daemon, "init", "--preseed", input="config: [unclosed\n")
    assert r.returncode == 1 and "parse" in r.stderr
    r = lxd_cmd(daemon, "init", "--preseed", input=yaml.safe_dump({"config": {"no.such.key": "1"}}))
    assert r.returncode == 1 and "no.such.key" in r.stderr
    r = lxd_cmd(daemon, "init", "--preseed", input=yaml.safe_dump({"whatever": {}}))
    assert r.returncode == 1 and "whatever" in r.stderr
    r = lxd_cmd(daemon, "init")
    assert r.returncode == 1 and "--preseed" in r.stderr


def test_init_preseed_storage_pools(daemon, tmp_path):
    """Either the endpoint exists and the section is applied, or the error says it is unsupported.
    (Preseed `networks:` makes bridges: tests/integration/test_networks_managed.py tests it inside
    a network namespace of its own, never on this host-namespace daemon.)"""
    prefix = run_prefix()
    src = tmp_path / "pool"
    src.mkdir()
    cases = (
        ("storage_pools", "/1.0/storage-pools",
         {"name": f"{prefix}p", "driver": "dir", "config": {"source": str(src)}}, "storage pools"),
    )
    for section, path, item, words in cases:
        exists = daemon.api("GET", path).status_code != 404
        # listed but not creatable yet (managed networks): the daemon says so with a 501
        creatable = exists and daemon.api("POST", path, json={}).status_code != 501
        r = lxd_cmd(daemon, "init", "--preseed", input=yaml.safe_dump({section: [item]}))
        try:
            if creatable:
                assert r.returncode == 0, r.stderr
                assert daemon.api("GET", f"{path}/{item['name']}").status_code == 200
            elif exists:
                assert r.returncode == 1
                assert "not implemented yet" in r.stderr, r.stderr
            else:
                assert r.returncode == 1
                assert f"does not support {words}" in r.stderr, r.stderr
        finally:
            if creatable:
                daemon.api("DELETE", f"{path}/{item['name']}")


def test_sql_global_and_local(daemon, restore_config):
    daemon.lxc("config", "set", "images.auto_update_interval", "3")
    for db in ("global", "local"):
        r = lxd_cmd(daemon, "sql", db, "SELECT key, value FROM config")
        assert r.returncode == 0, r.stderr
        assert "images.auto_update_interval" in r.stdout and "| 3 " in r.stdout
    r = lxd_cmd(daemon, "sql", "global", "SELECT key FROM config")
    assert r.stdout.splitlines()[1].split() == ["|", "key", "|"]
    r = lxd_cmd(daemon, "sql", "global", "SELECT nope FROM nowhere")
    assert r.returncode == 1 and "Error" in r.stderr
    r = lxd_cmd(daemon, "sql", "global", "-", input="SELECT name FROM projects")
    assert "default" in r.stdout
