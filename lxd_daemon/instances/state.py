"""Runtime state read straight from /proc and the cgroup filesystem (no liblxc call).

Everything here is a cheap file read, so the state of fifty containers costs a few
milliseconds. Works on the hybrid cgroup v1 layout of this host and on pure cgroup v2.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNIFIED = (CGROUP_ROOT / "cgroup.controllers").exists()
_ROOT = str(CGROUP_ROOT)
_V2_BASE = _ROOT if UNIFIED else _ROOT + "/unified"
# Swap accounting (memsw files) is a boot option: look once.
HAS_MEMSW = os.path.exists(_ROOT + "/memory/memory.memsw.usage_in_bytes")
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "systemd",
                  "net_cls", "net_prio", "perf_event", "hugetlb", "rdma", "misc", "unified")


def _read(path: str) -> str | None:
    # os.open/os.read: a third of the cost of open() for these small pseudo files.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks).decode()
    except OSError:
        return None
    finally:
        os.close(fd)


def _int(path: str) -> int:
    v = _read(path)
    if v is None:
        return 0
    try:
        return int(v.split()[0])
    except (ValueError, IndexError):
        return 0


def proc_start_time(pid: int) -> int | None:
    """The start time (field 22 of /proc/PID/stat) identifying this incarnation of a pid."""
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    try:
        return int(raw[raw.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def alive(pid: int, start_time: int | None) -> bool:
    if pid <= 0:
        return False
    st = proc_start_time(pid)
    return st is not None and (start_time is None or st == start_time)


def cgroup_paths(pid: int) -> dict[str, str]:
    """controller -> absolute cgroup directory of the process ("" key for the v2 hierarchy)."""
    raw = _read(f"/proc/{pid}/cgroup")
    out: dict[str, str] = {}
    if raw is None:
        return out
    for line in raw.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, rel = parts
        if ctrls == "":
            out[""] = _V2_BASE + rel
            continue
        for c in ctrls.split(","):
            name = c.removeprefix("name=")
            out[name] = f"{_ROOT}/{name}{rel}"
    return out


def freezer_state(cg: dict[str, str]) -> str:
    """'FROZEN', 'FREEZING' or 'THAWED'."""
    if "freezer" in cg and not UNIFIED:
        return (_read(cg["freezer"] + "/freezer.state") or "THAWED").strip()
    if "" in cg:
        ev = _read(cg[""] + "/cgroup.events") or ""
        for line in ev.splitlines():
            if line.startswith("frozen "):
                return "FROZEN" if line.split()[1] == "1" else "THAWED"
    return "THAWED"


def set_frozen(cg: dict[str, str], frozen: bool) -> None:
    if "freezer" in cg and not UNIFIED:
        with open(cg["freezer"] + "/freezer.state", "w") as f:
            f.write("FROZEN" if frozen else "THAWED")
        return
    with open(cg[""] + "/cgroup.freeze", "w") as f:
        f.write("1" if frozen else "0")


def usage(cg: dict[str, str]) -> dict:
    if UNIFIED or "memory" not in cg:
        base = cg.get("", "")
        cpu = 0
        for line in (_read(base + "/cpu.stat") or "").splitlines():
            if line.startswith("usage_usec "):
                cpu = int(line.split()[1]) * 1000
        return {
            "cpu": cpu,
            "memory": _int(base + "/memory.current"),
            "memory_peak": _int(base + "/memory.peak"),
            "swap": _int(base + "/memory.swap.current"),
            "swap_peak": _int(base + "/memory.swap.peak"),
            "processes": _int(base + "/pids.current"),
        }
    mem = cg["memory"]
    memory = _int(mem + "/memory.usage_in_bytes")
    peak = _int(mem + "/memory.max_usage_in_bytes")
    memsw = _int(mem + "/memory.memsw.usage_in_bytes") if HAS_MEMSW else 0
    memsw_peak = _int(mem + "/memory.memsw.max_usage_in_bytes") if HAS_MEMSW else 0
    return {
        "cpu": _int(cg.get("cpuacct", "") + "/cpuacct.usage"),
        "memory": memory,
        "memory_peak": peak,
        "swap": max(memsw - memory, 0) if memsw else 0,
        "swap_peak": max(memsw_peak - peak, 0) if memsw_peak else 0,
        "processes": _int(cg.get("pids", "") + "/pids.current"),
    }


def _inet4_from_fib(pid: int) -> list[tuple[str, str]]:
    """(address, "local"/"host") pairs of the netns, read from /proc/PID/net/fib_trie."""
    raw = _read(f"/proc/{pid}/net/fib_trie")
    if raw is None:
        return []
    out: list[tuple[str, str]] = []
    last = None
    seen: set[str] = set()
    for line in raw.splitlines():
        s = line.strip()
        if s.startswith("|--") or s.startswith("+--"):
            last = s.split()[1].split("/")[0]
        elif s.startswith("/32 host LOCAL") and last and last not in seen:
            seen.add(last)
            out.append((last, "host"))
    return out


def _ifaces_v4(pid: int) -> dict[str, list[dict]]:
    """IPv4 addresses per interface. The fib gives addresses but not their interface, so use the
    route table (/proc/PID/net/route) for prefixes and attach local addresses inside them."""
    addrs = _inet4_from_fib(pid)
    routes: list[tuple[str, int, int]] = []  # (iface, net, mask)
    for line in (_read(f"/proc/{pid}/net/route") or "").splitlines()[1:]:
        f = line.split()
        if len(f) >= 8:
            try:
                net = struct.unpack("<I", bytes.fromhex(f[1]))[0]
                mask = struct.unpack("<I", bytes.fromhex(f[7]))[0]
            except ValueError:
                continue
            routes.append((f[0], net, mask))
    out: dict[str, list[dict]] = {}
    for addr, _ in addrs:
        packed = struct.unpack("<I", socket.inet_aton(addr))[0]
        if addr.startswith("127."):
            out.setdefault("lo", []).append({"family": "inet", "address": addr, "netmask": "8", "scope": "local"})
            continue
        best = None
        for iface, net, mask in routes:
            if mask and (packed & mask) == net and (best is None or bin(mask).count("1") > best[1]):
                best = (iface, bin(mask).count("1"))
        if best is not None:
            out.setdefault(best[0], []).append(
                {"family": "inet", "address": addr, "netmask": str(best[1]), "scope": "global"})
    return out


def _ifaces_v6(pid: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for line in (_read(f"/proc/{pid}/net/if_inet6") or "").splitlines():
        f = line.split()
        if len(f) < 6:
            continue
        addr = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(f[0]))
        scope = {"00": "global", "20": "link", "10": "local"}.get(f[3], "global")
        out.setdefault(f[5], []).append(
            {"family": "inet6", "address": addr, "netmask": str(int(f[2], 16)), "scope": scope})
    return out


def network(pid: int) -> dict:
    """Per-interface counters and addresses inside the container's network namespace."""
    raw = _read(f"/proc/{pid}/net/dev")
    if raw is None:
        return {}
    v4, v6 = _ifaces_v4(pid), _ifaces_v6(pid)
    out: dict[str, dict] = {}
    for line in raw.splitlines()[2:]:
        name, _, rest = line.partition(":")
        name = name.strip()
        f = rest.split()
        if len(f) < 16:
            continue
        rx_b, rx_p, rx_e, rx_d = (int(x) for x in f[0:4])
        tx_b, tx_p, tx_e, tx_d = (int(x) for x in f[8:12])
        lo = name == "lo"
        out[name] = {
            "addresses": v4.get(name, []) + v6.get(name, []),
            "counters": {"bytes_received": rx_b, "bytes_sent": tx_b, "packets_received": rx_p,
                         "packets_sent": tx_p, "errors_received": rx_e, "errors_sent": tx_e,
                         "packets_dropped_inbound": rx_d, "packets_dropped_outbound": tx_d},
            "hwaddr": "" if lo else "",
            "host_name": "",
            "mtu": 65536 if lo else 1500,
            "state": "up" if (lo and v4.get(name)) or rx_p or tx_p or v4.get(name) or v6.get(name) else "down",
            "type": "loopback" if lo else "broadcast",
        }
    return out


