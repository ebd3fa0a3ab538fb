"""Managed network types: name -> driver class (base.NetworkDriver)."""

from __future__ import annotations

from lxd_daemon.networks.drivers.base import DriverContext, InvalidConfig, NetworkDriver
from lxd_daemon.networks.drivers.bridge import BridgeDriver
from lxd_daemon.networks.drivers.macvlan import MacvlanDriver
from lxd_daemon.networks.drivers.physical import PhysicalDriver

DRIVERS: dict[str, type[NetworkDriver]] = {
    "bridge": BridgeDriver,
    "macvlan": MacvlanDriver,
    "physical": PhysicalDriver,
}

__all__ = ["DRIVERS", "BridgeDriver", "DriverContext", "InvalidConfig", "MacvlanDriver", "NetworkDriver",
           "PhysicalDriver"]
