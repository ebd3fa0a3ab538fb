"""`pci` and `gpu` of GET /1.0/resources: /sys/bus/pci/devices and the display controllers."""

from __future__ import annotations

import os
import re

from lxd_daemon.resources.sysfs import (
    driver_of,
    exists,
    hex_id,
    link_name,
    listdir,
    names_for,
    numa_node_of,
    path,
    pci_cards,
    read,
    read_int,
    usb_address,
)


def get_pci(root: str = "/") -> dict:
    base = path(root, "sys/bus/pci/devices")
    devices = []
    for name in listdir(base):
        device = os.path.join(base, name)
        driver, version = driver_of(device)
        vendor_id, product_id = hex_id(os.path.join(device, "vendor")), hex_id(os.path.join(device, "device"))
        vendor, product = names_for(root, "pci.ids", vendor_id, product_id)
        group = link_name(os.path.join(device, "iommu_group"))
        devices.append({"driver": driver, "driver_version": version, "numa_node": numa_node_of(device),
                        "pci_address": name, "vendor": vendor, "vendor_id": vendor_id, "product": product,
                        "product_id": product_id, "iommu_group": int(group) if group.isdigit() else 0,
                        "vpd": {}})
    return {"devices": devices, "total": len(devices)}


def _drm(device: str) -> dict | None:
    d = os.path.join(device, "drm")
    if not exists(d):
        return None
    drm: dict = {"id": 0, "card_name": "", "card_device": ""}
    for name in listdir(d):
        dev = read(os.path.join(d, name, "dev"))
        if m := re.fullmatch(r"card(\d+)", name):
            drm.update(id=int(m.group(1)), card_name=name, card_device=dev)
        elif name.startswith("controlD"):
            drm.update(control_name=name, control_device=dev)
        elif name.startswith("renderD"):
            drm.update(render_name=name, render_device=dev)
    return drm


def _gpu(root: str, device: str, pci: str) -> dict:
    driver, version = driver_of(device)
    vendor_id, product_id = hex_id(os.path.join(device, "vendor")), hex_id(os.path.join(device, "device"))
    vendor, product = names_for(root, "pci.ids", vendor_id, product_id)
    card = {"driver": driver, "driver_version": version, "drm": _drm(device)}
    if exists(os.path.join(device, "sriov_numvfs")):
        card["sriov"] = {"current_vfs": read_int(os.path.join(device, "sriov_numvfs"), 0) or 0,
                         "maximum_vfs": read_int(os.path.join(device, "sriov_totalvfs"), 0) or 0, "vfs": []}
    card.update(numa_node=numa_node_of(device), pci_address=pci, vendor=vendor, vendor_id=vendor_id,
                product=product, product_id=product_id, usb_address=usb_address(device))
    return {k: v for k, v in card.items() if k == "numa_node" or v not in ("", None)}


def get_gpu(root: str = "/") -> dict:
    # DRM cards (connectors are card0-HDMI-A-1: not cards), then display controllers (PCI class
    # 0x03) with no DRM driver
    return pci_cards(root, "drm", lambda name: re.fullmatch(r"card\d+", name) is not None, "0x03", _gpu)
