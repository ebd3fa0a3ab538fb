"""`network` of GET /1.0/resources: network cards (by PCI function) and their ports."""

from __future__ import annotations

import os

from lxd_daemon.resources.sysfs import (
    driver_of,
    exists,
    hex_id,
    listdir,
    names_for,
    numa_node_of,
    path,
    pci_address,
    read,
    read_int,
    usb_address,
)

PROTOCOLS = {1: "ethernet", 19: "ATM", 32: "infiniband"}


def _port(iface_dir: str, name: str) -> dict:
    kind = read_int(os.path.join(iface_dir, "type"))
    port = {"id": name, "address": read(os.path.join(iface_dir, "address")),
            "port": read_int(os.path.join(iface_dir, "dev_port"), 0) or 0,
            "protocol": PROTOCOLS.get(kind, "unknown") if kind is not None else "",
            "auto_negotiation": False,
            "link_detected": read(os.path.join(iface_dir, "carrier")) == "1"}
    speed = read_int(os.path.join(iface_dir, "speed"), 0) or 0
    if speed > 0:  # -1 or unreadable while the link is down
        port["link_speed"] = speed
        port["link_duplex"] = read(os.path.join(iface_dir, "duplex"))
    if not port["address"]:
        del port["address"]
    return port


def _card(root: str, device: str, pci: str) -> dict:
    card: dict = {}
    driver, version = driver_of(device)
    vendor_id, product_id = hex_id(os.path.join(device, "vendor")), hex_id(os.path.join(device, "device"))
    vendor, product = names_for(root, "pci.ids", vendor_id, product_id)
    card.update(driver=driver, driver_version=version)
    net_dir = os.path.join(device, "net")
    if exists(net_dir):
        card["ports"] = [_port(os.path.join(net_dir, n), n) for n in listdir(net_dir)]
    if exists(os.path.join(device, "sriov_numvfs")):
        card["sriov"] = {"current_vfs": read_int(os.path.join(device, "sriov_numvfs"), 0) or 0,
                         "maximum_vfs": read_int(os.path.join(device, "sriov_totalvfs"), 0) or 0, "vfs": []}
    card.update(numa_node=numa_node_of(device), pci_address=pci, vendor=vendor, vendor_id=vendor_id,
                product=product, product_id=product_id, usb_address=usb_address(device))
    return {k: v for k, v in card.items() if k == "numa_node" or v not in ("", None, [])}


def get_network(root: str = "/") -> dict:
    cards: list[dict] = []
    vfs: dict[str, list[dict]] = {}
    known: set[str] = set()

    def add(device: str, card: dict) -> None:
        physfn = os.path.join(device, "physfn")
        if exists(physfn):
            vfs.setdefault(os.path.basename(os.path.realpath(physfn)), []).append(card)
        else:
            cards.append(card)

    class_net = path(root, "sys/class/net")
    for name in listdir(class_net):
        device = os.path.join(class_net, name, "device")
        if not exists(device):  # virtual interfaces (bridges, veths, lo) have no device
            continue
        pci = pci_address(device)
        if pci:
            if pci in known:
                continue
            known.add(pci)
        add(device, _card(root, device, pci))
    pci_base = path(root, "sys/bus/pci/devices")
    for name in listdir(pci_base):  # network controllers without an interface (no driver bound)
        device = os.path.join(pci_base, name)
        if name in known or not read(os.path.join(device, "class")).startswith("0x02"):
            continue
        add(device, _card(root, device, name))
    total = 0
    for card in cards:
        if "sriov" in card:
            card["sriov"]["vfs"] = vfs.get(card.get("pci_address", ""), [])
            total += len(card["sriov"]["vfs"])
        total += 1
    return {"cards": cards, "total": total}
