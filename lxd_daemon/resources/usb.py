"""`usb` of GET /1.0/resources: the devices in /sys/bus/usb/devices (hubs left out, as in LXD)."""

from __future__ import annotations

import os

from lxd_daemon.resources.sysfs import driver_of, hex_id, listdir, names_for, path, read, read_int


def _hex(p: str) -> int:
    return read_int(p, 0, base=16) or 0


def get_usb(root: str = "/") -> dict:
    base = path(root, "sys/bus/usb/devices")
    devices = []
    for name in listdir(base):
        device = os.path.join(base, name)
        if read_int(os.path.join(device, "busnum")) is None or _hex(os.path.join(device, "bDeviceClass")) == 9:
            continue  # interfaces have no busnum; class 9 is a hub
        vendor_id, product_id = hex_id(os.path.join(device, "idVendor")), hex_id(os.path.join(device, "idProduct"))
        vendor, product = names_for(root, "usb.ids", vendor_id, product_id)
        try:
            speed = float(read(os.path.join(device, "speed")) or 0)
        except ValueError:
            speed = 0.0
        interfaces = []
        for sub in listdir(device):
            iface = os.path.join(device, sub)
            if not sub.startswith(name) or not os.path.isdir(iface):
                continue
            driver, version = driver_of(iface)
            interfaces.append({"class": "", "class_id": _hex(os.path.join(iface, "bInterfaceClass")),
                               "driver": driver, "driver_version": version,
                               "number": _hex(os.path.join(iface, "bInterfaceNumber")),
                               "subclass": "", "subclass_id": _hex(os.path.join(iface, "bInterfaceSubClass"))})
        devices.append({"bus_address": read_int(os.path.join(device, "busnum"), 0),
                        "device_address": read_int(os.path.join(device, "devnum"), 0) or 0,
                        "interfaces": interfaces, "vendor": vendor, "vendor_id": vendor_id,
                        "product": read(os.path.join(device, "product")) or product,
                        "product_id": product_id, "speed": speed})
    return {"devices": devices, "total": len(devices)}
