"""`none`: a device that only masks a device of the same name inherited from a profile."""

from __future__ import annotations

from lxd_daemon.devices.base import Device


class NoneDevice(Device):
    type = "none"
    options = {}
