"""The interface a storage driver implements for instance root filesystems and image caches."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path


class Driver(ABC):
    name = ""
    version = ""

    def __init__(self, pool_name: str, mount_path: Path, config: dict[str, str]):
        self.pool_name = pool_name
        self.mount_path = mount_path
        self.config = config

    @abstractmethod
    async def create_pool(self) -> None:
        """Create the pool's layout (idempotent)."""

    @abstractmethod
    async def delete_pool(self) -> None:
        """Remove the pool's layout (only when nothing uses it)."""

    def container_path(self, name: str) -> Path:
        return self.mount_path / "containers" / name

    def image_cache_path(self, fingerprint: str, key: str) -> Path:
        return self.mount_path / "images" / fingerprint / key

    @abstractmethod
    async def copy_tree(self, src: Path, dst: Path) -> None:
        """Copy a volume's tree (ownership, modes, xattrs kept); dst must not exist."""

    @abstractmethod
    async def delete_tree(self, path: Path) -> None:
        """Remove a volume's tree (missing is fine)."""

    def usage(self) -> dict:
        return {}

    # -- who may enter the pool ----------------------------------------------------------
    # As LXD: the pool and the directories of volume types whose volumes a container must reach
    # (containers, custom volumes) can be traversed (0711), nothing in them can be listed; the
    # image caches and snapshots are root's only (0700). Each instance volume is 0100, owned by
    # root while stopped and by the host uid of the container's root while it runs: that uid
    # can reach its own root filesystem, no other host user can reach into any container (a
    # setuid binary made in a privileged container must not be callable through its host path).
    POOL_MODE = 0o711
    TYPE_DIR_MODES = {"containers": 0o711, "containers-snapshots": 0o700, "custom": 0o711,
                      "custom-snapshots": 0o700, "images": 0o700, "virtual-machines": 0o711,
                      "virtual-machines-snapshots": 0o700}
    INSTANCE_MODE = 0o100
    IMAGE_MODE = 0o700
    CUSTOM_MODE = 0o711

    def secure_instance_volume(self, path: Path, owner_uid: int = 0) -> None:
        """Close an instance (or instance snapshot) volume: mode 0100, owned by `owner_uid`
        (the host uid of the container's root while it runs, else 0) and group root."""
        os.chown(path, owner_uid, 0)
        os.chmod(path, self.INSTANCE_MODE)

    def secure_layout(self) -> None:
        """Set the modes of the pool's own directories and of every image cache entry (at pool
        creation and at each daemon start, fixing trees made by older versions)."""
        root = self.mount_path
        if not root.is_dir():
            return
        os.chmod(root, self.POOL_MODE)
        for sub, mode in self.TYPE_DIR_MODES.items():
            p = root / sub
            p.mkdir(exist_ok=True)
            os.chmod(p, mode)
        images = root / "images"
        for fp in os.listdir(images):
            fdir = images / fp
            if fdir.is_symlink() or not fdir.is_dir():
                continue
            os.chmod(fdir, self.IMAGE_MODE)
            for key in os.listdir(fdir):
                p = fdir / key
                if not p.is_symlink() and p.is_dir():
                    os.chmod(p, self.INSTANCE_MODE)  # copied into containers/ as they are
        for sub in ("containers", "virtual-machines"):
            for e in os.listdir(root / sub):
                p = root / sub / e
                if e.startswith(".") and not p.is_symlink() and p.is_dir():
                    os.chmod(p, 0o700)  # leftovers (trash, temporary copies) being removed
