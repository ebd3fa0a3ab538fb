"""Start, initialise, stop and clean up the two daemons under test.

Both run in a network namespace of their own (scripts/netns-exec --new: loopback up, a sysfs of
that namespace, the host's cgroup tree): LXD 5.0.2 looks up internet hosts at start-up, and running ours the same way keeps the conditions equal. Each gets a
temporary LXD_DIR (and LXD_CONF for the `lxc` client) inside the run's work directory, whose name
carries the run's unique prefix. Everything a run leaves behind is found again from that work
directory and its state file (state.json), so `cleanup(workdir)` also works from another process
after a crash (run.sh calls it from its EXIT trap).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import UnixHTTP

REPO = Path(__file__).resolve().parents[2]
OUR_LXD = REPO / ".venv" / "bin" / "lxd"
DEBIAN_LXD = Path("/usr/bin/lxd")
LXC = shutil.which("lxc") or "/usr/bin/lxc"
STATE = "state.json"


@dataclass
class Daemon:
    key: str  # "ours" or "lxd"
    label: str
    binary: Path
    workdir: Path
    prefix: str
    pid: int | None = None
    version: str = ""
    notes: list[str] = field(default_factory=list)
    # a network namespace to join (/proc/PID/ns/net of another daemon: the remote suite's second
    # daemon of a kind); "" for a new one of its own
    netns: str = ""

    @property
    def lxd_dir(self) -> Path:
        return self.workdir / f"{self.key}-var"

    @property
    def conf_dir(self) -> Path:
        return self.workdir / f"{self.key}-conf"

    @property
    def socket(self) -> Path:
        return self.lxd_dir / "unix.socket"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.key}.log"

    @property
    def env(self) -> dict:
        env = dict(os.environ)
        env.update({"LXD_DIR": str(self.lxd_dir), "LXD_CONF": str(self.conf_dir)})
        return env

    def http(self) -> UnixHTTP:
        return UnixHTTP(self.socket)

    # -- lifecycle ---------------------------------------------------------------
    def own_filesystem(self, size_gib: int) -> None:
        """Give LXD_DIR a fresh ext4 filesystem of its own (with a journal), on a sparse loop file
        in the work directory: see `needs_own_filesystem`. cleanup() unmounts and detaches it."""
        img = self.workdir / f"{self.key}-var.img"
        with open(img, "wb") as f:
            f.truncate(size_gib << 30)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(img)],
                       check=True, capture_output=True, timeout=300)
        self.lxd_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        loop = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(img)], check=True,
                              capture_output=True, text=True, timeout=60).stdout.strip()
        r = subprocess.run(["mount", "-t", "ext4", loop, str(self.lxd_dir)], capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            subprocess.run(["losetup", "-d", loop], stderr=subprocess.DEVNULL)
            raise RuntimeError(f"mounting {img}: {r.stderr.strip()}")
        subprocess.run(["losetup", "-d", loop], stderr=subprocess.DEVNULL)  # autoclear: freed at umount
        self.notes.append(f"LXD_DIR on its own ext4 ({size_gib} GiB loop file, journal)")

    def start(self, timeout: int = 90) -> None:
        self.lxd_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        os.chmod(self.lxd_dir, 0o711)
        self.conf_dir.mkdir(mode=0o700, exist_ok=True)
        # A network namespace of its own with a sysfs of its own (scripts/netns-exec: daemons look
        # at /sys/class/net for their bridges); LXD_DIR is made a shared mount first so that the
        # pools the daemon mounts there show in ours (du). netns-exec execs: the pid we get is the
        # daemon's own pid.
        if not os.path.ismount(self.lxd_dir):
            subprocess.run(["mount", "--bind", str(self.lxd_dir), str(self.lxd_dir)], check=True, timeout=60)
        subprocess.run(["mount", "--make-shared", str(self.lxd_dir)], check=True, timeout=60)
        with open(self.log, "ab") as logf:
            proc = subprocess.Popen(["/usr/bin/python3", str(REPO / "scripts" / "netns-exec"),
                                     self.netns or "--new", "--", str(self.binary), "--logfile", str(self.log)],
                                    env=self.env, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.pid = proc.pid
        self._proc = proc
        record_state(self.workdir, self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited at start-up ({proc.returncode}):\n{self.tail_log()}")
            if self.socket.exists():
                try:
                    with self.http() as c:
                        r = c.request("GET", "/1.0")
                    if r.status == 200 and r.json().get("metadata", {}).get("api_status"):
                        self.version = r.json()["metadata"].get("environment", {}).get("server_version", "")
                        break
                except (OSError, ValueError):
                    pass
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{self.label} did not answer in {timeout}s:\n{self.tail_log()}")
        # The process really is the daemon (not a shell left in between)?
        exe = os.readlink(f"/proc/{self.pid}/exe")
        if "unshare" in exe or exe.endswith("/sh") or exe.endswith("/dash"):
            raise RuntimeError(f"unexpected process for {self.label}: {exe}")

    def tail_log(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.pid is not None and self._proc.poll() is None

    def stop(self, timeout: float = 60) -> None:
        """Stop the daemon (containers should already be gone): `shutdown`, then TERM, then KILL."""
        if self.pid is None or self._proc.poll() is not None:
            return
        subprocess.run([str(self.binary), "shutdown", f"--timeout={int(timeout)}"], env=self.env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout + 15)
        for sig, wait in ((None, 10), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            if sig is not None and self._proc.poll() is None:
                self._proc.send_signal(sig)
            try:
                self._proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue

    # -- initialisation -------------------------------------------------------------
    def preseed(self, pool: str) -> None:
        """A `dir` pool and a root disk in the default profile (no networks)."""
        seed = (f"storage_pools:\n- name: {pool}\n  driver: dir\n"
                f"profiles:\n- name: default\n  devices:\n    root:\n      path: /\n      pool: {pool}\n"
                f"      type: disk\n")
        r = subprocess.run([str(self.binary), "init", "--preseed"], input=seed, text=True, env=self.env,
                           capture_output=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{self.label}: lxd init --preseed failed: {(r.stderr or r.stdout).strip()}")

    def lxc(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run([LXC, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{self.label}: lxc {' '.join(args)} failed: {(r.stderr or r.stdout).strip()}")
        return r


# -- state file and cleanup ----------------------------------------------------------
def needs_own_filesystem(path: Path) -> str:
    """Why the daemons' LXD_DIRs should get filesystems of their own, or "" when not.

    On ext4 without a journal (some VM images), the kernel's inode allocator skips inodes freed in
    the last 60-360 s and pays for every one it skips (ext4 `recently_deleted()`, only used without
    a journal): creating a tree of a few thousand files right after deleting others then takes
    seconds instead of a fraction of one, for whichever daemon comes next. That measures the
    other daemon's deletes, not the daemon under test, so each daemon gets a journaled ext4 of
    its own, as ext4 is on ordinary hosts."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            rows = [ln.split() for ln in f]
    except OSError:
        return ""
    for row in rows:
        sep = row.index("-")
        if row[2] == dev and row[sep + 1] == "ext4":
            name = os.path.basename(row[sep + 2])
            if not any(j.startswith(f"{name}-") for j in _listdir("/proc/fs/jbd2")):
                return f"{row[sep + 2]} is ext4 without a journal"
    return ""


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def record_state(workdir: Path, d: Daemon) -> None:
    path = workdir / STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        state = {"daemons": []}
    state["daemons"] = [x for x in state["daemons"] if x["key"] != d.key]
    state["daemons"].append({"key": d.key, "pid": d.pid, "lxd_dir": str(d.lxd_dir), "prefix": d.prefix})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _environ_has(pid: int, needle: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle.encode() in f.read()
    except OSError:
        return False


def _root_under(pid: int, base: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/root").startswith(base + "/")
    except OSError:
        return False


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def cleanup(workdir: Path, log=print) -> None:
    """Remove everything the run made: daemons, their helpers and containers, mounts, cgroups, files.

    Every process is matched to this run before it is signalled: the recorded daemon pids must still
    carry this run's LXD_DIR in their environment, helpers must name the work directory on their
    command line, container processes must have their root inside it.
    """
    workdir = Path(workdir).resolve()
    base = str(workdir)
    if not workdir.is_dir() or not workdir.name.startswith("lxdbench-"):
        return
    try:
        state = json.loads((workdir / STATE).read_text())
    except (OSError, ValueError):
        state = {"daemons": []}
    me = {os.getpid()}
    pid = os.getppid()
    while pid > 1:  # never our own ancestors (run.sh, the harness)
        me.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                st = f.read()
            pid = int(st[st.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError):
            break
    # 1. the daemons we started, if still running
    for d in state.get("daemons", []):
        pid = d.get("pid")
        if pid and _environ_has(pid, f"LXD_DIR={d['lxd_dir']}"):
            log(f"cleanup: stopping {d['key']} daemon (pid {pid})")
            _kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not os.path.exists(f"/proc/{pid}") or _cmdline(pid) == "":
                    break
                time.sleep(0.05)
            else:
                _kill(pid)
    # 2. container payloads (root inside our work dir) and helpers naming the work dir
    for _ in range(3):
        victims = [p for p in _pids() if p not in me and (_root_under(p, base) or base in _cmdline(p))]
        if not victims:
            break
        for p in victims:
            log(f"cleanup: killing leftover pid {p}: {_cmdline(p)[:100]}")
            _kill(p)
        time.sleep(0.3)
    # 3. mounts under the work dir, deepest first
    mounts = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].encode().decode("unicode_escape")
                if mp == base or mp.startswith(base + "/"):
                    mounts.append(mp)
    except OSError:
        pass
    for mp in sorted(mounts, key=len, reverse=True):  # twice where two are stacked (LXD_DIR)
        log(f"cleanup: unmounting {mp}")
        subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)
    # 3b. loop devices backed by files in the work dir (the storage suite's btrfs pools)
    try:
        out = subprocess.run(["losetup", "-n", "-O", "NAME,BACK-FILE", "-l"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(base + "/"):
            log(f"cleanup: detaching {parts[0]} ({parts[1].strip()})")
            subprocess.run(["losetup", "-d", parts[0]], stderr=subprocess.DEVNULL)
    # 4. empty cgroups named after our containers (liblxc: lxc.payload.NAME, lxc.monitor.NAME)
    prefixes = {d.get("prefix") for d in state.get("daemons", []) if d.get("prefix")}
    for prefix in prefixes:
        for root, dirs, _files in os.walk("/sys/fs/cgroup"):
            for name in dirs:
                if prefix in name and (name.startswith("lxc.payload.") or name.startswith("lxc.monitor.")
                                       or name.startswith(prefix)):
                    path = os.path.join(root, name)
                    for sub, _d, _f in sorted(os.walk(path), key=lambda t: len(t[0]), reverse=True):
                        try:
                            os.rmdir(sub)
                        except OSError:
                            pass
    # 5. the files
    subprocess.run(["rm", "-rf", "--one-file-system", base], stderr=subprocess.DEVNULL)
    if workdir.exists():
        log(f"cleanup: could not remove all of {base}")


if __name__ == "__main__":
    # run.sh's EXIT trap: the work directory comes in the environment, never on a command line
    # (step 2 above matches command lines against it).
    if os.environ.get("LXDBENCH_WORKDIR"):
        cleanup(Path(os.environ["LXDBENCH_WORKDIR"]))
