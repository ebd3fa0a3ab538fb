"""The host's hardware as LXD's `api.Resources` (GET /1.0/resources), read from /sys and /proc.

Each reader takes the root of the tree to read (the host's is "/"), so that tests can point it
at a small fixture tree. What is missing on a machine (GPUs, NUMA, USB, DMI) is left empty.
"""

from __future__ import annotations

from lxd_daemon.resources.cpu import get_cpu
from lxd_daemon.resources.memory import get_memory
from lxd_daemon.resources.network import get_network
from lxd_daemon.resources.pci import get_gpu, get_pci
from lxd_daemon.resources.storage import get_storage
from lxd_daemon.resources.system import get_system
from lxd_daemon.resources.usb import get_usb

__all__ = ["collect", "get_cpu", "get_gpu", "get_memory", "get_network", "get_pci", "get_storage",
           "get_system", "get_usb"]


def collect(root: str = "/") -> dict:
    """Everything, in the order LXD renders it."""
    return {"cpu": get_cpu(root), "memory": get_memory(root), "gpu": get_gpu(root),
            "network": get_network(root), "storage": get_storage(root), "usb": get_usb(root),
            "pci": get_pci(root), "system": get_system(root)}
