"""Storage drivers: one class per backend, all implementing drivers.base.Driver."""

from lxd_daemon.storage.drivers.base import Driver
from lxd_daemon.storage.drivers.dir import DirDriver

DRIVERS: dict[str, type[Driver]] = {"dir": DirDriver}

__all__ = ["DRIVERS", "Driver", "DirDriver"]
