"""`memory` of GET /1.0/resources: /proc/meminfo, memory blocks and NUMA nodes."""

from __future__ import annotations

import os
import re

from lxd_daemon.resources.sysfs import listdir, path, read


def _meminfo(p: str) -> dict[str, int]:
    """A meminfo file ("Node 0 MemTotal: 123 kB" lines too) as {key: bytes, or a count}."""
    out: dict[str, int] = {}
    for line in read(p).splitlines():
        key, _, value = line.partition(":")
        key = key.split()[-1] if key.split() else ""
        parts = value.split()
        if not key or not parts or not parts[0].isdigit():
            continue
        n = int(parts[0])
        out[key] = n * 1024 if len(parts) > 1 and parts[1] == "kB" else n
    return out


def _online_blocks_bytes(root: str, directory: str) -> int:
    """Memory present in `directory` counted in online memory blocks (0 when unknown)."""
    block = read(path(root, "sys/devices/system/memory/block_size_bytes"))
    try:
        size = int(block, 16)
    except ValueError:
        return 0
    count = sum(1 for name in listdir(directory)
                if name.startswith("memory") and read(os.path.join(directory, name, "online")) == "1")
    return size * count


def get_memory(root: str = "/") -> dict:
    info = _meminfo(path(root, "proc/meminfo"))
    total = _online_blocks_bytes(root, path(root, "sys/devices/system/memory")) or info.get("MemTotal", 0)
    page = info.get("Hugepagesize", 0)
    huge_total, huge_free = info.get("HugePages_Total", 0), info.get("HugePages_Free", 0)
    used = total - info.get("MemFree", 0) - info.get("Cached", 0) - info.get("Buffers", 0)
    out: dict = {"hugepages_total": huge_total * page, "hugepages_used": (huge_total - huge_free) * page,
                 "hugepages_size": page, "used": max(used, 0), "total": total}
    nodes = []
    node_base = path(root, "sys/devices/system/node")
    for name in listdir(node_base):
        m = re.fullmatch(r"node(\d+)", name)
        node_dir = os.path.join(node_base, name)
        if not m or not os.path.exists(os.path.join(node_dir, "meminfo")):
            continue
        n = _meminfo(os.path.join(node_dir, "meminfo"))
        nodes.append({"numa_node": int(m.group(1)),
                      "hugepages_used": (n.get("HugePages_Total", 0) - n.get("HugePages_Free", 0)) * page,
                      "hugepages_total": n.get("HugePages_Total", 0) * page,
                      "used": n.get("MemUsed", 0),
                      "total": _online_blocks_bytes(root, node_dir) or n.get("MemTotal", 0)})
    if nodes:  # omitted when there is no NUMA information
        out = {"nodes": nodes, **out}
    return out

