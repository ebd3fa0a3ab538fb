"""GET /1.0/resources and `lxc info --resources` against the real daemon, checked against /proc and /sys."""

from __future__ import annotations

import os
import re

import httpx
import pytest

from tests.helpers import envelope_ok
from tests.integration.test_access_tls import client_context, free_port, self_signed

pytestmark = pytest.mark.integration


def iec(n: int) -> str:
    """A size as the client prints it (LXD's units.GetByteSizeStringIEC, 2 decimals)."""
    if n < 1024:
        return f"{n}B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.2f}{unit}"
    return f"{value:.2f}EiB"


def host_memory_total() -> int:
    """What LXD reports: the online memory blocks when the kernel lists them, else MemTotal."""
    mem_total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    base = "/sys/devices/system/memory"
    try:
        block = int(open(f"{base}/block_size_bytes").read().strip(), 16)
    except OSError:
        return mem_total
    online = 0
    for name in os.listdir(base):
        try:
            online += name.startswith("memory") and open(f"{base}/{name}/online").read().strip() == "1"
        except OSError:
            continue
    return block * online or mem_total


def host_threads() -> int:
    return sum(1 for line in open("/proc/cpuinfo") if re.match(r"processor\s*:", line))


def host_disks() -> list[str]:
    """Block devices backed by hardware (loop, zram, dm have no `device`)."""
    return sorted(n for n in os.listdir("/sys/block") if os.path.exists(f"/sys/block/{n}/device"))


def test_lxc_info_resources_renders_this_host(ready):
    out = ready.lxc("info", "--resources").stdout
    assert re.search(r"^CPUs? \(" + re.escape(os.uname().machine) + r"\):$", out, re.M), out
    threads = re.findall(r"^\s+- \d+ \(id: \d+, online: (true|false), NUMA node: \d+\)$", out, re.M)
    assert len(threads) == host_threads(), out
    memory = out.split("\nMemory:\n", 1)[1]
    assert re.search(r"^  Total: " + re.escape(iec(host_memory_total())) + "$", memory, re.M), out
    disk_ids = re.findall(r"^ {2,4}ID: (\S+)$", out.split("\nDisk", 1)[1], re.M) if host_disks() else []
    assert sorted(disk_ids) == host_disks(), out


def test_get_resources_has_lxds_shape(ready):
    r = ready.api("GET", "/1.0/resources")
    assert r.status_code == 200, r.text
    body = r.json()
    envelope_ok(body)
    res = body["metadata"]
    assert list(res) == ["cpu", "memory", "gpu", "network", "storage", "usb", "pci", "system"]
    cpu = res["cpu"]
    assert set(cpu) == {"architecture", "sockets", "total"} and cpu["total"] == host_threads()
    assert cpu["architecture"] == os.uname().machine
    ids = []
    for socket in cpu["sockets"]:
        assert {"socket", "cores"} <= set(socket)
        for core in socket["cores"]:
            assert {"core", "die", "threads"} <= set(core)
            for t in core["threads"]:
                assert set(t) == {"id", "numa_node", "thread", "online", "isolated"}
                ids.append(t["id"])
    assert len(ids) == len(set(ids)) == cpu["total"]
    mem = res["memory"]
    assert {"hugepages_total", "hugepages_used", "hugepages_size", "used", "total"} <= set(mem)
    assert mem["total"] == host_memory_total() and 0 < mem["used"] <= mem["total"]
    for key, items in (("gpu", "cards"), ("network", "cards"), ("storage", "disks"), ("usb", "devices"),
                       ("pci", "devices")):
        assert isinstance(res[key][items], list) and isinstance(res[key]["total"], int), key
    assert sorted(d["id"] for d in res["storage"]["disks"]) == host_disks()
    for d in res["storage"]["disks"]:
        assert {"id", "device", "read_only", "size", "removable", "numa_node", "block_size", "rpm", "device_id",
                "partitions"} <= set(d)
        assert d["size"] == int(open(f"/sys/block/{d['id']}/size").read()) * 512
    pci = sorted(os.listdir("/sys/bus/pci/devices")) if os.path.isdir("/sys/bus/pci/devices") else []
    assert sorted(d["pci_address"] for d in res["pci"]["devices"]) == pci
    assert res["pci"]["total"] == len(pci)
    for card in res["network"]["cards"]:
        assert "numa_node" in card
        if "pci_address" in card:
            assert card["pci_address"] in pci
    assert set(res["system"]) == {"uuid", "vendor", "product", "family", "version", "sku", "serial", "type",
                                  "firmware", "chassis", "motherboard"}
    assert res["system"]["type"] in ("physical", "virtual-machine", "container")
    exts = ready.api("GET", "/1.0").json()["metadata"]["api_extensions"]
    assert {"resources", "resources_v2", "resources_system"} <= set(exts)


def test_untrusted_tls_client_is_refused(ready, tmp_path):
    port = free_port()
    r = ready.api("PATCH", "/1.0", json={"config": {"core.https_address": f"127.0.0.1:{port}"}})
    assert r.status_code == 200, r.text
    try:
        for cert in (None, self_signed(tmp_path)):
            with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=client_context(cert), timeout=30) as c:
                r = c.get("/1.0/resources")
                assert r.status_code == 403, r.text
                assert r.json()["error"] == "not authorized"
    finally:
        ready.api("PATCH", "/1.0", json={"config": {"core.https_address": ""}})

