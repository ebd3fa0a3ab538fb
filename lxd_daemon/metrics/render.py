"""The text LXD 5.0.2 serves on `GET /1.0/metrics`: its metric families (names, HELP texts,
types, order) and the way it writes samples.

A scrape is a `Metrics` (family name -> samples); `render()` writes the families in LXD's order,
each with its `# HELP` and `# TYPE` line, then its samples with their labels sorted by name,
and ends with `# EOF`. Values are written as Go's strconv.FormatFloat(v, 'g', -1, 64) writes
them (LXD's format: `4.2e+07` for large values), so a scrape reads the same as LXD's.
"""

from __future__ import annotations

import math
from decimal import Decimal

# (name, HELP text) in LXD's order (its MetricType enumeration). Texts as LXD 5.0.2 has them.
FAMILIES: tuple[tuple[str, str], ...] = (
    ("lxd_cpu_seconds_total", "The total number of CPU time used in seconds."),
    ("lxd_disk_read_bytes_total", "The total number of bytes read."),
    ("lxd_disk_reads_completed_total", "The total number of completed reads."),
    ("lxd_disk_written_bytes_total", "The total number of bytes written."),
    ("lxd_disk_writes_completed_total", "The total number of completed writes."),
    ("lxd_filesystem_avail_bytes", "The number of available space in bytes."),
    ("lxd_filesystem_free_bytes", "The number of free space in bytes."),
    ("lxd_filesystem_size_bytes", "The size of the filesystem in bytes."),
    ("lxd_memory_Active_anon_bytes", "The amount of anonymous memory on active LRU list."),
    ("lxd_memory_Active_file_bytes", "The amount of file-backed memory on active LRU list."),
    ("lxd_memory_Active_bytes", "The amount of memory on active LRU list."),
    ("lxd_memory_Cached_bytes", "The amount of cached memory."),
    ("lxd_memory_Dirty_bytes", "The amount of memory waiting to get written back to the disk."),
    ("lxd_memory_HugepagesFree_bytes", "The amount of free memory for hugetlb."),
    ("lxd_memory_HugepagesTotal_bytes", "The amount of used memory for hugetlb."),
    # (sic: LXD 5.0.2 gives Inactive_anon the HELP text of Inactive_file)
    ("lxd_memory_Inactive_anon_bytes", "The amount of file-backed memory on inactive LRU list."),
    ("lxd_memory_Inactive_file_bytes", "The amount of file-backed memory on inactive LRU list."),
    ("lxd_memory_Inactive_bytes", "The amount of memory on inactive LRU list."),
    ("lxd_memory_Mapped_bytes", "The amount of mapped memory."),
    ("lxd_memory_MemAvailable_bytes", "The amount of available memory."),
    ("lxd_memory_MemFree_bytes", "The amount of free memory."),
    ("lxd_memory_MemTotal_bytes", "The amount of used memory."),
    ("lxd_memory_RSS_bytes", "The amount of anonymous and swap cache memory."),
    ("lxd_memory_Shmem_bytes", "The amount of cached filesystem data that is swap-backed."),
    ("lxd_memory_Swap_bytes", "The amount of used swap memory."),
    ("lxd_memory_Unevictable_bytes", "The amount of unevictable memory."),
    ("lxd_memory_Writeback_bytes", "The amount of memory queued for syncing to disk."),
    ("lxd_network_receive_bytes_total", "The amount of received bytes on a given interface."),
    ("lxd_network_receive_drop_total", "The amount of received dropped bytes on a given interface."),
    ("lxd_network_receive_errs_total", "The amount of received errors on a given interface."),
    ("lxd_network_receive_packets_total", "The amount of received packets on a given interface."),
    ("lxd_network_transmit_bytes_total", "The amount of transmitted bytes on a given interface."),
    ("lxd_network_transmit_drop_total", "The amount of transmitted dropped bytes on a given interface."),
    ("lxd_network_transmit_errs_total", "The amount of transmitted errors on a given interface."),
    ("lxd_network_transmit_packets_total", "The amount of transmitted packets on a given interface."),
    ("lxd_procs_total", "The number of running processes."),
)
HELP = dict(FAMILIES)
ORDER = {name: i for i, (name, _) in enumerate(FAMILIES)}

# What LXD 5.0.2 sends (response.SyncResponsePlain): plain text, in the OpenMetrics layout.
CONTENT_TYPE = "text/plain"


def metric_type(name: str) -> str:
    """LXD's rule: the process count is a gauge (it goes down), `_total` a counter, `_bytes` a gauge."""
    if name == "lxd_procs_total":
        return "gauge"
    if name.endswith("_total"):
        return "counter"
    if name.endswith("_bytes"):
        return "gauge"
    return ""


def format_value(v: float) -> str:
    """`v` as Go's strconv.FormatFloat(v, 'g', -1, 64): the shortest digits that read back as
    `v`, in exponent form when the exponent is below -4 or at least 6."""
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == 0:
        return "-0" if math.copysign(1, v) < 0 else "0"
    sign, digits, exp = Decimal(repr(v)).as_tuple()
    ds = "".join(map(str, digits)).rstrip("0") or "0"
    exp += len("".join(map(str, digits))) - len(ds)  # the stripped zeros move into the exponent
    nd = len(ds)
    dp = nd + exp  # where the decimal point goes, counted in digits from the left
    x = dp - 1
    neg = "-" if sign else ""
    if x < -4 or x >= 6:
        mant = ds[0] + ("." + ds[1:] if nd > 1 else "")
        return f"{neg}{mant}e{'-' if x < 0 else '+'}{abs(x):02d}"
    if dp <= 0:
        return f"{neg}0.{'0' * -dp}{ds}"
    if dp >= nd:
        return f"{neg}{ds}{'0' * (dp - nd)}"
    return f"{neg}{ds[:dp]}.{ds[dp:]}"


def escape_label(value: str) -> str:
    """A label value as OpenMetrics quotes it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The samples of one scrape, by family, in the order they were added."""

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}

    def add(self, name: str, value: float, labels: dict[str, str]) -> None:
        if name not in HELP:
            raise KeyError(f"unknown metric family {name!r}")
        self.samples.setdefault(name, []).append((labels, value))

    def merge(self, other: Metrics) -> None:
        for name, samples in other.samples.items():
            self.samples.setdefault(name, []).extend(samples)

    def render(self) -> str:
        return render(self)


def render(metrics: Metrics) -> str:
    """The OpenMetrics text of `metrics`: only families that have samples, `# EOF` last."""
    out: list[str] = []
    for name in sorted(metrics.samples, key=ORDER.__getitem__):
        out.append(f"# HELP {name} {HELP[name]}")
        out.append(f"# TYPE {name} {metric_type(name)}")
        for labels, value in metrics.samples[name]:
            if labels:
                body = ",".join(f'{k}="{escape_label(str(labels[k]))}"' for k in sorted(labels))
                out.append(f"{name}{{{body}}} {format_value(value)}")
            else:
                out.append(f"{name} {format_value(value)}")
    out.append("# EOF")
    return "\n".join(out) + "\n"
