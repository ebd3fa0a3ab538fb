"""`storage` of GET /1.0/resources: the disks in /sys/class/block and their partitions.

A disk is a block device backed by hardware (it has a `device` link): loop, ram, zram and
device-mapper devices have none and are not listed, as in LXD.
"""

from __future__ import annotations

import os

from lxd_daemon.resources.sysfs import (
    exists,
    listdir,
    numa_node_of,
    path,
    pci_address,
    read,
    read_int,
    subsystem_of,
    usb_address,
)


def _udev(root: str, devnum: str) -> dict[str, str]:
    """The udev database's properties of block device `devnum` ("8:0"); {} without udev."""
    out = {}
    for line in read(path(root, f"run/udev/data/b{devnum}")).splitlines():
        if line.startswith("E:"):
            key, _, value = line[2:].partition("=")
            out[key.strip()] = value.strip()
    return out


def _udev_decode(s: str) -> str:
    """udev's \\x20 escapes."""
    try:
        return s.encode("latin-1").decode("unicode_escape").strip()
    except (UnicodeDecodeError, UnicodeEncodeError):
        return s


def _links(root: str, directory: str, name: str) -> str:
    """The first link in /dev/disk/by-* leading to /dev/<name>."""
    d = path(root, directory)
    target = os.path.realpath(path(root, "dev", name))
    for link in listdir(d):
        if os.path.realpath(os.path.join(d, link)) == target:
            return link
    return ""


def _disk(root: str, base: str, name: str, entries: list[str]) -> dict | None:
    entry = os.path.join(base, name)
    device = os.path.join(entry, "device")
    devnum = read(os.path.join(entry, "dev"))
    if not exists(device) or not devnum:
        return None
    dtype = subsystem_of(device)
    if dtype == "rbd":
        return None
    disk = {"id": name, "device": devnum, "model": read(os.path.join(device, "model")), "type": dtype,
            "read_only": read(os.path.join(entry, "ro")) == "1",
            "size": (read_int(os.path.join(entry, "size"), 0) or 0) * 512,
            "removable": read(os.path.join(entry, "removable")) == "1",
            "wwn": read(os.path.join(entry, "wwid")), "numa_node": numa_node_of(device),
            "device_path": _links(root, "dev/disk/by-path", name),
            "block_size": read_int(os.path.join(entry, "queue/physical_block_size"), 0) or 0,
            "firmware_version": read(os.path.join(device, "firmware_rev")), "rpm": 0, "serial": "",
            "device_id": _links(root, "dev/disk/by-id", name), "partitions": [],
            "pci_address": pci_address(device), "usb_address": usb_address(device)}
    if name.startswith("sr") and disk["removable"]:
        disk["type"] = "cdrom"
        if disk["size"] == 0x1FFFFF * 512:  # the size of an empty drive
            disk["size"] = 0
    udev = _udev(root, devnum)
    if udev.get("ID_CDROM") == "1":
        disk["type"] = "cdrom"
    elif udev.get("ID_USB_DRIVER") == "usb-storage":
        disk["type"] = "usb"
    elif udev.get("ID_ATA_SATA") == "1":
        disk["type"] = "sata"
    disk["firmware_version"] = disk["firmware_version"] or udev.get("ID_REVISION", "")
    disk["serial"] = udev.get("ID_SERIAL_SHORT", "")
    if udev.get("ID_MODEL_ENC"):
        disk["model"] = _udev_decode(udev["ID_MODEL_ENC"])
    elif udev.get("ID_MODEL"):
        disk["model"] = udev["ID_MODEL"]
    if udev.get("ID_ATA_ROTATION_RATE_RPM", "").isdigit():
        disk["rpm"] = int(udev["ID_ATA_ROTATION_RATE_RPM"])
    else:  # LXD reports the rotational flag here when the rate is unknown
        disk["rpm"] = read_int(os.path.join(entry, "queue/rotational"), 0) or 0
    for sub in entries:
        part = os.path.join(base, sub)
        if sub == name or not sub.startswith(name) or not exists(os.path.join(part, "partition")):
            continue
        disk["partitions"].append({"id": sub, "device": read(os.path.join(part, "dev")),
                                   "read_only": read(os.path.join(part, "ro")) == "1",
                                   "size": (read_int(os.path.join(part, "size"), 0) or 0) * 512,
                                   "partition": read_int(os.path.join(part, "partition"), 0) or 0})
    for key in ("model", "type", "wwn", "device_path", "firmware_version", "serial", "pci_address", "usb_address"):
        if not disk[key]:
            del disk[key]
    return disk


def get_storage(root: str = "/") -> dict:
    base = path(root, "sys/class/block")
    entries = listdir(base)
    disks = [d for d in (_disk(root, base, name, entries) for name in entries) if d is not None]
    return {"disks": disks, "total": sum(1 + len(d["partitions"]) for d in disks)}
