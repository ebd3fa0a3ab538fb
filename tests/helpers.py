"""Shared test helpers: a real daemon in a temporary LXD_DIR, driven by real clients."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
LXC = shutil.which("lxc") or "/usr/bin/lxc"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, which has python3-pylxd


def root_subids() -> tuple[int, int]:
    """The host uid and gid that container root maps to in the shared (default) map: the start of
    root's subordinate ranges, parsed from /etc/subuid and /etc/subgid by the daemon's own code
    (tests must not assume the range `scripts/install-deps.sh` writes)."""
    from lxd_daemon.instances.idmap import host_ranges

    (ub, _), (gb, _) = host_ranges()
    return ub, gb


def run_prefix() -> str:
    """A unique prefix for names this test run creates (containers, bridges, tables...)."""
    return "t" + uuid.uuid4().hex[:6]


@dataclass
class Daemon:
    lxd_dir: Path
    conf_dir: Path
    proc: subprocess.Popen | None = None
    log: Path | None = None
    extra_env: dict = field(default_factory=dict)
    # A tests.netns.NetNS to run the daemon in (network tests), or None: the host's namespace.
    netns: object = None
    # Run this daemon's clients (lxc(), lxc_argv()) inside `netns` too, so that they reach the
    # daemons' loopback TLS addresses there (the `tls_pair` fixture).
    clients_in_netns: bool = False

    @property
    def socket(self) -> Path:
        return self.lxd_dir / "unix.socket"

    @property
    def env(self) -> dict:
        env = dict(os.environ)
        env.update({"LXD_DIR": str(self.lxd_dir), "LXD_CONF": str(self.conf_dir)})
        env.update(self.extra_env)
        return env

    def start(self, *args: str, wait: bool = True) -> Daemon:
        self.log = self.lxd_dir.parent / (self.lxd_dir.name + ".log")
        with open(self.log, "ab") as logf:
            prefix = self.netns.prefix() if self.netns is not None else []
            self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "lxd_daemon", "--debug", *args],
                                         env=self.env, stdout=logf, stderr=subprocess.STDOUT)
        if wait:
            self.waitready()
        return self

    def waitready(self, timeout: int = 30) -> None:
        r = subprocess.run([sys.executable, "-m", "lxd_daemon", "waitready", f"--timeout={timeout}"],
                           env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"daemon not ready: {r.stderr}\n{self.read_log()}")

    def read_log(self) -> str:
        return self.log.read_text() if self.log and self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def lxc_argv(self, *args: str) -> list[str]:
        """The command line of `lxc ARGS` as lxc() runs it (inside the netns if clients_in_netns)."""
        if self.clients_in_netns and self.netns is not None:
            return ["nsenter", f"--net={self.netns.path}", LXC, *args]
        return [LXC, *args]

    def lxc(self, *args: str, check: bool = True, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run(self.lxc_argv(*args), env=self.env, capture_output=True, text=True, input=input,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"lxc {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    def lxd(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "lxd_daemon", *args], env=self.env, capture_output=True,
                           text=True, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"lxd {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    def curl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["curl", "-s", "--unix-socket", str(self.socket), *args], capture_output=True,
                              text=True, timeout=60)

    def http(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://lxd",
                            timeout=timeout)

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        with self.http() as c:
            return c.request(method, path, **kw)

    def pylxd(self, code: str) -> subprocess.CompletedProcess:
        """Run a pylxd snippet under Debian's python3 (python3-pylxd); `client` is connected."""
        prelude = "import pylxd, json\nclient = pylxd.Client()\n"  # finds $LXD_DIR/unix.socket
        return subprocess.run([SYSTEM_PYTHON, "-c", prelude + code], capture_output=True, text=True,
                              timeout=300, env=self.env)


def envelope_ok(doc: dict) -> None:
    for key in ("type", "status", "status_code", "operation", "error_code", "error", "metadata"):
        assert key in doc, f"missing envelope key {key}: {json.dumps(doc)[:200]}"


def socket_inode(path) -> int:
    """The inode of the unix socket listening on path (from /proc/net/unix)."""
    with open("/proc/net/unix") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == str(path):
                return int(parts[6])
    raise AssertionError(f"{path} is not a listening socket")


