"""Storage drivers: one class per backend, all implementing drivers.base.Driver."""

from lxd_daemon.storage.drivers.base import Driver
from lxd_daemon.storage.drivers.btrfs import BtrfsDriver
from lxd_daemon.storage.drivers.dir import DirDriver
from lxd_daemon.storage.drivers.lvm import LvmDriver
from lxd_daemon.storage.drivers.zfs import ZfsDriver

DRIVERS: dict[str, type[Driver]] = {"dir": DirDriver}
DRIVERS["lvm"] = LvmDriver
DRIVERS["zfs"] = ZfsDriver
DRIVERS["btrfs"] = BtrfsDriver

__all__ = ["DRIVERS", "Driver", "DirDriver"]
