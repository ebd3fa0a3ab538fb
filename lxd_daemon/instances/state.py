"""Runtime state read straight from /proc and the cgroup filesystem (no liblxc call).

Everything here is a cheap file read, so the state of fifty containers costs a few
milliseconds. Works on the hybrid cgroup v1 layout of this host and on pure cgroup v2.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from pathlib import Path

from lxd_daemon.util.cgroups import own_cgroup
from lxd_daemon.util.netif import IFF_UP, link_type

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


def proc_state(pid: int) -> str | None:
    """The state letter (field 3 of /proc/PID/stat: R, S, Z...), None when there is no such pid."""
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    try:
        return raw[raw.rindex(")") + 2]
    except (ValueError, IndexError):
        return None


def alive(pid: int, start_time: int | None) -> bool:
    """Whether `pid` is still the process started at `start_time` and has not exited (an exited
    init stays a zombie until its monitor reaps it: not alive)."""
    if pid <= 0:
        return False
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return False
    try:
        rest = raw[raw.rindex(")") + 2:].split()
        st, state = int(rest[19]), rest[0]
    except (ValueError, IndexError):
        return False
    return state not in ("Z", "X") and (start_time is None or st == start_time)


def _cgroup_dirs(pid: int, rel_of=lambda rel: rel) -> dict[str, str]:
    """controller -> absolute directory ("" key for the v2 hierarchy) of `rel_of(path)` for each
    of the process's cgroup paths; hierarchies where `rel_of` answers None are left out."""
    raw = _read(f"/proc/{pid}/cgroup")
    out: dict[str, str] = {}
    if raw is None:
        return out
    for line in raw.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, rel = parts
        rel = rel_of(rel)
        if rel is None:
            continue
        if ctrls == "":
            out[""] = _V2_BASE + rel
            continue
        for c in ctrls.split(","):
            name = c.removeprefix("name=")
            out[name] = f"{_ROOT}/{name}{rel}"
    return out


def cgroup_paths(pid: int) -> dict[str, str]:
    """controller -> absolute cgroup directory of the process ("" key for the v2 hierarchy)."""
    return _cgroup_dirs(pid)


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


def set_frozen(cg: dict[str, str], frozen: bool, name: str | None = None) -> None:
    """Freeze or thaw the cgroups `cg`. With `name`, every path must be inside that container's
    own cgroup (check_container_cgroups): a wrong path is refused, never written."""
    if name is not None:
        check_container_cgroups(cg, name)
    if "freezer" in cg and not UNIFIED:
        with open(cg["freezer"] + "/freezer.state", "w") as f:
            f.write("FROZEN" if frozen else "THAWED")
        return
    if "" not in cg:
        raise FileNotFoundError(errno.ENOENT, "no freezer cgroup known for the container")
    with open(cg[""] + "/cgroup.freeze", "w") as f:
        f.write("1" if frozen else "0")


# -- the container's own cgroup (lxd_daemon.util.cgroups) -------------------------------------

class CgroupOutsideContainer(ValueError):
    """A cgroup path that is not inside the container's own cgroup."""


def container_cgroups(name: str, pid: int) -> dict[str, str]:
    """controller -> the container's own cgroup directory (`.../lxc.payload.<name>`), from where
    its init `pid` is now. Hierarchies where the pid is not inside that cgroup are left out, so
    an exiting or unrelated pid yields {} instead of some other cgroup."""
    return _cgroup_dirs(pid, lambda rel: own_cgroup(rel, name))


def check_container_cgroups(cg: dict[str, str], name: str) -> None:
    """Raise CgroupOutsideContainer unless every path of `cg` lies inside the container's own
    cgroup under /sys/fs/cgroup (the guard in front of every write the daemon makes)."""
    if not cg:
        raise CgroupOutsideContainer(f"no cgroup known for instance {name!r}")
    for ctrl, path in cg.items():
        norm = os.path.normpath(path)
        if norm != path.rstrip("/") or not norm.startswith(_ROOT + "/"):
            raise CgroupOutsideContainer(f"cgroup path {path!r} of {name!r} is not a plain cgroup path")
        base = _V2_BASE if ctrl == "" else f"{_ROOT}/{ctrl}"
        if not norm.startswith(base + "/"):
            raise CgroupOutsideContainer(f"cgroup path {path!r} is outside the {ctrl or 'unified'} hierarchy")
        if own_cgroup(norm[len(base):], name) is None:
            raise CgroupOutsideContainer(f"cgroup path {path!r} is outside instance {name!r}'s cgroup")


