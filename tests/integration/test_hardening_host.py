"""Host hardening (issue 8): host users kept out of container files (item 1), cgroup writes only
inside the container's own cgroup (item 5), running containers recognised from another network
namespace (item 9)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import ensure_containers_ready, init_pid, root_subids, run_prefix, wait_for

pytestmark = pytest.mark.integration

NOBODY = 65534

# Run as a plain host user: try to reach each path (stat, open, exec) and report the errno.
_PROBE = r"""
import errno, json, os, sys
out = {}
for p in json.loads(sys.argv[1]):
    try:
        os.stat(p)
        out[p] = "reachable"
    except OSError as e:
        out[p] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out))
"""


def as_user(uid: int, argv: list[str]) -> subprocess.CompletedProcess:
    """argv run by a process that is already `uid` (setpriv's own exec still has root's
    capabilities while it resolves the path, so the path walk must happen in the child)."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
                           "/bin/sh", "-c", 'exec "$@"', "sh", *argv], capture_output=True, text=True, timeout=60)


def probe(uid: int, paths: list[str]) -> dict[str, str]:
    """errno (or "reachable") of each path for host user `uid`. The pool's parent directories
    are made traversable first, as the daemon makes them (a concurrent pytest session resets
    /tmp/pytest-of-root to 0700), and a control path must be reachable: every EACCES reported
    comes from the modes under the pool, not from above it."""
    control = None
    for p in map(Path, paths):
        parts = p.parts
        if "storage-pools" in parts:
            control = Path(*parts[:parts.index("storage-pools") + 2]) / "containers"
            break
    if control is not None:
        for parent in [control, *control.parents]:
            st = os.stat(parent)
            if not st.st_mode & 0o001:
                os.chmod(parent, (st.st_mode & 0o7777) | 0o001)
        paths = [str(control), *paths]
    r = as_user(uid, ["/usr/bin/python3", "-c", _PROBE, json.dumps(paths)])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    if control is not None:
        assert out.pop(str(control)) == "reachable", f"control path {control} not reachable"
    return out


def mode_owner(p: Path) -> tuple[str, int]:
    st = os.stat(p)
    return oct(st.st_mode & 0o7777), st.st_uid


