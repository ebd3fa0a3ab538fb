"""Device validation moved to the devices package (lxd_daemon/devices/); these names are kept
for the callers and tests that import them from here."""

from lxd_daemon.devices.base import container_path
from lxd_daemon.devices.disk import (
    PROPAGATION,
    disk_required,
    is_root_disk,
    is_volume_disk,
    root_disk,
    volume_source,
)
from lxd_daemon.devices.registry import NOT_YET, validate_device, validate_devices
from lxd_daemon.devices.unix import unix_required

__all__ = ["NOT_YET", "PROPAGATION", "container_path", "disk_required", "is_root_disk", "is_volume_disk",
           "root_disk", "unix_required", "validate_device", "validate_devices", "volume_source"]
