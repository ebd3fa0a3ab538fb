"""Wire models for backups (LXD's api.InstanceBackupsPost / InstanceBackupPost and the storage
volume equivalents)."""

from __future__ import annotations

from pydantic import StrictBool, StrictStr

from lxd_daemon import names
from lxd_daemon.wire import Name, Request


class InstanceBackupsPost(Request):
    name: Name(names.backup) = ""
    expires_at: StrictStr = ""
    instance_only: StrictBool = False
    container_only: StrictBool = False  # older clients
    optimized_storage: StrictBool = False
    compression_algorithm: StrictStr = ""


class StorageVolumeBackupsPost(Request):
    name: Name(names.backup) = ""
    expires_at: StrictStr = ""
    volume_only: StrictBool = False
    optimized_storage: StrictBool = False
    compression_algorithm: StrictStr = ""


class BackupPost(Request):
    name: Name(names.backup) = ""
