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
    pci_cards,
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
    # interfaces with a device (bridges, veths, lo have none), then network controllers (PCI
    # class 0x02) with no interface
    return pci_cards(root, "net", lambda name: True, "0x02", _card)