# ---------------------------------------------------------------------------------- item 1
def test_host_users_cannot_reach_into_any_container(ready, names):
    d = ready
    unpriv, priv, iso, stopped = names("u"), names("p"), names("i"), names("s")
    d.lxc("launch", "busybox", unpriv)
    d.lxc("launch", "busybox", priv, "-c", "security.privileged=true")
    d.lxc("launch", "busybox", iso, "-c", "security.idmap.isolated=true")
    d.lxc("init", "busybox", stopped)
    # The setuid scenario: a setuid-root copy of busybox made inside the privileged container.
    d.lxc("exec", priv, "--", "sh", "-c", "cp /bin/busybox /sbin/x && chmod 4755 /sbin/x")
    pool = d.lxd_dir / "storage-pools" / "default"
    suid = pool / "containers" / priv / "rootfs" / "sbin" / "x"
    assert os.stat(suid).st_mode & 0o4000 and os.stat(suid).st_uid == 0

    paths = [str(suid), str(d.lxd_dir / "containers" / priv / "rootfs" / "sbin" / "x")]
    for n in (unpriv, priv, iso, stopped):
        for base in (d.lxd_dir / "containers" / n, pool / "containers" / n):
            paths += [str(base / "rootfs"), str(base / "rootfs" / "bin" / "busybox"), str(base / "metadata.yaml")]
    images = pool / "images"
    # Image caches exist only on pools whose filesystem has reflinks (not this ext4); any there is
    # is probed too.
    caches = [images / fp / key for fp in os.listdir(images) for key in os.listdir(images / fp)]
    paths += [str(c / "rootfs" / "bin" / "busybox") for c in caches] + [str(images / "x")]
    got = probe(NOBODY, paths)
    assert set(got.values()) == {"EACCES"}, {p: e for p, e in got.items() if e != "EACCES"}

    # Calling the setuid binary by its host path: refused, so no root shell for host users.
    r = as_user(NOBODY, [str(suid), "id", "-u"])
    assert r.returncode == 126 and "Permission denied" in r.stderr and r.stdout.strip() != "0", r

    # Modes as LXD sets them: volumes 0100, root's while stopped, the container root's while running.
    base_uid = root_subids()[0]
    iso_uid = int(json.loads(d.api("GET", f"/1.0/instances/{iso}").json()["metadata"]["config"]
                             ["volatile.idmap.current"])[0]["Hostid"])
    assert mode_owner(pool / "containers" / unpriv) == ("0o100", base_uid)
    assert mode_owner(pool / "containers" / priv) == ("0o100", 0)
    assert mode_owner(pool / "containers" / iso) == ("0o100", iso_uid)
    assert mode_owner(pool / "containers" / stopped) == ("0o100", 0)
    assert oct(os.stat(pool / "images").st_mode & 0o777) == "0o700"
    for c in caches:
        assert oct(os.stat(c.parent).st_mode & 0o777) == "0o700"

    # Each container's root reaches its own root filesystem, not another's.
    assert probe(iso_uid, [str(pool / "containers" / iso / "rootfs" / "bin" / "busybox")]) == {
        str(pool / "containers" / iso / "rootfs" / "bin" / "busybox"): "reachable"}
    got = probe(iso_uid, [str(pool / "containers" / unpriv / "rootfs"), str(pool / "containers" / priv / "rootfs")])
    assert set(got.values()) == {"EACCES"}, got
    got = probe(base_uid, [str(pool / "containers" / iso / "rootfs")])
    assert set(got.values()) == {"EACCES"}, got

    # Everything still works: exec, file push/pull, restart, for each kind.
    for n in (unpriv, priv, iso):
        assert d.lxc("exec", n, "--", "id", "-u").stdout.strip() == "0"
        d.lxc("file", "push", "-", f"{n}/root/f", input="hello\n")
        assert d.lxc("file", "pull", f"{n}/root/f", "-").stdout == "hello\n"
        d.lxc("restart", n, "--force")
        assert d.lxc("exec", n, "--", "cat", "/root/f").stdout == "hello\n"
    d.lxc("start", stopped)
    assert mode_owner(pool / "containers" / stopped) == ("0o100", base_uid)
    d.lxc("stop", "-f", stopped)
    assert mode_owner(pool / "containers" / stopped) == ("0o100", 0)


def test_owner_follows_idmap_changes(ready, names):
    """privileged <-> unprivileged <-> isolated: the volume's owner is set again at each start."""
    d = ready
    c = names("flip")
    pool = d.lxd_dir / "storage-pools" / "default"
    d.lxc("launch", "busybox", c)
    assert mode_owner(pool / "containers" / c) == ("0o100", root_subids()[0])
    for key, value in (("security.privileged", "true"), ("security.privileged", ""),
                       ("security.idmap.isolated", "true"), ("security.idmap.isolated", "")):
        d.lxc("stop", "-f", c)
        d.lxc("config", "set", c, key, value) if value else d.lxc("config", "unset", c, key)
        d.lxc("start", c)
        cur = json.loads(d.api("GET", f"/1.0/instances/{c}").json()["metadata"]["config"]["volatile.idmap.current"])
        want = cur[0]["Hostid"] if cur else 0
        assert mode_owner(pool / "containers" / c) == ("0o100", want), (key, value)
        assert d.lxc("exec", c, "--", "ls", "/bin/busybox").stdout.strip() == "/bin/busybox"
        got = probe(NOBODY, [str(pool / "containers" / c / "rootfs")])
        assert set(got.values()) == {"EACCES"}


