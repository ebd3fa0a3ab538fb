"""Wire models for storage pools and volumes (LXD's api.StoragePoolsPost, StoragePoolPut, StorageVolume*)."""

from __future__ import annotations

from typing import Any

from pydantic import StrictBool, StrictStr

from lxd_daemon import names
from lxd_daemon.wire import Name, Request


class StoragePoolPut(Request):
    description: StrictStr = ""
    config: dict[StrictStr, StrictStr] = {}


class StoragePoolsPost(StoragePoolPut):
    name: Name(names.pool)
    driver: StrictStr


# -- storage volumes (LXD's api.StorageVolume*) ----------------------------------------------------

class StorageVolumeSource(Request):
    type: StrictStr = ""
    name: StrictStr = ""
    pool: StrictStr = ""
    project: StrictStr = ""
    volume_only: StrictBool = False
    refresh: StrictBool = False
    # type "migration" (migration/volumes.py): the source's operation, pinned certificate, secrets
    mode: StrictStr = ""
    operation: StrictStr = ""
    certificate: StrictStr = ""
    secrets: dict[StrictStr, StrictStr] = {}


class StorageVolumePut(Request):
    description: StrictStr = ""
    config: dict[StrictStr, StrictStr] = {}
    restore: Name(names.snapshot) = ""


class StorageVolumesPost(StorageVolumePut):
    name: Name(names.volume) = ""
    type: StrictStr = "custom"
    content_type: StrictStr = "filesystem"
    source: StorageVolumeSource = StorageVolumeSource()


class StorageVolumePost(Request):
    name: Name(names.volume) = ""
    pool: StrictStr = ""
    project: StrictStr = ""
    migration: StrictBool = False
    volume_only: StrictBool = False
    target: dict[StrictStr, Any] | None = None  # push migration: the sink's operation, certificate, secrets


class StorageVolumeSnapshotsPost(Request):
    name: Name(names.snapshot) = ""
    expires_at: StrictStr | None = None


class StorageVolumeSnapshotPut(Request):
    description: StrictStr = ""
    expires_at: StrictStr = ""


class StorageVolumeSnapshotPost(Request):
    name: Name(names.snapshot) = ""
    migration: StrictBool = False
