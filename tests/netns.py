"""Network namespaces that a test makes for itself: the daemon of a network test runs inside one
(its bridges, veths, nftables tables and dnsmasq live and die there), and every address a test
uses lives in such a namespace or on loopback.

Programs run inside through scripts/netns-exec: the network namespace plus a mount namespace
where /sys shows that namespace's interfaces and /sys/fs/cgroup is the host's (plain `nsenter
--net` shows the host's /sys/class/net, `ip netns exec` hides the cgroup mounts). A directory made
shared with share() (the daemon's LXD_DIR) shows the mounts the daemon makes there on the host too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

NETNS_DIR = Path("/run/netns")
NETNS_EXEC = Path(__file__).resolve().parent.parent / "scripts" / "netns-exec"


class NetNS:
    """`ip netns add NAME` with loopback up; destroy() kills what still runs inside (only
    processes this test started can be there) and deletes it, which takes its bridges, veths and
    nftables tables with it."""

    def __init__(self, name: str):
        if len(name) > 15 or "/" in name:
            raise ValueError(f"bad namespace name {name!r}")
        self.name = name
        self.path = NETNS_DIR / name
        self.shared: list[Path] = []

    def create(self) -> NetNS:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.run("ip", "link", "set", "lo", "up")
        return self

    def prefix(self) -> list[str]:
        """The command prefix that runs a program inside the namespace."""
        return ["/usr/bin/python3", str(NETNS_EXEC), str(self.path), "--"]

    def share(self, path: Path) -> None:
        """Make `path` a shared mount (bound on itself), so that what programs inside mount under
        it is seen on the host; undone by destroy()."""
        path = Path(path).resolve()
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(path), str(path)], check=True, capture_output=True)
        self.shared.append(path)
        subprocess.run(["mount", "--make-shared", str(path)], check=True, capture_output=True)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run([*self.prefix(), *cmd], capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"[{self.name}] {' '.join(cmd)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    def inode(self) -> int | None:
        try:
            return self.path.stat().st_ino
        except OSError:
            return None

    def pids(self) -> list[int]:
        """Processes whose network namespace is this one (containers' own namespaces excluded)."""
        ino = self.inode()
        out = []
        if ino is None:
            return out
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == ino:
                    out.append(int(entry))
            except OSError:
                continue
        return out

    def destroy(self) -> None:
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        for path in reversed(self.shared):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        self.shared.clear()

    def __enter__(self) -> NetNS:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.destroy()


def links(ns: NetNS) -> set[str]:
    """Interface names inside the namespace."""
    out = ns.run("ip", "-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def nft_tables(ns: NetNS) -> set[str]:
    """`family name` of every nftables table inside the namespace."""
    out = ns.run("nft", "list", "tables").stdout
    return {line.split(None, 1)[1].strip() for line in out.splitlines() if line.startswith("table ")}