def test_start_up_fixes_modes_of_existing_trees(fresh_daemon):
    d = fresh_daemon.start()
    ensure_containers_ready(d)
    c = f"{run_prefix()}-old"
    try:
        d.lxc("init", "busybox", c)
        pool = d.lxd_dir / "storage-pools" / "default"
        d.stop()
        # The modes older versions left.
        os.chmod(pool / "containers" / c, 0o711)
        os.chmod(pool / "custom", 0o755)
        os.chmod(pool / "images", 0o711)
        for fp in os.listdir(pool / "images"):
            os.chmod(pool / "images" / fp, 0o755)
            for key in os.listdir(pool / "images" / fp):
                os.chmod(pool / "images" / fp / key, 0o711)
        assert probe(NOBODY, [str(pool / "containers" / c / "rootfs")])[str(pool / "containers" / c / "rootfs")] \
            == "reachable"
        d.start()
        assert mode_owner(pool / "containers" / c) == ("0o100", 0)
        assert oct(os.stat(pool / "images").st_mode & 0o777) == "0o700"
        assert oct(os.stat(pool / "custom").st_mode & 0o777) == "0o711"
        got = probe(NOBODY, [str(pool / "containers" / c / "rootfs"), str(d.lxd_dir / "containers" / c / "rootfs")]
                    + [str(pool / "images" / fp) for fp in os.listdir(pool / "images")])
        assert set(got.values()) == {"EACCES"}, got
        d.lxc("start", c)
        assert d.lxc("exec", c, "--", "true").returncode == 0
    finally:
        if d.proc is not None:
            d.lxc("delete", "-f", c, check=False)


# ---------------------------------------------------------------------------------- item 5
def _root_freezer_snapshot() -> dict:
    out = {}
    for p in ("/sys/fs/cgroup/freezer/freezer.state", "/sys/fs/cgroup/unified/cgroup.freeze",
              "/sys/fs/cgroup/cgroup.freeze"):
        try:
            out[p] = Path(p).read_text()
        except OSError as e:
            out[p] = e.errno
    return out


def test_freeze_racing_a_stop_stays_in_the_containers_cgroup(ready, names):
    """Freeze requests fired while init is being killed: each answer is a success or a clear
    "isn't running" (never an internal error), and nothing outside the container is frozen."""
    d = ready
    c = names("fz")
    d.lxc("launch", "busybox", c)
    before = _root_freezer_snapshot()
    bad: list = []
    ok_msgs = ("The instance isn't running", "The instance is already frozen", "The instance is not frozen",
               "The instance is already stopped")
    with d.http() as h:
        for i in range(6):
            if i:
                d.lxc("start", c)
            pid = init_pid(d, c)
            go = threading.Event()
            results: list = []

            def fire(action: str, go=go, results=results) -> None:
                go.wait()
                for _ in range(8):
                    try:
                        r = h.put(f"/1.0/instances/{c}/state", json={"action": action, "timeout": -1})
                        results.append((action, r.status_code, r.json()))
                        if r.status_code == 202:
                            op = h.get(f"{r.json()['operation']}/wait?timeout=30").json()["metadata"]
                            results.append((action, op["status_code"], op.get("err", "")))
                    except Exception as e:  # noqa: BLE001
                        results.append((action, "exc", repr(e)))

            ts = [threading.Thread(target=fire, args=(a,)) for a in ("freeze", "unfreeze")]
            for t in ts:
                t.start()
            go.set()
            if i % 2:
                os.kill(pid, signal.SIGKILL)  # init dies under the freezer
            else:
                h.put(f"/1.0/instances/{c}/state", json={"action": "stop", "force": True, "timeout": -1})
            for t in ts:
                t.join()
            for action, code, body in results:
                if code == "exc" or (isinstance(code, int) and code >= 500):
                    bad.append((action, code, body))
                elif isinstance(body, str) and body and not body.startswith(ok_msgs):
                    bad.append((action, code, body))
                elif isinstance(body, dict) and body.get("error") and not body["error"].startswith(ok_msgs):
                    bad.append((action, code, body))
            # The container may end frozen with a pending SIGKILL: a forced stop must still work.
            d.lxc("stop", "-f", c, check=False)
            wait_for(lambda: d.api("GET", f"/1.0/instances/{c}").json()["metadata"]["status"] == "Stopped", 20)
    assert not bad, bad
    assert _root_freezer_snapshot() == before
    assert "outside the container's cgroup" not in d.read_log()


# ---------------------------------------------------------------------------------- item 9
def _start_in_netns(d, wrap: list[str]) -> None:
    d.log = d.lxd_dir.parent / (d.lxd_dir.name + ".log")
    with open(d.log, "ab") as logf:
        d.proc = subprocess.Popen([*wrap, sys.executable, "-m", "lxd_daemon", "--debug"], env=d.env,
                                  stdout=logf, stderr=subprocess.STDOUT)
    d.waitready()


