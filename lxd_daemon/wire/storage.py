"""Wire models for storage pools (LXD's api.StoragePoolsPost / StoragePoolPut)."""

from __future__ import annotations

from pydantic import StrictStr

from lxd_daemon.wire import Request


class StoragePoolPut(Request):
    description: StrictStr = ""
    config: dict[StrictStr, StrictStr] = {}


class StoragePoolsPost(StoragePoolPut):
    name: StrictStr
    driver: StrictStr
