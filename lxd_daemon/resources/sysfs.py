"""Small readers of /sys, /proc and /run files under a root directory (the host's is "/").

Every reader answers a default instead of raising when a file is missing or unreadable: a VM
without DMI, a host without NUMA or USB simply has less to show.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache


def path(root: str, *parts: str) -> str:
    """`parts` (absolute or relative) joined under `root`."""
    return os.path.join(root, *(p.lstrip("/") for p in parts))


def exists(p: str) -> bool:
    return os.path.lexists(p)


def read(p: str, default: str = "") -> str:
    try:
        with open(p, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:  # missing, or a sysfs attribute that refuses reads (carrier of a down link)
        return default


def read_int(p: str, default: int | None = None, base: int = 10) -> int | None:
    try:
        return int(read(p), base)
    except ValueError:
        return default


def listdir(p: str) -> list[str]:
    try:
        return sorted(os.listdir(p), key=natural)
    except OSError:
        return []


def natural(name: str):
    """Sort key: cpu2 before cpu10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def link_name(p: str) -> str:
    """The last component of the path a symlink (or chain of them) leads to; "" when missing."""
    if not exists(p):
        return ""
    return os.path.basename(os.path.realpath(p))


def hex_id(p: str) -> str:
    """A sysfs id attribute ("0x8086") as LXD shows it ("8086")."""
    v = read(p)
    return v[2:] if v.startswith("0x") else v


def numa_node_of(device: str) -> int:
    """A device's NUMA node from its numa_node attribute (-1, missing: 0)."""
    n = read_int(os.path.join(device, "numa_node"), 0) or 0
    return n if n > 0 else 0


def numa_node_of_cpu(cpu_dir: str) -> int:
    """The node a CPU belongs to: its "nodeN" entry (absent without NUMA support: 0)."""
    for name in listdir(cpu_dir):
        m = re.fullmatch(r"node(\d+)", name)
        if m:
            return int(m.group(1))
    return 0


def parse_cpuset(text: str) -> set[int]:
    """"0-3,8" -> {0, 1, 2, 3, 8}; junk is ignored."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                out.update(range(int(lo), int(hi) + 1))
            elif part:
                out.add(int(part))
        except ValueError:
            continue
    return out


def driver_of(device: str) -> tuple[str, str]:
    """(driver name, driver version) of a bound device; the version is the module's, or the
    kernel release for built-in drivers (as LXD reports them); ("", "") when unbound."""
    drv = os.path.join(device, "driver")
    if not exists(drv):
        return "", ""
    version = read(os.path.join(drv, "module", "version")) or os.uname().release
    return link_name(drv), version


def subsystem_of(device: str) -> str:
    return link_name(os.path.join(device, "subsystem"))


def pci_address(device: str) -> str:
    """The PCI address of a device (through a virtio parent); "" when not on PCI."""
    if not exists(os.path.join(device, "subsystem")):
        return ""
    real = os.path.realpath(device)
    sub = subsystem_of(real)
    if sub == "virtio":
        real = os.path.dirname(real)
        sub = subsystem_of(real)
    return os.path.basename(real) if sub == "pci" else ""


def usb_address(device: str) -> str:
    """"bus:dev" of the USB device a device hangs off; "" when not on USB."""
    if not exists(device):
        return ""
    real = os.path.realpath(device)
    if "/usb" not in real:
        return ""
    p = real
    while p and p != "/":
        bus, dev = read_int(os.path.join(p, "busnum")), read_int(os.path.join(p, "devnum"))
        if bus is not None and dev is not None:
            return f"{bus}:{dev}"
        p = os.path.dirname(p)
    return ""


# -- vendor and product names from the pci.ids / usb.ids databases, when installed ----------------

_IDS_DIRS = ("usr/share/misc", "usr/share/hwdata", "var/lib/pciutils", "var/lib/usbutils", "usr/share")


@lru_cache(maxsize=8)
def id_names(root: str, filename: str) -> dict[str, tuple[str, dict[str, str]]]:
    """vendor id -> (vendor name, {product id: product name}) from the first `filename`
    found; {} when none is installed (the names are then left empty)."""
    for d in _IDS_DIRS:
        p = path(root, d, filename)
        if not os.path.isfile(p):
            continue
        out: dict[str, tuple[str, dict[str, str]]] = {}
        current: dict[str, str] | None = None
        try:
            with open(p, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if not line.strip() or line.startswith("#"):
                        continue
                    if line.startswith("C "):  # the device class section closes the vendor list
                        break
                    if not line.startswith("\t"):
                        vid, _, name = line.rstrip("\n").partition("  ")
                        current = {}
                        out[vid.strip().lower()] = (name.strip(), current)
                    elif not line.startswith("\t\t") and current is not None:
                        pid, _, name = line.strip().partition("  ")
                        current[pid.strip().lower()] = name.strip()
        except OSError:
            return {}
        return out
    return {}


def names_for(root: str, filename: str, vendor_id: str, product_id: str) -> tuple[str, str]:
    vendor = id_names(root, filename).get(vendor_id.lower())
    if vendor is None:
        return "", ""
    return vendor[0], vendor[1].get(product_id.lower(), "")


def pci_cards(root: str, class_dir: str, wanted, pci_class: str, make) -> dict:
    """The cards of one kind (network cards, GPUs): the devices behind /sys/class/`class_dir`
    entries whose name passes `wanted(name)`, then the PCI devices of class `pci_class` (a hex
    prefix such as "0x02") that no entry stood for (no driver bound); SR-IOV virtual functions
    under their physical function's `sriov.vfs`. `make(root, device_dir, pci_address)` builds a
    card. Returns {"cards", "total"} (virtual functions counted)."""
    cards: list[dict] = []
    vfs: dict[str, list[dict]] = {}
    known: set[str] = set()

    def add(device: str, card: dict) -> None:
        physfn = os.path.join(device, "physfn")
        if exists(physfn):
            vfs.setdefault(os.path.basename(os.path.realpath(physfn)), []).append(card)
        else:
            cards.append(card)

    base = path(root, "sys/class", class_dir)
    for name in listdir(base):
        device = os.path.join(base, name, "device")
        if not wanted(name) or not exists(device):  # (virtual interfaces, DRM connectors: no device)
            continue
        pci = pci_address(device)
        if pci:
            if pci in known:
                continue
            known.add(pci)
        add(device, make(root, device, pci))
    pci_base = path(root, "sys/bus/pci/devices")
    for name in listdir(pci_base):
        device = os.path.join(pci_base, name)
        if name in known or not read(os.path.join(device, "class")).startswith(pci_class):
            continue
        add(device, make(root, device, name))
    total = 0
    for card in cards:
        if "sriov" in card:
            card["sriov"]["vfs"] = vfs.get(card.get("pci_address", ""), [])
            total += len(card["sriov"]["vfs"])
        total += 1
    return {"cards": cards, "total": total}