def _kill_by_monitor(lxcpath: Path, name: str) -> None:
    """Last-resort clean-up: SIGKILL the init of `name` found through its liblxc monitor."""
    want = f"[lxc monitor] {lxcpath} {name}"
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{e}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            if cmd != want:
                continue
            for task in os.listdir(f"/proc/{e}/task"):
                for child in Path(f"/proc/{e}/task/{task}/children").read_text().split():
                    os.kill(int(child), signal.SIGKILL)
        except OSError:
            continue


@pytest.mark.parametrize("how", ["ip-netns-exec", "nsenter-net"])
def test_running_container_seen_from_another_network_namespace(fresh_daemon, how):
    d = fresh_daemon.start()
    ensure_containers_ready(d)
    p = run_prefix()
    c, ns = f"{p}-ns", f"{p}-netns"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        d.lxc("launch", "busybox", c)
        d.lxc("init", "busybox", f"{c}2")
        pid = init_pid(d, c)
        assert d.stop(signal.SIGTERM) == 0  # containers keep running
        assert os.path.exists(f"/proc/{pid}")
        wrap = ["ip", "netns", "exec", ns] if how == "ip-netns-exec" else ["nsenter", f"--net=/run/netns/{ns}"]
        _start_in_netns(d, wrap)
        assert os.readlink(f"/proc/{d.proc.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        inst = d.api("GET", f"/1.0/instances/{c}").json()["metadata"]
        assert inst["status"] == "Running", inst["status"]
        assert init_pid(d, c) == pid
        assert "network namespace" in d.read_log() and c in d.read_log()
        r = d.lxc("start", c, check=False)
        assert r.returncode != 0 and "already running" in r.stderr, r.stderr
        r = d.lxc("delete", c, check=False)
        assert r.returncode != 0 and "running" in r.stderr, r.stderr
        assert (d.lxd_dir / "containers" / c / "rootfs" / "bin").exists()
        # No second copy was booted (at start-up's autostart either): one monitor, the same init.
        mons = [e for e in os.listdir("/proc") if e.isdigit() and _cmd(e) == f"[lxc monitor] {d.lxd_dir}/containers {c}"]
        assert len(mons) == 1, mons
        if how == "ip-netns-exec":
            # `ip netns exec` remounts /sys: no cgroup filesystem, so nothing is booted from here.
            r = d.lxc("start", f"{c}2", check=False)
            assert r.returncode != 0 and "cgroup filesystem" in r.stderr, r.stderr
        # A reboot inside (liblxc's monitor starts a new init) is followed without liblxc's socket.
        os.kill(pid, signal.SIGINT)  # this image's init: SIGINT means reboot (lxc-stop -r)
        wait_for(lambda: _status_pid(d, c)[0] == "Running" and _status_pid(d, c)[1] not in (pid, 0, -1), 30)
        pid = _status_pid(d, c)[1]
        assert open(f"/proc/{pid}/comm").read().strip() in ("init", "sh")
        # It is still managed: stopped through its init pid.
        d.lxc("stop", "-f", c)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _state(pid) == "Z", 20)
        assert d.api("GET", f"/1.0/instances/{c}").json()["metadata"]["status"] == "Stopped"
        d.stop()
        d.start()  # back in the original namespace
        d.lxc("delete", "-f", c)
        d.lxc("delete", "-f", f"{c}2")
    finally:
        if d.proc is not None:
            d.lxc("delete", "-f", c, check=False)
            d.lxc("delete", "-f", f"{c}2", check=False)
        _kill_by_monitor(d.lxd_dir / "containers", c)
        _kill_by_monitor(d.lxd_dir / "containers", f"{c}2")
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _status_pid(d, name: str) -> tuple[str, int]:
    st = d.api("GET", f"/1.0/instances/{name}/state").json()["metadata"]
    return st["status"], st["pid"]


def _cmd(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _state(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        return raw[raw.rindex(")") + 2]
    except OSError:
        return ""
