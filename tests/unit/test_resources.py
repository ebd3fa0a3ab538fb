"""The /sys and /proc readers behind GET /1.0/resources, on small fixture trees."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lxd_daemon.resources import (
    collect,
    get_cpu,
    get_gpu,
    get_memory,
    get_network,
    get_pci,
    get_storage,
    get_system,
    get_usb,
)


def put(root: Path, rel: str, text: str = "") -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text + "\n" if text else "")
    return p


def link(root: Path, rel: str, target: str) -> None:
    """A relative symlink at `rel` to `target` (both under root), as sysfs makes them."""
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if not p.is_symlink():
        p.symlink_to(os.path.relpath(root / target, p.parent))


# -- cpu ---------------------------------------------------------------------------------------

def two_sockets(root: Path) -> None:
    """cpu0+cpu1: socket 0 core 0 (two threads); cpu2: socket 1 core 0; cpu3: socket 1 core 1,
    offline; cpu2 isolated; sockets on NUMA nodes 0 and 1."""
    layout = {0: (0, 0), 1: (0, 0), 2: (1, 0), 3: (1, 1)}
    for n, (pkg, core) in layout.items():
        base = f"sys/devices/system/cpu/cpu{n}"
        put(root, f"{base}/topology/physical_package_id", str(pkg))
        put(root, f"{base}/topology/core_id", str(core))
        put(root, f"{base}/topology/die_id", "0")
        (root / f"sys/devices/system/node/node{pkg}").mkdir(parents=True, exist_ok=True)
        link(root, f"{base}/node{pkg}", f"sys/devices/system/node/node{pkg}")
    put(root, "sys/devices/system/cpu/cpu3/online", "0")
    put(root, "sys/devices/system/cpu/cpu1/online", "1")
    put(root, "sys/devices/system/cpu/isolated", "2")
    put(root, "sys/devices/system/cpu/cpu0/cache/index0/level", "1")
    put(root, "sys/devices/system/cpu/cpu0/cache/index0/type", "Data")
    put(root, "sys/devices/system/cpu/cpu0/cache/index0/size", "32K")
    put(root, "sys/devices/system/cpu/cpu0/cache/index3/level", "3")
    put(root, "sys/devices/system/cpu/cpu0/cache/index3/type", "Unified")
    put(root, "sys/devices/system/cpu/cpu0/cache/index3/size", "16384K")
    put(root, "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq", "2000000")
    put(root, "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_min_freq", "800000")
    put(root, "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", "3500000")
    put(root, "sys/devices/system/cpu/cpu2/cpufreq/scaling_cur_freq", "1000000")
    put(root, "sys/devices/system/cpu/cpufreq/policy0/x", "not a cpu")  # ignored
    blocks = []
    for n, (pkg, _core) in layout.items():
        model = "Test CPU A" if pkg == 0 else "Test CPU B"
        blocks.append(f"processor\t: {n}\nvendor_id\t: GenuineTest\nmodel name\t: {model}\nphysical id\t: {pkg}\n")
    put(root, "proc/cpuinfo", "\n".join(blocks))


def test_cpu_two_sockets(tmp_path):
    two_sockets(tmp_path)
    cpu = get_cpu(str(tmp_path))
    assert cpu["architecture"] == os.uname().machine
    assert cpu["total"] == 4
    s0, s1 = cpu["sockets"]
    assert (s0["socket"], s0["name"], s0["vendor"]) == (0, "Test CPU A", "GenuineTest")
    assert (s1["socket"], s1["name"]) == (1, "Test CPU B")
    assert s0["cache"] == [{"level": 1, "type": "Data", "size": 32768},
                           {"level": 3, "type": "Unified", "size": 16 << 20}]
    assert "cache" not in s1  # omitted when empty, as LXD's omitempty does
    assert (s0["frequency"], s0["frequency_minimum"], s0["frequency_turbo"]) == (2000, 800, 3500)
    assert s1["frequency"] == 1000 and "frequency_turbo" not in s1
    [core] = s0["cores"]
    assert (core["core"], core["die"], core["frequency"]) == (0, 0, 2000)
    assert core["threads"] == [
        {"id": 0, "numa_node": 0, "thread": 0, "online": True, "isolated": False},
        {"id": 1, "numa_node": 0, "thread": 1, "online": True, "isolated": False}]
    c0, c1 = s1["cores"]
    assert [t["id"] for t in c0["threads"]] == [2] and c0["threads"][0]["isolated"] is True
    assert c0["threads"][0]["numa_node"] == 1
    assert "frequency" not in c1 and c1["threads"][0]["online"] is False


# -- memory ------------------------------------------------------------------------------------

MEMINFO = """MemTotal:        8000000 kB
MemFree:         2000000 kB
Buffers:          100000 kB
Cached:          1000000 kB
HugePages_Total:      10
HugePages_Free:        4
Hugepagesize:       2048 kB
"""


def test_memory_with_numa_and_hugepages(tmp_path):
    put(tmp_path, "proc/meminfo", MEMINFO)
    for n in (0, 1):
        put(tmp_path, f"sys/devices/system/node/node{n}/meminfo",
            f"Node {n} MemTotal:       4000000 kB\nNode {n} MemFree:     1000000 kB\n"
            f"Node {n} MemUsed:        3000000 kB\nNode {n} HugePages_Total:     5\nNode {n} HugePages_Free:  {n * 4}\n")
    mem = get_memory(str(tmp_path))
    assert mem["total"] == 8000000 * 1024
    assert mem["used"] == (8000000 - 2000000 - 1000000 - 100000) * 1024
    assert mem["hugepages_size"] == 2 << 20
    assert mem["hugepages_total"] == 10 * (2 << 20) and mem["hugepages_used"] == 6 * (2 << 20)
    assert mem["nodes"] == [
        {"numa_node": 0, "hugepages_used": 5 * (2 << 20), "hugepages_total": 5 * (2 << 20),
         "used": 3000000 * 1024, "total": 4000000 * 1024},
        {"numa_node": 1, "hugepages_used": 1 * (2 << 20), "hugepages_total": 5 * (2 << 20),
         "used": 3000000 * 1024, "total": 4000000 * 1024}]


def test_memory_total_counts_online_blocks_and_no_numa_omits_nodes(tmp_path):
    put(tmp_path, "proc/meminfo", MEMINFO)
    put(tmp_path, "sys/devices/system/memory/block_size_bytes", "8000000")  # 128 MiB, in hex
    for n, online in ((0, 1), (1, 1), (2, 0)):
        put(tmp_path, f"sys/devices/system/memory/memory{n}/online", str(online))
    mem = get_memory(str(tmp_path))
    assert mem["total"] == 2 * (128 << 20)
    assert "nodes" not in mem


# -- storage -----------------------------------------------------------------------------------

PCI_DISK = "sys/devices/pci0000:00/0000:00:02.0"


def a_disk(root: Path) -> None:
    put(root, "sys/bus/pci/.keep")
    put(root, "sys/bus/virtio/.keep")
    link(root, f"{PCI_DISK}/subsystem", "sys/bus/pci")
    link(root, f"{PCI_DISK}/virtio1/subsystem", "sys/bus/virtio")
    vda = f"{PCI_DISK}/virtio1/block/vda"
    link(root, f"{vda}/device", f"{PCI_DISK}/virtio1")
    put(root, f"{vda}/dev", "254:0")
    put(root, f"{vda}/size", "2097152")  # sectors: 1 GiB
    put(root, f"{vda}/ro", "0")
    put(root, f"{vda}/removable", "0")
    put(root, f"{vda}/queue/physical_block_size", "4096")
    put(root, f"{vda}/queue/rotational", "0")
    put(root, f"{vda}/vda1/partition", "1")
    put(root, f"{vda}/vda1/dev", "254:1")
    put(root, f"{vda}/vda1/size", "2048")
    put(root, f"{vda}/vda1/ro", "1")
    link(root, "sys/class/block/vda", vda)
    link(root, "sys/class/block/vda1", f"{vda}/vda1")
    put(root, "sys/devices/virtual/block/loop0/dev", "7:0")  # no device link: not a disk
    link(root, "sys/class/block/loop0", "sys/devices/virtual/block/loop0")
    put(root, "dev/vda")
    link(root, "dev/disk/by-id/virtio-serial123", "dev/vda")
    put(root, "run/udev/data/b254:0", "E:ID_SERIAL_SHORT=serial123\nE:ID_MODEL=QEMU_DISK\nE:ID_ATA_SATA=1\n")


def test_storage_disk_with_partition(tmp_path):
    a_disk(tmp_path)
    st = get_storage(str(tmp_path))
    assert st["total"] == 2  # a disk and its partition
    [disk] = st["disks"]
    assert disk == {
        "id": "vda", "device": "254:0", "model": "QEMU_DISK", "type": "sata", "read_only": False,
        "size": 1 << 30, "removable": False, "numa_node": 0, "block_size": 4096, "rpm": 0,
        "serial": "serial123", "device_id": "virtio-serial123", "pci_address": "0000:00:02.0",
        "partitions": [{"id": "vda1", "device": "254:1", "read_only": True, "size": 2048 * 512, "partition": 1}]}


# -- network, pci, gpu -------------------------------------------------------------------------

NIC = "sys/devices/pci0000:00/0000:00:03.0"
GPU = "sys/devices/pci0000:00/0000:00:04.0"


def pci_tree(root: Path) -> None:
    a_disk(root)
    put(root, "usr/share/misc/pci.ids", "# comment\n8086  Intel Corporation\n\t10d3  82574L Gigabit Network Connection\n"
        "\t\t8086 0001  subsystem line\n1234  Technical Corp.\n\t1111  QEMU Virtual Video Controller\nC 00  Unclassified\n")
    for dev, cls, vendor, product in ((NIC, "0x020000", "0x8086", "0x10d3"), (GPU, "0x030000", "0x1234", "0x1111"),
                                      (PCI_DISK, "0x010000", "0x1af4", "0x1001")):
        link(root, f"{dev}/subsystem", "sys/bus/pci")
        put(root, f"{dev}/class", cls)
        put(root, f"{dev}/vendor", vendor)
        put(root, f"{dev}/device", product)
        link(root, f"sys/bus/pci/devices/{os.path.basename(dev)}", dev)
    put(root, f"{NIC}/numa_node", "1")
    put(root, f"{PCI_DISK}/numa_node", "-1")
    put(root, "sys/bus/pci/drivers/e1000e/module/version", "3.2.6-k")
    link(root, f"{NIC}/driver", "sys/bus/pci/drivers/e1000e")
    put(root, "sys/kernel/iommu_groups/7/.keep")
    link(root, f"{NIC}/iommu_group", "sys/kernel/iommu_groups/7")
    eth = f"{NIC}/net/eth0"
    for name, value in (("type", "1"), ("address", "52:54:00:12:34:56"), ("dev_port", "0"), ("carrier", "1"),
                        ("speed", "1000"), ("duplex", "full")):
        put(root, f"{eth}/{name}", value)
    link(root, f"{eth}/device", NIC)
    link(root, "sys/class/net/eth0", eth)
    put(root, "sys/devices/virtual/net/lo/type", "772")  # no device: not a card
    link(root, "sys/class/net/lo", "sys/devices/virtual/net/lo")
    put(root, f"{GPU}/drm/card0/dev", "226:0")
    put(root, f"{GPU}/drm/renderD128/dev", "226:128")
    link(root, "sys/class/drm/card0/device", GPU)
    put(root, "sys/class/drm/card0-Virtual-1/status", "connected")  # a connector, not a card


def test_network_card_with_its_pci_address(tmp_path):
    pci_tree(tmp_path)
    net = get_network(str(tmp_path))
    assert net["total"] == 1
    [card] = net["cards"]
    assert card == {
        "driver": "e1000e", "driver_version": "3.2.6-k", "numa_node": 1, "pci_address": "0000:00:03.0",
        "vendor": "Intel Corporation", "vendor_id": "8086", "product": "82574L Gigabit Network Connection",
        "product_id": "10d3",
        "ports": [{"id": "eth0", "address": "52:54:00:12:34:56", "port": 0, "protocol": "ethernet",
                   "auto_negotiation": False, "link_detected": True, "link_speed": 1000, "link_duplex": "full"}]}


def test_pci_devices_and_gpu(tmp_path):
    pci_tree(tmp_path)
    pci = get_pci(str(tmp_path))
    assert pci["total"] == 3
    by = {d["pci_address"]: d for d in pci["devices"]}
    assert sorted(by) == ["0000:00:02.0", "0000:00:03.0", "0000:00:04.0"]
    nic = by["0000:00:03.0"]
    assert (nic["driver"], nic["driver_version"], nic["numa_node"], nic["iommu_group"]) == ("e1000e", "3.2.6-k", 1, 7)
    assert (nic["vendor"], nic["vendor_id"], nic["product_id"]) == ("Intel Corporation", "8086", "10d3")
    assert by["0000:00:02.0"]["numa_node"] == 0 and by["0000:00:02.0"]["driver"] == ""
    assert by["0000:00:02.0"]["vpd"] == {}
    gpu = get_gpu(str(tmp_path))
    assert gpu["total"] == 1
    [card] = gpu["cards"]
    assert card["pci_address"] == "0000:00:04.0" and card["product"] == "QEMU Virtual Video Controller"
    assert card["drm"] == {"id": 0, "card_name": "card0", "card_device": "226:0",
                           "render_name": "renderD128", "render_device": "226:128"}


def test_usb_devices_skip_hubs(tmp_path):
    hub, dev = "sys/devices/usb1", "sys/devices/usb1/1-1"
    for d, cls, num in ((hub, "09", "1"), (dev, "00", "2")):
        put(tmp_path, f"{d}/busnum", "1")
        put(tmp_path, f"{d}/devnum", num)
        put(tmp_path, f"{d}/bDeviceClass", cls)
        put(tmp_path, f"{d}/idVendor", "0781")
        put(tmp_path, f"{d}/idProduct", "5567")
        put(tmp_path, f"{d}/speed", "480")
        link(tmp_path, f"sys/bus/usb/devices/{os.path.basename(d)}", d)
    put(tmp_path, f"{dev}/product", "Cruzer Blade")
    put(tmp_path, f"{dev}/1-1:1.0/bInterfaceClass", "08")
    put(tmp_path, f"{dev}/1-1:1.0/bInterfaceSubClass", "06")
    put(tmp_path, f"{dev}/1-1:1.0/bInterfaceNumber", "00")
    usb = get_usb(str(tmp_path))
    assert usb["total"] == 1
    [d] = usb["devices"]
    assert (d["bus_address"], d["device_address"], d["vendor_id"], d["product_id"], d["product"], d["speed"]) == \
        (1, 2, "0781", "5567", "Cruzer Blade", 480.0)
    assert d["interfaces"] == [{"class": "", "class_id": 8, "driver": "", "driver_version": "", "number": 0,
                                "subclass": "", "subclass_id": 6}]


# -- system ------------------------------------------------------------------------------------

def test_system_without_dmi(tmp_path):
    put(tmp_path, "proc/cpuinfo", "processor\t: 0\nflags\t\t: fpu sse hypervisor\n")
    system = get_system(str(tmp_path))
    assert system == {"uuid": "", "vendor": "", "product": "", "family": "", "version": "", "sku": "", "serial": "",
                      "type": "virtual-machine", "firmware": None, "chassis": None, "motherboard": None}


def test_system_with_dmi(tmp_path):
    dmi = "sys/class/dmi/id"
    for name, value in (("sys_vendor", "ACME"), ("product_name", "Box 9"), ("product_uuid", "1234-abcd"),
                        ("bios_vendor", "ACME BIOS"), ("bios_date", "01/02/2023"), ("bios_version", "1.2"),
                        ("chassis_type", "3"), ("board_name", "B9"), ("board_vendor", "ACME")):
        put(tmp_path, f"{dmi}/{name}", value)
    put(tmp_path, "proc/cpuinfo", "processor\t: 0\nflags\t\t: fpu sse\n")
    system = get_system(str(tmp_path))
    assert (system["type"], system["vendor"], system["product"], system["uuid"]) == \
        ("physical", "ACME", "Box 9", "1234-abcd")
    assert system["firmware"] == {"vendor": "ACME BIOS", "date": "01/02/2023", "version": "1.2"}
    assert system["chassis"]["type"] == "Desktop"
    assert system["motherboard"] == {"vendor": "ACME", "product": "B9", "serial": "", "version": ""}
    put(tmp_path, "run/systemd/container", "lxc")
    assert get_system(str(tmp_path))["type"] == "container"


def test_an_empty_tree_is_empty_not_an_error(tmp_path):
    res = collect(str(tmp_path))
    assert list(res) == ["cpu", "memory", "gpu", "network", "storage", "usb", "pci", "system"]
    assert res["cpu"]["sockets"] == [] and res["cpu"]["total"] == 0
    assert res["memory"]["total"] == 0 and "nodes" not in res["memory"]
    for key, items in (("gpu", "cards"), ("network", "cards"), ("storage", "disks"), ("usb", "devices"),
                       ("pci", "devices")):
        assert res[key] == {items: [], "total": 0}
    assert res["system"]["firmware"] is None
    json.dumps(res)


def test_the_host_reads_without_error():
    res = collect("/")
    assert res["cpu"]["total"] >= 1 and res["memory"]["total"] > 0
    json.dumps(res)