def full_state(pid: int, frozen_hint: str | None = None, cg: dict[str, str] | None = None,
               net: dict | None = None) -> dict:
    """The `state` object of a running container with init `pid` (cgroup dirs `cg` and the
    network part `net` if already known)."""
    if cg is None:
        cg = cgroup_paths(pid)
    u = usage(cg)
    fz = frozen_hint or freezer_state(cg)
    status, code = ("Frozen", 110) if fz == "FROZEN" else ("Running", 103)
    return {
        "status": status,
        "status_code": code,
        "disk": {},
        "memory": {"usage": u["memory"], "usage_peak": u["memory_peak"], "swap_usage": u["swap"],
                   "swap_usage_peak": u["swap_peak"]},
        "network": network(pid) if net is None else net,
        "pid": pid,
        "processes": u["processes"],
        "cpu": {"usage": u["cpu"]},
    }


def stopped_state() -> dict:
    return {"status": "Stopped", "status_code": 102, "disk": {},
            "memory": {"usage": 0, "usage_peak": 0, "swap_usage": 0, "swap_usage_peak": 0},
            "network": None, "pid": -1, "processes": 0, "cpu": {"usage": 0}}


def monitor_cgroups(name: str) -> list[Path]:
    """The `lxc.monitor.<name>` and `lxc.monitor.<name>-N` cgroups liblxc leaves behind."""
    out: list[Path] = []
    bases = [CGROUP_ROOT] if UNIFIED else [CGROUP_ROOT / c for c in V1_CONTROLLERS]
    for base in bases:
        try:
            entries = os.listdir(base)
        except OSError:
            continue
        for e in entries:
            if e == f"lxc.monitor.{name}" or (e.startswith(f"lxc.monitor.{name}-")
                                              and e[len(f"lxc.monitor.{name}-"):].isdigit()):
                out.append(base / e)
    return out


def remove_monitor_cgroups(name: str) -> int:
    """rmdir every empty leftover monitor cgroup of `name`; returns how many are still busy."""
    busy = 0
    for p in monitor_cgroups(name):
        try:
            os.rmdir(p)
        except OSError as e:
            if e.errno == errno.ENOENT:
                continue
            busy += 1
    return busy
