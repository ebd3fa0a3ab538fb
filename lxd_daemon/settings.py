"""Daemon settings from the command line and the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LXD_DIR = "/var/lib/lxd"


def lxd_dir_from_env() -> Path:
    return Path(os.environ.get("LXD_DIR") or DEFAULT_LXD_DIR)


@dataclass(frozen=True)
class Settings:
    lxd_dir: Path
    group: str | None = None
    debug: bool = False
    verbose: bool = False
    logfile: Path | None = None
    syslog: bool = False
    workers: int = 1

    @property
    def socket_path(self) -> Path:
        return self.lxd_dir / "unix.socket"

    @property
    def db_path(self) -> Path:
        return self.lxd_dir / "database" / "lxd.db"

    @property
    def lock_path(self) -> Path:
        return self.lxd_dir / "lxd.lock"
