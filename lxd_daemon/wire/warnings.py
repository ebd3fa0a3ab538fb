"""Wire models of `/1.0/warnings` (LXD's api.WarningPut)."""

from __future__ import annotations

from pydantic import StrictStr

from lxd_daemon.wire import Request


class WarningPut(Request):
    status: StrictStr = ""
