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
    pci_address,
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
    cards: list[dict] = []
    vfs: dict[str, list[dict]] = {}
    known: set[str] = set()

    def add(device: str, card: dict) -> None:
        physfn = os.path.join(device, "physfn")
        if exists(physfn):
            vfs.setdefault(os.path.basename(os.path.realpath(physfn)), []).append(card)
        else:
            cards.append(card)

    drm_class = path(root, "sys/class/drm")
    for name in listdir(drm_class):
        device = os.path.join(drm_class, name, "device")
        if not re.fullmatch(r"card\d+", name) or not exists(device):  # connectors are card0-HDMI-A-1
            continue
        pci = pci_address(device)
        if pci:
            if pci in known:
                continue
            known.add(pci)
        add(device, _gpu(root, device, pci))
    pci_base = path(root, "sys/bus/pci/devices")
    for name in listdir(pci_base):  # display controllers without a DRM driver
        device = os.path.join(pci_base, name)
        if name in known or not read(os.path.join(device, "class")).startswith("0x03"):
            continue
        add(device, _gpu(root, device, name))
    total = 0
    for card in cards:
        if "sriov" in card:
            card["sriov"]["vfs"] = vfs.get(card.get("pci_address", ""), [])
            total += len(card["sriov"]["vfs"])
        total += 1
    return {"cards": cards, "total": total}
