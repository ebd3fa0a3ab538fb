"""Wire models for storage pools (LXD's api.StoragePoolsPost / StoragePoolPut)."""

from __future__ import annotations

from pydantic import StrictStr

from lxd_daemon import names
from lxd_daemon.wire import Name, Request


class StoragePoolPut(Request):
    description: StrictStr = ""
    config: dict[StrictStr, StrictStr] = {}


class StoragePoolsPost(StoragePoolPut):
    name: Name(names.pool)
    driver: StrictStr
