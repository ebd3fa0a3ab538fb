"""What `GET /1.0/metrics` reports for each running container, read in one pass.

For every running (or frozen) container of the requested projects: memory (memory.stat, usage,
limit), CPU seconds per CPU and mode (cpuacct.usage_all, or cpu.stat on cgroup v2), block I/O per
device (blkio throttle counters, or io.stat), the root and host-path disks' filesystems
(statvfs), the network interfaces inside the container (the instance state's reader) and the
process count. The cgroup directories are those the runtime tracker resolved when the container
started (Runtime.cgroups); the host-wide tables (/proc/meminfo, /proc/partitions, the mount
table) are read once per scrape. Plain file reads: run the whole of `collect()` in a thread.

Labels are LXD 5.0.2's: `name`, `project` and `type="container"` on every sample, plus the
family's own (`cpu`/`mode`, `device`, `mountpoint`/`fstype`); as in LXD, filesystem samples
carry `name` and `project` but no `type`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from lxd_daemon.instances import state as rstate
from lxd_daemon.metrics.render import Metrics

log = logging.getLogger("lxd.metrics")

NS = 1e9

# memory.stat key (v1 hierarchical total, or v2) -> family
_MEMORY_STAT = {
    "total_active_anon": "Active_anon", "active_anon": "Active_anon",
    "total_active_file": "Active_file", "active_file": "Active_file",
    "total_inactive_anon": "Inactive_anon", "inactive_anon": "Inactive_anon",
    "total_inactive_file": "Inactive_file", "inactive_file": "Inactive_file",
    "total_unevictable": "Unevictable", "unevictable": "Unevictable",
    "total_writeback": "Writeback", "file_writeback": "Writeback",
    "total_dirty": "Dirty", "file_dirty": "Dirty",
    "total_mapped_file": "Mapped", "file_mapped": "Mapped",
    "total_rss": "RSS",  # cgroup v1 only
    "total_shmem": "Shmem", "shmem": "Shmem",
    "total_cache": "Cached", "file": "Cached",
}
_V1_ONLY = {"active_anon", "active_file", "inactive_anon", "inactive_file", "unevictable", "shmem"}


@dataclass
class Target:
    """One running container to report: its identity, init pid, cgroups and disks."""

    project: str
    name: str
    pid: int
    cgroups: dict[str, str]
    links: object | None  # state.NetnsLinks kept by the tracker, or None
    rootfs: str  # the root volume's directory on the host ($LXD_DIR/containers/<key>)
    disks: list[tuple[str, dict[str, str]]]  # (device name, expanded disk device) with a path


class Host:
    """Host-wide facts of one scrape, read once."""

    def __init__(self) -> None:
        self.mem_total = 0
        for line in (rstate._read("/proc/meminfo") or "").splitlines():
            if line.startswith("MemTotal:"):
                self.mem_total = int(line.split()[1]) * 1024
                break
        self.partitions: dict[str, str] = {}
        for line in (rstate._read("/proc/partitions") or "").splitlines():
            f = line.split()
            if len(f) == 4 and f[0].isdigit():
                self.partitions[f"{f[0]}:{f[1]}"] = f[3]
        # (mount point, source, fstype), from /proc/self/mountinfo
        self.mounts: list[tuple[str, str, str]] = []
        for line in (rstate._read("/proc/self/mountinfo") or "").splitlines():
            pre, _, post = line.partition(" - ")
            f, g = pre.split(), post.split()
            if len(f) >= 5 and len(g) >= 2:
                self.mounts.append((_unescape(f[4]), g[1], g[0]))

    def mount_of(self, path: str) -> tuple[str, str, str] | None:
        """The mount holding `path` (the last-mounted of the longest matching mount point)."""
        best = None
        for m in self.mounts:
            mp = m[0]
            if path == mp or path.startswith(mp.rstrip("/") + "/"):
                if best is None or len(mp) >= len(best[0]):
                    best = m
        return best


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _fstype(t: str) -> str:
    # LXD names a filesystem after its statfs magic: ext2/3/4 share one, which it calls ext4.
    return "ext4" if t in ("ext2", "ext3") else t


def collect(targets: list[Target]) -> Metrics:
    """The metrics of `targets`, in their order; a container whose reads fail is left out with a
    warning (as LXD does), the others are still reported."""
    host = Host()
    out = Metrics()
    for t in targets:
        try:
            out.merge(_one(t, host))
        except Exception as e:  # a container that stops mid-read, an unreadable file
            log.warning("Failed getting instance metrics",
                        extra={"instance": t.name, "project": t.project, "err": str(e)})
    return out


def _one(t: Target, host: Host) -> Metrics:
    m = Metrics()
    base = {"name": t.name, "project": t.project, "type": "container"}

    def add(family: str, value: float, **labels: str) -> None:
        m.add(family, value, {**labels, **base})

    cg = t.cgroups
    v2 = rstate.UNIFIED or "memory" not in cg
    use = rstate.usage(cg)  # memory usage, swap, process count: the instance state's reader

    # -- memory
    mem_dir = cg.get("", "") if v2 else cg.get("memory", "")
    stats: dict[str, int] = {}
    for line in (rstate._read(mem_dir + "/memory.stat") or "").splitlines():
        k, _, val = line.partition(" ")
        fam = _MEMORY_STAT.get(k)
        if fam is None or (not v2 and k in _V1_ONLY):  # v1: the hierarchical totals
            continue
        try:
            stats[fam] = int(val)
        except ValueError:
            continue
    if stats:
        for k in ("Active", "Inactive"):
            stats[k] = stats.get(f"{k}_anon", 0) + stats.get(f"{k}_file", 0)
        for fam, val in stats.items():
            add(f"lxd_memory_{fam}_bytes", val)
    limit = _memory_limit(mem_dir, v2)
    total = host.mem_total if limit is None or limit > host.mem_total else limit
    if total > 0:
        usage = use["memory"]
        add("lxd_memory_MemTotal_bytes", total)
        add("lxd_memory_MemAvailable_bytes", total - usage + stats.get("Cached", 0))
        add("lxd_memory_MemFree_bytes", total - usage)
    if (rstate.HAS_MEMSW and not v2) or (v2 and os.path.exists(mem_dir + "/memory.swap.current")):
        add("lxd_memory_Swap_bytes", use["swap"])

    # -- CPU seconds, per CPU and mode
    for cpu, user, system in _cpu(cg, v2):
        add("lxd_cpu_seconds_total", system / NS, cpu=cpu, mode="system")
        add("lxd_cpu_seconds_total", user / NS, cpu=cpu, mode="user")

    # -- block I/O, per device
    for dev, io in _io(cg, v2, host).items():
        add("lxd_disk_read_bytes_total", io[0], device=dev)
        add("lxd_disk_reads_completed_total", io[2], device=dev)
        add("lxd_disk_written_bytes_total", io[1], device=dev)
        add("lxd_disk_writes_completed_total", io[3], device=dev)

    # -- filesystems of the disks
    for path, mountpoint in _disk_paths(t):
        try:
            st = os.statvfs(path)
        except OSError:
            continue
        real = os.path.realpath(path)
        mnt = host.mount_of(real)
        labels = {"device": mnt[1] if mnt is not None and mnt[0] == real else "",
                  "mountpoint": mountpoint, "name": t.name, "project": t.project}
        if mnt is not None:
            labels["fstype"] = _fstype(mnt[2])
        m.add("lxd_filesystem_size_bytes", st.f_blocks * st.f_frsize, labels)
        m.add("lxd_filesystem_avail_bytes", st.f_bavail * st.f_frsize, labels)
        m.add("lxd_filesystem_free_bytes", st.f_bfree * st.f_frsize, labels)

    # -- network, per interface inside the container
    for dev, info in rstate.network(t.pid, None, t.links).items():
        c = info["counters"]
        add("lxd_network_receive_bytes_total", c["bytes_received"], device=dev)
        add("lxd_network_receive_packets_total", c["packets_received"], device=dev)
        add("lxd_network_transmit_bytes_total", c["bytes_sent"], device=dev)
        add("lxd_network_transmit_packets_total", c["packets_sent"], device=dev)
        add("lxd_network_receive_errs_total", c["errors_received"], device=dev)
        add("lxd_network_transmit_errs_total", c["errors_sent"], device=dev)
        add("lxd_network_receive_drop_total", c["packets_dropped_inbound"], device=dev)
        add("lxd_network_transmit_drop_total", c["packets_dropped_outbound"], device=dev)

    # -- processes
    if (v2 and "" in cg) or "pids" in cg:
        add("lxd_procs_total", use["processes"])
    return m


def _memory_limit(mem_dir: str, v2: bool) -> int | None:
    raw = rstate._read(mem_dir + ("/memory.max" if v2 else "/memory.limit_in_bytes"))
    try:
        return int(raw.strip()) if raw is not None else None
    except ValueError:
        return None  # "max": no limit


def _cpu(cg: dict[str, str], v2: bool) -> list[tuple[str, int, int]]:
    """(cpu id, user ns, system ns) per CPU; cgroup v2 has no per-CPU split: one row, CPU 0."""
    if not v2 and "cpuacct" in cg:
        rows = []
        for line in (rstate._read(cg["cpuacct"] + "/cpuacct.usage_all") or "").splitlines():
            f = line.split()
            if len(f) == 3 and f[0].isdigit():
                rows.append((f[0], int(f[1]), int(f[2])))
        return rows
    user = system = None
    for line in (rstate._read(cg.get("", "") + "/cpu.stat") or "").splitlines():
        k, _, val = line.partition(" ")
        if k == "user_usec":
            user = int(val) * 1000
        elif k == "system_usec":
            system = int(val) * 1000
    return [("0", user or 0, system or 0)] if user is not None or system is not None else []


def _io(cg: dict[str, str], v2: bool, host: Host) -> dict[str, list[int]]:
    """device -> [read bytes, written bytes, reads, writes]."""
    out: dict[str, list[int]] = {}
    if not v2 and "blkio" in cg:
        for fname, offset in (("blkio.throttle.io_service_bytes_recursive", 0),
                              ("blkio.throttle.io_serviced_recursive", 2)):
            for line in (rstate._read(cg["blkio"] + "/" + fname) or "").splitlines():
                f = line.split()
                if len(f) != 3 or f[1] not in ("Read", "Write"):
                    continue
                row = out.setdefault(host.partitions.get(f[0], ""), [0, 0, 0, 0])
                row[offset + (f[1] == "Write")] = int(f[2])
        return out
    if v2 and "" in cg:
        keys = {"rbytes": 0, "wbytes": 1, "rios": 2, "wios": 3}
        for line in (rstate._read(cg[""] + "/io.stat") or "").splitlines():
            dev, _, rest = line.partition(" ")
            row = [0, 0, 0, 0]
            for part in rest.split():
                k, _, val = part.partition("=")
                if k in keys and val.isdigit():
                    row[keys[k]] = int(val)
            out[host.partitions.get(dev, "")] = row
    return out


def _disk_paths(t: Target) -> list[tuple[str, str]]:
    """(host path to statvfs, path inside the container) of the container's disk devices that
    have one: the root disk, and disks of a host path."""
    out = []
    for _dname, dev in t.disks:
        path = dev.get("path", "")
        if dev.get("type") != "disk" or not path:
            continue
        if dev.get("pool") and path == "/":
            out.append((t.rootfs, path))
        elif not dev.get("pool") and dev.get("source", "").startswith("/"):
            out.append((dev["source"], path))
    return out
