"""`system` of GET /1.0/resources: DMI identity (/sys/class/dmi/id) and the kind of machine."""

from __future__ import annotations

import os

from lxd_daemon.resources.sysfs import exists, path, read

CHASSIS_TYPES = {
    1: "Other", 2: "Unknown", 3: "Desktop", 4: "Low Profile Desktop", 5: "Pizza Box", 6: "Mini Tower",
    7: "Tower", 8: "Portable", 9: "Laptop", 10: "Notebook", 11: "Hand Held", 12: "Docking Station",
    13: "All in One", 14: "Sub Notebook", 15: "Space-saving", 16: "Lunch Box", 17: "Main Server Chassis",
    18: "Expansion Chassis", 19: "SubChassis", 20: "Bus Expansion Chassis", 21: "Peripheral Chassis",
    22: "RAID Chassis", 23: "Rack Mount Chassis", 24: "Sealed-case PC", 25: "Multi-system chassis",
    26: "Compact PCI", 27: "Advanced TCA", 28: "Blade", 29: "Blade Enclosure", 30: "Tablet",
    31: "Convertible", 32: "Detachable", 33: "IoT Gateway", 34: "Embedded PC", 35: "Mini PC", 36: "Stick PC",
}


def machine_type(root: str = "/") -> str:
    """"container", "virtual-machine" or "physical", from files (what systemd-detect-virt looks at)."""
    if read(path(root, "run/systemd/container")):
        return "container"
    try:
        with open(path(root, "proc/1/environ"), "rb") as f:
            if any(v.startswith(b"container=") for v in f.read().split(b"\0")):
                return "container"
    except OSError:
        pass
    flags = next((line for line in read(path(root, "proc/cpuinfo")).splitlines() if line.startswith("flags")), "")
    if " hypervisor" in flags or read(path(root, "sys/hypervisor/type")) or exists(path(root, "proc/xen")):
        return "virtual-machine"
    vendor = read(path(root, "sys/class/dmi/id/sys_vendor"))
    product = read(path(root, "sys/class/dmi/id/product_name"))
    if any(k in f"{vendor} {product}" for k in ("QEMU", "KVM", "VMware", "VirtualBox", "Xen", "Bochs")):
        return "virtual-machine"
    return "physical"


def get_system(root: str = "/") -> dict:
    dmi = path(root, "sys/class/dmi/id")

    def f(name: str) -> str:
        return read(os.path.join(dmi, name))

    system: dict = {"uuid": "", "vendor": "", "product": "", "family": "", "version": "", "sku": "",
                    "serial": "", "type": machine_type(root), "firmware": None, "chassis": None,
                    "motherboard": None}
    if not exists(dmi):  # no DMI (some VMs, most non-x86 machines)
        return system
    kind = f("chassis_type")
    system.update(
        uuid=f("product_uuid"), vendor=f("sys_vendor"), product=f("product_name"), family=f("product_family"),
        version=f("product_version"), sku=f("product_sku"), serial=f("product_serial"),
        firmware={"vendor": f("bios_vendor"), "date": f("bios_date"), "version": f("bios_version")},
        chassis={"vendor": f("chassis_vendor"),
                 "type": CHASSIS_TYPES.get(int(kind), "Unknown") if kind.isdigit() else "Unknown",
                 "serial": f("chassis_serial"), "version": f("chassis_version")},
        motherboard={"vendor": f("board_vendor"), "product": f("board_name"), "serial": f("board_serial"),
                     "version": f("board_version")})
    return system
