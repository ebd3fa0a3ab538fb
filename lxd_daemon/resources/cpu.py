"""`cpu` of GET /1.0/resources: sockets, their cores and threads, from /sys/devices/system/cpu."""

from __future__ import annotations

import os
import re

from lxd_daemon.resources.sysfs import exists, listdir, numa_node_of_cpu, parse_cpuset, path, read, read_int


def _cpuinfo(root: str) -> dict[int, dict[str, str]]:
    """/proc/cpuinfo as {processor number: {key: value}}."""
    blocks: dict[int, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in read(path(root, "proc/cpuinfo")).splitlines() + [""]:
        if not line.strip():
            if "processor" in current:
                try:
                    blocks[int(current["processor"])] = current
                except ValueError:
                    pass
            current = {}
            continue
        key, _, value = line.partition(":")
        current.setdefault(key.strip(), value.strip())
    return blocks


def _caches(cache_dir: str) -> list[dict]:
    out = []
    for name in listdir(cache_dir):
        d = os.path.join(cache_dir, name)
        level = read_int(os.path.join(d, "level"))
        if level is None:
            continue
        size_text = read(os.path.join(d, "size"))
        mult = 1
        if size_text.endswith("K"):
            size_text, mult = size_text[:-1], 1024
        elif size_text.endswith("M"):
            size_text, mult = size_text[:-1], 1024 * 1024
        size = int(size_text) * mult if size_text.isdigit() else 0
        out.append({"level": level, "type": read(os.path.join(d, "type")) or "Unknown", "size": size})
    return out


def _khz_to_mhz(p: str) -> int:
    return (read_int(p, 0) or 0) // 1000


def get_cpu(root: str = "/") -> dict:
    base = path(root, "sys/devices/system/cpu")
    isolated = parse_cpuset(read(os.path.join(base, "isolated")))
    info = _cpuinfo(root)
    sockets: dict[int, dict] = {}
    cores: dict[int, dict[tuple[int, int], dict]] = {}
    total = 0
    for name in listdir(base):
        m = re.fullmatch(r"cpu(\d+)", name)
        cpu_dir = os.path.join(base, name)
        if not m or not exists(os.path.join(cpu_dir, "topology")):
            continue
        number = int(m.group(1))
        topo = os.path.join(cpu_dir, "topology")
        socket_id = max(read_int(os.path.join(topo, "physical_package_id"), 0) or 0, 0)
        core_id = max(read_int(os.path.join(topo, "core_id"), 0) or 0, 0)
        die_id = max(read_int(os.path.join(topo, "die_id"), 0) or 0, 0)
        freq = os.path.join(cpu_dir, "cpufreq")
        if socket_id not in sockets:
            block = info.get(number, {})
            socket = {"name": block.get("model name") or block.get("cpu", ""),
                      "vendor": block.get("vendor_id", ""), "socket": socket_id,
                      "cache": _caches(os.path.join(cpu_dir, "cache")), "cores": [],
                      "frequency": 0,
                      "frequency_minimum": _khz_to_mhz(os.path.join(freq, "cpuinfo_min_freq"))
                      or _khz_to_mhz(os.path.join(freq, "scaling_min_freq")),
                      "frequency_turbo": _khz_to_mhz(os.path.join(freq, "cpuinfo_max_freq"))
                      or _khz_to_mhz(os.path.join(freq, "scaling_max_freq"))}
            sockets[socket_id] = socket
            cores[socket_id] = {}
        core = cores[socket_id].get((die_id, core_id))
        if core is None:
            core = {"core": core_id, "die": die_id, "threads": [],
                    "frequency": _khz_to_mhz(os.path.join(freq, "scaling_cur_freq"))}
            cores[socket_id][(die_id, core_id)] = core
        online = read_int(os.path.join(cpu_dir, "online"), 1) != 0  # cpu0 often has no "online"
        core["threads"].append({"id": number, "numa_node": numa_node_of_cpu(cpu_dir),
                                "thread": len(core["threads"]), "online": online,
                                "isolated": number in isolated})
        total += 1

    out_sockets = []
    for socket_id in sorted(sockets):
        socket = sockets[socket_id]
        socket["cores"] = sorted(cores[socket_id].values(), key=lambda c: (c["core"], c["die"]))
        freqs = [c["frequency"] for c in socket["cores"] if c["frequency"] > 0]
        socket["frequency"] = sum(freqs) // len(freqs) if freqs else 0
        for c in socket["cores"]:
            if not c["frequency"]:
                del c["frequency"]  # omitted when unknown, as LXD does
        for key in ("name", "vendor", "cache", "frequency", "frequency_minimum", "frequency_turbo"):
            if not socket[key]:
                del socket[key]
        out_sockets.append(socket)
    return {"architecture": os.uname().machine, "sockets": out_sockets, "total": total}
