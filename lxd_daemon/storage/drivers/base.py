"""The interface a storage driver implements for instance root filesystems and image caches."""

from __future__ import annotations

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