def payload_cgroup_dirs(name: str) -> list[str]:
    """The `lxc.payload.<name>[-N]` cgroups at the top of the v2 hierarchy (or of the v1 freezer
    one without it): where liblxc (run as root) puts containers. One directory listing."""
    base = _V2_BASE if os.path.isdir(_V2_BASE) else _ROOT + "/freezer"
    try:
        entries = os.listdir(base)
    except OSError:
        return []
    return [f"{base}/{e}" for e in entries if own_cgroup(e, name) == e]


def cgroup_populated(path: str) -> bool:
    """Whether the cgroup directory `path` (or a cgroup below it) has processes."""
    ev = _read(path + "/cgroup.events")
    if ev is not None:
        for line in ev.splitlines():
            if line.startswith("populated "):
                return line.split()[1] == "1"
    for dirpath, _dirs, _files in os.walk(path):
        if (_read(dirpath + "/cgroup.procs") or "").strip():
            return True
    return False


def _monitor_pids(lxcpath: str, name: str) -> list[int]:
    """liblxc monitor processes (`[lxc monitor] LXCPATH NAME`) of this container."""
    want = f"[lxc monitor] {lxcpath} {name}"
    out = []
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        cmd = _read(f"/proc/{e}/cmdline")
        if cmd and cmd.replace("\0", " ").strip() == want:
            out.append(int(e))
    return out


def monitor_running(lxcpath: str, name: str) -> bool:
    """Whether liblxc's monitor process of the container still exists (a scan of /proc)."""
    return bool(_monitor_pids(lxcpath, name))


def find_running_init(lxcpath: str, name: str) -> int | None:
    """The init pid of container `name` of `lxcpath` if it is running, found without liblxc's
    command socket (an abstract unix socket, out of reach from another network namespace): its
    cgroup has processes, and its monitor's child is inside that cgroup. None when stopped."""
    if cgroupfs_mounted() and not container_cgroup_alive(name):
        return None  # the cheap answer (one directory listing) for the usual stopped container
    # Without the cgroup filesystem in this mount namespace (`ip netns exec` remounts /sys),
    # the monitor processes still tell: a scan of /proc.
    for mon in _monitor_pids(lxcpath, name):
        for task in os.listdir(f"/proc/{mon}/task") if os.path.isdir(f"/proc/{mon}/task") else []:
            for child in (_read(f"/proc/{mon}/task/{task}/children") or "").split():
                pid = int(child)
                # Not a zombie: right after a stop, the monitor may not have reaped init yet.
                if alive(pid, None) and container_cgroups(name, pid):
                    return pid
    return None


def cgroupfs_mounted() -> bool:
    """Whether this mount namespace sees the cgroup hierarchy liblxc places containers in."""
    return os.path.exists(_V2_BASE + "/cgroup.procs") or os.path.exists(_ROOT + "/freezer/cgroup.procs")


def container_cgroup_alive(name: str) -> bool:
    """Whether any `lxc.payload.<name>[-N]` cgroup still holds processes (of any lxcpath)."""
    return any(cgroup_populated(d) for d in payload_cgroup_dirs(name))


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


# -- links of a container's network namespace, over rtnetlink without forking ------------------
# A netlink socket belongs to the network namespace it was made in: a short-lived thread enters
# the container's namespace (setns affects only the calling thread), makes the socket and asks
# for the links, and ends (so no thread of the daemon stays in a container's namespace).

RTM_GETLINK, RTM_GETADDR, NLMSG_DONE, NLMSG_ERROR = 18, 22, 3, 2
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_STATS64 = 1, 3, 4, 23
_CLONE_NEWNET = 0x40000000
_libc = None