def wait_for(cond, timeout: float = 10, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError("condition not met in time")


# -- containers (instances work) ------------------------------------------------------------
_BUSYBOX_TARBALL: dict[str, Path] = {}


def busybox_tarball() -> Path:
    """The busybox test image, built once per test process (and removed when it exits)."""
    if "path" not in _BUSYBOX_TARBALL:
        import atexit
        import shutil
        import tempfile

        from lxd_daemon.imagebuilder.busybox import build_busybox

        out = Path(tempfile.mkdtemp(prefix="busybox-img-"))
        atexit.register(shutil.rmtree, out, True)
        res = build_busybox(out, fmt="unified", compression="gzip")
        _BUSYBOX_TARBALL["path"] = Path(res.paths[0])
    return _BUSYBOX_TARBALL["path"]


def ensure_containers_ready(d: Daemon, alias: str = "busybox") -> str:
    """`lxd init --auto` (dir pool `default`, root disk in the default profile) and the busybox
    image under `alias`, each only if missing. Returns the alias."""
    if d.api("GET", "/1.0/storage-pools/default").status_code == 404:
        d.lxd("init", "--auto")
    if d.api("GET", f"/1.0/images/aliases/{alias}").status_code == 404:
        r = d.lxc("image", "import", str(busybox_tarball()), "--alias", alias, check=False)
        if r.returncode != 0 and "already exists" not in (r.stderr + r.stdout):
            raise AssertionError(f"image import failed: {r.stderr}{r.stdout}")
    return alias


def wait_op(d: Daemon, resp: httpx.Response, timeout: int = 60) -> dict:
    """Wait for the operation of an async response; returns the final operation."""
    body = resp.json()
    assert body["type"] == "async", body
    w = d.api("GET", f"{body['operation']}/wait?timeout={timeout}").json()
    return w["metadata"]


def init_pid(d: Daemon, name: str) -> int:
    return d.api("GET", f"/1.0/instances/{name}/state").json()["metadata"]["pid"]


# -- raw containers: lxd_daemon.instances.lxcconf rendered, run by python-lxc in a subprocess ----

VENV_PYTHON = str(REPO / ".venv" / "bin" / "python")

_LXC_SCRIPT = r"""
import json, sys, lxc
op, name, lxcpath, conf = sys.argv[1:5]
c = lxc.Container(name, lxcpath)
if conf:
    c.load_config(conf)
if op == "start":
    ok = c.start()
    if ok:
        ok = c.wait("RUNNING", 10)
elif op == "stop":
    ok = c.stop() if c.running else True
    ok = ok and c.wait("STOPPED", 10)
else:
    ok = True
print(json.dumps({"ok": bool(ok), "state": c.state, "pid": c.init_pid}))
"""


class RawContainer:
    """A busybox container whose LXC config comes from lxd_daemon.instances.lxcconf.render(),
    started and stopped by python-lxc in a subprocess (never in the pytest process)."""

    def __init__(self, base: Path, name: str, *, config: dict | None = None, devices: dict | None = None,
                 privileged: bool = False, rootfs_idmapped: bool = False):
        from lxd_daemon.instances.idmap import IdmapSet, default_set

        self.base = Path(base)
        self.name = name
        self.lxcpath = self.base / "containers"
        self.rootfs = self.lxcpath / name / "rootfs"
        self.logs = self.base / "logs" / name
        self.conf_path = self.logs / "lxc.conf"
        self.config = dict(config or {})
        self.devices = dict(devices or {})
        self.privileged = privileged
        self.rootfs_idmapped = rootfs_idmapped
        self.idmap = IdmapSet(()) if privileged else default_set()
        self.pid = -1

    @property
    def root_ids(self) -> tuple[int, int]:
        return self.idmap.root_ids()

    def build(self) -> None:
        from lxd_daemon.imagebuilder.busybox import make_rootfs

        self.rootfs.mkdir(parents=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        make_rootfs(self.rootfs)
        uid, gid = (0, 0) if (self.privileged or self.rootfs_idmapped) else self.root_ids
        if uid or gid:
            for dirpath, dirnames, filenames in os.walk(self.rootfs):
                for n in dirnames + filenames:
                    os.lchown(os.path.join(dirpath, n), uid, gid)
            os.lchown(self.rootfs, uid, gid)

    def spec(self):
        from lxd_daemon.instances.lxcconf import LxcSpec

        return LxcSpec(name=self.name, lxcpath=self.lxcpath, rootfs=self.rootfs,
                       log_file=self.logs / "lxc.log", console_log=self.logs / "console.log",
                       hostname=self.name, expanded_config=self.config, expanded_devices=self.devices,
                       idmap=self.idmap, privileged=self.privileged, rootfs_idmapped=self.rootfs_idmapped)

    def render(self) -> str:
        from lxd_daemon.instances.lxcconf import render, to_text

        text = to_text(render(self.spec()))
        self.conf_path.write_text(text)
        return text

    def _lxc(self, op: str) -> dict:
        r = subprocess.run([VENV_PYTHON, "-c", _LXC_SCRIPT, op, self.name, str(self.lxcpath),
                            str(self.conf_path) if self.conf_path.exists() else ""],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise AssertionError(f"python-lxc {op} failed: {r.stderr}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def start(self) -> int:
        if not self.conf_path.exists():
            self.render()
        res = self._lxc("start")
        if not res["ok"] or res["state"] != "RUNNING":
            log = (self.logs / "lxc.log").read_text() if (self.logs / "lxc.log").exists() else ""
            raise AssertionError(f"container {self.name} didn't start: {res}\n{log}")
        self.pid = res["pid"]
        return self.pid

    def state(self) -> str:
        return self._lxc("state")["state"]

    def attach(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["lxc-attach", "-P", str(self.lxcpath), "-n", self.name, "--clear-env", "--", *cmd],
                           capture_output=True, text=True, timeout=30)
        if check and r.returncode != 0:
            raise AssertionError(f"lxc-attach {cmd} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    def stop(self) -> None:
        res = self._lxc("stop")
        if res["state"] != "STOPPED":
            subprocess.run(["lxc-stop", "-P", str(self.lxcpath), "-n", self.name, "-k"], capture_output=True)
        self.pid = -1

    def cleanup(self) -> None:
        try:
            if self.lxcpath.exists() and self.state() != "STOPPED":
                self.stop()
        finally:
            rmdir_cgroups(self.name)
            shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def started_raw_container(tag: str, **kw) -> Iterator[RawContainer]:
    """A RawContainer built and started in a temporary directory; removed with it afterwards."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
    base.chmod(0o711)  # the container's root must be able to reach its rootfs
    c = RawContainer(base / "c", f"{run_prefix()}-{tag}", **kw)
    try:
        c.build()
        c.start()
        yield c
    finally:
        c.cleanup()
        shutil.rmtree(base, ignore_errors=True)


class LiveWorker:
    """One liblxc worker (a subprocess) and an event loop, to apply live updates from a test."""

    def __init__(self):
        import asyncio

        from lxd_daemon.runtime.pool import WorkerPool

        self.loop = asyncio.new_event_loop()
        self.pool = WorkerPool(1)
        self.pool.spawn()
        self.pool.attach(self.loop)

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.pool.close()
        self.loop.close()


def rmdir_cgroups(name: str) -> None:
    """Remove the empty lxc.monitor.<name>* / lxc.payload.<name>* cgroups liblxc leaves behind."""
    for root in Path("/sys/fs/cgroup").iterdir():
        for pattern in (f"lxc.monitor.{name}", f"lxc.payload.{name}"):
            for cg in list(root.glob(pattern)) + list(root.glob(pattern + "-*")):
                for sub in sorted(cg.rglob("*"), key=lambda p: -len(p.parts)):
                    if sub.is_dir():
                        try:
                            sub.rmdir()
                        except OSError:
                            pass
                try:
                    cg.rmdir()
                except OSError:
                    pass


def cgroup_file(pid: int, controller_file: str) -> str:
    """Read a cgroup file (e.g. "memory.limit_in_bytes") of process pid from the host."""
    from lxd_daemon.runtime.hotplug import cgroup_dirs

    name = re.search(r"/lxc\.payload\.([^/\n]+?)(?:-\d+)?(?:/|$)", Path(f"/proc/{pid}/cgroup").read_text(), re.M)[1]
    v1, v2 = cgroup_dirs(pid, name)
    base = v1.get(controller_file.split(".", 1)[0]) or v2
    return Path(base, controller_file).read_text().strip()


class PtyProcess:
    """A command run on a new pty that is its controlling terminal, as at a real terminal."""

    def __init__(self, args: list[str], env: dict, size: tuple[int, int] = (24, 80)):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.out = b""

    def pump(self, seconds: float) -> None:
        """Collect output for `seconds` (less if the terminal closes)."""

        end = time.monotonic() + seconds
        while time.monotonic() < end:
            r, _, _ = select.select([self.master], [], [], 0.05)
            if r:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                self.out += chunk

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc.send_signal(28)  # SIGWINCH, as a terminal emulator does

    def finish(self, timeout: float, tail: float = 0.0) -> int:
        """Wait up to `timeout` for the command to exit, reading its output; its exit code."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.pump(0.1)
        if tail:
            self.pump(tail)
        return self.proc.wait(timeout=1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def release_host_state(base: Path) -> None:
    """Unmount what is mounted under `base` (deepest first) and detach loop devices whose backing
    file is under it: what a daemon of a failed test may leave (a btrfs pool on a loop file)."""
    import subprocess

    base = str(Path(base).resolve())
    with open("/proc/self/mountinfo") as f:
        points = [ln.split()[4].encode().decode("unicode_escape") for ln in f]
    for mp in sorted({p for p in points if p == base or p.startswith(base + "/")}, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)
    out = subprocess.run(["losetup", "-n", "-O", "NAME,BACK-FILE", "-l"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(base + "/"):
            subprocess.run(["losetup", "-d", parts[0]], capture_output=True)


BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench"


def lxd502_setup(tmp_path_factory, tag: str):
    """(scripts/bench/daemons.py, a work directory for it) to run Debian's LXD 5.0.2 in an interop
    test: the benchmark's daemons module starts it in a network namespace and cleans up after it.
    Skips the test when LXD 5.0.2 is not installed."""
    import tempfile

    import pytest

    sys.path.insert(0, str(BENCH))
    try:
        import daemons
    finally:
        sys.path.remove(str(BENCH))
    if not daemons.DEBIAN_LXD.exists():
        pytest.skip("Debian's lxd (5.0.2) is not installed")
    base = tmp_path_factory.mktemp(tag)
    os.chmod(base, 0o755)  # LXD's unprivileged containers traverse it
    wd = Path(tempfile.mkdtemp(prefix="lxdbench-", dir=base))
    os.chmod(wd, 0o755)
    return daemons, wd


def bare_services():
    """Services with only the projects (the `default` one), for an app (app.create_app) whose
    requests go no further than their checks: every request resolves its project after the
    access check."""
    from types import SimpleNamespace

    from lxd_daemon.projects.service import Project, ProjectService

    projects = ProjectService(None)
    projects.projects["default"] = Project(1, "default")
    return SimpleNamespace(projects=projects)


def api_ok(d: Daemon, method: str, path: str, **kw):
    """A request that must succeed: its metadata, or for an operation, the finished operation."""
    r = d.api(method, path, **kw)
    assert r.status_code in (200, 201, 202), f"{method} {path}: {r.status_code} {r.text}"
    body = r.json()
    if body.get("type") == "async":
        op = wait_op(d, r)
        assert op["status"] == "Success", op
        return op
    return body["metadata"]


def module_daemon(tmp_path_factory, tag: str) -> Iterator[Daemon]:
    """A daemon of a test module's own, ready for containers (`yield from` it in a fixture)."""
    base = tmp_path_factory.mktemp(tag)
    dm = Daemon(lxd_dir=base / "var", conf_dir=base / "conf")
    dm.start()
    try:
        ensure_containers_ready(dm)
        yield dm
    finally:
        dm.lxc("project", "switch", "default", check=False)
        dm.stop()
        release_host_state(dm.lxd_dir)


def btrfs_pool_of(d: Daemon, name: str, size: str) -> Iterator[str]:
    """A btrfs pool (on a loop file of `size`) of daemon `d` for a fixture (`yield from` it); what
    is left on it (instances, custom volumes) goes with it. Skips where btrfs can't run."""
    drivers = {x["Name"] for x in d.api("GET", "/1.0").json()["metadata"]["environment"]["storage_supported_drivers"]}
    if "btrfs" not in drivers:
        pytest.skip("btrfs can't run on this host")
    r = d.api("POST", "/1.0/storage-pools", json={"name": name, "driver": "btrfs", "config": {"size": size}})
    assert r.status_code == 201, r.text
    yield name
    for inst in d.api("GET", "/1.0/instances?recursion=1").json()["metadata"] or []:
        if inst["expanded_devices"].get("root", {}).get("pool") == name:
            d.lxc("delete", "-f", inst["name"], check=False)
    for v in d.api("GET", f"/1.0/storage-pools/{name}/volumes/custom").json().get("metadata") or []:
        d.lxc("storage", "volume", "delete", name, v.rsplit("/", 1)[-1], check=False)
    r = d.api("DELETE", f"/1.0/storage-pools/{name}")
    assert r.status_code == 200, r.text


# -- stand-in tools (CRIU can't run on the development machine) ----------------------------------
# A `criu` that passes the daemon's probe, dirty-page tracking included (tests/integration/
# test_stateful.py and test_migration_live.py pair it with a stand-in `lxc-checkpoint`).
FAKE_CRIU = """#!/bin/sh
case "$*" in
  --version) echo "Version: 3.17.1" ;;
esac
exit 0
"""


def write_tool(directory: Path, name: str, text: str) -> Path:
    """An executable script `name` in `directory` (to put first on a daemon's PATH)."""
    p = directory / name
    p.write_text(text)
    p.chmod(0o755)
    return p
