"""The systemd units (rendered by scripts/install-systemd.sh) and socket activation."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import LXC, REPO, socket_inode, wait_for

pytestmark = pytest.mark.integration

UNITS = ("lxd.socket", "lxd.service", "lxd-containers.service")


def render(dest) -> None:
    r = subprocess.run(["bash", str(REPO / "scripts" / "install-systemd.sh"), str(dest)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def read_unit(path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(path)
    return cp


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_rendered_units_pass_systemd_analyze_verify(tmp_path):
    render(tmp_path)
    for unit in UNITS:
        text = (tmp_path / unit).read_text()
        assert "@REPO@" not in text
    r = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / u) for u in UNITS)], capture_output=True,
                       text=True, timeout=120)
    ours = [line for line in r.stderr.splitlines() if any(u in line for u in UNITS)]
    assert r.returncode == 0 and not ours, r.stderr

    sock = read_unit(tmp_path / "lxd.socket")["Socket"]
    assert sock["ListenStream"] == "/var/lib/lxd/unix.socket"
    assert sock["SocketMode"] == "0660" and sock["SocketGroup"] == "lxd"
    assert sock["Service"] == "lxd.service"
    svc = read_unit(tmp_path / "lxd.service")
    assert svc["Service"]["KillMode"] == "process"  # a restart leaves the containers running
    assert "lxd.socket" in svc["Unit"]["Requires"]
    exec_start = svc["Service"]["ExecStart"].split()
    assert exec_start[0] == str(REPO / ".venv" / "bin" / "lxd") and os.access(exec_start[0], os.X_OK)
    assert "--group" in exec_start
    containers = read_unit(tmp_path / "lxd-containers.service")["Service"]
    assert containers["ExecStart"].endswith("lxd activateifneeded")
    assert "lxd shutdown" in containers["ExecStop"]


def test_verify_catches_a_broken_unit(tmp_path):
    """The check above has teeth: a unit whose daemon path does not exist fails verification."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    render(tmp_path)
    svc = tmp_path / "lxd.service"
    svc.write_text(svc.read_text().replace("/.venv/bin/lxd --group", "/.venv/bin/no-such-lxd --group"))
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "lxd.socket"), str(svc)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no-such-lxd" in r.stderr


def argv0(pid: int) -> str:
    return open(f"/proc/{pid}/cmdline").read().split("\0")[0]




@pytest.mark.skipif(not shutil.which("systemd-socket-activate"), reason="systemd-socket-activate is missing")
def test_socket_activation_hands_the_daemon_its_listening_socket(tmp_path):
    lxd_dir = tmp_path / "var"
    lxd_dir.mkdir()
    sock = lxd_dir / "unix.socket"
    env = {**os.environ, "LXD_DIR": str(lxd_dir), "LXD_CONF": str(tmp_path / "conf")}
    log = open(tmp_path / "daemon.log", "wb")
    # systemd-socket-activate binds and listens, then on the first connection execs the daemon
    # with the listening socket as fd 3 and LISTEN_FDS/LISTEN_PID set (as lxd.socket does).
    proc = subprocess.Popen(["systemd-socket-activate", "-l", str(sock), "--fdname=unix",
                             "-E", f"LXD_DIR={lxd_dir}", "-E", "PATH",
                             sys.executable, "-m", "lxd_daemon", "--debug"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(sock.exists, timeout=10)
        inode = socket_inode(sock)
        time.sleep(0.2)
        assert argv0(proc.pid).endswith("systemd-socket-activate")  # no daemon yet
        # The stock client's first request starts the daemon and is answered by it.
        r = subprocess.run([LXC, "info"], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr + (tmp_path / "daemon.log").read_text()
        assert "server: lxd" in r.stdout
        assert argv0(proc.pid) == sys.executable  # the activator exec'd the daemon
        assert f"server_pid: {proc.pid}" in r.stdout
        # The daemon serves the socket it was handed (same inode), and its workers do not hold it.
        assert socket_inode(sock) == inode
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert workers
        for pid in workers:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            assert f"socket:[{inode}]" not in links
            env_vars = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            assert not any(v.startswith(b"LISTEN_") for v in env_vars)
        # `lxd shutdown` stops it; the socket belongs to the activator, so the daemon leaves it.
        r = subprocess.run([sys.executable, "-m", "lxd_daemon", "shutdown", "--timeout=60"], env=env,
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stderr
        assert proc.wait(30) == 0
        assert sock.exists()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
