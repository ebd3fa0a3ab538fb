"""Storage volumes as small value objects, and what a driver declares it can do.

A `Volume` names one volume of one pool: its type (`container`, `virtual-machine`, `image`,
`custom`), its name (`c1`, a snapshot `c1/snap0`, an image's fingerprint), the project it belongs
to, its content type and its config. It carries no behaviour that touches the host: drivers act
on volumes, the storage service keeps their records.

On disk every driver names volumes as LXD does, so that nothing has to move when projects come:
the volume of instance `c1` of project `default` is `c1`, of project `p1` it is `p1_c1`; snapshots
live under `<type>-snapshots/<volume>/<snapshot>`; image volumes are named by fingerprint (images
are not project-specific on disk).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType

SNAPSHOT_DELIMITER = "/"
DEFAULT_PROJECT = "default"


class VolumeType(StrEnum):
    CONTAINER = "container"
    VM = "virtual-machine"
    IMAGE = "image"
    CUSTOM = "custom"

    @property
    def dir_name(self) -> str:
        """The directory (or dataset/LV prefix) holding volumes of this type in a pool."""
        return {"container": "containers", "virtual-machine": "virtual-machines", "image": "images",
                "custom": "custom"}[self.value]

    @property
    def snapshots_dir_name(self) -> str:
        return self.dir_name + "-snapshots"


class ContentType(StrEnum):
    FILESYSTEM = "filesystem"
    BLOCK = "block"


def _frozen(config: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(config or {}))


@dataclass(frozen=True)
class Volume:
    pool: str
    type: VolumeType
    name: str
    project: str = DEFAULT_PROJECT
    content_type: ContentType = ContentType.FILESYSTEM
    config: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", VolumeType(self.type))
        object.__setattr__(self, "content_type", ContentType(self.content_type))
        object.__setattr__(self, "config", _frozen(self.config))

    # -- snapshots ---------------------------------------------------------------------------
    @property
    def is_snapshot(self) -> bool:
        return SNAPSHOT_DELIMITER in self.name

    @property
    def parent_name(self) -> str:
        """The name of the volume a snapshot belongs to (the name itself for a volume)."""
        return self.name.split(SNAPSHOT_DELIMITER, 1)[0]

    @property
    def snapshot_name(self) -> str:
        """The snapshot's own name ("" for a volume that is not a snapshot)."""
        return self.name.split(SNAPSHOT_DELIMITER, 1)[1] if self.is_snapshot else ""

    def snapshot(self, snap: str) -> Volume:
        """The snapshot `snap` of this volume."""
        if self.is_snapshot:
            raise ValueError(f"{self.name!r} is already a snapshot")
        return replace(self, name=f"{self.name}{SNAPSHOT_DELIMITER}{snap}")

    def parent(self) -> Volume:
        return replace(self, name=self.parent_name)

    def renamed(self, new_name: str) -> Volume:
        return replace(self, name=new_name)

    def with_config(self, config: Mapping[str, str]) -> Volume:
        return replace(self, config=dict(config))

    # -- names on disk -----------------------------------------------------------------------
    @property
    def storage_name(self) -> str:
        """The volume's name on disk: `<project>_<name>` outside the default project (LXD's
        rule); custom volumes always carry their project, `default_<name>` too (LXD's
        project.StorageVolume); images are shared by every project and named by fingerprint alone."""
        base = self.parent_name
        if self.type is VolumeType.CUSTOM or (self.type is not VolumeType.IMAGE and self.project != DEFAULT_PROJECT):
            base = f"{self.project}_{base}"
        return base


@dataclass(frozen=True)
class DriverInfo:
    """What a driver can do, declared as data: callers test these flags, never driver names."""

    name: str
    version: str = ""
    # Image volumes are kept unpacked in the pool and instances are made from them by a cheap
    # copy-on-write operation (btrfs snapshot, zfs clone, lvm thin snapshot).
    optimized_images: bool = False
    # The driver has a native backup format (btrfs send, zfs send) besides the generic tarball.
    optimized_backups: bool = False
    # Snapshots and copies cost (almost) nothing: copy-on-write.
    cow_snapshots: bool = False
    # `size` on volumes is enforced.
    quota: bool = False
    # A quota can change while the volume is in use.
    running_quota_resize: bool = False
    # Volumes live on shared storage reachable from other servers.
    remote: bool = False
    # Copies and migration keep inode numbers (hard links survive).
    preserves_inodes: bool = False
    # Volumes are block devices with a filesystem on them (lvm); filesystem volumes are mounted.
    block_backed: bool = False
    # Volume types this driver can hold.
    volume_types: frozenset[VolumeType] = frozenset({VolumeType.CONTAINER, VolumeType.IMAGE, VolumeType.CUSTOM})
    # Migration transports it can speak, best first (generic rsync is always last).
    migration_types: tuple[str, ...] = ("RSYNC",)

    def to_api(self) -> dict:
        """The entry of `GET /1.0`'s `storage_supported_drivers`."""
        return {"Name": self.name, "Version": self.version, "Remote": self.remote}