def _dump_links(sock: socket.socket) -> dict[str, dict]:
    req = struct.pack("=IHHII", 32, RTM_GETLINK, 0x1 | 0x300, 1, 0) + struct.pack("=BxHiII", 0, 0, 0, 0, 0)
    sock.send(req)
    out: dict[str, dict] = {}
    while True:
        data = sock.recv(65536)
        off = 0
        while off + 16 <= len(data):
            mlen, mtype = struct.unpack_from("=IH", data, off)
            if mlen < 16:
                return out
            if mtype in (NLMSG_DONE, NLMSG_ERROR):
                return out
            _fam, _ty, _idx, flags = struct.unpack_from("=BxHiI", data, off + 16)
            attrs: dict[int, bytes] = {}
            a = off + 32
            end = off + mlen
            while a + 4 <= end:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                attrs[atype & 0x3FFF] = data[a + 4:a + alen]
                a += (alen + 3) & ~3
            name = attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace")
            if name:
                mac = attrs.get(IFLA_ADDRESS, b"")
                st = attrs.get(IFLA_STATS64, b"")
                # rx/tx packets, rx/tx bytes, rx/tx errors, rx/tx dropped (struct rtnl_link_stats64)
                counters = struct.unpack_from("=8Q", st) if len(st) >= 64 else None
                out[name] = {"hwaddr": ":".join(f"{b:02x}" for b in mac) if len(mac) == 6 else "",
                             "mtu": struct.unpack("=I", attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else 0,
                             "state": "up" if flags & IFF_UP else "down", "type": link_type(flags),
                             "index": _idx, "inet": [], "inet6": [], "counters": counters}
            off += (mlen + 3) & ~3


_SCOPES = {0: "global", 253: "link", 254: "local"}


def _dump_inet(sock: socket.socket, links: dict[str, dict]) -> None:
    """Each link's IPv4 and IPv6 addresses (RTM_GETADDR), into links[name]["inet"/"inet6"]."""
    by_index = {info["index"]: info for info in links.values()}
    req = struct.pack("=IHHII", 24, RTM_GETADDR, 0x1 | 0x300, 2, 0) + struct.pack("=BBBBI", 0, 0, 0, 0, 0)
    sock.send(req)
    while True:
        data = sock.recv(65536)
        off = 0
        while off + 16 <= len(data):
            mlen, mtype = struct.unpack_from("=IH", data, off)
            if mlen < 16 or mtype in (NLMSG_DONE, NLMSG_ERROR):
                return
            fam, plen, _fl, scope, index = struct.unpack_from("=BBBBI", data, off + 16)
            a, end, addr = off + 24, off + mlen, None
            size = 4 if fam == socket.AF_INET else 16
            while a + 4 <= end:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atype in (1, 2) and alen == 4 + size:  # IFA_ADDRESS, IFA_LOCAL (wins for IPv4)
                    if atype == 2 or addr is None:
                        addr = socket.inet_ntop(fam, data[a + 4:a + 4 + size])
                a += (alen + 3) & ~3
            info = by_index.get(index)
            if info is not None and addr and fam in (socket.AF_INET, socket.AF_INET6):
                key = "inet" if fam == socket.AF_INET else "inet6"
                info[key].append({"family": key, "address": addr, "netmask": str(plen),
                                  "scope": _SCOPES.get(scope, "global")})
            off += (mlen + 3) & ~3


def _netlink_in_netns(pid: int) -> socket.socket | None:
    """A NETLINK_ROUTE socket of the network namespace of process `pid` (None when it can't be
    made): a short-lived thread enters the namespace, makes the socket and ends."""
    global _libc
    import ctypes
    import threading

    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    made: list[socket.socket] = []

    def run() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                return
        finally:
            os.close(fd)
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        except OSError:
            return
        sock.settimeout(2)
        made.append(sock)

    t = threading.Thread(target=run, name="netns-links", daemon=True)
    t.start()
    t.join()
    return made[0] if made else None


def _links_of(sock: socket.socket) -> dict[str, dict]:
    links = _dump_links(sock)
    _dump_inet(sock, links)
    return links


def netns_links(pid: int) -> dict[str, dict]:
    """{ifname: {hwaddr, mtu, state, type, inet}} of the network namespace of process `pid` ({}
    when it can't be read), through a socket made for this one read."""
    sock = _netlink_in_netns(pid)
    if sock is None:
        return {}
    try:
        with sock:
            return _links_of(sock)
    except OSError:
        return {}


class NetnsLinks:
    """The links of one running container's network namespace, read through a netlink socket
    made once and kept while its init lives (the tracker closes it when init exits: an open
    socket keeps the namespace, and so the nics' interfaces, alive). Reads may come from several
    threads; a read after close() finds nothing."""

    def __init__(self, pid: int):
        self.pid = pid
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._closed = False

    def read(self) -> dict[str, dict]:
        with self._lock:
            if self._closed:
                return {}
            if self._sock is None:
                self._sock = _netlink_in_netns(self.pid)
                if self._sock is None:
                    return {}
            try:
                return _links_of(self._sock)
            except OSError:
                self._sock.close()
                self._sock = None
                return {}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _net_from_links(linkinfo: dict[str, dict], host_names: dict[str, str]) -> dict:
    out: dict[str, dict] = {}
    for name, info in linkinfo.items():
        c = info["counters"] or (0,) * 8
        lo = info["type"] == "loopback"
        out[name] = {
            "addresses": info["inet"] + info["inet6"],
            "counters": {"bytes_received": c[2], "bytes_sent": c[3], "packets_received": c[0],
                         "packets_sent": c[1], "errors_received": c[4], "errors_sent": c[5],
                         "packets_dropped_inbound": c[6], "packets_dropped_outbound": c[7]},
            "hwaddr": "" if lo else info["hwaddr"],
            "host_name": host_names.get(name, ""),
            "mtu": info["mtu"],
            "state": info["state"],
            "type": info["type"],
        }
    return out


def network(pid: int, host_names: dict[str, str] | None = None, links: NetnsLinks | None = None) -> dict:
    """Per-interface counters and addresses inside the container's network namespace, with each
    link's MAC, MTU, state and type, and the host end of the nic (`host_names`: ifname -> host
    interface, from the nics' volatile keys). `links`: the container's kept netlink reader (one
    link dump and one address dump, no file reads); without one, /proc/PID/net and a socket
    made for this read."""
    host_names = host_names or {}
    if links is not None:
        linkinfo = links.read()
        if linkinfo:
            return _net_from_links(linkinfo, host_names)
    raw = _read(f"/proc/{pid}/net/dev")
    if raw is None:
        return {}
    # only a container with interfaces besides lo (a nic) costs the netlink round (a thread)
    if any(line.partition(":")[0].strip() not in ("lo", "") for line in raw.splitlines()[2:]):
        linkinfo = netns_links(pid)
        if linkinfo:
            return _net_from_links(linkinfo, host_names)
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
            "hwaddr": "",
            "host_name": host_names.get(name, ""),
            "mtu": 65536 if lo else 1500,
            "state": "up" if (lo and v4.get(name)) or rx_p or tx_p or v4.get(name) or v6.get(name) else "down",
            "type": "loopback" if lo else "broadcast",
        }
    return out


def full_state(pid: int, frozen_hint: str | None = None, cg: dict[str, str] | None = None,
               net: dict | None = None, host_names: dict[str, str] | None = None) -> dict:
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
        "network": network(pid, host_names) if net is None else net,
        "pid": pid,
        "processes": u["processes"],
        "cpu": {"usage": u["cpu"]},
    }


def stopped_state() -> dict:
    return {"status": "Stopped", "status_code": 102, "disk": {},
            "memory": {"usage": 0, "usage_peak": 0, "swap_usage": 0, "swap_usage_peak": 0},
            "network": None, "pid": 0, "processes": 0, "cpu": {"usage": 0}}


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
