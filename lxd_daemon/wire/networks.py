"""Wire models for networks (LXD's api.NetworksPost / NetworkPut / NetworkPost)."""

from __future__ import annotations

from pydantic import StrictStr

from lxd_daemon import names
from lxd_daemon.wire import Name, Request


class NetworkPut(Request):
    description: StrictStr = ""
    config: dict[StrictStr, StrictStr] = {}


class NetworksPost(NetworkPut):
    name: Name(names.network) = ""
    type: StrictStr = ""


class NetworkPost(Request):
    name: Name(names.network) = ""
